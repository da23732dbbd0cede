//! Waiting for something another process does (the agent, a probe, the
//! kernel): polled, with a deadline.

use std::{
    convert::Infallible,
    time::{Duration, Instant},
};

/// Calls `done` every `every` until it returns true (then true) or
/// `timeout` has passed (then false); an error from `done` ends the wait.
pub fn try_poll<E>(
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> Result<bool, E>,
) -> Result<bool, E> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(every);
    }
}

/// [`try_poll`] for a condition that cannot fail.
pub fn poll(timeout: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    match try_poll(timeout, every, || Ok::<_, Infallible>(done())) {
        Ok(done) => done,
        Err(never) => match never {},
    }
}

/// For tests: waits up to 10 s for `done` (polled every 20 ms), and panics
/// naming `what` when it does not come.
pub fn wait_for(what: &str, done: impl FnMut() -> bool) {
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(20), done),
        "timed out waiting for {what}"
    );
}
