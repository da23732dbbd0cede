//! The control channel's wire format, shared by the library and the agent.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! JSON: one [`ToAgent`] or [`ToLibrary`] message. The first message on a
//! connection is the library's `hello` with [`VERSION`]; the agent answers
//! `welcome` or an `error` and closes. Frames longer than [`MAX_FRAME`]
//! cannot be skipped safely (the stream has no other markers), so they end
//! the connection after an error reply; a frame of the right length whose
//! JSON is bad is answered with an error and the connection goes on.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The longest frame body accepted, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// One engine as the library declares it at `hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineDecl {
    pub name: String,
    pub floor_bytes: u64,
    pub cap_bytes: u64,
}

/// What one engine holds, in the library's books.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineReport {
    pub name: String,
    pub reserved_bytes: u64,
    pub rejections: u64,
    /// The engine's jemalloc arena, when the library has one for it.
    #[serde(default)]
    pub arena_resident_bytes: Option<u64>,
    /// Bytes the engine's hot sets hold locked (not sent when 0, so an
    /// agent from before hot sets, which refuses unknown fields, still
    /// takes the report).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hot_set_bytes: u64,
}

/// A file of the database's cgroup and the keys in it whose values, summed,
/// are what it holds that the kernel cannot drop (anonymous and shared
/// memory): the agent's own figure for it (`outside`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldFrom {
    /// Absolute path of a `memory.stat`.
    pub stat: String,
    pub keys: Vec<String>,
}

/// Library to agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToAgent {
    /// First message: the protocol version, the database and its engines.
    Hello {
        version: u32,
        database: String,
        engines: Vec<EngineDecl>,
    },
    /// A thread of the sender started working for `engine`. `moved` says
    /// the library already put it in the engine's cgroup itself.
    Thread {
        tid: u32,
        engine: String,
        #[serde(default)]
        moved: bool,
    },
    /// The library's books, sent every report interval.
    Report { engines: Vec<EngineReport> },
    /// The outcome of a `spill` request.
    Spilled {
        engine: String,
        target_bytes: u64,
        freed_bytes: u64,
    },
    /// The outcome of a `purge` request: resident bytes of the engine's
    /// arena before and after.
    Purged {
        engine: String,
        before_bytes: u64,
        after_bytes: u64,
    },
    /// The outcome of a `drop_cache` request: bytes that left the page
    /// cache, and files dropped.
    CacheDropped {
        engine: String,
        target_bytes: u64,
        freed_bytes: u64,
        files: u64,
    },
}

/// Agent to library.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToLibrary {
    /// The hello was accepted. Where the library may move its own threads
    /// (a subtree delegated to its user), the engines' cgroup directories.
    Welcome {
        version: u32,
        #[serde(default)]
        engine_cgroups: Vec<(String, String)>,
    },
    /// Right after `welcome`, when the agent has the database's cgroup:
    /// where the library reads, when its room under the ceiling runs
    /// short, what the database holds that the kernel cannot drop. A
    /// message of its own, not a field of `welcome`: a library from before
    /// it, which refuses unknown fields and messages, is still welcomed
    /// and only notes this one as an error.
    HeldFrom(HeldFrom),
    /// A thread was put in its engine's cgroup (or TID map).
    ThreadPlaced { tid: u32, engine: String },
    /// The engine's budget changes (rebalancing), and the bound on its
    /// hot sets (the agent's configuration; sent only when configured, so
    /// a library from before hot sets, which refuses unknown fields, still
    /// takes its limits).
    Limits {
        engine: String,
        floor_bytes: u64,
        cap_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hot_set_bytes: Option<u64>,
    },
    /// The engine's pressure level, from the kernel's attribution.
    Pressure {
        engine: String,
        level: crate::PressureLevel,
    },
    /// Free about `target_bytes` of the engine's spillable memory.
    Spill { engine: String, target_bytes: u64 },
    /// Return the engine's idle allocator pages to the kernel.
    Purge { engine: String },
    /// Drop about `target_bytes` of the engine's cold page cache (its
    /// least recently used files first).
    DropCache { engine: String, target_bytes: u64 },
    /// What the database holds that the kernel cannot drop (anonymous and
    /// shared memory in its cgroup) and the library's books, as last
    /// reported, do not account for; and the agent's ceiling. Both are
    /// taken off the room its reservations have under its own ceiling
    /// (`MemoryGovernor::set_outside_bytes`: this, and whatever the
    /// agent's ceiling is below the library's).
    Outside { bytes: u64, ceiling_bytes: u64 },
    /// The request could not be served (or was malformed).
    Error { message: String },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What was wrong with a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The length prefix is beyond [`MAX_FRAME`]; the connection must end.
    #[error("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized { len: usize },
    /// The body is not a valid message; the next frame may still be good.
    #[error("malformed message: {reason}")]
    Malformed { reason: String },
    /// The stream ended inside a frame.
    #[error("truncated frame: {have} of {want} bytes before the end of the stream")]
    Truncated { have: usize, want: usize },
}

impl WireError {
    /// Whether the connection can go on after this error.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, WireError::Malformed { .. })
    }
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Our own messages always serialize (no maps with non-string keys).
    let body = serde_json::to_vec(message).unwrap_or_default();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Splits a byte stream into messages. Feed it what was read; take
/// messages out until it says it needs more.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Set after an oversized frame: nothing more can be decoded.
    broken: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.broken {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete message, an error for a bad frame, or None if
    /// more bytes are needed.
    pub fn next_message<T: for<'de> Deserialize<'de>>(&mut self) -> Option<Result<T, WireError>> {
        if self.broken || self.buf.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            self.broken = true;
            self.buf = Vec::new();
            return Some(Err(WireError::Oversized { len }));
        }
        if self.buf.len() < 4 + len {
            return None;
        }
        let result =
            serde_json::from_slice(&self.buf[4..4 + len]).map_err(|e| WireError::Malformed {
                reason: e.to_string(),
            });
        self.buf.drain(..4 + len);
        Some(result)
    }

    /// Call at the end of the stream: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.broken || self.buf.is_empty() {
            return Ok(());
        }
        let want = if self.buf.len() < 4 {
            4
        } else {
            4 + u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
        };
        Err(WireError::Truncated {
            have: self.buf.len(),
            want,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields hot sets added are left out when unused, so a peer from
    /// before them (which refuses unknown fields) still takes the message,
    /// and a message from such a peer still decodes.
    #[test]
    fn hot_set_fields_are_left_out_when_unused() {
        let limits = ToLibrary::Limits {
            engine: "vector".into(),
            floor_bytes: 1,
            cap_bytes: 2,
            hot_set_bytes: None,
        };
        let json = serde_json::to_string(&limits).unwrap();
        assert!(!json.contains("hot_set"), "{json}");
        let report = EngineReport {
            name: "vector".into(),
            reserved_bytes: 1,
            rejections: 0,
            arena_resident_bytes: None,
            hot_set_bytes: 0,
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(!json.contains("hot_set"), "{json}");
        let old: ToLibrary = serde_json::from_str(
            r#"{"type":"limits","engine":"vector","floor_bytes":1,"cap_bytes":2}"#,
        )
        .unwrap();
        assert_eq!(old, limits);
        let with = ToLibrary::Limits {
            engine: "vector".into(),
            floor_bytes: 1,
            cap_bytes: 2,
            hot_set_bytes: Some(5),
        };
        let back: ToLibrary = serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back, with);
    }

    #[test]
    fn frames_round_trip_split_anywhere() {
        let msgs = vec![
            ToAgent::Hello {
                version: VERSION,
                database: "db".into(),
                engines: vec![EngineDecl {
                    name: "vector".into(),
                    floor_bytes: 1,
                    cap_bytes: 2,
                }],
            },
            ToAgent::Thread {
                tid: 7,
                engine: "vector".into(),
                moved: false,
            },
        ];
        let stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
        for split in 0..stream.len() {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                d.push(part);
                while let Some(m) = d.next_message::<ToAgent>() {
                    got.push(m.unwrap());
                }
            }
            assert_eq!(got, msgs, "split at {split}");
            assert_eq!(d.finish(), Ok(()));
        }
    }

    #[test]
    fn bad_frames_are_named_and_malformed_ones_are_skipped() {
        let mut d = Decoder::new();
        let bad = b"{\"type\":\"hello\",\"version\":\"one\"}";
        d.push(&(bad.len() as u32).to_be_bytes());
        d.push(bad);
        d.push(&encode(&ToAgent::Report { engines: vec![] }));
        let e = d.next_message::<ToAgent>().unwrap().unwrap_err();
        assert!(
            e.is_recoverable() && e.to_string().contains("malformed"),
            "{e}"
        );
        assert_eq!(
            d.next_message::<ToAgent>().unwrap(),
            Ok(ToAgent::Report { engines: vec![] })
        );

        let mut d = Decoder::new();
        d.push(&((MAX_FRAME + 1) as u32).to_be_bytes());
        let e = d.next_message::<ToAgent>().unwrap().unwrap_err();
        assert_eq!(e, WireError::Oversized { len: MAX_FRAME + 1 });
        assert!(!e.is_recoverable());
        d.push(&encode(&ToAgent::Report { engines: vec![] }));
        assert!(
            d.next_message::<ToAgent>().is_none(),
            "nothing after an oversized frame"
        );

        let mut d = Decoder::new();
        d.push(&encode(&ToAgent::Report { engines: vec![] })[..5]);
        assert!(d.next_message::<ToAgent>().is_none());
        assert!(matches!(
            d.finish(),
            Err(WireError::Truncated { have: 5, .. })
        ));
    }
}
