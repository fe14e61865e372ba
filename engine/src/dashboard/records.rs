//! What the engine records beside runs: schedule fires (with why one was skipped), inbound
//! webhook events, run notifications, alerts, and usage. Transactions appear here once the
//! engine records them; it records none yet.

use axum::extract::{Query, State};
use axum::response::Html;
use minijinja::context;
use serde::Deserialize;

use super::error::DashboardError;
use super::render;
use super::session::Session;
use super::views::{AlertRow, FireRow, NotificationRow, UsageRow, WebhookRow};
use crate::api::AppState;
use crate::state::NotificationStatus;
use crate::store::UsageFilter;

const ROWS: u32 = 100;

#[derive(Debug, Default, Deserialize)]
pub(super) struct Filter {
    #[serde(default)]
    workflow: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    status: String,
}

fn given(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// `GET /fires`.
pub(super) async fn fires(
    State(state): State<AppState>,
    session: Session,
    Query(filter): Query<Filter>,
) -> Result<Html<String>, DashboardError> {
    let fires: Vec<FireRow> = state
        .engine
        .fires(given(&filter.workflow), ROWS)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    render::page(
        &session,
        "fires.html",
        "fires",
        context! { fires => render::ser(&fires), workflow => filter.workflow },
    )
}

/// `GET /webhooks`.
pub(super) async fn webhooks(
    State(state): State<AppState>,
    session: Session,
    Query(filter): Query<Filter>,
) -> Result<Html<String>, DashboardError> {
    let events: Vec<WebhookRow> = state
        .engine
        .webhook_events(given(&filter.source), ROWS)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    render::page(
        &session,
        "webhooks.html",
        "webhooks",
        context! { events => render::ser(&events), source => filter.source },
    )
}

/// `GET /notifications`.
pub(super) async fn notifications(
    State(state): State<AppState>,
    session: Session,
    Query(filter): Query<Filter>,
) -> Result<Html<String>, DashboardError> {
    let status = match given(&filter.status) {
        None => None,
        Some(s) => Some(s.parse::<NotificationStatus>().map_err(|_| {
            DashboardError::BadInput(format!("status: {s:?} is not a notification status"))
        })?),
    };
    let rows: Vec<NotificationRow> = state
        .engine
        .notifications(status, ROWS)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    render::page(
        &session,
        "notifications.html",
        "notifications",
        context! {
            notifications => render::ser(&rows),
            status => filter.status,
            statuses => NotificationStatus::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        },
    )
}

/// `GET /alerts`.
pub(super) async fn alerts(
    State(state): State<AppState>,
    session: Session,
    Query(filter): Query<Filter>,
) -> Result<Html<String>, DashboardError> {
    let alerts: Vec<AlertRow> = state
        .engine
        .alerts(given(&filter.workflow), ROWS)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    render::page(
        &session,
        "alerts.html",
        "alerts",
        context! { alerts => render::ser(&alerts), workflow => filter.workflow },
    )
}

/// `GET /usage`: what steps spent at services, per provider, workflow and day.
pub(super) async fn usage(
    State(state): State<AppState>,
    session: Session,
    Query(filter): Query<Filter>,
) -> Result<Html<String>, DashboardError> {
    let rows: Vec<UsageRow> = state
        .engine
        .usage(&UsageFilter {
            workflow_id: given(&filter.workflow).map(str::to_owned),
            limit: 500,
            ..UsageFilter::default()
        })
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    render::page(
        &session,
        "usage.html",
        "usage",
        context! { usage => render::ser(&rows), workflow => filter.workflow },
    )
}
