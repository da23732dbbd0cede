//! `nodedb-governor run`: starts the owner of the agent's state, binds its
//! sockets and its HTTP endpoint, drops the privileges it no longer needs,
//! serves them on a thread of their own, and turns signals into inputs,
//! until SIGINT or SIGTERM.
//!
//! ```text
//!  serving thread (normal policy)          owner's thread (SCHED_FIFO)
//!  control sessions ─┐                    ┌─> libraries (pressure, spill, purge, limits)
//!  admin `assign`  ──┼─ Input ─> owner ───┼─> kernel (cgroups, maps, memory.high)
//!  SIGHUP (reload) ──┘   (ticks, policy)  └─> Snapshot ─> `status`, /metrics
//! ```

use std::{fs, os::unix::fs::PermissionsExt, path::PathBuf};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    admin,
    config::Config,
    owner::{Agent, Input},
    serving::{self, Serving},
};

/// How many inputs may wait for the owner before their senders wait too.
const INPUT_QUEUE: usize = 1024;

/// Runs the agent until SIGINT or SIGTERM; SIGHUP reloads `config_path`
/// (the bundled default when None).
pub async fn run(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let admin_path = config.socket_path();
    let control_path = config.control_socket_path();
    let metrics_addr = config.metrics_addr;
    let delegating = config.delegate_uid.is_some();
    // Each control connection holds a few descriptors, and the agent a
    // few hundred of its own at most.
    let fds_needed = crate::control::DESCRIPTORS_PER_CONNECTION
        * u64::from(config.control.max_connections)
        + 256;
    match crate::privilege::raise_nofile() {
        Ok(n) if n < fds_needed => tracing::warn!(
            limit = n,
            needed = fds_needed,
            "RLIMIT_NOFILE is below what control.max_connections needs: past it, connections wait (raise LimitNOFILE)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "raising RLIMIT_NOFILE"),
    }
    let admin_gid = config
        .admin_group
        .as_ref()
        .map(|g| crate::privilege::resolve_group("admin_group", g))
        .transpose()?;
    let control_gid = config
        .control_group
        .as_ref()
        .map(|g| crate::privilege::resolve_group("control_group", g))
        .transpose()?;
    let mut agent = Agent::start(config)?;
    // The owner runs here when the runtime has this one thread (the
    // binary's does); on another runtime its tasks could move, so the
    // thread is not raised.
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread
    {
        agent.schedule_thread(crate::sched::this_thread());
    } else {
        tracing::warn!("not a current-thread runtime: realtime_priority is not applied");
    }
    let admin_listener = bind_socket(&admin_path, admin_gid)?;
    tracing::info!(socket = %admin_path.display(), "agent running");
    let control_listener = bind_socket(&control_path, control_gid)?;
    tracing::info!(socket = %control_path.display(), "control socket open");
    let metrics_listener = match metrics_addr {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the metrics address {addr}"))?;
            l.set_nonblocking(true)?;
            let bound = l.local_addr()?;
            tracing::info!(addr = %bound, "serving /metrics");
            agent.set_metrics_addr(bound);
            Some(l)
        }
        None => None,
    };

    // The programs are attached, the cgroups made and delegated, the
    // sockets and the endpoint bound: what is left is the running agent's.
    // Capabilities are per thread: the runtime has this one, and the PSI
    // poller dropped its own (status shows what every thread holds); the
    // serving thread, made next, inherits what is left.
    let kept =
        crate::privilege::drop_capabilities(&crate::privilege::kept_capabilities(delegating))?;
    tracing::info!(kept = %kept.join(","), "capabilities dropped");
    // The snapshot made at startup showed them before the drop.
    agent.slow_parts_changed();

    let (inputs, rx) = mpsc::channel(INPUT_QUEUE);
    let mut serving = Serving::start(serving::Parts {
        admin: admin_listener,
        admins: admin::server::Admins { gid: admin_gid },
        control: control_listener,
        metrics: metrics_listener,
        inputs: inputs.clone(),
        snapshots: agent.snapshots(),
        configs: agent.configs(),
        deliveries: agent.deliveries(),
    })?;
    agent.schedule_delivery(serving.delivery_tid);
    let mut owner = tokio::spawn(agent.serve(rx));

    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    // None: a signal to stop. Otherwise the task that ended on its own:
    // none of them does but by a panic or a failed listener, and an agent
    // without its owner, its sockets or its endpoint is one the service
    // manager must restart (it exits non-zero; its pins stay, for the
    // agent started next to carry on from them).
    let ended: Option<serving::Ended> = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT: stopping");
                break None;
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                break None;
            }
            _ = hup.recv() => reload(&inputs, config_path.as_ref()).await,
            ended = &mut owner => break Some(("the owner", ended)),
            ended = &mut serving.ended => match ended {
                Ok(ended) => break Some(ended),
                // The serving thread ended without a word: its runtime
                // could not start its tasks (logged).
                Err(_) => break Some(("the serving thread", Ok(()))),
            },
        }
    };
    serving.stop();
    let result = match ended {
        Some((task, ended)) => {
            let why = match ended {
                Err(e) if e.is_panic() => format!("{task} task panicked"),
                Err(e) => format!("{task} task failed: {e}"),
                Ok(()) => format!("{task} task stopped"),
            };
            tracing::error!(%why, "the agent stops");
            // Not a stop: the owner is not told to clean up (a clean stop
            // removes the pins, the registry and the database's cgroups).
            // It is dropped with the runtime, and everything stays for the
            // agent the service manager starts next to carry on from.
            owner.abort();
            Err(anyhow::anyhow!("{why}: the agent stopped"))
        }
        None => {
            // Sessions may still hold senders: the owner is told to stop.
            let _ = inputs.send(Input::Stop).await;
            owner.await.context("the agent's owner task")
        }
    };
    let _ = fs::remove_file(&admin_path);
    let _ = fs::remove_file(&control_path);
    result
}

/// SIGHUP: reads the file again and hands it to the owner; a bad file, or
/// one the owner refuses, leaves the old configuration in force.
async fn reload(inputs: &mpsc::Sender<Input>, path: Option<&PathBuf>) {
    let config = match crate::cli::load_config(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: configuration refused, the old one stays");
            return;
        }
    };
    let (reply, answer) = oneshot::channel();
    let config = Box::new(config);
    if inputs.send(Input::Reload { config, reply }).await.is_err() {
        return;
    }
    match answer.await {
        Ok(Ok(())) => tracing::info!("SIGHUP: configuration reloaded"),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "SIGHUP: configuration refused, the old one stays")
        }
        Err(_) => {}
    }
}

/// Binds a Unix socket at `path` (replacing a stale one), mode 0660, and
/// gives it to `group` if one is named; non-blocking, for the serving
/// runtime to take.
fn bind_socket(
    path: &std::path::Path,
    group: Option<u32>,
) -> anyhow::Result<std::os::unix::net::UnixListener> {
    // Only root may write where the socket is: nobody can swap it (or
    // the path chmod'ed below) for their own.
    if let Some(dir) = path.parent() {
        crate::paths::private_dir(dir)?;
    }
    match fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    listener.set_nonblocking(true)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    if let Some(gid) = group {
        std::os::unix::fs::lchown(path, None, Some(gid))
            .with_context(|| format!("giving {} to gid {gid}", path.display()))?;
    }
    Ok(listener)
}
