//! Pressure stall information (PSI) as an input to the ladder.
//!
//! A trigger (`some <stall us> <window us>`) is written to a
//! `memory.pressure` file: the database's cgroup v2 directory (PSI is
//! accounted per cgroup v2 whether or not the memory controller is there,
//! so this works on hybrid hosts too) or the host's `/proc/pressure/memory`.
//! The kernel then wakes a `poll(POLLPRI)` whenever the cgroup's tasks
//! stalled on memory (reclaim, refaults, throttling) for more than the
//! stall time within a window. A thread of its own polls; the agent's tick
//! reads the count of events, so the control loop never blocks on it.
//!
//! Without CAP_SYS_RESOURCE the kernel takes only windows that are
//! multiples of 2 s (it then aggregates on its averaging clock instead of
//! an RT poller): the window is rounded up, and the status says so. Such a
//! trigger has a quirk: a read of the pressure file that lands before the
//! kernel's averaging work advances the averages without looking at the
//! triggers, and the event is lost. So the figures are read by the polling
//! thread alone, once per window, and a stall that grew past the threshold
//! since its last read with no event counts as one.

use std::{
    fs,
    io::Write,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::error::AgentError;

/// What `memory.pressure` says now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PsiFigures {
    /// Share of the last 10 s in which some task stalled on memory (0..1).
    pub some_avg10: f64,
    /// Share of the last 10 s in which all non-idle tasks stalled.
    pub full_avg10: f64,
    pub some_total_us: u64,
    pub full_total_us: u64,
}

/// What is wrong with a pressure file.
#[derive(Debug, thiserror::Error)]
pub enum PsiError {
    #[error("unexpected pressure line {line:?}")]
    Line { line: String },
    #[error("unexpected pressure kind {kind:?}")]
    Kind { kind: String },
    #[error("no `some` line")]
    NoSome,
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<PsiError>,
    },
}

impl PsiFigures {
    /// Parses the `some …`/`full …` lines of a pressure file.
    pub fn parse(text: &str) -> Result<Self, PsiError> {
        let mut f = Self::default();
        let mut seen = (false, false);
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let kind = words.next().unwrap_or_default();
            let (mut avg10, mut total) = (None, None);
            for w in words {
                match w.split_once('=') {
                    Some(("avg10", v)) => avg10 = v.parse::<f64>().ok(),
                    Some(("total", v)) => total = v.parse::<u64>().ok(),
                    _ => {}
                }
            }
            let (Some(avg10), Some(total)) = (avg10, total) else {
                return Err(PsiError::Line {
                    line: line.to_owned(),
                });
            };
            match kind {
                "some" => {
                    (f.some_avg10, f.some_total_us) = (avg10 / 100.0, total);
                    seen.0 = true;
                }
                "full" => {
                    (f.full_avg10, f.full_total_us) = (avg10 / 100.0, total);
                    seen.1 = true;
                }
                other => {
                    return Err(PsiError::Kind {
                        kind: other.to_owned(),
                    });
                }
            }
        }
        if !seen.0 {
            return Err(PsiError::NoSome);
        }
        Ok(f)
    }

    pub fn read(path: &Path) -> Result<Self, PsiError> {
        let text = fs::read_to_string(path).map_err(|source| PsiError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| PsiError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }
}

/// The PSI input as the status shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PsiStatus {
    pub source: String,
    pub stall_us: u64,
    pub window_us: u64,
    /// The window was rounded up to a multiple of 2 s (no
    /// CAP_SYS_RESOURCE).
    pub window_rounded: bool,
    pub triggers: u64,
    /// A trigger fired within the last window.
    pub stalling: bool,
    pub figures: PsiFigures,
}

/// A PSI trigger and the thread that polls it; stopped on drop.
pub struct PsiMonitor {
    source: PathBuf,
    stall_us: u64,
    window_us: u64,
    window_rounded: bool,
    events: Arc<AtomicU64>,
    figures: Arc<std::sync::Mutex<PsiFigures>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Opens `path` and writes the trigger into it. The kernel keeps the
/// trigger as long as the file stays open.
fn arm(path: &Path, stall_us: u64, window_us: u64) -> std::io::Result<fs::File> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    // The kernel overwrites the last byte written with a NUL: send one.
    f.write_all(format!("some {stall_us} {window_us}\0").as_bytes())?;
    Ok(f)
}

impl PsiMonitor {
    /// Arms a trigger on `source` and starts polling it.
    pub fn start(source: &Path, stall: Duration, window: Duration) -> Result<Self, AgentError> {
        let stall_us = stall.as_micros() as u64;
        let mut window_us = window.as_micros() as u64;
        let mut window_rounded = false;
        let file = match arm(source, stall_us, window_us) {
            Ok(f) => f,
            // Unprivileged triggers need 2 s windows.
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    && !window_us.is_multiple_of(2_000_000) =>
            {
                window_us = window_us.div_ceil(2_000_000) * 2_000_000;
                window_rounded = true;
                let f = arm(source, stall_us, window_us).map_err(|e| {
                    AgentError::io(format!("arming a PSI trigger on {}", source.display()), e)
                })?;
                tracing::warn!(
                    source = %source.display(),
                    window_us,
                    "the kernel refused a PSI window that is not a multiple of 2 s (no CAP_SYS_RESOURCE): rounded up"
                );
                f
            }
            Err(e) => {
                return Err(AgentError::io(
                    format!("arming a PSI trigger on {}", source.display()),
                    e,
                ));
            }
        };
        let events = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let first = PsiFigures::read(source).map_err(|e| AgentError::CgroupUnusable {
            path: source.to_owned(),
            reason: e.to_string(),
        })?;
        let figures = Arc::new(std::sync::Mutex::new(first));
        let thread = {
            let poller = Poller {
                file,
                source: source.to_owned(),
                stall_us,
                window: Duration::from_micros(window_us),
                events: events.clone(),
                figures: figures.clone(),
                stop: stop.clone(),
            };
            std::thread::Builder::new()
                .name("psi-poll".into())
                .spawn(move || poller.run())
                .map_err(|e| AgentError::io("starting the PSI thread", e))?
        };
        tracing::info!(source = %source.display(), stall_us, window_us, "PSI trigger armed");
        Ok(Self {
            source: source.to_owned(),
            stall_us,
            window_us,
            window_rounded,
            events,
            figures,
            stop,
            thread: Some(thread),
        })
    }

    /// How many times the trigger fired.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    pub fn window(&self) -> Duration {
        Duration::from_micros(self.window_us)
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn status(&self, stalling: bool) -> PsiStatus {
        PsiStatus {
            source: self.source.display().to_string(),
            stall_us: self.stall_us,
            window_us: self.window_us,
            window_rounded: self.window_rounded,
            triggers: self.events(),
            stalling,
            figures: *self.figures.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

struct Poller {
    file: fs::File,
    source: PathBuf,
    stall_us: u64,
    window: Duration,
    events: Arc<AtomicU64>,
    figures: Arc<std::sync::Mutex<PsiFigures>>,
    stop: Arc<AtomicBool>,
}

impl Poller {
    fn run(self) {
        // Capabilities are per thread, and this one polls a descriptor
        // already open: it keeps none (the agent drops its own later).
        if let Err(e) = crate::privilege::drop_capabilities(&Default::default()) {
            tracing::warn!(error = %e, "the PSI thread keeps its capabilities");
        }
        let mut last_read = std::time::Instant::now();
        let mut last_total = self.figures.lock().map_or(0, |f| f.some_total_us);
        let mut fired_since_read = false;
        while !self.stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 200) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(source = %self.source.display(), error = %e, "polling the PSI trigger failed; PSI input stopped");
                return;
            }
            if pfd.revents & libc::POLLERR != 0 {
                tracing::error!(source = %self.source.display(), "the PSI trigger's cgroup went away; PSI input stopped");
                return;
            }
            if pfd.revents & libc::POLLPRI != 0 {
                self.events.fetch_add(1, Ordering::Relaxed);
                fired_since_read = true;
            }
            if last_read.elapsed() >= self.window {
                last_read = std::time::Instant::now();
                match PsiFigures::read(&self.source) {
                    Ok(f) => {
                        let grew = f.some_total_us.saturating_sub(last_total);
                        if grew >= self.stall_us && !fired_since_read {
                            tracing::debug!(
                                grew,
                                "memory stall seen in the figures, no trigger event"
                            );
                            self.events.fetch_add(1, Ordering::Relaxed);
                        }
                        last_total = f.some_total_us;
                        fired_since_read = false;
                        *self.figures.lock().unwrap_or_else(|p| p.into_inner()) = f;
                    }
                    Err(e) => tracing::warn!(error = %e, "reading pressure figures"),
                }
            }
        }
    }
}

impl Drop for PsiMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_files_parse() {
        let f = PsiFigures::parse(
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=95369\n\
             full avg10=0.25 avg60=0.00 avg300=0.00 total=1200\n",
        )
        .unwrap();
        assert_eq!(f.some_total_us, 95369);
        assert_eq!(f.full_total_us, 1200);
        assert!((f.some_avg10 - 0.015).abs() < 1e-9);
        assert!((f.full_avg10 - 0.0025).abs() < 1e-9);
        // The host's cpu.pressure on old kernels has only `some`.
        let only_some =
            PsiFigures::parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=7").unwrap();
        assert_eq!(only_some.some_total_us, 7);
        assert!(matches!(PsiFigures::parse(""), Err(PsiError::NoSome)));
        assert!(matches!(
            PsiFigures::parse("some avg10=x total=1"),
            Err(PsiError::Line { .. })
        ));
        let e = PsiFigures::parse("most avg10=0.0 total=1").unwrap_err();
        assert!(e.to_string().contains("\"most\""), "{e}");
    }
}
