//! The agent's HTTP endpoint, with axum on the agent's runtime: `GET
//! /metrics` (Prometheus text, rendered from the last snapshot) and `GET
//! /healthz` (whether the owner still ticks).

use std::net::SocketAddr;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::owner::Snapshots;

async fn metrics(State(snapshots): State<Snapshots>) -> impl IntoResponse {
    let snapshot = snapshots.next().await;
    match crate::metrics::render(&snapshot, snapshots.liveness()) {
        Ok(t) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            t,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("collecting metrics: {e}\n"),
        ),
    }
}

/// `ok` while the owner ticks; 503, with how long it has not, once it
/// has stopped (see `Liveness::stalled_after`).
async fn healthz(State(snapshots): State<Snapshots>) -> (StatusCode, String) {
    let l = snapshots.liveness();
    if l.stalled {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: no tick has ended for {} ms (the tick period is {} ms)\n",
                l.age.as_millis(),
                l.period.as_millis()
            ),
        )
    } else {
        (StatusCode::OK, "ok\n".into())
    }
}

/// Binds `addr` and serves until the task is aborted. Returns the bound
/// address (a port of 0 picks one).
pub async fn serve(
    snapshots: Snapshots,
    addr: SocketAddr,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(snapshots);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok((bound, task))
}
