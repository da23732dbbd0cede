//! The one owner of the agent's state. A single task holds the kernel side
//! (the attribution, the cgroup subtree, the ceiling, the PSI trigger), the
//! policy and the libraries' outbound channels; everything else (the
//! control sessions, the admin socket, signals) talks to it by sending an
//! [`Input`], and `/metrics` and `status` read the [`Snapshot`] it publishes
//! at every tick, so neither a scrape nor a slow client ever holds up
//! enforcement.
//!
//! Each tick: processes that entered the subtree are taken in, exited ones
//! forgotten, the attribution, the ceiling's cgroup and the PSI trigger are
//! read once, the [`Policy`] decides, its actions are carried out, and the
//! snapshot is published.

mod placement;
mod reload;
mod snapshot;
mod startup;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use nodedb_governor_common::MarkEvent;
pub use snapshot::{Health, Liveness, Snapshot, Snapshots};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, oneshot, watch},
};

use crate::{
    attribution::{Attribution, Identity, Reading},
    ceiling::Ceiling,
    cgroup::Subtree,
    config::Config,
    error::{AgentError, HelloError, MessageError, ReloadError},
    policy::{Action, CeilingUse, Policy, SessionId, Tick},
    psi::PsiMonitor,
};
use nodedb_governor::control::wire::{ToAgent, ToLibrary};

/// How often the tick reads the programs' event counts (failed inserts,
/// execs followed) to log what changed.
const KERNEL_EVENTS_EVERY: Duration = Duration::from_secs(1);

/// How often the owner looks for crossings while a helper thread waits on
/// the kernel for it (see `Agent::off_thread`).
const OFF_THREAD_POLL: Duration = Duration::from_micros(200);

/// A library's process as it connected: its pid with a pidfd for it and
/// its start time (which tell it from a later process given the same
/// pid), and its uid.
#[derive(Clone, Debug)]
pub struct Peer {
    pub pid: u32,
    /// The kernel's own handle on the process (None: the kernel gave
    /// none; the start time alone tells, to its 10 ms).
    pub pidfd: Option<Arc<std::os::fd::OwnedFd>>,
    pub start_time: u64,
    pub uid: u32,
}

/// What the other tasks ask of the owner.
#[derive(Debug)]
pub enum Input {
    /// A library's hello (its peer credentials already checked against
    /// the allow-list). Answered with the outcome; on success its
    /// messages go to `out`.
    Hello {
        session: SessionId,
        peer: Peer,
        out: crate::control::Outbound,
        hello: ToAgent,
        reply: oneshot::Sender<Result<(), HelloError>>,
    },
    /// A message from a welcomed library; a refusal goes back to it as an
    /// error message.
    Message {
        session: SessionId,
        message: ToAgent,
    },
    /// The library's connection ended.
    Disconnected { session: SessionId },
    /// `assign` on the admin socket: thread `tid` of `pid` into `engine`,
    /// asked by root (`by` None) or by a member of the admin group.
    Assign {
        pid: u32,
        tid: u32,
        engine: String,
        by: Option<u32>,
        reply: oneshot::Sender<Result<(), AgentError>>,
    },
    /// SIGHUP: a new configuration (already parsed and valid on its own).
    Reload {
        config: Box<Config>,
        reply: oneshot::Sender<Result<(), ReloadError>>,
    },
    /// SIGINT or SIGTERM: leave the kernel state the agent made and stop.
    Stop,
}

/// Everything the running agent owns.
pub struct Agent {
    config: Config,
    identity: Identity,
    attribution: Attribution,
    subtree: Option<Subtree>,
    ceiling: Option<Ceiling>,
    ceiling_error: Option<String>,
    /// The database's cpuset (`[cpuset]`; absent: not configured, or not
    /// applied: see `cpuset_error`).
    cpuset: Option<crate::cpuset::Cpuset>,
    cpuset_error: Option<String>,
    /// The PSI trigger (absent: off, or unavailable: see `psi_error`).
    psi: Option<PsiMonitor>,
    psi_error: Option<String>,
    policy: Policy,
    /// Each welcomed library's process and outbound queue.
    sessions: BTreeMap<SessionId, (Peer, crate::control::Outbound)>,
    /// Processes of engines that run as processes of their own, and the
    /// engine.
    own: BTreeMap<u32, String>,
    health: Health,
    /// What the kernel's marks did (shown in the status).
    mark_status: crate::status::MarkStatus,
    /// The last crossings' wakes and reactions (summarised in
    /// `mark_status` by the snapshot).
    wakes: crate::latency::Recent,
    reactions: crate::latency::Recent,
    /// The last ticks' times.
    tick_times: crate::latency::Recent,
    /// The libraries' requests, queued to written (recorded by the
    /// sessions' writers).
    deliveries: crate::latency::Shared,
    metrics_addr: Option<std::net::SocketAddr>,
    /// Keeps the kernel's program statistics on (run counts and times).
    _program_stats: Option<std::os::fd::OwnedFd>,
    /// What the snapshot shows that changes slowly (or only at a
    /// person's pace), read at most once a `SLOW_PARTS_EVERY`.
    slow: Option<snapshot::SlowParts>,
    /// A reader of the snapshot waits for one: the owner builds it when
    /// woken, or at the tick (reading what only the snapshot shows: VmRSS,
    /// the programs' statistics, the ceiling's events). No reader, no
    /// snapshot: a tick reads the counters and decides, nothing more.
    wanted: Arc<snapshot::Wanted>,
    /// When the subtree was last scanned for new processes.
    scanned: Option<Instant>,
    /// What this agent found of an earlier one's state.
    restart: crate::attribution::RestartStatus,
    /// The programs' failed inserts and followed execs as last logged,
    /// and when they were last read.
    kernel_events: (crate::status::KernelEvents, Option<Instant>),
    /// The mark ring buffer is polled (crossings wake the owner).
    marks_polled: bool,
    /// The thread the owner runs on, once `run` has named it, and its
    /// scheduling (`realtime_priority`).
    sched_thread: Option<libc::pid_t>,
    scheduling: crate::sched::SchedulingStatus,
    /// The thread that writes to the libraries, at the owner's
    /// scheduling, and whether the agent raised it.
    delivery_thread: Option<libc::pid_t>,
    delivery_raised: bool,
    /// Per engine kept to CPUs: what its threads' affinity came to.
    placement: BTreeMap<String, crate::status::PlacementStatus>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    config_tx: watch::Sender<Arc<Config>>,
}

impl Agent {
    /// A reader of the snapshots (built when a reader asks).
    pub fn snapshots(&self) -> Snapshots {
        Snapshots::new(self.snapshot.subscribe(), self.wanted.clone())
    }

    /// Where the sessions' writers record how long a request took from
    /// the owner's queue to the library's socket.
    pub fn deliveries(&self) -> crate::latency::Shared {
        self.deliveries.clone()
    }

    /// A receiver of the configuration in force (replaced on reload).
    pub fn configs(&self) -> watch::Receiver<Arc<Config>> {
        self.config_tx.subscribe()
    }

    /// Where `/metrics` is served (the status reports it).
    pub fn set_metrics_addr(&mut self, addr: std::net::SocketAddr) {
        self.metrics_addr = Some(addr);
        self.publish_now();
    }

    /// Puts `tid`, the thread the owner runs on (a current-thread
    /// runtime's), at the configured `realtime_priority`, now and at each
    /// reload that changes it. A refusal is a warning: the agent runs at
    /// the normal policy, and its status says why.
    pub fn schedule_thread(&mut self, tid: libc::pid_t) {
        self.sched_thread = Some(tid);
        self.apply_scheduling();
    }

    fn apply_scheduling(&mut self) {
        let Some(tid) = self.sched_thread else {
            return;
        };
        let priority = self.config.realtime_priority;
        if priority == 0 && self.raised().is_none() {
            // Not raised by the agent: left as the service manager put it.
            self.scheduling = crate::sched::current(tid);
            self.publish_now();
            return;
        }
        self.scheduling = crate::sched::apply(tid, priority);
        match &self.scheduling.error {
            None => tracing::info!(
                policy = %self.scheduling.policy,
                priority = self.scheduling.priority,
                "the agent's scheduling"
            ),
            Some(e) => tracing::warn!(error = %e, "the agent runs at the normal policy"),
        }
        self.schedule_delivery_thread();
        self.publish_now();
    }

    /// Puts `tid`, the thread that writes the owner's requests to the
    /// libraries, at the owner's scheduling, now and at each reload.
    pub fn schedule_delivery(&mut self, tid: libc::pid_t) {
        self.delivery_thread = Some(tid);
        self.schedule_delivery_thread();
    }

    /// Raised with the owner, and lowered with it (a thread the agent
    /// never raised is left as the service manager put it).
    fn schedule_delivery_thread(&mut self) {
        let Some(tid) = self.delivery_thread else {
            return;
        };
        let priority = match (self.raised(), self.delivery_raised) {
            (Some((_, p)), _) => p,
            (None, true) => 0,
            (None, false) => return,
        };
        match crate::sched::apply(tid, priority).error {
            None => self.delivery_raised = priority > 0,
            Some(e) => {
                tracing::warn!(error = %e, "the delivery thread's scheduling");
            }
        }
    }

    /// The owner's thread and its priority, if the agent raised it.
    fn raised(&self) -> Option<(libc::pid_t, u8)> {
        let raised = self.scheduling.error.is_none() && self.scheduling.policy == "fifo";
        self.sched_thread
            .filter(|_| raised)
            .map(|tid| (tid, self.scheduling.priority))
    }

    /// Runs the owner: ticks at the configured interval and takes inputs
    /// until told to stop (or every sender is gone), then leaves the kernel
    /// state it made.
    pub async fn serve(mut self, mut inputs: mpsc::Receiver<Input>) {
        let period = Duration::from_millis(self.config.tick_ms);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let wanted = self.wanted.clone();
        // Waited on through a descriptor of its own; the records are read
        // through the attribution, here and wherever the owner waits on
        // the kernel (see `off_thread`).
        let crossings = self.attribution.mark_events_fd().and_then(|fd| {
            fd.and_then(|fd| {
                // SAFETY: the AsyncFd owns the descriptor (a duplicate of
                // the ring buffer's), which stays open until it is dropped.
                unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                    .map_err(std::io::Error::from)
            })
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "polling the mark ring buffer; the tick alone will notice crossings")
                })
                .ok()
        });
        self.marks_polled = crossings.is_some();
        self.health.period = period;
        loop {
            tokio::select! {
                // In this order when several are ready: a crossing first
                // (a flood of hellos queued as inputs must not delay it),
                // then the tick, then the inputs, then a snapshot (which
                // the tick builds too when one is wanted, so a flood of
                // readers cannot hold up the libraries' messages).
                biased;
                ready = async { crossings.as_ref()?.readable().await.ok() }, if crossings.is_some() => {
                    let Some(mut guard) = ready else {
                        continue;
                    };
                    // Cleared before the drain: a record written after it
                    // makes the descriptor readable again.
                    guard.clear_ready();
                    if self.poll_crossings() {
                        // Something is under way: the busy tick, from now.
                        self.retime(&mut interval, self.period(true));
                    }
                }
                _ = interval.tick() => {
                    if let Some(stall) = crate::faults::owner_stall() {
                        tokio::time::sleep(stall).await;
                    }
                    self.tick();
                    // Calm, busy, or a reload changed the tick.
                    self.retime(&mut interval, self.period(false));
                    self.wanted.beat.beat(self.health.period);
                }
                input = inputs.recv() => match input {
                    Some(Input::Stop) | None => break,
                    Some(input) => {
                        // A new library, a new configuration, a thread
                        // placed: the busy tick, so the next one comes soon.
                        let prompt = matches!(
                            input,
                            Input::Hello { .. } | Input::Reload { .. } | Input::Assign { .. }
                        );
                        self.handle(input);
                        if prompt {
                            self.retime(&mut interval, self.period(true));
                        }
                    }
                },
                // A reader waits for a snapshot: built now, not at the
                // next (maybe calm) tick.
                () = wanted.wake.notified() => {
                    if self.wanted.is_set() {
                        self.publish_now();
                    }
                }
            }
        }
        self.shutdown();
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Hello {
                session,
                peer,
                out,
                hello,
                reply,
            } => {
                let result = self.hello(session, peer, out, hello);
                let _ = reply.send(result);
            }
            Input::Message { session, message } => {
                if let Err(e) = self.library_message(session, message) {
                    let message = e.to_string();
                    tracing::warn!(session, %message, "bad control message");
                    self.send(session, ToLibrary::Error { message });
                }
            }
            Input::Disconnected { session } => {
                self.sessions.remove(&session);
                let actions = self.policy.disconnect(session);
                self.apply(actions);
            }
            Input::Assign {
                pid,
                tid,
                engine,
                by,
                reply,
            } => {
                let result = self.assign(pid, tid, &engine, by);
                if result.is_ok() {
                    // The caller may ask for the status next: show the
                    // process now, not at the next tick.
                    self.publish_now();
                }
                let _ = reply.send(result);
            }
            Input::Reload { config, reply } => {
                let _ = reply.send(self.reload(*config));
            }
            Input::Stop => {}
        }
    }

    /// Ends a library's session now: told why, its connection closed, and
    /// forgotten by the policy (its `Disconnected` comes later, and finds
    /// nothing left).
    pub(super) fn let_go(&mut self, session: SessionId, why: String) {
        if let Some((peer, out)) = self.sessions.remove(&session) {
            tracing::warn!(pid = peer.pid, uid = peer.uid, %why, "library disconnected");
            out.send(ToLibrary::Error { message: why });
            out.close();
        }
        let actions = self.policy.disconnect(session);
        self.apply(actions);
    }

    fn send(&self, session: SessionId, message: ToLibrary) {
        // A closed channel means the connection is going away; its session
        // says so with `Disconnected`.
        if let Some((_, out)) = self.sessions.get(&session) {
            out.send(message);
        }
    }

    /// Carries out the policy's actions.
    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { session, message } => self.send(session, message),
                Action::SetHighMark(bytes) => {
                    // Lowered below the charge, the kernel reclaims in the
                    // writer's context: at the normal policy.
                    let raised = self.raised();
                    if let Some(c) = &mut self.ceiling
                        && let Err(e) = crate::sched::unraised(raised, || c.set_high(bytes))
                    {
                        tracing::warn!(error = %e, "changing the memory high mark");
                    }
                }
                Action::RaiseMemlock {
                    session,
                    pid,
                    bytes,
                } => {
                    // Only for the process that connected.
                    if let Some((peer, _)) = self.sessions.get(&session)
                        && let Err(e) = same_process(peer)
                    {
                        self.policy.on_memlock(session, Err(e.to_string()));
                        continue;
                    }
                    let result = crate::privilege::raise_memlock(pid, bytes).map_err(|e| {
                        let why = format!(
                            "raising RLIMIT_MEMLOCK of pid {pid} to {bytes} bytes: {e} (the agent needs CAP_SYS_RESOURCE; without it the process's hot sets lock only within its own limit)"
                        );
                        tracing::warn!("{why}");
                        why
                    });
                    if let Ok(limit) = result {
                        tracing::info!(pid, limit, "RLIMIT_MEMLOCK raised for the hot sets");
                    }
                    self.policy.on_memlock(session, result);
                }
                Action::Mark { pid, engine, bytes } => {
                    self.attribution.set_mark(pid, &engine, bytes);
                }
            }
        }
    }

    /// A library's hello: checks it, takes its process under governance,
    /// and answers with the welcome and the engines' budgets.
    fn hello(
        &mut self,
        session: SessionId,
        peer: Peer,
        out: crate::control::Outbound,
        hello: ToAgent,
    ) -> Result<(), HelloError> {
        let (pid, uid) = (peer.pid, peer.uid);
        // Checked at connect; again here, for a reload in between.
        if !self.config.uid_allowed(uid) {
            return Err(HelloError::UidNotAllowed { uid });
        }
        let declared = self.check_hello(hello)?;
        same_process(&peer)?;
        self.place_library(pid, &declared)?;
        let engine_cgroups = self.delegated_cgroups(pid, uid);
        out.send(ToLibrary::Welcome {
            version: nodedb_governor::control::wire::VERSION,
            engine_cgroups,
        });
        if let Some(c) = &self.ceiling {
            out.send(ToLibrary::HeldFrom(c.held_from()));
        }
        self.sessions.insert(session, (peer, out));
        let actions = self.policy.connect(session, pid, uid, &declared);
        self.apply(actions);
        Ok(())
    }

    /// A message from a welcomed library.
    fn library_message(
        &mut self,
        session: SessionId,
        message: ToAgent,
    ) -> Result<(), MessageError> {
        let Some((peer, out)) = self.sessions.get(&session) else {
            // Not welcomed (its hello is still on its way, or was refused).
            return Ok(());
        };
        let pid = peer.pid;
        match message {
            ToAgent::Hello { .. } => Err(MessageError::HelloAgain),
            ToAgent::Thread { tid, engine, moved } => {
                // Only for the process that connected: a connection that
                // outlived it (a child kept the socket) could otherwise
                // have another process's threads moved, once the pid is
                // given again.
                if let Err(e) = same_process(peer) {
                    out.close();
                    return Err(e.into());
                }
                self.place_thread(pid, tid, &engine, moved)?;
                self.send(session, ToLibrary::ThreadPlaced { tid, engine });
                Ok(())
            }
            ToAgent::Report { engines } => {
                let actions = self.policy.on_report(session, engines, Instant::now());
                self.apply(actions);
                Ok(())
            }
            ToAgent::Spilled {
                engine,
                target_bytes,
                freed_bytes,
            } => {
                self.policy
                    .on_spilled(session, &engine, target_bytes, freed_bytes);
                Ok(())
            }
            ToAgent::Purged {
                engine,
                before_bytes,
                after_bytes,
            } => {
                tracing::info!(pid, %engine, before_bytes, after_bytes, "arena purged");
                Ok(())
            }
            ToAgent::CacheDropped {
                engine,
                target_bytes,
                freed_bytes,
                files,
            } => {
                tracing::debug!(pid, %engine, files, "cache drop answered");
                self.policy
                    .on_cache_dropped(session, &engine, target_bytes, freed_bytes);
                Ok(())
            }
        }
    }

    /// The tick to keep now: the calm one while the policy saw nothing
    /// under way and the kernel's marks can wake the agent (`busy`: an
    /// event just arrived), else the configured one.
    fn period(&self, busy: bool) -> Duration {
        let marks_live = self.policy.rules().mark_events && self.marks_polled;
        let ms = if !busy && marks_live && self.policy.calm() {
            self.config.idle_tick_ms()
        } else {
            self.config.tick_ms
        };
        Duration::from_millis(ms)
    }

    /// Ticks every `period` from now on, if that is not the period
    /// already (kept in the health, for the status).
    fn retime(&mut self, interval: &mut tokio::time::Interval, period: Duration) {
        if period != self.health.period {
            self.health.period = period;
            *interval = restart(period);
        }
    }

    /// One tick: picks up processes that entered the subtree, forgets those
    /// that exited, reads the kernel once, lets the policy decide, and
    /// publishes the snapshot.
    fn tick(&mut self) {
        let started = Instant::now();
        self.adopt_new_processes(started);
        for pid in self.attribution.reap_exited() {
            self.own.remove(&pid);
            tracing::info!(pid, "governed process exited");
            // A connection its process left behind (a child kept it)
            // speaks for no one: let go, so nothing it said reaches
            // whoever is given the pid next.
            let left: Vec<SessionId> = self
                .sessions
                .iter()
                .filter(|(_, (peer, _))| peer.pid == pid)
                .map(|(s, _)| *s)
                .collect();
            for session in left {
                self.let_go(session, AgentError::PeerGone { pid }.to_string());
            }
        }
        if self
            .kernel_events
            .1
            .is_none_or(|t| started.duration_since(t) >= KERNEL_EVENTS_EVERY)
        {
            self.kernel_events.1 = Some(started);
            match self.attribution.kernel_events() {
                Ok(events) => self.note_kernel_events(&events),
                Err(e) => tracing::warn!(error = %e, "reading the programs' event counts"),
            }
        }
        let swept = self.attribution.sweep_files(started);
        if swept > 0 {
            tracing::debug!(files = swept, "emptied file-ownership entries swept");
        }
        let reading = match self.attribution.read_counters() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "reading attribution");
                None
            }
        };
        let ceiling = self.ceiling.as_ref().map(Ceiling::usage);
        let actions = self.decide(reading.as_ref(), ceiling);
        self.apply(actions);
        let passed = reading
            .as_ref()
            .map(|r| self.attribution.sync_marks(r))
            .unwrap_or_default();
        if !passed.is_empty() {
            self.react(passed.into_iter().map(|(pid, e)| (pid, e, None)).collect());
        }
        self.health.ticks += 1;
        if self.health.period > Duration::from_millis(self.config.tick_ms) {
            self.health.calm_ticks += 1;
        }
        self.health.last_tick = started.elapsed();
        self.health.tick_time += self.health.last_tick;
        self.tick_times
            .record(self.health.last_tick.as_micros() as u64);
        if let Some(mut reading) = reading
            && self.wanted.is_set()
        {
            reading.read_vm_rss();
            // Read after the actions: a high mark just moved shows as it is.
            let ceiling = self.ceiling.as_ref().map(Ceiling::status);
            self.publish(reading, ceiling);
        }
    }

    /// Logs what the programs counted since the last look: a failed
    /// insert is attribution lost (a warning, naming the map), an exec
    /// followed is news.
    pub(super) fn note_kernel_events(&mut self, now: &crate::status::KernelEvents) {
        let seen = &self.kernel_events.0;
        for (map, n) in &now.insert_failures {
            let before = seen.insert_failures.get(map).copied().unwrap_or(0);
            if *n > before {
                tracing::warn!(
                    map = %map,
                    failed = n - before,
                    total = n,
                    "the programs could not insert into a full map: attribution is lost (see status kernel_events)"
                );
            }
        }
        if now.execs_followed > seen.execs_followed {
            tracing::info!(
                execs = now.execs_followed - seen.execs_followed,
                "governed processes called exec: followed into their new images"
            );
        }
        self.kernel_events.0 = now.clone();
    }

    /// The policy's decision on what was just read.
    fn decide(&mut self, reading: Option<&Reading>, ceiling: Option<CeilingUse>) -> Vec<Action> {
        self.policy.tick(&self.tick_input(reading, ceiling))
    }

    /// What the policy is given now.
    fn tick_input<'r>(
        &self,
        reading: Option<&'r Reading>,
        ceiling: Option<CeilingUse>,
    ) -> Tick<'r> {
        Tick {
            now: Instant::now(),
            reading,
            ceiling,
            psi: self.psi.as_ref().map(|m| (m.events(), m.window())),
        }
    }

    /// Reads the crossings the programs reported and reacts to them; true
    /// if there were any.
    fn poll_crossings(&mut self) -> bool {
        let (events, bad) = self.attribution.drain_mark_events();
        self.mark_status.bad_records += bad;
        if events.is_empty() {
            return false;
        }
        self.on_crossings(&events);
        true
    }

    /// Runs `op` on a helper thread and answers the marks' crossings while
    /// it runs. For a cgroup migration: writing `cgroup.procs` or
    /// `cgroup.threads` takes the kernel's `cgroup_threadgroup_rwsem`,
    /// which can wait for an RCU grace period (tens of milliseconds); the
    /// first hello of a new process must not hold up another engine's
    /// spill that long. Run inline if no thread can be made.
    fn off_thread<T: Send>(&mut self, op: impl FnOnce() -> T + Send) -> T {
        let slot = std::sync::Mutex::new(Some(op));
        let take = || slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        std::thread::scope(|s| {
            let helper = std::thread::Builder::new()
                .name("owner-cgroup".into())
                .spawn_scoped(s, || take().map(|op| op()));
            let Ok(helper) = helper else {
                return take().map(|op| op());
            };
            while !helper.is_finished() {
                self.poll_crossings();
                std::thread::sleep(OFF_THREAD_POLL);
            }
            match helper.join() {
                Ok(done) => done,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
        .expect("the operation runs once, on the helper or here")
    }

    /// Engines crossed their marks, as the ring buffer reported them.
    fn on_crossings(&mut self, events: &[MarkEvent]) {
        let now_ns = monotonic_ns();
        let mut crossed = Vec::new();
        for e in events {
            self.mark_status.events += 1;
            let wake = now_ns.saturating_sub(e.ktime_ns) / 1000;
            self.wakes.record(wake);
            self.mark_status.last_wake_us = wake;
            self.mark_status.max_wake_us = self.mark_status.max_wake_us.max(wake);
            if let Some((pid, engine, mark)) = self.attribution.mark_crossed(e) {
                tracing::debug!(pid, engine, mark, wake_us = wake, "mark crossed");
                crossed.push((pid, engine, Some(mark)));
            }
        }
        // Crossings of marks no longer armed (a slot reused, a mark moved
        // since) need nothing: the tick has it.
        if !crossed.is_empty() {
            self.react(crossed);
            let took = monotonic_ns().saturating_sub(now_ns) / 1000;
            self.reactions.record(took);
        }
    }

    /// Reads the kernel and runs the ladder at once for engines that
    /// crossed their marks, as a tick would (without the slow work: new
    /// and exited processes, the file sweep, the snapshot). A crossing the
    /// exact figure does not confirm (the total ran ahead of it: see
    /// `Attribution::sync_marks`) re-arms the same mark; a confirmed one
    /// goes to the policy, which moves the mark up. A mark the engine
    /// passed before it was written is one more crossing (a few rounds at
    /// most: each moves the mark up).
    fn react(&mut self, mut crossed: Vec<(u32, String, Option<u64>)>) {
        for _ in 0..4 {
            self.mark_status.reactions += 1;
            let reading = match self.attribution.read_counters() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "reading attribution for a crossing");
                    return;
                }
            };
            for (pid, engine, mark) in &crossed {
                let resident = reading
                    .processes
                    .iter()
                    .find(|p| p.pid == *pid)
                    .and_then(|p| p.engines.get(engine))
                    .map_or(0, |a| a.resident_bytes);
                match mark {
                    Some(m) if resident < *m => {
                        self.mark_status.early += 1;
                        self.attribution.set_mark(*pid, engine, Some(*m));
                    }
                    _ => self.policy.on_mark(*pid, engine),
                }
            }
            let ceiling = self.ceiling.as_ref().map(Ceiling::usage);
            let mut pids: Vec<u32> = crossed.iter().map(|(pid, _, _)| *pid).collect();
            pids.sort_unstable();
            pids.dedup();
            let actions = self
                .policy
                .react(&self.tick_input(Some(&reading), ceiling), &pids);
            self.apply(actions);
            crossed = self
                .attribution
                .sync_marks(&reading)
                .into_iter()
                .map(|(pid, engine)| (pid, engine, None))
                .collect();
            if crossed.is_empty() {
                return;
            }
        }
        // Still passing marks after these rounds: the policy hears of them
        // (they are disarmed), and the next tick arms what follows.
        for (pid, engine, _) in &crossed {
            self.policy.on_mark(*pid, engine);
        }
    }

    /// Leaves the kernel state the agent made (v1 ceiling and cpuset
    /// cgroups, once their processes are gone; the pins of a clean stop).
    fn shutdown(&self) {
        if let Some(c) = &self.ceiling {
            c.remove();
        }
        if let Some(c) = &self.cpuset {
            c.remove();
        }
        self.attribution.unpin();
    }
}

/// A tick every `period`, the first one `period` from now.
fn restart(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The peer's process is still the one that connected: its pid has not
/// been given to another process since (checked before its threads are
/// moved).
fn same_process(peer: &Peer) -> Result<(), AgentError> {
    if let Some(fd) = &peer.pidfd
        && crate::procfs::pidfd_exited(std::os::fd::AsFd::as_fd(fd.as_ref()))
    {
        return Err(AgentError::PeerGone { pid: peer.pid });
    }
    match crate::procfs::liveness(peer.pid, peer.start_time) {
        crate::procfs::Liveness::Alive => Ok(()),
        crate::procfs::Liveness::Gone => Err(AgentError::PeerGone { pid: peer.pid }),
        crate::procfs::Liveness::Unknown(e) => Err(e),
    }
}
