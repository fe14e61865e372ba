//! State names in SQL, from the state enums: statements write `{job:running}` or
//! `{jobs:claimable}` and [`states`] puts in `'running'` or `('available', 'retrying', 'parked')`,
//! so no state is spelled twice and a set (claimable, open, active) has one definition, in
//! `state.rs`. [`statement!`] expands a statement once and keeps it, so the hot path pays nothing.

use crate::state::{JobState, NotificationStatus, RunStatus};

fn quoted(name: &str) -> String {
    format!("'{name}'")
}

fn set<T: Copy + Into<&'static str>>(states: &[T]) -> String {
    let names: Vec<String> = states.iter().map(|s| quoted((*s).into())).collect();
    format!("({})", names.join(", "))
}

/// `sql` with every state token replaced. Panics on a token it does not know: a statement is
/// written once, and every statement runs in the conformance suite.
pub(crate) fn states(sql: &str) -> String {
    let mut out = sql.to_owned();
    for &s in JobState::ALL {
        out = out.replace(&format!("{{job:{s}}}"), &quoted(s.as_str()));
    }
    for &s in RunStatus::ALL {
        out = out.replace(&format!("{{run:{s}}}"), &quoted(s.as_str()));
    }
    for &s in NotificationStatus::ALL {
        out = out.replace(&format!("{{notice:{s}}}"), &quoted(s.as_str()));
    }
    for (token, states) in [
        ("{jobs:claimable}", set(JobState::CLAIMABLE)),
        ("{jobs:open}", set(JobState::OPEN)),
        ("{jobs:unsuccessful}", set(JobState::UNSUCCESSFUL)),
        ("{jobs:successful}", set(JobState::SUCCESSFUL)),
        ("{jobs:awaiting_answer}", set(JobState::AWAITING_ANSWER)),
        (
            "{jobs:finishing}",
            set(&[JobState::Succeeded, JobState::Failed, JobState::Skipped]),
        ),
        (
            "{jobs:counted}",
            set(&[JobState::Failed, JobState::Retrying]),
        ),
        ("{runs:active}", set(RunStatus::ACTIVE)),
    ] {
        out = out.replace(token, &states);
    }
    if let Some(at) = out
        .find("{job:")
        .or_else(|| out.find("{jobs:"))
        .or_else(|| out.find("{run:").or_else(|| out.find("{runs:")))
        .or_else(|| out.find("{notice:"))
    {
        panic!(
            "unknown state token in SQL: {}",
            &out[at..(at + 24).min(out.len())]
        );
    }
    out
}

/// A statement with its state tokens replaced, built at its first use and kept.
macro_rules! statement {
    ($sql:expr) => {{
        static SQL: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| $crate::store::sql::states($sql));
        SQL.as_str()
    }};
}
pub(crate) use statement;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_become_the_names_and_sets_of_the_state_enums() {
        assert_eq!(
            states("state = {job:running} AND state IN {jobs:claimable} AND s IN {runs:active}"),
            "state = 'running' AND state IN ('available', 'retrying', 'parked') \
             AND s IN ('pending', 'running')"
        );
        assert_eq!(states("{run:timed_out}"), "'timed_out'");
    }

    #[test]
    #[should_panic(expected = "unknown state token")]
    fn a_misspelt_token_is_refused() {
        states("state = {job:runing}");
    }
}
