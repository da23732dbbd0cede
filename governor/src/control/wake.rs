//! Prompt wake-ups for the link's threads, without privileges.
//!
//! A spill request reaches the link's thread on a socket, and the engine's
//! spill thread through a condition variable. Both sleep until then, on a
//! host whose CPUs the database keeps busy; since Linux 6.6 the scheduler
//! (EEVDF) lets a running task finish its slice before a woken one runs,
//! and the slice ends at a scheduler tick: up to 4 ms at `HZ=250`, most of
//! the breach-to-spill time once the agent itself wakes at once. Since
//! 6.12 a thread may ask for a shorter slice (`sched_setattr`'s
//! `sched_runtime` under the normal policy), and one with a shorter slice
//! than the running task preempts it when it wakes. It gets no more CPU
//! than before, only in shorter turns, and no privilege is needed. Older
//! kernels take the request and ignore it: before 6.6 CFS already lets a
//! woken sleeper preempt; on 6.6-6.11 the wait up to a tick remains.
//!
//! The link's thread keeps the short slice (its work is small); a spill
//! thread has it while it waits and gives it back while a handler runs (a
//! spill may be long, and is the engine's work like any other). A thread
//! the database put under another policy (real-time, idle) is left as it
//! is.

/// The slice asked for while waiting: the shortest the kernel takes.
const SHORT_SLICE_NS: u64 = 100_000;

/// `struct sched_attr` as of Linux 5.3 (`SCHED_ATTR_SIZE_VER1`, with the
/// utilisation clamps, which are left alone: no `SCHED_FLAG_UTIL_CLAMP`).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

fn get() -> Option<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = size_of::<SchedAttr>() as u32;
    // SAFETY: `attr` is a writable sched_attr of `size` bytes; 0 is the
    // calling thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    (r == 0).then_some(attr)
}

/// Sets the calling thread's slice (0: the kernel's default) if it runs
/// under the normal or batch policy. Whether the kernel honours it:
/// `Some(slice)` read back, `None` if it keeps no custom slice (before
/// 6.12) or the thread is under another policy.
fn set_slice(runtime_ns: u64) -> Option<u64> {
    let mut attr = get()?;
    let policy = attr.sched_policy as i32;
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return None;
    }
    attr.size = size_of::<SchedAttr>() as u32;
    attr.sched_flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.sched_runtime = runtime_ns;
    attr.sched_deadline = 0;
    attr.sched_period = 0;
    // SAFETY: `attr` is a valid sched_attr; 0 is the calling thread. The
    // nice value and policy are the thread's own, unchanged.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r != 0 {
        return None;
    }
    let now = get()?.sched_runtime;
    (runtime_ns == 0 || now == runtime_ns).then_some(now)
}

/// Asks for the short slice; true if the kernel keeps it (6.12 on).
pub(super) fn prompt() -> bool {
    set_slice(SHORT_SLICE_NS).is_some()
}

/// Gives the short slice back.
pub(super) fn relaxed() {
    let _ = set_slice(0);
}

/// Runs `f` (an engine's handler) at the ordinary slice, then asks for the
/// short one again: for the link's own thread, which keeps it.
pub(super) fn relaxed_while<R>(f: impl FnOnce() -> R) -> R {
    relaxed();
    let r = f();
    prompt();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> (u32, u32) {
        let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = text.trim().split(['.', '-']);
        let n = |p: Option<&str>| p.and_then(|s| s.parse().ok()).unwrap_or(0);
        (n(parts.next()), n(parts.next()))
    }

    /// Where the kernel keeps the short slice it reads back as asked and
    /// the default comes back after; a kernel before 6.12 (no custom
    /// slices) keeps nothing. The nice value is untouched either way.
    #[test]
    fn the_short_slice_is_kept_where_the_kernel_has_custom_slices() {
        std::thread::spawn(|| {
            let before = get().unwrap();
            let kept = prompt();
            if release() < (6, 12) {
                assert!(!kept, "kernel {:?} has no custom slices", release());
            }
            if kept {
                assert_eq!(get().unwrap().sched_runtime, SHORT_SLICE_NS);
            }
            assert_eq!(get().unwrap().sched_nice, before.sched_nice);
            relaxed();
            assert_eq!(get().unwrap().sched_runtime, before.sched_runtime);
            assert_eq!(get().unwrap().sched_nice, before.sched_nice);
            // A handler run in between leaves the short slice in place.
            if kept {
                let inside = relaxed_while(|| get().unwrap().sched_runtime);
                assert_eq!(inside, before.sched_runtime);
                assert_eq!(get().unwrap().sched_runtime, SHORT_SLICE_NS);
                relaxed();
            }
        })
        .join()
        .unwrap();
    }
}
