//! Sends one hello on the agent's control socket and prints the agent's
//! first reply as a JSON line (for tests that need another uid).

use std::{io::Read, os::unix::net::UnixStream, time::Duration};

use clap::Parser;
use nodedb_governor::control::wire::{self, Decoder, EngineDecl, ToAgent, ToLibrary};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    socket: std::path::PathBuf,
    #[arg(long)]
    database: String,
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
    let mut s = UnixStream::connect(&args.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // The agent may refuse (and close) before the hello is written: the
    // reply is read either way.
    let _ = std::io::Write::write_all(
        &mut s,
        &wire::encode(&ToAgent::Hello {
            version: wire::VERSION,
            database: args.database,
            engines: vec![EngineDecl {
                name: args.engine.clone(),
                floor_bytes: 0,
                cap_bytes: 1 << 30,
            }],
        }),
    );
    let mut d = Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = d.next_message::<ToLibrary>() {
            println!("{}", serde_json::to_string(&m?)?);
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
                        }],
                    }),
                )?;
            }
            let mut held = Vec::new();
            for _ in 0..args.touch_mib {
                held.push(nodedb_governor_demo::memory::Block::new(
                    nodedb_governor_demo::memory::Kind::Anon,
                    nodedb_governor_demo::memory::MIB,
                )?);
            }
            std::thread::sleep(Duration::from_millis(args.hold_ms));
            drop(held);
            return Ok(());
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            anyhow::bail!("the agent closed the connection without a reply");
        }
        d.push(&buf[..n]);
    }
}
