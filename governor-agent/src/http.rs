//! The agent's HTTP endpoint, with axum on the serving thread's runtime:
//! `GET /metrics` (Prometheus text, rendered from the last snapshot) and
//! `GET /healthz` (whether the owner still ticks).

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

/// Serves on `listener` until the task is aborted (an error of the
/// listener ends it, logged).
pub async fn serve_on(listener: tokio::net::TcpListener, snapshots: Snapshots) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(snapshots);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "metrics server stopped");
    }
}
