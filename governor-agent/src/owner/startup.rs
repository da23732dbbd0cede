//! Start-up: the kernel side the agent owns, made (or taken over from an
//! agent that was killed) before anything is served.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{Agent, Health, Snapshot};
use crate::{
    attribution::{Attribution, Identity, Persistence, ProgramSet},
    ceiling::Ceiling,
    cgroup::{self, Subtree},
    config::{Config, IdentityMode},
    error::AgentError,
    mounts, paths,
    policy::{Policy, Rules},
    psi::PsiMonitor,
    status::StatusReport,
};

impl Agent {
    /// Loads the programs, sets up the cgroup subtree, the ceiling and the
    /// PSI trigger. What is optional (the ceiling, PSI, program
    /// statistics) is reported as unavailable, with the reason, rather than
    /// refused.
    pub fn start(config: Config) -> Result<Self, AgentError> {
        // Name missing privileges before touching anything that needs them.
        crate::privilege::check_prerequisites()?;
        // The configuration against this machine's NUMA nodes, before any
        // state is taken over.
        let rules = Rules::from_config(&config).on_nodes(&config, &crate::numa::machine_nodes())?;
        // bpffs is where the maps are pinned; like tracefs, mount it when
        // the host has not.
        mounts::ensure_bpffs().map_err(|e| AgentError::io("mounting bpffs", e))?;
        paths::private_dir(&config.run_dir)?;
        let persistence = Persistence {
            pin_dir: PathBuf::from(paths::DEFAULT_PIN_DIR).join(&config.database),
            state_file: config
                .run_dir
                .join(format!("attribution-{}.json", config.database)),
        };
        let (attribution, restart) =
            Attribution::load_persistent(ProgramSet::Full, &persistence, &config.maps)?;
        if restart.taken_over > 0 {
            tracing::info!("restarted: attribution continues from the pinned maps");
        }
        let (identity, subtree) = identity_and_subtree(&config)?;
        let (ceiling, ceiling_error) = ceiling(&config, subtree.as_ref());
        let (cpuset, cpuset_error) = cpuset(&config, subtree.as_ref());
        let (psi, psi_error) = pressure_stall(&config, subtree.as_ref());
        let program_stats = if config.program_stats {
            match crate::attribution::program_stats_on() {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(error = %e, "eBPF program statistics are off");
                    None
                }
            }
        } else {
            None
        };
        let empty = StatusReport::new(
            &config.database,
            identity,
            subtree.as_ref().map(|s| s.domain.display().to_string()),
            &config.engine_names(),
            Default::default(),
        );
        let (snapshot, _) = watch::channel(Arc::new(Snapshot {
            report: empty,
            health: Health::default(),
        }));
        let (config_tx, _) = watch::channel(Arc::new(config.clone()));
        let mut agent = Self {
            policy: Policy::new(rules),
            config,
            identity,
            attribution,
            subtree,
            ceiling,
            ceiling_error,
            cpuset,
            cpuset_error,
            psi,
            psi_error,
            sessions: BTreeMap::new(),
            own: BTreeMap::new(),
            health: Health::default(),
            mark_status: Default::default(),
            wakes: Default::default(),
            reactions: Default::default(),
            tick_times: Default::default(),
            deliveries: Default::default(),
            metrics_addr: None,
            _program_stats: program_stats,
            slow: None,
            wanted: Arc::new(super::snapshot::Wanted::new()),
            scanned: None,
            restart,
            kernel_events: Default::default(),
            marks_polled: false,
            sched_thread: None,
            delivery_thread: None,
            delivery_raised: false,
            scheduling: crate::sched::current(crate::sched::this_thread()),
            placement: BTreeMap::new(),
            snapshot,
            config_tx,
        };
        // What `status` shows before the first tick: everything read now.
        agent.publish_now();
        Ok(agent)
    }
}

/// How engines are told apart, and the database's cgroup subtree when
/// cgroups are used.
fn identity_and_subtree(config: &Config) -> Result<(Identity, Option<Subtree>), AgentError> {
    let engines = config.engine_names();
    let cgroup_subtree = || -> Result<Subtree, AgentError> {
        let root = match &config.cgroup_root {
            Some(root) => root.clone(),
            None => cgroup::find_v2_mount().ok_or_else(|| AgentError::CgroupUnusable {
                path: PathBuf::from("/sys/fs/cgroup"),
                reason: "no cgroup2 filesystem is mounted".into(),
            })?,
        };
        Subtree::create_or_adopt(
            &root,
            &config.database,
            &engines,
            &config.own_process_engines(),
        )
    };
    let (identity, subtree) = match config.identity {
        IdentityMode::Tid => (Identity::Tid, None),
        IdentityMode::Cgroup => (Identity::Cgroup, Some(cgroup_subtree()?)),
        IdentityMode::Auto => match cgroup_subtree() {
            Ok(s) => (Identity::Cgroup, Some(s)),
            Err(e) => {
                tracing::warn!(error = %e, "threaded cgroups unavailable; using the TID map for engine identity");
                (Identity::Tid, None)
            }
        },
    };
    if let Some(s) = &subtree {
        tracing::info!(cgroup = %s.domain.display(), engines = engines.len(), "cgroup subtree ready");
        if let Some(uid) = config.delegate_uid {
            s.delegate(uid)?;
            tracing::info!(uid, cgroup = %s.dir.display(), "engine cgroups delegated");
        }
    }
    Ok((identity, subtree))
}

/// The high mark the ceiling's cgroup normally has: the Critical share of
/// the ceiling when enforcing, the ceiling itself when observing.
pub(super) fn normal_high_mark(config: &Config) -> u64 {
    let limit = config.ceiling_bytes();
    if config.enforce {
        (limit as f64 * config.thresholds.critical) as u64
    } else {
        limit
    }
}

/// The ceiling in the kernel (v2 memory.max/high, or the v1 fallback), and
/// the own-process engines' high marks; or why there is none.
fn ceiling(config: &Config, subtree: Option<&Subtree>) -> (Option<Ceiling>, Option<String>) {
    let limit = config.ceiling_bytes();
    let high = normal_high_mark(config);
    let mut c = match Ceiling::setup(
        subtree.map(|s| s.domain.as_path()),
        &config.database,
        limit,
        high,
    ) {
        Ok(c) => {
            tracing::info!(backend = ?c.backend(), cgroup = %c.dir().display(), limit, high, "ceiling enforced");
            c
        }
        Err(e) => {
            tracing::warn!(error = %e, "the ceiling is not enforced by the kernel");
            return (None, Some(e.to_string()));
        }
    };
    let hot: u64 = config.limits().iter().map(|l| l.hot_set_bytes).sum();
    match c.set_protected(hot) {
        Ok(()) => match c.status().protection_note {
            None => tracing::info!(
                bytes = hot,
                "hot sets protected from outside reclaim (memory.low)"
            ),
            Some(note) if hot > 0 => tracing::warn!("{note}"),
            Some(_) => {}
        },
        Err(e) => tracing::warn!(error = %e, "the hot sets are not protected by memory.low"),
    }
    for l in config.limits().into_iter().filter(|l| l.own_process) {
        let dir = subtree
            .and_then(|s| s.own.get(&l.name))
            .map(|cg| cg.dir.as_path());
        if let Err(e) = c.setup_engine(&l.name, dir, l.budget_bytes) {
            tracing::warn!(engine = %l.name, error = %e, "the engine's own cgroup has no high mark");
        }
    }
    (Some(c), None)
}

/// The database's cpuset in the kernel (`[cpuset]`), or why there is none.
/// Configured and not applied is not fatal (as the ceiling): the agent
/// says so and the status shows it.
fn cpuset(
    config: &Config,
    subtree: Option<&Subtree>,
) -> (Option<crate::cpuset::Cpuset>, Option<String>) {
    let Some(cs) = &config.cpuset else {
        return (None, None);
    };
    match crate::cpuset::Cpuset::setup(subtree.map(|s| s.domain.as_path()), &config.database, cs) {
        Ok(c) => {
            let s = c.status();
            tracing::info!(backend = ?s.backend, cgroup = %s.cgroup, cpus = %s.effective_cpus, mems = %s.effective_mems, "cpuset applied");
            (Some(c), None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the cpuset is not applied");
            (None, Some(e.to_string()))
        }
    }
}

/// The PSI trigger on the database's cgroup (PSI is kept per cgroup v2,
/// controller or not), else the host's; or why there is none.
fn pressure_stall(
    config: &Config,
    subtree: Option<&Subtree>,
) -> (Option<PsiMonitor>, Option<String>) {
    if !config.pressure_stall.enabled {
        return (None, None);
    }
    let source = subtree
        .map(|s| s.domain.join("memory.pressure"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(paths::HOST_MEMORY_PRESSURE));
    let ps = config.pressure_stall;
    match PsiMonitor::start(
        &source,
        Duration::from_millis(ps.stall_ms),
        Duration::from_millis(ps.window_ms),
    ) {
        Ok(m) => (Some(m), None),
        Err(e) => {
            tracing::warn!(error = %e, "pressure stall information is not an input");
            (None, Some(e.to_string()))
        }
    }
}
