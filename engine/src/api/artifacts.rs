//! Artifacts: the files steps made, streamed as they are read from where they are kept.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::auth::Viewer;
use super::error::{ApiError, ErrorBody, Path};

/// Whether a file of `content_type` may show in the browser rather than download: media, which
/// runs no script. SVG is an image that can hold one.
fn shown_inline(content_type: &str) -> bool {
    let kind = content_type.to_ascii_lowercase();
    ["image/", "audio/", "video/"]
        .iter()
        .any(|k| kind.starts_with(k))
        && !kind.contains("svg")
}

/// One artifact's bytes, with the content type it was stored with. Whatever a service sent,
/// it never runs as a page of this origin: a sandbox policy, no sniffing, and anything but
/// media as a download.
#[utoipa::path(
    get,
    path = "/api/artifacts/{id}",
    tag = "runs",
    params(("id" = String, Path, description = "Artifact id, from a step's output")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "No such artifact", body = ErrorBody),
    )
)]
pub async fn artifact(
    _: Viewer,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    artifact_response(&state.engine, &id).await
}

/// The artifact `id` as a response, sandboxed; the dashboard serves it the same way.
pub(crate) async fn artifact_response(
    engine: &crate::service::Engine,
    id: &str,
) -> Result<Response, ApiError> {
    let (found, bytes) = engine.artifact_file(id).await?;
    let content_type = HeaderValue::from_str(&found.content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let disposition = if shown_inline(&found.content_type) {
        "inline"
    } else {
        "attachment"
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_LENGTH, HeaderValue::from(found.size)),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&format!("{disposition}; filename=\"{}\"", found.id))
                    .expect("an id is a header value"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("sandbox; default-src 'none'"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::HeaderName::from_static("x-artifact-sha256"),
                HeaderValue::from_str(&found.sha256).expect("hex is a header value"),
            ),
        ],
        Body::from_stream(bytes),
    )
        .into_response())
}
