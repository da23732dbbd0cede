//! The agent's end of the control channel: libraries connect to the control
//! socket, and each connection is a [`session`] of its own, so no client
//! ever holds up another. What a session hears it hands to the owner; what
//! the owner decides for the library comes back on the session's outbound
//! channel.

mod session;

use std::sync::Arc;

use tokio::{
    net::UnixListener,
    sync::{mpsc, watch},
};

use crate::{config::Config, owner::Input};

/// How long to wait after a failed `accept` before the next.
pub(crate) const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Accepts library connections until the task is aborted.
pub async fn serve(
    listener: UnixListener,
    owner: mpsc::Sender<Input>,
    config: watch::Receiver<Arc<Config>>,
) {
    let mut next_session = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: back off rather than spin.
                tracing::warn!(error = %e, "accepting a control connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        next_session += 1;
        tokio::spawn(session::run(
            stream,
            next_session,
            owner.clone(),
            config.clone(),
        ));
    }
}
