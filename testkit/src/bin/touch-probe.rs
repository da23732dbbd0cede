//! A process that is no library: it touches `--mib` MiB of anonymous
//! memory, prints `{"touched_bytes": N}` and holds it for `--hold-ms`. For
//! tests of what the kernel side sees of a process the agent governs
//! without its cooperation (one it was assigned, or one that exec'd into
//! this).
//!
//! `--brk-kib N`: prints `{"ready": true}` and waits for a line on stdin,
//! then grows its break
//! twice by N KiB (`sbrk`) and touches both, prints `{"brk_bytes": 2N}`,
//! and waits for another line (or the end of stdin) before it exits.

use std::time::Duration;

use clap::Parser;
use nodedb_governor_demo::memory::{Block, Kind, MIB};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 0)]
    mib: usize,
    #[arg(long, default_value_t = 60_000)]
    hold_ms: u64,
    #[arg(long)]
    brk_kib: Option<usize>,
}

/// Grows the break by `kib` KiB twice, touching each step.
fn grow_break(kib: usize) -> anyhow::Result<()> {
    println!("{}", serde_json::json!({"ready": true}));
    std::io::Write::flush(&mut std::io::stdout())?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    for _ in 0..2 {
        // SAFETY: sbrk extends the heap glibc also grows with it; the
        // bytes it returns are this process's until the break moves back,
        // which nothing here does.
        let start = unsafe { libc::sbrk((kib << 10) as libc::intptr_t) };
        anyhow::ensure!(
            start as isize != -1,
            "sbrk: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: [start, start + kib KiB) was just given to this process.
        unsafe { std::ptr::write_bytes(start as *mut u8, 1, kib << 10) };
    }
    println!("{}", serde_json::json!({"brk_bytes": 2 * (kib << 10)}));
    std::io::Write::flush(&mut std::io::stdout())?;
    line.clear();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(kib) = args.brk_kib {
        return grow_break(kib);
    }
    let held: Vec<Block> = (0..args.mib)
        .map(|_| Block::new(Kind::Anon, MIB))
        .collect::<Result<_, _>>()?;
    println!("{}", serde_json::json!({"touched_bytes": held.len() * MIB}));
    std::io::Write::flush(&mut std::io::stdout())?;
    std::thread::sleep(Duration::from_millis(args.hold_ms));
    drop(held);
    Ok(())
}
