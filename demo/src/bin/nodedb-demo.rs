//! The three-engine demo database (see `nodedb_governor_demo::app`), for
//! `cargo xtask run`.

fn main() -> anyhow::Result<()> {
    nodedb_governor_demo::app::main()
}
