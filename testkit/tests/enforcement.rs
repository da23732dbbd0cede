//! The agent enforcing, end to end, as root: a process embedding the
//! library registers over the control socket; an engine driven over its
//! budget by memory it never reserved (only the kernel knows) is caught by
//! the attribution and spilled back under budget. The control socket
//! refuses uids not on the allow-list and answers malformed, truncated and
//! oversized frames with errors while a good client keeps working.
//! Unprivileged runs skip with the reason.

use std::{
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use nodedb_governor::control::wire::{self, Decoder, EngineDecl, MAX_FRAME, ToAgent, ToLibrary};
use nodedb_governor_agent::privilege;
use nodedb_governor_testkit::harness::{agent_binary, unique};

/// A running agent with a private config; stopped on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
    database: String,
    control: PathBuf,
}

/// Runs the agent on `dir`/governor.toml (its log in `dir`/agent.log) and
/// waits for its control socket.
fn launch(dir: &Path, control: &Path) -> Child {
    let log = dir.join("agent.log");
    let mut child = Command::new(agent_binary())
        .args(["run", "--config"])
        .arg(dir.join("governor.toml"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting the agent");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !control.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the agent exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not open its control socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

const ENGINES: &str = "[[engine]]\nname = \"vector\"\nbudget = \"64MiB\"\n\
     [[engine]]\nname = \"timeseries\"\nbudget = \"64MiB\"\n\
     [[engine]]\nname = \"query\"\nbudget = \"64MiB\"\n";

impl Agent {
    fn start(extra: &str) -> Self {
        Self::with_engines(extra, ENGINES)
    }

    fn with_engines(extra: &str, engines: &str) -> Self {
        let database = unique("nodedb-enforce");
        let dir = std::env::temp_dir().join(&database);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.join("governor.toml");
        std::fs::write(
            &config,
            format!(
                "database = \"{database}\"\nrun_dir = \"{}\"\n{}\n{extra}\n{engines}",
                dir.display(),
                if extra.contains("ceiling") {
                    ""
                } else {
                    "ceiling = \"1GiB\""
                }
            ),
        )
        .unwrap();
        let control = dir.join("control.sock");
        let child = launch(&dir, &control);
        Self {
            child,
            dir,
            database,
            control,
        }
    }
}

impl Agent {
    /// Starts the agent again on the same configuration.
    fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.control);
        self.child = launch(&self.dir, &self.control);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if let Some(root) = nodedb_governor_agent::cgroup::find_v2_mount() {
            remove_cgroup(&root.join(&self.database));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process killed when the test ends, failed or not (a probe left
/// running would hold the test's output pipe open).
struct Reaped(Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a cgroup directory and its children, deepest first (cgroupfs
/// takes only rmdir).
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[test]
fn an_engine_over_its_budget_by_unreserved_memory_is_spilled_back_under_it() {
    if privilege::skip_unprivileged("enforcement end to end") {
        return;
    }
    // The other engines' floors are their whole budgets: nothing to
    // borrow, so a breach must end in a spill.
    let agent = Agent::with_engines(
        "",
        "[[engine]]\nname = \"vector\"\nbudget = \"64MiB\"\n\
         [[engine]]\nname = \"timeseries\"\nbudget = \"64MiB\"\nfloor = \"64MiB\"\n\
         [[engine]]\nname = \"query\"\nbudget = \"64MiB\"\nfloor = \"64MiB\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_breach-probe"))
        .arg("--socket")
        .arg(&agent.control)
        .args(["--database", &agent.database, "--rounds", "40"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "breach-probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 40, "every breach was answered with a spill");
    for r in rounds {
        assert!(
            r["freed_bytes"].as_u64() >= r["target_bytes"].as_u64()
                && r["target_bytes"].as_u64() > Some(0),
            "each spill freed at least its target: {r}"
        );
    }
    let final_level = report["final_level"].as_str().unwrap();
    assert!(
        final_level.contains("Normal") || final_level.contains("Warning"),
        "the agent saw the engine back under its budget: {final_level}"
    );
    eprintln!(
        "breach (Critical crossed) to spill, 40 rounds at the default tick: p50 {} us, p99 {} us, max {} us",
        report["latency_us"]["p50"], report["latency_us"]["p99"], report["latency_us"]["max"]
    );
}

#[test]
fn an_idle_engine_lends_its_budget_and_takes_it_back_with_spills_on_the_borrower() {
    if privilege::skip_unprivileged("rebalancing end to end") {
        return;
    }
    // Timeseries' floor is its whole budget, so Query is the only lender.
    let agent = Agent::with_engines(
        "",
        "[[engine]]\nname = \"vector\"\nbudget = \"64MiB\"\n\
         [[engine]]\nname = \"timeseries\"\nbudget = \"64MiB\"\nfloor = \"64MiB\"\n\
         [[engine]]\nname = \"query\"\nbudget = \"64MiB\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_rebalance-probe"))
        .arg("--socket")
        .arg(&agent.control)
        .args(["--database", &agent.database])
        .arg("--admin")
        .arg(agent.dir.join("agent.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rebalance-probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |k: &str| r[k].as_u64().unwrap();
    const MIB: u64 = 1 << 20;
    assert_eq!(get("configured_cap_bytes"), 64 * MIB);
    // Query (idle, nothing held) keeps a quarter of its budget and lends
    // the rest: 48 MiB.
    assert_eq!(get("budget_during_loan_bytes"), 112 * MIB, "{r}");
    assert_eq!(get("vector_held_during_loan_bytes"), 96 * MIB);
    // The library's cap is the borrowed budget less the 96 MiB (and a
    // little: stacks, rounding to budget / 64) it holds unreserved.
    assert!(
        (8 * MIB..=16 * MIB).contains(&get("library_cap_during_loan_bytes")),
        "{r}"
    );
    assert_eq!(
        get("vector_spilled_during_loan_bytes"),
        0,
        "no spill while borrowing: {r}"
    );
    // Query got busy: the loan ended and Vector was spilled under its own
    // budget again (to the 75% restore point, 48 MiB, or below).
    assert_eq!(get("vector_budget_after_bytes"), 64 * MIB);
    assert!(get("vector_spilled_after_bytes") >= 48 * MIB, "{r}");
    assert!(get("vector_held_after_bytes") <= 48 * MIB, "{r}");
    assert_eq!(
        get("query_spilled_bytes"),
        0,
        "the lender is not spilled: {r}"
    );
}

#[test]
fn the_kernel_enforces_the_ceiling_on_the_databases_cgroup() {
    if privilege::skip_unprivileged("ceiling enforcement") {
        return;
    }
    let agent = Agent::with_engines(
        "ceiling = \"48MiB\"",
        "[[engine]]\nname = \"vector\"\nbudget = \"100%\"\n",
    );
    let before = status_json(&agent);
    let ceiling = &before["ceiling"];
    assert_eq!(ceiling["limit_bytes"], 48 << 20, "{before}");
    let backend = ceiling["backend"].as_str().unwrap().to_owned();
    let limit_file = match backend.as_str() {
        "cgroup-v2" => "memory.max",
        "cgroup-v1" => "memory.limit_in_bytes",
        other => panic!("unknown backend {other}"),
    };
    let cgroup = PathBuf::from(ceiling["cgroup"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(cgroup.join(limit_file))
            .unwrap()
            .trim(),
        (48u64 << 20).to_string(),
        "the kernel holds the ceiling"
    );
    // A library process that touches twice the ceiling without asking:
    // the kernel stops it at the ceiling (the OOM killer, inside the
    // database's cgroup only).
    let out = Command::new(env!("CARGO_BIN_EXE_control-client"))
        .arg("--socket")
        .arg(&agent.control)
        .args([
            "--database",
            &agent.database,
            "--touch-mib",
            "96",
            "--hold-ms",
            "100",
        ])
        .output()
        .unwrap();
    let welcomed: ToLibrary =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert!(matches!(welcomed, ToLibrary::Welcome { .. }));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "killed at the ceiling: {:?}",
        out.status
    );
    let after = status_json(&agent);
    assert!(
        after["ceiling"]["events"]["oom_kill"].as_u64() >= Some(1),
        "the OOM kill is reported ({backend}): {}",
        after["ceiling"]
    );
}

fn status_json(agent: &Agent) -> serde_json::Value {
    let out = Command::new(agent_binary())
        .args(["status", "--json", "--socket"])
        .arg(agent.dir.join("agent.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_reloads_the_config_atomically() {
    if privilege::skip_unprivileged("configuration reload") {
        return;
    }
    let agent = Agent::start("");
    let config = agent.dir.join("governor.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let mut client = Reaped(
        Command::new(env!("CARGO_BIN_EXE_control-client"))
            .arg("--socket")
            .arg(&agent.control)
            .args(["--database", &agent.database, "--engine", "query"])
            .args(["--report-reserved", "1", "--hold-ms", "20000"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let query_budget = |agent: &Agent| {
        status_json(agent)["clients"][0]["engines"]["query"]["budget_bytes"].as_u64()
    };
    let ceiling = |agent: &Agent| status_json(agent)["ceiling"]["limit_bytes"].as_u64();
    wait_for("the client's budget", || {
        query_budget(&agent) == Some(64 << 20)
    });
    let hup = |agent: &Agent| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    };

    // A good change: applied in place, the library told.
    let changed = original
        .replace("ceiling = \"1GiB\"", "ceiling = \"512MiB\"")
        .replacen(
            "name = \"query\"\nbudget = \"64MiB\"",
            "name = \"query\"\nbudget = \"32MiB\"",
            1,
        );
    assert_ne!(changed, original);
    std::fs::write(&config, &changed).unwrap();
    hup(&agent);
    wait_for("the new budget", || query_budget(&agent) == Some(32 << 20));
    assert_eq!(ceiling(&agent), Some(512 << 20));

    // Bad ones: refused whole, the old one stays, the agent keeps running.
    for (bad, named) in [
        (
            changed.replace("budget = \"32MiB\"", "budget = \"lots\""),
            "budget",
        ),
        (
            changed
                .replace("budget = \"32MiB\"", "budget = \"16MiB\"")
                .replace(&agent.database, "another-db"),
            "database cannot change",
        ),
    ] {
        std::fs::write(&config, &bad).unwrap();
        hup(&agent);
        let log = agent.dir.join("agent.log");
        wait_for(&format!("a refusal naming {named}"), || {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("configuration refused") && l.contains(named))
        });
        assert_eq!(
            query_budget(&agent),
            Some(32 << 20),
            "nothing of it applied"
        );
        assert_eq!(ceiling(&agent), Some(512 << 20));
    }
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn a_killed_agent_restarts_on_its_pinned_maps_and_the_library_reconnects() {
    if privilege::skip_unprivileged("agent restart") {
        return;
    }
    use std::io::BufRead;
    let mut agent = Agent::start("");
    let mut probe = Reaped(
        Command::new(env!("CARGO_BIN_EXE_hold-probe"))
            .arg("--socket")
            .arg(&agent.control)
            .args(["--database", &agent.database, "--mib", "48"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = probe.id();
    let mut lines = std::io::BufReader::new(probe.stdout.take().unwrap()).lines();
    let mut next = move || -> serde_json::Value {
        serde_json::from_str(&lines.next().expect("the probe runs").unwrap()).unwrap()
    };
    assert_eq!(next()["held_bytes"], 48 << 20);
    let vector = |agent: &Agent| -> (u64, u64) {
        let s = status_json(agent);
        let p = s["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .cloned()
            .unwrap_or_default();
        (
            p["engines"]["vector"]["resident_bytes"]
                .as_u64()
                .unwrap_or(0),
            p["unattributed"]["resident_bytes"].as_u64().unwrap_or(0),
        )
    };
    wait_for("48 MiB attributed to vector", || {
        vector(&agent).0 >= 47 << 20
    });
    let (before, unattributed_before) = vector(&agent);

    // SIGKILL: no clean-up, the pins and the registry stay.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGKILL) };
    let _ = agent.child.wait();
    let mut seen_down = false;
    for _ in 0..50 {
        if next()["connected"] == false {
            seen_down = true;
            break;
        }
    }
    assert!(seen_down, "the library noticed the agent was gone");
    // The database keeps running while the agent is away.
    assert_eq!(probe.try_wait().unwrap(), None);

    agent.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = next();
        if st["connected"] == true && st["connects"].as_u64() >= Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the library did not reconnect: {st}"
        );
    }
    let (after, unattributed_after) = vector(&agent);
    assert!(
        after.abs_diff(before) < 2 << 20,
        "the counts went on from the pinned maps: vector {before} before, {after} after"
    );
    assert!(
        unattributed_after < unattributed_before + (2 << 20),
        "the process was not registered afresh (its memory would be unattributed): {unattributed_before} -> {unattributed_after}"
    );
    let _ = probe.kill();
    let _ = probe.wait();
}

/// `GET path` over plain HTTP/1.0; the body.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[test]
fn metrics_are_served_over_http() {
    if privilege::skip_unprivileged("metrics endpoint") {
        return;
    }
    let agent = Agent::start("metrics_addr = \"127.0.0.1:0\"");
    let status = status_json(&agent);
    let addr = status["metrics_addr"]
        .as_str()
        .expect("the bound address")
        .to_owned();
    assert_eq!(http_get(&addr, "/healthz"), "ok\n");

    // A library that reports its books and stays a while.
    let mut client = Reaped(
        Command::new(env!("CARGO_BIN_EXE_control-client"))
            .arg("--socket")
            .arg(&agent.control)
            .args(["--database", &agent.database, "--engine", "query"])
            .args(["--report-reserved", "12345", "--hold-ms", "5000"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = client.id();
    let want = format!(
        "nodedb_governor_agent_engine_reserved_bytes{{engine=\"query\",pid=\"{pid}\"}} 12345"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = http_get(&addr, "/metrics");
        if text.contains(&want) {
            break text;
        }
        assert!(Instant::now() < deadline, "no {want} in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = client.kill();
    let _ = client.wait();
    // The programs run on every page fault: their counts are there and
    // move.
    let runs = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("nodedb_governor_bpf_program_runs_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let first = runs(&text);
    assert!(first > 0, "no program runs in:\n{text}");
    let _ = Command::new("true").status();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        runs(&http_get(&addr, "/metrics")) > first,
        "the run counts move"
    );
    for series in [
        format!("nodedb_governor_agent_engine_refusals_total{{engine=\"query\",pid=\"{pid}\"}} 3"),
        format!(
            "nodedb_governor_agent_engine_budget_bytes{{engine=\"query\",pid=\"{pid}\"}} 67108864"
        ),
        format!("nodedb_governor_agent_engine_resident_bytes{{engine=\"query\",pid=\"{pid}\"}}"),
        "nodedb_governor_cgroup_memory_max_bytes{backend=".into(),
        "nodedb_governor_agent_up 1".into(),
        "nodedb_governor_agent_clients 1".into(),
        "nodedb_governor_agent_ticks_total".into(),
        format!(
            "nodedb_governor_agent_engine_limit_changes_total{{engine=\"query\",pid=\"{pid}\"}} 1"
        ),
        "nodedb_governor_emergency 0".into(),
        "nodedb_governor_psi_triggers_total".into(),
        "nodedb_governor_psi_memory_stall_seconds_total{kind=\"some\"}".into(),
    ] {
        assert!(text.contains(&series), "no {series} in:\n{text}");
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Reads one reply frame.
fn reply(s: &mut UnixStream, d: &mut Decoder) -> ToLibrary {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = d.next_message::<ToLibrary>() {
            return m.expect("the agent's replies are well formed");
        }
        let n = s.read(&mut buf).expect("a reply");
        assert!(n > 0, "the agent closed the connection without a reply");
        d.push(&buf[..n]);
    }
}

fn hello(database: &str) -> Vec<u8> {
    wire::encode(&ToAgent::Hello {
        version: wire::VERSION,
        database: database.into(),
        engines: vec![EngineDecl {
            name: "query".into(),
            floor_bytes: 0,
            cap_bytes: 1 << 30,
        }],
    })
}

fn connect(agent: &Agent) -> (UnixStream, Decoder) {
    let s = UnixStream::connect(&agent.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (s, Decoder::new())
}

#[test]
fn bad_frames_get_errors_while_a_good_client_keeps_working() {
    if privilege::skip_unprivileged("control socket robustness") {
        return;
    }
    let agent = Agent::start("");
    let (mut good, mut gd) = connect(&agent);
    good.write_all(&hello(&agent.database)).unwrap();
    assert!(matches!(
        reply(&mut good, &mut gd),
        ToLibrary::Welcome { .. }
    ));

    // Malformed JSON in a well-formed frame: an error, and the connection
    // goes on (a later good message is served).
    let (mut bad, mut bd) = connect(&agent);
    bad.write_all(&hello(&agent.database)).unwrap();
    assert!(matches!(
        reply(&mut bad, &mut bd),
        ToLibrary::Welcome { .. }
    ));
    while !matches!(reply(&mut bad, &mut bd), ToLibrary::Limits { .. }) {}
    bad.write_all(&frame(b"{\"type\":\"report\",\"engines\":7}"))
        .unwrap();
    match reply(&mut bad, &mut bd) {
        ToLibrary::Error { message } => assert!(message.contains("malformed"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    bad.write_all(&frame(b"\xff\xfe not json")).unwrap();
    assert!(matches!(reply(&mut bad, &mut bd), ToLibrary::Error { .. }));
    // A thread that is not the sender's: named.
    bad.write_all(&wire::encode(&ToAgent::Thread {
        tid: 1,
        engine: "query".into(),
        moved: false,
    }))
    .unwrap();
    match reply(&mut bad, &mut bd) {
        ToLibrary::Error { message } => assert!(message.contains("thread 1"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }

    // Oversized: an error, then the connection ends.
    let (mut big, mut bigd) = connect(&agent);
    big.write_all(&((MAX_FRAME + 1) as u32).to_be_bytes())
        .unwrap();
    match reply(&mut big, &mut bigd) {
        ToLibrary::Error { message } => assert!(message.contains("exceeds"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    let mut rest = Vec::new();
    assert_eq!(
        big.read_to_end(&mut rest).unwrap(),
        0,
        "closed after an oversized frame"
    );

    // Truncated: half a frame, then the writer closes.
    let (mut cut, mut cd) = connect(&agent);
    let h = hello(&agent.database);
    cut.write_all(&h[..h.len() / 2]).unwrap();
    cut.shutdown(std::net::Shutdown::Write).unwrap();
    match reply(&mut cut, &mut cd) {
        ToLibrary::Error { message } => assert!(message.contains("truncated"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }

    // A wrong first message, a wrong version, a wrong database: refused.
    for (body, want) in [
        (wire::encode(&ToAgent::Report { engines: vec![] }), "hello"),
        (
            wire::encode(&ToAgent::Hello {
                version: 99,
                database: agent.database.clone(),
                engines: vec![],
            }),
            "version 99",
        ),
        (hello("someone-else"), "someone-else"),
    ] {
        let (mut s, mut d) = connect(&agent);
        s.write_all(&body).unwrap();
        match reply(&mut s, &mut d) {
            ToLibrary::Error { message } => assert!(message.contains(want), "{message}"),
            other => panic!("expected an error naming {want}, got {other:?}"),
        }
    }

    // Through all of that the good client was served: its report is taken
    // and a thread of its own is placed.
    good.write_all(&wire::encode(&ToAgent::Report { engines: vec![] }))
        .unwrap();
    let tid = nodedb_governor::control::link::current_tid();
    good.write_all(&wire::encode(&ToAgent::Thread {
        tid,
        engine: "query".into(),
        moved: false,
    }))
    .unwrap();
    loop {
        match reply(&mut good, &mut gd) {
            ToLibrary::ThreadPlaced { tid: t, .. } => {
                assert_eq!(t, tid);
                break;
            }
            ToLibrary::Error { message } => panic!("the good client got an error: {message}"),
            _ => {}
        }
    }
}

#[test]
fn uids_not_on_the_allow_list_are_refused() {
    if privilege::skip_unprivileged("control socket allow-list") {
        return;
    }
    const NOBODY: u32 = 65534;
    let run = |agent: &Agent| {
        // The socket's group is the client's, as a deployment would set it,
        // so only the allow-list stands in the way.
        std::os::unix::fs::chown(&agent.control, None, Some(NOBODY)).unwrap();
        // The build tree may not be reachable by another uid (a 0700 clone
        // directory): run a copy from the agent's world-readable directory.
        let client = agent.dir.join("control-client");
        if !client.exists() {
            std::fs::copy(env!("CARGO_BIN_EXE_control-client"), &client).unwrap();
            std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let out = Command::new(&client)
            .arg("--socket")
            .arg(&agent.control)
            .args(["--database", &agent.database])
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<ToLibrary>(&out.stdout).unwrap()
    };
    let agent = Agent::start("");
    match run(&agent) {
        ToLibrary::Error { message } => {
            assert!(message.contains("uid 65534 is not allowed"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(agent);
    let agent = Agent::start("allowed_uids = [65534]");
    assert!(
        matches!(run(&agent), ToLibrary::Welcome { .. }),
        "an allowed uid is welcomed"
    );
}

/// The pressure inputs besides attribution: a PSI trigger on the
/// database's cgroup (its tasks stalled on memory) purges every engine and
/// spills engines from Warning on; an Emergency of the whole database (its
/// cgroup's working set at 97% of the ceiling) holds the non-essential
/// engine to what it holds while the essential one keeps its budget, until
/// use falls again. The pressure is real: a writer in the database's
/// cgroups streams 2.5 times the ceiling through the page cache, so the
/// kernel reclaims (and stalls) at the ceiling; that page cache is
/// reclaimable and is no Emergency. Then memory the kernel cannot drop
/// (tmpfs pages, without swap) fills the cgroup to the Emergency.
#[test]
fn memory_stalls_and_an_emergency_move_the_ladder() {
    if privilege::skip_unprivileged("pressure inputs") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let agent = Agent::with_engines(
        "ceiling = \"160MiB\"\n[pressure_stall]\nstall_ms = 1\nwindow_ms = 2000",
        "[[engine]]\nname = \"vector\"\nbudget = \"64MiB\"\n\
         [[engine]]\nname = \"query\"\nbudget = \"64MiB\"\nessential = false\n",
    );
    let mut probe = Reaped(
        Command::new(env!("CARGO_BIN_EXE_pressure-probe"))
            .arg("--socket")
            .arg(&agent.control)
            .args(["--database", &agent.database])
            .args(["--vector-mib", "52", "--query-mib", "8"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    {
        let lines = lines.clone();
        let out = probe.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    lines.lock().unwrap().push(v);
                }
            }
        });
    }
    let last = || lines.lock().unwrap().last().cloned().unwrap_or_default();
    let vector = |s: &serde_json::Value| s["clients"][0]["engines"]["vector"].clone();
    let query = |s: &serde_json::Value| s["clients"][0]["engines"]["query"].clone();
    wait_for("the probe to hold its memory", || {
        last()["held_bytes"].as_u64() >= Some(52 * MIB)
            && vector(&status_json(&agent))["level"] == "warning"
    });
    let before = status_json(&agent);
    assert_eq!(last()["query_granted"], true, "{}", last());
    assert_eq!(
        vector(&before)["spill_requests"],
        0,
        "Warning alone does not spill: {before}"
    );
    assert!(before["psi"]["source"].as_str().is_some(), "{before}");
    assert_eq!(before["emergency"], false);
    let purges_before = vector(&before)["purges"].as_u64().unwrap();

    // The writer joins the database's cgroups (v2 for PSI, the ceiling's
    // for the charge) and streams 2.5 times the ceiling to a file.
    let fill = agent.dir.join("fill.dat");
    let mut dirs = vec![format!("{}/shared", before["cgroup"].as_str().unwrap())];
    let ceiling_dir = before["ceiling"]["cgroup"].as_str().unwrap().to_owned();
    if !dirs.contains(&ceiling_dir) {
        dirs.push(ceiling_dir);
    }
    let script = format!(
        "for d in {}; do echo $$ > \"$d/cgroup.procs\" || exit 1; done; \
         exec dd if=/dev/zero of={} bs=1M count=400 conv=fsync status=none",
        dirs.join(" "),
        fill.display()
    );
    let dd = Command::new("sh").arg("-c").arg(&script).status().unwrap();
    assert!(dd.success(), "{script}");

    let mut seen = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(seen["psi"]["triggers"].as_u64() >= Some(1)
        && vector(&seen)["spill_requests"].as_u64() >= Some(1))
    {
        assert!(
            Instant::now() < deadline,
            "the PSI trigger did not fire, or the ladder did not spill at Warning: psi {} vector {}",
            seen["psi"],
            vector(&seen)
        );
        std::thread::sleep(Duration::from_millis(20));
        seen = status_json(&agent);
    }
    let streamed = status_json(&agent);
    assert_eq!(
        streamed["emergency"], false,
        "page cache the kernel can drop is no Emergency: {}",
        streamed["ceiling"]
    );

    // Memory the kernel cannot reclaim: tmpfs pages written from the
    // database's cgroups, 4 MiB at a time until the agent declares the
    // Emergency (97% of 160 MiB; each step stays under the ceiling).
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let shm = Removed(PathBuf::from(format!(
        "/dev/shm/nodedb-test-{}-{}",
        std::process::id(),
        agent.database
    )));
    let mut written = 0;
    while status_json(&agent)["emergency"] != true {
        assert!(
            written < 160,
            "no Emergency after {written} MiB of tmpfs: {}",
            status_json(&agent)["ceiling"]
        );
        let step = format!(
            "for d in {}; do echo $$ > \"$d/cgroup.procs\" || exit 1; done; \
             exec dd if=/dev/zero of={} bs=1M count=4 oflag=append conv=notrunc status=none",
            dirs.join(" "),
            shm.0.display()
        );
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(&step)
                .status()
                .unwrap()
                .success()
        );
        written += 4;
        std::thread::sleep(Duration::from_millis(60));
    }
    eprintln!("emergency after {written} MiB of tmpfs");
    wait_for(
        "backpressure on query while vector keeps its budget",
        || {
            // Held to what it holds: its 8 MiB and at most the thread's
            // credit (two 1 MiB batches).
            lines.lock().unwrap().iter().any(|l| {
                l["query_granted"] == false
                    && l["vector_granted"] == true
                    && (8 * MIB..=10 * MIB).contains(&l["query_cap_bytes"].as_u64().unwrap_or(0))
            })
        },
    );
    let during = status_json(&agent);
    eprintln!("psi: {} ceiling: {}", during["psi"], during["ceiling"]);
    assert!(
        vector(&during)["purges"].as_u64() > Some(purges_before),
        "the stall purged the arenas: {during}"
    );
    assert!(
        query(&during)["purges"].as_u64() >= Some(1),
        "every engine, not only those at Warning: {during}"
    );
    assert!(
        last()["purges"].as_u64() >= Some(2),
        "the library ran the purges: {}",
        last()
    );

    // The pressure goes: the tmpfs file and the page cache go, use falls
    // under the warning threshold, the backpressure ends.
    drop(shm);
    std::fs::remove_file(&fill).unwrap();
    wait_for("the backpressure to end", || {
        let l = last();
        l["query_granted"] == true && l["query_cap_bytes"] == 64 * MIB
    });
    let after = status_json(&agent);
    assert_eq!(after["emergency"], false, "{after}");
    assert_eq!(query(&after)["backpressure"], false, "{after}");
    assert!(
        query(&after)["limit_changes"].as_u64() >= Some(3),
        "welcome, hold, release: {after}"
    );
    assert!(
        after["ceiling"]["limit_changes"].as_u64() >= Some(2),
        "the high mark was lowered and restored: {after}"
    );
    let _ = probe.kill();
    let _ = probe.wait();
}

/// An engine that runs as a process of its own (`own_process`) gets a
/// domain cgroup of its own under the database's, with the engine's budget
/// as its high mark (v2 `memory.high`; the v1 soft limit on hybrid hosts),
/// all of the process's memory is the engine's, and the ladder governs it
/// like any engine. A process may not declare such an engine with others.
#[test]
fn an_engine_in_its_own_process_gets_its_own_domain_cgroup() {
    if privilege::skip_unprivileged("own-process engines") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let agent = Agent::with_engines(
        "",
        "[[engine]]\nname = \"vector\"\nbudget = \"64MiB\"\n\
         [[engine]]\nname = \"timeseries\"\nbudget = \"64MiB\"\nfloor = \"64MiB\"\nown_process = true\n",
    );
    // Declared with another engine: refused, naming why.
    let mut s = UnixStream::connect(&agent.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let decl = |name: &str| EngineDecl {
        name: name.into(),
        floor_bytes: 0,
        cap_bytes: 1 << 30,
    };
    s.write_all(&wire::encode(&ToAgent::Hello {
        version: wire::VERSION,
        database: agent.database.clone(),
        engines: vec![decl("vector"), decl("timeseries")],
    }))
    .unwrap();
    match reply(&mut s, &mut Decoder::new()) {
        ToLibrary::Error { message } => assert!(
            message.contains("timeseries") && message.contains("own_process"),
            "{message}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(s);

    // 60 MiB of 64: Critical, so the ladder sends spill requests.
    let mut probe = Reaped(
        Command::new(env!("CARGO_BIN_EXE_hold-probe"))
            .arg("--socket")
            .arg(&agent.control)
            .args(["--database", &agent.database])
            .args(["--engine", "timeseries", "--mib", "60"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = probe.id();
    let engine = |s: &serde_json::Value| s["clients"][0]["engines"]["timeseries"].clone();
    let mut status = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine(&status)["spill_requests"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no spill request: {status}");
        std::thread::sleep(Duration::from_millis(50));
        status = status_json(&agent);
    }
    let domain = PathBuf::from(status["cgroup"].as_str().unwrap());
    let own = domain.join("proc-timeseries");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2 = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    assert!(
        own.ends_with(v2.trim_start_matches('/')),
        "the process sits in {v2}, not {}",
        own.display()
    );
    let ceiling = &status["ceiling"];
    let dom = &ceiling["engines"]["timeseries"];
    assert_eq!(dom["high_bytes"], 64 * MIB, "{ceiling}");
    let dom_dir = PathBuf::from(dom["cgroup"].as_str().unwrap());
    let high_file = match ceiling["backend"].as_str().unwrap() {
        "cgroup-v2" => "memory.high",
        _ => "memory.soft_limit_in_bytes",
    };
    assert_eq!(
        std::fs::read_to_string(dom_dir.join(high_file))
            .unwrap()
            .trim(),
        (64 * MIB).to_string(),
        "the kernel holds the engine's high mark"
    );
    assert!(
        std::fs::read_to_string(dom_dir.join("cgroup.procs"))
            .unwrap()
            .lines()
            .any(|l| l.trim() == pid.to_string()),
        "the process is charged to its engine's cgroup"
    );
    assert!(
        dom["current_bytes"].as_u64() >= Some(58 * MIB),
        "its memory is charged there: {dom}"
    );
    let p = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap();
    assert!(
        p["engines"]["timeseries"]["resident_bytes"].as_u64() >= Some(58 * MIB),
        "the engine's memory is attributed to it: {p}"
    );
    assert_eq!(engine(&status)["budget_bytes"], 64 * MIB);
    let _ = probe.kill();
    let _ = probe.wait();
}

/// With the engine cgroups delegated to the database's user
/// (`delegate_uid`), a library running as that user moves its threads
/// into their engines itself (the agent only checks), and attribution
/// follows.
#[test]
fn a_library_in_a_delegated_subtree_moves_its_own_threads() {
    if privilege::skip_unprivileged("delegated subtree") {
        return;
    }
    const NOBODY: u32 = 65534;
    const MIB: u64 = 1 << 20;
    let agent = Agent::start("allowed_uids = [65534]\ndelegate_uid = 65534");
    let status = status_json(&agent);
    let shared = PathBuf::from(status["cgroup"].as_str().unwrap()).join("shared");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(shared.join("engine-vector/cgroup.threads"))
            .unwrap()
            .uid(),
        NOBODY,
        "delegated"
    );
    std::os::unix::fs::chown(&agent.control, None, Some(NOBODY)).unwrap();
    // Run a copy from the agent's world-readable directory (the build
    // tree may be out of that uid's reach).
    let probe_bin = agent.dir.join("hold-probe");
    std::fs::copy(env!("CARGO_BIN_EXE_hold-probe"), &probe_bin).unwrap();
    std::fs::set_permissions(&probe_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut probe = Reaped(
        Command::new(&probe_bin)
            .arg("--socket")
            .arg(&agent.control)
            .args(["--database", &agent.database, "--mib", "32"])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = probe.id();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(probe.stdout.take().unwrap()));
    let first: serde_json::Value =
        serde_json::from_str(&lines.next().expect("the probe runs").unwrap()).unwrap();
    assert_eq!(first["held_bytes"], 32 * MIB, "{first}");
    // The worker (gone now; its memory stays) was moved by the library:
    // a failed move would have fallen back to the agent ("assigned").
    let log = std::fs::read_to_string(agent.dir.join("agent.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("thread moved by the library")
            && l.contains(&format!("pid={pid}"))),
        "the library moved it, not the agent:\n{log}"
    );
    assert!(!log.contains("thread assigned"), "{log}");
    wait_for("the vector engine's memory to be attributed", || {
        status_json(&agent)["engines"]["vector"]["resident_bytes"].as_u64() >= Some(30 * MIB)
    });
}

/// `enforce = false`: the ungoverned baseline, measured the same way. The
/// agent attributes and shows the levels, keeps `memory.max` at the
/// ceiling, and asks nothing of the library: an engine far over its
/// budget is neither spilled nor purged, and its cap is the ceiling.
#[test]
fn an_observing_agent_measures_but_asks_nothing() {
    if privilege::skip_unprivileged("observe mode") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let agent = Agent::start("enforce = false");
    let _probe = Reaped(
        Command::new(env!("CARGO_BIN_EXE_hold-probe"))
            .arg("--socket")
            .arg(&agent.control)
            .args(["--database", &agent.database, "--mib", "80"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let vector = |s: &serde_json::Value| s["clients"][0]["engines"]["vector"].clone();
    wait_for("vector past its budget, as the kernel sees it", || {
        let s = status_json(&agent);
        vector(&s)["resident_bytes"].as_u64() >= Some(78 * MIB)
            && vector(&s)["level"] == "emergency"
    });
    // Many ticks at Emergency.
    std::thread::sleep(Duration::from_millis(500));
    let s = status_json(&agent);
    let v = vector(&s);
    assert_eq!(v["spill_requests"], 0, "{v}");
    assert_eq!(v["purges"], 0, "{v}");
    assert_eq!(
        v["cap_bytes"],
        1u64 << 30,
        "the library's cap is the ceiling: {v}"
    );
    assert_eq!(
        s["ceiling"]["high_bytes"], s["ceiling"]["limit_bytes"],
        "no lower high mark"
    );
}
