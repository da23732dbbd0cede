//! `cargo xtask run`: the agent with the bundled default configuration and
//! the three-engine demo, governed end to end: the demo embeds the library,
//! connects over the control socket and registers its threads; its engines
//! grow past their budgets and the agent spills them back. Attribution,
//! budgets and spills are shown live; `/metrics` is served at
//! 127.0.0.1:9187 and `nodedb-governor status` works in another terminal.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    cargo::{self, Binaries, Profile},
    cmd::{self, step},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Kills a child when dropped.
struct Reaped(Child, libc::c_int);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.0.id() as i32, self.1) };
        let _ = self.0.wait();
    }
}

const SOCKET: &str = "/run/nodedb-governor/agent.sock";
const CONTROL: &str = "/run/nodedb-governor/control.sock";

pub fn run(seconds: Option<u64>) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the agent loads eBPF programs and manages cgroups: run `cargo xtask run` as root");
    }
    step("building the agent and the demo (release)");
    let [agent_bin, demo_bin] = cargo::build(
        Profile::Release,
        &[
            Binaries::new("nodedb-governor-agent", &["nodedb-governor"]),
            Binaries::new("nodedb-governor-demo", &["nodedb-demo"]),
        ],
    )?
    .try_into()
    .expect("two binaries asked for, two paths");

    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };

    step("starting the agent with the bundled default configuration");
    let _ = std::fs::remove_file(SOCKET);
    let agent = Reaped(
        Command::new(&agent_bin)
            .arg("run")
            .spawn()
            .context("starting nodedb-governor")?,
        libc::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Path::new(SOCKET).exists() || !Path::new(CONTROL).exists() {
        if Instant::now() > deadline {
            bail!("the agent did not open {SOCKET} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    step("starting the demo database (vector, timeseries, query), governed through the library");
    // Scale 4: the query bursts and timeseries buffers outgrow their
    // budgets (40% and 30% of the 1 GiB ceiling), so the agent spills them.
    let mut demo = Reaped(
        Command::new(&demo_bin)
            .args(["--scale", "4", "--control-socket", CONTROL])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting nodedb-demo")?,
        libc::SIGKILL,
    );
    let mut hello = String::new();
    BufReader::new(demo.0.stdout.take().context("demo stdout")?)
        .read_line(&mut hello)
        .context("reading the demo's engines")?;
    let hello: serde_json::Value = serde_json::from_str(&hello).context("demo hello is JSON")?;
    let pid = hello["pid"].as_u64().context("demo pid")?;
    eprintln!("    demo pid {pid}: it registers its threads over {CONTROL}");
    eprintln!("    metrics: curl -s http://127.0.0.1:9187/metrics | grep nodedb_governor");
    eprintln!("    live view: sudo target/release/nodedb-governor top   (in another terminal)");

    step("live attribution and enforcement (Ctrl-C to stop)");
    let started = Instant::now();
    while !STOP.load(Ordering::SeqCst)
        && seconds.is_none_or(|s| started.elapsed() < Duration::from_secs(s))
    {
        let out = Command::new(&agent_bin).arg("status").output()?;
        print!("\x1b[2J\x1b[H{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(demo);
    drop(agent);
    eprintln!("==> stopped");
    Ok(())
}
