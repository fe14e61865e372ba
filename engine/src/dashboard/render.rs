//! Pages from minijinja templates (`templates/`, embedded), HTML-escaped by default, with the
//! filters they share: times in UTC, durations, pretty JSON.

use std::sync::OnceLock;

use axum::http::StatusCode;
use axum::response::Html;
use minijinja::{Environment, Value, context};

use super::assets;
use super::error::DashboardError;
use super::session::Session;
use crate::auth::Role;
use crate::state::Millis;

macro_rules! templates {
    ($env:ident, $($name:literal),+ $(,)?) => {
        $( $env.add_template($name, include_str!(concat!("templates/", $name)))
            .expect(concat!("template ", $name, " parses")); )+
    };
}

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        templates!(
            env,
            "base.html",
            "macros.html",
            "error.html",
            "login.html",
            "overview.html",
            "cards.html",
            "workflows.html",
            "workflow.html",
            "runs.html",
            "run_rows.html",
            "run_rows_table.html",
            "run.html",
            "run_live.html",
            "fires.html",
            "webhooks.html",
            "notifications.html",
            "alerts.html",
            "usage.html",
            "admin.html",
        );
        env.add_filter("time", |at: Option<i64>| at.map(time).unwrap_or_default());
        env.add_filter("duration", |ms: Option<i64>| {
            ms.map(duration).unwrap_or_default()
        });
        env.add_filter("json", |value: Value| {
            serde_json::to_value(&value)
                .ok()
                .map(|v| v.to_string())
                .unwrap_or_default()
        });
        env.add_filter("pretty", |value: Value| {
            serde_json::to_value(&value)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_default()
        });
        env
    })
}

/// Any serializable value for a template's context.
pub(super) fn ser<T: serde::Serialize>(value: &T) -> Value {
    Value::from(minijinja::value::Serde(value))
}

/// `at` (ms since the epoch) as `YYYY-MM-DD HH:MM:SS` UTC.
pub(super) fn time(at: Millis) -> String {
    jiff::Timestamp::from_millisecond(at)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// A duration in ms as a person reads it: `850 ms`, `4.2 s`, `3 min 5 s`, `2 h 10 min`.
pub(super) fn duration(ms: Millis) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// What every page's layout reads: who is logged in, what they may do, the form token, where
/// the assets are.
fn layout(session: Option<&Session>, nav: &str) -> Value {
    let me = session.map(|s| {
        context! {
            name => s.name(),
            role => s.role().as_str(),
            can_operate => s.role().allows(Role::Operator),
            can_admin => s.role().allows(Role::Admin),
        }
    });
    context! {
        me => me,
        csrf => session.map(|s| s.csrf.clone()),
        nav => nav,
        assets => context! {
            htmx => assets::url("htmx.min.js"),
            uplot_js => assets::url("uPlot.iife.min.js"),
            uplot_css => assets::url("uPlot.min.css"),
            js => assets::url("dashboard.js"),
            css => assets::url("dashboard.css"),
            favicon => assets::url("favicon.svg"),
        },
    }
}

/// A whole page for a logged-in person; `nav` marks where in the menu it is.
pub(super) fn page(
    session: &Session,
    template: &str,
    nav: &str,
    ctx: Value,
) -> Result<Html<String>, DashboardError> {
    render(template, context! { ..ctx, ..layout(Some(session), nav) })
}

/// A page without a session (the login page).
pub(super) fn public_page(template: &str, ctx: Value) -> Result<Html<String>, DashboardError> {
    render(template, context! { ..ctx, ..layout(None, "") })
}

/// A part of a page, for htmx to swap in.
pub(super) fn fragment(
    session: &Session,
    template: &str,
    ctx: Value,
) -> Result<Html<String>, DashboardError> {
    page(session, template, "", ctx)
}

fn render(template: &str, ctx: Value) -> Result<Html<String>, DashboardError> {
    Ok(Html(environment().get_template(template)?.render(ctx)?))
}

/// The page of an error; plain text if even that does not render.
pub(super) fn error_page(status: StatusCode, message: &str, violations: &[String]) -> Html<String> {
    let ctx = context! {
        status => status.as_u16(),
        reason => status.canonical_reason().unwrap_or(""),
        message => message,
        violations => ser(&violations),
    };
    render("error.html", context! { ..ctx, ..layout(None, "") }).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the error page did not render");
        Html(format!("{status}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_read_as_people_write_them() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(4_200), "4.2 s");
        assert_eq!(duration(185_000), "3 min 5 s");
        assert_eq!(duration(7_800_000), "2 h 10 min");
        assert_eq!(time(0), "1970-01-01 00:00:00");
    }

    #[test]
    fn every_template_parses() {
        environment();
    }

    fn session(role: Role) -> Session {
        Session {
            claims: crate::auth::Claims {
                sub: "olga".into(),
                role,
                iat: 0,
                exp: 1,
                jti: "j".into(),
                user_version: Some(1),
            },
            csrf: "token-of-the-session".into(),
        }
    }

    fn run(status: crate::state::RunStatus) -> super::super::views::RunRow {
        super::super::views::RunRow::new(
            crate::store::RunSummary {
                id: "01a2341e-d0b1-71c4-be9c-d79b82384f4c".into(),
                workflow_id: "batch".into(),
                version: 1,
                status,
                parent_run_id: None,
                error: Some("step x failed: <boom>".into()),
                created_at: 1_000,
                started_at: Some(1_000),
                finished_at: Some(2_000),
            },
            3_000,
        )
    }

    /// Every page renders with the data it is given, and escapes it; catches what parsing
    /// cannot (an unknown filter, a misspelt field) without a browser.
    #[test]
    fn every_page_renders_its_data_escaped() {
        use serde_json::json;
        let job = |step: &str, item: Option<i64>| crate::store::JobDetail {
            id: 1,
            step_id: step.into(),
            state: crate::state::JobState::Failed,
            attempt: 2,
            output: Some(
                json!({"artifact": {"id": "a1", "size": 3, "content_type": "text/plain"}}),
            ),
            error: Some("<b>bad</b>".into()),
            item_index: item,
            run_after: None,
            started_at: Some(1_000),
            finished_at: Some(1_500),
            attempts: json!([{"attempt": 1, "started_at": 1000, "finished_at": 1200,
                              "outcome": "failed", "error": "first"}]),
        };
        let steps =
            super::super::views::steps(vec![job("each", None), job("each[0]", Some(0))], 3_000);
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].items.len(), 1);
        let failed = run(crate::state::RunStatus::Failed);
        let operator = session(Role::Operator);
        let html = page(
            &operator,
            "run.html",
            "runs",
            context! {
                run => ser(&failed),
                retryable => true,
                input => ser(&json!({"a": 1})),
                output => ser(&json!({"b": "<i>"})),
                dag => Value::from_safe_string("<svg></svg>".into()),
                timeline => Value::from_safe_string("<svg></svg>".into()),
                attempts => ser(&steps[0].attempts),
                steps => ser(&steps),
                artifacts => ser(&vec![json!({"step_id": "each", "id": "a1", "size": 3, "content_type": "text/plain"})]),
                logs => ser(&vec![json!({"at": 1000, "step_id": "each", "attempt": 1, "stream": "stdout", "text": "<hi>"})]),
                children => ser(&vec![run(crate::state::RunStatus::Running)]),
                signals => ser(&vec!["approve"]),
                done => "Retry requested.",
            },
        )
        .unwrap()
        .0;
        for expected in [
            "&lt;boom&gt;",
            "&lt;b&gt;bad&lt;",
            "&lt;hi&gt;",
            "id=\"retry\"",
            "token-of-the-session",
            "/artifacts/a1",
        ] {
            assert!(html.contains(expected), "{expected} is not in the run page");
        }
        assert!(!html.contains("<boom>") && !html.contains("id=\"cancel\""));
        let viewer = page(
            &session(Role::Viewer),
            "run.html",
            "runs",
            context! { run => ser(&failed), retryable => true, signals => ser(&vec!["approve"]) },
        )
        .unwrap()
        .0;
        assert!(!viewer.contains("id=\"retry\"") && !viewer.contains("signal-form"));

        let runs = vec![run(crate::state::RunStatus::Succeeded)];
        for (template, ctx) in [
            (
                "runs.html",
                context! { runs => ser(&runs), live => "/runs/live?since=1", next => "/runs?cursor=1.x",
                query => context! { workflow => "", status => "", from => "", to => "" },
                workflows => ser(&vec!["batch"]), statuses => ser(&vec!["failed"]) },
            ),
            (
                "overview.html",
                context! { counts => context! { running => 1, pending => 2, succeeded_24h => 3, failed_24h => 4, queue_depth => 5 },
                recent => ser(&runs), alerts => ser(&Vec::<String>::new()), workflows => 1 },
            ),
            (
                "cards.html",
                context! { counts => context! { running => 1, pending => 2, succeeded_24h => 3, failed_24h => 4, queue_depth => 5 } },
            ),
            (
                "fires.html",
                context! { fires => ser(&vec![json!({"workflow_id": "w", "fire_at": 1, "recorded_at": 2, "late": 1, "skipped_reason": "paused"})]), workflow => "" },
            ),
            (
                "webhooks.html",
                context! { events => ser(&vec![json!({"source": "n8n", "scope": "", "event_id": "e", "received_at": 1, "payload": {"x": 1}})]), source => "" },
            ),
            (
                "notifications.html",
                context! { notifications => ser(&vec![json!({"run_id": "01a2341e-d0b1", "workflow_id": "w", "url": "http://x", "run_status": "failed", "status": "pending", "finished_at": 1})]), status => "", statuses => ser(&vec!["pending"]) },
            ),
            (
                "alerts.html",
                context! { alerts => ser(&vec![json!({"workflow_id": "w", "run_id": null, "kind": "fire_refused", "message": "m", "created_at": 1})]), workflow => "" },
            ),
            (
                "usage.html",
                context! { usage => ser(&vec![json!({"day": "2026-12-01", "provider": "openai", "workflow_id": "w", "requests": 1, "errors": 0, "tokens": 5, "cost": "0.0100"})]), workflow => "" },
            ),
            (
                "workflows.html",
                context! { workflows => ser(&vec![json!({"workflow": {"id": "w", "cron": "* * * * *", "timezone": "UTC", "paused": true, "next_fires": [1], "version": 1, "origin": "files"}, "runs": runs})]) },
            ),
            (
                "workflow.html",
                context! { workflow => ser(&json!({"id": "w", "cron": "* * * * *", "timezone": "UTC", "paused": false, "next_fires": [1], "version": 1, "origin": "files"})),
                dag => Value::from_safe_string("<svg></svg>".into()), runs => ser(&runs), fires => ser(&Vec::<String>::new()), definition => "{}",
                input_schema => "{}", fields => ser(&vec![json!({"name": "region", "kind": "string", "required": true, "value": "us", "choices": ["us", "eu"]})]),
                input_json => "", problem => "refused", violations => ser(&vec!["input.region: bad"]) },
            ),
        ] {
            let html = page(&operator, template, "runs", ctx)
                .unwrap_or_else(|e| panic!("{template}: {e:#}"))
                .0;
            assert!(!html.is_empty(), "{template}");
        }
        let admin = page(
            &session(Role::Admin),
            "admin.html",
            "admin",
            context! {
                variables => ser(&vec![json!({"name": "v", "value": "1", "updated_at": 1})]),
                secrets => ser(&vec![json!({"name": "s", "updated_at": 1})]),
                users => ser(&vec![json!({"name": "u", "role": "viewer", "updated_at": 1})]),
                audit => ser(&vec![json!({"at": 1, "actor": "a", "action": "x", "target": "t"})]),
                roles => ser(&vec!["viewer"]), user_roles => ser(&vec!["viewer"]),
                issued => context! { token => "tok", subject => "s", role => "viewer", jti => "j", expires_at => 1 },
            },
        )
        .unwrap()
        .0;
        assert!(admin.contains("tok") && admin.contains("/admin/secrets/delete"));
        let login = public_page("login.html", context! { next => "/", login_token => "t" })
            .unwrap()
            .0;
        assert!(login.contains("name=\"login_token\" value=\"t\""));
        assert!(
            error_page(StatusCode::FORBIDDEN, "<no>", &["a".into()])
                .0
                .contains("&lt;no&gt;")
        );
    }
}
