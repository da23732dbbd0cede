//! `cargo xtask deps`: the promise that a database which embeds the
//! library pulls in none of the agent (its eBPF loader, async runtime, HTTP
//! server, CLI and terminal UI), checked on `cargo tree -e normal` (the
//! lockfile; nothing is built):
//!
//! - the library with the features a database uses, DataFusion aside:
//!   none of the agent's crates;
//! - the same with DataFusion: tokio only through DataFusion's crates,
//!   which bring it themselves;
//! - the validation's workload: besides, tokio and clap as its own direct
//!   dependencies (it runs DataFusion on a tokio runtime; its binaries
//!   have a CLI).
//!
//! A crate found where it must not be fails the check, with the paths by
//! which it came in.

mod check;
mod tree;

use anyhow::{Context, bail};

use self::{
    check::{Allowance, Via},
    tree::Tree,
};
use crate::{cargo, cmd::step};

/// The agent's crates: none may come into a database but as allowed.
const AGENT_CRATES: &[&str] = &[
    "aya",
    "aya-build",
    "aya-obj",
    "tokio",
    "axum",
    "clap",
    "ratatui",
    "nodedb-governor-agent",
    "nodedb-governor-ebpf",
    "nodedb-governor-common",
];

/// A database's view of the workspace: a package with features, and which
/// of the agent's crates may come with it, how.
struct Embedder {
    package: &'static str,
    features: Option<&'static str>,
    allowed: &'static [Allowance],
}

const EMBEDDERS: &[Embedder] = &[
    Embedder {
        package: "nodedb-governor",
        features: Some("control,jemalloc,metrics"),
        allowed: &[],
    },
    Embedder {
        package: "nodedb-governor",
        features: Some("control,datafusion,jemalloc,metrics"),
        allowed: LIBRARY_WITH_DATAFUSION,
    },
    Embedder {
        package: "nodedb-governor-workload",
        features: None,
        allowed: WORKLOAD,
    },
];

/// DataFusion's crates bring tokio themselves.
const LIBRARY_WITH_DATAFUSION: &[Allowance] = &[Allowance {
    name: "tokio",
    via: &[Via::DataFusion],
}];

/// The workload runs DataFusion on its own tokio runtime, and its
/// binaries have a command line.
const WORKLOAD: &[Allowance] = &[
    Allowance {
        name: "tokio",
        via: &[Via::DataFusion, Via::Root],
    },
    Allowance {
        name: "clap",
        via: &[Via::Root],
    },
];

impl Embedder {
    /// `-p package [--features ...]`, for `cargo tree`.
    fn selection(&self) -> Vec<&'static str> {
        let mut args = vec!["-p", self.package];
        if let Some(f) = self.features {
            args.extend(["--features", f]);
        }
        args
    }

    fn describe(&self) -> String {
        self.selection()[1..].join(" ")
    }
}

pub fn deps() -> anyhow::Result<()> {
    step("dependencies: a database that embeds the library pulls in none of the agent");
    let mut failed = Vec::new();
    for e in EMBEDDERS {
        let mut tree = cargo::command();
        tree.args([
            "tree", "-e", "normal", "--prefix", "depth", "--format", "{p}",
        ])
        .args(e.selection());
        let out = tree
            .output()
            .with_context(|| format!("starting cargo tree for {}", e.describe()))?;
        if !out.status.success() {
            bail!(
                "cargo tree for {} failed ({}): {}",
                e.describe(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let tree = Tree::parse(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("reading cargo tree for {}", e.describe()))?;
        let violations = check::violations(&tree, AGENT_CRATES, e.allowed);
        if violations.is_empty() {
            eprintln!(
                "    ok   {} ({} crates): {}",
                e.describe(),
                tree.crate_count(),
                allowances(e)
            );
            continue;
        }
        eprintln!("    FAIL {}:", e.describe());
        for v in &violations {
            let name = v.id.split_once(' ').map_or(v.id.as_str(), |(n, _)| n);
            let rule = match e.allowed.iter().find(|a| a.name == name) {
                Some(a) => format!("allowed only {}", ways(e, a.via)),
                None => "not allowed".to_owned(),
            };
            eprintln!("         {} ({rule}) comes in by:", v.id);
            for p in &v.paths {
                eprintln!("           {}", p.join(" <- "));
            }
            if v.more_paths {
                eprintln!("           (and more)");
            }
            eprintln!(
                "         all its paths: cargo tree -e normal {} -i {}",
                e.selection().join(" "),
                v.id.replacen(" v", "@", 1)
            );
        }
        failed.push(e.describe());
    }
    if !failed.is_empty() {
        bail!(
            "the agent's crates come into {} (see the paths above)",
            failed.join("; ")
        );
    }
    Ok(())
}

/// What an embedder may hold of the agent, in words.
fn allowances(e: &Embedder) -> String {
    if e.allowed.is_empty() {
        return "none of the agent's crates".to_owned();
    }
    let each: Vec<String> = e
        .allowed
        .iter()
        .map(|a| format!("{} {}", a.name, ways(e, a.via)))
        .collect();
    format!("of the agent's crates, only {}", each.join("; "))
}

fn ways(e: &Embedder, via: &[Via]) -> String {
    let ways: Vec<String> = via
        .iter()
        .map(|v| match v {
            Via::DataFusion => "through DataFusion".to_owned(),
            Via::Root => format!("as {}'s own direct dependency", e.package),
        })
        .collect();
    ways.join(" or ")
}
