//! The control socket stands its ground: malformed, truncated and
//! oversized frames, wrong first messages, versions and databases get
//! errors while a good client keeps working; uids not on the allow-list
//! are refused.

use std::{
    io::{Read, Write},
    os::unix::{net::UnixStream, process::CommandExt},
};

use nodedb_governor::control::wire::{self, Decoder, MAX_FRAME, ToAgent, ToLibrary};
use nodedb_governor_testkit::{
    harness::{Agent, probes::report},
    privileged::skip_unless_privileged,
    wire::{expect_reply as reply, hello},
};

/// `body` framed as it is, message or not.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn connect(agent: &Agent) -> (UnixStream, Decoder) {
    nodedb_governor_testkit::wire::connect(&agent.control).unwrap()
}

#[test]
fn bad_frames_get_errors_while_a_good_client_keeps_working() {
    if skip_unless_privileged("control socket robustness") {
        return;
    }
    let agent = super::start_agent("");
    let (mut good, mut gd) = connect(&agent);
    good.write_all(&hello(&agent.database, &["query"])).unwrap();
    assert!(matches!(
        reply(&mut good, &mut gd),
        ToLibrary::Welcome { .. }
    ));

    // Malformed JSON in a well-formed frame: an error, and the connection
    // goes on (a later good message is served).
    let (mut bad, mut bd) = connect(&agent);
    bad.write_all(&hello(&agent.database, &["query"])).unwrap();
    assert!(matches!(
        reply(&mut bad, &mut bd),
        ToLibrary::Welcome { .. }
    ));
    while !matches!(reply(&mut bad, &mut bd), ToLibrary::Limits { .. }) {}
    bad.write_all(&frame(b"{\"type\":\"report\",\"engines\":7}"))
        .unwrap();
    match reply(&mut bad, &mut bd) {
        ToLibrary::Error { message } => assert!(message.contains("malformed"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    bad.write_all(&frame(b"\xff\xfe not json")).unwrap();
    assert!(matches!(reply(&mut bad, &mut bd), ToLibrary::Error { .. }));
    // A thread that is not the sender's: named.
    bad.write_all(&wire::encode(&ToAgent::Thread {
        tid: 1,
        engine: "query".into(),
        moved: false,
    }))
    .unwrap();
    match reply(&mut bad, &mut bd) {
        ToLibrary::Error { message } => assert!(message.contains("thread 1"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }

    // Oversized: an error, then the connection ends.
    let (mut big, mut bigd) = connect(&agent);
    big.write_all(&((MAX_FRAME + 1) as u32).to_be_bytes())
        .unwrap();
    match reply(&mut big, &mut bigd) {
        ToLibrary::Error { message } => assert!(message.contains("exceeds"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    let mut rest = Vec::new();
    assert_eq!(
        big.read_to_end(&mut rest).unwrap(),
        0,
        "closed after an oversized frame"
    );

    // Truncated: half a frame, then the writer closes.
    let (mut cut, mut cd) = connect(&agent);
    let h = hello(&agent.database, &["query"]);
    cut.write_all(&h[..h.len() / 2]).unwrap();
    cut.shutdown(std::net::Shutdown::Write).unwrap();
    match reply(&mut cut, &mut cd) {
        ToLibrary::Error { message } => assert!(message.contains("truncated"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }

    // A wrong first message, a wrong version, a wrong database: refused.
    for (body, want) in [
        (wire::encode(&ToAgent::Report { engines: vec![] }), "hello"),
        (
            wire::encode(&ToAgent::Hello {
                version: 99,
                database: agent.database.clone(),
                engines: vec![],
            }),
            "version 99",
        ),
        (hello("someone-else", &["query"]), "someone-else"),
    ] {
        let (mut s, mut d) = connect(&agent);
        s.write_all(&body).unwrap();
        match reply(&mut s, &mut d) {
            ToLibrary::Error { message } => assert!(message.contains(want), "{message}"),
            other => panic!("expected an error naming {want}, got {other:?}"),
        }
    }

    // Through all of that the good client was served: its report is taken
    // and a thread of its own is placed.
    good.write_all(&wire::encode(&ToAgent::Report { engines: vec![] }))
        .unwrap();
    let tid = nodedb_governor::control::link::current_tid();
    good.write_all(&wire::encode(&ToAgent::Thread {
        tid,
        engine: "query".into(),
        moved: false,
    }))
    .unwrap();
    loop {
        match reply(&mut good, &mut gd) {
            ToLibrary::ThreadPlaced { tid: t, .. } => {
                assert_eq!(t, tid);
                break;
            }
            ToLibrary::Error { message } => panic!("the good client got an error: {message}"),
            _ => {}
        }
    }
}

#[test]
fn uids_not_on_the_allow_list_are_refused() {
    if skip_unless_privileged("control socket allow-list") {
        return;
    }
    const NOBODY: u32 = 65534;
    let run = |agent: &Agent| {
        // The socket's group is the client's, as a deployment would set it,
        // so only the allow-list stands in the way.
        std::os::unix::fs::chown(&agent.control, None, Some(NOBODY)).unwrap();
        // The build tree may not be reachable by another uid (a 0700 clone
        // directory): run a copy from the agent's world-readable directory.
        let client = agent
            .dir()
            .copy_executable(env!("CARGO_BIN_EXE_wire-probe").as_ref());
        report::<ToLibrary>(agent.probe(client).uid(NOBODY).gid(NOBODY))
    };
    let agent = super::start_agent("");
    match run(&agent) {
        ToLibrary::Error { message } => {
            assert!(message.contains("uid 65534 is not allowed"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(agent);
    let agent = super::start_agent("allowed_uids = [65534]");
    assert!(
        matches!(run(&agent), ToLibrary::Welcome { .. }),
        "an allowed uid is welcomed"
    );
}
