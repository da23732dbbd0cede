//! The library's link against an agent played by the test: a
//! `drop_cache` request is served by the link's cache thread (the engine's
//! coldest files leave the page cache, and the answer, sent through the
//! link, says how much), a budget change sent right behind it is applied
//! too, and dropping the link stops both threads. (That limits are not
//! held up behind a long walk follows from the walk's own thread; this
//! test does not time it.) Spills run on a thread per engine: one engine's
//! spill stuck in its handler holds up neither another engine's spill nor
//! a budget change, requests that pile up behind it are merged, and a cap
//! below what an engine holds applies once its spill thread has brought
//! it down.
//!
//! Files live under cargo's target directory (a block filesystem: tmpfs
//! pages cannot be dropped).

use std::{
    fs::{self, File},
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use std::sync::{Mutex, mpsc};

use nodedb_governor::{
    Budget, EngineCache, EngineId, MemoryGovernor, Reservation, SpillConfig, SpillController,
    SpillHandler,
    control::{
        AgentLink, AgentLinkBuilder, LinkConfig,
        wire::{self, Decoder, ToAgent, ToLibrary},
    },
    page_cache::resident_bytes,
};

const MIB: u64 = 1 << 20;

// With the arenas, allocations go through jemalloc, so an engine's thread
// fills its arena as a database's does.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("link-{}", std::process::id()));
    fs::create_dir_all(&d).unwrap();
    d
}

/// A file of `mib` MiB, all of it cached (written, made durable, read).
fn cached_file(path: &std::path::Path, mib: u64) -> Arc<File> {
    let mut f = File::create(path).unwrap();
    f.write_all(&vec![0x5a; (mib * MIB) as usize]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut f = File::open(path).unwrap();
    f.read_to_end(&mut Vec::new()).unwrap();
    fs::remove_file(path).unwrap();
    let f = Arc::new(f);
    assert_eq!(resident_bytes(&f).unwrap().0, mib * MIB);
    f
}

/// The agent's end: reads frames until `want` matches one (or 10 s pass).
struct Agent {
    stream: UnixStream,
    decoder: Decoder,
}

impl Agent {
    fn send(&mut self, m: &ToLibrary) {
        self.stream.write_all(&wire::encode(m)).unwrap();
    }

    fn wait_for(&mut self, want: impl Fn(&ToAgent) -> bool) -> ToAgent {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        loop {
            while let Some(m) = self.decoder.next_message::<ToAgent>() {
                let m = m.expect("the library sends well-formed frames");
                if want(&m) {
                    return m;
                }
            }
            assert!(Instant::now() < deadline, "no such message within 10 s");
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("the library closed the connection"),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("reading from the library: {e}"),
            }
        }
    }
}

/// This process's uid: the test plays the agent.
fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// The agent's end of `link`'s next connection on `listener`, once the
/// link is welcomed.
fn accept_welcomed(listener: &UnixListener, link: &AgentLink) -> Agent {
    accept_welcomed_with(listener, link, None)
}

/// [`accept_welcomed`], the welcome followed by `held_from`.
fn accept_welcomed_with(
    listener: &UnixListener,
    link: &AgentLink,
    held_from: Option<&wire::HeldFrom>,
) -> Agent {
    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut agent = Agent {
        stream,
        decoder: Decoder::new(),
    };
    agent.wait_for(|m| matches!(m, ToAgent::Hello { .. }));
    agent.send(&ToLibrary::Welcome {
        version: wire::VERSION,
        engine_cgroups: Default::default(),
    });
    if let Some(from) = held_from {
        agent.send(&ToLibrary::HeldFrom(from.clone()));
    }
    assert!(link.wait_connected(Duration::from_secs(10)));
    agent
}

/// A link on `governor` for `engines` (their names on the wire), set up
/// by `with`, and the agent's end of it, played by the test on `socket`:
/// returned once the link is welcomed.
fn welcomed(
    socket: &std::path::Path,
    governor: &MemoryGovernor,
    engines: &[(&str, EngineId)],
    with: impl FnOnce(AgentLinkBuilder) -> AgentLinkBuilder,
) -> (AgentLink, Agent) {
    let _ = fs::remove_file(socket);
    let listener = UnixListener::bind(socket).unwrap();
    let link = with(AgentLink::builder(
        governor,
        LinkConfig {
            agent_uid: Some(euid()),
            ..LinkConfig::new(socket, "nodedb", engines)
        },
    ))
    .start()
    .unwrap();
    let agent = accept_welcomed(&listener, &link);
    (link, agent)
}

#[test]
fn drop_cache_is_answered_from_the_cache_thread_and_limits_still_apply() {
    let d = dir();
    let socket = d.join("agent.sock");
    let governor = MemoryGovernor::new(
        Budget::builder(256 * MIB)
            .engine(EngineId::Timeseries, 0, 64 * MIB)
            .engine(EngineId::Vector, 0, 64 * MIB)
            .build()
            .unwrap(),
    );
    let cache = EngineCache::new(&governor);
    let cold = cache.track(EngineId::Timeseries, cached_file(&d.join("cold"), 8));
    let warm = cache.track(EngineId::Timeseries, cached_file(&d.join("warm"), 8));
    let other = cache.track(EngineId::Vector, cached_file(&d.join("other"), 8));
    std::thread::sleep(Duration::from_millis(2));
    warm.touch();
    let (link, mut agent) = welcomed(
        &socket,
        &governor,
        &[
            ("timeseries", EngineId::Timeseries),
            ("vector", EngineId::Vector),
        ],
        |b| b.engine_cache(cache.clone()),
    );

    // A drop, and a budget change right behind it: both are carried out.
    agent.send(&ToLibrary::DropCache {
        engine: "timeseries".into(),
        target_bytes: 4 * MIB,
    });
    agent.send(&ToLibrary::Limits {
        engine: "timeseries".into(),
        floor_bytes: 0,
        cap_bytes: 32 * MIB,
        hot_set_bytes: None,
    });
    let answer = agent.wait_for(|m| matches!(m, ToAgent::CacheDropped { .. }));
    let ToAgent::CacheDropped {
        engine,
        target_bytes,
        freed_bytes,
        files,
    } = answer
    else {
        unreachable!()
    };
    assert_eq!(
        (engine.as_str(), target_bytes, freed_bytes, files),
        ("timeseries", 4 * MIB, 8 * MIB, 1),
        "the coldest file, whole, is enough"
    );
    assert_eq!(resident_bytes(cold.file()).unwrap().0, 0);
    assert_eq!(resident_bytes(warm.file()).unwrap().0, 8 * MIB);
    assert_eq!(resident_bytes(other.file()).unwrap().0, 8 * MIB);
    let deadline = Instant::now() + Duration::from_secs(10);
    while governor.usage(EngineId::Timeseries).unwrap().cap_bytes != 32 * MIB {
        assert!(Instant::now() < deadline, "the new cap was not applied");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = link.stats();
    assert_eq!(stats.cache_drops, 1);
    assert_eq!(stats.limit_changes, 1);
    assert_eq!(stats.last_error, None);

    // An engine the process does not have: no drop, no answer, noted.
    agent.send(&ToLibrary::DropCache {
        engine: "sparse".into(),
        target_bytes: MIB,
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while link.stats().last_error.is_none() {
        assert!(
            Instant::now() < deadline,
            "the unknown engine was not noted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(link.stats().last_error.unwrap().contains("sparse"));
    assert_eq!(link.stats().cache_drops, 1);
    drop(link);
    let _ = fs::remove_dir_all(&d);
}

/// A spill handler holding reservations; its spills wait for a go-ahead
/// on `gate` when it has one (one message per spill).
struct Held {
    held: Mutex<Vec<Reservation>>,
    gate: Option<Mutex<mpsc::Receiver<()>>>,
    entered: mpsc::SyncSender<()>,
}

impl SpillHandler for Held {
    fn reclaimable_bytes(&self) -> u64 {
        self.held
            .lock()
            .unwrap()
            .iter()
            .map(Reservation::size)
            .sum()
    }

    fn spill(&self, target_bytes: u64) -> u64 {
        let _ = self.entered.try_send(());
        if let Some(gate) = &self.gate {
            // Bounded: a failing test drops the link (which joins this
            // thread) before the sender.
            let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(20));
        }
        let mut held = self.held.lock().unwrap();
        let mut freed = 0;
        while freed < target_bytes
            && let Some(r) = held.pop()
        {
            freed += r.size();
        }
        freed
    }
}

fn held(
    governor: &MemoryGovernor,
    engine: EngineId,
    chunks: u64,
    gate: Option<mpsc::Receiver<()>>,
) -> (Arc<Held>, mpsc::Receiver<()>) {
    let (entered, spilling) = mpsc::sync_channel(64);
    let held = (0..chunks)
        .map(|_| governor.try_reserve(engine, MIB).unwrap())
        .collect();
    let h = Arc::new(Held {
        held: Mutex::new(held),
        gate: gate.map(Mutex::new),
        entered,
    });
    (h, spilling)
}

fn spilled(m: &ToAgent, name: &str) -> Option<(u64, u64)> {
    match m {
        ToAgent::Spilled {
            engine,
            target_bytes,
            freed_bytes,
        } if engine == name => Some((*target_bytes, *freed_bytes)),
        _ => None,
    }
}

#[test]
fn a_slow_spill_holds_up_neither_other_engines_nor_limits_and_requests_behind_it_merge() {
    let d = dir();
    let socket = d.join("spill.sock");
    let governor = MemoryGovernor::new(
        Budget::builder(512 * MIB)
            .engine(EngineId::Vector, 0, 128 * MIB)
            .engine(EngineId::Timeseries, 0, 128 * MIB)
            .engine(EngineId::Query, 0, 128 * MIB)
            .build()
            .unwrap(),
    );
    let spill = Arc::new(SpillController::new(SpillConfig::default()).unwrap());
    // Vector's spills wait for the test; timeseries' and query's do not.
    let (go, gate) = mpsc::channel();
    let (vector, vector_spilling) = held(&governor, EngineId::Vector, 64, Some(gate));
    let (timeseries, _) = held(&governor, EngineId::Timeseries, 64, None);
    let (query, _) = held(&governor, EngineId::Query, 64, None);
    let _r = [
        spill.register(EngineId::Vector, vector.clone()),
        spill.register(EngineId::Timeseries, timeseries.clone()),
        spill.register(EngineId::Query, query.clone()),
    ];
    let (link, mut agent) = welcomed(
        &socket,
        &governor,
        &[
            ("vector", EngineId::Vector),
            ("timeseries", EngineId::Timeseries),
            ("query", EngineId::Query),
        ],
        |b| b.spill_controller(spill.clone()),
    );

    // Vector's spill starts and sticks in its handler.
    let spill_of = |engine: &str, mib: u64| ToLibrary::Spill {
        engine: engine.into(),
        target_bytes: mib * MIB,
    };
    agent.send(&spill_of("vector", 8));
    vector_spilling
        .recv_timeout(Duration::from_secs(10))
        .expect("vector's spill started");
    // Three more requests for vector pile up behind it; timeseries is
    // asked to spill, and query's cap drops below what it holds.
    for mib in [10, 12, 16] {
        agent.send(&spill_of("vector", mib));
    }
    agent.send(&spill_of("timeseries", 20));
    agent.send(&ToLibrary::Limits {
        engine: "query".into(),
        floor_bytes: 0,
        cap_bytes: 40 * MIB,
        hot_set_bytes: None,
    });
    let ts = agent.wait_for(|m| spilled(m, "timeseries").is_some());
    assert_eq!(spilled(&ts, "timeseries"), Some((20 * MIB, 20 * MIB)));
    assert_eq!(timeseries.reclaimable_bytes(), 44 * MIB);
    // Query was spilled down to its new cap, which now applies.
    let deadline = Instant::now() + Duration::from_secs(10);
    while governor.usage(EngineId::Query).unwrap().cap_bytes != 40 * MIB {
        assert!(
            Instant::now() < deadline,
            "query's new cap was not applied: {:?}",
            governor.usage(EngineId::Query)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        governor.usage(EngineId::Query).unwrap().used_bytes,
        40 * MIB
    );
    // Vector is still stuck in its first spill, and nothing of it freed.
    assert_eq!(vector.reclaimable_bytes(), 64 * MIB);

    // Let it go: the first request is answered, then one more spill, for
    // the newest of the three behind it (the others merged into it).
    go.send(()).unwrap();
    let first = agent.wait_for(|m| spilled(m, "vector").is_some());
    assert_eq!(spilled(&first, "vector"), Some((8 * MIB, 8 * MIB)));
    go.send(()).unwrap();
    let second = agent.wait_for(|m| spilled(m, "vector").is_some());
    assert_eq!(spilled(&second, "vector"), Some((16 * MIB, 16 * MIB)));
    assert_eq!(vector.reclaimable_bytes(), 40 * MIB);
    let stats = link.stats();
    assert_eq!(stats.spills_merged, 2, "{stats:?}");
    assert_eq!(stats.spilled_bytes, (20 + 24 + 8 + 16) * MIB, "{stats:?}");
    assert_eq!(stats.last_error, None);
    // No third spill of vector: a request arriving now is the only one.
    agent.send(&spill_of("vector", 1));
    go.send(()).unwrap();
    let third = agent.wait_for(|m| spilled(m, "vector").is_some());
    assert_eq!(spilled(&third, "vector"), Some((MIB, MIB)));
    assert_eq!(link.stats().spills, 5);
    drop(link);
    let _ = fs::remove_dir_all(&d);
}

/// A cap below what an engine holds is applied once the engine has come
/// down, whether its spill brought it there or it freed on its own while
/// its spill was stuck; meanwhile its cap stays at what it held.
#[test]
fn limits_below_what_an_engine_holds_apply_once_it_frees_on_its_own() {
    let d = dir();
    let socket = d.join("wanted.sock");
    let governor = MemoryGovernor::new(
        Budget::builder(512 * MIB)
            .engine(EngineId::Query, 0, 128 * MIB)
            .build()
            .unwrap(),
    );
    let spill = Arc::new(SpillController::new(SpillConfig::default()).unwrap());
    let (go, gate) = mpsc::channel();
    let (query, query_spilling) = held(&governor, EngineId::Query, 64, Some(gate));
    let _r = spill.register(EngineId::Query, query.clone());
    let (link, mut agent) = welcomed(&socket, &governor, &[("query", EngineId::Query)], |b| {
        b.spill_controller(spill.clone())
    });
    agent.send(&ToLibrary::Limits {
        engine: "query".into(),
        floor_bytes: 0,
        cap_bytes: 40 * MIB,
        hot_set_bytes: None,
    });
    // Its spill is stuck; the cap is held at what it holds.
    query_spilling
        .recv_timeout(Duration::from_secs(10))
        .expect("query's spill started");
    let cap = || governor.usage(EngineId::Query).unwrap().cap_bytes;
    assert_eq!(cap(), 64 * MIB);
    assert!(governor.try_reserve(EngineId::Query, MIB).is_err());
    // It frees 10 MiB on its own: still above the new cap, so its cap
    // stays where it was clamped.
    query.held.lock().unwrap().truncate(54);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(cap(), 64 * MIB);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Down to 30 MiB: the new cap applies, with the spill still stuck.
    query.held.lock().unwrap().truncate(30);
    while cap() != 40 * MIB {
        assert!(Instant::now() < deadline, "the cap stayed at {}", cap());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(governor.try_reserve(EngineId::Query, 10 * MIB).is_ok());
    go.send(()).unwrap();
    drop(link);
    let _ = fs::remove_dir_all(&d);
}

/// A socket path of `name` in a directory of its own (the other tests
/// remove theirs when they end).
fn own_socket(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("link-{}-{name}", std::process::id()));
    fs::create_dir_all(&d).unwrap();
    d.join("agent.sock")
}

/// Bytes the other end has sent to `s` that it has not read yet.
fn unread(s: &UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0);
    n as usize
}

/// A governor with the query engine (a cap of 64 MiB) and a link for it
/// to `socket`, configured by `with` from the defaults.
fn query_link(
    socket: &std::path::Path,
    with: impl FnOnce(LinkConfig) -> LinkConfig,
) -> (MemoryGovernor, AgentLink) {
    let governor = MemoryGovernor::new(
        Budget::builder(256 * MIB)
            .engine(EngineId::Query, 0, 64 * MIB)
            .build()
            .unwrap(),
    );
    let config = with(LinkConfig::new(
        socket,
        "nodedb",
        &[("query", EngineId::Query)],
    ));
    let link = AgentLink::builder(&governor, config).start().unwrap();
    (governor, link)
}

/// The first error `link` notes (within 10 s).
fn first_error(link: &AgentLink) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = link.stats().last_error {
            return e;
        }
        assert!(Instant::now() < deadline, "no error from the link");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `f` on a thread of its own and says whether it returned within
/// `within` (the thread is left behind if not: the test fails anyway).
fn returns_within(within: Duration, f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(within).is_ok()
}

/// A link whose books change all the time (a thread reserves and frees),
/// so it writes a report at every tick, to an agent that welcomes it and
/// then reads nothing: returned once the link's writes are blocked (the
/// agent's end holds what it has not read, and it no longer grows).
fn stalled_agent(
    socket: &std::path::Path,
    write_timeout: Duration,
) -> (
    AgentLink,
    UnixListener,
    UnixStream,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let governor = MemoryGovernor::new(
        Budget::builder(256 * MIB)
            .engine(EngineId::Query, 0, 256 * MIB)
            .build()
            .unwrap(),
    );
    let _ = fs::remove_file(socket);
    let listener = UnixListener::bind(socket).unwrap();
    let link = AgentLink::builder(
        &governor,
        LinkConfig {
            report_interval: Duration::from_millis(1),
            write_timeout,
            agent_uid: Some(euid()),
            ..LinkConfig::new(socket, "nodedb", &[("query", EngineId::Query)])
        },
    )
    .start()
    .unwrap();
    let agent = accept_welcomed(&listener, &link);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = stop.clone();
    std::thread::spawn(move || {
        let mut n = 1u64;
        let mut held = None;
        while !churn.load(std::sync::atomic::Ordering::Relaxed) {
            drop(held.take());
            held = governor
                .try_reserve(EngineId::Query, (n % 50 + 1) * MIB)
                .ok();
            n += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (0, Instant::now());
    loop {
        let now = unread(&agent.stream);
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() > Duration::from_millis(500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the link's writes never blocked ({now} bytes unread)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (link, listener, agent.stream, stop)
}

#[test]
fn dropping_the_link_does_not_wait_on_an_agent_that_stopped_reading() {
    let socket = own_socket("stalled-drop");
    // A write timeout longer than any test: only the shutdown on drop can
    // free the blocked write.
    let (link, _listener, _agent, stop) = stalled_agent(&socket, Duration::from_secs(3600));
    assert!(
        returns_within(Duration::from_secs(10), move || drop(link)),
        "dropping the link hung on its blocked write"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn a_write_the_agent_does_not_read_times_out_and_the_link_connects_again() {
    let socket = own_socket("stalled-write");
    let (link, listener, _agent, stop) = stalled_agent(&socket, Duration::from_millis(300));
    // The blocked write gives up, and the link connects again.
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the link did not connect again: {:?}",
                    link.stats()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accepting: {e}"),
        }
    };
    second.set_nonblocking(false).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut agent = Agent {
        stream: second,
        decoder: Decoder::new(),
    };
    agent.wait_for(|m| matches!(m, ToAgent::Hello { .. }));
    let stats = link.stats();
    assert_eq!(stats.connects, 1, "welcomed once so far");
    let e = stats.last_error.unwrap_or_default();
    assert!(
        e.contains("timed out")
            || e.contains("temporarily unavailable")
            || e.contains("would block"),
        "{e}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn a_socket_another_uid_listens_on_is_refused() {
    let socket = own_socket("foreign");
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let (_governor, link) = query_link(&socket, |c| LinkConfig {
        agent_uid: Some(euid().wrapping_add(1)),
        ..c
    });
    let e = first_error(&link);
    assert!(
        e.contains(&format!(
            "runs as uid {}, not the agent's uid {}",
            euid(),
            euid().wrapping_add(1)
        )),
        "{e}"
    );
    // Nothing was said to it: the connection was closed before the hello.
    let (mut s, _) = listener.accept().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(
        got.is_empty(),
        "the link wrote {} bytes to a foreign listener",
        got.len()
    );
    assert!(!link.stats().connected);
}

#[test]
fn an_agent_that_does_not_accept_holds_up_neither_the_link_nor_its_drop() {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    let socket = own_socket("full");
    let _ = fs::remove_file(&socket);
    // A listener with no room in its queue (backlog 0, one connection
    // waiting in it), as an agent stopped with its socket open.
    // SAFETY: plain socket calls on a descriptor this test owns.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    // SAFETY: as above.
    let listener = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_un, filled within bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in addr.sun_path.iter_mut().zip(socket.as_os_str().as_bytes()) {
        *d = *b as libc::c_char;
    }
    // SAFETY: a valid address of the size given.
    let bound = unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    assert_eq!(bound, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: as above.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let _waiting = UnixStream::connect(&socket).unwrap();
    let (_governor, link) = query_link(&socket, |c| LinkConfig {
        agent_uid: Some(euid()),
        ..c
    });
    let e = first_error(&link);
    assert!(e.contains("listen queue is full"), "{e}");
    assert!(
        returns_within(Duration::from_secs(10), move || drop(link)),
        "dropping the link hung"
    );
}

#[test]
fn an_agent_lost_for_long_gives_the_engines_their_own_limits_back() {
    let socket = own_socket("lost");
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let (governor, link) = query_link(&socket, |c| LinkConfig {
        agent_uid: Some(euid()),
        agent_lost_after: Duration::from_millis(300),
        ..c
    });
    let mut agent = accept_welcomed(&listener, &link);
    // The agent's Emergency cap, and its level.
    agent.send(&ToLibrary::Limits {
        engine: "query".into(),
        floor_bytes: 0,
        cap_bytes: 8 * MIB,
        hot_set_bytes: None,
    });
    agent.send(&ToLibrary::Pressure {
        engine: "query".into(),
        level: nodedb_governor::PressureLevel::Emergency,
    });
    // The database holds 240 MiB (nothing of it this library's), and the
    // agent's ceiling is 10 MiB below the library's 256: 6 MiB of room,
    // whatever the cap.
    agent.send(&ToLibrary::Outside {
        bytes: 240 * MIB,
        ceiling_bytes: 246 * MIB,
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while governor.usage(EngineId::Query).unwrap().cap_bytes != 8 * MIB
        || link.agent_level(EngineId::Query).is_none()
        || governor.outside_bytes() != 250 * MIB
    {
        assert!(Instant::now() < deadline, "the agent's cap was not applied");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(
        governor.try_reserve(EngineId::Query, 7 * MIB),
        Err(nodedb_governor::MemError::GlobalCeilingExceeded { available, .. }) if available == 6 * MIB
    ));
    // The agent's ceiling above the library's own 256 MiB: the room is the
    // smaller of what each leaves (300 - 240 = 60 against 256), so 196 of
    // the 240 count against the library's own.
    agent.send(&ToLibrary::Outside {
        bytes: 240 * MIB,
        ceiling_bytes: 300 * MIB,
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while governor.outside_bytes() != 196 * MIB {
        assert!(Instant::now() < deadline, "{}", governor.outside_bytes());
        std::thread::sleep(Duration::from_millis(5));
    }
    agent.send(&ToLibrary::Outside {
        bytes: 240 * MIB,
        ceiling_bytes: 246 * MIB,
    });
    while governor.outside_bytes() != 250 * MIB {
        assert!(Instant::now() < deadline, "{}", governor.outside_bytes());
        std::thread::sleep(Duration::from_millis(5));
    }
    // The agent goes, and does not come back.
    drop(agent);
    drop(listener);
    fs::remove_file(&socket).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while governor.usage(EngineId::Query).unwrap().cap_bytes != 64 * MIB {
        assert!(
            Instant::now() < deadline,
            "the stale cap stayed: {:?}",
            link.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = link.stats();
    assert_eq!(stats.agent_lost, 1);
    assert!(
        stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("every engine has its own limits again")),
        "{stats:?}"
    );
    assert_eq!(link.agent_level(EngineId::Query), None);
    // The agent's figure for the database goes with it.
    assert_eq!(governor.outside_bytes(), 0);
    assert!(governor.try_reserve(EngineId::Query, 32 * MIB).is_ok());
    // Given back once per loss, not at every failed attempt.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(link.stats().agent_lost, 1);
}

/// Waits until `f()` holds (10 s at most), naming `what` if it never does.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The agent's figure follows the kernel at its own pace; near the ceiling
/// the library reads the database's `memory.stat` itself (a file the test
/// writes, as the kernel would): what a spill moved to a tmpfs since the
/// agent's last figure is not admitted a second time. The figure follows
/// the file both ways, keeps the agent's ceiling, and goes with the
/// agent's take-back.
#[test]
fn near_the_ceiling_the_library_reads_what_the_database_holds_itself() {
    let socket = own_socket("held");
    let stat = socket.with_file_name("memory.stat");
    let held = |rss: u64, shmem: u64| {
        fs::write(
            &stat,
            format!(
                "rss 1\ntotal_rss {}\ntotal_shmem {}\n",
                rss * MIB,
                shmem * MIB
            ),
        )
        .unwrap();
    };
    held(0, 0);
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    // Exact figures: no thread-local credit (what a thread has drawn and
    // not used counts in the books, a batch at most).
    let governor = MemoryGovernor::with_batch(
        Budget::builder(256 * MIB)
            .engine(EngineId::Query, 0, 256 * MIB)
            .build()
            .unwrap(),
        Default::default(),
        0,
    );
    let link = AgentLink::builder(
        &governor,
        LinkConfig {
            agent_uid: Some(euid()),
            ..LinkConfig::new(&socket, "nodedb", &[("query", EngineId::Query)])
        },
    )
    .start()
    .unwrap();
    let from = wire::HeldFrom {
        stat: stat.display().to_string(),
        keys: vec!["total_rss".into(), "total_shmem".into()],
    };
    let mut agent = accept_welcomed_with(&listener, &link, Some(&from));
    // The agent saw 1 MiB outside the books (its ceiling the library's):
    // once that is in force, so is the probe that came with it.
    agent.send(&ToLibrary::Outside {
        bytes: MIB,
        ceiling_bytes: 256 * MIB,
    });
    eventually("the agent's figure was not applied", || {
        governor.outside_bytes() == MIB
    });
    // Far from the ceiling the file is not read: the agent's figure holds.
    held(0, 80);
    let first = governor.try_reserve(EngineId::Query, 100 * MIB).unwrap();
    assert_eq!(governor.outside_bytes(), MIB);
    // 100 MiB held by the reservation, 80 by a tmpfs the agent has not
    // seen yet: 100 more would leave 55 of the 256 (under a quarter), so
    // the file is read, and only 76 are left.
    held(100, 80);
    let read_after = Instant::now();
    assert!(matches!(
        governor.try_reserve(EngineId::Query, 100 * MIB),
        Err(nodedb_governor::MemError::GlobalCeilingExceeded { available, .. }) if available == 76 * MIB
    ));
    assert_eq!(governor.outside_bytes(), 80 * MIB);
    // Within the millisecond after a read, not read again: the figure
    // stays (however the file moved).
    held(100, 0);
    let again = governor.try_reserve(EngineId::Query, 100 * MIB);
    if read_after.elapsed() < Duration::from_micros(900) {
        assert!(again.is_err());
        assert_eq!(governor.outside_bytes(), 80 * MIB);
    }
    drop(again);
    // The tmpfs emptied: read again (after the spacing between reads: a
    // millisecond, or a hundred times what the last read took, at most
    // 100 ms), the room is back.
    std::thread::sleep(Duration::from_millis(110));
    let second = governor.try_reserve(EngineId::Query, 100 * MIB).unwrap();
    assert_eq!(governor.outside_bytes(), 0);
    // The agent's ceiling 10 MiB under the library's: kept in the figure
    // read (what is held beyond the books, 30 MiB, and the 10).
    agent.send(&ToLibrary::Outside {
        bytes: 0,
        ceiling_bytes: 246 * MIB,
    });
    eventually("the agent's ceiling was not applied", || {
        governor.outside_bytes() == 10 * MIB
    });
    held(200, 30);
    assert_eq!(governor.refresh_outside(), 40 * MIB);
    // Taken back (a reload to observing): no figure, and the file is no
    // longer read.
    agent.send(&ToLibrary::Outside {
        bytes: 0,
        ceiling_bytes: u64::MAX,
    });
    eventually("the take-back was not applied", || {
        governor.outside_bytes() == 0
    });
    assert_eq!(governor.refresh_outside(), 0);
    // Enforcing again, then the link dropped: the figure and the probe go.
    agent.send(&ToLibrary::Outside {
        bytes: 0,
        ceiling_bytes: 256 * MIB,
    });
    eventually("enforcing again", || governor.refresh_outside() == 30 * MIB);
    drop(link);
    assert_eq!(governor.outside_bytes(), 0);
    assert_eq!(governor.refresh_outside(), 0);
    drop((first, second));
}

/// A `held_from` that does not name a `memory.stat` is not read, and the
/// link says why; the connection goes on under the agent's figures.
#[test]
fn a_held_from_that_is_not_a_memory_stat_is_refused_by_name() {
    let socket = own_socket("held-bad");
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let (governor, link) = query_link(&socket, |c| LinkConfig {
        agent_uid: Some(euid()),
        ..c
    });
    let secret = socket.with_file_name("shadow");
    fs::write(&secret, "total_rss 1\n").unwrap();
    let from = wire::HeldFrom {
        stat: secret.display().to_string(),
        keys: vec!["total_rss".into()],
    };
    let mut agent = accept_welcomed_with(&listener, &link, Some(&from));
    let e = first_error(&link);
    assert!(e.contains("memory.stat") && e.contains("shadow"), "{e}");
    agent.send(&ToLibrary::Outside {
        bytes: 5 * MIB,
        ceiling_bytes: 256 * MIB,
    });
    eventually("the agent's figure was not applied", || {
        governor.outside_bytes() == 5 * MIB
    });
    assert_eq!(governor.refresh_outside(), 5 * MIB);
    assert!(link.stats().connected);
}

/// An engine that keeps allocating changes its arena's figures all the
/// time; the reports carry them at most every `ARENA_FIGURES_EVERY`, so
/// its unchanged books are not sent again at every report (20 a second)
/// for the figures' sake, and the figures are still the arena's own.
#[cfg(feature = "jemalloc")]
#[test]
fn an_engine_allocating_without_reserving_does_not_make_every_report_new() {
    use nodedb_governor::{arena::EngineArenas, control::link::ARENA_FIGURES_EVERY};

    let governor = MemoryGovernor::new(
        Budget::builder(1 << 30)
            .engine(EngineId::Wal, 0, 1 << 30)
            .build()
            .unwrap(),
    );
    let arenas = Arc::new(EngineArenas::create(&[EngineId::Wal]).unwrap());
    // The books stay at one reservation while the arena grows by a MiB
    // every 20 ms.
    let _r = governor.try_reserve(EngineId::Wal, MIB).unwrap();
    let socket = own_socket("arena-figures");
    let a = arenas.clone();
    let (_link, mut agent) = welcomed(&socket, &governor, &[("wal", EngineId::Wal)], |b| {
        b.arenas(a)
    });
    let a = arenas.clone();
    let churn = std::thread::spawn(move || {
        a.pin_current_thread(EngineId::Wal).unwrap();
        let mut kept: Vec<Vec<u8>> = Vec::new();
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            let mut v = vec![0u8; MIB as usize];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            kept.push(std::hint::black_box(v));
            std::thread::sleep(Duration::from_millis(20));
        }
        // Kept until the reports are read.
        kept
    });
    let (mut figures, mut books) = (Vec::new(), Vec::new());
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        if let ToAgent::Report { engines } = agent.wait_for(|m| matches!(m, ToAgent::Report { .. }))
        {
            let wal = engines.iter().find(|e| e.name == "wal").unwrap();
            books.push(wal.reserved_bytes);
            figures.push(wal.arena_resident_bytes.expect("the arena's figure"));
        }
    }
    let kept = churn.join().unwrap();
    let grown = kept.len() as u64 * MIB;
    assert!(
        books.iter().all(|b| *b == books[0] && *b >= MIB),
        "{books:?}"
    );
    // Read every 50 ms, the figures would have made about 50 reports new
    // in 2.5 s; once a second, about 4 (the first, one a second, the one
    // read after the deadline).
    assert_eq!(ARENA_FIGURES_EVERY, Duration::from_secs(1));
    let most = 5;
    assert!(
        figures.len() <= most,
        "{} reports in 2.5 s (at most {most}): {figures:?}",
        figures.len()
    );
    // They are the arena's: it grew by tens of MiB meanwhile (a MiB per
    // 20 ms sleep), and the last figure, at most a second old, saw a good
    // part of it.
    assert!(grown >= 20 * MIB, "{grown}");
    let last = *figures.last().unwrap();
    assert!(last >= grown / 3, "{last} of {grown}: {figures:?}");
    drop(kept);
}
