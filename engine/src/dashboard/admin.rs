//! Administration, for the admin role only: variables, secrets (write-only: names and times
//! are shown, never a value), users, tokens (a new token is shown once), and the audit log.

use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use minijinja::context;
use serde::Deserialize;
use serde_json::Value;

use super::error::DashboardError;
use super::login::redirect;
use super::render;
use super::session::Session;
use crate::api::admin::check_name;
use crate::api::{AppState, Logged};
use crate::auth::{Role, delete_user as remove_user, put_user, users};
use crate::settings::{self, SECRETS, VARS};

async fn admin_page(
    state: &AppState,
    session: &Session,
    status: StatusCode,
    issued: Option<minijinja::Value>,
) -> Result<Response, DashboardError> {
    session.needs(Role::Admin)?;
    let engine = &state.engine;
    let variables: Vec<_> = settings::variables(engine)
        .await?
        .into_iter()
        .map(|v| {
            context! {
                name => v.name,
                value => serde_json::to_string(&v.value).unwrap_or_default(),
                updated_at => v.updated_at,
            }
        })
        .collect();
    let secrets: Vec<_> = settings::secrets(engine)
        .await?
        .into_iter()
        .map(|s| context! { name => s.name, updated_at => s.updated_at })
        .collect();
    let users: Vec<_> = users(engine)
        .await?
        .into_iter()
        .map(|u| context! { name => u.name, role => u.role.as_str(), updated_at => u.updated_at })
        .collect();
    let audit: Vec<_> = engine
        .audit_log(None, 20)
        .await?
        .into_iter()
        .map(|a| context! { at => a.at, actor => a.actor, action => a.action, target => a.target })
        .collect();
    let roles: Vec<&str> = Role::names().to_vec();
    let body = render::page(
        session,
        "admin.html",
        "admin",
        context! {
            variables => variables,
            secrets => secrets,
            users => users,
            audit => audit,
            roles => render::ser(&roles),
            user_roles => render::ser(&roles.iter().filter(|r| **r != "webhook").collect::<Vec<_>>()),
            issued => issued,
        },
    )?;
    Ok((status, body).into_response())
}

/// `GET /admin`.
pub(super) async fn page(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, DashboardError> {
    admin_page(&state, &session, StatusCode::OK, None).await
}

#[derive(Debug, Deserialize)]
pub(super) struct NamedForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: String,
}

/// `POST /admin/variables`: `value` is JSON; text that is not JSON is stored as a string.
pub(super) async fn put_variable(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<NamedForm>,
) -> Result<Response, DashboardError> {
    session.act(Role::Admin, &form.csrf)?;
    check_name(&form.name)?;
    let value = serde_json::from_str(&form.value).unwrap_or(Value::String(form.value));
    settings::put(&state.engine, VARS, &form.name, &value, session.name()).await?;
    tracing::info!(variable = %Logged(&form.name), by = %Logged(session.name()), "variable set from the dashboard");
    Ok(redirect("/admin#variables"))
}

/// `POST /admin/variables/delete`.
pub(super) async fn delete_variable(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<NamedForm>,
) -> Result<Response, DashboardError> {
    delete_setting(&state, &session, &form, VARS, "variable").await
}

/// Deletes the variable or secret the form names; `what` says which, in the answer, the log
/// and the section of the page to go back to.
async fn delete_setting(
    state: &AppState,
    session: &Session,
    form: &NamedForm,
    namespace: &str,
    what: &str,
) -> Result<Response, DashboardError> {
    session.act(Role::Admin, &form.csrf)?;
    if !settings::delete(&state.engine, namespace, &form.name, session.name()).await? {
        return Err(DashboardError::NotFound(format!("{what} {:?}", form.name)));
    }
    tracing::info!(name = %Logged(&form.name), what, by = %Logged(session.name()), "setting deleted from the dashboard");
    Ok(redirect(&format!("/admin#{what}s")))
}

/// `POST /admin/secrets`: stored encrypted; the page never shows it again.
pub(super) async fn put_secret(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<NamedForm>,
) -> Result<Response, DashboardError> {
    session.act(Role::Admin, &form.csrf)?;
    check_name(&form.name)?;
    settings::put(
        &state.engine,
        SECRETS,
        &form.name,
        &Value::String(form.value),
        session.name(),
    )
    .await?;
    tracing::info!(secret = %Logged(&form.name), by = %Logged(session.name()), "secret set from the dashboard");
    Ok(redirect("/admin#secrets"))
}

/// `POST /admin/secrets/delete`.
pub(super) async fn delete_secret(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<NamedForm>,
) -> Result<Response, DashboardError> {
    delete_setting(&state, &session, &form, SECRETS, "secret").await
}

#[derive(Debug, Deserialize)]
pub(super) struct UserForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    role: String,
}

fn role(text: &str) -> Result<Role, DashboardError> {
    text.parse()
        .map_err(|_| DashboardError::BadInput(format!("{text:?} is not a role")))
}

/// `POST /admin/users`: adds a user or replaces one's password and role (ending its sessions).
pub(super) async fn add_user(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<UserForm>,
) -> Result<Response, DashboardError> {
    session.act(Role::Admin, &form.csrf)?;
    let stored = put_user(
        &state.engine,
        &form.name,
        &form.password,
        role(&form.role)?,
        session.name(),
    )
    .await?;
    tracing::info!(user = %Logged(&stored.name), role = %stored.role, by = %Logged(session.name()), "user stored from the dashboard");
    Ok(redirect("/admin#users"))
}

/// `POST /admin/users/delete`.
pub(super) async fn delete_user(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<UserForm>,
) -> Result<Response, DashboardError> {
    session.act(Role::Admin, &form.csrf)?;
    if !remove_user(&state.engine, &form.name, session.name()).await? {
        return Err(DashboardError::NotFound(format!("user {:?}", form.name)));
    }
    tracing::info!(user = %Logged(&form.name), by = %Logged(session.name()), "user deleted from the dashboard");
    Ok(redirect("/admin#users"))
}

#[derive(Debug, Deserialize)]
pub(super) struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    days: String,
    #[serde(default)]
    jti: String,
}

/// `POST /admin/tokens`: a token for a service, shown on the page this once.
pub(super) async fn issue_token(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<TokenForm>,
) -> Result<Response, DashboardError> {
    session.act(Role::Admin, &form.csrf)?;
    let days: u64 = form
        .days
        .trim()
        .parse()
        .ok()
        .filter(|d| (1..=365).contains(d))
        .ok_or_else(|| DashboardError::BadInput("days: 1 to 365".into()))?;
    if form.subject.is_empty() || form.subject.chars().count() > 128 {
        return Err(DashboardError::BadInput(
            "subject: 1 to 128 characters".into(),
        ));
    }
    let (token, claims) = state
        .keys
        .issue(
            &form.subject,
            role(&form.role)?,
            std::time::Duration::from_secs(days * 86_400),
            session.name(),
            state.engine.now(),
        )
        .await?;
    tracing::info!(subject = %Logged(&claims.sub), role = %claims.role, jti = %claims.jti, by = %Logged(session.name()), "token issued from the dashboard");
    let issued = context! {
        token => token,
        subject => claims.sub,
        role => claims.role.as_str(),
        jti => claims.jti,
        expires_at => claims.exp * 1000,
    };
    admin_page(&state, &session, StatusCode::CREATED, Some(issued)).await
}

/// `POST /admin/tokens/revoke`: by the token's id (`jti`).
pub(super) async fn revoke_token(
    State(state): State<AppState>,
    session: Session,
    Form(form): Form<TokenForm>,
) -> Result<Response, DashboardError> {
    session.act(Role::Admin, &form.csrf)?;
    let jti = form.jti.trim();
    if jti.is_empty() || jti.len() > 128 || jti.chars().any(char::is_control) {
        return Err(DashboardError::BadInput(
            "a token id is 1 to 128 printable characters".into(),
        ));
    }
    state
        .keys
        .revoke(jti, session.name(), state.engine.now())
        .await?;
    tracing::info!(jti = %Logged(jti), by = %Logged(session.name()), "token revoked from the dashboard");
    Ok(redirect("/admin#tokens"))
}
