//! The agent's sessions as a state machine, against arbitrary sequences:
//! several libraries' byte streams, cut anywhere, decoded as the agent's
//! sessions decode them; a first message checked as a hello (the agent's
//! own check), then every message the owner hands to the policy, with
//! disconnects, ticks over arbitrary readings and ceilings, and reloads in
//! between. Whatever comes, nothing panics (overflow included: fuzz builds
//! check it), and what the policy asks for holds:
//!
//! - it speaks only to sessions it was told of and that have not left,
//!   and to each only of engines that library declared;
//! - limits never exceed the ceiling (floor at most cap), a spill asks
//!   for something and at most what the engine was ever seen to hold (by
//!   the kernel's figure or its own books), the high mark stays under the
//!   ceiling;
//! - a library that left is forgotten, and its status can be read at any
//!   time.
#![no_main]

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nodedb_governor::control::wire::{self, Decoder, ToAgent, ToLibrary, WireError};
use nodedb_governor_agent::{
    attribution::{Attributed, ProcessAttribution, Reading},
    config::Config,
    policy::{self, Action, CeilingUse, Policy, Rules, Tick},
};

const DATABASE: &str = "fuzzed";
const ENGINES: [&str; 3] = ["vector", "timeseries", "query"];
const MIB: u64 = 1 << 20;

#[derive(Arbitrary, Debug)]
enum Step {
    /// Bytes arriving on session `session % 4`: raw, or a message framed.
    Bytes {
        session: u8,
        bytes: Vec<u8>,
    },
    Message {
        session: u8,
        message: Message,
    },
    Disconnect {
        session: u8,
    },
    Tick {
        /// Per session and engine, resident bytes in MiB.
        resident: Vec<(u8, u8, u16)>,
        charge_mib: Option<u16>,
        psi_events: Option<u8>,
        after_ms: u16,
        /// A reaction to session `crossed % 4`'s process crossing a mark
        /// (its library alone) instead of a whole tick.
        crossed: Option<u8>,
    },
    Reload {
        ceiling_mib: u16,
        lend: bool,
    },
}

/// Messages built to pass the decoder, so that the fuzzer reaches the
/// policy quickly.
#[derive(Arbitrary, Debug)]
enum Message {
    Hello { database_ok: bool, engines: Vec<u8> },
    Report { engines: Vec<(u8, u64, u64, u64)> },
    Spilled { engine: u8, target: u64, freed: u64 },
    CacheDropped { engine: u8, target: u64, freed: u64 },
}

fn engine(i: u8) -> String {
    // Mostly configured engines, now and then one that is not.
    ENGINES
        .get(i as usize % 4)
        .map_or("gpu".to_owned(), |e| (*e).to_owned())
}

fn config(ceiling_mib: u16, lend: bool) -> Config {
    let ceiling = u64::from(ceiling_mib.max(16)) * MIB;
    let floor = if lend { "" } else { "floor = \"30%\"\n" };
    let engines: String = ENGINES
        .iter()
        .map(|e| format!("[[engine]]\nname = \"{e}\"\nbudget = \"30%\"\n{floor}"))
        .collect();
    Config::parse(&format!(
        "database = \"{DATABASE}\"\nceiling = {ceiling}\n{engines}"
    ))
    .expect("the fuzz target's configuration")
}

struct Session {
    decoder: Decoder,
    /// The engines it declared, once welcomed.
    welcomed: Option<Vec<String>>,
    closed: bool,
}

struct World {
    policy: Policy,
    rules: Rules,
    sessions: BTreeMap<u64, Session>,
    now: Instant,
    /// The most each session's engine was seen to hold (read or reported).
    held: BTreeMap<(u64, String), u64>,
}

impl World {
    fn check(&self, actions: &[Action]) {
        let ceiling = self.rules.ceiling_bytes;
        for a in actions {
            match a {
                Action::Send { session, message } => {
                    let declared = self
                        .sessions
                        .get(session)
                        .and_then(|s| s.welcomed.as_ref())
                        .unwrap_or_else(|| panic!("a message to session {session}, never welcomed or gone: {message:?}"));
                    assert!(
                        self.policy.library(*session).is_some(),
                        "a message to session {session}, which the policy forgot"
                    );
                    let named = match message {
                        ToLibrary::Limits {
                            engine,
                            floor_bytes,
                            cap_bytes,
                            ..
                        } => {
                            assert!(floor_bytes <= cap_bytes, "{message:?}");
                            assert!(*cap_bytes <= ceiling, "{message:?} over {ceiling}");
                            Some(engine)
                        }
                        ToLibrary::Spill {
                            engine,
                            target_bytes,
                        } => {
                            let held = self
                                .held
                                .get(&(*session, engine.clone()))
                                .copied()
                                .unwrap_or(0);
                            assert!(
                                *target_bytes > 0 && *target_bytes <= held,
                                "{message:?}, the engine seen holding {held} at most"
                            );
                            Some(engine)
                        }
                        ToLibrary::DropCache { engine, .. }
                        | ToLibrary::Pressure { engine, .. }
                        | ToLibrary::Purge { engine } => Some(engine),
                        _ => None,
                    };
                    if let Some(e) = named {
                        assert!(
                            declared.contains(e),
                            "{message:?} to a library that declared {declared:?}"
                        );
                    }
                }
                Action::SetHighMark(Some(b)) => {
                    assert!(*b <= ceiling, "high mark {b} over {ceiling}")
                }
                _ => {}
            }
        }
        for (id, s) in &self.sessions {
            let live = s.welcomed.is_some() && !s.closed;
            assert_eq!(self.policy.library(*id).is_some(), live, "session {id}");
            if let Some(l) = self.policy.library(*id) {
                let _ = l.status(&self.rules);
            }
        }
    }

    fn session(&mut self, i: u8) -> (u64, &mut Session) {
        let id = u64::from(i % 4) + 1;
        let s = self.sessions.entry(id).or_insert_with(|| Session {
            decoder: Decoder::new(),
            welcomed: None,
            closed: false,
        });
        (id, s)
    }

    fn bytes(&mut self, i: u8, bytes: &[u8]) {
        let (id, s) = self.session(i);
        if s.closed {
            return;
        }
        s.decoder.push(bytes);
        let mut messages = Vec::new();
        while let Some(m) = s.decoder.next_message::<ToAgent>() {
            match m {
                Ok(m) => messages.push(m),
                Err(WireError::Oversized { .. }) => {
                    messages.clear();
                    s.closed = true;
                    break;
                }
                Err(_) => {}
            }
        }
        if s.closed {
            let actions = self.policy.disconnect(id);
            self.check(&actions);
            return;
        }
        for m in messages {
            self.message(id, m);
        }
    }

    /// As the owner: the first message must be a hello; then each goes to
    /// the policy (a second hello is an error, threads need the kernel).
    fn message(&mut self, id: u64, m: ToAgent) {
        let s = self.sessions.get_mut(&id).expect("a session");
        if s.closed {
            return;
        }
        let actions = match &s.welcomed {
            None => {
                let known: Vec<String> = ENGINES.map(String::from).to_vec();
                match policy::check_hello(DATABASE, &known, m) {
                    Ok(declared) => {
                        s.welcomed = Some(declared.clone());
                        self.policy.connect(id, 1000 + id as u32, 0, &declared)
                    }
                    Err(_) => {
                        s.closed = true;
                        Vec::new()
                    }
                }
            }
            Some(_) => match m {
                ToAgent::Report { engines } => {
                    for e in &engines {
                        let held = self.held.entry((id, e.name.clone())).or_default();
                        *held = (*held).max(e.reserved_bytes);
                    }
                    self.policy.on_report(id, engines, self.now)
                }
                ToAgent::Spilled {
                    engine,
                    target_bytes,
                    freed_bytes,
                } => {
                    self.policy
                        .on_spilled(id, &engine, target_bytes, freed_bytes);
                    Vec::new()
                }
                ToAgent::CacheDropped {
                    engine,
                    target_bytes,
                    freed_bytes,
                    ..
                } => {
                    self.policy
                        .on_cache_dropped(id, &engine, target_bytes, freed_bytes);
                    Vec::new()
                }
                _ => Vec::new(),
            },
        };
        self.check(&actions);
    }

    fn tick(
        &mut self,
        resident: &[(u8, u8, u16)],
        charge: Option<u16>,
        psi: Option<u8>,
        crossed: Option<u8>,
    ) {
        let mut processes: BTreeMap<u64, ProcessAttribution> = BTreeMap::new();
        for (s, e, mib) in resident {
            let id = u64::from(s % 4) + 1;
            let p = processes.entry(id).or_insert_with(|| ProcessAttribution {
                pid: 1000 + id as u32,
                ..Default::default()
            });
            let held = self.held.entry((id, engine(*e))).or_default();
            *held = (*held).max(u64::from(*mib) * MIB);
            p.engines.insert(
                engine(*e),
                Attributed {
                    resident_bytes: u64::from(*mib) * MIB,
                    anon_bytes: u64::from(*mib) * MIB,
                    ..Default::default()
                },
            );
        }
        let reading = Reading {
            processes: processes.into_values().collect(),
        };
        let limit = self.rules.ceiling_bytes;
        let t = Tick {
            now: self.now,
            reading: Some(&reading),
            ceiling: charge.map(|c| CeilingUse {
                working_set_bytes: u64::from(c) * MIB,
                charge_bytes: u64::from(c) * MIB,
                held_bytes: u64::from(c) * MIB,
                limit_bytes: limit,
                // Half the charges as under cgroup v2 (a high mark at the
                // Critical threshold), half as under v1 (none).
                throttle_bytes: (c % 2 == 0).then_some((limit as f64 * 0.9) as u64),
            }),
            psi: psi.map(|n| (u64::from(n), Duration::from_secs(2))),
        };
        let actions = match crossed {
            Some(s) => {
                let pid = 1000 + u32::from(s % 4) + 1;
                let actions = self.policy.react(&t, &[pid]);
                // Only that process's libraries hear of the ladder (the
                // Emergency's backpressure aside, which is everyone's).
                let others_sent = actions.iter().any(|a| {
                    matches!(a, Action::Send { session, message }
                        if 1000 + *session as u32 != pid
                            && !matches!(message, ToLibrary::Limits { .. }))
                });
                assert!(
                    !others_sent,
                    "a reaction for {pid} reached another process: {actions:?}"
                );
                actions
            }
            None => self.policy.tick(&t),
        };
        self.check(&actions);
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let rules = Rules::from_config(&config(1024, true));
    let mut w = World {
        policy: Policy::new(rules.clone()),
        rules,
        sessions: BTreeMap::new(),
        now: Instant::now(),
        held: BTreeMap::new(),
    };
    for step in steps.into_iter().take(256) {
        match step {
            Step::Bytes { session, bytes } => w.bytes(session, &bytes),
            Step::Message { session, message } => {
                let m = match message {
                    Message::Hello {
                        database_ok,
                        engines,
                    } => ToAgent::Hello {
                        version: wire::VERSION,
                        database: if database_ok { DATABASE } else { "other" }.into(),
                        engines: engines
                            .into_iter()
                            .take(4)
                            .map(|e| wire::EngineDecl {
                                name: engine(e),
                                floor_bytes: 0,
                                cap_bytes: 1 << 30,
                            })
                            .collect(),
                    },
                    Message::Report { engines } => ToAgent::Report {
                        engines: engines
                            .into_iter()
                            .take(4)
                            .map(|(e, reserved, rejections, hot)| wire::EngineReport {
                                name: engine(e),
                                reserved_bytes: reserved,
                                rejections,
                                arena_resident_bytes: None,
                                hot_set_bytes: hot,
                            })
                            .collect(),
                    },
                    Message::Spilled {
                        engine: e,
                        target,
                        freed,
                    } => ToAgent::Spilled {
                        engine: engine(e),
                        target_bytes: target,
                        freed_bytes: freed,
                    },
                    Message::CacheDropped {
                        engine: e,
                        target,
                        freed,
                    } => ToAgent::CacheDropped {
                        engine: engine(e),
                        target_bytes: target,
                        freed_bytes: freed,
                        files: 1,
                    },
                };
                w.bytes(session, &wire::encode(&m));
            }
            Step::Disconnect { session } => {
                let (id, s) = w.session(session);
                s.closed = true;
                let actions = w.policy.disconnect(id);
                w.check(&actions);
            }
            Step::Tick {
                resident,
                charge_mib,
                psi_events,
                after_ms,
                crossed,
            } => {
                w.now += Duration::from_millis(u64::from(after_ms));
                w.tick(&resident, charge_mib, psi_events, crossed);
            }
            Step::Reload { ceiling_mib, lend } => {
                let rules = Rules::from_config(&config(ceiling_mib, lend));
                w.rules = rules.clone();
                let actions = w.policy.reload(rules);
                w.check(&actions);
            }
        }
    }
});
