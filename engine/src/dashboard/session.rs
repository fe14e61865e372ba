//! Sessions: a login's signed token (the API's JWT, from `TokenKeys::issue_session`) kept in an
//! `HttpOnly`, `SameSite=Strict` cookie, `Secure` when served over TLS. The server keeps no
//! session table: the token is verified as a bearer token is (signature, expiry, revocation,
//! the user unchanged since), and logging out revokes it.
//!
//! Every form carries a synchronizer token bound to the session: an HMAC-SHA256 of a fixed label
//! keyed with the session's own token, which a page on another site can neither read (the
//! cookie is `HttpOnly`) nor compute. The login form, before there is a session, carries the
//! value of a pre-login cookie instead (double submit).

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::error::DashboardError;
use crate::api::AppState;
use crate::auth::{Claims, Role, session_stands};

pub(super) const SESSION_COOKIE: &str = "switchyard_session";
pub(super) const LOGIN_COOKIE: &str = "switchyard_login";

/// A person logged in to the dashboard.
#[derive(Debug, Clone)]
pub(super) struct Session {
    pub claims: Claims,
    /// The token every form of this session carries.
    pub csrf: String,
}

impl Session {
    pub fn role(&self) -> Role {
        self.claims.role
    }

    pub fn name(&self) -> &str {
        &self.claims.sub
    }

    /// Refuses an action the session's role may not take, or a form without its token.
    pub fn act(&self, role: Role, csrf: &str) -> Result<(), DashboardError> {
        if !same(csrf, &self.csrf) {
            tracing::warn!(user = %crate::api::Logged(self.name()), "dashboard form refused: no valid CSRF token");
            return Err(DashboardError::Csrf);
        }
        if !self.role().allows(role) {
            return Err(DashboardError::Forbidden(role));
        }
        Ok(())
    }

    /// Refuses a page the session's role may not see.
    pub fn needs(&self, role: Role) -> Result<(), DashboardError> {
        if self.role().allows(role) {
            Ok(())
        } else {
            Err(DashboardError::Forbidden(role))
        }
    }
}

/// The form token of the session whose cookie holds `token`.
pub(super) fn csrf_token(token: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(b"switchyard dashboard form");
    hex::encode(mac.finalize().into_bytes())
}

/// Compares two tokens in time that does not depend on where they differ.
pub(super) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, for every path, `Secure` over TLS;
/// `max_age` 0 deletes it.
pub(super) fn set_cookie(name: &str, value: &str, max_age: u64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
}

/// `text` for a query string: everything but unreserved characters percent-encoded.
pub(crate) fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Where to go after a login: a path of this site only, never another host. Read as a browser
/// reads it (the WHATWG URL rules: tabs and newlines dropped, `\` as `/`), against a stand-in
/// origin, and only its path and query kept.
pub(super) fn safe_next(next: Option<&str>) -> String {
    let origin = url::Url::parse("http://switchyard.invalid/").expect("a valid URL");
    let Some(next) = next.filter(|n| n.starts_with('/')) else {
        return "/".to_owned();
    };
    match origin.join(next) {
        // Dot segments are resolved after the origin is read: `/.//host` comes out as `//host`,
        // which a browser reads as another site.
        Ok(url) if url.origin() == origin.origin() && !url.path().starts_with("//") => {
            match url.query() {
                Some(query) => format!("{}?{query}", url.path()),
                None => url.path().to_owned(),
            }
        }
        _ => "/".to_owned(),
    }
}

async fn session_of(parts: &Parts, state: &AppState) -> Result<Option<Session>, DashboardError> {
    let Some(token) = cookie(&parts.headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    let claims = match state.keys.verify(token, state.engine.now()).await {
        Ok(claims) => claims,
        Err(crate::auth::AuthError::InvalidToken | crate::auth::AuthError::Revoked) => {
            return Ok(None);
        }
        Err(other) => return Err(other.into()),
    };
    // Only a login's token makes a session: a pasted API token has no user behind it.
    if claims.user_version.is_none() || !session_stands(&state.engine, &claims).await? {
        return Ok(None);
    }
    Ok(Some(Session {
        csrf: csrf_token(token),
        claims,
    }))
}

impl FromRequestParts<AppState> for Session {
    type Rejection = DashboardError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, DashboardError> {
        session_of(parts, state).await?.ok_or_else(|| {
            // A part of a page that htmx asks for: back to that page after the login, not
            // to the part.
            let htmx = parts.headers.contains_key("hx-request");
            let next = if htmx {
                parts
                    .headers
                    .get("hx-current-url")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|u| url::Url::parse(u).ok())
                    .map(|u| match u.query() {
                        Some(query) => format!("{}?{query}", u.path()),
                        None => u.path().to_owned(),
                    })
                    .unwrap_or_else(|| "/".to_owned())
            } else if parts.method == axum::http::Method::GET {
                parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "/".to_owned())
            } else {
                "/".to_owned()
            };
            DashboardError::LoginNeeded { next, htmx }
        })
    }
}

impl OptionalFromRequestParts<AppState> for Session {
    type Rejection = DashboardError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Self>, DashboardError> {
        session_of(parts, state).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_token_is_bound_to_the_session_token() {
        let a = csrf_token("token-a");
        assert_eq!(a, csrf_token("token-a"));
        assert_ne!(a, csrf_token("token-b"));
        assert!(same(&a, &csrf_token("token-a")));
        assert!(!same(&a, ""));
    }

    #[test]
    fn a_login_goes_back_only_to_a_path_of_this_site() {
        assert_eq!(
            safe_next(Some("/runs?status=failed")),
            "/runs?status=failed"
        );
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        // Browsers drop tabs and newlines from a URL before they follow it.
        assert_eq!(safe_next(Some("/\t/evil.example")), "/");
        assert_eq!(safe_next(Some("/\n/evil.example/x")), "/");
        assert_eq!(safe_next(Some("/%09/evil.example")), "/%09/evil.example");
        assert_eq!(safe_next(Some("/runs/../admin")), "/admin");
        for sneaky in [
            "/.//evil.example",
            "/a/..//evil.example",
            "/%2e//evil.example",
            "/./\\evil.example",
        ] {
            assert_eq!(safe_next(Some(sneaky)), "/", "{sneaky}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn cookies_are_http_only_and_strict_and_secure_over_tls() {
        let c = set_cookie(SESSION_COOKIE, "v", 60, true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.ends_with("Secure"));
        assert!(!set_cookie(SESSION_COOKIE, "v", 60, false).contains("Secure"));
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::COOKIE,
            "a=1; switchyard_session=tok; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("tok"));
    }
}
