//! The admin socket's server: one task per connection, one reply line per
//! request line. `status` is answered from the last snapshot without
//! asking the owner; `assign` goes to the owner. A peer must be root or a
//! member of the admin group (`admin_group`), checked by its credentials
//! whatever the socket's mode says.

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::{MAX_REQUEST_BYTES, Reply, Request, RequestError, parse_request};
use crate::owner::{Input, Snapshots};

/// Who may use the admin socket besides root.
#[derive(Clone, Copy, Debug)]
pub struct Admins {
    /// The admin group's gid (`admin_group`), if one is configured.
    pub gid: Option<u32>,
}

impl Admins {
    /// The peer's uid if it may use the socket (None: root), or why not.
    /// Its gid and supplementary groups are the kernel's record of them
    /// at connect (`SO_PEERCRED`, `SO_PEERGROUPS`).
    fn admit(&self, stream: &UnixStream) -> Result<Option<u32>, String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("the peer's credentials cannot be read: {e}"))?;
        let uid = cred.uid();
        if uid == 0 {
            return Ok(None);
        }
        let refused = || match self.gid {
            Some(gid) => format!(
                "uid {uid} may not use the admin socket: it takes root or a member of the admin group (gid {gid})"
            ),
            None => format!(
                "uid {uid} may not use the admin socket: it takes root (no admin_group is configured)"
            ),
        };
        let Some(gid) = self.gid else {
            return Err(refused());
        };
        if cred.gid() == gid {
            return Ok(Some(uid));
        }
        let groups = crate::procfs::peer_groups(std::os::fd::AsFd::as_fd(stream))
            .map_err(|e| format!("{}; the peer's groups cannot be read: {e}", refused()))?;
        if groups.contains(&gid) {
            Ok(Some(uid))
        } else {
            Err(refused())
        }
    }
}

/// Accepts admin connections until the task is aborted.
pub async fn serve(
    listener: UnixListener,
    admins: Admins,
    owner: mpsc::Sender<Input>,
    snapshots: Snapshots,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                crate::faults::accepted("admin-accept");
                tokio::spawn(admitted(stream, admins, owner.clone(), snapshots.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an admin connection");
                tokio::time::sleep(crate::control::ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves the peer if it may use the socket; otherwise tells it why, in
/// one error reply, and closes.
async fn admitted(
    mut stream: UnixStream,
    admins: Admins,
    owner: mpsc::Sender<Input>,
    snapshots: Snapshots,
) {
    match admins.admit(&stream) {
        Ok(by) => connection(stream, by, owner, snapshots).await,
        Err(message) => {
            tracing::warn!(%message, "admin connection refused");
            // The peer's request is read (a line at most, a second at
            // most) before the refusal is written: one that finds the
            // connection closed under its write reads no reason.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                let mut line = Vec::new();
                let limit = MAX_REQUEST_BYTES as u64;
                let _ = BufReader::new(&mut stream)
                    .take(limit)
                    .read_until(b'\n', &mut line)
                    .await;
                let mut out = serde_json::to_vec(&Reply::Error { message }).unwrap_or_default();
                out.push(b'\n');
                let _ = stream.write_all(&out).await;
            })
            .await;
        }
    }
}

async fn connection(
    stream: UnixStream,
    by: Option<u32>,
    owner: mpsc::Sender<Input>,
    snapshots: Snapshots,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut buf = Vec::new();
        let limit = MAX_REQUEST_BYTES as u64 + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let complete = buf.last() == Some(&b'\n');
        let request = if !complete && buf.len() as u64 >= limit {
            Err(RequestError::TooLong { bytes: buf.len() })
        } else {
            std::str::from_utf8(&buf)
                .map_err(|_| RequestError::NotUtf8)
                .and_then(|line| parse_request(line.trim_end()))
        };
        let reply = match request {
            Ok(request) => answer(request, by, &owner, &snapshots).await,
            Err(e) => Reply::Error {
                message: e.to_string(),
            },
        };
        if let Reply::Error { message } = &reply {
            tracing::warn!(%message, "bad admin request");
        }
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        // An oversized request leaves the stream mid-line: answer, then
        // drop the connection.
        if write.write_all(&out).await.is_err() || !complete {
            break;
        }
    }
}

async fn answer(
    request: Request,
    by: Option<u32>,
    owner: &mpsc::Sender<Input>,
    snapshots: &Snapshots,
) -> Reply {
    let (pid, tid, engine) = match request {
        Request::Status => return Reply::Status(Box::new(snapshots.next().await.report.clone())),
        Request::Assign { pid, tid, engine } => (pid, tid, engine),
    };
    let stopping = || Reply::Error {
        message: "the agent is stopping".into(),
    };
    let (reply, answer) = oneshot::channel();
    let input = Input::Assign {
        pid,
        tid,
        engine: engine.clone(),
        by,
        reply,
    };
    if owner.send(input).await.is_err() {
        return stopping();
    }
    match answer.await {
        Ok(Ok(())) => Reply::Assigned { pid, tid, engine },
        Ok(Err(e)) => Reply::Error {
            message: e.to_string(),
        },
        Err(_) => stopping(),
    }
}
