//! How the CLI shows things to people: tables aligned by comfy-table, times in the local zone (or
//! UTC with `--utc`) with the zone named, durations in the unit that reads best. `--json` output
//! and the API keep epoch milliseconds.

use std::sync::OnceLock;

use comfy_table::{Table, presets};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use std::collections::BTreeMap;

use switchyard_engine::state::Millis;
use switchyard_engine::store::{RunDetail, RunSummary};

static ZONE: OnceLock<TimeZone> = OnceLock::new();

/// Shows times in UTC instead of the system's zone; call before the first [`time`].
pub fn use_utc() {
    let _ = ZONE.set(TimeZone::UTC);
}

fn zone() -> &'static TimeZone {
    ZONE.get_or_init(TimeZone::system)
}

/// `2026-12-01 14:03:07 CET`.
pub fn time(ms: Millis) -> String {
    time_in(ms, zone())
}

fn time_in(ms: Millis, zone: &TimeZone) -> String {
    match Timestamp::from_millisecond(ms) {
        Ok(at) => at
            .to_zoned(zone.clone())
            .strftime("%Y-%m-%d %H:%M:%S %Z")
            .to_string(),
        Err(_) => ms.to_string(),
    }
}

/// `14:03:07.250`, in the zone `time` uses.
pub fn clock(ms: Millis) -> String {
    match Timestamp::from_millisecond(ms) {
        Ok(at) => at
            .to_zoned(zone().clone())
            .strftime("%H:%M:%S%.3f")
            .to_string(),
        Err(_) => ms.to_string(),
    }
}

/// `350 ms`, `4.2 s`, `3m 05s`, `2h 10m`.
pub fn span(ms: Millis) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m {:02}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h {:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// How long something took, or `running`, or `-` when it has not started.
pub fn duration(from: Option<Millis>, to: Option<Millis>) -> String {
    match (from, to) {
        (Some(a), Some(b)) => span(b - a),
        (Some(_), None) => "running".to_owned(),
        _ => "-".to_owned(),
    }
}

pub fn loop_step(item: &str) -> &str {
    item.rsplit_once('[').map_or(item, |(step, _)| step)
}

/// For each `for_each` step of a run: how many of its items have finished, of how many.
pub fn item_progress(detail: &RunDetail) -> BTreeMap<&str, (usize, usize)> {
    let mut progress: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for item in detail.steps.iter().filter(|s| s.item_index.is_some()) {
        let entry = progress.entry(loop_step(&item.step_id)).or_default();
        entry.0 += usize::from(item.state.is_finished());
        entry.1 += 1;
    }
    progress
}

/// Most child runs `run --wait` reads to count.
pub const CHILDREN_COUNTED: u32 = 1000;

/// The block `run --wait` redraws at a terminal: the run with its status and time so far, then
/// each step (a loop's items counted, not listed) with its state and time, then the child runs
/// counted by whether they have finished.
pub fn progress(detail: &RunDetail, children: &[RunSummary], now: Millis) -> Vec<String> {
    let run = &detail.summary;
    let mut lines = vec![format!(
        "run {}  {}  {}",
        run.id,
        run.status,
        duration(
            run.started_at.or(Some(run.created_at)),
            run.finished_at.or(Some(now))
        )
    )];
    let items = item_progress(detail);
    for step in detail.steps.iter().filter(|s| s.item_index.is_none()) {
        let took = match step.started_at {
            Some(_) => duration(step.started_at, step.finished_at.or(Some(now))),
            None => String::new(),
        };
        let mut line = format!(
            "  {:<24} {:<10} {took:>9}",
            step.step_id,
            step.state.as_str()
        );
        if step.attempt > 1 {
            line.push_str(&format!("  attempt {}", step.attempt));
        }
        if let Some((finished, total)) = items.get(step.step_id.as_str()) {
            line.push_str(&format!("  items {finished}/{total} finished"));
        }
        if let Some(error) = &step.error {
            line.push_str(&format!("  {}", error.lines().next().unwrap_or_default()));
        }
        lines.push(line.trim_end().to_owned());
    }
    if !children.is_empty() {
        let finished = children.iter().filter(|c| c.status.is_finished()).count();
        // Only the first ones are read: a fan-out of more is counted as "at least".
        let more = if children.len() >= CHILDREN_COUNTED as usize {
            " (of the first)"
        } else {
            ""
        };
        lines.push(format!(
            "  child runs: {finished}/{} finished{more}",
            children.len()
        ));
    }
    lines
}

/// `line` cut to `width` characters (the last one `…`) when it is wider.
pub fn fitted(line: &str, width: Option<usize>) -> String {
    match width {
        Some(width) if width > 1 && line.chars().count() > width => {
            let kept: String = line.chars().take(width - 1).collect();
            format!("{kept}…")
        }
        _ => line.to_owned(),
    }
}

/// A table with a header row, columns padded to fit, no borders: it reads in a terminal and
/// through `grep` alike.
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

#[cfg(test)]
mod tests {
    use switchyard_engine::state::{JobState, RunStatus};
    use switchyard_engine::store::JobDetail;

    use super::*;

    #[test]
    fn spans_read_in_the_unit_that_fits() {
        assert_eq!(span(350), "350 ms");
        assert_eq!(span(4_230), "4.2 s");
        assert_eq!(span(185_000), "3m 05s");
        assert_eq!(span(7_800_000), "2h 10m");
    }

    fn job(
        step_id: &str,
        state: JobState,
        item: Option<i64>,
        started: Option<Millis>,
    ) -> JobDetail {
        JobDetail {
            id: 1,
            step_id: step_id.to_owned(),
            state,
            attempt: 1,
            output: None,
            error: None,
            item_index: item,
            run_after: None,
            started_at: started,
            finished_at: None,
            attempts: serde_json::json!([]),
        }
    }

    #[test]
    fn the_live_block_counts_items_and_children_and_times_what_runs() {
        let summary = RunSummary {
            id: "r1".into(),
            workflow_id: "w".into(),
            version: 1,
            status: RunStatus::Running,
            parent_run_id: None,
            error: None,
            created_at: 0,
            started_at: Some(0),
            finished_at: None,
        };
        let detail = RunDetail {
            summary: summary.clone(),
            input: serde_json::Value::Null,
            output: None,
            scheduled_at: None,
            steps: vec![
                job("each", JobState::Parked, None, Some(1_000)),
                job("each[0]", JobState::Succeeded, Some(0), Some(1_000)),
                job("each[1]", JobState::Running, Some(1), Some(1_000)),
                job("after", JobState::Waiting, None, None),
            ],
        };
        let child = RunSummary {
            status: RunStatus::Succeeded,
            ..summary
        };
        let block = progress(&detail, &[child], 4_500);
        assert_eq!(block[0], "run r1  running  4.5 s");
        assert!(block[1].contains("each") && block[1].contains("3.5 s"));
        assert!(block[1].ends_with("items 1/2 finished"), "{block:?}");
        assert!(block[2].starts_with("  after") && block[2].contains("waiting"));
        assert_eq!(block[3], "  child runs: 1/1 finished");
        assert_eq!(block.len(), 4);
    }

    #[test]
    fn a_line_wider_than_the_terminal_is_cut_to_fit() {
        assert_eq!(fitted("abcdef", Some(4)), "abc…");
        assert_eq!(fitted("abc", Some(4)), "abc");
        assert_eq!(fitted("abcdef", None), "abcdef");
    }

    #[test]
    fn times_name_their_zone() {
        assert_eq!(time_in(0, &TimeZone::UTC), "1970-01-01 00:00:00 UTC");
        let paris = TimeZone::get("Europe/Paris").unwrap();
        assert_eq!(time_in(0, &paris), "1970-01-01 01:00:00 CET");
    }
}
