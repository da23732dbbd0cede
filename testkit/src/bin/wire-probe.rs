//! A client that speaks the control channel's raw frames instead of
//! embedding the library: sends one hello on the agent's control socket
//! and prints the agent's first reply as a JSON line; then, as asked,
//! reports a reservation, touches memory without reserving it and stays
//! connected a while. For tests that need another uid, a report the
//! library would not send, or a process the kernel kills at the ceiling.
//!
//! `--raw-frames N` prints the agent's first N frames, none skipped.
//! `--follow` prints every later reply too, until the agent ends the
//! connection (then `{"closed": true}`). `--fork-keeper`: after the reply
//! the process forks and exits, printing `{"parent": PID, "keeper":
//! CHILD}`; the child
//! keeps the connection and, for each line `TID` on its stdin, asks the
//! agent to place that thread (as if it were the connected process's),
//! following the replies as `--follow` does.

use std::time::Duration;

use clap::Parser;
use nodedb_governor::control::wire::{self, ToAgent};
use nodedb_governor_demo::memory::{Block, Kind, MIB};
use nodedb_governor_testkit::{
    probe::AgentArgs,
    wire::{connect, hello, read_reply},
};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    #[arg(long, default_value = "vector")]
    engine: String,
    /// After the reply, touch this many MiB (without reserving them).
    #[arg(long, default_value_t = 0)]
    touch_mib: usize,
    /// After the reply, report this many bytes reserved for the engine.
    #[arg(long)]
    report_reserved: Option<u64>,
    /// ...and stay connected this long.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// Print every reply until the connection ends.
    #[arg(long)]
    follow: bool,
    /// Print the first N frames the agent sends, none skipped (`outside`
    /// and `held_from` included), then exit.
    #[arg(long, default_value_t = 0)]
    raw_frames: usize,
    /// Fork after the reply; the parent exits, the child keeps the
    /// connection and sends a thread for each tid read from stdin.
    #[arg(long)]
    fork_keeper: bool,
}

/// Prints each reply as a JSON line until the agent closes the connection.
fn follow(s: &mut std::os::unix::net::UnixStream, d: &mut wire::Decoder) -> anyhow::Result<()> {
    s.set_read_timeout(None)?;
    while let Ok(reply) = read_reply(s, d) {
        println!("{}", serde_json::to_string(&reply)?);
        std::io::Write::flush(&mut std::io::stdout())?;
    }
    println!("{}", serde_json::json!({"closed": true}));
    Ok(())
}

/// Prints the first `n` frames as JSON lines, none skipped.
fn raw_frames(
    s: &mut std::os::unix::net::UnixStream,
    d: &mut wire::Decoder,
    n: usize,
) -> anyhow::Result<()> {
    let mut buf = [0u8; 4096];
    let mut printed = 0;
    while printed < n {
        if let Some(m) = d.next_message::<wire::ToLibrary>() {
            println!("{}", serde_json::to_string(&m?)?);
            printed += 1;
            continue;
        }
        let got = std::io::Read::read(s, &mut buf)?;
        anyhow::ensure!(got > 0, "the agent closed after {printed} frames");
        d.push(&buf[..got]);
    }
    std::io::Write::flush(&mut std::io::stdout())?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (mut s, mut d) = connect(&args.agent.socket)?;
    // The agent may refuse (and close) before the hello is written: the
    // reply is read either way.
    let _ = std::io::Write::write_all(&mut s, &hello(&args.agent.database, &[&args.engine]));
    if args.raw_frames > 0 {
        return raw_frames(&mut s, &mut d, args.raw_frames);
    }
    let reply = read_reply(&mut s, &mut d)?;
    println!("{}", serde_json::to_string(&reply)?);
    std::io::Write::flush(&mut std::io::stdout())?;
    if args.fork_keeper {
        // The child prints the agent's frames on the same stdout: it waits
        // for the parent's line first (a byte on this pipe, or its end),
        // so the reader sees the parent's line second, whatever runs first.
        let mut printed = [0 as libc::c_int; 2];
        // SAFETY: `printed` has room for the two descriptors.
        let piped = unsafe { libc::pipe(printed.as_mut_ptr()) };
        anyhow::ensure!(piped == 0, "pipe: {}", std::io::Error::last_os_error());
        // SAFETY: this process has one thread; the child only makes system
        // calls and allocates.
        let child = unsafe { libc::fork() };
        anyhow::ensure!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child > 0 {
            println!(
                "{}",
                serde_json::json!({"parent": std::process::id(), "keeper": child})
            );
            std::io::Write::flush(&mut std::io::stdout())?;
            // SAFETY: a byte from a live buffer to the pipe's write end;
            // then leaving at once, the connection left to the child.
            unsafe {
                libc::write(printed[1], [1u8].as_ptr().cast(), 1);
                libc::_exit(0)
            };
        }
        // SAFETY: the pipe's descriptors, this process's own; the read
        // goes into a live one-byte buffer (a byte, or 0 at the end).
        unsafe {
            libc::close(printed[1]);
            let mut byte = 0u8;
            libc::read(printed[0], (&raw mut byte).cast(), 1);
            libc::close(printed[0]);
        }
        let mut w = s.try_clone()?;
        let engine = args.engine.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(tid) = line.unwrap_or_default().trim().parse::<u32>() else {
                    break;
                };
                let thread = wire::encode(&ToAgent::Thread {
                    tid,
                    engine: engine.clone(),
                    moved: false,
                });
                if std::io::Write::write_all(&mut w, &thread).is_err() {
                    break;
                }
            }
        });
        return follow(&mut s, &mut d);
    }
    if args.follow {
        return follow(&mut s, &mut d);
    }
    if let Some(reserved) = args.report_reserved {
        std::io::Write::write_all(
            &mut s,
            &wire::encode(&ToAgent::Report {
                engines: vec![wire::EngineReport {
                    name: args.engine.clone(),
                    reserved_bytes: reserved,
                    rejections: 3,
                    arena_resident_bytes: None,
                    hot_set_bytes: 0,
                }],
            }),
        )?;
    }
    let mut held = Vec::new();
    for _ in 0..args.touch_mib {
        held.push(Block::new(Kind::Anon, MIB)?);
    }
    std::thread::sleep(Duration::from_millis(args.hold_ms));
    drop(held);
    Ok(())
}
