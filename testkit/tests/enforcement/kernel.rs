//! What the programs see of a governed process that does what libraries
//! do not tell the agent about: exec.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use nodedb_governor_testkit::{
    harness::{Reaped, probes::JsonLines},
    privileged::skip_unless_privileged,
    wait::wait_for,
};

const MIB: u64 = 1 << 20;

/// A governed process that calls exec is followed into its new image: the
/// memory the new program touches is counted for its engine (its new
/// address space is learned), the exec is counted, and the agent says so.
/// Before, every change of the new address space was dropped as another
/// process's: the engine showed the old image's memory, forever. Two
/// execs, as the allocator may give the third address space the first
/// one's address: each CPU's view of the counters' per-CPU parts must be
/// taken afresh at each (`MM_EPOCHS`), never read at the first one's.
#[test]
fn a_governed_process_that_execs_is_followed_into_its_new_image() {
    if skip_unless_privileged("exec followed") {
        return;
    }
    let agent = super::start_agent("");
    let probe = env!("CARGO_BIN_EXE_touch-probe");
    // A shell, governed, that execs a shell that execs the probe when
    // told to.
    let mut shell = Reaped(
        Command::new("sh")
            .args([
                "-c",
                "read go; exec sh -c 'read go; exec \"$0\" --mib 64' \"$0\"",
                probe,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh"),
    );
    let pid = shell.id();
    let out = agent.cli(&[
        "assign",
        "--pid",
        &pid.to_string(),
        "--tid",
        &pid.to_string(),
        "--engine",
        "vector",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resident = || {
        agent.status_json()["engines"]["vector"]["resident_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = resident();
    assert!(before < 16 * MIB, "the shell holds {before} bytes");
    let mut stdin = shell.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    writeln!(stdin, "go").unwrap();
    let touched = JsonLines::of(&mut shell).next_value();
    assert_eq!(touched["touched_bytes"], 64 * MIB, "{touched}");
    wait_for("the new image's memory to be the vector engine's", || {
        resident() >= 60 * MIB
    });
    // What the probe holds, not an old image's parts read as counts.
    let now = resident();
    assert!(now < 80 * MIB, "64 MiB touched, {now} bytes attributed");
    let status = agent.status_json();
    assert!(
        status["kernel_events"]["execs_followed"].as_u64() >= Some(2),
        "{}",
        status["kernel_events"]
    );
    assert_eq!(
        status["kernel_events"]["insert_failures"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_u64()).sum::<u64>()),
        Some(0),
        "{}",
        status["kernel_events"]
    );
    wait_for("the agent to log the exec", || {
        agent.log().contains("governed processes called exec")
    });
}
