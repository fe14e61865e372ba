//! What can go wrong in a dashboard request, and the page or redirect each answers with. Engine,
//! store and auth failures take their HTTP status and message from the API's one mapping
//! (`api::ApiError`), so both surfaces say the same about the same failure.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;
use crate::auth::{AuthError, Role};
use crate::service::EngineError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// No session, or one that ended: the login page, then back to `next`. Asked by htmx for a
    /// part of a page, the whole page goes there (`HX-Redirect`), not the part.
    #[error("log in to see this page")]
    LoginNeeded { next: String, htmx: bool },
    #[error("this needs the {0} role")]
    Forbidden(Role),
    /// A form post without the token of the session that asked for the form.
    #[error("the form's security token is missing or wrong: reload the page and try again")]
    Csrf,
    #[error("{0}")]
    BadInput(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a page did not render: {0}")]
    Render(#[from] minijinja::Error),
    /// A check the API makes, made the same way here (a setting's name, a login's rate).
    #[error("{}", .0.message)]
    Api(ApiError),
}

impl From<ApiError> for DashboardError {
    fn from(e: ApiError) -> Self {
        DashboardError::Api(e)
    }
}

impl DashboardError {
    /// The status and the message a person reads.
    fn status_and_message(self) -> (StatusCode, String, Vec<String>) {
        let api = |e: ApiError| {
            let violations = e
                .violations
                .iter()
                .map(|v| format!("{}: {}", display_path(&v.path), v.message))
                .collect();
            (e.status, e.message, violations)
        };
        match self {
            e @ DashboardError::LoginNeeded { .. } => {
                (StatusCode::UNAUTHORIZED, e.to_string(), vec![])
            }
            e @ (DashboardError::Forbidden(_) | DashboardError::Csrf) => {
                (StatusCode::FORBIDDEN, e.to_string(), vec![])
            }
            DashboardError::BadInput(m) => (StatusCode::BAD_REQUEST, m, vec![]),
            e @ DashboardError::NotFound(_) => (StatusCode::NOT_FOUND, e.to_string(), vec![]),
            DashboardError::Engine(e) => api(e.into()),
            DashboardError::Auth(e) => api(e.into()),
            DashboardError::Store(e) => api(e.into()),
            DashboardError::Api(e) => api(e),
            DashboardError::Render(e) => {
                tracing::error!(error = %e, "dashboard page did not render");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the page did not render; the server's log says why".to_owned(),
                    vec![],
                )
            }
        }
    }

    /// The input's schema violations, one line each, when that is what went wrong.
    pub(super) fn into_parts(self) -> (StatusCode, String, Vec<String>) {
        self.status_and_message()
    }
}

/// A JSON Pointer as a person reads it: `input` for the whole, `input.a.b` for a member.
fn display_path(pointer: &str) -> String {
    if pointer.is_empty() {
        "input".to_owned()
    } else {
        format!("input{}", pointer.replace('/', "."))
    }
}

impl IntoResponse for DashboardError {
    fn into_response(self) -> Response {
        if let DashboardError::LoginNeeded { next, htmx } = &self {
            let location = format!("/login?next={}", super::session::encode_component(next));
            let (status, name) = if *htmx {
                (
                    StatusCode::OK,
                    header::HeaderName::from_static("hx-redirect"),
                )
            } else {
                (StatusCode::SEE_OTHER, header::LOCATION)
            };
            let mut response = status.into_response();
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(name, value);
            }
            return response;
        }
        let (status, message, violations) = self.status_and_message();
        let body = super::render::error_page(status, &message, &violations);
        (status, body).into_response()
    }
}
