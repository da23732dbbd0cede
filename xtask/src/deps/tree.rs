//! `cargo tree --prefix depth --format {p}` read back into a graph: which
//! crate each crate is a dependency of.
//!
//! Each line is the depth followed by the package (`2tokio v1.54.1 (*)`);
//! a line's parent is the nearest line above it one level up. A crate seen
//! before is marked `(*)` and not expanded again, but the edge to it is
//! still printed, so every edge of the graph is on some line.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, bail};

/// A crate in the tree, by its index.
pub type Node = usize;

pub struct Tree {
    /// `name vX.Y.Z` of each node.
    ids: Vec<String>,
    /// For each node, the nodes that depend on it.
    dependents: Vec<BTreeSet<Node>>,
}

impl Tree {
    /// The root is node 0.
    pub const ROOT: Node = 0;

    /// Parses the output of `cargo tree --prefix depth --format {p}` for
    /// one package.
    pub fn parse(output: &str) -> anyhow::Result<Tree> {
        let mut tree = Tree {
            ids: Vec::new(),
            dependents: Vec::new(),
        };
        let mut by_id = HashMap::new();
        // The node last seen at each depth: the parents of deeper lines.
        let mut ancestors: Vec<Node> = Vec::new();
        for (n, line) in output.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            let digits = line.bytes().take_while(u8::is_ascii_digit).count();
            let depth: usize = line[..digits]
                .parse()
                .with_context(|| format!("cargo tree line {}: no depth in {line:?}", n + 1))?;
            let mut words = line[digits..].split_whitespace();
            let (Some(name), Some(version)) = (words.next(), words.next()) else {
                bail!("cargo tree line {}: no name and version in {line:?}", n + 1);
            };
            let id = format!("{name} {version}");
            let node = *by_id.entry(id.clone()).or_insert_with(|| {
                tree.ids.push(id);
                tree.dependents.push(BTreeSet::new());
                tree.ids.len() - 1
            });
            if depth == 0 {
                if node != Tree::ROOT {
                    bail!("cargo tree line {}: a second root, {line:?}", n + 1);
                }
            } else {
                let Some(&parent) = ancestors.get(depth - 1) else {
                    bail!(
                        "cargo tree line {}: depth {depth} under depth {}",
                        n + 1,
                        ancestors.len().saturating_sub(1)
                    );
                };
                tree.dependents[node].insert(parent);
            }
            ancestors.truncate(depth);
            ancestors.push(node);
        }
        if tree.ids.is_empty() {
            bail!("cargo tree printed no crates");
        }
        Ok(tree)
    }

    pub fn nodes(&self) -> impl Iterator<Item = Node> {
        0..self.ids.len()
    }

    /// `name vX.Y.Z`.
    pub fn id(&self, node: Node) -> &str {
        &self.ids[node]
    }

    pub fn name(&self, node: Node) -> &str {
        self.ids[node]
            .split_once(' ')
            .map_or(&self.ids[node], |(name, _)| name)
    }

    /// The crates that depend on `node` directly.
    pub fn dependents(&self, node: Node) -> impl Iterator<Item = Node> + '_ {
        self.dependents[node].iter().copied()
    }

    pub fn crate_count(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_edge_is_read_including_those_to_crates_seen_before() {
        let tree = Tree::parse(
            "0root v0.1.0 (/w/root)\n\
             1a v1.0.0\n\
             2c v3.0.0\n\
             1b v2.0.0 (proc-macro)\n\
             2c v3.0.0 (*)\n",
        )
        .expect("the sample parses");
        let c = tree
            .nodes()
            .find(|&n| tree.name(n) == "c")
            .expect("c is in the tree");
        let mut dependents: Vec<&str> = tree.dependents(c).map(|n| tree.id(n)).collect();
        dependents.sort();
        assert_eq!(dependents, ["a v1.0.0", "b v2.0.0"]);
        assert_eq!(tree.crate_count(), 4);
        assert_eq!(tree.id(Tree::ROOT), "root v0.1.0");
    }

    #[test]
    fn a_line_without_a_depth_is_refused() {
        let err = Tree::parse("0root v0.1.0\n├── a v1.0.0\n")
            .err()
            .expect("a tree-drawing line is not depth-prefixed");
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
