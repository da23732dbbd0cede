//! A flood of clients against an agent governing a breaching engine: the
//! engine is still spilled at every breach, the agent's descriptors and
//! memory stay bounded by its connection limits, and no governed process
//! is forgotten.

use std::{
    io::Write,
    os::unix::net::UnixStream,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use nodedb_governor_agent::control::TURNED_AWAY_AT_ONCE;
use nodedb_governor_testkit::{
    harness::probes::report, privileged::skip_unless_privileged, wait::wait_for, wire::hello,
};
use serde_json::Value;

const IDLE: usize = 1_000;
const CHURN: usize = 10_000;
const MAX_CONNECTIONS: usize = 1_200;

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// This process may hold the idle clients (each a descriptor), and so may
/// the agent it starts (it inherits the limit).
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads into a live struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_max = lim.rlim_max.max(want);
    lim.rlim_cur = want.min(lim.rlim_max);
    // SAFETY: a live struct; root may raise the hard limit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn a_flood_of_clients_neither_stops_enforcement_nor_grows_the_agent() {
    if skip_unless_privileged("control socket flood") {
        return;
    }
    raise_nofile(8192);
    let agent = super::start_agent_with(
        &format!(
            "[control]\nmax_connections = {MAX_CONNECTIONS}\nmax_connections_per_uid = {MAX_CONNECTIONS}\nhello_timeout_ms = 60000\n"
        ),
        &super::three_engines(&["timeseries", "query"]),
    );
    let pid = agent.pid();
    // Settled before anything connects.
    std::thread::sleep(Duration::from_millis(500));
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));

    // The governed engine: driven over its budget round after round, from
    // before the flood to after it.
    let mut breaching = agent.probe(env!("CARGO_BIN_EXE_breach-probe"));
    breaching.args(["--rounds", "60"]);
    let breaches = std::thread::spawn(move || report::<Value>(&mut breaching));
    wait_for("the breaching library to be welcomed", || {
        agent.status_json()["clients"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    });
    // And one that holds 32 MiB of another engine through it all.
    let mut holder = agent.spawn_probe(
        env!("CARGO_BIN_EXE_hold-probe"),
        &["--mib", "32", "--engine", "timeseries"],
        std::process::Stdio::null(),
    );
    let holding = |agent: &nodedb_governor_testkit::harness::Agent| {
        agent.status_json()["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"].as_u64() == Some(holder.id() as u64))
            .and_then(|p| p["engines"]["timeseries"]["resident_bytes"].as_u64())
            .unwrap_or(0)
    };
    wait_for("the holder's 32 MiB to be attributed", || {
        holding(&agent) >= 30 << 20
    });

    // Sampled all along: the agent's descriptors and resident memory.
    let done = Arc::new(AtomicBool::new(false));
    let (peak_fds, peak_rss) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (done, peak_fds, peak_rss) = (done.clone(), peak_fds.clone(), peak_rss.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak_fds.fetch_max(open_fds(pid), Ordering::Relaxed);
                peak_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // 1,000 that stay: half silent (no hello), half welcomed that never
    // read what the agent sends them.
    let hello = hello(&agent.database, &["query"]);
    let mut idle = Vec::new();
    for i in 0..IDLE {
        let Ok(mut s) = UnixStream::connect(&agent.control) else {
            continue;
        };
        if i % 2 == 1 {
            let _ = s.write_all(&hello);
        }
        idle.push(s);
    }
    // 10,000 that come and go, from four threads, half with a hello.
    let churned: Vec<_> = (0..4)
        .map(|t| {
            let (path, hello) = (agent.control.clone(), hello.clone());
            std::thread::spawn(move || {
                let mut refused = 0u32;
                for i in 0..CHURN / 4 {
                    match UnixStream::connect(&path) {
                        Ok(mut s) => {
                            if (i + t) % 2 == 0 {
                                let _ = s.write_all(&hello);
                            }
                        }
                        Err(_) => refused += 1,
                    }
                }
                refused
            })
        })
        .collect();
    let refused: u32 = churned.into_iter().map(|t| t.join().unwrap()).sum();
    let report = breaches.join().unwrap();
    drop(idle);
    wait_for("the agent to close the flood's connections", || {
        open_fds(pid) <= fds_before + 8
    });
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let (peak_fds, peak_rss) = (
        peak_fds.load(Ordering::Relaxed),
        peak_rss.load(Ordering::Relaxed),
    );
    let rss_after = rss_kib(pid);
    let lat = &report["latency_us"];
    eprintln!(
        "flood: {IDLE} idle + {CHURN} churned connections ({refused} refused by the kernel's listen queue); \
         agent fds {fds_before} -> peak {peak_fds} -> {}, VmRSS {rss_before} -> peak {peak_rss} -> {rss_after} KiB; \
         breach to spill during it: p50 {} us, p99 {} us, max {} us",
        open_fds(pid),
        lat["p50"],
        lat["p99"],
        lat["max"]
    );
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 60, "every breach was answered with a spill");
    // Each connection holds its socket and a pidfd; those past the limit
    // are told why a few at a time.
    let bound = fds_before + 2 * MAX_CONNECTIONS as u64 + TURNED_AWAY_AT_ONCE as u64 + 16;
    assert!(
        peak_fds <= bound,
        "descriptors beyond the connection limit: {fds_before} -> {peak_fds} (bound {bound})"
    );
    assert!(
        peak_rss <= rss_before + 64 * 1024,
        "the agent grew by {} KiB",
        peak_rss - rss_before
    );
    assert!(
        holding(&agent) >= 30 << 20,
        "the holder was forgotten, or its memory: {}",
        agent.status_json()["processes"]
    );
    let _ = holder.kill();
}
