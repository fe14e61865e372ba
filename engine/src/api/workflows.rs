//! Workflows: the public listing, list and show, start, update (a new version), create, pause and
//! resume, and the record of fires.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AppState;
use super::auth::{Admin, Operator, Viewer};
use super::error::{ApiError, Bytes, ErrorBody, ErrorCode, Json, Path, Query};
use super::types::{FireRecord, WorkflowInfo};
use crate::definition::{Format, Workflow, WorkflowMap, check_str};
use crate::plan::Trigger;
use crate::store::DefinitionOrigin;

/// How many upcoming fires a workflow listing shows.
const NEXT_FIRES: usize = 3;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PublicWorkflow {
    pub id: String,
    pub name: Option<String>,
    pub category: Option<String>,
    pub description: Option<String>,
    pub scheduled: bool,
    pub paused: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkflowDetail {
    #[serde(flatten)]
    pub info: WorkflowInfo,
    /// The definition of `version`, in the shape of the definition format.
    #[schema(value_type = Object)]
    pub definition: Value,
}

/// Names and descriptions of every workflow; no definitions, no runs.
#[utoipa::path(
    get,
    path = "/api/workflows/public",
    tag = "public",
    responses((status = 200, description = "Every workflow", body = Vec<PublicWorkflow>))
)]
pub async fn public_workflows(
    State(state): State<AppState>,
) -> Result<Json<Vec<PublicWorkflow>>, ApiError> {
    Ok(Json(
        state
            .engine
            .overviews(0)
            .await?
            .into_iter()
            .map(|o| PublicWorkflow {
                id: o.state.id,
                name: o.workflow.name.clone(),
                category: o.workflow.category.clone(),
                description: o.workflow.description.clone(),
                scheduled: o.workflow.schedule.is_some(),
                paused: o.state.paused,
            })
            .collect(),
    ))
}

/// Every workflow with its version, schedule, next fires and pause state.
#[utoipa::path(
    get,
    path = "/api/workflows",
    tag = "workflows",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every workflow", body = Vec<WorkflowInfo>),
        (status = 401, description = "No valid token", body = ErrorBody),
    )
)]
pub async fn list_workflows(
    _: Viewer,
    State(state): State<AppState>,
) -> Result<Json<Vec<WorkflowInfo>>, ApiError> {
    Ok(Json(
        state
            .engine
            .overviews(NEXT_FIRES)
            .await?
            .iter()
            .map(WorkflowInfo::from)
            .collect(),
    ))
}

/// One workflow with the definition of its current version.
#[utoipa::path(
    get,
    path = "/api/workflows/{id}",
    tag = "workflows",
    params(("id" = String, Path, description = "Workflow id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The workflow", body = WorkflowDetail),
        (status = 404, description = "No such workflow", body = ErrorBody),
    )
)]
pub async fn show_workflow(
    _: Viewer,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkflowDetail>, ApiError> {
    let overview = state.engine.overview(&id, NEXT_FIRES).await?;
    Ok(Json(WorkflowDetail {
        info: WorkflowInfo::from(&overview),
        definition: serde_json::to_value(overview.workflow.as_ref())
            .expect("definitions serialize"),
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The run's `input`; `null` when absent.
    #[serde(default)]
    pub input: Value,
    /// Instead of the workflow's `priority`: -100 to 100, higher claimed first.
    #[schema(minimum = -100, maximum = 100)]
    pub priority: Option<i32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StartedRun {
    pub run_id: String,
    pub workflow_id: String,
    /// False when the `Idempotency-Key` had started this run before.
    pub created: bool,
}

/// The longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Starts a run of the workflow's current version. With an `Idempotency-Key` header already
/// used, returns the run that key started (200) instead of starting another (201).
#[utoipa::path(
    post,
    path = "/api/workflows/{id}/start",
    tag = "workflows",
    params(
        ("id" = String, Path, description = "Workflow id"),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
            description = "Starts at most one run per key"),
    ),
    request_body = StartRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "A run started", body = StartedRun),
        (status = 200, description = "The run this idempotency key started before", body = StartedRun),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 409, description = "The idempotency key started a run with another input", body = ErrorBody),
        (status = 422, description = "The input does not fit the workflow", body = ErrorBody),
    )
)]
pub async fn start_workflow(
    Operator(caller): Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(request): Json<StartRequest>,
) -> Result<(StatusCode, Json<StartedRun>), ApiError> {
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidHeader,
                        format!(
                            "header Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                        ),
                    )
                })?;
            // Keys are per workflow, so two workflows may use the same one.
            Some(format!("api/{id}/{key}"))
        }
    };
    let (run_id, created) = state
        .engine
        .start(
            &id,
            request.input,
            Trigger {
                idempotency_key,
                priority: request.priority,
                ..Trigger::default()
            },
        )
        .await?;
    if created {
        tracing::info!(run = %run_id, workflow = %super::Logged(&id), by = %super::Logged(&caller.sub), "run started over the API");
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(StartedRun {
            run_id,
            workflow_id: id,
            created,
        }),
    ))
}

/// The definition format of a body, from its `Content-Type`: JSON, or YAML (which also reads
/// JSON) when the type says YAML or nothing.
fn body_format(headers: &HeaderMap) -> Result<Format, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/yaml");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(Format::Json),
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" | "text/plain" => {
            Ok(Format::Yaml)
        }
        other => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!(
                "header Content-Type: {other:?} is not a definition; send application/json or application/yaml"
            ),
        )),
    }
}

/// Parses and validates a definition body against the stored workflows, with the CLI's errors.
async fn checked_body(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<Workflow>, ApiError> {
    let format = body_format(headers)?;
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidDefinition,
            format!("request body: not UTF-8 text ({e})"),
        )
    })?;
    let mut existing = WorkflowMap::new();
    for overview in state.engine.overviews(0).await? {
        existing.insert(overview.state.id, overview.workflow);
    }
    check_str("request body", text, format, &existing, &state.step_kinds).map_err(|errors| {
        ApiError::with_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidDefinition,
            errors.to_string(),
        )
    })
}

/// Stores `workflows` in one transaction, all of them or, when the store refuses one, none,
/// with an audit entry for `actor` for each new version.
async fn install(
    state: &AppState,
    workflows: Vec<Workflow>,
    create_only: bool,
    actor: &str,
) -> Result<Vec<Installed>, ApiError> {
    let map: WorkflowMap = workflows
        .into_iter()
        .map(|wf| (wf.id.clone(), std::sync::Arc::new(wf)))
        .collect();
    let installed = if create_only {
        state.engine.create(&map, actor).await?
    } else {
        state
            .engine
            .install(&map, DefinitionOrigin::Api, Some(actor))
            .await?
    };
    Ok(installed
        .into_iter()
        .map(|(id, version)| Installed { id, version })
        .collect())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Installed {
    pub id: String,
    /// The version new runs use; unchanged when the definition was the same.
    pub version: i64,
}

/// Replaces a workflow's definition: a new version for new runs; runs going keep theirs. The
/// body is one workflow in YAML or JSON, checked as the CLI checks files.
#[utoipa::path(
    put,
    path = "/api/workflows/{id}",
    tag = "workflows",
    params(("id" = String, Path, description = "Workflow id")),
    request_body(content = String, description = "One workflow definition", content_type = "application/yaml"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The version new runs use", body = Installed),
        (status = 400, description = "The body names another workflow", body = ErrorBody),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 422, description = "The definition is invalid; every problem as body:line:column", body = ErrorBody),
    )
)]
pub async fn update_workflow(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Bytes(body): Bytes,
) -> Result<Json<Installed>, ApiError> {
    state.engine.workflow_state(&id).await?;
    let workflows = checked_body(&state, &headers, &body).await?;
    match workflows.as_slice() {
        [one] if one.id == id => {}
        [one] => {
            return Err(ApiError::new(
                ErrorCode::IdMismatch,
                format!(
                    "request body: defines workflow {:?}, but the path names {id:?}",
                    one.id
                ),
            ));
        }
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidDefinition,
                format!(
                    "request body: holds {} workflows; PUT takes exactly one",
                    workflows.len()
                ),
            ));
        }
    }
    let installed = install(&state, workflows, false, &caller.sub)
        .await?
        .remove(0);
    tracing::info!(workflow = %super::Logged(&id), version = installed.version, by = %super::Logged(&caller.sub), "workflow updated over the API");
    Ok(Json(installed))
}

/// Creates workflows from a definition body (one workflow, or a `workflows:` map) in YAML or
/// JSON. Ids already stored are refused: change those with `PUT /api/workflows/{id}`.
#[utoipa::path(
    post,
    path = "/api/admin/workflows",
    tag = "admin",
    request_body(content = String, description = "A definition file's content", content_type = "application/yaml"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The workflows created", body = Vec<Installed>),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 409, description = "A workflow with this id exists", body = ErrorBody),
        (status = 422, description = "The definition is invalid; every problem as body:line:column", body = ErrorBody),
    )
)]
pub async fn create_workflows(
    Admin(caller): Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Bytes(body): Bytes,
) -> Result<(StatusCode, Json<Vec<Installed>>), ApiError> {
    let workflows = checked_body(&state, &headers, &body).await?;
    let existing: std::collections::HashSet<String> = state
        .engine
        .workflows()
        .await?
        .into_iter()
        .map(|w| w.id)
        .collect();
    if let Some(taken) = workflows.iter().find(|w| existing.contains(&w.id)) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "workflow {:?} exists; change it with PUT /api/workflows/{}",
                taken.id, taken.id
            ),
        ));
    }
    // The check above answers the common case with a clear message; the store refuses a
    // workflow created meanwhile, and then stores none of them.
    let installed = install(&state, workflows, true, &caller.sub).await?;
    for w in &installed {
        tracing::info!(workflow = %super::Logged(&w.id), by = %super::Logged(&caller.sub), "workflow created over the API");
    }
    Ok((StatusCode::CREATED, Json(installed)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Remove it although runs of it have not ended; they finish with their version.
    pub force: Option<bool>,
}

/// Removes a workflow: its schedule stops, and it can no longer be started; its runs, their
/// history and its fires stay. Refused while runs of it have not ended, unless `force=true`.
/// Installing it again (a file, `POST /api/admin/workflows`) brings it back with a new version.
#[utoipa::path(
    delete,
    path = "/api/workflows/{id}",
    tag = "workflows",
    params(("id" = String, Path, description = "Workflow id"), RemoveQuery),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 409, description = "Runs of it have not ended", body = ErrorBody),
    )
)]
pub async fn remove_workflow(
    Admin(caller): Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<RemoveQuery>,
) -> Result<StatusCode, ApiError> {
    state
        .engine
        .remove(&id, query.force.unwrap_or(false))
        .await?;
    tracing::info!(workflow = %id, by = %caller.sub, "workflow removed over the API");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PauseState {
    pub workflow_id: String,
    pub paused: bool,
}

async fn set_paused(
    state: &AppState,
    id: String,
    paused: bool,
    by: &str,
) -> Result<Json<PauseState>, ApiError> {
    state.engine.set_paused(&id, paused).await?;
    tracing::info!(workflow = %super::Logged(&id), paused, by = %super::Logged(by), "schedule pause changed over the API");
    Ok(Json(PauseState {
        workflow_id: id,
        paused,
    }))
}

/// Pauses the workflow's schedule: its fires are recorded as skipped until it is resumed.
#[utoipa::path(
    post,
    path = "/api/workflows/{id}/pause",
    tag = "workflows",
    params(("id" = String, Path, description = "Workflow id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Paused", body = PauseState),
        (status = 404, description = "No such workflow", body = ErrorBody),
    )
)]
pub async fn pause_workflow(
    Operator(caller): Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PauseState>, ApiError> {
    set_paused(&state, id, true, &caller.sub).await
}

/// Resumes the workflow's schedule.
#[utoipa::path(
    post,
    path = "/api/workflows/{id}/resume",
    tag = "workflows",
    params(("id" = String, Path, description = "Workflow id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Resumed", body = PauseState),
        (status = 404, description = "No such workflow", body = ErrorBody),
    )
)]
pub async fn resume_workflow(
    Operator(caller): Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PauseState>, ApiError> {
    set_paused(&state, id, false, &caller.sub).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FireQuery {
    /// Only fires of this workflow.
    pub workflow: Option<String>,
    /// Only fires that did not start a run (default false).
    #[serde(default)]
    pub skipped: bool,
    /// At most this many, newest first, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// Schedule fires, newest first: the run each started, or why it was skipped.
#[utoipa::path(
    get,
    path = "/api/fires",
    tag = "workflows",
    params(FireQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Fires", body = Vec<FireRecord>),
        (status = 400, description = "A bad filter", body = ErrorBody),
    )
)]
pub async fn list_fires(
    _: Viewer,
    State(state): State<AppState>,
    Query(query): Query<FireQuery>,
) -> Result<Json<Vec<FireRecord>>, ApiError> {
    let limit = super::page_limit(query.limit)?;
    let fires = state.engine.fires(query.workflow.as_deref(), limit).await?;
    Ok(Json(
        fires
            .into_iter()
            .filter(|f| !query.skipped || f.skipped_reason.is_some())
            .map(FireRecord::from)
            .collect(),
    ))
}
