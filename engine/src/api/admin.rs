//! Admin endpoints: system metrics, variables (the Amazon tracking ids among them), write-only
//! secrets, users, tokens and the audit log of all of these.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::{Admin, TokenResponse};
use super::error::{ApiError, ErrorBody, ErrorCode, Json, Path, Query};
use super::types::{AuditEntry, Role, User};
use super::{AppState, Logged};
use crate::auth::{delete_user, put_user, users};
use crate::settings::{self, SECRETS, SecretEntry, VARS};
use crate::state::{Millis, RunStatus};
use crate::store::Setting;

/// Variable and secret names: what a template can reach as `vars.NAME` or `secrets.NAME`.
pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidPath,
            format!(
                "path: {name:?} is not a name: 1 to 64 lower-case letters, digits and '_', not starting with a digit"
            ),
        ))
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Variable {
    pub name: String,
    pub value: Value,
    pub updated_at: Millis,
}

impl From<Setting> for Variable {
    fn from(s: Setting) -> Self {
        Variable {
            name: s.name,
            value: s.value,
            updated_at: s.updated_at,
        }
    }
}

/// Every variable; templates read them as `vars.NAME`.
#[utoipa::path(
    get,
    path = "/api/admin/variables",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every variable", body = Vec<Variable>),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
    )
)]
pub async fn list_variables(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<Vec<Variable>>, ApiError> {
    let vars = settings::variables(&state.engine).await?;
    Ok(Json(vars.into_iter().map(Variable::from).collect()))
}

/// Sets a variable to any JSON value. Runs read variables when their steps start.
#[utoipa::path(
    put,
    path = "/api/admin/variables/{name}",
    tag = "admin",
    params(("name" = String, Path, pattern = "^[a-z_][a-z0-9_]{0,63}$", description = "Variable name")),
    request_body(content = serde_json::Value, description = "The value, any JSON"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The stored variable", body = Variable),
        (status = 400, description = "A bad name or body", body = ErrorBody),
    )
)]
pub async fn put_variable(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(value): Json<Value>,
) -> Result<Json<Variable>, ApiError> {
    check_name(&name)?;
    let now = state.engine.now();
    settings::put(&state.engine, VARS, &name, &value, &caller.sub).await?;
    tracing::info!(variable = %Logged(&name), by = %Logged(&caller.sub), "variable set over the API");
    Ok(Json(Variable {
        name,
        value,
        updated_at: now,
    }))
}

/// Deletes a variable.
#[utoipa::path(
    delete,
    path = "/api/admin/variables/{name}",
    tag = "admin",
    params(("name" = String, Path, pattern = "^[a-z_][a-z0-9_]{0,63}$", description = "Variable name")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such variable", body = ErrorBody),
    )
)]
pub async fn delete_variable(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !settings::delete(&state.engine, VARS, &name, &caller.sub).await? {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no variable {name:?}"),
        ));
    }
    tracing::info!(variable = %Logged(&name), by = %Logged(&caller.sub), "variable deleted over the API");
    Ok(StatusCode::NO_CONTENT)
}

/// The variable the Amazon tracking ids live in: `vars.amazon_tracking_ids.<region>`.
pub const AMAZON_TRACKING: &str = "amazon_tracking_ids";

/// Replaces the regional Amazon Associates tracking ids, e.g. `{"us": "shop-20", "de":
/// "shop-21"}`; templates read them as `vars.amazon_tracking_ids.us`.
#[utoipa::path(
    put,
    path = "/api/admin/amazon-tracking",
    tag = "admin",
    request_body(content = std::collections::BTreeMap<String, String>, description = "Tracking id by region code"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The stored tracking ids", body = Variable),
        (status = 422, description = "A region or tracking id is malformed", body = ErrorBody),
    )
)]
pub async fn put_amazon_tracking(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Json(ids): Json<std::collections::BTreeMap<String, String>>,
) -> Result<Json<Variable>, ApiError> {
    for (region, id) in &ids {
        if !(2..=8).contains(&region.len()) || !region.chars().all(|c| c.is_ascii_lowercase()) {
            return Err(ApiError::with_status(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidBody,
                format!(
                    "request body: region {region:?} is not a lower-case region code such as \"us\""
                ),
            ));
        }
        if id.is_empty()
            || id.len() > 64
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ApiError::with_status(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidBody,
                format!(
                    "request body: the tracking id of {region:?} must be 1 to 64 letters, digits or '-'"
                ),
            ));
        }
    }
    let value = serde_json::to_value(&ids).expect("a map serializes");
    let now = state.engine.now();
    settings::put(&state.engine, VARS, AMAZON_TRACKING, &value, &caller.sub).await?;
    tracing::info!(regions = ids.len(), by = %Logged(&caller.sub), "Amazon tracking ids replaced over the API");
    Ok(Json(Variable {
        name: AMAZON_TRACKING.to_owned(),
        value,
        updated_at: now,
    }))
}

/// A secret as listed: its name and when it was set, never its value.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SecretInfo {
    pub name: String,
    pub updated_at: Millis,
}

impl From<SecretEntry> for SecretInfo {
    fn from(s: SecretEntry) -> Self {
        SecretInfo {
            name: s.name,
            updated_at: s.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretValue {
    pub value: String,
}

/// The names of every secret; values are never returned.
#[utoipa::path(
    get,
    path = "/api/admin/secrets",
    tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, description = "Secret names", body = Vec<SecretInfo>))
)]
pub async fn list_secrets(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<Vec<SecretInfo>>, ApiError> {
    let secrets = settings::secrets(&state.engine).await?;
    Ok(Json(secrets.into_iter().map(SecretInfo::from).collect()))
}

/// Sets a secret; templates read it as `secrets.NAME`, and its value is redacted from outputs,
/// errors and logs.
#[utoipa::path(
    put,
    path = "/api/admin/secrets/{name}",
    tag = "admin",
    params(("name" = String, Path, pattern = "^[a-z_][a-z0-9_]{0,63}$", description = "Secret name")),
    request_body = SecretValue,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Stored; the answer holds no value", body = SecretInfo),
        (status = 400, description = "A bad name or body", body = ErrorBody),
    )
)]
pub async fn put_secret(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(secret): Json<SecretValue>,
) -> Result<Json<SecretInfo>, ApiError> {
    check_name(&name)?;
    let now = state.engine.now();
    settings::put(
        &state.engine,
        SECRETS,
        &name,
        &Value::String(secret.value),
        &caller.sub,
    )
    .await?;
    tracing::info!(secret = %Logged(&name), by = %Logged(&caller.sub), "secret set over the API");
    Ok(Json(SecretInfo {
        name,
        updated_at: now,
    }))
}

/// Deletes a secret.
#[utoipa::path(
    delete,
    path = "/api/admin/secrets/{name}",
    tag = "admin",
    params(("name" = String, Path, pattern = "^[a-z_][a-z0-9_]{0,63}$", description = "Secret name")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such secret", body = ErrorBody),
    )
)]
pub async fn delete_secret(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !settings::delete(&state.engine, SECRETS, &name, &caller.sub).await? {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no secret {name:?}"),
        ));
    }
    tracing::info!(secret = %Logged(&name), by = %Logged(&caller.sub), "secret deleted over the API");
    Ok(StatusCode::NO_CONTENT)
}

/// Every API user with its role.
#[utoipa::path(
    get,
    path = "/api/admin/users",
    tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, description = "Users", body = Vec<User>))
)]
pub async fn list_users(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<Vec<User>>, ApiError> {
    let users = users(&state.engine).await?;
    Ok(Json(users.into_iter().map(User::from).collect()))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    pub name: String,
    /// At least 8 characters; stored as an argon2id hash.
    #[schema(min_length = 8)]
    pub password: String,
    pub role: Role,
}

/// Adds a user, or replaces an existing user's password and role; a replaced user's sessions
/// end, so its tokens from earlier logins stop working.
#[utoipa::path(
    post,
    path = "/api/admin/users",
    tag = "admin",
    request_body = NewUser,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Stored", body = User),
        (status = 400, description = "A bad name or a short password", body = ErrorBody),
    )
)]
pub async fn add_user(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Json(user): Json<NewUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let stored = put_user(
        &state.engine,
        &user.name,
        &user.password,
        user.role.into(),
        &caller.sub,
    )
    .await?;
    tracing::info!(user = %Logged(&stored.name), role = %stored.role, by = %Logged(&caller.sub), "user stored over the API");
    Ok((StatusCode::CREATED, Json(stored.into())))
}

/// Deletes a user, and with it every session it had: tokens from its logins stop working.
#[utoipa::path(
    delete,
    path = "/api/admin/users/{name}",
    tag = "admin",
    params(("name" = String, Path, description = "User name")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub async fn remove_user(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !delete_user(&state.engine, &name, &caller.sub).await? {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no user {name:?}"),
        ));
    }
    tracing::info!(user = %Logged(&name), by = %Logged(&caller.sub), "user deleted over the API");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Who or what the token is for, e.g. `ci-deploy`.
    #[schema(min_length = 1, max_length = 128)]
    pub subject: String,
    pub role: Role,
    /// Lifetime in seconds, 60 to 31 536 000 (a year); default 30 days.
    #[schema(minimum = 60, maximum = 31_536_000)]
    pub ttl_secs: Option<u64>,
}

/// Issues a token, e.g. for a script. Its `jti` (in the token's claims, and in the audit log)
/// revokes it with `DELETE /api/admin/tokens/{jti}`.
#[utoipa::path(
    post,
    path = "/api/admin/tokens",
    tag = "admin",
    request_body = NewToken,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The token", body = TokenResponse),
        (status = 400, description = "A bad subject or lifetime", body = ErrorBody),
    )
)]
pub async fn issue_token(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Json(request): Json<NewToken>,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    let ttl = request.ttl_secs.unwrap_or(30 * 86_400);
    if !(60..=31_536_000).contains(&ttl) {
        return Err(ApiError::new(
            ErrorCode::InvalidBody,
            format!("request body: `ttl_secs` must be 60 to 31536000, not {ttl}"),
        ));
    }
    if request.subject.is_empty() || request.subject.chars().count() > 128 {
        return Err(ApiError::new(
            ErrorCode::InvalidBody,
            "request body: `subject` must be 1 to 128 characters",
        ));
    }
    let (token, claims) = state
        .keys
        .issue(
            &request.subject,
            request.role.into(),
            std::time::Duration::from_secs(ttl),
            &caller.sub,
            state.engine.now(),
        )
        .await?;
    tracing::info!(subject = %Logged(&claims.sub), role = %claims.role, jti = %claims.jti, by = %Logged(&caller.sub), "token issued over the API");
    Ok((StatusCode::CREATED, Json(TokenResponse::new(token, claims))))
}

/// Revokes a token by its id (`jti`): a token from a login, `POST /api/admin/tokens` or
/// `switchyard token create`. This server refuses it at once, every other process within a
/// second. Revoking it again changes nothing.
#[utoipa::path(
    delete,
    path = "/api/admin/tokens/{jti}",
    tag = "admin",
    params(("jti" = String, Path, description = "The token's id (its `jti` claim)")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "Not a token id", body = ErrorBody),
    )
)]
pub async fn revoke_token(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Path(jti): Path<String>,
) -> Result<StatusCode, ApiError> {
    if jti.is_empty() || jti.len() > 128 || jti.chars().any(char::is_control) {
        return Err(ApiError::new(
            ErrorCode::InvalidPath,
            "path: a token id is 1 to 128 printable characters",
        ));
    }
    let now = state.engine.now();
    if state.keys.revoke(&jti, &caller.sub, now).await? {
        tracing::info!(jti = %Logged(&jti), by = %Logged(&caller.sub), "token revoked over the API");
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// At most this many, newest first, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Who changed a definition, variable, secret, user, token or key, and when, newest first; kept
/// for 90 days. Never a secret's value or a password.
#[utoipa::path(
    get,
    path = "/api/admin/audit",
    tag = "admin",
    params(AuditQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of the audit log", body = AuditPage),
        (status = 400, description = "A bad limit or cursor", body = ErrorBody),
    )
)]
pub async fn list_audit(
    _: Admin,
    State(state): State<AppState>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = super::page_limit(query.limit)?;
    let before = match &query.cursor {
        None => None,
        Some(cursor) => Some(cursor.parse::<i64>().map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidQuery,
                "query string: `cursor` is not a cursor this API returned",
            )
        })?),
    };
    let entries = state.engine.audit_log(before, limit).await?;
    let next_cursor = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id.to_string()))
        .flatten();
    Ok(Json(AuditPage {
        entries: entries.into_iter().map(AuditEntry::from).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SystemMetrics {
    /// Jobs claimable now that no worker has taken.
    pub queue_depth: i64,
    pub workflows: usize,
    pub paused_workflows: usize,
    /// Runs currently in each active state.
    pub runs_pending: i64,
    pub runs_running: i64,
    /// When the scheduler in this process last ticked (ms since the epoch), if one runs here.
    pub scheduler_tick_at: Option<Millis>,
}

/// Queue depth, workflows and active runs, as JSON; `/metrics` has the same in Prometheus form.
#[utoipa::path(
    get,
    path = "/api/admin/metrics",
    tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, description = "System metrics", body = SystemMetrics))
)]
pub async fn system_metrics(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<SystemMetrics>, ApiError> {
    let engine = &state.engine;
    let workflows = engine.workflows().await?;
    Ok(Json(SystemMetrics {
        queue_depth: engine.queue_depth().await?,
        workflows: workflows.len(),
        paused_workflows: workflows.iter().filter(|w| w.paused).count(),
        runs_pending: engine.count_runs(RunStatus::Pending, None).await?,
        runs_running: engine.count_runs(RunStatus::Running, None).await?,
        scheduler_tick_at: state.heartbeats.scheduler_tick(),
    }))
}
