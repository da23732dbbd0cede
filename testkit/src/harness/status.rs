//! The agent's status, as `status --json` prints it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("running {bin} status: {source}")]
    Run {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("status failed: {stderr}")]
    Failed { stderr: String },
    #[error("status --json does not parse as {schema}: {source}")]
    Parse {
        schema: &'static str,
        source: serde_json::Error,
    },
}

/// Runs `bin status --json --socket <admin>` and parses what it prints as
/// `T` (a `serde_json::Value`, or the agent's own `StatusReport`).
pub fn read_status<T: DeserializeOwned>(bin: &Path, admin: &Path) -> Result<T, StatusError> {
    let out = Command::new(bin)
        .args(["status", "--json", "--socket"])
        .arg(admin)
        .output()
        .map_err(|source| StatusError::Run {
            bin: bin.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(StatusError::Failed {
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|source| StatusError::Parse {
        schema: std::any::type_name::<T>(),
        source,
    })
}
