//! The HTTP surface. Only this module serves HTTP and owns the JSON shapes it answers with.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use axum::{Router, serve};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::service::Engine;

/// Liveness facts other tasks publish for `/health`.
#[derive(Debug, Default)]
pub struct Heartbeats {
    /// When the scheduler last finished a tick (ms); 0 when no scheduler runs here.
    pub scheduler_tick_at: AtomicI64,
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    heartbeats: Arc<Heartbeats>,
}

pub fn router(engine: Arc<Engine>, heartbeats: Arc<Heartbeats>) -> Router {
    Router::new()
        .route("/health", get(health))
        .with_state(AppState { engine, heartbeats })
}

/// `GET /health`: 200 when the database answers, 503 otherwise.
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let now = state.engine.now();
    let tick = state.heartbeats.scheduler_tick_at.load(Ordering::Relaxed);
    let scheduler = if tick == 0 {
        json!({"running": false})
    } else {
        json!({"running": true, "last_tick_ms_ago": now - tick, "alive": now - tick < 120_000})
    };
    match state.engine.store().queue_depth(now).await {
        Ok(depth) => (
            StatusCode::OK,
            Json(
                json!({"status": "ok", "database": "ok", "scheduler": scheduler, "queue_depth": depth}),
            ),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "unavailable", "database": e.to_string(), "scheduler": scheduler}),
            ),
        ),
    }
}

/// Serves `router` on `listener` until `shutdown` turns true.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve(listener, router)
        .with_graceful_shutdown(async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
}
