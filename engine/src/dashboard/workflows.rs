//! Workflows: their schedules, next fires, pause state and last runs; one workflow's definition,
//! DAG and start form (checked against its `input_schema` by the engine, as every start is).

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use minijinja::context;
use serde::Serialize;
use serde_json::{Map, Value};

use super::dag::{self, Node};
use super::error::DashboardError;
use super::login::redirect;
use super::render;
use super::session::{Session, encode_component};
use super::views::{FireRow, RunRow, WorkflowRow};
use crate::api::{AppState, Logged};
use crate::auth::Role;
use crate::definition::Workflow;
use crate::plan::Trigger;
use crate::store::RunFilter;

const NEXT_FIRES: usize = 3;
const LAST_RUNS: u32 = 5;

/// `GET /workflows`.
pub(super) async fn list(
    State(state): State<AppState>,
    session: Session,
) -> Result<Html<String>, DashboardError> {
    let engine = &state.engine;
    let now = engine.now();
    let mut rows = Vec::new();
    for overview in engine.overviews(NEXT_FIRES).await? {
        let runs: Vec<RunRow> = engine
            .runs(&RunFilter {
                workflow_id: Some(overview.state.id.clone()),
                limit: LAST_RUNS,
                ..RunFilter::default()
            })
            .await?
            .into_iter()
            .map(|r| RunRow::new(r, now))
            .collect();
        rows.push(context! { workflow => render::ser(&WorkflowRow::from(&overview)), runs => render::ser(&runs) });
    }
    render::page(
        &session,
        "workflows.html",
        "workflows",
        context! { workflows => rows },
    )
}

/// A field of the start form, for a top-level property of a simple `input_schema`.
#[derive(Debug, Serialize)]
struct Field {
    name: String,
    /// `string`, `integer`, `number` or `boolean`.
    kind: String,
    required: bool,
    description: Option<String>,
    /// The workflow's default, or what was sent.
    value: String,
    choices: Vec<String>,
}

/// The form's fields, when the schema is an object of scalar properties; `None` asks for the
/// input as JSON instead.
fn fields(workflow: &Workflow, sent: &HashMap<String, String>) -> Option<Vec<Field>> {
    let schema = workflow.input_schema.as_ref()?;
    let properties = schema.get("properties")?.as_object()?;
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (name, property) in properties {
        let kind = property.get("type").and_then(Value::as_str)?;
        if !["string", "integer", "number", "boolean"].contains(&kind) {
            return None;
        }
        let default = workflow
            .inputs
            .get(name)
            .or_else(|| property.get("default"))
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default();
        out.push(Field {
            value: sent
                .get(&format!("input.{name}"))
                .cloned()
                .unwrap_or(default),
            name: name.clone(),
            kind: kind.to_owned(),
            required: required.contains(&name.as_str()),
            description: property
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_owned),
            choices: property
                .get("enum")
                .and_then(Value::as_array)
                .map(|e| {
                    e.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    Some(out)
}

async fn show_page(
    state: &AppState,
    session: &Session,
    id: &str,
    status: StatusCode,
    sent: &HashMap<String, String>,
    problem: Option<(String, Vec<String>)>,
) -> Result<Response, DashboardError> {
    let engine = &state.engine;
    let overview = engine.overview(id, 5).await?;
    let now = engine.now();
    let workflow = overview.workflow.clone();
    let nodes: Vec<Node> = workflow
        .steps
        .iter()
        .map(|s| (s, false))
        .chain(workflow.on_failure.iter().map(|s| (s, true)))
        .map(|(s, on_failure)| Node {
            id: &s.id,
            kind: &s.kind,
            needs: &s.needs,
            state: None,
            on_failure,
        })
        .collect();
    let svg = dag::svg(&nodes, &format!("Steps of workflow {id}"));
    let runs: Vec<RunRow> = engine
        .runs(&RunFilter {
            workflow_id: Some(id.to_owned()),
            limit: 10,
            ..RunFilter::default()
        })
        .await?
        .into_iter()
        .map(|r| RunRow::new(r, now))
        .collect();
    let fires: Vec<FireRow> = engine
        .fires(Some(id), 10)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    let definition = serde_json::to_string_pretty(&*workflow).unwrap_or_default();
    let input_json = sent.get("input_json").cloned().unwrap_or_else(|| {
        if workflow.input_schema.is_some() && fields(&workflow, sent).is_some() {
            String::new()
        } else {
            serde_json::to_string_pretty(&workflow.inputs).unwrap_or_default()
        }
    });
    let body = render::page(
        session,
        "workflow.html",
        "workflows",
        context! {
            workflow => render::ser(&WorkflowRow::from(&overview)),
            dag => minijinja::Value::from_safe_string(svg),
            runs => render::ser(&runs),
            fires => render::ser(&fires),
            definition => definition,
            input_schema => workflow.input_schema.as_ref().map(|s| serde_json::to_string_pretty(s).unwrap_or_default()),
            fields => render::ser(&fields(&workflow, sent)),
            input_json => input_json,
            problem => problem.as_ref().map(|(m, _)| m.clone()),
            violations => problem.map(|(_, v)| v).unwrap_or_default(),
        },
    )?;
    Ok((status, body).into_response())
}

/// `GET /workflows/{id}`.
pub(super) async fn show(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, DashboardError> {
    show_page(&state, &session, &id, StatusCode::OK, &HashMap::new(), None).await
}

/// The input a start form sent: its JSON object, with the fields over it, each converted to
/// its property's type.
fn input_of(workflow: &Workflow, form: &HashMap<String, String>) -> Result<Value, DashboardError> {
    let mut input = match form.get("input_json").map(|s| s.trim()) {
        None | Some("") => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return Err(DashboardError::BadInput(
                    "the input must be a JSON object".into(),
                ));
            }
            Err(e) => {
                return Err(DashboardError::BadInput(format!(
                    "the input is not JSON: {e}"
                )));
            }
        },
    };
    for field in fields(workflow, &HashMap::new()).unwrap_or_default() {
        let key = format!("input.{}", field.name);
        let value = match (field.kind.as_str(), form.get(&key).map(|v| v.trim())) {
            ("boolean", given) => Value::Bool(given.is_some_and(|v| v == "true" || v == "on")),
            (_, None | Some("")) => continue,
            ("string", Some(v)) => Value::String(v.to_owned()),
            (kind, Some(v)) => match serde_json::from_str::<Value>(v) {
                Ok(n @ Value::Number(_)) => n,
                _ => {
                    return Err(DashboardError::BadInput(format!(
                        "{}: {v:?} is not {}",
                        field.name,
                        if kind == "integer" {
                            "an integer"
                        } else {
                            "a number"
                        }
                    )));
                }
            },
        };
        input.insert(field.name, value);
    }
    Ok(Value::Object(input))
}

/// `POST /workflows/{id}/start`: a run with the form's input; a refused input shows the form
/// again with each violation.
pub(super) async fn start(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, DashboardError> {
    session.act(
        Role::Operator,
        form.get("csrf").map(String::as_str).unwrap_or_default(),
    )?;
    let (_, workflow) = state.engine.latest(&id).await?;
    let refused = |e: DashboardError| async {
        let (status, message, violations) = e.into_parts();
        show_page(
            &state,
            &session,
            &id,
            status,
            &form,
            Some((message, violations)),
        )
        .await
    };
    let input = match input_of(&workflow, &form) {
        Ok(input) => input,
        Err(e) => return refused(e).await,
    };
    match state.engine.start(&id, input, Trigger::default()).await {
        Ok((run_id, _)) => {
            tracing::info!(run = %run_id, workflow = %Logged(&id), by = %Logged(session.name()), "run started from the dashboard");
            Ok(redirect(&format!("/runs/{}", encode_component(&run_id))))
        }
        Err(e @ crate::service::EngineError::Plan(_)) => refused(e.into()).await,
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct ActionForm {
    #[serde(default)]
    csrf: String,
}

async fn set_paused(
    state: &AppState,
    session: &Session,
    id: &str,
    csrf: &str,
    paused: bool,
) -> Result<Response, DashboardError> {
    session.act(Role::Operator, csrf)?;
    state.engine.set_paused(id, paused).await?;
    tracing::info!(workflow = %Logged(id), paused, by = %Logged(session.name()), "schedule pause changed from the dashboard");
    Ok(redirect(&format!("/workflows/{}", encode_component(id))))
}

/// `POST /workflows/{id}/pause`.
pub(super) async fn pause(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, DashboardError> {
    set_paused(&state, &session, &id, &form.csrf, true).await
}

/// `POST /workflows/{id}/resume`.
pub(super) async fn resume(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, DashboardError> {
    set_paused(&state, &session, &id, &form.csrf, false).await
}
