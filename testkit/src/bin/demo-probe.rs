//! The demo database (`nodedb-demo`: vector, timeseries and query engines
//! whose memory grows, bursts and is spilled), as a binary of this package
//! for the end-to-end tests to start against their agent (`--socket`,
//! `--database`).

fn main() -> anyhow::Result<()> {
    nodedb_governor_demo::app::main()
}
