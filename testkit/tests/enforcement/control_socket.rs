//! The control socket stands its ground: malformed, truncated and
//! oversized frames, wrong first messages, versions and databases get
//! errors while a good client keeps working; uids not on the allow-list
//! are refused.

use std::{
    io::{Read, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    time::Duration,
};

use nodedb_governor::control::wire::{self, Decoder, MAX_FRAME, ToAgent, ToLibrary};
use nodedb_governor_testkit::{
    harness::{Agent, probes::report},
    privileged::skip_unless_privileged,
    wire::{ReplyError, expect_reply as reply, hello, read_reply},
};

/// `body` framed as it is, message or not.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn connect(agent: &Agent) -> (UnixStream, Decoder) {
    nodedb_governor_testkit::wire::connect(&agent.control).unwrap()
}

#[test]
fn bad_frames_get_errors_while_a_good_client_keeps_working() {
    if skip_unless_privileged("control socket robustness") {
        return;
    }
    let agent = super::start_agent("");
    let (mut good, mut gd) = connect(&agent);
    good.write_all(&hello(&agent.database, &["query"])).unwrap();
    assert!(matches!(
        reply(&mut good, &mut gd),
        ToLibrary::Welcome { .. }
    ));

    // Malformed JSON in a well-formed frame: an error, and the connection
    // goes on (a later good message is served).
    let (mut bad, mut bd) = connect(&agent);
    bad.write_all(&hello(&agent.database, &["query"])).unwrap();
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
    let h = hello(&agent.database, &["query"]);
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
        (hello("someone-else", &["query"]), "someone-else"),
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
    if skip_unless_privileged("control socket allow-list") {
        return;
    }
    const NOBODY: u32 = 65534;
    let run = |agent: &Agent| {
        // The socket is given to the client's group by the agent
        // (`control_group`), at every start, so only the allow-list
        // stands in the way.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&agent.control).unwrap();
        assert_eq!((meta.gid(), meta.mode() & 0o777), (NOBODY, 0o660));
        // The build tree may not be reachable by another uid (a 0700 clone
        // directory): run a copy from the agent's world-readable directory.
        let client = agent
            .dir()
            .copy_executable(env!("CARGO_BIN_EXE_wire-probe").as_ref());
        report::<ToLibrary>(agent.probe(client).uid(NOBODY).gid(NOBODY))
    };
    let agent = super::start_agent("control_group = 65534");
    match run(&agent) {
        ToLibrary::Error { message } => {
            assert!(message.contains("uid 65534 is not allowed"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(agent);
    let agent = super::start_agent("allowed_uids = [65534]\ncontrol_group = 65534");
    assert!(
        matches!(run(&agent), ToLibrary::Welcome { .. }),
        "an allowed uid is welcomed"
    );
}

/// Kills `pid` in `secs` if it still runs (through a pidfd, so never a
/// process given its pid later): a test waiting on its output fails
/// instead of hanging.
fn kill_after(pid: u32, secs: u64) {
    // SAFETY: pidfd_open takes a pid and flags; a non-negative result is a
    // descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        fd >= 0,
        "pidfd_open {pid}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        // SAFETY: a live pidfd; signal 9, no info, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    });
}

/// A reply within `ms`, if one comes (None: nothing yet).
fn reply_within(s: &mut UnixStream, d: &mut Decoder, ms: u64) -> Option<ToLibrary> {
    s.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
    let r = read_reply(s, d);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match r {
        Ok(m) => Some(m),
        Err(ReplyError::Read(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// The agent closed `s` (after what it had to say).
fn closed(s: &mut UnixStream, d: &mut Decoder) -> bool {
    matches!(
        read_reply(s, d),
        Err(ReplyError::Closed | ReplyError::Read(_))
    )
}

#[test]
fn connections_are_bounded_in_all_and_per_uid_and_silent_ones_closed() {
    if skip_unless_privileged("control socket connection limits") {
        return;
    }
    let agent = super::start_agent(
        "[control]\nmax_connections = 4\nmax_connections_per_uid = 3\nhello_timeout_ms = 10000\n",
    );
    // Four from root: one of them (whichever the agent counts last) is
    // refused by the per-uid limit and closed; three stay, silent.
    let mut open: Vec<(UnixStream, Decoder)> = (0..4).map(|_| connect(&agent)).collect();
    let mut refused = Vec::new();
    for (i, (s, d)) in open.iter_mut().enumerate() {
        if let Some(m) = reply_within(s, d, 500) {
            match m {
                ToLibrary::Error { message } => {
                    assert!(
                        message.contains("from uid 0")
                            && message.contains("control.max_connections_per_uid"),
                        "{message}"
                    );
                    assert!(closed(s, d), "a refused connection is closed");
                    refused.push(i);
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }
    assert_eq!(refused.len(), 1, "exactly one past the per-uid limit");
    open.remove(refused[0]);

    // The limit in all, lowered by a reload (new connections only): a
    // fourth connection is turned away at once, naming it.
    let config = agent.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("max_connections = 4", "max_connections = 3"),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    nodedb_governor_testkit::wait::wait_for("the reload", || {
        agent.log().contains("configuration reloaded")
    });
    let (mut s, mut d) = connect(&agent);
    match reply(&mut s, &mut d) {
        ToLibrary::Error { message } => {
            assert!(
                message.contains("(3, control.max_connections)"),
                "{message}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(closed(&mut s, &mut d));

    // The silent three: told and closed once the hello timeout passes.
    for (s, d) in &mut open {
        match reply(s, d) {
            ToLibrary::Error { message } => {
                assert!(message.contains("no hello within 10000 ms"), "{message}")
            }
            other => panic!("expected the hello timeout, got {other:?}"),
        }
        assert!(closed(s, d));
    }
    // Their places are free again: a library is welcomed.
    drop(open);
    let (mut s, mut d) = connect(&agent);
    s.write_all(&hello(&agent.database, &["query"])).unwrap();
    assert!(matches!(reply(&mut s, &mut d), ToLibrary::Welcome { .. }));
}

#[test]
fn a_welcomed_library_silent_past_the_idle_timeout_is_disconnected() {
    if skip_unless_privileged("control socket idle timeout") {
        return;
    }
    let agent = super::start_agent("[control]\nidle_timeout_ms = 10000\n");
    let (mut s, mut d) = connect(&agent);
    s.write_all(&hello(&agent.database, &["query"])).unwrap();
    assert!(matches!(reply(&mut s, &mut d), ToLibrary::Welcome { .. }));
    let since = std::time::Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    loop {
        match reply(&mut s, &mut d) {
            ToLibrary::Error { message } => {
                assert!(message.contains("nothing heard for 10000 ms"), "{message}");
                break;
            }
            _ => continue, // its limits
        }
    }
    assert!(
        since.elapsed() >= Duration::from_secs(9),
        "{:?}",
        since.elapsed()
    );
    assert!(closed(&mut s, &mut d));
}

#[test]
fn a_library_that_does_not_read_its_answers_is_disconnected() {
    if skip_unless_privileged("control socket outbound bound") {
        return;
    }
    let agent = super::start_agent("");
    let (mut s, mut d) = connect(&agent);
    s.write_all(&hello(&agent.database, &["query"])).unwrap();
    assert!(matches!(reply(&mut s, &mut d), ToLibrary::Welcome { .. }));
    // Each bad frame is answered with an error the client never reads:
    // the agent's socket buffer fills, then the session's queue, and the
    // agent lets the client go instead of holding every answer.
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let batch = frame(b"{\"type\":\"report\",\"engines\":7}").repeat(1000);
    let mut sent = 0usize;
    let ended = loop {
        if let Err(e) = s.write_all(&batch) {
            break e;
        }
        sent += batch.len();
        assert!(sent < 64 << 20, "64 MiB of bad frames and still connected");
    };
    assert!(
        matches!(
            ended.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{ended}"
    );
    nodedb_governor_testkit::wait::wait_for("the agent saying why", || {
        let log = agent.log();
        log.contains("not reading its messages")
    });
    // The agent goes on: another library is welcomed.
    let (mut s, mut d) = connect(&agent);
    s.write_all(&hello(&agent.database, &["query"])).unwrap();
    assert!(matches!(reply(&mut s, &mut d), ToLibrary::Welcome { .. }));
}

#[test]
fn a_library_whose_uid_a_reload_disallows_is_disconnected() {
    if skip_unless_privileged("control socket allow-list on reload") {
        return;
    }
    const NOBODY: u32 = 65534;
    let agent = super::start_agent("allowed_uids = [65534]\ncontrol_group = 65534");
    std::os::unix::fs::chown(&agent.control, None, Some(NOBODY)).unwrap();
    let client = agent
        .dir()
        .copy_executable(env!("CARGO_BIN_EXE_wire-probe").as_ref());
    let mut probe = agent
        .probe(client)
        .arg("--follow")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    kill_after(probe.id(), 60);
    let mut lines = nodedb_governor_testkit::harness::probes::JsonLines::of(&mut probe);
    let first: ToLibrary = serde_json::from_value(lines.next_value()).unwrap();
    assert!(matches!(first, ToLibrary::Welcome { .. }), "{first:?}");
    let config = agent.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("allowed_uids = [65534]", "allowed_uids = []"),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    let mut told = None;
    loop {
        let line = lines.next_value();
        if line.get("closed").is_some() {
            break;
        }
        if let Ok(ToLibrary::Error { message }) = serde_json::from_value(line) {
            told = Some(message);
        }
    }
    let told = told.expect("an error before the connection ended");
    assert!(told.contains("uid 65534 is no longer allowed"), "{told}");
    assert!(probe.wait().unwrap().success());
}

#[test]
fn a_connection_that_outlives_its_process_moves_no_other_process() {
    if skip_unless_privileged("control socket pid reuse") {
        return;
    }
    let agent = super::start_agent("");
    // The probe says hello, forks and exits; its child keeps the
    // connection, and sends threads for the pid it connected with.
    let mut probe = agent
        .probe(env!("CARGO_BIN_EXE_wire-probe"))
        .args(["--engine", "query", "--fork-keeper"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut keeper_in = probe.stdin.take().unwrap();
    let mut lines = nodedb_governor_testkit::harness::probes::JsonLines::of(&mut probe);
    let first: ToLibrary = serde_json::from_value(lines.next_value()).unwrap();
    assert!(matches!(first, ToLibrary::Welcome { .. }), "{first:?}");
    let forked = lines.next_value();
    let parent = forked["parent"].as_u64().unwrap() as u32;
    kill_after(forked["keeper"].as_u64().unwrap() as u32, 60);
    assert!(probe.wait().unwrap().success());
    // The pid given to another process (the kernel's next pid set just
    // below it; other tests start processes too, so tried a few times).
    let mut other = None;
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (parent - 1).to_string()).unwrap();
        let mut c = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        if c.id() == parent {
            other = Some(c);
            break;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    let mut other = other.expect("pid not given again in 200 tries");
    let cgroup_before = std::fs::read_to_string(format!("/proc/{parent}/cgroup")).unwrap();
    // The keeper asks for "its" main thread: the other process's (if the
    // agent has not let it go already, its tick having seen the process
    // exit: then the keeper is gone, and so is its stdin).
    let _ = writeln!(keeper_in, "{parent}");
    let mut told = None;
    loop {
        let line = lines.next_value();
        if line.get("closed").is_some() {
            break;
        }
        match serde_json::from_value(line) {
            Ok(ToLibrary::Error { message }) => told = Some(message),
            Ok(ToLibrary::ThreadPlaced { tid, .. }) => {
                panic!("the agent placed thread {tid} of another process")
            }
            _ => {}
        }
    }
    let told = told.expect("an error before the connection ended");
    assert!(
        told.contains(&format!("pid {parent}) has exited")),
        "{told}"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{parent}/cgroup")).unwrap(),
        cgroup_before,
        "the other process was left where it was"
    );
    let _ = other.kill();
    let _ = other.wait();
}

/// A library that says it moved its thread into an engine's cgroup
/// itself (`moved: true`, as it may in a delegated subtree) without having
/// done so is refused, naming where the thread is: the agent reads the
/// thread's cgroup rather than pin and count it on the library's word.
#[test]
fn a_thread_said_to_be_moved_but_not_in_its_engines_cgroup_is_refused() {
    if skip_unless_privileged("control socket: moved threads") {
        return;
    }
    let agent = super::start_agent("");
    let (mut s, mut d) = connect(&agent);
    s.write_all(&hello(&agent.database, &["vector"])).unwrap();
    assert!(matches!(reply(&mut s, &mut d), ToLibrary::Welcome { .. }));
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    s.write_all(&wire::encode(&ToAgent::Thread {
        tid,
        engine: "vector".into(),
        moved: true,
    }))
    .unwrap();
    let answer = loop {
        match reply(&mut s, &mut d) {
            ToLibrary::Limits { .. } | ToLibrary::Pressure { .. } => continue,
            other => break other,
        }
    };
    match answer {
        ToLibrary::Error { message } => assert!(
            message.contains(&format!(
                "thread {tid} was said to be moved into engine `vector`'s cgroup, but it is in"
            )),
            "{message}"
        ),
        other => panic!("a thread left where it was was taken as moved: {other:?}"),
    }
    let log = agent.log();
    assert!(!log.contains("thread moved by the library"), "{log}");
}
