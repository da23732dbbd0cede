//! `nodedb-governor top`: a live terminal view of the agent (ratatui). A
//! bar per governed engine shows its attributed resident bytes against the
//! budget in force, coloured by pressure level, with what the library has
//! reserved; the ceiling's cgroup is a bar of its own; recent events
//! (level changes, spills, loans) scroll below. Refreshed every second;
//! `q` or Ctrl-C quits.

use std::{collections::VecDeque, path::Path, time::Duration};

use ratatui::{
    Frame, Terminal,
    crossterm::{
        event::{self, Event, KeyCode, KeyModifiers},
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
    layout::{Constraint, Layout},
    prelude::{Backend, CrosstermBackend},
    style::{Color, Style},
    text::Line,
    widgets::{Block, Borders, Gauge, List, ListItem, Paragraph},
};

use nodedb_governor::PressureLevel;

use super::{
    admin::{self, Reply, Request},
    status::StatusReport,
};

/// Events kept on screen.
const EVENTS: usize = 64;

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn level_colour(level: Option<PressureLevel>) -> Color {
    match level {
        Some(PressureLevel::Warning) => Color::Yellow,
        Some(PressureLevel::Critical) => Color::Red,
        Some(PressureLevel::Emergency) => Color::Magenta,
        Some(PressureLevel::Normal) | None => Color::Green,
    }
}

fn level_name(level: Option<PressureLevel>) -> &'static str {
    level.map_or("-", PressureLevel::name)
}

/// What changed between two reports, as lines for the event list.
pub fn diff(before: &StatusReport, now: &StatusReport) -> Vec<String> {
    let mut out = Vec::new();
    for c in &now.clients {
        let old = before.clients.iter().find(|o| o.pid == c.pid);
        for (name, e) in &c.engines {
            let prev = old.and_then(|o| o.engines.get(name));
            let prev_level = prev.and_then(|p| p.level);
            if prev_level != e.level {
                out.push(format!(
                    "pid {} {name}: {} -> {}",
                    c.pid,
                    level_name(prev_level),
                    level_name(e.level)
                ));
            }
            let (spills, freed) = prev.map_or((0, 0), |p| (p.spill_requests, p.spilled_bytes));
            if e.spill_requests > spills {
                out.push(format!(
                    "pid {} {name}: {} spill request(s), {} freed",
                    c.pid,
                    e.spill_requests - spills,
                    mib(e.spilled_bytes.saturating_sub(freed))
                ));
            }
        }
        for l in &c.loans {
            if !old.is_some_and(|o| o.loans.contains(l)) {
                out.push(format!(
                    "pid {} {} lends {} to {}",
                    c.pid,
                    l.lender,
                    mib(l.bytes),
                    l.borrower
                ));
            }
        }
        if old.is_none() {
            out.push(format!("pid {} connected", c.pid));
        }
    }
    for o in &before.clients {
        if !now.clients.iter().any(|c| c.pid == o.pid) {
            out.push(format!("pid {} disconnected", o.pid));
        }
    }
    out
}

/// A bar of `used` out of `of` (full, however far beyond), titled and
/// labelled.
fn bar(title: String, colour: Color, (used, of): (u64, u64), label: String) -> Gauge<'static> {
    Gauge::default()
        .block(Block::default().borders(Borders::ALL).title(title))
        .gauge_style(Style::default().fg(colour))
        .ratio((used as f64 / of.max(1) as f64).clamp(0.0, 1.0))
        .label(label)
}

/// Draws one frame.
/// The kernel's page-cache figures of one process's engine: (cached,
/// evicted) bytes.
fn page_cache(report: &StatusReport, pid: u32, engine: &str) -> (u64, u64) {
    report
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .and_then(|p| p.engines.get(engine))
        .map_or((0, 0), |a| (a.page_cache_bytes, a.page_cache_evicted_bytes))
}

pub fn draw(f: &mut Frame, report: &StatusReport, events: &VecDeque<String>) {
    let rows: usize = report.clients.iter().map(|c| c.engines.len()).sum();
    // A bar per NUMA node where there is more than one.
    let nodes: Vec<_> = if report.numa.len() > 1 {
        report.numa.iter().collect()
    } else {
        Vec::new()
    };
    let [head, ceiling, node_area, engines, log] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(3),
        Constraint::Length((nodes.len() as u16).saturating_mul(3)),
        Constraint::Length((rows as u16).saturating_mul(3).max(3)),
        Constraint::Min(3),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(format!(
            "nodedb-governor top: database {}, kernel {}, {} process(es)   q quits",
            report.database,
            report.kernel,
            report.processes.len()
        )),
        head,
    );
    match &report.ceiling {
        Some(c) => {
            let near = c.current_bytes as f64 >= c.limit_bytes as f64 * 0.9;
            f.render_widget(
                bar(
                    format!("ceiling ({:?}, high {})", c.backend, mib(c.high_bytes)),
                    if near { Color::Red } else { Color::Cyan },
                    (c.current_bytes, c.limit_bytes),
                    format!(
                        "{} / {}   oom_kill {}",
                        mib(c.current_bytes),
                        mib(c.limit_bytes),
                        c.events.oom_kill
                    ),
                ),
                ceiling,
            );
        }
        None => f.render_widget(
            Paragraph::new(format!(
                "ceiling not enforced: {}",
                report.ceiling_error.as_deref().unwrap_or("-")
            ))
            .block(Block::default().borders(Borders::ALL)),
            ceiling,
        ),
    }
    let node_rows = Layout::vertical(vec![Constraint::Length(3); nodes.len()]).split(node_area);
    for (n, area) in nodes.iter().zip(node_rows.iter()) {
        let db = n.database_anon_bytes.unwrap_or(0) + n.database_file_bytes.unwrap_or(0);
        f.render_widget(
            bar(
                format!(
                    "node {} (CPUs {}) [{}]",
                    n.node,
                    n.cpus,
                    level_name(n.level)
                ),
                level_colour(n.level),
                (db, n.ceiling_share_bytes.unwrap_or(n.memory_total_bytes)),
                format!(
                    "database {} / share {}   node free {} of {}",
                    mib(db),
                    n.ceiling_share_bytes.map_or("-".to_owned(), mib),
                    mib(n.memory_free_bytes),
                    mib(n.memory_total_bytes)
                ),
            ),
            *area,
        );
    }
    let areas = Layout::vertical(vec![Constraint::Length(3); rows.max(1)]).split(engines);
    let mut i = 0;
    for c in &report.clients {
        for (name, e) in &c.engines {
            f.render_widget(
                bar(
                    format!("pid {} {name} [{}]", c.pid, level_name(e.level)),
                    level_colour(e.level),
                    (e.resident_bytes, e.budget_bytes),
                    format!(
                        "resident {} / budget {}   reserved {}   spills {}   purges {}   page cache {} ({} evicted)",
                        mib(e.resident_bytes),
                        mib(e.budget_bytes),
                        mib(e.reserved_bytes),
                        e.spill_requests,
                        e.purges,
                        mib(page_cache(report, c.pid, name).0),
                        mib(page_cache(report, c.pid, name).1),
                    ),
                ),
                areas[i],
            );
            i += 1;
        }
    }
    if rows == 0 {
        f.render_widget(
            Paragraph::new("no library connected").block(Block::default().borders(Borders::ALL)),
            engines,
        );
    }
    let items: Vec<ListItem> = events
        .iter()
        .rev()
        .map(|e| ListItem::new(Line::from(e.as_str())))
        .collect();
    f.render_widget(
        List::new(items).block(
            Block::default()
                .borders(Borders::ALL)
                .title("recent events"),
        ),
        log,
    );
}

fn fetch(socket: &Path) -> anyhow::Result<StatusReport> {
    match admin::call(socket, &Request::Status)? {
        Reply::Status(s) => Ok(*s),
        Reply::Error { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

fn run_on<B: Backend>(
    terminal: &mut Terminal<B>,
    socket: &Path,
    every: Duration,
) -> anyhow::Result<()> {
    let mut events = VecDeque::new();
    let mut last: Option<StatusReport> = None;
    loop {
        let report = fetch(socket)?;
        if let Some(before) = &last {
            for e in diff(before, &report) {
                if events.len() == EVENTS {
                    events.pop_front();
                }
                events.push_back(e);
            }
        }
        terminal.draw(|f| draw(f, &report, &events))?;
        last = Some(report);
        if event::poll(every)?
            && let Event::Key(k) = event::read()?
            && (k.code == KeyCode::Char('q')
                || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL)))
        {
            return Ok(());
        }
    }
}

/// Runs the view until `q` or Ctrl-C.
pub fn run(socket: &Path, every: Duration) -> anyhow::Result<()> {
    // Fail before touching the terminal if the agent is not there.
    fetch(socket)?;
    enable_raw_mode()?;
    let mut stdout = std::io::stdout();
    execute!(stdout, EnterAlternateScreen)?;
    let mut terminal = Terminal::new(CrosstermBackend::new(stdout))?;
    let result = run_on(&mut terminal, socket, every);
    let _ = disable_raw_mode();
    let _ = execute!(terminal.backend_mut(), LeaveAlternateScreen);
    let _ = terminal.show_cursor();
    result
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use nodedb_governor::lending::Loan;
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::policy::{EngineEnforcement, LibraryStatus};

    fn report(level: PressureLevel, spills: u64, loans: Vec<Loan<String>>) -> StatusReport {
        let mut r = StatusReport::new(
            "nodedb",
            crate::attribution::Identity::Cgroup,
            None,
            &["vector".into()],
            Default::default(),
        );
        r.clients = vec![LibraryStatus {
            pid: 42,
            uid: 0,
            engines: BTreeMap::from([(
                "vector".to_string(),
                EngineEnforcement {
                    level: Some(level),
                    budget_bytes: 64 << 20,
                    resident_bytes: 60 << 20,
                    reserved_bytes: 8 << 20,
                    spill_requests: spills,
                    spilled_bytes: spills * (16 << 20),
                    ..Default::default()
                },
            )]),
            loans,
            ..Default::default()
        }];
        r
    }

    #[test]
    fn events_say_what_changed() {
        let loan = Loan {
            lender: "query".into(),
            borrower: "vector".into(),
            bytes: 48 << 20,
        };
        let a = report(PressureLevel::Normal, 0, vec![]);
        let b = report(PressureLevel::Critical, 2, vec![loan]);
        let ev = diff(&a, &b);
        assert_eq!(
            ev,
            [
                "pid 42 vector: normal -> critical",
                "pid 42 vector: 2 spill request(s), 32.0 MiB freed",
                "pid 42 query lends 48.0 MiB to vector",
            ]
        );
        let gone = StatusReport {
            clients: vec![],
            ..b.clone()
        };
        assert_eq!(diff(&b, &gone), ["pid 42 disconnected"]);
        assert!(diff(&b, &b).is_empty());
    }

    /// What the terminal shows, as one string.
    fn screen(t: &Terminal<TestBackend>) -> String {
        t.backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect()
    }

    #[test]
    fn a_frame_shows_each_engine_against_its_budget() {
        let mut t = Terminal::new(TestBackend::new(100, 16)).unwrap();
        let events = VecDeque::from(["pid 42 vector: normal -> critical".to_string()]);
        t.draw(|f| draw(f, &report(PressureLevel::Critical, 1, vec![]), &events))
            .unwrap();
        let text = screen(&t);
        for want in [
            "database nodedb",
            "pid 42 vector [critical]",
            "resident 60.0 MiB / budget 64.0 MiB",
            "reserved 8.0 MiB",
            "ceiling not enforced",
            "normal -> critical",
        ] {
            assert!(text.contains(want), "no {want:?} in the frame:\n{text}");
        }
        // Critical is drawn red.
        let red = t
            .backend()
            .buffer()
            .content()
            .iter()
            .any(|c| c.fg == Color::Red);
        assert!(red, "the critical engine's bar is red");
    }

    #[test]
    fn a_frame_shows_each_numa_node_against_its_share() {
        let node = |id: u32, db: u64, level| crate::numa::NodeStatus {
            node: id,
            cpus: id.to_string(),
            memory_total_bytes: 1 << 30,
            memory_free_bytes: 512 << 20,
            file_bytes: 0,
            anon_bytes: 0,
            database_anon_bytes: Some(db),
            database_file_bytes: Some(0),
            ceiling_share_bytes: Some(256 << 20),
            level: Some(level),
        };
        let mut r = report(PressureLevel::Normal, 0, vec![]);
        r.numa = vec![
            node(0, 16 << 20, PressureLevel::Normal),
            node(1, 250 << 20, PressureLevel::Critical),
        ];
        let mut t = Terminal::new(TestBackend::new(100, 24)).unwrap();
        t.draw(|f| draw(f, &r, &VecDeque::new())).unwrap();
        let text = screen(&t);
        for want in [
            "node 0 (CPUs 0) [normal]",
            "node 1 (CPUs 1) [critical]",
            "database 250.0 MiB / share 256.0 MiB",
        ] {
            assert!(text.contains(want), "no {want:?} in the frame:\n{text}");
        }
        // One node: no node bars (the ceiling's bar is the node's).
        r.numa.truncate(1);
        t.draw(|f| draw(f, &r, &VecDeque::new())).unwrap();
        let text = screen(&t);
        assert!(!text.contains("node 0 (CPUs"), "{text}");
    }
}
