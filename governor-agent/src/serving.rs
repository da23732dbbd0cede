//! The tasks that serve the agent's sockets and its HTTP endpoint, on a
//! thread and a runtime of their own: a flood of connections (accepts,
//! hellos, refusals, reading and writing frames, HTTP) is work for this
//! thread, not for the owner's, which runs at `SCHED_FIFO` and answers the
//! kernel's crossings at once whatever the sockets are doing. (A `status`
//! or a scrape still has the owner build a snapshot, once per request.)
//! Both sides meet only through channels (inputs to the owner, snapshots
//! and configurations from it, each library's outbound queue), which work
//! across runtimes.
//!
//! What the owner sends a library (a spill, a pressure level) is written
//! by a third thread, `deliver`, with a runtime of its own that runs only
//! the connections' writers, at the owner's scheduling (`SCHED_FIFO` at
//! `realtime_priority`): a request waits behind other requests, not
//! behind a flood's accepts and hellos in the serving thread's queue, nor
//! behind the database's or a flood's threads for a CPU. The
//! serving thread runs at a lower priority (nice [`SERVING_NICE`]), so a
//! flood it answers yields the CPU to the database and to delivery.

use std::{os::unix::net::UnixListener as StdUnixListener, sync::Arc, thread::JoinHandle};

use tokio::{
    net::{TcpListener, UnixListener},
    sync::{mpsc, oneshot, watch},
    task::JoinError,
};

use crate::{
    admin,
    config::Config,
    control, http,
    owner::{Input, Snapshots},
};

/// What the serving thread is given: its listeners, bound (and made
/// non-blocking) by the agent's main thread while it still had the
/// privileges to, and its ends of the owner's channels.
pub struct Parts {
    pub admin: StdUnixListener,
    pub admins: admin::server::Admins,
    pub control: StdUnixListener,
    pub metrics: Option<std::net::TcpListener>,
    pub inputs: mpsc::Sender<Input>,
    pub snapshots: Snapshots,
    pub configs: watch::Receiver<Arc<Config>>,
    /// Where the sessions record their requests' delivery times.
    pub deliveries: crate::latency::Shared,
}

/// A serving task that ended on its own (none does but by a panic or a
/// failed listener): its name and how it ended.
pub type Ended = (&'static str, Result<(), JoinError>);

/// The serving thread's nice value (the database's threads run at 0).
pub const SERVING_NICE: i32 = 10;

/// The running serving and delivery threads.
pub struct Serving {
    /// Resolves when a serving task ends on its own.
    pub ended: oneshot::Receiver<Ended>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    stop_delivery: Option<oneshot::Sender<()>>,
    delivery: Option<JoinHandle<()>>,
    /// The delivery thread's id (the owner gives it its own scheduling).
    pub delivery_tid: libc::pid_t,
}

impl Serving {
    /// Starts the threads (named `deliver` and `serve`). They are created
    /// by the caller's thread, whose capabilities (already dropped) they
    /// inherit, at the normal policy (the owner's `SCHED_FIFO` is set with
    /// `SCHED_RESET_ON_FORK`); `serve` then lowers itself to nice
    /// [`SERVING_NICE`], and the owner raises `deliver` with itself
    /// ([`delivery_tid`](Self::delivery_tid)).
    pub fn start(parts: Parts) -> anyhow::Result<Self> {
        let delivering = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deliver = delivering.handle().clone();
        let (stop_delivery, delivery_stopped) = oneshot::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let delivery = std::thread::Builder::new()
            .name("deliver".into())
            .spawn(move || {
                let _ = tid_tx.send(crate::sched::this_thread());
                delivering.block_on(async {
                    let _ = delivery_stopped.await;
                });
            })?;
        let delivery_tid = tid_rx.recv()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let (report, ended) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("serve".into())
            .spawn(move || {
                lower_priority();
                runtime.block_on(serve(parts, deliver, stopped, report));
            })?;
        Ok(Self {
            ended,
            stop: Some(stop),
            thread: Some(thread),
            stop_delivery: Some(stop_delivery),
            delivery: Some(delivery),
            delivery_tid,
        })
    }

    /// Stops the serving tasks and waits for the thread.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(stop) = self.stop_delivery.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.delivery.take() {
            let _ = thread.join();
        }
    }
}

/// Puts the calling thread at nice [`SERVING_NICE`] (raising one's own
/// nice value needs no privilege); a refusal is logged, not fatal.
fn lower_priority() {
    let tid = crate::sched::this_thread();
    // SAFETY: PRIO_PROCESS with a thread id names that thread alone.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, SERVING_NICE) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "the serving thread stays at the normal priority"
        );
    }
}

async fn serve(
    parts: Parts,
    deliver: tokio::runtime::Handle,
    stopped: oneshot::Receiver<()>,
    report: oneshot::Sender<Ended>,
) {
    let listen = |l: StdUnixListener| UnixListener::from_std(l);
    let (admin_l, control_l) = match (listen(parts.admin), listen(parts.control)) {
        (Ok(a), Ok(c)) => (a, c),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "registering the sockets with the serving runtime");
            return;
        }
    };
    let mut admin = tokio::spawn(admin::server::serve(
        admin_l,
        parts.admins,
        parts.inputs.clone(),
        parts.snapshots.clone(),
    ));
    let mut control = tokio::spawn(control::serve(
        control_l,
        parts.inputs,
        parts.configs,
        parts.deliveries,
        deliver,
    ));
    let mut metrics = match parts.metrics.map(TcpListener::from_std).transpose() {
        Ok(l) => l.map(|l| tokio::spawn(http::serve_on(l, parts.snapshots))),
        Err(e) => {
            // Without its endpoint (and /healthz) the agent stops: the
            // thread ends without a report, which the caller takes as such.
            tracing::error!(error = %e, "registering the metrics listener with the serving runtime");
            admin.abort();
            control.abort();
            return;
        }
    };
    let ended = tokio::select! {
        _ = stopped => None,
        ended = &mut admin => Some(("the admin socket's server", ended)),
        ended = &mut control => Some(("the control socket's server", ended)),
        ended = async {
            match metrics.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        } => Some(("the metrics endpoint", ended)),
    };
    admin.abort();
    control.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(ended) = ended {
        let _ = report.send(ended);
    }
}
