//! Where a run's CPU went: the CPU time (user + system) of processes and
//! threads, from `getrusage` and procfs.

use std::collections::BTreeMap;

/// The command and the CPU seconds (utime + stime) in the text of a
/// `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat`; None if it is not
/// one. The command may hold spaces and parentheses: the fields after it
/// start past its last `)`, at the state (field 3); utime and stime are
/// fields 14 and 15.
pub fn parse_stat(stat: &str) -> Option<(&str, f64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let command = stat.get(open + 1..close)?;
    let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (command, (utime + stime) as f64 / ticks as f64))
}

/// A process's CPU seconds so far, its threads included; None if it
/// cannot be read.
pub fn process_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, s)| s)
}

/// The CPU seconds of the calling thread (`RUSAGE_THREAD`) or of the whole
/// process, exited threads included (`RUSAGE_SELF`); NaN if they cannot be
/// read.
pub fn rusage_seconds(who: libc::c_int) -> f64 {
    let (user, system) = rusage_split(who);
    user + system
}

/// The same, as user and system (in the kernel) seconds.
pub fn rusage_split(who: libc::c_int) -> (f64, f64) {
    // SAFETY: rusage is plain data, valid zeroed.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given, which outlives it.
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return (f64::NAN, f64::NAN);
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(u.ru_utime), s(u.ru_stime))
}

/// The CPU seconds of this process's threads now running, by thread name:
/// "main" for the main thread, "unnamed" for threads that carry its name
/// because nobody named them.
pub fn threads_by_name() -> BTreeMap<String, f64> {
    threads_by_name_of(std::process::id())
}

/// The same for another process (`pid`): empty if it cannot be read.
pub fn threads_by_name_of(pid: u32) -> BTreeMap<String, f64> {
    let main = pid.to_string();
    let main_command = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let main_command = main_command.trim_end();
    let mut by_name = BTreeMap::<String, f64>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((command, seconds)) = parse_stat(&stat) else {
            continue;
        };
        let name = if task.file_name().to_str() == Some(main.as_str()) {
            "main"
        } else if command == main_command {
            "unnamed"
        } else {
            command
        };
        *by_name.entry(name.to_owned()).or_default() += seconds;
    }
    by_name
}

/// Names the calling thread `name` (its first 15 bytes, as the kernel
/// keeps them), so that its figure is under that name in
/// [`threads_by_name`]: a thread left unnamed there is "unnamed", and an
/// engine's thread that has just ended (joined, its task not yet reaped)
/// would be counted with whatever else nobody named.
pub fn name_this_thread(name: &str) -> std::io::Result<()> {
    let mut bytes: Vec<u8> = name.bytes().filter(|&b| b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes from its second argument, which `bytes` is for the call.
    let r = unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr() as libc::c_ulong, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What each thread name in `now` took since `before` (a name not in
/// `before` from zero); never negative.
pub fn grown_since(
    before: &BTreeMap<String, f64>,
    now: BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    now.into_iter()
        .map(|(k, v)| {
            let was = before.get(&k).copied().unwrap_or(0.0);
            (k, (v - was).max(0.0))
        })
        .collect()
}

/// Where a stretch of one thread's time went: on the CPU in user space
/// and in the kernel (`getrusage(RUSAGE_THREAD)`), waiting for a CPU
/// while runnable (`/proc/thread-self/schedstat`, the scheduler's run
/// delay), and the rest of its wall time off the CPU (blocked: a lock, a
/// sleep, I/O, the memory cgroup's throttling). Taken on the thread it
/// measures.
#[derive(Clone, Copy, Debug)]
pub struct ThreadTimes {
    at: std::time::Instant,
    user: f64,
    system: f64,
    /// Nanoseconds on the CPU and waiting on a run queue (None: the
    /// kernel keeps no schedstat).
    sched: Option<(u64, u64)>,
}

/// The first two fields of a `schedstat` line: nanoseconds on the CPU
/// and waiting to run.
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace().map(str::parse::<u64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

impl ThreadTimes {
    /// The calling thread's figures now.
    pub fn now() -> Self {
        let (user, system) = rusage_split(libc::RUSAGE_THREAD);
        let sched = std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|t| parse_schedstat(&t));
        Self {
            at: std::time::Instant::now(),
            user,
            system,
            sched,
        }
    }

    /// What the calling thread did since `self` (taken on it): seconds of
    /// wall time, user, system, waiting for a CPU and blocked.
    pub fn since(&self) -> serde_json::Value {
        let now = Self::now();
        let wall = now.at.duration_since(self.at).as_secs_f64();
        let (user, system) = (now.user - self.user, now.system - self.system);
        let waited = match (self.sched, now.sched) {
            (Some((c0, w0)), Some((c1, w1))) => Some((
                c1.saturating_sub(c0) as f64 / 1e9,
                w1.saturating_sub(w0) as f64 / 1e9,
            )),
            _ => None,
        };
        serde_json::json!({
            "wall": wall,
            "user": user,
            "system": system,
            "runnable_waiting": waited.map(|(_, w)| w),
            // Wall time neither on the CPU nor waiting for one (by the
            // scheduler's own clock of the CPU time where it has one).
            "blocked": waited.map(|(c, w)| (wall - c - w).max(0.0)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_with_spaces_and_parentheses_does_not_shift_the_fields() {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // utime 150, stime 50 (fields 14 and 15).
        let stat =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 3 0 99 1000 10";
        let (command, seconds) = parse_stat(stat).unwrap();
        assert_eq!(command, "a (b) c");
        assert!((seconds - 200.0 / hz).abs() < 1e-9, "{seconds}");
        assert_eq!(parse_stat("4242 (cut) S 1 2"), None);
        assert_eq!(parse_stat("no command here"), None);
    }

    #[test]
    fn this_thread_s_work_shows_in_its_own_and_the_process_s_figures() {
        let (thread, process) = (
            rusage_seconds(libc::RUSAGE_THREAD),
            rusage_seconds(libc::RUSAGE_SELF),
        );
        // Busy until the thread's own figure has grown by 0.15 s (however
        // loaded the machine), within 10 s. procfs gives user and system
        // time each cut down to a clock tick, so its sum can trail the
        // exact figure by two ticks (0.09 s read after 0.1 s of work): the
        // procfs figures are held to 0.1 s.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        while rusage_seconds(libc::RUSAGE_THREAD) - thread < 0.15 {
            assert!(
                std::time::Instant::now() < until,
                "the thread's CPU time did not grow"
            );
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        assert!(rusage_seconds(libc::RUSAGE_SELF) - process >= 0.1);
        let mine = process_seconds(std::process::id()).unwrap();
        assert!(mine >= 0.1, "{mine}");
        // This thread (named by the test harness) under its name.
        let name = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
        let threads = threads_by_name();
        let this = threads.get(name.trim_end()).or(threads.get("unnamed"));
        assert!(this.is_some_and(|s| *s >= 0.1), "{name:?} in {threads:?}");
        // Read as another process's (the harness reads the agent's so).
        let seen = threads_by_name_of(std::process::id());
        let that = seen.get(name.trim_end()).or(seen.get("unnamed"));
        assert!(that.is_some_and(|s| *s >= 0.1), "{name:?} in {seen:?}");
        assert!(threads_by_name_of(u32::MAX).is_empty());
    }

    #[test]
    fn a_named_thread_s_work_is_under_its_name_and_not_with_the_unnamed() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        // Unnamed by std: it carries the process's command until named.
        let t = std::thread::spawn(move || {
            name_this_thread("timeseries-engine-thread").unwrap();
            let start = rusage_seconds(libc::RUSAGE_THREAD);
            let mut x = 0u64;
            while rusage_seconds(libc::RUSAGE_THREAD) - start < 0.05 {
                for _ in 0..100_000 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            tx.send(()).unwrap();
            done_rx.recv().unwrap();
        });
        rx.recv().unwrap();
        let threads = threads_by_name();
        // Cut to the kernel's 15 bytes.
        let named = threads.get("timeseries-engi");
        assert!(named.is_some_and(|s| *s >= 0.03), "{threads:?}");
        assert!(
            threads.get("unnamed").is_none_or(|s| *s < 0.03),
            "{threads:?}"
        );
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_thread_s_time_splits_into_work_and_blocking() {
        assert_eq!(parse_schedstat("123 456 7\n"), Some((123, 456)));
        assert_eq!(parse_schedstat("123"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
        let t = ThreadTimes::now();
        // 0.2 s asleep, then busy until 0.1 s of user time.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let busy = rusage_seconds(libc::RUSAGE_THREAD);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        while rusage_seconds(libc::RUSAGE_THREAD) - busy < 0.1 && std::time::Instant::now() < until
        {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let d = t.since();
        let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
        assert!(f("wall") >= 0.3, "{d}");
        assert!(f("user") + f("system") >= 0.1, "{d}");
        if std::path::Path::new("/proc/thread-self/schedstat").exists() {
            // The sleep is blocked time; the loop is not.
            assert!(f("blocked") >= 0.19, "{d}");
            assert!(f("blocked") < f("wall") - 0.09, "{d}");
        } else {
            assert!(d["blocked"].is_null(), "{d}");
        }
    }

    #[test]
    fn growth_is_per_name_from_zero_for_new_names_and_never_negative() {
        let before = BTreeMap::from([("link".to_owned(), 1.0), ("gone".to_owned(), 2.0)]);
        let now = BTreeMap::from([
            ("link".to_owned(), 1.5),
            ("new".to_owned(), 0.25),
            // A thread of that name exited and a new one took its name.
            ("gone".to_owned(), 0.5),
        ]);
        let grown = grown_since(&before, now);
        assert_eq!(
            grown,
            BTreeMap::from([
                ("gone".to_owned(), 0.0),
                ("link".to_owned(), 0.5),
                ("new".to_owned(), 0.25),
            ])
        );
    }
}
