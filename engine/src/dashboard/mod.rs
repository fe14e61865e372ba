//! The web dashboard, served by `serve` at `/` beside the API: pages rendered on the server
//! (minijinja templates, `templates/`), htmx for the parts that refresh themselves, server-sent
//! events for new runs, uPlot for the overview's charts. Its browser files are embedded
//! (`assets.rs`); no request leaves the page for another host, and no script is inline, so the
//! pages run under `script-src 'self'`.
//!
//! A person logs in with an API user (`login.rs`) into a session cookie holding the login's
//! signed token (`session.rs`); every form carries a token bound to that session. A page shows
//! only the buttons its viewer's role may use, and every action checks the role again
//! (`Session::act`). Like the API, the dashboard reaches the database only through `Engine`'s
//! operations (`tests/tidy.rs`); what it shows is in its own types (`views.rs`).

mod admin;
mod assets;
mod dag;
mod error;
mod login;
mod overview;
mod records;
mod render;
mod runs;
mod session;
mod views;
mod workflows;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};

pub use error::DashboardError;

/// The login token of a request's dashboard session cookie, unverified: the API's rate limits
/// count a dashboard session in its user's bucket, as they do the user's bearer tokens.
pub(crate) fn session_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    session::cookie(headers, session::SESSION_COOKIE).filter(|t| !t.is_empty())
}

use crate::api::AppState;
use crate::health::Heartbeats;
use crate::service::Engine;
use overview::Samples;

/// What the dashboard keeps in a process: whether its cookies need TLS, and the overview's
/// recent samples.
pub struct Dashboard {
    /// Served over TLS, or behind a proxy that serves it over TLS (`--public-url https://..`):
    /// cookies are `Secure`.
    pub secure_cookies: bool,
    samples: Arc<Samples>,
}

impl Dashboard {
    /// The dashboard of this process; starts sampling what the overview charts (every few
    /// seconds, while the dashboard exists).
    pub fn start(engine: Arc<Engine>, heartbeats: Arc<Heartbeats>, secure_cookies: bool) -> Self {
        let samples = Arc::new(Samples::default());
        overview::spawn_sampler(engine, heartbeats, Arc::downgrade(&samples));
        Dashboard {
            secure_cookies,
            samples,
        }
    }
}

/// The policy every page is served with: only this origin's files, no inline script, never in
/// a frame.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    // An artifact keeps the stricter policy it is served with (a sandbox).
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// The dashboard's routes, for the API's router to serve beside its own.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(overview::page))
        .route("/overview/series", get(overview::series))
        .route("/overview/cards", get(overview::cards))
        .route("/login", get(login::form).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/workflows", get(workflows::list))
        .route("/workflows/{id}", get(workflows::show))
        .route("/workflows/{id}/start", post(workflows::start))
        .route("/workflows/{id}/pause", post(workflows::pause))
        .route("/workflows/{id}/resume", post(workflows::resume))
        .route("/runs", get(runs::list))
        .route("/runs/live", get(runs::live))
        .route("/runs/{id}", get(runs::show))
        .route("/runs/{id}/live", get(runs::show_live))
        .route("/runs/{id}/cancel", post(runs::cancel))
        .route("/runs/{id}/retry", post(runs::retry))
        .route("/runs/{id}/signal", post(runs::signal))
        .route("/artifacts/{id}", get(runs::artifact))
        .route("/fires", get(records::fires))
        .route("/webhooks", get(records::webhooks))
        .route("/notifications", get(records::notifications))
        .route("/alerts", get(records::alerts))
        .route("/usage", get(records::usage))
        .route("/admin", get(admin::page))
        .route("/admin/variables", post(admin::put_variable))
        .route("/admin/variables/delete", post(admin::delete_variable))
        .route("/admin/secrets", post(admin::put_secret))
        .route("/admin/secrets/delete", post(admin::delete_secret))
        .route("/admin/users", post(admin::add_user))
        .route("/admin/users/delete", post(admin::delete_user))
        .route("/admin/tokens", post(admin::issue_token))
        .route("/admin/tokens/revoke", post(admin::revoke_token))
        .route("/assets/{hash}/{name}", get(assets::serve))
        .layer(axum::middleware::from_fn(security_headers))
}
