//! How the CLI shows things to people: tables aligned by comfy-table, times in the local zone (or
//! UTC with `--utc`) with the zone named, durations in the unit that reads best. `--json` output
//! and the API keep epoch milliseconds.

use std::sync::OnceLock;

use comfy_table::{Table, presets};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use switchyard_engine::state::Millis;

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
    use super::*;

    #[test]
    fn spans_read_in_the_unit_that_fits() {
        assert_eq!(span(350), "350 ms");
        assert_eq!(span(4_230), "4.2 s");
        assert_eq!(span(185_000), "3m 05s");
        assert_eq!(span(7_800_000), "2h 10m");
    }

    #[test]
    fn times_name_their_zone() {
        assert_eq!(time_in(0, &TimeZone::UTC), "1970-01-01 00:00:00 UTC");
        let paris = TimeZone::get("Europe/Paris").unwrap();
        assert_eq!(time_in(0, &paris), "1970-01-01 01:00:00 CET");
    }
}
