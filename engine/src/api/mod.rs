//! The HTTP surface: `/health` and `/metrics` at the root, the admin API under `/api`, and its
//! OpenAPI 3.1 document at `/api/openapi.json`, generated from the handlers' types; the web
//! dashboard (`crate::dashboard`) is served through the same router, under its limits. Only this
//! module and the dashboard serve HTTP, and only this module owns the JSON shapes it answers
//! with.
//!
//! Who may call what is in each handler's signature: its role extractor (`Viewer`, `Operator`,
//! `Admin` in `auth.rs`); public handlers have none. Handlers reach the engine only through
//! `Engine`'s operations, never its store (`tests/tidy.rs`).

pub(crate) mod admin;
pub(crate) mod artifacts;
mod auth;
mod error;
mod gate;
mod hooks;
pub(crate) mod limits;
mod public;
mod runs;
pub mod types;
mod usage;
mod webhooks;
mod workflows;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::sync::watch;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::{Admin, Operator, Viewer};
pub use error::{ApiError, ErrorBody, ErrorCode};
pub use limits::{LoginLimit, RateLimit, RateLimiter};

use crate::health::Heartbeats;

use crate::auth::TokenKeys;
use crate::service::Engine;

/// Requests larger than this are refused with 413 before a handler sees them. Definitions are
/// capped lower by their parser.
const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub heartbeats: Arc<Heartbeats>,
    pub keys: TokenKeys,
    /// The step kinds this deployment's workers run, with what each takes in `with`, for
    /// validating definitions.
    pub step_kinds: Arc<crate::definition::StepKinds>,
    pub limiter: Arc<RateLimiter>,
    /// The Prometheus recorder's handle, when the process installed one.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The web dashboard served beside the API (`crate::dashboard`).
    pub dashboard: Arc<crate::dashboard::Dashboard>,
}

/// What `/health` and `/metrics` need: all a `worker` process serves.
#[derive(Clone)]
pub struct Observability {
    pub engine: Arc<Engine>,
    pub heartbeats: Arc<Heartbeats>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl axum::extract::FromRef<AppState> for Observability {
    fn from_ref(state: &AppState) -> Self {
        Observability {
            engine: state.engine.clone(),
            heartbeats: state.heartbeats.clone(),
            metrics: state.metrics.clone(),
        }
    }
}

/// `/health` and `/metrics` alone, for `worker --listen`: no API, so no tokens to check.
pub fn observability_router(state: Observability) -> Router {
    Router::new()
        .route("/health", axum::routing::get(public::health))
        .route("/metrics", axum::routing::get(public::metrics))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchyard admin API",
        description = "Workflows, runs, schedules, variables, secrets and users of a Switchyard \
            deployment. Send `Authorization: Bearer <token>`; roles are viewer (read), operator \
            (start, cancel, retry, pause, signal) and admin (everything). Errors are `{code, message}`, \
            with `violations` for an input that fails its workflow's `input_schema`."
    ),
    modifiers(&BearerAuth),
    // Routed by hand (`router`): its path may hold `/`, which a documented `{path}` cannot.
    paths(hooks::deliver_hook),
    tags(
        (name = "public", description = "No token needed"),
        (name = "auth", description = "Tokens"),
        (name = "workflows", description = "Definitions, starts and schedules"),
        (name = "runs", description = "Run history and control"),
        (name = "webhooks", description = "Inbound webhooks (n8n) and their log"),
        (name = "admin", description = "Admin role only"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .build(),
                ),
            );
    }
}

/// Every operation may answer with an error body (bad input, auth, limits, an unavailable
/// database); the specific codes an operation documents come first.
struct ErrorResponses;

impl utoipa::Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = ResponseBuilder::new()
            .description("An error: `{code, message}` names the problem")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                operation
                    .responses
                    .responses
                    .entry("default".to_owned())
                    .or_insert_with(|| error.clone().into());
            }
        }
    }
}

/// A value a caller sent, as a log line shows it: control characters, quotes and backslashes
/// escaped (a forged line or a terminal escape stays visible text), and at most
/// [`LOGGED_CHARS`] characters with the length of the rest: a 2 MB id writes a short line.
pub(crate) struct Logged<'a>(pub &'a str);

const LOGGED_CHARS: usize = 64;

impl std::fmt::Display for Logged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(LOGGED_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        if let Some((at, _)) = chars.next() {
            write!(f, "...(+{} bytes)", self.0.len() - at)?;
        }
        Ok(())
    }
}

/// The page size of a list: `limit` from the query string, 50 unless given, 1 to 500.
fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    const MAX_PAGE: u32 = 500;
    let limit = limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            format!("query string: `limit` must be 1 to {MAX_PAGE}, not {limit}"),
        ));
    }
    Ok(limit)
}

/// Every route with its OpenAPI operation.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(public::health))
        .routes(routes!(public::metrics))
        .routes(routes!(public::stats))
        .routes(routes!(workflows::public_workflows))
        .routes(routes!(auth::login))
        .routes(routes!(workflows::list_workflows))
        .routes(routes!(
            workflows::show_workflow,
            workflows::update_workflow,
            workflows::remove_workflow
        ))
        .routes(routes!(workflows::start_workflow))
        .routes(routes!(workflows::pause_workflow))
        .routes(routes!(workflows::resume_workflow))
        .routes(routes!(workflows::list_fires))
        .routes(routes!(runs::list_runs))
        .routes(routes!(runs::show_run))
        .routes(routes!(artifacts::artifact))
        .routes(routes!(usage::usage))
        .routes(routes!(runs::run_logs))
        .routes(routes!(runs::follow_run_logs))
        .routes(routes!(runs::cancel_run))
        .routes(routes!(runs::retry_run))
        .routes(routes!(runs::signal_run))
        .routes(routes!(runs::list_alerts))
        .routes(routes!(webhooks::n8n_webhook))
        .routes(routes!(webhooks::list_webhook_events))
        .routes(routes!(webhooks::list_notifications))
        .routes(routes!(admin::system_metrics))
        .routes(routes!(workflows::create_workflows))
        .routes(routes!(admin::list_variables))
        .routes(routes!(admin::put_variable, admin::delete_variable))
        .routes(routes!(admin::put_amazon_tracking))
        .routes(routes!(admin::list_secrets))
        .routes(routes!(admin::put_secret, admin::delete_secret))
        .routes(routes!(admin::list_users, admin::add_user))
        .routes(routes!(admin::remove_user))
        .routes(routes!(admin::issue_token))
        .routes(routes!(admin::revoke_token))
        .routes(routes!(admin::list_audit))
}

/// The routes, and the OpenAPI document that describes them.
fn routes_and_document() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = api().split_for_parts();
    // After the routes are in: the derive's modifiers run before there are any.
    utoipa::Modify::modify(&ErrorResponses, &mut doc);
    (router, doc)
}

pub fn router(state: AppState) -> Router {
    let (router, doc) = routes_and_document();
    let doc = Arc::new(doc);
    router
        // A trigger's path may hold `/`, which the documented `{path}` cannot say.
        .route(
            "/api/hooks/{*path}",
            axum::routing::post(hooks::deliver_hook),
        )
        .merge(crate::dashboard::routes())
        .route(
            "/api/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async {
            ApiError::new(
                ErrorCode::NotFound,
                "no such endpoint; the API is described at /api/openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::limit,
        ))
        .layer(axum::middleware::from_fn(limits::uri_length))
        // Outermost: the rate limiter reads revocations from the database, and nothing may wait
        // for a database that does not answer.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            gate::database,
        ))
        .with_state(state)
}

/// The API's certificate chain and private key, both PEM files (`--tls-cert`, `--tls-key`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// The rustls configuration of `files`, with the ring provider the HTTP client also uses; a file
/// that does not load is named in the error.
pub async fn tls_config(
    files: &TlsFiles,
) -> std::io::Result<axum_server::tls_rustls::RustlsConfig> {
    let named = |path: &std::path::Path, what: &str| {
        let path = path.display().to_string();
        let what = what.to_owned();
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{path}: {what}: {e}"))
    };
    axum_server::tls_rustls::RustlsConfig::from_pem_file(&files.cert, &files.key)
        .await
        .map_err(named(
            &files.cert,
            "the TLS certificate chain or its key (--tls-key) does not load",
        ))
}

/// Serves `router` on `listener`, over TLS when given, until `shutdown` turns true; requests in
/// flight then get a few seconds to finish.
pub async fn serve_http(
    listener: std::net::TcpListener,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let stopping = handle.clone();
    tokio::spawn(async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        stopping.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    match tls {
        Some(config) => {
            axum_server::from_tcp_rustls(listener, config)?
                .handle(handle)
                .serve(app)
                .await
        }
        None => {
            axum_server::from_tcp(listener)?
                .handle(handle)
                .serve(app)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    #[test]
    fn every_error_code_is_listed_in_the_openapi_document() {
        let doc = serde_json::to_value(routes_and_document().1).unwrap();
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["ErrorBody"]["properties"]["code"]["$ref"], "#/components/schemas/ErrorCode",
            "{schemas:#}"
        );
        let listed = schemas["ErrorCode"]["enum"].as_array().unwrap();
        for code in ErrorCode::iter() {
            assert!(
                listed.contains(&serde_json::json!(code.to_string())),
                "{code} is not among {listed:?}"
            );
        }
        assert_eq!(listed.len(), ErrorCode::iter().count(), "{listed:?}");
    }
}
