//! The policy's rules, table by table: every rung of the ladder, every loan
//! transition, the cap correction, PSI, the database's Emergency and its
//! backpressure, observe mode and reload. No root, no kernel: the inputs are
//! figures, the outputs are actions.

use std::time::{Duration, Instant};

use nodedb_governor::{
    PressureLevel::{self, *},
    control::wire::{EngineReport, ToLibrary},
    lending::Loan,
};

use super::*;
use crate::attribution::{Attributed, ProcessAttribution, Reading};

const MIB: u64 = 1 << 20;
const PID: u32 = 7;
const S: SessionId = 1;

/// vector: 256 MiB, essential; query: 256 MiB with a 64 MiB floor, not
/// essential. Ceiling 1 GiB. Default thresholds (75/90/97%, restore 75%).
fn rules(enforce: bool) -> Rules {
    let config = Config::parse(&format!(
        "database = \"t\"\nceiling = \"1GiB\"\nenforce = {enforce}\n\
         [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\n\
         [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\nfloor = \"64MiB\"\nessential = false\n",
    ))
    .unwrap();
    Rules::from_config(&config)
}

/// A policy with one library, declaring `engines`, at a clock of its own.
struct World {
    policy: Policy,
    now: Instant,
    /// The marks the last tick armed (or disarmed: None), kept apart from
    /// what the library is told.
    marks: Vec<(String, Option<u64>)>,
}

/// What a library was told, in a form a table can spell.
#[derive(Clone, Debug, PartialEq)]
enum Msg {
    Pressure(&'static str, PressureLevel),
    Purge(&'static str),
    Spill(&'static str, u64),
    Limits(&'static str, u64, u64),
    High(Option<u64>),
}

fn name(engine: &str) -> &'static str {
    match engine {
        "vector" => "vector",
        "query" => "query",
        "timeseries" => "timeseries",
        other => panic!("unexpected engine {other}"),
    }
}

/// What the library was told, but the database's held memory (`held`:
/// its own test, `memory_outside_the_books_is_sent_first_then_as_it_moves_a_step`).
fn msgs(actions: Vec<Action>) -> Vec<Msg> {
    actions
        .into_iter()
        .filter(|a| {
            !matches!(
                a,
                Action::Send {
                    message: ToLibrary::Outside { .. },
                    ..
                }
            )
        })
        .map(|a| match a {
            Action::Send { session, message } => {
                assert_eq!(session, S);
                match message {
                    ToLibrary::Pressure { engine, level } => Msg::Pressure(name(&engine), level),
                    ToLibrary::Purge { engine } => Msg::Purge(name(&engine)),
                    ToLibrary::Spill {
                        engine,
                        target_bytes,
                    } => Msg::Spill(name(&engine), target_bytes),
                    ToLibrary::Limits {
                        engine,
                        floor_bytes,
                        cap_bytes,
                        ..
                    } => Msg::Limits(name(&engine), floor_bytes, cap_bytes),
                    other => panic!("the policy does not send {other:?}"),
                }
            }
            Action::SetHighMark(h) => Msg::High(h),
            other => panic!("no hot sets are configured here: {other:?}"),
        })
        .collect()
}

fn reading(resident: &[(&str, u64)]) -> Reading {
    Reading {
        processes: vec![ProcessAttribution {
            pid: PID,
            engines: resident
                .iter()
                .map(|(n, r)| {
                    (
                        (*n).to_owned(),
                        Attributed {
                            resident_bytes: *r,
                            ..Attributed::default()
                        },
                    )
                })
                .collect(),
            ..ProcessAttribution::default()
        }],
    }
}

/// The database cgroup of a 1 GiB ceiling with `used` MiB charged, all of
/// it in the working set.
fn cgroup(used: u64) -> Option<CeilingUse> {
    Some(CeilingUse {
        working_set_bytes: used * MIB,
        charge_bytes: used * MIB,
        held_bytes: used * MIB,
        limit_bytes: 1024 * MIB,
        throttle_bytes: None,
    })
}

impl World {
    fn new(engines: &[&str], enforce: bool) -> (Self, Vec<Msg>) {
        Self::with_rules(rules(enforce), engines)
    }

    fn with_rules(rules: Rules, engines: &[&str]) -> (Self, Vec<Msg>) {
        let mut policy = Policy::new(rules);
        let declared: Vec<String> = engines.iter().map(|e| (*e).to_owned()).collect();
        let welcome = msgs(policy.connect(S, PID, 0, &declared));
        (
            Self {
                policy,
                now: Instant::now(),
                marks: Vec::new(),
            },
            welcome,
        )
    }

    fn after(&mut self, ms: u64) -> &mut Self {
        self.now += Duration::from_millis(ms);
        self
    }

    fn tick(&mut self, resident: &[(&str, u64)]) -> Vec<Msg> {
        self.tick_with(resident, None, None)
    }

    fn tick_with(
        &mut self,
        resident: &[(&str, u64)],
        ceiling: Option<CeilingUse>,
        psi_events: Option<u64>,
    ) -> Vec<Msg> {
        self.tick_on(&reading(resident), ceiling, psi_events)
    }

    fn tick_on(
        &mut self,
        r: &Reading,
        ceiling: Option<CeilingUse>,
        psi_events: Option<u64>,
    ) -> Vec<Msg> {
        let (marks, actions): (Vec<Action>, Vec<Action>) = self
            .policy
            .tick(&Tick {
                now: self.now,
                reading: Some(r),
                ceiling,
                psi: psi_events.map(|n| (n, Duration::from_secs(2))),
            })
            .into_iter()
            .partition(|a| matches!(a, Action::Mark { .. }));
        self.marks = marks
            .into_iter()
            .filter_map(|a| match a {
                Action::Mark { pid, engine, bytes } => {
                    assert_eq!(pid, PID);
                    Some((engine, bytes))
                }
                _ => None,
            })
            .collect();
        msgs(actions)
    }

    fn report(&mut self, engine: &str, reserved: u64, rejections: u64) -> Vec<Msg> {
        msgs(self.policy.on_report(
            S,
            vec![EngineReport {
                name: engine.into(),
                reserved_bytes: reserved,
                rejections,
                arena_resident_bytes: None,
                hot_set_bytes: 0,
            }],
            self.now,
        ))
    }

    fn status(&self) -> LibraryStatus {
        self.policy.library(S).unwrap().status(self.policy.rules())
    }
}

#[test]
fn the_welcome_sends_every_declared_engine_its_configured_limits() {
    let (_, welcome) = World::new(&["vector", "query"], true);
    assert_eq!(
        welcome,
        [
            Msg::Limits("vector", 0, 256 * MIB),
            Msg::Limits("query", 64 * MIB, 256 * MIB)
        ]
    );
    let (_, welcome) = World::new(&["query"], true);
    assert_eq!(welcome, [Msg::Limits("query", 64 * MIB, 256 * MIB)]);
}

/// Every rung: one engine (no one to borrow from), first at `from`, then,
/// `ms` later, at `to` (with a PSI event at that tick when `stall`).
#[test]
fn every_rung_of_the_ladder() {
    use Msg::*;
    // Budget 256 MiB: Warning from 192, Critical from 230.4, Emergency
    // from 248.3; a spill's goal is 192.
    #[rustfmt::skip]
    type Row = (&'static str, u64, u64, u64, bool, &'static [Msg]);
    let table: &[Row] = &[
        ("normal stays normal", 100, 110, 20, false, &[]),
        (
            "normal to warning: purge",
            100,
            200,
            20,
            false,
            &[Pressure("vector", Warning), Purge("vector")],
        ),
        (
            "warning to critical: spill down to 75%",
            200,
            240,
            20,
            false,
            &[Pressure("vector", Critical), Spill("vector", 48 * MIB)],
        ),
        (
            "normal straight to critical: purge and spill",
            0,
            240,
            20,
            false,
            &[
                Pressure("vector", Critical),
                Purge("vector"),
                Spill("vector", 48 * MIB),
            ],
        ),
        (
            "critical to emergency: the spill is still pending",
            240,
            250,
            20,
            false,
            &[Pressure("vector", Emergency)],
        ),
        (
            "critical, pending spill not answered within 250 ms",
            240,
            240,
            100,
            false,
            &[],
        ),
        (
            "critical, pending spill 250 ms old: again",
            240,
            240,
            250,
            false,
            &[Spill("vector", 48 * MIB)],
        ),
        (
            "emergency to critical: no purge",
            250,
            240,
            20,
            false,
            &[Pressure("vector", Critical)],
        ),
        (
            "critical to warning",
            240,
            200,
            20,
            false,
            &[Pressure("vector", Warning)],
        ),
        (
            "warning to normal",
            200,
            100,
            20,
            false,
            &[Pressure("vector", Normal)],
        ),
        (
            "a stall purges every engine and spills from warning",
            100,
            200,
            20,
            true,
            &[
                Purge("vector"),
                Pressure("vector", Warning),
                Purge("vector"),
                Spill("vector", 8 * MIB),
            ],
        ),
        (
            "a stall at normal purges only",
            100,
            100,
            20,
            true,
            &[Purge("vector")],
        ),
    ];
    for (what, from, to, ms, stall, want) in table {
        let (mut w, _) = World::new(&["vector"], true);
        w.tick(&[("vector", from * MIB)]);
        let got = w
            .after(*ms)
            .tick_with(&[("vector", to * MIB)], None, stall.then_some(1));
        assert_eq!(&got, want, "{what}");
        let level = w.status().engines["vector"].level;
        assert_eq!(
            level,
            Some(rules(true).thresholds.level(to * MIB, 256 * MIB)),
            "{what}"
        );
    }
}

#[test]
fn an_answered_spill_is_asked_again_at_the_next_tick_while_still_critical_unless_it_freed_nothing()
{
    let (mut w, _) = World::new(&["vector"], true);
    w.tick(&[("vector", 240 * MIB)]);
    w.policy.on_spilled(S, "vector", 48 * MIB, 20 * MIB);
    let got = w.after(20).tick(&[("vector", 235 * MIB)]);
    assert_eq!(got, [Msg::Spill("vector", 43 * MIB)]);
    let e = &w.status().engines["vector"];
    assert_eq!((e.spill_requests, e.spilled_bytes), (2, 20 * MIB));
    // An answer that freed nothing (no spill handler, a full spill
    // target): not asked again until the request is SPILL_RETRY old.
    w.policy.on_spilled(S, "vector", 43 * MIB, 0);
    assert_eq!(w.after(20).tick(&[("vector", 235 * MIB)]), []);
    assert_eq!(w.after(200).tick(&[("vector", 235 * MIB)]), []);
    assert_eq!(
        w.after(30).tick(&[("vector", 235 * MIB)]),
        [Msg::Spill("vector", 43 * MIB)]
    );
    assert_eq!(w.status().engines["vector"].spill_requests, 3);
    // An answer for an engine it did not declare changes nothing.
    w.policy.on_spilled(S, "query", 1, 1 << 40);
    assert_eq!(w.status().engines["vector"].spilled_bytes, 20 * MIB);
    assert!(!w.status().engines.contains_key("query"));
}

/// A connected library that does nothing costs a tick next to nothing:
/// while it is calm and its engines' figures do not move, its round is
/// skipped; a moved figure, a report or a crossing is acted on at the
/// very next tick.
#[test]
fn a_calm_library_whose_figures_did_not_move_is_skipped_and_nothing_is_missed() {
    let (mut w, _) = World::new(&["vector"], true);
    let skipped = |w: &World| w.status().unchanged_ticks;
    assert_eq!(w.tick(&[("vector", 100 * MIB)]), []);
    assert_eq!(w.after(20).tick(&[("vector", 100 * MIB)]), []);
    assert_eq!(w.after(20).tick(&[("vector", 100 * MIB)]), []);
    assert_eq!(skipped(&w), 2, "the same figures at a calm tick: skipped");
    // A figure that moved: the ladder runs at once.
    assert_eq!(
        w.after(20).tick(&[("vector", 240 * MIB)]),
        [
            Msg::Pressure("vector", Critical),
            Msg::Purge("vector"),
            Msg::Spill("vector", 48 * MIB)
        ]
    );
    assert_eq!(skipped(&w), 2);
    // Calm again and skipped again...
    w.policy.on_spilled(S, "vector", 48 * MIB, 140 * MIB);
    assert_eq!(
        w.after(20).tick(&[("vector", 100 * MIB)]),
        [Msg::Pressure("vector", Normal)]
    );
    assert_eq!(w.after(20).tick(&[("vector", 100 * MIB)]), []);
    assert_eq!(skipped(&w), 3);
    // ... until the library reports: 10 MiB reserved of the 100 the kernel
    // counts, so its cap comes down by the 90 it does not know of, at the
    // next tick although the figures did not move.
    w.report("vector", 10 * MIB, 0);
    let got = w.after(20).tick(&[("vector", 100 * MIB)]);
    assert!(
        matches!(&got[..], [Msg::Limits("vector", _, cap)] if *cap < 256 * MIB - 80 * MIB),
        "{got:?}"
    );
    assert_eq!(skipped(&w), 3);
}

/// A refusal's log line names the process's largest holders: by what the
/// kernel counts or the library reserved, whichever is more.
#[test]
fn a_refusal_is_logged_with_the_largest_holders() {
    let (mut w, _) = World::new(&["vector", "query"], true);
    w.tick(&[("vector", 100 * MIB), ("query", 20 * MIB)]);
    w.report("query", 150 * MIB, 1);
    assert_eq!(
        w.policy.library(S).unwrap().largest_holders(),
        "query 20.0 MiB resident, 150.0 MiB reserved; vector 100.0 MiB resident, 0.0 MiB reserved"
    );
}

/// The library's answer can sit behind a busy socket; the kernel's figure
/// cannot. An engine that fell below Critical after a request carried it
/// out: crossing Critical again is answered with a spill at once, not
/// when the answer arrives or the request is `spill_retry` old.
#[test]
fn a_spill_the_kernel_saw_carried_out_does_not_hold_up_the_next() {
    let (mut w, _) = World::new(&["vector"], true);
    assert_eq!(
        w.tick(&[("vector", 240 * MIB)]),
        [
            Msg::Pressure("vector", Critical),
            Msg::Purge("vector"),
            Msg::Spill("vector", 48 * MIB)
        ]
    );
    // Unanswered, but the engine came down to Warning...
    assert_eq!(
        w.after(20).tick(&[("vector", 200 * MIB)]),
        [Msg::Pressure("vector", Warning)]
    );
    // ... and crossed Critical again 20 ms later.
    assert_eq!(
        w.after(20).tick(&[("vector", 240 * MIB)]),
        [
            Msg::Pressure("vector", Critical),
            Msg::Spill("vector", 48 * MIB)
        ]
    );
    // Still Critical and unanswered: not again before spill_retry.
    assert_eq!(w.after(20).tick(&[("vector", 240 * MIB)]), []);
    assert_eq!(w.status().engines["vector"].spill_requests, 2);
}

#[test]
fn a_stall_spills_from_warning_for_one_window_only() {
    let (mut w, _) = World::new(&["vector"], true);
    w.tick_with(&[("vector", 200 * MIB)], None, Some(1));
    // The same event count is no new stall, but within its 2 s window
    // warning still spills (once the last request is 250 ms old).
    let got = w
        .after(300)
        .tick_with(&[("vector", 200 * MIB)], None, Some(1));
    assert_eq!(got, [Msg::Spill("vector", 8 * MIB)]);
    let got = w
        .after(2000)
        .tick_with(&[("vector", 200 * MIB)], None, Some(1));
    assert_eq!(got, [], "the window is over");
}

/// Loans: who lends, how much, and every way a loan ends.
#[test]
fn every_loan_transition() {
    use Msg::*;
    let (mut w, _) = World::new(&["vector", "query"], true);
    // Query busy at Critical, vector idle (first seen: quiet): vector keeps
    // 10 + 64 MiB (a quarter of its budget) and lends the rest.
    let got = w.tick(&[("vector", 10 * MIB), ("query", 240 * MIB)]);
    assert_eq!(
        &got[..2],
        [
            Limits("vector", 0, 74 * MIB),
            Limits("query", 64 * MIB, 438 * MIB)
        ],
        "{got:?}"
    );
    // With 438 MiB in force, query is Normal (55%), not Critical.
    assert_eq!(&got[2..], []);
    assert_eq!(
        w.status().loans,
        [Loan {
            lender: "vector".to_owned(),
            borrower: "query".to_owned(),
            bytes: 182 * MIB
        }]
    );
    // The lender flickers to Warning of its reduced budget (56 of 74
    // MiB): the loan is young and the rise not sustained; nothing is taken
    // back, and the lender's arena is purged.
    let got = w
        .after(20)
        .tick(&[("vector", 56 * MIB), ("query", 300 * MIB)]);
    assert_eq!(got, [Pressure("vector", Warning), Purge("vector")]);
    assert_eq!(w.status().loans[0].bytes, 182 * MIB);
    // At Critical (70 of 74 MiB) it would be spilled itself: it takes
    // back at once what it needs (70 + 64 MiB), not the whole loan, and
    // the borrower, at 79% of 378 MiB, need not spill.
    let got = w
        .after(20)
        .tick(&[("vector", 70 * MIB), ("query", 300 * MIB)]);
    assert_eq!(
        got,
        [
            Limits("vector", 0, 134 * MIB),
            Limits("query", 64 * MIB, 378 * MIB),
            Pressure("vector", Normal),
            Pressure("query", Warning),
            Purge("query"),
        ]
    );
    assert_eq!(w.status().loans[0].bytes, 122 * MIB);
    // A rise to Warning (110 of 134 MiB) held for 2 s, the loan's least
    // term: then it takes back what it needs (110 + 64 MiB), and the
    // borrower, at 330 of 338 MiB, is spilled: a forced spill, counted.
    // Its arena was purged 40 ms ago: not again (`PURGE_SPACING`).
    let got = w
        .after(20)
        .tick(&[("vector", 110 * MIB), ("query", 330 * MIB)]);
    assert_eq!(got, [Pressure("vector", Warning)]);
    for _ in 0..19 {
        let got = w
            .after(100)
            .tick(&[("vector", 110 * MIB), ("query", 330 * MIB)]);
        assert_eq!(got, [], "the loan is younger than 2 s");
    }
    let got = w
        .after(40)
        .tick(&[("vector", 110 * MIB), ("query", 330 * MIB)]);
    assert_eq!(
        got,
        [
            Limits("vector", 0, 174 * MIB),
            Limits("query", 64 * MIB, 338 * MIB),
            Pressure("vector", Normal),
            Pressure("query", Emergency),
            Spill("query", 330 * MIB - 338 * MIB * 3 / 4),
        ]
    );
    let engines = w.status().engines;
    assert_eq!(engines["query"].forced_spills, 1);
    assert_eq!(engines["vector"].forced_spills, 0);
    let got = w.after(20).tick(&[("vector", 0), ("query", 250 * MIB)]);
    assert_eq!(got, [Pressure("query", Normal)], "{got:?}");
    // A lender refused a reservation takes its loan back at once, before
    // any tick.
    assert_eq!(w.report("vector", 0, 0), []);
    assert_eq!(
        w.report("vector", 60 * MIB, 1),
        [
            Limits("vector", 0, 256 * MIB),
            Limits("query", 64 * MIB, 256 * MIB)
        ]
    );
    // 500 ms on it lends again, keeping room for the 60 MiB it reserved
    // (not yet resident) besides its cushion; a borrower's refusals end
    // nothing.
    let got = w.after(600).tick(&[("vector", 0), ("query", 240 * MIB)]);
    assert_eq!(
        &got[..2],
        [
            Limits("vector", 0, 124 * MIB),
            Limits("query", 64 * MIB, 388 * MIB)
        ]
    );
    assert_eq!(w.report("query", 10 * MIB, 5), []);
    assert_eq!(w.status().loans.len(), 1);
}

/// A round that lends to an engine and corrects its cap for what it holds
/// unreserved sends it one `limits`, the last.
#[test]
fn a_round_sends_an_engine_one_limits_with_its_loan_and_its_correction() {
    use Msg::*;
    let (mut w, _) = World::new(&["vector", "query"], true);
    // Query has reserved 200 MiB and the kernel sees 240: 40 MiB beyond
    // its books, taken off its cap.
    w.report("query", 200 * MIB, 0);
    let got = w.tick(&[("vector", 10 * MIB), ("query", 240 * MIB)]);
    // The 438 MiB in force less the 40 MiB in whole steps of a 64th of it.
    let cap = 438 * MIB - 6 * (438 * MIB / 64);
    let limits: Vec<&Msg> = got.iter().filter(|m| matches!(m, Limits(..))).collect();
    assert_eq!(
        limits,
        [
            &Limits("vector", 0, 74 * MIB),
            &Limits("query", 64 * MIB, cap)
        ],
        "{got:?}"
    );
    assert_eq!(
        w.status().engines["query"].limit_changes,
        2,
        "the welcome's and this round's"
    );
    assert_eq!(w.status().engines["query"].cap_bytes, cap);
}

/// An engine that enters Warning again and again has its arena purged at
/// most once a `PURGE_SPACING`.
#[test]
fn an_engine_flickering_at_warning_is_purged_once_a_second() {
    use Msg::*;
    let (mut w, _) = World::new(&["vector"], true);
    w.tick(&[("vector", 100 * MIB)]);
    let mut purges = 0;
    // Warning from 192 MiB: in and out every 100 ms for 900 ms.
    for i in 0..10 {
        let resident = if i % 2 == 0 { 200 } else { 180 };
        let got = w.after(100).tick(&[("vector", resident * MIB)]);
        purges += got.iter().filter(|m| **m == Purge("vector")).count();
        if i % 2 == 0 {
            assert!(got.contains(&Pressure("vector", Warning)), "{i}: {got:?}");
        }
    }
    assert_eq!(purges, 1, "five entries in 900 ms");
    // A second after the purge, the next entry purges again.
    w.after(100).tick(&[("vector", 180 * MIB)]);
    let got = w.after(100).tick(&[("vector", 200 * MIB)]);
    assert_eq!(got, [Pressure("vector", Warning), Purge("vector")]);
    assert_eq!(w.status().engines["vector"].purges, 2);
}

#[test]
fn a_lender_that_keeps_growing_lends_nothing_and_the_floor_is_never_lent() {
    use Msg::*;
    let (mut w, _) = World::new(&["vector", "query"], true);
    w.tick(&[("vector", 0), ("query", 0)]);
    // Query grows by more than 1 MiB: active for 500 ms.
    w.after(20).tick(&[("vector", 0), ("query", 20 * MIB)]);
    let got = w
        .after(20)
        .tick(&[("vector", 240 * MIB), ("query", 20 * MIB)]);
    assert!(!got.iter().any(|m| matches!(m, Limits(..))), "{got:?}");
    // Idle at last: it keeps its 64 MiB floor (more than 0 held + 64 MiB
    // cushion would be: equal here) and lends the other 192.
    let got = w.after(600).tick(&[("vector", 240 * MIB), ("query", 0)]);
    assert_eq!(
        &got[..2],
        [
            Limits("vector", 0, 448 * MIB),
            Limits("query", 64 * MIB, 64 * MIB)
        ]
    );
}

#[test]
fn memory_the_library_did_not_reserve_comes_off_its_cap() {
    use Msg::*;
    let (mut w, _) = World::new(&["vector", "query"], true);
    // The books say 40 MiB; the kernel sees 141 MiB: 101 MiB the library
    // never reserved, taken off in whole steps of 4 MiB, rounded up.
    assert_eq!(library::untracked_step(256 * MIB), 4 * MIB);
    w.report("query", 40 * MIB, 0);
    let got = w.tick(&[("query", 141 * MIB), ("vector", 0)]);
    assert_eq!(got, [Limits("query", 64 * MIB, 152 * MIB)]);
    assert_eq!(w.status().engines["query"].cap_bytes, 152 * MIB);
    // A wobble inside the same step sends nothing, nor one just below
    // its lower boundary (less than half a step past it)...
    assert_eq!(w.after(20).tick(&[("query", 142 * MIB), ("vector", 0)]), []);
    assert_eq!(w.after(20).tick(&[("query", 139 * MIB), ("vector", 0)]), []);
    assert_eq!(w.after(20).tick(&[("query", 141 * MIB), ("vector", 0)]), []);
    // ...half a step past it, the cap steps up.
    assert_eq!(
        w.after(20).tick(&[("query", 137 * MIB), ("vector", 0)]),
        [Limits("query", 64 * MIB, 156 * MIB)]
    );
    assert_eq!(
        w.after(20).tick(&[("query", 141 * MIB), ("vector", 0)]),
        [Limits("query", 64 * MIB, 152 * MIB)]
    );
    // Once the books cover what the kernel sees, the whole budget is back.
    w.report("query", 142 * MIB, 0);
    assert_eq!(
        w.after(20).tick(&[("query", 142 * MIB), ("vector", 0)]),
        [Limits("query", 64 * MIB, 256 * MIB)]
    );
    // However much it holds unreserved, its floor is left to it. (Vector
    // is busy, so nothing is lent to query.)
    let got = w
        .after(20)
        .tick(&[("query", 400 * MIB), ("vector", 200 * MIB)]);
    assert!(
        got.contains(&Limits("query", 64 * MIB, 64 * MIB)),
        "{got:?}"
    );
    // Reserved but not yet touched is no correction either.
    w.report("vector", 100 * MIB, 0);
    let got = w
        .after(20)
        .tick(&[("query", 142 * MIB), ("vector", 10 * MIB)]);
    assert!(
        !got.iter().any(|m| matches!(m, Limits("vector", ..))),
        "{got:?}"
    );
}

#[test]
fn the_databases_emergency_holds_non_essential_engines_with_hysteresis() {
    use Msg::*;
    let (mut w, _) = World::new(&["vector", "query"], true);
    w.report("query", 10 * MIB, 0);
    // 96% of the ceiling: not yet.
    assert_eq!(w.tick_with(&[], cgroup(983), None), []);
    // 97%: the high mark drops to the restore point; query (holding
    // 10 MiB, floor 64 MiB) is held to its floor; vector is essential.
    assert_eq!(
        w.after(20).tick_with(&[], cgroup(994), None),
        [High(Some(768 * MIB)), Limits("query", 64 * MIB, 64 * MIB)]
    );
    assert!(w.policy.emergency());
    assert!(w.status().engines["query"].backpressure);
    // Between warning and emergency: still on, nothing new.
    assert_eq!(w.after(20).tick_with(&[], cgroup(800), None), []);
    // Below warning: over; the high mark and query's cap come back.
    assert_eq!(
        w.after(20).tick_with(&[], cgroup(700), None),
        [High(None), Limits("query", 64 * MIB, 256 * MIB)]
    );
    assert!(!w.status().engines["query"].backpressure);
    // Holding more than its floor: held to what it holds. Without a kernel
    // ceiling, the attributed total against the configured ceiling counts.
    w.report("query", 100 * MIB, 0);
    let got = w
        .after(20)
        .tick_with(&[("vector", 900 * MIB), ("query", 100 * MIB)], None, None);
    assert!(got.contains(&High(Some(768 * MIB))), "{got:?}");
    assert!(
        got.contains(&Limits("query", 64 * MIB, 100 * MIB)),
        "{got:?}"
    );
    // A library that connects during an Emergency is held at once.
    let welcome = msgs(w.policy.connect(S, PID, 0, &["query".to_owned()]));
    assert_eq!(
        welcome,
        [
            Limits("query", 64 * MIB, 256 * MIB),
            Limits("query", 64 * MIB, 64 * MIB)
        ]
    );
}

/// Pages a process holds but another cgroup was charged for (its binary's
/// text, read in before it started) are in its RSS, not in its cgroup's
/// charge: the Emergency comes at the larger of the two.
#[test]
fn the_emergency_counts_resident_memory_the_cgroup_was_not_charged_for() {
    use Msg::*;
    let (mut w, _) = World::new(&["vector", "query"], true);
    w.report("query", 100 * MIB, 0);
    // Engines inside their budgets; the rest of the process (its
    // binary's text, its runtime) unattributed.
    let process = |unattributed: u64| {
        let mut r = reading(&[("vector", 100 * MIB), ("query", 100 * MIB)]);
        r.processes[0].unattributed.resident_bytes = unattributed * MIB;
        r
    };
    // The cgroup at 92%, the process at 92% too: no Emergency.
    assert_eq!(w.tick_on(&process(742), cgroup(940), None), []);
    assert!(!w.policy.emergency());
    // The cgroup still at 92%, but the process holds 98% of the ceiling
    // (60 MiB of it charged elsewhere): Emergency.
    let got = w.after(20).tick_on(&process(804), cgroup(940), None);
    assert!(got.contains(&High(Some(768 * MIB))), "{got:?}");
    assert!(
        got.contains(&Limits("query", 64 * MIB, 100 * MIB)),
        "{got:?}"
    );
    assert!(w.policy.emergency());
    // The process back below warning but the cgroup's working set (its
    // page cache, say) still at 98%: the Emergency holds, and the engines
    // are asked to spill what the database holds beyond the restore point
    // (`in_an_emergency_every_engine_spills_its_part`).
    let got = w.after(20).tick_on(&process(300), cgroup(1004), None);
    assert!(got.iter().all(|m| matches!(m, Spill(..))), "{got:?}");
    assert!(w.policy.emergency());
    // Both below warning: over.
    let got = w.after(20).tick_on(&process(300), cgroup(700), None);
    assert!(got.contains(&High(None)), "{got:?}");
    assert!(!w.policy.emergency());
}

/// An engine marked `idle_spill` that sits idle on memory while the
/// database is short of it (at the warning threshold of its ceiling) is
/// asked to spill down to its floor, once per idle spell.
#[test]
fn an_idle_engine_marked_to_spill_is_asked_to_when_the_database_is_short() {
    let config = Config::parse(
        "database = \"t\"\nceiling = \"1GiB\"\n\
         [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\nfloor = \"32MiB\"\nidle_spill = true\n\
         [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\n",
    )
    .unwrap();
    let (mut w, _) = World::with_rules(Rules::from_config(&config), &["vector", "query"]);
    let spills = |got: Vec<Msg>| -> Vec<Msg> {
        got.into_iter()
            .filter(|m| matches!(m, Msg::Spill(..)))
            .collect()
    };
    let resident = [("vector", 100 * MIB), ("query", 60 * MIB)];
    w.tick_with(&resident, cgroup(600), None);
    // Idle 2 s, but the database uses 59% of its ceiling: nothing.
    assert_eq!(
        spills(w.after(2100).tick_with(&resident, cgroup(600), None)),
        []
    );
    // At 78% of it: vector spills down to its floor; query (not marked),
    // never.
    let got = spills(w.after(20).tick_with(&resident, cgroup(800), None));
    assert_eq!(got, [Msg::Spill("vector", 68 * MIB)]);
    let status = w.status();
    assert_eq!(status.engines["vector"].idle_spills, 1);
    assert_eq!(status.engines["vector"].spill_requests, 1);
    assert_eq!(status.engines["query"].idle_spills, 0);
    // Asked once: not again at the next tick.
    assert_eq!(
        spills(w.after(20).tick_with(&resident, cgroup(800), None)),
        []
    );
}

#[test]
fn observing_asks_nothing_and_every_cap_is_the_ceiling() {
    let (mut w, welcome) = World::new(&["vector", "query"], false);
    assert_eq!(
        welcome,
        [
            Msg::Limits("vector", 0, 1024 * MIB),
            Msg::Limits("query", 0, 1024 * MIB)
        ]
    );
    w.report("query", 0, 0);
    // Critical and over: levels counted, nothing sent; no loans; no high
    // mark, no backpressure, no purge on a stall.
    let got = w.tick_with(
        &[("vector", 10 * MIB), ("query", 1000 * MIB)],
        None,
        Some(1),
    );
    assert_eq!(got, []);
    let s = w.status();
    assert_eq!(s.engines["query"].level, Some(Emergency));
    assert_eq!(s.engines["query"].level_changes, 1);
    assert!(s.loans.is_empty());
    assert!(w.policy.emergency(), "the Emergency is still shown");
}

#[test]
fn a_reload_ends_loans_and_sends_the_new_limits() {
    use Msg::*;
    let (mut w, _) = World::new(&["vector", "query"], true);
    w.tick(&[("vector", 10 * MIB), ("query", 240 * MIB)]);
    assert_eq!(w.status().loans.len(), 1);
    let mut r = rules(true);
    r.limits[1].budget_bytes = 128 * MIB;
    assert_eq!(
        msgs(w.policy.reload(r)),
        [
            Limits("vector", 0, 256 * MIB),
            Limits("query", 64 * MIB, 128 * MIB)
        ]
    );
    assert!(w.status().loans.is_empty());
    assert_eq!(w.status().engines["query"].budget_bytes, 128 * MIB);
}

#[test]
fn reports_for_undeclared_engines_and_sessions_that_left_change_nothing() {
    let (mut w, _) = World::new(&["vector"], true);
    assert_eq!(w.report("query", 1 << 40, 9), []);
    assert!(!w.status().engines.contains_key("query"));
    w.policy.disconnect(S);
    assert!(w.policy.library(S).is_none());
    assert_eq!(w.report("vector", 1, 1), []);
    assert_eq!(w.tick(&[("vector", 250 * MIB)]), []);
}

/// timeseries may hold 64 MiB of page cache; vector may lock a 256 MiB hot
/// set. Ceiling 1 GiB, default thresholds.
fn cache_rules() -> Rules {
    let config = Config::parse(
        "database = \"t\"\nceiling = \"1GiB\"\n\
         [[engine]]\nname = \"vector\"\nbudget = \"512MiB\"\nhot_set = \"256MiB\"\n\
         [[engine]]\nname = \"timeseries\"\nbudget = \"256MiB\"\npage_cache_share = \"64MiB\"\n",
    )
    .unwrap();
    Rules::from_config(&config)
}

fn page_cache_reading(engine: &str, bytes: u64) -> Reading {
    Reading {
        processes: vec![ProcessAttribution {
            pid: PID,
            engines: [(
                engine.to_owned(),
                Attributed {
                    page_cache_bytes: bytes,
                    ..Attributed::default()
                },
            )]
            .into_iter()
            .collect(),
            ..ProcessAttribution::default()
        }],
    }
}

fn cache_drops(actions: Vec<Action>) -> Vec<(String, u64)> {
    actions
        .into_iter()
        .filter_map(|a| match a {
            Action::Send {
                message:
                    ToLibrary::DropCache {
                        engine,
                        target_bytes,
                    },
                ..
            } => Some((engine, target_bytes)),
            _ => None,
        })
        .collect()
}

/// A tick `ms` after `t0` with `cached` MiB of timeseries page cache and
/// the database's charge at `charge` MiB of its 1 GiB ceiling; the
/// `drop_cache` requests it sends.
fn cache_tick(
    policy: &mut Policy,
    t0: Instant,
    ms: u64,
    cached: u64,
    charge: u64,
) -> Vec<(String, u64)> {
    let r = page_cache_reading("timeseries", cached * MIB);
    cache_drops(policy.tick(&Tick {
        now: t0 + Duration::from_millis(ms),
        reading: Some(&r),
        ceiling: Some(CeilingUse {
            // The flush's pages are inactive: the working set is low
            // while the charge, page cache included, is high.
            working_set_bytes: 200 * MIB,
            charge_bytes: charge * MIB,
            held_bytes: 200 * MIB,
            limit_bytes: 1024 * MIB,
            throttle_bytes: None,
        }),
        psi: None,
    }))
}

#[test]
fn a_process_with_hot_sets_gets_its_memlock_limit_raised_at_the_welcome() {
    let mut policy = Policy::new(cache_rules());
    let actions = policy.connect(S, PID, 0, &["vector".into(), "timeseries".into()]);
    assert_eq!(
        actions[0],
        Action::RaiseMemlock {
            session: S,
            pid: PID,
            bytes: 256 * MIB + MEMLOCK_HEADROOM
        }
    );
    // A process without the engine that has a hot set: nothing to raise.
    let actions = policy.connect(2, PID + 1, 0, &["timeseries".into()]);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::RaiseMemlock { .. })),
        "{actions:?}"
    );
    policy.on_memlock(S, Err("EPERM".into()));
    let st = policy.library(S).unwrap().status(policy.rules());
    assert_eq!(st.memlock_error.as_deref(), Some("EPERM"));
    // Observing only: nothing is raised.
    let mut rules = cache_rules();
    rules.enforce = false;
    let mut observing = Policy::new(rules);
    assert!(
        !observing
            .connect(S, PID, 0, &["vector".into()])
            .iter()
            .any(|a| matches!(a, Action::RaiseMemlock { .. }))
    );
}

#[test]
fn an_engine_above_its_cache_share_drops_cold_cache_only_under_pressure() {
    let mut policy = Policy::new(cache_rules());
    policy.connect(S, PID, 0, &["vector".into(), "timeseries".into()]);
    let t0 = Instant::now();
    let p = &mut policy;
    // 300 MiB cached, the database at half its ceiling: no pressure.
    assert_eq!(cache_tick(p, t0, 0, 300, 512), []);
    // At 80% of the ceiling (warning is 75%): down to the 64 MiB share.
    assert_eq!(
        cache_tick(p, t0, 20, 300, 820),
        [("timeseries".to_owned(), 236 * MIB)]
    );
    // Not again within a second, answered or not.
    assert_eq!(cache_tick(p, t0, 40, 300, 820), []);
    assert_eq!(
        cache_tick(p, t0, 1020, 290, 820),
        [("timeseries".to_owned(), 226 * MIB)]
    );
    p.on_cache_dropped(S, "timeseries", 226 * MIB, 200 * MIB);
    // Answered: still a second between requests, then what is left.
    assert_eq!(cache_tick(p, t0, 1040, 100, 800), []);
    assert_eq!(
        cache_tick(p, t0, 2020, 100, 800),
        [("timeseries".to_owned(), 36 * MIB)]
    );
    // Under its share: nothing, whatever the pressure.
    assert_eq!(cache_tick(p, t0, 3000, 60, 1000), []);
    let st = policy.library(S).unwrap().status(policy.rules());
    let ts = &st.engines["timeseries"];
    assert_eq!(ts.cache_drop_requests, 3);
    assert_eq!(ts.cache_dropped_bytes, 200 * MIB);
    assert_eq!(ts.page_cache_share_bytes, Some(64 * MIB));
    // vector has no share: never asked, however much it caches.
    assert_eq!(st.engines["vector"].cache_drop_requests, 0);
}

#[test]
fn a_library_that_frees_little_is_asked_less_and_less_often() {
    let mut policy = Policy::new(cache_rules());
    policy.connect(S, PID, 0, &["vector".into(), "timeseries".into()]);
    let t0 = Instant::now();
    let p = &mut policy;
    let ask = [("timeseries".to_owned(), 236 * MIB)];
    assert_eq!(cache_tick(p, t0, 0, 300, 820), ask);
    // Nothing freed (its cache is in files it does not track): 2 s.
    p.on_cache_dropped(S, "timeseries", 236 * MIB, 0);
    assert_eq!(cache_tick(p, t0, 1500, 300, 820), []);
    assert_eq!(cache_tick(p, t0, 2000, 300, 820), ask);
    // A twentieth of the target: 4 s.
    p.on_cache_dropped(S, "timeseries", 236 * MIB, 12 * MIB);
    assert_eq!(cache_tick(p, t0, 5000, 300, 820), []);
    assert_eq!(cache_tick(p, t0, 6000, 300, 820), ask);
    // Doubling stops at CACHE_DROP_RETRY_MAX.
    let mut at = 6000;
    for _ in 0..8 {
        p.on_cache_dropped(S, "timeseries", 236 * MIB, 0);
        at += CACHE_DROP_RETRY_MAX.as_millis() as u64;
        assert_eq!(cache_tick(p, t0, at, 300, 820), ask, "at {at} ms");
    }
    // A drop that frees what was asked: back to a second.
    p.on_cache_dropped(S, "timeseries", 236 * MIB, 200 * MIB);
    assert_eq!(cache_tick(p, t0, at + 1000, 300, 820), ask);
}

#[test]
fn a_reload_that_raises_a_hot_set_raises_connected_processes_memlock() {
    let mut policy = Policy::new(cache_rules());
    policy.connect(S, PID, 0, &["vector".into(), "timeseries".into()]);
    policy.connect(2, PID + 1, 0, &["timeseries".into()]);
    let raises = |actions: &[Action]| -> Vec<(SessionId, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::RaiseMemlock { session, bytes, .. } => Some((*session, *bytes)),
                _ => None,
            })
            .collect()
    };
    let reload = |vector_hot: &str, timeseries_hot: &str| {
        Rules::from_config(
            &Config::parse(&format!(
                "database = \"t\"\nceiling = \"1GiB\"\n\
                 [[engine]]\nname = \"vector\"\nbudget = \"512MiB\"\nhot_set = \"{vector_hot}\"\n\
                 [[engine]]\nname = \"timeseries\"\nbudget = \"256MiB\"\npage_cache_share = \"64MiB\"\nhot_set = \"{timeseries_hot}\"\n",
            ))
            .unwrap(),
        )
    };
    // The vector hot set grows: only the process with a vector engine.
    let actions = policy.reload(reload("384MiB", "0"));
    assert_eq!(raises(&actions), [(S, 384 * MIB + MEMLOCK_HEADROOM)]);
    // The same again: nothing to raise.
    assert_eq!(raises(&policy.reload(reload("384MiB", "0"))), []);
    // Smaller: the limit is left where it is.
    assert_eq!(raises(&policy.reload(reload("128MiB", "0"))), []);
    // A hot set for timeseries: both processes.
    let actions = policy.reload(reload("128MiB", "32MiB"));
    assert_eq!(
        raises(&actions),
        [
            (S, 160 * MIB + MEMLOCK_HEADROOM),
            (2, 32 * MIB + MEMLOCK_HEADROOM)
        ]
    );
    // The raise comes before the new limits reach the library.
    let first_send = actions
        .iter()
        .position(|a| matches!(a, Action::Send { .. }))
        .unwrap();
    assert!(matches!(actions[0], Action::RaiseMemlock { .. }) && first_send > 0);
    // A raise that failed is tried again at the next reload.
    policy.on_memlock(2, Err("EPERM".into()));
    assert_eq!(
        raises(&policy.reload(reload("128MiB", "32MiB"))),
        [(2, 32 * MIB + MEMLOCK_HEADROOM)]
    );
    // Observing, nothing is raised; enforcement turned on raises it.
    let mut observing = cache_rules();
    observing.enforce = false;
    let mut policy = Policy::new(observing);
    assert_eq!(raises(&policy.connect(S, PID, 0, &["vector".into()])), []);
    assert_eq!(
        raises(&policy.reload(cache_rules())),
        [(S, 256 * MIB + MEMLOCK_HEADROOM)]
    );
}

/// Marks: the next threshold up is armed in the kernel; a crossing the
/// kernel reports moves it up; an engine hovering at the mark that fired
/// is left to the tick until it falls 2% of its budget below it.
#[test]
fn marks_follow_the_engine_with_hysteresis() {
    let (mut w, _) = World::new(&["vector"], true);
    let (warning, critical, emergency) = (
        (256.0 * MIB as f64 * 0.75) as u64,
        (256.0 * MIB as f64 * 0.90) as u64,
        (256.0 * MIB as f64 * 0.97) as u64,
    );
    let v = |m: Option<u64>| vec![("vector".to_owned(), m)];
    w.tick(&[("vector", 100 * MIB)]);
    assert_eq!(w.marks, v(Some(warning)));
    w.after(20).tick(&[("vector", 120 * MIB)]);
    assert_eq!(w.marks, [], "unchanged: nothing written");
    // The kernel reports the crossing; the reaction arms the next.
    w.policy.on_mark(PID, "vector");
    w.after(1).tick(&[("vector", 200 * MIB)]);
    assert_eq!(w.marks, v(Some(critical)));
    w.policy.on_mark(PID, "vector");
    let got = w.after(1).tick(&[("vector", 235 * MIB)]);
    assert!(got.contains(&Msg::Spill("vector", 235 * MIB - 192 * MIB)));
    assert_eq!(w.marks, v(Some(emergency)));
    // Spilled back under Critical, but within 2% (5.1 MiB) of it: the mark
    // that fired stays off, Emergency stays armed.
    w.after(20).tick(&[("vector", 228 * MIB)]);
    assert_eq!(w.marks, []);
    w.after(20).tick(&[("vector", 229 * MIB)]);
    assert_eq!(w.marks, []);
    // Well below: armed again.
    w.after(20).tick(&[("vector", 220 * MIB)]);
    assert_eq!(w.marks, v(Some(critical)));
    // Past Emergency there is no mark; the tick watches.
    w.after(20).tick(&[("vector", 250 * MIB)]);
    assert_eq!(w.marks, v(None));
    // Off in the configuration: disarmed at the next tick, none after.
    w.after(20).tick(&[("vector", 100 * MIB)]);
    assert_eq!(w.marks, v(Some(warning)));
    let mut rules = w.policy.rules().clone();
    rules.mark_events = false;
    w.policy.reload(rules);
    w.after(20).tick(&[("vector", 100 * MIB)]);
    assert_eq!(w.marks, v(None));
    w.after(20).tick(&[("vector", 200 * MIB)]);
    assert_eq!(w.marks, []);
    // A library that goes disarms its engines' marks.
    let (mut w, _) = World::new(&["vector"], true);
    w.tick(&[("vector", 100 * MIB)]);
    let gone = w.policy.disconnect(S);
    assert!(
        matches!(&gone[..], [Action::Mark { pid: PID, engine, bytes: None }] if engine == "vector"),
        "{gone:?}"
    );
}

/// Two nodes of equal memory, CPU 0 on node 0 and CPU 1 on node 1.
fn two_nodes() -> Vec<Node> {
    (0..2)
        .map(|id| Node {
            id,
            cpus: vec![id],
            memory_bytes: 1 << 30,
        })
        .collect()
}

/// [`rules`] with vector on CPU 0 (node 0) and query on CPU 1 (node 1),
/// each with its budget split evenly over both nodes, `extra` before the
/// engines, on [`two_nodes`].
fn numa_rules(extra: &str) -> Result<Rules, ConfigError> {
    numa_rules_with(extra, "node_weights = [1, 1]")
}

/// As [`numa_rules`], with `placement` for each engine after its `cpus`.
fn numa_rules_with(extra: &str, placement: &str) -> Result<Rules, ConfigError> {
    let config = Config::parse(&format!(
        "database = \"t\"\nceiling = \"1GiB\"\n{extra}\n\
         [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\ncpus = \"0\"\n{placement}\n\
         [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\nfloor = \"64MiB\"\n\
         essential = false\ncpus = \"1\"\n{placement}\n",
    ))?;
    Rules::from_config(&config).on_nodes(&config, &two_nodes())
}

/// As [`numa_rules`], with both floors at the budgets: no loans, so the
/// shares stay put.
fn placed_without_loans() -> Rules {
    let config = Config::parse(
        "database = \"t\"\nceiling = \"1GiB\"\n\
         [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\nfloor = \"256MiB\"\n\
         cpus = \"0\"\nnode_weights = [1, 1]\n\
         [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\nfloor = \"256MiB\"\n\
         essential = false\ncpus = \"1\"\nnode_weights = [1, 1]\n",
    )
    .unwrap();
    Rules::from_config(&config)
        .on_nodes(&config, &two_nodes())
        .unwrap()
}

/// Resident MiB per node of each engine (the total is their sum).
fn node_reading(resident: &[(&str, [u64; 2])]) -> Reading {
    let mut r = reading(
        &resident
            .iter()
            .map(|(n, by)| (*n, (by[0] + by[1]) * MIB))
            .collect::<Vec<_>>(),
    );
    for (n, by) in resident {
        let a = r.processes[0].engines.get_mut(*n).unwrap();
        a.node_resident_bytes[0] = by[0] * MIB;
        a.node_resident_bytes[1] = by[1] * MIB;
    }
    r
}

#[test]
fn an_engine_over_its_share_on_one_node_is_spilled_there_and_the_other_is_left_alone() {
    use Msg::*;
    // Each 256 MiB budget is 128 MiB per node. Query holds 120 MiB, all on
    // node 1: 94% of its share there (Critical), 47% of its budget.
    // (Vector's floor is its budget: it lends nothing, so query cannot
    // borrow its way out.)
    let (mut w, _) = World::with_rules(placed_without_loans(), &["vector", "query"]);
    let r = node_reading(&[("vector", [40, 0]), ("query", [0, 120])]);
    assert_eq!(
        w.tick_on(&r, None, None),
        [
            Pressure("query", Critical),
            Purge("query"),
            // Down to 75% of its node-1 share: 120 - 96.
            Spill("query", 24 * MIB),
        ],
        "vector, at 31% of its node-0 share, hears nothing"
    );
    // Its mark: the total at which node 0 would reach Warning (96 of its
    // 128 MiB share) if all growth landed there, below its total's
    // Warning (192 MiB).
    assert!(
        w.marks.contains(&("vector".to_owned(), Some(96 * MIB))),
        "{:?}",
        w.marks
    );
    let status = w.status();
    let query = &status.engines["query"];
    assert_eq!(query.level, Some(Critical));
    assert_eq!(query.resident_bytes, 120 * MIB);
    let node1 = query.nodes.iter().find(|n| n.node == 1).unwrap();
    assert_eq!(
        (node1.resident_bytes, node1.share_bytes, node1.level),
        (120 * MIB, 128 * MIB, Critical)
    );
    // Vector grows to 150 MiB on node 0: 59% of its budget (Normal: it
    // borrows nothing), 117% of its node-0 share.
    let r = node_reading(&[("vector", [150, 0]), ("query", [0, 96])]);
    let sent = w.after(300).tick_on(&r, None, None);
    assert!(
        sent.contains(&Pressure("vector", Emergency)) && sent.contains(&Spill("vector", 54 * MIB)),
        "vector at 117% of its node-0 share (59% of its budget): {sent:?}"
    );
    assert!(
        !sent.iter().any(|m| matches!(m, Spill("query", _))),
        "query came down to its restore point on node 1: {sent:?}"
    );

    // The same figures judged in all only (one node, or engines placed
    // nowhere): both engines are Normal, nothing is asked.
    let (mut w, _) = World::new(&["vector", "query"], true);
    let r = node_reading(&[("vector", [40, 0]), ("query", [0, 120])]);
    assert_eq!(w.tick_on(&r, None, None), []);
}

#[test]
fn node_shares_follow_the_weights_and_only_placed_engines_get_them() {
    // By default a placed engine's budget is all on its CPUs' nodes.
    let rules = numa_rules_with("", "").unwrap();
    assert_eq!(
        rules.node_shares["query"],
        [NodeShare {
            node: 1,
            fraction: 1.0
        }]
    );
    // Its CPUs on both nodes, weighted 1:3: a quarter and three quarters.
    let config = Config::parse(
        "database = \"t\"\nceiling = \"1GiB\"\n[numa]\nweights = [1, 3]\n\
         [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\n\
         [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\ncpus = \"0-1\"\n",
    )
    .unwrap();
    let rules = Rules::from_config(&config)
        .on_nodes(&config, &two_nodes())
        .unwrap();
    let fractions: Vec<f64> = rules.node_shares["query"]
        .iter()
        .map(|s| s.fraction)
        .collect();
    assert_eq!(fractions, [0.25, 0.75]);
    assert!(
        !rules.node_shares.contains_key("vector"),
        "vector is placed nowhere: judged in all only"
    );
    // Query at 120 MiB on node 1: 63% of its 192 MiB share there, Normal.
    let (mut w, _) = World::with_rules(rules, &["vector", "query"]);
    let r = node_reading(&[("vector", [40, 0]), ("query", [0, 120])]);
    assert_eq!(w.tick_on(&r, None, None), []);
    // A node with no part of the budget is not judged: stray bytes there
    // (a stack faulted in before the thread was pinned) are no Emergency.
    let (mut w, _) = World::with_rules(
        numa_rules_with("", "node_weights = [0, 1]").unwrap(),
        &["vector", "query"],
    );
    let r = node_reading(&[("vector", [1, 40]), ("query", [0, 40])]);
    assert_eq!(w.tick_on(&r, None, None), []);
    // One node, or the ladder per node off: nobody is judged per node.
    let one = &two_nodes()[..1];
    assert!(
        Rules::from_config(&config)
            .on_nodes(&config, one)
            .unwrap()
            .node_shares
            .is_empty()
    );
    let off = numa_rules("[numa]\nladder = false").unwrap();
    assert!(off.node_shares.is_empty());
}

#[test]
fn an_engine_short_on_one_node_borrows_and_does_not_lend() {
    use Msg::*;
    // Query grows to 120 MiB, all on node 1: 94% of its 128 MiB share
    // there (Critical), 47% of its budget. Vector, idle at 10 MiB, lends
    // to it as to any engine at Critical, query being judged by its node.
    let (mut w, _) = World::with_rules(numa_rules("").unwrap(), &["vector", "query"]);
    w.tick_on(
        &node_reading(&[("vector", [10, 0]), ("query", [0, 60])]),
        None,
        None,
    );
    let sent = w.after(600).tick_on(
        &node_reading(&[("vector", [10, 0]), ("query", [0, 120])]),
        None,
        None,
    );
    assert!(
        sent.iter()
            .any(|m| matches!(m, Limits("query", _, cap) if *cap > 256 * MIB)),
        "query, short on node 1, borrows: {sent:?}"
    );
    assert!(
        !sent
            .iter()
            .any(|m| matches!(m, Limits("vector", _, cap) if *cap > 256 * MIB)),
        "and does not lend: {sent:?}"
    );
}

#[test]
fn weights_that_do_not_fit_the_machine_or_make_no_sense_are_refused_by_name() {
    let e = numa_rules("[numa]\nweights = [1, 1, 1]").unwrap_err();
    assert_eq!(e.field, "numa.weights");
    assert!(
        e.reason.contains("3 weights for the 2 online nodes"),
        "{}",
        e.reason
    );
    let e = numa_rules("[numa]\nweights = [0, 0]").unwrap_err();
    assert_eq!(e.field, "numa.weights");
    let e = numa_rules("[numa]\nweights = [1, 2000000]").unwrap_err();
    assert_eq!(e.field, "numa.weights[1]");
    let e = Config::parse(
        "database = \"t\"\nceiling = \"1GiB\"\n\
         [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\ncpus = \"0\"\nnode_weights = []\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "engine[0].node_weights");
    let e = numa_rules_with("", "node_weights = [1, 1, 1]").unwrap_err();
    assert_eq!(e.field, "engine[0].node_weights");
    // Weights need a placed engine.
    let e = Config::parse(
        "database = \"t\"\nceiling = \"1GiB\"\n\
         [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\nnode_weights = [1, 1]\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "engine[0].node_weights");
    assert!(e.reason.contains("needs `cpus`"), "{}", e.reason);
}

/// A node's marks have the total's hysteresis: an engine hovering just
/// under a node threshold whose mark fired is left to the tick, and armed
/// again only once it falls 2% of its share below.
#[test]
fn a_node_hovering_under_a_threshold_that_fired_is_not_armed_again() {
    // Vector's node-0 share is 128 MiB: Warning at 96, Critical at 115.2.
    let (mut w, _) = World::with_rules(placed_without_loans(), &["vector", "query"]);
    let critical = (128.0 * MIB as f64 * 0.90) as u64;
    let vector = |w: &World| w.marks.iter().find(|(e, _)| e == "vector").map(|(_, m)| *m);
    let at = |node0: u64| node_reading(&[("vector", [node0, 0]), ("query", [0, 10])]);
    w.tick_on(&at(90), None, None);
    assert_eq!(
        vector(&w),
        Some(Some(96 * MIB)),
        "node 0's Warning, as a total"
    );
    w.policy.on_mark(PID, "vector");
    w.after(1).tick_on(&at(97), None, None);
    assert_eq!(vector(&w), Some(Some(critical)), "then its Critical");
    // Just under Warning again (within 2.56 MiB): Critical stays armed.
    w.after(20).tick_on(&at(95), None, None);
    assert_eq!(vector(&w), None, "unchanged: nothing written");
    // Well below: Warning armed again.
    w.after(20).tick_on(&at(90), None, None);
    assert_eq!(vector(&w), Some(Some(96 * MIB)));
}

#[test]
fn engines_that_crowd_a_node_past_its_part_of_the_ceiling_give_way_by_what_they_hold_beyond_a_fitted_share()
 {
    use Msg::*;
    // A 512 MiB ceiling over two equal nodes, split evenly by the
    // operator's weights: 256 MiB each. Vector's 256 MiB budget all on
    // node 0, query's 128 MiB half there: their shares on node 0 add up
    // to 320 MiB, more than the node's part (fitted by 0.8: vector 204.8
    // MiB, query 51.2 MiB). Floors at the budgets: no loans.
    let text = "database = \"t\"\nceiling = \"512MiB\"\n[numa]\nweights = [1, 1]\n\
         [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\nfloor = \"256MiB\"\n\
         cpus = \"0\"\nnode_weights = [1, 0]\n\
         [[engine]]\nname = \"query\"\nbudget = \"128MiB\"\nfloor = \"128MiB\"\n\
         cpus = \"0-1\"\n";
    let config = Config::parse(text).unwrap();
    let rules = Rules::from_config(&config)
        .on_nodes(&config, &two_nodes())
        .unwrap();
    assert_eq!(rules.node_ceiling[&0], 0.5);
    let (mut w, _) = World::with_rules(rules.clone(), &["vector", "query"]);
    // Node 0 holds 220 MiB, under Critical of its part (230.4): each
    // engine is judged on its own share. Vector at 78% of its: Warning.
    let r = node_reading(&[("vector", [200, 0]), ("query", [20, 0])]);
    assert_eq!(
        w.tick_on(&r, None, None),
        [Pressure("vector", Warning), Purge("vector")]
    );
    // Query brings node 0 to 240 MiB: crowded. Vector, at 98% of its
    // fitted share, spills down to 75% of it; query, at 78% of its fitted
    // 51.2 MiB, is at Warning and spills nothing.
    let r = node_reading(&[("vector", [200, 0]), ("query", [40, 0])]);
    let sent = w.after(300).tick_on(&r, None, None);
    let fitted = (256.0 * MIB as f64 * 0.8) as u64;
    let target = 200 * MIB - (fitted as f64 * 0.75) as u64;
    assert_eq!(
        sent,
        [
            Pressure("vector", Emergency),
            Spill("vector", target),
            Pressure("query", Warning),
            Purge("query"),
        ],
    );
    // The status keeps each engine's own share (what it is budgeted on).
    let status = w.status();
    let v0 = status.engines["vector"].nodes[0];
    assert_eq!((v0.node, v0.share_bytes), (0, 256 * MIB));
    assert_eq!(status.crowded_nodes, [(0, 1)].into());
    // The same figures with room on the node (the ceiling twice as
    // large): nothing but the engines' own shares counts.
    let roomy = Config::parse(&text.replace("\"512MiB\"", "\"1GiB\"")).unwrap();
    let rules = Rules::from_config(&roomy)
        .on_nodes(&roomy, &two_nodes())
        .unwrap();
    let (mut w, _) = World::with_rules(rules, &["vector", "query"]);
    assert_eq!(
        w.tick_on(&r, None, None),
        [Pressure("vector", Warning), Purge("vector")]
    );
}

#[test]
fn without_weights_the_nodes_parts_of_the_ceiling_follow_the_budgets_in_force() {
    // Vector on node 0, query on node 1, sparse placed nowhere (split by
    // the nodes' memory, equal here).
    let text = "database = \"t\"\nceiling = \"1GiB\"\n\
         [[engine]]\nname = \"vector\"\nbudget = \"512MiB\"\ncpus = \"0\"\n\
         [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\ncpus = \"1\"\n\
         [[engine]]\nname = \"sparse\"\nbudget = \"256MiB\"\n";
    let config = Config::parse(text).unwrap();
    let rules = Rules::from_config(&config)
        .on_nodes(&config, &two_nodes())
        .unwrap();
    let parts = |b: [u64; 3]| -> Vec<f64> {
        rules
            .node_parts([
                ("vector", b[0] * MIB),
                ("query", b[1] * MIB),
                ("sparse", b[2] * MIB),
            ])
            .into_values()
            .collect()
    };
    // Node 0: vector's 512 and half of sparse's 256, of 1024; node 1 no
    // less than its memory's half.
    assert_eq!(parts([512, 256, 256]), [0.625, 0.5]);
    // Vector lends 256 MiB to query: the room moves with the loan.
    assert_eq!(parts([256, 512, 256]), [0.5, 0.625]);
    // No budget at all (nothing connected yet): the nodes' memory.
    assert_eq!(parts([0, 0, 0]), [0.5, 0.5]);
    // No part is more than the node has: a 3 GiB ceiling over two nodes
    // of 1 GiB, vector's budget all on node 0.
    let big = Config::parse(&text.replace("\"1GiB\"", "\"3GiB\"")).unwrap();
    let rules = Rules::from_config(&big)
        .on_nodes(&big, &two_nodes())
        .unwrap();
    let p = rules.node_parts([("vector", 2048 * MIB), ("query", 0), ("sparse", 0)]);
    assert_eq!(p.into_values().collect::<Vec<_>>(), [1.0 / 3.0, 1.0 / 3.0]);
    // The operator's weights fix the parts, wherever the budgets are.
    let fixed = Config::parse(&text.replace(
        "ceiling = \"1GiB\"\n",
        "ceiling = \"1GiB\"\n[numa]\nweights = [1, 3]\n",
    ))
    .unwrap();
    let rules = Rules::from_config(&fixed)
        .on_nodes(&fixed, &two_nodes())
        .unwrap();
    let p = rules.node_parts([("vector", 512 * MIB), ("query", 256 * MIB), ("sparse", 0)]);
    assert_eq!(p.into_values().collect::<Vec<_>>(), [0.25, 0.75]);
}

#[test]
fn a_node_the_configuration_fills_with_budgets_has_the_ceilings_room_for_them() {
    use Msg::*;
    // A 1000 MiB ceiling over two equal nodes; vector (400 MiB) on node 0,
    // query and timeseries (300 MiB each) on node 1: 600 MiB of budgets
    // there, against 500 MiB if the ceiling were split by the nodes'
    // memory. Floors at the budgets: no loans.
    let text = "database = \"t\"\nceiling = \"1000MiB\"\n\
         [[engine]]\nname = \"vector\"\nbudget = \"400MiB\"\nfloor = \"400MiB\"\ncpus = \"0\"\n\
         [[engine]]\nname = \"query\"\nbudget = \"300MiB\"\nfloor = \"300MiB\"\ncpus = \"1\"\n\
         [[engine]]\nname = \"timeseries\"\nbudget = \"300MiB\"\nfloor = \"300MiB\"\ncpus = \"1\"\n";
    let engines = ["vector", "query", "timeseries"];
    // Node 1 holds 470 MiB, each engine there at 78% of its budget
    // (Warning), the database at 57% of its ceiling.
    let r = node_reading(&[
        ("vector", [100, 0]),
        ("query", [0, 235]),
        ("timeseries", [0, 235]),
    ]);
    let config = Config::parse(text).unwrap();
    let rules = Rules::from_config(&config)
        .on_nodes(&config, &two_nodes())
        .unwrap();
    let (mut w, _) = World::with_rules(rules, &engines);
    let sent = w.tick_on(&r, None, None);
    assert!(
        !sent
            .iter()
            .any(|m| matches!(m, Spill(..) | Pressure(_, Critical))),
        "node 1's part is 600 of 1000 MiB: not crowded at 470 MiB: {sent:?}"
    );
    assert!(w.status().crowded_nodes.is_empty());
    // The parts the round judged by, for the status: node 0 keeps its
    // memory's half (more than its budgets' 40%).
    assert_eq!(
        w.policy.node_parts().values().copied().collect::<Vec<_>>(),
        [0.5, 0.6]
    );
    // Split by the nodes' memory (the operator's equal weights), the same
    // figures crowd node 1 (470 MiB past Critical of its 500): its engines
    // are held to shares fitted by 500 / 600 and spill.
    let even = Config::parse(&text.replace(
        "ceiling = \"1000MiB\"\n",
        "ceiling = \"1000MiB\"\n[numa]\nweights = [1, 1]\n",
    ))
    .unwrap();
    let rules = Rules::from_config(&even)
        .on_nodes(&even, &two_nodes())
        .unwrap();
    let (mut w, _) = World::with_rules(rules, &engines);
    let sent = w.tick_on(&r, None, None);
    assert!(
        sent.iter().any(|m| matches!(m, Spill("query", _)))
            && sent.iter().any(|m| matches!(m, Spill("timeseries", _))),
        "{sent:?}"
    );
    assert_eq!(w.status().crowded_nodes, [(1, 1)].into());
}

#[test]
fn an_engine_past_critical_of_its_node_share_is_held_there_by_its_cap() {
    use Msg::*;
    // Query (256 MiB budget, 64 MiB floor) split evenly: 128 MiB per
    // node. At 120 MiB on node 1 it is past the Critical threshold of its
    // share there, 24 MiB beyond the restore point (96 MiB): its cap comes
    // down to what it holds less that, far below its budget, so an engine
    // a spill request does not reach (a pool that spills when refused)
    // gives it back by its library's refusals.
    // (Vector's floor is its budget: it lends nothing.)
    let config = Config::parse(
        "database = \"t\"\nceiling = \"1GiB\"\n\
         [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\nfloor = \"256MiB\"\n\
         cpus = \"0\"\nnode_weights = [1, 1]\n\
         [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\nfloor = \"64MiB\"\n\
         cpus = \"1\"\nnode_weights = [1, 1]\n",
    )
    .unwrap();
    let rules = Rules::from_config(&config)
        .on_nodes(&config, &two_nodes())
        .unwrap();
    let (mut w, _) = World::with_rules(rules, &["vector", "query"]);
    let r = node_reading(&[("vector", [10, 0]), ("query", [0, 120])]);
    assert_eq!(
        w.tick_on(&r, None, None),
        [
            Limits("query", 64 * MIB, 96 * MIB),
            Pressure("query", Critical),
            Purge("query"),
            Spill("query", 24 * MIB),
        ]
    );
    assert_eq!(w.status().engines["query"].cap_bytes, 96 * MIB);
    // Still past it by the same: held where it is (no new limits).
    let sent = w.after(300).tick_on(&r, None, None);
    assert!(!sent.iter().any(|m| matches!(m, Limits(..))), "{sent:?}");
    // Under Critical but not yet back at the restore point: still held.
    let r = node_reading(&[("vector", [10, 0]), ("query", [0, 110])]);
    let sent = w.after(300).tick_on(&r, None, None);
    assert!(!sent.iter().any(|m| matches!(m, Limits(..))), "{sent:?}");
    assert_eq!(w.status().engines["query"].cap_bytes, 96 * MIB);
    // Back under it: the cap is the budget again.
    let r = node_reading(&[("vector", [10, 0]), ("query", [0, 90])]);
    let sent = w.after(300).tick_on(&r, None, None);
    assert!(
        sent.contains(&Limits("query", 64 * MIB, 256 * MIB)),
        "{sent:?}"
    );
}

/// A reaction to one process's crossing runs the ladder for that
/// process's library alone: another library over its budget (or a flood
/// of idle ones) waits for the tick, and adds nothing to the reaction.
#[test]
fn a_reaction_runs_the_ladder_for_the_crossed_process_only() {
    const OTHER_PID: u32 = 8;
    const OTHER: SessionId = 2;
    let (mut w, _) = World::new(&["vector"], true);
    w.policy
        .connect(OTHER, OTHER_PID, 0, &["vector".to_owned()]);
    let over = |pid| ProcessAttribution {
        pid,
        engines: [(
            "vector".to_owned(),
            Attributed {
                resident_bytes: 240 * MIB,
                ..Attributed::default()
            },
        )]
        .into(),
        ..ProcessAttribution::default()
    };
    let r = Reading {
        processes: vec![over(PID), over(OTHER_PID)],
    };
    let t = Tick {
        now: w.now,
        reading: Some(&r),
        ceiling: None,
        psi: None,
    };
    let spills_to = |actions: Vec<Action>| -> Vec<SessionId> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Send {
                    session,
                    message: ToLibrary::Spill { .. },
                } => Some(session),
                _ => None,
            })
            .collect()
    };
    assert_eq!(spills_to(w.policy.react(&t, &[PID])), [S]);
    // The tick then serves the other (the first is answered already).
    let t = Tick {
        now: w.now + Duration::from_millis(20),
        ..t
    };
    assert_eq!(spills_to(w.policy.tick(&t)), [OTHER]);
}

/// The database in Emergency with every engine inside its budget (budgets
/// add up to more than the ceiling, and memory nobody reserved fills the
/// rest): each engine is asked for its part of what the database holds
/// beyond the restore point, in proportion to what it holds above its
/// floor, not again while a request is out, and no more once the
/// Emergency is over. Where the kernel does not throttle (cgroup v1 has no
/// `memory.high`) nothing else stops the database before `memory.max`:
/// the soak (seed 1, six engines, a full tmpfs) was OOM-killed without it.
#[test]
fn in_an_emergency_every_engine_spills_its_part() {
    use Msg::*;
    let (mut w, _) = World::new(&["vector", "query"], true);
    // vector 200 MiB (no floor), query 164 MiB (64 of floor): 100 above
    // it; each at 78% / 64% of its 256 MiB budget, below Critical.
    let r = reading(&[("vector", 200 * MIB), ("query", 164 * MIB)]);
    // 1000 MiB of 1024 (98%): 232 MiB beyond the restore point (768).
    let got = w.tick_on(&r, cgroup(1000), None);
    assert!(got.contains(&High(Some(768 * MIB))), "{got:?}");
    let spills: Vec<(&str, u64)> = got
        .iter()
        .filter_map(|m| match m {
            Spill(e, b) => Some((*e, *b)),
            _ => None,
        })
        .collect();
    // 232 MiB split 200 : 100.
    let part = |held: u64| 232 * MIB * held / 300;
    assert_eq!(
        spills,
        [("vector", part(200)), ("query", part(100))],
        "{got:?}"
    );
    assert_eq!(w.status().engines["vector"].ceiling_spills, 1);
    assert_eq!(w.status().engines["query"].spill_requests, 1);
    // A request out: not asked again within SPILL_RETRY.
    let got = w.after(20).tick_on(&r, cgroup(1000), None);
    assert!(!got.iter().any(|m| matches!(m, Spill(..))), "{got:?}");
    // Still in Emergency after it: asked again, for what is left.
    let got = w.after(250).tick_on(&r, cgroup(900), None);
    assert!(
        got.contains(&Spill("vector", 132 * MIB * 200 / 300)),
        "{got:?}"
    );
    // Answered or not, freed or not, the next request waits SPILL_RETRY
    // (a spill to a tmpfs leaves the cgroup's figure where it was: asked
    // at every tick, an engine would be spilled to its floor).
    w.policy.on_spilled(S, "query", 44 * MIB, 44 * MIB);
    w.policy.on_spilled(S, "vector", 88 * MIB, 0);
    let got = w.after(20).tick_on(&r, cgroup(900), None);
    assert!(!got.iter().any(|m| matches!(m, Spill(..))), "{got:?}");
    let got = w.after(250).tick_on(&r, cgroup(900), None);
    assert_eq!(
        got,
        [
            Spill("vector", 132 * MIB * 200 / 300),
            Spill("query", 132 * MIB * 100 / 300)
        ]
    );
    // Below warning: over, and nothing more is asked.
    let got = w.after(300).tick_on(&r, cgroup(700), None);
    assert_eq!(got, [High(None), Limits("query", 64 * MIB, 256 * MIB)]);
    let got = w.after(300).tick_on(&r, cgroup(700), None);
    assert_eq!(got, []);
}

/// Two libraries in one process (vector's and query's): in an Emergency
/// they split the process's part of the excess by what their own engines
/// hold, instead of each being asked for all of it.
#[test]
fn libraries_sharing_a_process_split_its_part_of_an_emergency() {
    const OTHER: SessionId = 2;
    let (mut w, _) = World::new(&["vector"], true);
    w.policy.connect(OTHER, PID, 0, &["query".to_owned()]);
    let r = reading(&[("vector", 200 * MIB), ("query", 164 * MIB)]);
    // 1000 MiB of 1024: 232 MiB beyond the restore point (768), all of it
    // this process's; vector holds 200 of the 364, query 164 (64 of them
    // its floor).
    let actions = w.policy.tick(&Tick {
        now: w.now,
        reading: Some(&r),
        ceiling: cgroup(1000),
        psi: None,
    });
    let spills: Vec<(SessionId, String, u64)> = actions
        .into_iter()
        .filter_map(|a| match a {
            Action::Send {
                session,
                message:
                    ToLibrary::Spill {
                        engine,
                        target_bytes,
                    },
            } => Some((session, engine, target_bytes)),
            _ => None,
        })
        .collect();
    let share = |held: u64| 232 * MIB * held / 364;
    assert_eq!(
        spills,
        [
            (S, "vector".to_owned(), share(200)),
            (OTHER, "query".to_owned(), share(164).min(100 * MIB)),
        ]
    );
    let asked: u64 = spills.iter().map(|s| s.2).sum();
    assert!(asked <= 232 * MIB, "{asked}");
}

/// An `outside` figure sent to a library.
fn is_outside(a: &Action) -> bool {
    matches!(
        a,
        Action::Send {
            message: ToLibrary::Outside { .. },
            ..
        }
    )
}

/// A tick of `w` on vector holding 10 MiB and a cgroup of `c`, after `ms`:
/// the `outside` figures it sent (bytes, ceiling).
fn outside_after(w: &mut World, ms: u64, c: Option<CeilingUse>) -> Vec<(u64, u64)> {
    w.now += Duration::from_millis(ms);
    w.policy
        .tick(&Tick {
            now: w.now,
            reading: Some(&reading(&[("vector", 10 * MIB)])),
            ceiling: c,
            psi: None,
        })
        .into_iter()
        .filter_map(|a| match a {
            Action::Send {
                message:
                    ToLibrary::Outside {
                        bytes,
                        ceiling_bytes,
                    },
                ..
            } => Some((bytes, ceiling_bytes)),
            _ => None,
        })
        .collect()
}

/// What the database holds that the kernel cannot drop beyond the
/// library's books is sent to the library first, then only when it moved
/// a step (ceiling / 64 = 16 MiB here) from what was last sent; observing,
/// never. Memory that leaves the books for somewhere the kernel cannot drop
/// it either (a spill written to a tmpfs: the cgroup's figure unmoved) is
/// sent too: the soak (seed 1) was OOM-killed when the library, working it
/// out from its own books, took such a spill for room.
#[test]
fn memory_outside_the_books_is_sent_first_then_as_it_moves_a_step() {
    let outside = |w: &mut World, ms: u64, mib: u64| -> Vec<u64> {
        let mut c = cgroup(mib);
        if let Some(c) = &mut c {
            // Page cache besides: only anonymous and shared memory count.
            c.charge_bytes += 100 * MIB;
        }
        outside_after(w, ms, c)
            .into_iter()
            .map(|(b, _)| b)
            .collect()
    };
    let (mut w, _) = World::new(&["vector", "query"], true);
    // Nothing before every engine's books are in: counted as none, the
    // library's own reservations would be outside them as well.
    w.report("vector", 100 * MIB, 0);
    assert!(outside(&mut w, 0, 300).is_empty());
    w.report("query", 0, 0);
    assert_eq!(outside(&mut w, 0, 300), [200 * MIB]);
    assert!(outside(&mut w, 20, 300).is_empty());
    assert!(outside(&mut w, 20, 315).is_empty());
    assert_eq!(outside(&mut w, 20, 316), [216 * MIB]);
    assert!(outside(&mut w, 20, 301).is_empty());
    assert_eq!(outside(&mut w, 20, 300), [200 * MIB]);
    // 40 MiB spilled to a tmpfs: the cgroup holds as much as before, the
    // books 40 MiB less.
    w.report("vector", 60 * MIB, 0);
    assert_eq!(outside(&mut w, 20, 300), [240 * MIB]);
    // Without a kernel ceiling: what the processes hold.
    let r = reading(&[("vector", 64 * MIB)]);
    let got: Vec<Action> = w
        .policy
        .tick(&Tick {
            now: w.now + Duration::from_millis(20),
            reading: Some(&r),
            ceiling: None,
            psi: None,
        })
        .into_iter()
        .filter(is_outside)
        .collect();
    assert_eq!(
        got,
        [Action::Send {
            session: S,
            message: ToLibrary::Outside {
                bytes: 4 * MIB,
                // The Emergency mark (97%) of the 1 GiB ceiling.
                ceiling_bytes: (1024.0 * MIB as f64 * 0.97) as u64
            }
        }]
    );
    // A reload that lowers the ceiling sends the new room at once, before
    // the limits (the kernel has the new ceiling already).
    let half = Rules::from_config(
        &Config::parse(
            "database = \"t\"\nceiling = \"512MiB\"\n\
             [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\n\
             [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\nfloor = \"64MiB\"\nessential = false\n",
        )
        .unwrap(),
    );
    let sent = w.policy.reload(half);
    assert!(
        matches!(
            sent.first(),
            Some(Action::Send {
                message: ToLibrary::Outside { ceiling_bytes, .. },
                ..
            }) if *ceiling_bytes == (512.0 * MIB as f64 * 0.97) as u64
        ),
        "{sent:?}"
    );
    assert!(sent.iter().any(|a| matches!(
        a,
        Action::Send {
            message: ToLibrary::Limits { .. },
            ..
        }
    )));
    w.policy.reload(rules(true));
    // A reload to observing takes the figure back, once.
    let back = |w: &mut World| outside_after(w, 20, cgroup(300));
    let sent = w.policy.reload(rules(false));
    let taken_back: Vec<&Action> = sent.iter().filter(|a| is_outside(a)).collect();
    assert_eq!(
        taken_back,
        [&Action::Send {
            session: S,
            message: ToLibrary::Outside {
                bytes: 0,
                ceiling_bytes: u64::MAX
            }
        }]
    );
    assert!(back(&mut w).is_empty());
    let (mut observing, _) = World::new(&["vector", "query"], false);
    assert!(outside(&mut observing, 0, 300).is_empty());
}

/// Where the kernel throttles the database above a high mark (cgroup v2's
/// `memory.high`, at the Critical threshold), the libraries' reservations
/// stop at that mark instead of the Emergency's: above it each one would
/// be paid for in reclaim and throttling of the whole database, not
/// refused for its engine to spill. A 6.1 run whose budgets added up to
/// more than the high mark sat under it for 320 s, 286 s of them stalled.
#[test]
fn reservations_stop_at_the_high_mark_where_the_kernel_throttles_above_it() {
    let (mut w, _) = World::new(&["vector", "query"], true);
    w.report("vector", 100 * MIB, 0);
    w.report("query", 0, 0);
    let emergency_mark = (1024.0 * MIB as f64 * 0.97) as u64;
    let high = |mib: u64| {
        cgroup(300).map(|c| CeilingUse {
            throttle_bytes: Some(mib * MIB),
            ..c
        })
    };
    // cgroup v1 (no throttling below the ceiling): the Emergency's mark.
    assert_eq!(
        outside_after(&mut w, 0, cgroup(300)),
        [(200 * MIB, emergency_mark)]
    );
    // v2, the high mark at 90%: there, sent at once although the held
    // figure did not move.
    assert_eq!(
        outside_after(&mut w, 20, high(921)),
        [(200 * MIB, 921 * MIB)]
    );
    assert!(outside_after(&mut w, 20, high(921)).is_empty());
    // A high mark above the Emergency's (thresholds set so): the lower.
    assert_eq!(
        outside_after(&mut w, 20, high(1000)),
        [(200 * MIB, emergency_mark)]
    );
    // A reload sends the room with the mark last seen, against the new
    // ceiling: the lower of the two.
    outside_after(&mut w, 20, high(921));
    let half = Rules::from_config(
        &Config::parse(
            "database = \"t\"\nceiling = \"512MiB\"\n\
             [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\n\
             [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\n",
        )
        .unwrap(),
    );
    let sent: Vec<u64> = w
        .policy
        .reload(half)
        .into_iter()
        .filter_map(|a| match a {
            Action::Send {
                message: ToLibrary::Outside { ceiling_bytes, .. },
                ..
            } => Some(ceiling_bytes),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [(512.0 * MIB as f64 * 0.97) as u64]);
}

/// Books the library reports are any u64: summed, they saturate (the
/// session fuzzer's crash: two engines reporting near u64::MAX overflowed
/// the sum behind `outside`).
#[test]
fn books_near_the_top_of_u64_saturate_instead_of_overflowing() {
    let (mut w, _) = World::new(&["vector", "query"], true);
    w.report("vector", u64::MAX / 2 + 1, 0);
    w.report("query", u64::MAX / 2 + 1, 0);
    let sent: Vec<u64> = outside_after(&mut w, 0, cgroup(300))
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert_eq!(sent, [0]);
}
