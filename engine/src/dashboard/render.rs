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
}
