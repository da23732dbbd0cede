//! One library connection: peer credentials checked against the
//! allow-list, then the hello, then messages until it ends. Bad frames are
//! answered with an error; only an oversized frame (the stream cannot be
//! resynchronised) or a refused hello ends the connection.

use std::{sync::Arc, time::Duration};

use nodedb_governor::control::wire::{self, Decoder, ToAgent, ToLibrary};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixStream, unix::OwnedReadHalf},
    sync::{mpsc, oneshot, watch},
};

use crate::{config::Config, owner::Input, policy::SessionId};

pub(super) async fn run(
    stream: UnixStream,
    session: SessionId,
    owner: mpsc::Sender<Input>,
    config: watch::Receiver<Arc<Config>>,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "control connection without peer credentials");
            return;
        }
    };
    let uid = cred.uid();
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<ToLibrary>();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if wr.write_all(&wire::encode(&m)).await.is_err() {
                break;
            }
        }
    });
    let refuse = |message: String| {
        tracing::warn!(uid, %message, "control connection refused");
        let _ = tx.send(ToLibrary::Error { message });
    };
    let allowed = config.borrow().uid_allowed(uid);
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    match (allowed, pid) {
        (false, _) => {
            refuse(format!(
                "uid {uid} is not allowed on the control socket (see allowed_uids in the config)"
            ));
            linger(&mut rd).await;
        }
        (true, None) => {
            refuse("the peer's pid is unknown".into());
            linger(&mut rd).await;
        }
        (true, Some(pid)) => {
            converse(&owner, &mut rd, &tx, session, pid, uid).await;
            let _ = owner.send(Input::Disconnected { session }).await;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A refused peer may still be writing its hello: read (and drop) a
/// little of it before closing, so it reads the refusal instead of failing
/// on a broken pipe.
async fn linger(rd: &mut OwnedReadHalf) {
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
    rd: &mut OwnedReadHalf,
    tx: &mpsc::UnboundedSender<ToLibrary>,
    session: SessionId,
    pid: u32,
    uid: u32,
) {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut welcomed = false;
    let reply_error = |message: String| {
        tracing::warn!(pid, uid, %message, "bad control message");
        let _ = tx.send(ToLibrary::Error { message });
    };
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if let Err(e) = decoder.finish() {
                    reply_error(e.to_string());
                }
                return;
            }
            Ok(n) => decoder.push(&buf[..n]),
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
                pid,
                uid,
                tx: tx.clone(),
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
