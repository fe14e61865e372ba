//! Files a step's `with` names in place of a field, such as a `script` step's `file:` for its
//! `code`: a kind declares one with `"x-file-for": "<field>"` on the property in its `with`
//! schema. Loading from files reads each, relative to the definition's own folder and never
//! outside it, and stores its text in the field, so what runs is versioned with the definition
//! and every worker has it. A definition that arrives over the API has no folder: there such a
//! key is an error.

use std::path::Path;

use serde_json::Value;

use super::error::DefinitionError;
use super::kinds::StepKinds;
use super::locate::Seg;
use super::parse::{MAX_DEFINITION_BYTES, ParsedSource, make_error, read_capped};

/// The schema keyword that makes a property name a file whose text becomes another field.
pub const FILE_FOR: &str = "x-file-for";

/// Reads the files the steps of `source` name (see the module), from `folder`; `None` refuses
/// them. Returns the problems, each at the file's name in the source.
pub(crate) fn read_named_files(
    source: &mut ParsedSource,
    folder: Option<&Path>,
    kinds: &StepKinds,
) -> Vec<DefinitionError> {
    let mut problems = Vec::new();
    for wi in 0..source.workflows.len() {
        for part in ["steps", "on_failure"] {
            let count = match part {
                "steps" => source.workflows[wi].steps.len(),
                _ => source.workflows[wi].on_failure.len(),
            };
            for si in 0..count {
                let step = match part {
                    "steps" => &source.workflows[wi].steps[si],
                    _ => &source.workflows[wi].on_failure[si],
                };
                let mut read = Vec::new();
                for (key, into) in kinds.file_fields(&step.kind) {
                    let Some(Value::String(name)) = step.with.get(key) else {
                        continue;
                    };
                    if step.with.get(into).is_some() {
                        let path = [
                            Seg::Key(part),
                            Seg::Index(si),
                            Seg::Key("with"),
                            Seg::Key(key),
                        ];
                        problems.push(make_error(
                            &source.origin,
                            source.at(wi, &path, true),
                            format!("`with.{key}` and `with.{into}` both give it: keep one"),
                        ));
                        continue;
                    }
                    let path = [
                        Seg::Key(part),
                        Seg::Index(si),
                        Seg::Key("with"),
                        Seg::Key(key),
                    ];
                    let at = source.at(wi, &path, false);
                    match read_beside(folder, name) {
                        Ok(text) => read.push((key.to_owned(), into.to_owned(), text)),
                        Err(why) => problems.push(make_error(
                            &source.origin,
                            at,
                            format!("`with.{key}` {name:?}: {why}"),
                        )),
                    }
                }
                let step = match part {
                    "steps" => &mut source.workflows[wi].steps[si],
                    _ => &mut source.workflows[wi].on_failure[si],
                };
                if let Some(with) = step.with.as_object_mut() {
                    for (key, into, text) in read {
                        with.remove(&key);
                        with.insert(into, Value::String(text));
                    }
                }
            }
        }
    }
    problems
}

/// The text of `name`, a file inside `folder`.
fn read_beside(folder: Option<&Path>, name: &str) -> Result<String, String> {
    let Some(folder) = folder else {
        return Err("names a file, which only a definition file can: give its text instead".into());
    };
    let folder = folder
        .canonicalize()
        .map_err(|e| format!("the definition's folder cannot be read: {e}"))?;
    let path = folder
        .join(name)
        .canonicalize()
        .map_err(|e| format!("cannot be read: {e}"))?;
    if !path.starts_with(&folder) {
        return Err("is outside the definition's folder".into());
    }
    if !path.is_file() {
        return Err("is not a file".into());
    }
    let bytes = read_capped(&path).map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() > MAX_DEFINITION_BYTES {
        return Err(format!("is over {MAX_DEFINITION_BYTES} bytes"));
    }
    String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".into())
}
