//! One library connection: counted against the socket's limits, peer
//! credentials checked against the allow-list, then the hello (within
//! `hello_timeout_ms`), then messages until it ends (a welcomed library
//! silent for `idle_timeout_ms` is disconnected). Bad frames are answered
//! with an error; only an oversized frame (the stream cannot be
//! resynchronised) or a refused hello ends the connection. The peer is
//! held by a pidfd and its start time, so a connection that outlives its
//! process never speaks for another process given the same pid.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nodedb_governor::control::wire::{self, Decoder, ToAgent, ToLibrary};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    sync::{Notify, mpsc, oneshot, watch},
    time::Instant,
};

use super::{Counted, OUTBOUND_QUEUE, Outbound, WRITE_TIMEOUT};
use crate::{
    config::{Config, ControlConfig},
    owner::{Input, Peer},
    policy::SessionId,
};

/// Connections turned away at the limit in all (logged at 1, 2, 4, 8, ...
/// so a flood does not flood the log).
static TURNED_AWAY: AtomicU64 = AtomicU64::new(0);

/// A connection past `control.max_connections`: told why (if it can be
/// written at once) and closed, holding nothing.
pub(super) async fn turn_away(mut stream: UnixStream, why: String) {
    count_turned_away(&why);
    let frame = wire::encode(&ToLibrary::Error { message: why });
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(&frame)).await;
}

/// Counts a connection turned away (logged at the 1st, 2nd, 4th, ... and
/// every 10,000th).
pub(super) fn count_turned_away(why: &str) {
    let n = TURNED_AWAY.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() || n.is_multiple_of(10_000) {
        tracing::warn!(turned_away = n, %why, "control connection refused");
    }
}

pub(super) async fn run(
    stream: UnixStream,
    mut counted: Counted,
    session: SessionId,
    owner: mpsc::Sender<Input>,
    config: watch::Receiver<Arc<Config>>,
    deliveries: crate::latency::Shared,
    deliver: tokio::runtime::Handle,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "control connection without peer credentials");
            return;
        }
    };
    let uid = cred.uid();
    let (limits, allowed) = {
        let c = config.borrow();
        (c.control, c.uid_allowed(uid))
    };
    let pidfd = crate::procfs::peer_pidfd(std::os::fd::AsFd::as_fd(&stream));
    // The writing end: the same socket on a descriptor of its own, for
    // the delivery runtime's reactor (the reading end stays with this
    // one's).
    let wr = match std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned() {
        Ok(fd) => std::os::unix::net::UnixStream::from(fd),
        Err(e) => {
            tracing::warn!(uid, error = %e, "control connection dropped: no descriptor for its writer");
            return;
        }
    };
    let mut rd = stream;
    let (tx, mut rx) = mpsc::channel(OUTBOUND_QUEUE);
    let close = Arc::new(Notify::new());
    let out = Outbound {
        tx,
        close: close.clone(),
        uid,
    };
    let writer_close = close.clone();
    let writer = deliver.spawn(async move {
        // Non-blocking already: the flag is the socket's, shared with the
        // reading end.
        let mut wr = match UnixStream::from_std(wr) {
            Ok(wr) => wr,
            Err(e) => {
                tracing::warn!(uid, error = %e, "registering a control connection's writer");
                writer_close.notify_one();
                return;
            }
        };
        while let Some((m, queued)) = rx.recv().await {
            match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&wire::encode(&m))).await {
                Ok(Ok(())) => {
                    if is_request(&m) {
                        deliveries.record(queued.elapsed().as_micros() as u64);
                    }
                }
                Ok(Err(_)) => break,
                Err(_) => {
                    tracing::warn!(
                        uid,
                        "a library has not read its messages for {} s: disconnected",
                        WRITE_TIMEOUT.as_secs()
                    );
                    break;
                }
            }
        }
        // Nothing more reaches the library: its session ends too.
        writer_close.notify_one();
    });
    let refuse = |message: String| {
        tracing::warn!(uid, %message, "control connection refused");
        out.send(ToLibrary::Error { message });
    };
    if let Err(why) = counted.as_uid(uid, limits.max_connections_per_uid) {
        refuse(why);
    } else if !allowed {
        refuse(format!(
            "uid {uid} is not allowed on the control socket (see allowed_uids in the config)"
        ));
        linger(&mut rd).await;
    } else {
        let peer = cred
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .map(|pid| identify(pidfd, pid, uid));
        match peer {
            None => {
                refuse("the peer's pid is unknown".into());
                linger(&mut rd).await;
            }
            Some(Err(why)) => {
                refuse(why);
                linger(&mut rd).await;
            }
            Some(Ok(peer)) => {
                tokio::select! {
                    () = converse(&owner, &mut rd, &out, session, peer, limits) => {}
                    () = close.notified() => {}
                }
                let _ = owner.send(Input::Disconnected { session }).await;
            }
        }
    }
    drop(out);
    // What is left in the queue gets one write timeout in all, not one
    // per message: a peer that reads a frame now and then does not keep
    // its place long after it was let go.
    let mut writer = writer;
    if tokio::time::timeout(WRITE_TIMEOUT, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    drop(counted);
}

/// A request of the owner's ladder (not a welcome, a placement's answer
/// or an error): what `delivery` in the status is measured on.
fn is_request(m: &ToLibrary) -> bool {
    matches!(
        m,
        ToLibrary::Limits { .. }
            | ToLibrary::Pressure { .. }
            | ToLibrary::Spill { .. }
            | ToLibrary::Purge { .. }
            | ToLibrary::DropCache { .. }
    )
}

/// The process that connected: a pidfd for it (the kernel's own, taken
/// at connect, or else one opened now), and its start time, read while
/// the pidfd shows it has not exited (so the pid is still its own).
fn identify(pidfd: Option<std::os::fd::OwnedFd>, pid: u32, uid: u32) -> Result<Peer, String> {
    let pidfd = pidfd
        .or_else(|| crate::procfs::pidfd_open(pid))
        .map(Arc::new);
    let exited = || {
        pidfd
            .as_ref()
            .is_some_and(|fd| crate::procfs::pidfd_exited(std::os::fd::AsFd::as_fd(fd.as_ref())))
    };
    let gone = || crate::error::AgentError::PeerGone { pid }.to_string();
    if exited() {
        return Err(gone());
    }
    let start_time =
        crate::procfs::start_time(pid).map_err(|e| format!("the peer's process {pid}: {e}"))?;
    if exited() {
        return Err(gone());
    }
    Ok(Peer {
        pid,
        pidfd,
        start_time,
        uid,
    })
}

/// A refused peer may still be writing its hello: read (and drop) a
/// little of it before closing, so it reads the refusal instead of failing
/// on a broken pipe.
async fn linger(rd: &mut UnixStream) {
    let mut sink = vec![0u8; wire::MAX_FRAME];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Reads frames until the connection ends: the hello first (answered by
/// the owner), then every message goes to the owner.
async fn converse(
    owner: &mpsc::Sender<Input>,
    rd: &mut UnixStream,
    out: &Outbound,
    session: SessionId,
    peer: Peer,
    limits: ControlConfig,
) {
    let (pid, uid) = (peer.pid, peer.uid);
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut welcomed = false;
    let hello_by = Instant::now() + Duration::from_millis(limits.hello_timeout_ms);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let reply_error = |message: String| {
        tracing::warn!(pid, uid, %message, "bad control message");
        out.send(ToLibrary::Error { message });
    };
    loop {
        let by = if welcomed {
            Instant::now() + idle
        } else {
            hello_by
        };
        match tokio::time::timeout_at(by, rd.read(&mut buf)).await {
            Err(_) => {
                reply_error(if welcomed {
                    format!(
                        "nothing heard for {} ms (control.idle_timeout_ms): disconnected",
                        limits.idle_timeout_ms
                    )
                } else {
                    format!(
                        "no hello within {} ms (control.hello_timeout_ms)",
                        limits.hello_timeout_ms
                    )
                });
                return;
            }
            Ok(Ok(0) | Err(_)) => {
                if let Err(e) = decoder.finish() {
                    reply_error(e.to_string());
                }
                return;
            }
            Ok(Ok(n)) => decoder.push(&buf[..n]),
        }
        while let Some(m) = decoder.next_message::<ToAgent>() {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    reply_error(e.to_string());
                    if !e.is_recoverable() {
                        return;
                    }
                    continue;
                }
            };
            if welcomed {
                let input = Input::Message {
                    session,
                    message: m,
                };
                if owner.send(input).await.is_err() {
                    return; // the agent is stopping
                }
                continue;
            }
            let (reply, answer) = oneshot::channel();
            let input = Input::Hello {
                session,
                peer: peer.clone(),
                out: out.clone(),
                hello: m,
                reply,
            };
            if owner.send(input).await.is_err() {
                return;
            }
            match answer.await {
                Ok(Ok(())) => welcomed = true,
                Ok(Err(e)) => {
                    reply_error(e.to_string());
                    return;
                }
                Err(_) => return,
            }
        }
    }
}
