//! The agent's end of the control channel: libraries connect to the control
//! socket, and each connection is a [`session`] of its own, so no client
//! ever holds up another. What a session hears it hands to the owner; what
//! the owner decides for the library comes back on the session's
//! [`Outbound`] queue, which is bounded: a library that does not read its
//! answers is disconnected, not buffered for.
//!
//! The socket's limits (`[control]`): connections in all and per uid, a
//! hello within `hello_timeout_ms`, something heard from a welcomed
//! library within `idle_timeout_ms`; a failed `accept` (out of
//! descriptors, say) backs off rather than spins.

mod session;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use nodedb_governor::control::wire::ToLibrary;
use tokio::{
    net::UnixListener,
    sync::{Notify, mpsc, watch},
};

use crate::{config::Config, owner::Input};

/// How long to wait after a failed `accept` before the next.
pub(crate) const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Messages waiting to be written to one library: past this, it is not
/// reading, and it is disconnected.
pub const OUTBOUND_QUEUE: usize = 256;

/// Connections past `max_connections` being told why at once (each for
/// 100 ms at most); past these, they are closed unanswered.
pub const TURNED_AWAY_AT_ONCE: usize = 64;

/// What one control connection holds: its socket, the same socket again
/// for its writer (on the delivery thread's reactor), and a pidfd for its
/// peer.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 3;

/// How long one message's write may block (the library's socket buffer
/// full) before the library is disconnected.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The way to one library: its bounded queue, and a way to end its
/// connection.
#[derive(Clone, Debug)]
pub struct Outbound {
    /// Each message with when it was queued.
    tx: mpsc::Sender<(ToLibrary, std::time::Instant)>,
    close: Arc<Notify>,
    /// The peer's uid (for the log).
    pub uid: u32,
}

impl Outbound {
    /// Queues `message`; a full queue disconnects the library (it is not
    /// reading).
    pub fn send(&self, message: ToLibrary) {
        match self.tx.try_send((message, std::time::Instant::now())) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    uid = self.uid,
                    queued = OUTBOUND_QUEUE,
                    "a library is not reading its messages: disconnected"
                );
                self.close();
            }
            // The connection is going away; its session says so.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Ends the connection (the session then reports it disconnected).
    pub fn close(&self) {
        self.close.notify_one();
    }
}

/// The connections open now, in all and per uid.
#[derive(Debug, Default)]
struct Open {
    all: u32,
    per_uid: BTreeMap<u32, u32>,
}

/// Counts connections against `[control]`'s limits.
#[derive(Clone, Debug, Default)]
pub(crate) struct Connections(Arc<Mutex<Open>>);

/// One connection counted; uncounted when dropped.
#[derive(Debug)]
pub(crate) struct Counted {
    open: Connections,
    uid: Option<u32>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection, or says which limit it would pass.
    fn open(&self, max: u32) -> Result<Counted, String> {
        let mut o = self.lock();
        if o.all >= max {
            return Err(format!(
                "too many connections to the control socket ({max}, control.max_connections)"
            ));
        }
        o.all += 1;
        Ok(Counted {
            open: self.clone(),
            uid: None,
        })
    }

    /// How many are open now, in all.
    #[cfg(test)]
    fn all(&self) -> u32 {
        self.lock().all
    }
}

impl Counted {
    /// Counts the connection against its peer's uid too.
    fn as_uid(&mut self, uid: u32, max: u32) -> Result<(), String> {
        let mut o = self.open.lock();
        let n = o.per_uid.entry(uid).or_default();
        if *n >= max {
            return Err(format!(
                "too many connections from uid {uid} ({max}, control.max_connections_per_uid)"
            ));
        }
        *n += 1;
        drop(o);
        self.uid = Some(uid);
        Ok(())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut o = self.open.lock();
        o.all -= 1;
        if let Some(uid) = self.uid
            && let Some(n) = o.per_uid.get_mut(&uid)
        {
            *n -= 1;
            if *n == 0 {
                o.per_uid.remove(&uid);
            }
        }
    }
}

/// Accepts library connections until the task is aborted.
pub async fn serve(
    listener: UnixListener,
    owner: mpsc::Sender<Input>,
    config: watch::Receiver<Arc<Config>>,
    deliveries: crate::latency::Shared,
    deliver: tokio::runtime::Handle,
) {
    let open = Connections::default();
    // Connections past the limit told why at once: a few at a time, the
    // rest closed unanswered, so a flood holds no more descriptors than
    // the limit and these.
    let telling = Arc::new(tokio::sync::Semaphore::new(TURNED_AWAY_AT_ONCE));
    let mut next_session = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: back off rather than spin.
                tracing::warn!(error = %e, "accepting a control connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        crate::faults::accepted("control-accept");
        let limits = config.borrow().control;
        let counted = match open.open(limits.max_connections) {
            Ok(c) => c,
            Err(why) => {
                if let Ok(permit) = telling.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        session::turn_away(stream, why).await;
                        drop(permit);
                    });
                } else {
                    session::count_turned_away(&why);
                }
                continue;
            }
        };
        next_session += 1;
        tokio::spawn(session::run(
            stream,
            counted,
            next_session,
            owner.clone(),
            config.clone(),
            deliveries.clone(),
            deliver.clone(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_in_all_and_per_uid_and_uncounted_when_closed() {
        let open = Connections::default();
        let mut a = open.open(3).unwrap();
        a.as_uid(1000, 2).unwrap();
        let mut b = open.open(3).unwrap();
        b.as_uid(1000, 2).unwrap();
        let mut c = open.open(3).unwrap();
        let e = c.as_uid(1000, 2).unwrap_err();
        assert!(
            e.contains("uid 1000") && e.contains("max_connections_per_uid"),
            "{e}"
        );
        // Refused by its uid, it still counts in all until it is closed.
        let e = open.open(3).unwrap_err();
        assert!(e.contains("control.max_connections"), "{e}");
        c.as_uid(0, 2).unwrap();
        drop(c);
        drop(a);
        assert_eq!(open.all(), 1);
        let mut d = open.open(3).unwrap();
        d.as_uid(1000, 2).unwrap();
        drop((b, d));
        assert_eq!(open.all(), 0);
        assert!(open.lock().per_uid.is_empty());
    }
}
