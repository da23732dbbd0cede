//! The programs' maps over the life of many processes: what a process
//! leaves in them goes with it, so that a long-running agent governing
//! short-lived processes keeps counting, and what could not be inserted
//! is counted, never silent.
//!
//! Needs root (CI is root); elsewhere each test prints why it skips.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
};

use nodedb_governor_agent::attribution::{Attribution, ProgramSet};
use nodedb_governor_common::MAX_PROCS;
use nodedb_governor_testkit::{harness::Reaped, privileged::skip_unless_privileged};

const KIB: u64 = 1 << 10;

/// A governed process that grows its break by 2 × 256 KiB once told to,
/// and exits; returns it (reaped) and how much the vector engine's mapped
/// bytes grew meanwhile, read while it lived.
fn grow_break(att: &mut Attribution) -> (Reaped, u64) {
    let mut child = Reaped(
        Command::new(env!("CARGO_BIN_EXE_touch-probe"))
            .args(["--brk-kib", "256"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("touch-probe"),
    );
    let pid = child.id();
    att.register_process(pid, &["vector".to_owned()])
        .expect("registering");
    att.assign_tid(pid, pid, "vector").expect("assigning");
    let mapped = |att: &Attribution| {
        let reading = att.read().expect("reading");
        reading
            .processes
            .iter()
            .find(|p| p.pid == pid)
            .and_then(|p| p.engines.get("vector"))
            .map_or(0, |a| a.mapped_bytes)
    };
    // Its start (the loader's mappings) is not what is measured.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("ready"), "{line:?}");
    let before = mapped(att);
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("\"brk_bytes\":524288"), "{line:?}");
    let grown = mapped(att).saturating_sub(before);
    assert!(
        att.tracks_break(pid),
        "the programs never learned the break"
    );
    writeln!(stdin, "done").unwrap();
    let _ = child.wait();
    // Gone with the process, by the program at its exit: the agent has
    // not forgotten it yet.
    assert!(
        !att.tracks_break(pid),
        "process {pid}'s break outlived it in the kernel"
    );
    (child, grown)
}

/// More governed processes than the maps hold one entry each for come,
/// grow their break and go, each forgotten as the agent forgets a process
/// that exited; the break of every one of them is counted (the second
/// growth: the first is where the programs learn the break), up to the
/// last, and no insert failed. Before, `BRK` kept the break of every
/// process that had ever grown one: after 256, brk went uncounted for good.
#[test]
fn breaks_are_counted_after_more_processes_than_the_maps_hold() {
    if skip_unless_privileged("brk over many processes") {
        return;
    }
    let mut att = Attribution::load(ProgramSet::Full).expect("loading eBPF");
    let rounds = MAX_PROCS as usize + 44;
    let mut uncounted = Vec::new();
    for round in 0..rounds {
        let (child, grown) = grow_break(&mut att);
        if grown < 256 * KIB {
            uncounted.push((round, grown));
        }
        let pid = child.id();
        drop(child);
        assert_eq!(att.reap_exited(), [pid], "round {round}");
    }
    assert!(
        uncounted.is_empty(),
        "breaks not counted (round, mapped bytes): {uncounted:?}"
    );
    let events = att.kernel_events().expect("the programs' event counts");
    assert_eq!(
        events.insert_failures.values().sum::<u64>(),
        0,
        "{events:?}"
    );
}

/// A registration that runs out of counter slots midway gives back what
/// it took: with the slots nearly all taken, a process with many engines
/// is refused (naming the slots), and a small one registers after it in
/// what is left. Before, each failed registration kept the slots it had
/// taken, for good.
#[test]
fn a_registration_that_fails_midway_gives_back_its_slots() {
    use nodedb_governor_common::MAX_SLOTS;
    if skip_unless_privileged("registration rolled back") {
        return;
    }
    let mut att = Attribution::load(ProgramSet::Full).expect("loading eBPF");
    let sleepers: Vec<Reaped> = (0..12)
        .map(|_| Reaped(Command::new("sleep").arg("60").spawn().expect("sleep")))
        .collect();
    let engines = |n: usize| -> Vec<String> { (0..n).map(|i| format!("e{i}")).collect() };
    // Ten processes of 100 engines: 102 slots each, 4 left.
    let big = engines(100);
    for s in &sleepers[..10] {
        att.register_process(s.id(), &big).expect("registering");
    }
    assert_eq!(MAX_SLOTS as usize - 10 * 102, 4);
    // Takes the 4 left and needs more: refused, and gives them back.
    for _ in 0..3 {
        let e = att
            .register_process(sleepers[10].id(), &big)
            .expect_err("more slots than are left")
            .to_string();
        assert!(e.contains("counter slots"), "{e}");
        assert!(!att.is_registered(sleepers[10].id()));
    }
    // Two engines: the 4 slots a registration needs are still there.
    att.register_process(sleepers[11].id(), &engines(2))
        .expect("the slots the refused registrations took were given back");
    assert!(att.is_registered(sleepers[11].id()));
}
