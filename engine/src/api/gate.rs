//! While the database does not answer, API requests get 503 at once, naming the cause, instead
//! of each waiting out the connection pool's timeout. `/health` and `/metrics` still answer:
//! they say what is wrong.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::{ApiError, ErrorCode};

pub async fn database(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path.starts_with("/api/")
        && path != "/api/openapi.json"
        && let Some(problem) = state.engine.database_unreachable()
    {
        return ApiError::new(ErrorCode::Unavailable, format!("the database {problem}"))
            .retry_after(1)
            .into_response();
    }
    next.run(request).await
}
