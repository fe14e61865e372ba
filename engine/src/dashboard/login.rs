//! Logging in with an API user (the same argon2 check and per-user and per-address limits as
//! `POST /api/auth/login`), and out.

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use minijinja::context;
use serde::Deserialize;

use super::error::DashboardError;
use super::render;
use super::session::{self, LOGIN_COOKIE, SESSION_COOKIE, Session};
use crate::api::limits::ClientAddr;
use crate::api::{AppState, Logged};
use crate::auth::check_password;

/// How long a dashboard session lasts: a login's token lives as long over the API.
const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
/// How long the login form's own token stays valid.
const LOGIN_FORM_TTL: u64 = 3600;

#[derive(Debug, Deserialize)]
pub(super) struct LoginQuery {
    next: Option<String>,
}

fn login_page(
    status: StatusCode,
    next: &str,
    error: Option<&str>,
    secure: bool,
) -> Result<Response, DashboardError> {
    let token = hex::encode(rand::random::<[u8; 24]>());
    let body = render::public_page(
        "login.html",
        context! { next => next, error => error, login_token => &token },
    )?;
    let mut response = (status, body).into_response();
    let cookie = session::set_cookie(LOGIN_COOKIE, &token, LOGIN_FORM_TTL, secure);
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("a cookie of hex is a header value"),
    );
    Ok(response)
}

/// `GET /login`: the form; already logged in, straight on.
pub(super) async fn form(
    State(state): State<AppState>,
    session: Option<Session>,
    Query(query): Query<LoginQuery>,
) -> Result<Response, DashboardError> {
    let next = session::safe_next(query.next.as_deref());
    if session.is_some() {
        return Ok(redirect(&next));
    }
    login_page(StatusCode::OK, &next, None, state.dashboard.secure_cookies)
}

#[derive(Debug, Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    next: String,
    #[serde(default)]
    login_token: String,
}

/// `POST /login`: a session cookie for a user whose password matches.
pub(super) async fn submit(
    State(state): State<AppState>,
    ClientAddr(address): ClientAddr,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, DashboardError> {
    let secure = state.dashboard.secure_cookies;
    let next = session::safe_next(Some(&form.next));
    let expected = session::cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !session::same(&form.login_token, expected) {
        tracing::warn!("dashboard login refused: no valid login form token");
        return Err(DashboardError::Csrf);
    }
    let user = Logged(&form.username);
    if let Err(e) = state
        .limiter
        .check_login(&form.username, address, state.engine.now())
        .await
    {
        tracing::info!(%user, "dashboard login refused: rate limited");
        return login_page(
            StatusCode::TOO_MANY_REQUESTS,
            &next,
            Some(&e.message),
            secure,
        );
    }
    let session = match check_password(&state.engine, &form.username, &form.password).await {
        Ok(session) => session,
        Err(crate::auth::AuthError::BadCredentials) => {
            tracing::info!(%user, "dashboard login refused");
            return login_page(
                StatusCode::UNAUTHORIZED,
                &next,
                Some("Unknown user or wrong password."),
                secure,
            );
        }
        Err(e) => return Err(e.into()),
    };
    let (token, claims) = state
        .keys
        .issue_session(&session, SESSION_TTL, state.engine.now())?;
    tracing::info!(%user, role = %claims.role, jti = %claims.jti, "dashboard login");
    let mut response = redirect(&next);
    let headers = response.headers_mut();
    for cookie in [
        session::set_cookie(SESSION_COOKIE, &token, SESSION_TTL.as_secs(), secure),
        session::set_cookie(LOGIN_COOKIE, "", 0, secure),
    ] {
        headers.append(
            header::SET_COOKIE,
            HeaderValue::from_str(&cookie).expect("a JWT is a header value"),
        );
    }
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub(super) struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /logout`: the session's token is revoked (in every process within a second) and its
/// cookie deleted.
pub(super) async fn logout(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<LogoutForm>,
) -> Result<Response, DashboardError> {
    session.act(crate::auth::Role::Viewer, &form.csrf)?;
    state
        .keys
        .revoke(&session.claims.jti, session.name(), state.engine.now())
        .await?;
    tracing::info!(user = %Logged(session.name()), "dashboard logout");
    let mut response = redirect("/login");
    let cookie = session::set_cookie(SESSION_COOKIE, "", 0, state.dashboard.secure_cookies);
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("a cookie is a header value"),
    );
    Ok(response)
}

/// 303 to `to`, a path of this site.
pub(super) fn redirect(to: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}
