//! The control channel spoken frame by frame, without the library: for
//! what the agent must do with frames a library would never send (and for
//! clients under another uid).

use std::{io::Read, os::unix::net::UnixStream, path::Path, time::Duration};

use nodedb_governor::control::wire::{self, Decoder, EngineDecl, ToAgent, ToLibrary, WireError};

/// Connects to the control socket at `socket`; replies wait 10 s at the
/// most.
pub fn connect(socket: &Path) -> std::io::Result<(UnixStream, Decoder)> {
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok((s, Decoder::new()))
}

/// A hello (this protocol's version) for `database`, declaring `engines`
/// (no floor, a cap of 1 GiB each), as a frame.
pub fn hello(database: &str, engines: &[&str]) -> Vec<u8> {
    wire::encode(&ToAgent::Hello {
        version: wire::VERSION,
        database: database.into(),
        engines: engines
            .iter()
            .map(|name| EngineDecl {
                name: (*name).into(),
                floor_bytes: 0,
                cap_bytes: 1 << 30,
            })
            .collect(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("reading a reply: {0}")]
    Read(#[from] std::io::Error),
    #[error("the agent closed the connection without a reply")]
    Closed,
    #[error("the agent's reply is not well formed: {0}")]
    Malformed(#[from] WireError),
}

/// Reads one reply frame from `s` (`outside` and `held_from` skipped),
/// through `d` (which keeps what came after it for the next call).
pub fn read_reply(s: &mut UnixStream, d: &mut Decoder) -> Result<ToLibrary, ReplyError> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = d.next_message::<ToLibrary>() {
            // What the database holds outside the client's books comes at
            // the agent's pace, unasked: these clients speak requests and
            // answers, and a raw client reserves nothing to correct (nor
            // reads the file the agent names for it).
            if matches!(m, Ok(ToLibrary::Outside { .. } | ToLibrary::HeldFrom(_))) {
                continue;
            }
            return Ok(m?);
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(ReplyError::Closed);
        }
        d.push(&buf[..n]);
    }
}

/// [`read_reply`] for tests: panics when no well-formed reply comes.
pub fn expect_reply(s: &mut UnixStream, d: &mut Decoder) -> ToLibrary {
    read_reply(s, d).unwrap_or_else(|e| panic!("{e}"))
}
