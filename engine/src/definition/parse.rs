//! Text to workflows: size and encoding guards, YAML/JSON syntax and type errors with their
//! locations, and the two file shapes (one workflow, or a `workflows:` map).

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::Value;
use serde_saphyr::{DefaultMessageFormatter, MessageFormatter};

use super::error::{DefinitionError, DefinitionErrors};
use super::kinds::StepKinds;
use super::locate::{LocNode, Pos, START, Seg, pos};
use super::model::{Workflow, WorkflowMap};

/// Definition files and API bodies larger than this are refused before parsing. The seed's
/// whole configuration is well under 1 KiB; 4 MiB leaves room for big `inputs` defaults.
pub const MAX_DEFINITION_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// By extension: `.yaml`/`.yml` or `.json` (case-insensitive).
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// One parsed file or request body: its workflows and where their parts are in the text.
///
/// Shapes: either one workflow, which must then have an `id` (the file name is deliberately not
/// used: an API body has none, and renaming a file should not rename a workflow and orphan its
/// runs), or `workflows: {<id>: <workflow>}` where the key is the id and an `id` field, if
/// present, must equal it.
#[derive(Debug)]
pub struct ParsedSource {
    pub origin: String,
    pub workflows: Vec<Workflow>,
    pub(crate) locs: LocNode,
    /// True for the `workflows:` map shape.
    pub(crate) many: bool,
    /// Problems found while parsing that do not stop validation (e.g. a missing id).
    pub(crate) problems: Vec<DefinitionError>,
}

impl ParsedSource {
    /// The path of workflow `index`'s node in the document.
    fn prefix(&self, index: usize) -> Vec<Seg<'_>> {
        match self.workflows.get(index) {
            Some(wf) if self.many => vec![Seg::Key("workflows"), Seg::Key(wf.id.as_str())],
            _ => Vec::new(),
        }
    }

    /// Position of `path` inside workflow `index` (a path relative to the workflow's node).
    pub(crate) fn at(&self, index: usize, path: &[Seg<'_>], key: bool) -> Pos {
        let mut full = self.prefix(index);
        full.extend_from_slice(path);
        self.locs.find(&full, key).unwrap_or(START)
    }

    /// Which of `spellings` (a field, then its aliases) the source used in the map at `path`, so
    /// that an error points at what the user wrote.
    pub(crate) fn spelling<'s>(
        &self,
        index: usize,
        path: &[Seg<'_>],
        spellings: &[&'s str],
    ) -> &'s str {
        let mut full = self.prefix(index);
        full.extend_from_slice(path);
        let keys = self.locs.keys(&full);
        spellings
            .iter()
            .copied()
            .find(|s| keys.iter().any(|(k, _)| k == s))
            .or(spellings.first().copied())
            .unwrap_or_default()
    }

    /// Where workflow `index` is named: its key in a `workflows:` map, else its `id` value.
    pub(crate) fn workflow_at(&self, index: usize) -> Pos {
        if self.many {
            self.at(index, &[], true)
        } else {
            self.at(index, &[Seg::Key("id")], false)
        }
    }

    pub(crate) fn error(&self, at: Pos, message: impl Into<String>) -> DefinitionError {
        make_error(&self.origin, at, message.into())
    }
}

pub(crate) fn make_error(origin: &str, (line, column): Pos, message: String) -> DefinitionError {
    // Errors are printed one per line; a message must not break that.
    let message = if message.contains(['\n', '\r']) {
        message
            .split(['\n', '\r'])
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("; ")
    } else {
        message
    };
    DefinitionError {
        origin: origin.to_owned(),
        line,
        column,
        message,
    }
}

/// Parses one file's or one API body's workflows: syntax, types, and the id rules of the file
/// shape. Nothing that needs other workflows or the step kinds is checked; use [`super::check_str`]
/// or [`super::validate`] for that.
pub fn parse_str(
    origin: &str,
    text: &str,
    format: Format,
) -> Result<Vec<Workflow>, DefinitionErrors> {
    let source = parse_source(origin, text, format)?;
    if source.problems.is_empty() {
        Ok(source.workflows)
    } else {
        Err(DefinitionErrors(source.problems))
    }
}

/// [`parse_str`] for raw bytes (files, request bodies): refuses oversized and non-UTF-8 input
/// with a located error.
pub fn parse_bytes(
    origin: &str,
    bytes: &[u8],
    format: Format,
) -> Result<Vec<Workflow>, DefinitionErrors> {
    let text = text_of(origin, bytes)?;
    parse_str(origin, text, format)
}

pub(crate) fn text_of<'a>(origin: &str, bytes: &'a [u8]) -> Result<&'a str, DefinitionErrors> {
    check_size(origin, bytes.len())?;
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Columns count characters, as the YAML parser's do.
        let column = 1 + String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count();
        DefinitionErrors::single(
            origin,
            (line, column),
            format!(
                "not valid UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

fn check_size(origin: &str, len: usize) -> Result<(), DefinitionErrors> {
    if len > MAX_DEFINITION_BYTES {
        return Err(DefinitionErrors::single(
            origin,
            START,
            format!("definition is too large: over {MAX_DEFINITION_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Limits for untrusted input (definitions arrive through the API too). Far above what a real
/// definition needs, far below what exhausts memory or time: billion-laughs aliases, 10k-deep
/// nesting and event floods stop with a budget error.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: 400_000,
            max_nodes: 100_000,
            max_depth: 48,
            flow_nesting_limit: 48,
            max_documents: 1,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_merge_keys: 100,
            max_recorded_anchor_events: 100_000,
            max_recorded_anchor_bytes: MAX_DEFINITION_BYTES,
            max_total_scalar_bytes: MAX_DEFINITION_BYTES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 100_000,
            max_replay_stack_depth: 16,
        },
        with_snippet: false,
    }
}

fn yaml_error(origin: &str, err: &serde_saphyr::Error) -> DefinitionErrors {
    let at = err.location().and_then(pos).unwrap_or(START);
    let message = DefaultMessageFormatter
        .format_message(err.without_snippet())
        .into_owned();
    DefinitionErrors(vec![make_error(origin, at, plain(message))])
}

/// Most type errors reported for one file.
const MAX_TYPE_ERRORS: usize = 20;

/// The parser stops at the first value of the wrong type. To name the others too, the document
/// is read again as plain data, and deserialized from it over and over, each time without the
/// value that failed last, so that each next failure shows (`serde_path_to_error` names where),
/// up to [`MAX_TYPE_ERRORS`].
fn more_type_errors<T: serde::de::DeserializeOwned>(
    origin: &str,
    text: &str,
    locs: &LocNode,
    first: &serde_saphyr::Error,
) -> DefinitionErrors {
    let mut errors = yaml_error(origin, first).0;
    let Ok(mut data) = serde_saphyr::from_str_with_options::<Value>(text, options()) else {
        return DefinitionErrors(errors);
    };
    for _ in 0..MAX_TYPE_ERRORS {
        let error = match serde_path_to_error::deserialize::<_, T>(&data) {
            Ok(_) => break,
            Err(e) => e,
        };
        let path: Vec<String> = error
            .path()
            .iter()
            .map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => index.to_string(),
                serde_path_to_error::Segment::Map { key } => key.clone(),
                _ => String::new(),
            })
            .collect();
        let segs: Vec<Seg<'_>> = path
            .iter()
            .zip(error.path().iter())
            .map(|(part, segment)| match segment {
                serde_path_to_error::Segment::Seq { index } => Seg::Index(*index),
                _ => Seg::Key(part),
            })
            .collect();
        let message = plain(error.inner().to_string());
        // A key that is not known is named at the key; anything else at its value. The parser
        // named one of them already, at one of the two.
        let at_key = locs.find(&segs, true).unwrap_or(START);
        let at_value = locs.find(&segs, false).unwrap_or(START);
        let at = if message.starts_with("unknown field") {
            at_key
        } else {
            at_value
        };
        // One of them is the failure the parser named already, in its own words.
        if !errors
            .iter()
            .any(|e| [at_key, at_value].contains(&(e.line, e.column)))
        {
            errors.push(make_error(origin, at, message));
        }
        // Without the value that failed, the next deserialization goes further; a failure no
        // value can be removed for (a missing field) ends the search.
        if path.is_empty() || !remove_at(&mut data, &path) {
            break;
        }
    }
    DefinitionErrors::in_source_order(errors)
}

/// Removes the value at `path` from `data`; whether there was one.
fn remove_at(data: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = data;
    for part in parents {
        at = match at {
            Value::Object(map) => match map.get_mut(part) {
                Some(next) => next,
                None => return false,
            },
            Value::Array(items) => {
                match part.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(next) => next,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match at {
        Value::Object(map) => map.remove(last).is_some(),
        Value::Array(items) => match last.parse::<usize>() {
            // An item that failed becomes null: removing it would shift the indexes after it.
            Ok(i) if i < items.len() && !items[i].is_null() => {
                items[i] = Value::Null;
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// The parser's words for a number of the wrong kind (negative, too large, a fraction), in a
/// person's.
fn plain(message: String) -> String {
    let message = match message.rsplit_once(", expected ") {
        Some((_, expected)) if expected.len() <= 5 && expected.starts_with(['u', 'i']) => {
            format!("invalid {expected}")
        }
        _ => message,
    };
    let range = match message.trim() {
        "invalid u8" => "0 to 255",
        "invalid u16" => "0 to 65535",
        "invalid u32" => "0 to 4294967295",
        "invalid u64" | "invalid usize" => "0 to 18446744073709551615",
        "invalid i32" => "-2147483648 to 2147483647",
        "invalid i64" | "invalid isize" => "-9223372036854775808 to 9223372036854775807",
        _ => return message,
    };
    format!("expected a whole number from {range}")
}

/// Parses without cross-workflow validation, keeping source positions for [`super::validate`].
pub fn parse_source(
    origin: &str,
    text: &str,
    format: Format,
) -> Result<ParsedSource, DefinitionErrors> {
    check_size(origin, text.len())?;
    if format == Format::Json {
        // The YAML parser would accept YAML in a .json file (and comments, unquoted keys...);
        // check strict JSON first. serde_json also caps nesting at 128 levels.
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
            let at = (e.line().max(1), e.column().max(1));
            let message = strip_json_position(&e.to_string());
            return Err(DefinitionErrors(vec![make_error(origin, at, message)]));
        }
    }
    if text.trim().is_empty() {
        return Err(DefinitionErrors::single(
            origin,
            START,
            "empty definition".to_owned(),
        ));
    }

    // First pass: positions, and the shape of the document.
    let locs: LocNode =
        serde_saphyr::from_str_with_options(text, options()).map_err(|e| yaml_error(origin, &e))?;
    let many = locs.keys(&[]).iter().any(|(k, _)| *k == "workflows");

    // Second pass: the typed model, where type errors are reported with their position.
    let mut problems = Vec::new();
    let workflows = if many {
        let file: ManyRepr = serde_saphyr::from_str_with_options(text, options())
            .map_err(|e| more_type_errors::<ManyRepr>(origin, text, &locs, &e))?;
        let mut workflows = Vec::with_capacity(file.workflows.0.len());
        for (key, mut wf) in file.workflows.0 {
            if !wf.id.is_empty() && wf.id != key {
                let at = locs
                    .find(
                        &[Seg::Key("workflows"), Seg::Key(&key), Seg::Key("id")],
                        false,
                    )
                    .unwrap_or(START);
                problems.push(make_error(
                    origin,
                    at,
                    format!("id `{}` differs from its key `{key}` in `workflows`", wf.id),
                ));
            }
            wf.id = key;
            workflows.push(wf);
        }
        workflows
    } else {
        let wf: Workflow = serde_saphyr::from_str_with_options(text, options())
            .map_err(|e| more_type_errors::<Workflow>(origin, text, &locs, &e))?;
        if wf.id.is_empty() {
            problems.push(make_error(
                origin,
                locs.find(&[], false).unwrap_or(START),
                "a single-workflow definition needs an `id` (or use the `workflows: {<id>: ...}` form)"
                    .to_owned(),
            ));
        }
        vec![wf]
    };
    let mut workflows = workflows;
    workflows.iter_mut().for_each(Workflow::imply_n8n_step);
    Ok(ParsedSource {
        origin: origin.to_owned(),
        workflows,
        locs,
        many,
        problems,
    })
}

/// serde_json appends " at line L column C"; the position is already in the prefix.
fn strip_json_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManyRepr {
    workflows: Ordered,
}

/// The `workflows:` map in source order, so errors and listings follow the file.
struct Ordered(Vec<(String, Workflow)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of workflow id to workflow")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Workflow>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Loads every `.yaml`/`.yml`/`.json` file among `paths` (directories are read one level deep,
/// in name order) and validates them all together. Every problem of every file is reported.
pub fn load_paths(paths: &[PathBuf], kinds: &StepKinds) -> Result<WorkflowMap, DefinitionErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        let origin = path.display().to_string();
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.is_file() && Format::from_path(p).is_some())
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => errors.push(make_error(
                    &origin,
                    START,
                    format!("cannot read directory: {e}"),
                )),
            }
        } else {
            files.push(path.clone());
        }
    }

    let mut sources = Vec::new();
    for path in &files {
        let origin = path.display().to_string();
        let Some(format) = Format::from_path(path) else {
            errors.push(make_error(
                &origin,
                START,
                "unsupported file type: expected .yaml, .yml or .json".to_owned(),
            ));
            continue;
        };
        let parsed = read_capped(path)
            .map_err(|e| DefinitionErrors::single(&origin, START, format!("cannot read file: {e}")))
            .and_then(|bytes| {
                let text = text_of(&origin, &bytes)?;
                parse_source(&origin, text, format)
            });
        match parsed {
            Ok(mut source) => {
                let folder = match path.parent() {
                    Some(folder) if !folder.as_os_str().is_empty() => folder,
                    _ => Path::new("."),
                };
                errors.extend(super::files::read_named_files(
                    &mut source,
                    Some(folder),
                    kinds,
                ));
                sources.push(source);
            }
            Err(e) => errors.extend(e.0),
        }
    }

    match super::validate::validate(&sources, &WorkflowMap::new(), kinds) {
        Ok(map) if errors.is_empty() => Ok(map),
        Ok(_) => Err(DefinitionErrors::in_source_order(errors)),
        Err(e) => {
            errors.extend(e.0);
            Err(DefinitionErrors::in_source_order(errors))
        }
    }
}

/// Reads at most one byte past the limit, so a huge (or endless, e.g. a FIFO) file costs no more
/// than the limit, and the size check still trips.
pub(crate) fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_DEFINITION_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}
