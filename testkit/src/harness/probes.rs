//! Driving the probes (the processes that embed the library) against an
//! agent, and reading what they print: one JSON report at the end, or a
//! JSON line at a time while they run.

use std::{
    io::{BufRead, BufReader, Lines},
    path::Path,
    process::{Child, ChildStdout, Command},
    sync::{Arc, Mutex},
};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::reaped::Reaped;

/// `bin --socket <control> --database <database>`: a probe pointed at an
/// agent (every probe takes these two); the caller adds the rest.
pub fn probe_command(bin: &Path, control: &Path, database: &str) -> Command {
    let mut c = Command::new(bin);
    c.arg("--socket")
        .arg(control)
        .args(["--database", database]);
    c
}

/// Starts a probe that runs until the test is done with it.
pub fn spawn(probe: &mut Command) -> Reaped {
    Reaped(probe.spawn().expect("starting the probe"))
}

/// Runs a probe to its end and parses its stdout as one JSON value (a
/// `serde_json::Value`, or a type of its own); panics, with the probe's
/// stderr, when it failed.
pub fn report<T: DeserializeOwned>(probe: &mut Command) -> T {
    let out = probe.output().unwrap();
    let name = Path::new(probe.get_program())
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A running probe's stdout (piped), a JSON value a line.
pub struct JsonLines(Lines<BufReader<ChildStdout>>);

impl JsonLines {
    /// Takes `probe`'s stdout, which must be piped.
    pub fn of(probe: &mut Child) -> Self {
        let out = probe.stdout.take().expect("the probe's stdout is piped");
        Self(BufReader::new(out).lines())
    }

    /// The next line; panics when the probe stopped or printed no JSON.
    pub fn next_value(&mut self) -> Value {
        serde_json::from_str(&self.0.next().expect("the probe runs").unwrap()).unwrap()
    }

    /// Every line from now on, collected by a thread of its own (for a
    /// probe that prints faster than the test looks).
    pub fn collect(self) -> Collected {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = lines.clone();
        std::thread::spawn(move || {
            for l in self.0.map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    collected.lock().unwrap().push(v);
                }
            }
        });
        Collected(lines)
    }
}

/// The lines a probe has printed so far.
pub struct Collected(Arc<Mutex<Vec<Value>>>);

impl Collected {
    /// The latest line (`Null` before the first).
    pub fn last(&self) -> Value {
        self.0.lock().unwrap().last().cloned().unwrap_or_default()
    }

    /// Whether any line so far satisfies `f`.
    pub fn any(&self, f: impl FnMut(&Value) -> bool) -> bool {
        self.0.lock().unwrap().iter().any(f)
    }
}
