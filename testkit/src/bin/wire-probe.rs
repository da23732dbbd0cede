//! A client that speaks the control channel's raw frames instead of
//! embedding the library: sends one hello on the agent's control socket
//! and prints the agent's first reply as a JSON line; then, as asked,
//! reports a reservation, touches memory without reserving it and stays
//! connected a while. For tests that need another uid, a report the
//! library would not send, or a process the kernel kills at the ceiling.

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (mut s, mut d) = connect(&args.agent.socket)?;
    // The agent may refuse (and close) before the hello is written: the
    // reply is read either way.
    let _ = std::io::Write::write_all(&mut s, &hello(&args.agent.database, &[&args.engine]));
    let reply = read_reply(&mut s, &mut d)?;
    println!("{}", serde_json::to_string(&reply)?);
    std::io::Write::flush(&mut std::io::stdout())?;
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
