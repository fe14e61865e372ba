//! Every failure the API answers with: a status and a JSON body `{code, message}` that names the
//! problem. Extractor rejections (malformed JSON, wrong types, bad paths and queries, oversize
//! bodies) are turned into the same shape, so no request reaches a handler half-understood.

use crate::artifacts::ArtifactError;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::plan::PlanError;
use crate::service::EngineError;
use crate::store::StoreError;

// One entry a code: its string is the variant's name in snake case (strum's, and so the wire's),
// and `status` the HTTP status it always answers with; a code without one answers with the
// status its error names, 400 unless told otherwise.
/// What went wrong, as a stable, machine-readable code.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    strum::IntoStaticStr,
    strum::Display,
    strum::EnumIter,
    strum::EnumProperty,
    utoipa::ToSchema,
)]
#[strum(serialize_all = "snake_case")]
#[schema(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No such resource, or no such endpoint.
    #[strum(props(status = 404))]
    NotFound,
    /// The body is not JSON.
    #[strum(props(status = 400))]
    InvalidJson,
    /// A path parameter is malformed.
    #[strum(props(status = 400))]
    InvalidPath,
    /// The query string has an unknown or malformed parameter, or a cursor this API did not give.
    #[strum(props(status = 400))]
    InvalidQuery,
    /// A header is malformed, such as an empty `Idempotency-Key`.
    #[strum(props(status = 400))]
    InvalidHeader,
    /// The body lacks a field or has one of the wrong type or range: 422 for JSON of the wrong
    /// shape, 400 for a value out of range, another 4xx for a body that cannot be read.
    InvalidBody,
    /// A definition body that does not parse or validate (422, every problem as
    /// `body:line:column`), or that is not UTF-8 or holds the wrong number of workflows (400).
    InvalidDefinition,
    /// A run's input does not fit its workflow.
    #[strum(props(status = 422))]
    InvalidInput,
    /// A value the database cannot store, such as a NUL character.
    #[strum(props(status = 400))]
    InvalidValue,
    /// A user name or password that is not allowed.
    #[strum(props(status = 400))]
    InvalidUser,
    /// The definition in the body names another workflow than the path.
    #[strum(props(status = 400))]
    IdMismatch,
    /// No valid token (missing, malformed, forged, expired, revoked) or webhook signature.
    #[strum(props(status = 401))]
    Unauthorized,
    /// The token's role is too low for this endpoint.
    #[strum(props(status = 403))]
    Forbidden,
    /// The endpoint does not take this method.
    #[strum(props(status = 405))]
    MethodNotAllowed,
    /// The request contradicts what is stored: the workflow exists, runs of it go on, the run
    /// has not ended unsuccessfully.
    #[strum(props(status = 409))]
    Conflict,
    /// No step waits under this callback token, or for this signal: it timed out, was cancelled,
    /// or has its result.
    #[strum(props(status = 409))]
    NotWaiting,
    /// The body is over the size the endpoint takes.
    #[strum(props(status = 413))]
    BodyTooLarge,
    /// The path and query string are over the length served.
    #[strum(props(status = 414))]
    UriTooLong,
    /// The body's `Content-Type` is not one the endpoint reads.
    #[strum(props(status = 415))]
    UnsupportedMediaType,
    /// Too many requests from this caller; `Retry-After` says when to try again.
    #[strum(props(status = 429))]
    RateLimited,
    /// The request failed inside the server; its log says why.
    #[strum(props(status = 500))]
    Internal,
    /// The database does not answer, or cannot write; `Retry-After` says when to try again.
    #[strum(props(status = 503))]
    Unavailable,
    /// Every password-hashing thread is busy; `Retry-After` says when to try again.
    #[strum(props(status = 503))]
    Busy,
}

impl ErrorCode {
    /// The status this code always answers with, if it has one.
    pub fn status(self) -> Option<StatusCode> {
        use strum::EnumProperty;
        let status = u16::try_from(self.get_int("status")?).ok()?;
        StatusCode::from_u16(status).ok()
    }
}

/// The code's string, from strum, is what goes on the wire.
impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.into())
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable, machine-readable code, such as `not_found` or `invalid_json`.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
    /// For `invalid_input` against a workflow's `input_schema`: each way the input fails it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(required = false)]
    pub violations: Vec<ViolationBody>,
}

/// One way a run's input fails its workflow's `input_schema`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ViolationBody {
    /// Where in the input, as a JSON Pointer (`""` is the input itself).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
    pub violations: Vec<ViolationBody>,
}

impl ApiError {
    /// An error answering with its code's status, or 400 for a code without a fixed one.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::with_status(
            code.status().unwrap_or(StatusCode::BAD_REQUEST),
            code,
            message,
        )
    }

    /// An error answering with `status`, for the codes whose status depends on the failure.
    pub fn with_status(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            violations: Vec::new(),
        }
    }

    /// The same error with a `Retry-After` header of `secs` seconds.
    pub fn retry_after(self, secs: u64) -> Self {
        ApiError {
            retry_after: Some(secs),
            ..self
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(ErrorBody {
                code: self.code,
                message: self.message,
                violations: self.violations,
            }),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl ApiError {
    /// A failure the caller cannot do anything about: logged here, not told.
    fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %error, "request failed");
        ApiError::new(
            ErrorCode::Internal,
            "the request failed inside the server; its log says why",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => {
                ApiError::new(ErrorCode::NotFound, format!("not found: {what}"))
            }
            StoreError::Conflict(message) => ApiError::new(ErrorCode::Conflict, message),
            StoreError::Unavailable(message) => ApiError::new(
                ErrorCode::Unavailable,
                format!("the database is unavailable: {message}"),
            )
            .retry_after(1),
            StoreError::Rejected(message) => ApiError::new(
                ErrorCode::InvalidValue,
                format!("the database cannot store a value of this request: {message}"),
            ),
            other => ApiError::internal(&other),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::UnknownWorkflow(id) => {
                ApiError::new(ErrorCode::NotFound, format!("unknown workflow {id:?}"))
            }
            EngineError::UnknownRun(id) => {
                ApiError::new(ErrorCode::NotFound, format!("unknown run {id:?}"))
            }
            EngineError::Artifact(ArtifactError::NotFound(id)) => {
                ApiError::new(ErrorCode::NotFound, format!("unknown artifact {id:?}"))
            }
            EngineError::Artifact(ArtifactError::Store(e)) => e.into(),
            EngineError::Artifact(e) => {
                tracing::warn!(error = %e, "artifact storage");
                ApiError::new(ErrorCode::Unavailable, "artifact storage did not answer")
            }
            ambiguous @ EngineError::AmbiguousRun { .. } => {
                ApiError::new(ErrorCode::NotFound, ambiguous.to_string())
            }
            EngineError::Plan(PlanError::InputSchema {
                workflow,
                violations,
            }) => ApiError {
                violations: violations
                    .into_iter()
                    .map(|v| ViolationBody {
                        path: v.path,
                        message: v.message,
                    })
                    .collect(),
                ..ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("the input does not satisfy the input_schema of workflow {workflow}"),
                )
            },
            EngineError::Plan(e @ PlanError::BadInputSchema { .. }) => ApiError::internal(&e),
            EngineError::Plan(e) => ApiError::new(ErrorCode::InvalidInput, e.to_string()),
            EngineError::EventIdReused(_) => ApiError::new(ErrorCode::Conflict, e.to_string()),
            EngineError::NotWaiting(message) => ApiError::new(ErrorCode::NotWaiting, message),
            EngineError::UnknownSignal { .. } => ApiError::new(ErrorCode::NotFound, e.to_string()),
            EngineError::AlreadySignalled { .. } => {
                ApiError::new(ErrorCode::Conflict, e.to_string())
            }
            EngineError::UnstorableSignal(_) => ApiError::with_status(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidBody,
                format!("request body: `payload`: {e}"),
            ),
            EngineError::UnstorableEvent(_) => ApiError::with_status(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidBody,
                format!("request {e}"),
            ),
            EngineError::UnstorableAnswer(_) => ApiError::with_status(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidBody,
                format!("request body: `output`: {e}"),
            ),
            EngineError::UnstorableDefinition { .. } => ApiError::with_status(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidDefinition,
                format!("request body: {e}"),
            ),
            EngineError::Store(e) => e.into(),
            other @ EngineError::CorruptDefinition { .. } => {
                tracing::error!(error = %other, "engine error");
                ApiError::new(ErrorCode::Internal, other.to_string())
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::InvalidToken | AuthError::BadCredentials | AuthError::Revoked => {
                ApiError::new(ErrorCode::Unauthorized, e.to_string())
            }
            AuthError::InvalidUser(message) => ApiError::new(ErrorCode::InvalidUser, message),
            AuthError::TtlTooLong => ApiError::new(ErrorCode::InvalidBody, e.to_string()),
            AuthError::Busy => ApiError::new(ErrorCode::Busy, e.to_string()).retry_after(1),
            AuthError::Store(e) => e.into(),
            other => ApiError::internal(&other),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        let (status, code) = match &e {
            JsonRejection::JsonDataError(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidBody)
            }
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidJson),
            JsonRejection::MissingJsonContentType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
            ),
            JsonRejection::BytesRejection(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::BodyTooLarge)
            }
            _ => (StatusCode::BAD_REQUEST, ErrorCode::InvalidBody),
        };
        ApiError::with_status(status, code, format!("request body: {}", e.body_text()))
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::BodyTooLarge
        } else {
            ErrorCode::InvalidBody
        };
        ApiError::with_status(e.status(), code, format!("request body: {}", e.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::new(ErrorCode::InvalidPath, format!("path: {}", e.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::new(
            ErrorCode::InvalidQuery,
            format!("query string: {}", e.body_text()),
        )
    }
}

/// `Json` whose rejection is an [`ApiError`].
#[derive(Debug, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `Path` whose rejection is an [`ApiError`].
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `Query` whose rejection is an [`ApiError`].
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// The raw body, whose rejection (too large, unreadable) is an [`ApiError`].
#[derive(Debug)]
pub struct Bytes(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Bytes {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        Ok(Bytes(
            axum::body::Bytes::from_request(request, state).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    #[test]
    fn a_code_answers_with_its_fixed_status_and_goes_on_the_wire_as_its_name() {
        for code in ErrorCode::iter() {
            use strum::EnumProperty;
            assert_eq!(
                code.get_int("status").is_some(),
                code.status().is_some(),
                "{code}: its status is not an HTTP status"
            );
            let error = ApiError::new(code, "m");
            assert_eq!(
                error.status,
                code.status().unwrap_or(StatusCode::BAD_REQUEST),
                "{code}"
            );
            let body = serde_json::to_value(ErrorBody {
                code,
                message: error.message,
                violations: Vec::new(),
            })
            .unwrap();
            assert_eq!(body["code"], code.to_string());
        }
        assert_eq!(ErrorCode::NotFound.to_string(), "not_found");
        assert_eq!(
            <&str>::from(ErrorCode::UnsupportedMediaType),
            "unsupported_media_type"
        );
        assert_eq!(
            ErrorCode::RateLimited.status(),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
    }
}
