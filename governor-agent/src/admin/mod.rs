//! The agent's admin socket: newline-delimited JSON requests and replies.
//! It serves `status` (the snapshot of the last tick) and `assign` (moving
//! a thread into an engine by hand; libraries do it over the control
//! channel). The socket is created 0660 (given to `admin_group` if one is
//! configured), and the server admits root and that group's members by
//! their credentials, whatever the mode. This module is the protocol and the client's call;
//! [`server`] is the agent's side.

pub mod server;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::status::StatusReport;

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Assign { pid: u32, tid: u32, engine: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Reply {
    Status(Box<StatusReport>),
    Assigned { pid: u32, tid: u32, engine: String },
    Error { message: String },
}

/// Sends one request to the agent at `socket` and waits for the reply.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Reply> {
    use anyhow::Context as _;
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is `nodedb-governor run` running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("reading the agent's reply")?;
    serde_json::from_str(&reply).with_context(|| format!("bad reply from the agent: {reply:?}"))
}

/// What is wrong with a request line.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request of {bytes} bytes exceeds {MAX_REQUEST_BYTES}")]
    TooLong { bytes: usize },
    #[error("request is not UTF-8")]
    NotUtf8,
    #[error("malformed request: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Parses one request line, naming what is wrong.
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLong { bytes: line.len() });
    }
    Ok(serde_json::from_str(line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_named() {
        let r = parse_request(r#"{"op":"assign","pid":1,"tid":2,"engine":"vector"}"#).unwrap();
        assert_eq!(
            r,
            Request::Assign {
                pid: 1,
                tid: 2,
                engine: "vector".into()
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"status"}"#).unwrap(),
            Request::Status
        );
        let e = parse_request(r#"{"op":"assign","pid":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("malformed"), "{e}");
        let e = parse_request(r#"{"op":"explode"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("explode"), "{e}");
        let big = "x".repeat(MAX_REQUEST_BYTES + 1);
        assert!(
            parse_request(&big)
                .unwrap_err()
                .to_string()
                .contains("exceeds")
        );
    }
}
