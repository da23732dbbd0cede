//! Which of the agent's crates a dependency tree may hold, and by which
//! paths: a crate is found where it must not be when some path from it to
//! the root is covered by none of its allowances.

use std::collections::HashMap;

use super::tree::{Node, Tree};

/// A way by which one of the agent's crates may come into a database.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Via {
    /// Through DataFusion: the path passes a `datafusion` or
    /// `datafusion-*` crate (DataFusion brings tokio itself).
    DataFusion,
    /// As the root's own direct dependency (the workload's CLI, and the
    /// tokio runtime it runs DataFusion on).
    Root,
}

/// `name` may come in by the paths `via` describes (and by no other).
pub struct Allowance {
    pub name: &'static str,
    pub via: &'static [Via],
}

/// A crate found where it must not be.
#[derive(Debug)]
pub struct Violation {
    /// `name vX.Y.Z`.
    pub id: String,
    /// The paths no allowance covers, each from the crate to the root.
    pub paths: Vec<Vec<String>>,
    /// Whether there are more such paths than [`MAX_PATHS`].
    pub more_paths: bool,
}

/// The offending paths shown for one crate (`cargo tree -i` shows all).
pub const MAX_PATHS: usize = 5;

/// The crates of `tree` named in `forbidden` that come in by a path none
/// of `allowed` covers.
pub fn violations(tree: &Tree, forbidden: &[&str], allowed: &[Allowance]) -> Vec<Violation> {
    tree.nodes()
        .filter(|&n| n != Tree::ROOT && forbidden.contains(&tree.name(n)))
        .filter_map(|n| {
            let via = allowed
                .iter()
                .find(|a| a.name == tree.name(n))
                .map_or(&[][..], |a| a.via);
            let mut paths = offending_paths(tree, n, via);
            if paths.is_empty() {
                return None;
            }
            let more_paths = paths.len() > MAX_PATHS;
            paths.truncate(MAX_PATHS);
            Some(Violation {
                id: tree.id(n).to_owned(),
                paths: paths
                    .into_iter()
                    .map(|p| p.into_iter().map(|n| tree.id(n).to_owned()).collect())
                    .collect(),
                more_paths,
            })
        })
        .collect()
}

fn is_datafusion(name: &str) -> bool {
    name == "datafusion" || name.starts_with("datafusion-")
}

/// Up to `MAX_PATHS + 1` paths from `start` to the root that `via` does
/// not cover.
fn offending_paths(tree: &Tree, start: Node, via: &[Via]) -> Vec<Vec<Node>> {
    let mut walk = Walk {
        tree,
        through_datafusion_allowed: via.contains(&Via::DataFusion),
        reaches_root: HashMap::new(),
        found: Vec::new(),
    };
    for up in tree.dependents(start) {
        let direct_and_allowed = up == Tree::ROOT && via.contains(&Via::Root);
        if !direct_and_allowed && walk.reaches_root(up) {
            walk.paths_from(&mut vec![start, up]);
        }
    }
    walk.found
}

struct Walk<'a> {
    tree: &'a Tree,
    /// Paths through DataFusion are covered: the walk does not enter its
    /// crates.
    through_datafusion_allowed: bool,
    /// Whether the root is reachable from a node by a path not covered:
    /// the walk enters only nodes that lead somewhere, so it takes
    /// time in proportion to the paths it finds, not to all paths.
    reaches_root: HashMap<Node, bool>,
    found: Vec<Vec<Node>>,
}

impl Walk<'_> {
    fn reaches_root(&mut self, n: Node) -> bool {
        if let Some(&known) = self.reaches_root.get(&n) {
            return known;
        }
        // False while in progress: a cycle leads nowhere new.
        self.reaches_root.insert(n, false);
        let covered = self.through_datafusion_allowed && is_datafusion(self.tree.name(n));
        let reaches = !covered
            && (n == Tree::ROOT
                || self
                    .tree
                    .dependents(n)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .any(|up| self.reaches_root(up)));
        self.reaches_root.insert(n, reaches);
        reaches
    }

    /// Extends `path` (whose last node reaches the root) to the root by
    /// every way not covered, until more than `MAX_PATHS` are found.
    fn paths_from(&mut self, path: &mut Vec<Node>) {
        let here = *path.last().expect("a path has a node");
        if here == Tree::ROOT {
            self.found.push(path.clone());
            return;
        }
        for up in self.tree.dependents(here).collect::<Vec<_>>() {
            if self.found.len() > MAX_PATHS {
                return;
            }
            if !path.contains(&up) && self.reaches_root(up) {
                path.push(up);
                self.paths_from(path);
                path.pop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deps::{AGENT_CRATES, LIBRARY_WITH_DATAFUSION, WORKLOAD};

    fn check(output: &str, allowed: &[Allowance]) -> Vec<Violation> {
        violations(
            &Tree::parse(output).expect("the sample parses"),
            AGENT_CRATES,
            allowed,
        )
    }

    /// The path of the one violation found, which has one path.
    fn the_one_path(found: &[Violation]) -> Vec<&str> {
        let [v] = found else {
            panic!("one violation expected: {found:?}");
        };
        let [path] = &v.paths[..] else {
            panic!("one path expected: {v:?}");
        };
        path.iter().map(String::as_str).collect()
    }

    #[test]
    fn the_library_without_the_agent_passes() {
        let output = "0nodedb-governor v0.1.0 (/w/governor)\n\
                      1libc v0.2.170\n\
                      1memmap2 v0.9.5\n\
                      2libc v0.2.170 (*)\n\
                      1prometheus v0.14.0\n\
                      2thiserror v2.0.12\n\
                      3thiserror-impl v2.0.12 (proc-macro)\n\
                      1serde v1.0.219\n\
                      1thiserror v2.0.12 (*)\n\
                      1tikv-jemalloc-ctl v0.7.0\n\
                      2tikv-jemalloc-sys v0.7.0\n";
        let found = check(output, &[]);
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn aya_through_the_library_fails_naming_its_path() {
        let output = "0nodedb-governor v0.1.0 (/w/governor)\n\
                      1libc v0.2.170\n\
                      1nodedb-governor-common v0.1.0 (/w/governor-common)\n\
                      2aya v0.14.0\n\
                      3aya-obj v0.2.1\n\
                      4log v0.4.27\n\
                      3libc v0.2.170 (*)\n";
        let found = check(output, &[]);
        let ids: Vec<&str> = found.iter().map(|v| v.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "nodedb-governor-common v0.1.0",
                "aya v0.14.0",
                "aya-obj v0.2.1"
            ]
        );
        assert_eq!(
            the_one_path(&found[1..2]),
            [
                "aya v0.14.0",
                "nodedb-governor-common v0.1.0",
                "nodedb-governor v0.1.0"
            ]
        );
    }

    /// The library with DataFusion, tokio first seen under
    /// datafusion-common; the tests add other ways in.
    const TOKIO_UNDER_DATAFUSION_COMMON: &str = "0nodedb-governor v0.1.0 (/w/governor)\n\
                                                 1datafusion-common v55.2.0\n\
                                                 2tokio v1.54.1\n\
                                                 3pin-project-lite v0.2.16\n";

    #[test]
    fn tokio_through_something_other_than_datafusion_fails() {
        let output = format!(
            "{TOKIO_UNDER_DATAFUSION_COMMON}\
             1reqwest v0.12.0\n\
             2tokio v1.54.1 (*)\n"
        );
        assert_eq!(
            the_one_path(&check(&output, LIBRARY_WITH_DATAFUSION)),
            ["tokio v1.54.1", "reqwest v0.12.0", "nodedb-governor v0.1.0"],
            "only the path that avoids DataFusion is named"
        );
    }

    #[test]
    fn tokio_only_through_datafusion_common_passes() {
        let output = format!(
            "{TOKIO_UNDER_DATAFUSION_COMMON}\
             1datafusion-execution v55.2.0\n\
             2datafusion-common v55.2.0 (*)\n\
             2tokio v1.54.1 (*)\n\
             2tokio-util v0.7.15\n\
             3tokio v1.54.1 (*)\n"
        );
        let found = check(&output, LIBRARY_WITH_DATAFUSION);
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn the_workloads_own_tokio_and_clap_pass_but_clap_through_another_crate_fails() {
        let output = "0nodedb-governor-workload v0.1.0 (/w/workload)\n\
                      1clap v4.6.9\n\
                      1datafusion v55.2.0\n\
                      2tokio v1.54.1\n\
                      1nodedb-governor-demo v0.1.0 (/w/demo)\n\
                      2clap v4.6.9 (*)\n\
                      1tokio v1.54.1 (*)\n";
        assert_eq!(
            the_one_path(&check(output, WORKLOAD)),
            [
                "clap v4.6.9",
                "nodedb-governor-demo v0.1.0",
                "nodedb-governor-workload v0.1.0"
            ]
        );
        let own = output.replace("2clap v4.6.9 (*)\n", "");
        assert!(check(&own, WORKLOAD).is_empty());
    }
}
