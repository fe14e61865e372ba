//! Bearer-token extractors, one per role, so each handler's signature says who may call it, and
//! the login endpoint.

use axum::extract::{FromRef, FromRequestParts, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Json};
use super::limits::ClientAddr;
use super::{AppState, Logged};
use crate::auth::{Claims, Role, TokenKeys, check_password, session_stands};

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case).
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The verified claims of the caller's bearer token, whatever its role.
pub async fn bearer_claims(
    headers: &HeaderMap,
    keys: &TokenKeys,
    now: i64,
) -> Result<Claims, ApiError> {
    if !headers.contains_key(AUTHORIZATION) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "this endpoint needs an `Authorization: Bearer <token>` header",
        ));
    }
    let token = bearer_token(headers).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unauthorized,
            "the Authorization header must be `Bearer <token>`",
        )
    })?;
    Ok(keys.verify(token, now).await?)
}

/// The caller's claims, when its token is valid, its session stands and its role allows `role`.
pub async fn caller_with_role(
    state: &AppState,
    headers: &HeaderMap,
    role: Role,
) -> Result<Claims, ApiError> {
    let claims = bearer_claims(headers, &state.keys, state.engine.now()).await?;
    if !session_stands(&state.engine, &claims).await? {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "this login's user was changed or deleted since; log in again",
        ));
    }
    if !claims.role.allows(role) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("this needs the {role} role; the token has {}", claims.role),
        ));
    }
    Ok(claims)
}

macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(pub Claims);

        impl<S> FromRequestParts<S> for $name
        where
            AppState: FromRef<S>,
            S: Send + Sync,
        {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
                let state = AppState::from_ref(state);
                Ok($name(caller_with_role(&state, &parts.headers, $role).await?))
            }
        }
    };
}

role_extractor!(
    /// A caller with any valid token.
    Viewer,
    Role::Viewer
);
role_extractor!(
    /// A caller who may start, cancel and retry runs and pause schedules.
    Operator,
    Role::Operator
);
role_extractor!(
    /// A caller who may change definitions, variables, secrets and users.
    Admin,
    Role::Admin
);

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    /// The bearer token: send it as `Authorization: Bearer <token>`.
    pub token: String,
    pub subject: String,
    pub role: super::types::Role,
    /// Seconds since the epoch.
    pub expires_at: i64,
}

impl TokenResponse {
    pub fn new(token: String, claims: Claims) -> Self {
        TokenResponse {
            token,
            subject: claims.sub,
            role: claims.role.into(),
            expires_at: claims.exp,
        }
    }
}

/// How long a login's token lives.
const LOGIN_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// Exchanges a user's name and password for a token with the user's role. Attempts are limited
/// per user name and per client address; when every password-hashing thread is busy the answer
/// is 503 with `Retry-After`.
#[utoipa::path(
    post,
    path = "/api/auth/login",
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "A token for the user", body = TokenResponse),
        (status = 401, description = "Unknown user or wrong password", body = super::error::ErrorBody),
        (status = 429, description = "Too many attempts for this user or from this address", body = super::error::ErrorBody),
        (status = 503, description = "Too many logins at once", body = super::error::ErrorBody),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    ClientAddr(address): ClientAddr,
    Json(request): Json<LoginRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    let user = Logged(&request.username);
    state
        .limiter
        .check_login(&request.username, address, state.engine.now())
        .await
        .inspect_err(|_| tracing::info!(%user, "login refused: rate limited"))?;
    let session = check_password(&state.engine, &request.username, &request.password)
        .await
        .inspect_err(|e| tracing::info!(%user, error = %e, "login refused"))?;
    let (token, claims) = state
        .keys
        .issue_session(&session, LOGIN_TTL, state.engine.now())?;
    tracing::info!(%user, role = %claims.role, jti = %claims.jti, "login");
    Ok(Json(TokenResponse::new(token, claims)))
}
