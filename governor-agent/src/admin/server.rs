//! The admin socket's server: one task per connection, one reply line per
//! request line. `status` is answered from the last snapshot without
//! asking the owner; `assign` goes to the owner.

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::{MAX_REQUEST_BYTES, Reply, Request, RequestError, parse_request};
use crate::owner::{Input, Snapshots};

/// Accepts admin connections until the task is aborted.
pub async fn serve(listener: UnixListener, owner: mpsc::Sender<Input>, snapshots: Snapshots) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                crate::faults::accepted("admin-accept");
                tokio::spawn(connection(stream, owner.clone(), snapshots.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an admin connection");
                tokio::time::sleep(crate::control::ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, owner: mpsc::Sender<Input>, snapshots: Snapshots) {
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
            Ok(request) => answer(request, &owner, &snapshots).await,
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

async fn answer(request: Request, owner: &mpsc::Sender<Input>, snapshots: &Snapshots) -> Reply {
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
