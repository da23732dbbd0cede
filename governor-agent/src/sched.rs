//! The agent's own scheduling. Its thread sleeps until the kernel reports a
//! mark crossing; under the normal scheduler, a woken thread on a busy CPU
//! can wait for the running task's slice to end, up to a scheduler tick
//! (4 ms at `HZ=250`), and that wait was most of the breach-to-spill time.
//! At `SCHED_FIFO` it preempts at once (Android's lmkd runs so for the same
//! reason). The agent's own work is small (a fraction of a percent of a
//! core at 1,000 threads); the writes that can make the kernel reclaim
//! memory in the writer's context (a cgroup limit lowered below what the
//! cgroup holds) run at the normal policy ([`unraised`]). Were the agent
//! to spin, the kernel's real-time throttling (by default) would still
//! leave the other tasks 5% of the CPU.
//!
//! Only the agent's own thread is raised, with `SCHED_RESET_ON_FORK`: a
//! thread or process it starts runs at the normal policy.

use serde::{Deserialize, Serialize};

/// The agent's scheduling as it stands (`status --json` `scheduling`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulingStatus {
    /// `"fifo"` or `"normal"`.
    pub policy: String,
    /// The real-time priority in force (0 at the normal policy).
    pub priority: u8,
    /// Why the configured priority is not in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Puts thread `tid` at `SCHED_FIFO` `priority` (1-99), or back at the
/// normal policy for 0. A refusal leaves the thread as it was and is
/// reported, naming the capability it needs.
pub fn apply(tid: libc::pid_t, priority: u8) -> SchedulingStatus {
    // SCHED_RESET_ON_FORK either way: once set, a thread without
    // CAP_SYS_NICE may not clear it (and keeping it needs nothing).
    let (policy, name) = if priority == 0 {
        (libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, "normal")
    } else {
        (libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, "fifo")
    };
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: `param` is a valid sched_param for the call's duration.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0 {
        return SchedulingStatus {
            policy: name.to_owned(),
            priority,
            error: None,
        };
    }
    let e = std::io::Error::last_os_error();
    let why = if priority > 0 && e.raw_os_error() == Some(libc::EPERM) {
        format!(
            "SCHED_FIFO priority {priority}: {e} (the agent needs CAP_SYS_NICE in the host's user namespace, or an RLIMIT_RTPRIO of at least {priority}; a service manager's RestrictRealtime= or a seccomp or LSM policy also refuses it, and a kernel with real-time group scheduling on cgroup v1 needs real-time runtime in the agent's cpu cgroup)"
        )
    } else if priority > 0 {
        format!("SCHED_FIFO priority {priority}: {e}")
    } else {
        format!("back to the normal policy: {e}")
    };
    let mut now = current(tid);
    now.error = Some(why);
    now
}

/// Thread `tid`'s scheduling as the kernel reports it.
pub fn current(tid: libc::pid_t) -> SchedulingStatus {
    // SAFETY: a plain system call on a thread id.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a writable sched_param the kernel fills.
    let priority = if unsafe { libc::sched_getparam(tid, &mut param) } == 0 {
        param.sched_priority.clamp(0, 99) as u8
    } else {
        0
    };
    let name = match policy & !libc::SCHED_RESET_ON_FORK {
        libc::SCHED_FIFO => "fifo",
        libc::SCHED_RR => "rr",
        libc::SCHED_OTHER => "normal",
        libc::SCHED_BATCH => "batch",
        libc::SCHED_IDLE => "idle",
        _ => "unknown",
    };
    SchedulingStatus {
        policy: name.to_owned(),
        priority,
        error: None,
    }
}

/// Runs `f` with thread `raised.0` at the normal policy, then raises it
/// to `raised.1` again (`None`: the thread is not raised, `f` just runs).
/// For writes that may reclaim memory in the writer's own context (a
/// cgroup limit set below what the cgroup holds): that work must not run
/// ahead of every normal task on the CPU.
pub fn unraised<R>(raised: Option<(libc::pid_t, u8)>, f: impl FnOnce() -> R) -> R {
    let Some((tid, priority)) = raised else {
        return f();
    };
    let _ = apply(tid, 0);
    let r = f();
    let _ = apply(tid, priority);
    r
}

/// The calling thread's id.
pub fn this_thread() -> libc::pid_t {
    // SAFETY: gettid cannot fail.
    unsafe { libc::gettid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Back to the normal policy is always allowed; a thread that never
    /// was raised reports it plainly.
    #[test]
    fn the_normal_policy_is_applied_and_read_back() {
        let tid = this_thread();
        let s = apply(tid, 0);
        assert_eq!(s, current(tid));
        assert_eq!(s.policy, "normal");
        assert_eq!(s.priority, 0);
        assert_eq!(s.error, None);
    }

    /// Raised and read back where it is allowed; refused with the
    /// capability named where it is not, and the thread left as it was.
    #[test]
    fn fifo_is_applied_or_refused_with_the_reason() {
        // A thread of its own: the test harness's thread is not changed.
        std::thread::spawn(|| {
            let tid = this_thread();
            let s = apply(tid, 1);
            match &s.error {
                None => {
                    assert_eq!(s.policy, "fifo");
                    assert_eq!(current(tid).policy, "fifo");
                    assert_eq!(current(tid).priority, 1);
                    // A thread it starts runs at the normal policy.
                    let child = std::thread::spawn(|| current(this_thread()))
                        .join()
                        .unwrap();
                    assert_eq!(child.policy, "normal");
                    assert_eq!(apply(tid, 0).policy, "normal");
                }
                Some(e) => {
                    assert!(e.contains("CAP_SYS_NICE"), "{e}");
                    assert_eq!(current(tid).policy, "normal");
                    assert_eq!(s.policy, "normal");
                }
            }
        })
        .join()
        .unwrap();
    }
}
