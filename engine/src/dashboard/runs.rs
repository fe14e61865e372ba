//! Runs: the list (filters, cursor pages, new runs through server-sent events) and one run
//! (its DAG with each step's state, the attempts on a time axis, errors, outputs, artifacts,
//! loop items, logs; cancel, retry, send a signal). A run's page refreshes itself through htmx
//! until the run ends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::{Stream, StreamExt, stream};
use minijinja::context;
use serde::Deserialize;
use serde_json::Value;

use super::dag::{self, Node};
use super::error::DashboardError;
use super::login::redirect;
use super::render;
use super::session::{Session, encode_component};
use super::views::{self, RunRow, StepView};
use crate::api::{AppState, Logged};
use crate::auth::Role;
use crate::state::{Millis, RunStatus};
use crate::store::RunFilter;

const PAGE: u32 = 50;

#[derive(Debug, Default, Deserialize)]
pub(super) struct RunQuery {
    #[serde(default)]
    workflow: String,
    #[serde(default)]
    status: String,
    /// `YYYY-MM-DDTHH:MM` (UTC), as a `datetime-local` input sends it.
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    cursor: String,
}

/// `YYYY-MM-DDTHH:MM[:SS]` in UTC as ms since the epoch.
fn moment(field: &str, text: &str) -> Result<Option<Millis>, DashboardError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<jiff::civil::DateTime>()
        .ok()
        .and_then(|dt| dt.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|z| Some(z.timestamp().as_millisecond()))
        .ok_or_else(|| {
            DashboardError::BadInput(format!("{field}: {text:?} is not a time YYYY-MM-DDTHH:MM"))
        })
}

impl RunQuery {
    fn filter(&self, limit: u32) -> Result<RunFilter, DashboardError> {
        let status = match self.status.as_str() {
            "" => None,
            s => Some(s.parse::<RunStatus>().map_err(|_| {
                DashboardError::BadInput(format!("status: {s:?} is not a run status"))
            })?),
        };
        let after_cursor = match self.cursor.as_str() {
            "" => None,
            c => Some(
                c.split_once('.')
                    .and_then(|(at, id)| Some((at.parse().ok()?, id.to_owned())))
                    .filter(|(_, id): &(Millis, String)| !id.is_empty())
                    .ok_or_else(|| {
                        DashboardError::BadInput("cursor: not one of this list's".into())
                    })?,
            ),
        };
        Ok(RunFilter {
            workflow_id: (!self.workflow.is_empty()).then(|| self.workflow.clone()),
            status,
            created_after: moment("from", &self.from)?,
            created_before: moment("to", &self.to)?,
            after_cursor,
            limit,
        })
    }

    /// The query string of these filters, for links that keep them.
    fn filters(&self) -> String {
        [
            ("workflow", &self.workflow),
            ("status", &self.status),
            ("from", &self.from),
            ("to", &self.to),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", encode_component(v)))
        .collect::<Vec<_>>()
        .join("&")
    }
}

/// `GET /runs`.
pub(super) async fn list(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<RunQuery>,
) -> Result<Html<String>, DashboardError> {
    let engine = &state.engine;
    let now = engine.now();
    let mut runs: Vec<RunRow> = engine
        .runs(&query.filter(PAGE + 1)?)
        .await?
        .into_iter()
        .map(|r| RunRow::new(r, now))
        .collect();
    let next_cursor = if runs.len() > PAGE as usize {
        runs.truncate(PAGE as usize);
        runs.last().map(|r| format!("{}.{}", r.created_at, r.id))
    } else {
        None
    };
    let filters = query.filters();
    let live = query.cursor.is_empty().then(|| {
        let since = runs.first().map_or(now, |r| r.created_at);
        let sep = if filters.is_empty() { "" } else { "&" };
        format!("/runs/live?{filters}{sep}since={since}")
    });
    let workflows: Vec<String> = engine
        .workflows()
        .await?
        .into_iter()
        .map(|w| w.id)
        .collect();
    render::page(
        &session,
        "runs.html",
        "runs",
        context! {
            runs => render::ser(&runs),
            next => next_cursor.map(|c| {
                let sep = if filters.is_empty() { "" } else { "&" };
                format!("/runs?{filters}{sep}cursor={}", encode_component(&c))
            }),
            live => live,
            query => context! {
                workflow => query.workflow,
                status => query.status,
                from => query.from,
                to => query.to,
            },
            paged => !query.cursor.is_empty(),
            workflows => workflows,
            statuses => RunStatus::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        },
    )
}

#[derive(Debug, Deserialize)]
pub(super) struct LiveQuery {
    #[serde(flatten)]
    filters: RunQuery,
    since: Option<Millis>,
}

/// How often the live list looks for new and changed runs, and how long one stream lasts: the
/// browser reconnects, and the session is checked again, so a stream outlives its session's
/// logout by a minute at most.
const LIVE_EVERY: Duration = Duration::from_secs(1);
const LIVE_AT_MOST: Duration = Duration::from_secs(60);
/// The newest runs the live list follows.
const LIVE_RUNS: u32 = 100;

/// `GET /runs/live`: server-sent events, one `run` event per run created since the page was
/// made (and again whenever its status changes), its data the run's table row.
pub(super) async fn live(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<LiveQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, DashboardError> {
    let mut filter = query.filters.filter(LIVE_RUNS)?;
    let since = query.since.unwrap_or_else(|| state.engine.now());
    filter.created_after = Some(filter.created_after.map_or(since, |a| a.max(since)));
    filter.after_cursor = None;
    let seen: HashMap<String, &'static str> = HashMap::new();
    let started = tokio::time::Instant::now();
    let events = stream::unfold(
        (state, session, filter, seen, true),
        move |(state, session, filter, mut seen, first)| async move {
            if !first {
                tokio::time::sleep(LIVE_EVERY).await;
            }
            if started.elapsed() > LIVE_AT_MOST {
                return None;
            }
            let now = state.engine.now();
            let runs = match state.engine.runs(&filter).await {
                Ok(runs) => runs,
                Err(e) => {
                    tracing::debug!(error = %e, "live run list skipped a beat");
                    Vec::new()
                }
            };
            let mut events = Vec::new();
            // Oldest first, so each goes on top of the ones before.
            for run in runs.into_iter().rev() {
                let row = RunRow::new(run, now);
                if seen.get(&row.id) == Some(&row.status) {
                    continue;
                }
                seen.insert(row.id.clone(), row.status);
                let id = row.id.clone();
                match render::fragment(
                    &session,
                    "run_rows.html",
                    context! { runs => render::ser(&[row]) },
                ) {
                    Ok(Html(html)) => {
                        events.push(Ok(Event::default().event("run").id(id).data(html.trim())))
                    }
                    Err(e) => tracing::warn!(error = %e, "a live run row did not render"),
                }
            }
            Some((stream::iter(events), (state, session, filter, seen, false)))
        },
    )
    .flatten();
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// The most log lines a run's page shows: the last ones.
const LOG_LINES_SHOWN: u32 = 200;
/// The most attempts a run's timeline draws: the latest ones.
const ATTEMPTS_DRAWN: usize = 300;
/// The most items of a `for_each` step a run's page lists.
const ITEMS_SHOWN: usize = 100;

/// What a run's page shows, for the whole page and for its live part.
async fn run_context(state: &AppState, id: &str) -> Result<minijinja::Value, DashboardError> {
    let engine = &state.engine;
    let now = engine.now();
    let detail = engine.run(id).await?;
    let workflow = engine
        .version(&detail.summary.workflow_id, detail.summary.version)
        .await?;
    let mut steps = views::steps(detail.steps, now);
    let state_of: HashMap<&str, &str> = steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.state))
        .collect();
    let nodes: Vec<Node> = workflow
        .steps
        .iter()
        .map(|s| (s, false))
        .chain(workflow.on_failure.iter().map(|s| (s, true)))
        .map(|(s, on_failure)| Node {
            id: &s.id,
            kind: &s.kind,
            needs: &s.needs,
            state: Some(state_of.get(s.id.as_str()).copied().unwrap_or("waiting")),
            on_failure,
        })
        .collect();
    let svg = dag::svg(&nodes, &format!("Steps of run {id} and their states"));
    let mut attempts: Vec<_> = steps
        .iter()
        .flat_map(|s| {
            s.attempts
                .iter()
                .chain(s.items.iter().flat_map(|i| &i.attempts))
        })
        .cloned()
        .collect();
    attempts.sort_by_key(|a| (a.started_at, a.step_id.clone(), a.attempt));
    // A loop of thousands of items would draw a picture thousands of rows tall, and redraw it
    // each second while the run goes on: the latest attempts only.
    let attempts_hidden = attempts.len().saturating_sub(ATTEMPTS_DRAWN);
    attempts.drain(..attempts_hidden);
    let from = detail
        .summary
        .started_at
        .unwrap_or(detail.summary.created_at);
    let to = detail.summary.finished_at.unwrap_or(now).max(from + 1);
    let timeline = (!attempts.is_empty()).then(|| dag::timeline(&attempts, from, to));
    let artifacts: Vec<Value> = steps
        .iter()
        .flat_map(|s| std::iter::once(s).chain(&s.items))
        .flat_map(|s: &StepView| artifacts_in(&s.step_id, s.output.as_ref()))
        .collect();
    // Trimmed after the attempts and artifacts above are read from every item.
    for step in &mut steps {
        step.keep_items(ITEMS_SHOWN);
    }
    let logs = engine.last_step_logs(id, LOG_LINES_SHOWN).await?;
    let children: Vec<RunRow> = engine
        .child_runs(id, 50)
        .await?
        .into_iter()
        .map(|r| RunRow::new(r, now))
        .collect();
    let signals: Vec<String> = workflow
        .steps
        .iter()
        .filter(|s| s.kind == "wait")
        .filter_map(|s| {
            s.with
                .get("signal")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    let run = RunRow::new(detail.summary, now);
    Ok(context! {
        retryable => RunStatus::RETRYABLE.iter().any(|s| s.as_str() == run.status),
        run => render::ser(&run),
        input => render::ser(&detail.input),
        output => render::ser(&detail.output),
        scheduled_at => detail.scheduled_at,
        dag => minijinja::Value::from_safe_string(svg),
        timeline => timeline.map(minijinja::Value::from_safe_string),
        attempts => render::ser(&attempts),
        attempts_hidden => attempts_hidden,
        steps => render::ser(&steps),
        artifacts => render::ser(&artifacts),
        logs => logs.into_iter().map(|l| context! {
            at => l.at, step_id => l.step_id, attempt => l.attempt, stream => l.stream, text => l.text,
        }).collect::<Vec<_>>(),
        children => render::ser(&children),
        signals => signals,
    })
}

/// The artifacts a step's output names (`{"artifact": {id, size, content_type, ...}}`,
/// anywhere in it).
fn artifacts_in(step_id: &str, output: Option<&Value>) -> Vec<Value> {
    fn walk(value: &Value, step_id: &str, out: &mut Vec<Value>) {
        match value {
            Value::Object(map) => {
                if let Some(a) = map.get("artifact").and_then(Value::as_object)
                    && let Some(id) = a.get("id").and_then(Value::as_str)
                {
                    out.push(serde_json::json!({
                        "step_id": step_id,
                        "id": id,
                        "size": a.get("size"),
                        "content_type": a.get("content_type"),
                    }));
                }
                map.values().for_each(|v| walk(v, step_id, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, step_id, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(output) = output {
        walk(output, step_id, &mut out);
    }
    out
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct ShowQuery {
    #[serde(default)]
    done: String,
}

/// `GET /runs/{id}`.
pub(super) async fn show(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Query(query): Query<ShowQuery>,
) -> Result<Html<String>, DashboardError> {
    let ctx = run_context(&state, &id).await?;
    let done = match query.done.as_str() {
        "cancel" => Some("Cancel requested."),
        "retry" => Some("Retry requested: the steps that did not succeed run again."),
        "signal" => Some("Signal sent."),
        _ => None,
    };
    render::page(
        &session,
        "run.html",
        "runs",
        context! { done => done, ..ctx },
    )
}

/// `GET /runs/{id}/live`: the part of a run's page that changes, for htmx to swap in.
pub(super) async fn show_live(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Html<String>, DashboardError> {
    let ctx = run_context(&state, &id).await?;
    render::fragment(&session, "run_live.html", ctx)
}

#[derive(Debug, Deserialize)]
pub(super) struct ActionForm {
    #[serde(default)]
    csrf: String,
}

fn back_to(id: &str, done: &str) -> Response {
    redirect(&format!("/runs/{}?done={done}", encode_component(id)))
}

/// `POST /runs/{id}/cancel`.
pub(super) async fn cancel(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, DashboardError> {
    session.act(Role::Operator, &form.csrf)?;
    state.engine.cancel(&id).await?;
    tracing::info!(run = %Logged(&id), by = %Logged(session.name()), "run cancelled from the dashboard");
    Ok(back_to(&id, "cancel"))
}

/// `POST /runs/{id}/retry`.
pub(super) async fn retry(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Result<Response, DashboardError> {
    session.act(Role::Operator, &form.csrf)?;
    state.engine.retry(&id).await?;
    tracing::info!(run = %Logged(&id), by = %Logged(session.name()), "run retried from the dashboard");
    Ok(back_to(&id, "retry"))
}

#[derive(Debug, Deserialize)]
pub(super) struct SignalForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    payload: String,
}

/// `POST /runs/{id}/signal`: `payload` is JSON; empty sends `null`.
pub(super) async fn signal(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Form(form): Form<SignalForm>,
) -> Result<Response, DashboardError> {
    session.act(Role::Operator, &form.csrf)?;
    let payload = match form.payload.trim() {
        "" => Value::Null,
        text => serde_json::from_str(text)
            .map_err(|e| DashboardError::BadInput(format!("the payload is not JSON: {e}")))?,
    };
    state.engine.signal(&id, &form.name, payload).await?;
    tracing::info!(run = %Logged(&id), signal = %Logged(&form.name), by = %Logged(session.name()), "signal sent from the dashboard");
    Ok(back_to(&id, "signal"))
}

/// `GET /artifacts/{id}`: a file a step kept, served as the API serves it (sandboxed, media
/// inline, anything else as a download).
pub(super) async fn artifact(
    State(state): State<AppState>,
    _: Session,
    Path(id): Path<String>,
) -> Response {
    match crate::api::artifacts::artifact_response(&state.engine, &id).await {
        Ok(response) => response,
        Err(e) => {
            let body = render::error_page(e.status, &e.message, &[]);
            (e.status, body).into_response()
        }
    }
}
