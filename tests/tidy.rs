//! Architecture invariants checked on the source text, as part of `cargo test`: the surfaces
//! reach the store only through `Engine`; only `engine/src/api/` (and the dashboard beside it)
//! serves HTTP, and only the API describes the JSON it answers with; the dashboard's pages have
//! no inline script or style; `Store` is written once, over the database drivers.

use std::path::{Path, PathBuf};

/// A place allowed to break a rule for now, and why. It must still break it: an exception that
/// no longer applies fails the check until it is removed.
struct Exception {
    file: &'static str,
    needle: &'static str,
    times: usize,
    why: &'static str,
}

/// Every `.rs` file under `dir`, relative to the repository, with its text.
fn sources(dir: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pending = vec![root.join(dir)];
    let mut files = Vec::new();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path: PathBuf = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let relative = path.strip_prefix(root).unwrap().to_string_lossy();
                files.push((relative.replace('\\', "/"), text));
            }
        }
    }
    assert!(!files.is_empty(), "no sources under {dir}");
    files
}

/// The lines of `files` (outside the folders `except`) that mention a needle, beyond what the
/// exceptions allow; and the exceptions that allow more than there is.
fn offences(
    dirs: &[&str],
    except: &[&str],
    needles: &[&str],
    exceptions: &[Exception],
) -> Vec<String> {
    let mut found = Vec::new();
    let mut used = vec![0; exceptions.len()];
    for dir in dirs {
        for (file, text) in sources(dir) {
            if except.iter().any(|e| file.starts_with(e)) {
                continue;
            }
            for (number, line) in text.lines().enumerate() {
                for needle in needles.iter().filter(|n| line.contains(*n)) {
                    let allowed = exceptions
                        .iter()
                        .position(|e| e.file == file && e.needle == *needle);
                    match allowed {
                        Some(i) if used[i] < exceptions[i].times => used[i] += 1,
                        _ => found.push(format!("{file}:{}: {}", number + 1, line.trim())),
                    }
                }
            }
        }
    }
    for (exception, used) in exceptions.iter().zip(used) {
        if used < exception.times {
            found.push(format!(
                "{}: allowed {} mention(s) of `{}` ({}), has {used}: lower or remove the exception",
                exception.file, exception.times, exception.needle, exception.why
            ));
        }
    }
    found
}

#[test]
fn surfaces_reach_the_store_only_through_the_engine() {
    let found = offences(
        &["engine/src/api", "engine/src/dashboard", "src"],
        &[],
        &[".store()", "dyn Store"],
        &[],
    );
    assert!(
        found.is_empty(),
        "the API, the dashboard and the CLI go through `Engine`'s operations, not its store:\n{}",
        found.join("\n")
    );
}

#[test]
fn only_the_api_serves_http_and_describes_json() {
    let found = offences(
        &["engine/src", "workers/src", "src"],
        &["engine/src/api/", "engine/src/dashboard/"],
        &["axum", "utoipa"],
        &[],
    );
    // The dashboard serves pages, not the API's JSON: it describes none.
    let found: Vec<String> = found
        .into_iter()
        .chain(offences(&["engine/src/dashboard"], &[], &["utoipa"], &[]))
        .collect();
    assert!(
        found.is_empty(),
        "only `engine/src/api/` (and the dashboard beside it, `engine/src/dashboard/`) serves \
         HTTP, and only the API defines the JSON it answers with, converted from engine \
         types:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_store_operation_is_written_once_over_the_drivers() {
    let found = offences(
        &["engine/src", "workers/src", "src"],
        &["engine/src/store/driver.rs", "engine/src/store/machine.rs"],
        &[
            " Store for ",
            "machine::insert_runs(",
            "machine::complete(",
            ".commit()",
        ],
        &[
            Exception {
                file: "engine/src/store/postgres.rs",
                needle: "machine::insert_runs(",
                times: 1,
                why: "`enqueue_in` starts runs in the caller's transaction, which it commits",
            },
            Exception {
                file: "engine/src/store/postgres.rs",
                needle: ".commit()",
                times: 1,
                why: "`Driver::commit`",
            },
            Exception {
                file: "engine/src/store/sqlite.rs",
                needle: ".commit()",
                times: 1,
                why: "`Driver::commit`",
            },
        ],
    );
    assert!(
        found.is_empty(),
        "`Store` is implemented once, in `store/driver.rs`, over what each driver gives; a \
         driver opens and commits transactions only as `Driver::begin` and `Driver::commit`:\n{}",
        found.join("\n")
    );
}

/// The dashboard's pages are served with `script-src 'self'; style-src 'self'`: a template (or
/// the SVG the server draws) with an inline script, an event handler attribute or a style
/// attribute would be blocked in the browser, so none may have one.
#[test]
fn dashboard_pages_have_no_inline_script_or_style() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("engine/src/dashboard/templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.push(root.join("engine/src/dashboard/dag.rs"));
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(root).unwrap().display().to_string();
        for (number, line) in text.lines().enumerate() {
            let lower = line.to_ascii_lowercase();
            let inline_script = lower.match_indices("<script").any(|(at, _)| {
                !lower[at..]
                    .split('>')
                    .next()
                    .unwrap_or("")
                    .contains(" src=")
            });
            let handler = lower.split_whitespace().any(is_event_handler)
                || lower.contains("hx-on")
                || lower.contains("javascript:");
            if inline_script || handler || lower.contains("style=") || lower.contains("<style") {
                found.push(format!("{name}:{}: {}", number + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "inline script or style in the dashboard's pages:\n{}",
        found.join("\n")
    );
}

/// Whether `word` starts an HTML event handler attribute (`onclick=`, `onload="...`).
fn is_event_handler(word: &str) -> bool {
    word.strip_prefix("on")
        .and_then(|rest| rest.split_once('='))
        .is_some_and(|(event, _)| {
            !event.is_empty() && event.chars().all(|c| c.is_ascii_lowercase())
        })
}
