//! What each step kind takes in `with`, as the workers declare it: a JSON Schema per kind. A
//! definition's `with` is checked against its kind's when it loads, where a string holding a
//! template stands for whatever it will render to ([`templated`]); the published schema gives
//! editors the same per-kind `with`. The kinds check the rendered `with` again when they run.

use std::collections::BTreeMap;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::{Map, Value, json};

/// A string holding a template (`{{ }}`, `{% %}` or `{# #}`; see `template::is_template`). A
/// kind refuses templates in a field with `not: {pattern: TEMPLATE_PATTERN}`.
pub const TEMPLATE_PATTERN: &str = r"\{\{|\{%|\{#";

/// The schema keyword of a `with` field taken as written, never rendered (a script's code).
pub const LITERAL: &str = "x-literal";

/// The `format` of a duration field (`30s`, `5m`, `1h 30m`), checked with humantime.
pub const DURATION_FORMAT: &str = "duration";

/// At most this many problems are reported for one step's `with`.
const MAX_PROBLEMS: usize = 20;

/// The step kinds a worker provides, each with what its `with` takes.
#[derive(Default)]
pub struct StepKinds(BTreeMap<String, Option<KindSchema>>);

struct KindSchema {
    /// The kind's schema with templates allowed anywhere a value is.
    templated: Value,
    validator: jsonschema::Validator,
    /// `with` keys that name a file whose text becomes another key (see `files.rs`).
    files: Vec<(String, String)>,
    /// `with` keys taken as written (see [`LITERAL`]).
    literal: Vec<String>,
}

impl std::fmt::Debug for StepKinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// A problem of a step's `with`: where (keys and indexes under `with`), whether it names the
/// key rather than its value, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithProblem {
    pub path: Vec<PathPart>,
    pub at_key: bool,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPart {
    Key(String),
    Index(usize),
}

impl StepKinds {
    /// Kinds with the schemas of their `with`. A schema that does not compile is a programming
    /// error of the kind that declared it.
    pub fn new(kinds: impl IntoIterator<Item = (String, Value)>) -> Result<Self, String> {
        let mut out = BTreeMap::new();
        for (name, schema) in kinds {
            let templated = templated(&schema);
            let validator = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .with_format(DURATION_FORMAT, |s: &str| {
                    humantime::parse_duration(s.trim()).is_ok()
                })
                .build(&templated)
                .map_err(|e| format!("the `with` schema of step kind {name}: {e}"))?;
            let files = schema["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(key, property)| {
                    let into = property[super::files::FILE_FOR].as_str()?;
                    Some((key.clone(), into.to_owned()))
                })
                .collect();
            let literal = schema["properties"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, property)| property[LITERAL] == Value::Bool(true))
                .map(|(key, _)| key.clone())
                .collect();
            out.insert(
                name,
                Some(KindSchema {
                    templated,
                    validator,
                    files,
                    literal,
                }),
            );
        }
        Ok(StepKinds(out))
    }

    /// Kinds whose `with` may hold anything: for tests and embedders that check definitions
    /// without the workers' kinds.
    pub fn untyped(names: &[&str]) -> Self {
        StepKinds(names.iter().map(|n| ((*n).to_owned(), None)).collect())
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The `with` keys of `kind` taken as written: no template is looked for in them.
    pub(crate) fn literal_fields(&self, kind: &str) -> &[String] {
        match self.0.get(kind) {
            Some(Some(schema)) => &schema.literal,
            _ => &[],
        }
    }

    /// The `with` keys of `kind` that name a file, each with the key its text becomes.
    pub(crate) fn file_fields(&self, kind: &str) -> Vec<(&str, &str)> {
        match self.0.get(kind) {
            Some(Some(schema)) => schema
                .files
                .iter()
                .map(|(key, into)| (key.as_str(), into.as_str()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Each typed kind's `with` schema, templates allowed, for the published schema.
    pub(crate) fn schemas(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0
            .iter()
            .filter_map(|(name, kind)| Some((name.as_str(), &kind.as_ref()?.templated)))
    }

    /// The problems of `with` (absent: null) for a step of `kind`; none for an unknown kind or
    /// one without a schema.
    pub fn check(&self, kind: &str, with: &Value) -> Vec<WithProblem> {
        let Some(Some(schema)) = self.0.get(kind) else {
            return Vec::new();
        };
        let empty = Value::Object(Map::new());
        let with = match with {
            Value::Null => &empty,
            Value::String(text) if super::template::is_template(text) => return Vec::new(),
            other => other,
        };
        let mut found = Vec::new();
        for error in schema.validator.iter_errors(with) {
            explain(&error, &mut found);
        }
        let mut problems: Vec<WithProblem> = Vec::new();
        for (pointer, problem) in found {
            if problems.len() >= MAX_PROBLEMS {
                break;
            }
            let path = path_of(with, &pointer);
            let shown = shown_path(&path);
            let duration = schema_at(&schema.templated, &path)["format"] == DURATION_FORMAT;
            let problem = match problem {
                Problem::Other(_) | Problem::WrongType { .. } if duration => {
                    Problem::NotDuration(value_at(with, &path).clone())
                }
                other => other,
            };
            match problem {
                Problem::Unexpected(keys) => {
                    let takes = allowed_keys(&schema.templated, &path);
                    for key in keys {
                        if problems.len() >= MAX_PROBLEMS {
                            break;
                        }
                        let mut at = path.clone();
                        at.push(PathPart::Key(key.clone()));
                        problems.push(WithProblem {
                            message: format!(
                                "{kind} step: `{shown}` takes no key `{key}` (it takes: {takes})"
                            ),
                            path: at,
                            at_key: true,
                        });
                    }
                }
                Problem::Required(key) => problems.push(WithProblem {
                    message: format!("{kind} step needs `{shown}.{key}`"),
                    path,
                    at_key: true,
                }),
                Problem::NotDuration(value) => problems.push(WithProblem {
                    message: format!(
                        "{kind} step: `{shown}` is {value}, not a duration (write it like 30s, 5m \
                         or 1h 30m)"
                    ),
                    path,
                    at_key: false,
                }),
                Problem::WrongType { value, expected } => problems.push(WithProblem {
                    message: format!(
                        "{kind} step: `{shown}` is {value}, where {expected} is expected"
                    ),
                    path,
                    at_key: false,
                }),
                Problem::Other(message) => problems.push(WithProblem {
                    message: format!("{kind} step: `{shown}`: {message}"),
                    path,
                    at_key: false,
                }),
            }
        }
        problems
    }
}

/// What is wrong at a place in `with`.
enum Problem {
    Unexpected(Vec<String>),
    Required(String),
    NotDuration(Value),
    WrongType { value: Value, expected: String },
    Other(String),
}

/// The problems an error says, each with its JSON Pointer. A value that fails a node
/// [`templated`] wrapped is no template, so what is wrong is what its first branch (the node as
/// the kind wrote it) says.
fn explain(error: &jsonschema::ValidationError<'_>, out: &mut Vec<(String, Problem)>) {
    let pointer = error.instance_path().as_str().to_owned();
    let problem = match error.kind() {
        ValidationErrorKind::AnyOf { context } if context.len() == 2 && !context[0].is_empty() => {
            for inner in &context[0] {
                explain(inner, out);
            }
            return;
        }
        // Of alternatives none of which fits, the one the value is closest to: with the fewest
        // problems at the value itself (rather than inside it), then the fewest in all.
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context } => {
            let closest = context.iter().min_by_key(|branch| {
                let own = branch
                    .iter()
                    .filter(|e| e.instance_path().as_str() == pointer)
                    .count();
                (own, branch.len())
            });
            match closest {
                Some(branch) if !branch.is_empty() => {
                    for inner in branch {
                        explain(inner, out);
                    }
                    return;
                }
                _ => Problem::Other(error.masked().to_string()),
            }
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            Problem::Unexpected(unexpected.clone())
        }
        ValidationErrorKind::Required { property } => {
            Problem::Required(property.as_str().unwrap_or_default().to_owned())
        }
        ValidationErrorKind::Format { format } if format == DURATION_FORMAT => {
            Problem::NotDuration(error.instance().clone().into_owned())
        }
        ValidationErrorKind::Not { schema } if schema["pattern"] == TEMPLATE_PATTERN => {
            Problem::Other("holds a template; write it out (a run's data never becomes it)".into())
        }
        ValidationErrorKind::Type { kind } => {
            let names: Vec<String> = match kind {
                TypeKind::Single(one) => vec![one.to_string()],
                TypeKind::Multiple(set) => set.iter().map(|t| t.to_string()).collect(),
            };
            let names: Vec<String> = names.into_iter().filter(|n| n != "null").collect();
            Problem::WrongType {
                value: error.instance().clone().into_owned(),
                expected: names.join(" or "),
            }
        }
        _ => Problem::Other(error.masked().to_string()),
    };
    out.push((pointer, problem));
}

/// The parts of a JSON Pointer into `with`, read against `with` so that a number is an index
/// only where the value there is a list.
fn path_of(with: &Value, pointer: &str) -> Vec<PathPart> {
    let mut at = with;
    let mut path = Vec::new();
    for raw in pointer.split('/').skip(1) {
        let part = raw.replace("~1", "/").replace("~0", "~");
        match at {
            Value::Array(items) => {
                let index = part.parse::<usize>().unwrap_or(usize::MAX);
                at = items.get(index).unwrap_or(&Value::Null);
                path.push(PathPart::Index(index));
            }
            _ => {
                at = at.get(&part).unwrap_or(&Value::Null);
                path.push(PathPart::Key(part));
            }
        }
    }
    path
}

fn value_at<'v>(with: &'v Value, path: &[PathPart]) -> &'v Value {
    path.iter().fold(with, |at, part| match part {
        PathPart::Key(key) => &at[key.as_str()],
        PathPart::Index(i) => &at[*i],
    })
}

/// `with`, `with.auth`, `with.headers[2]`.
fn shown_path(path: &[PathPart]) -> String {
    let mut shown = "with".to_owned();
    for part in path {
        match part {
            PathPart::Key(key) => {
                shown.push('.');
                shown.push_str(key);
            }
            PathPart::Index(i) => shown.push_str(&format!("[{i}]")),
        }
    }
    shown
}

/// The schema of the value at `path`: through properties and items, and into the alternative
/// that has the key where a node offers several.
fn schema_at<'s>(schema: &'s Value, path: &[PathPart]) -> &'s Value {
    let mut node = unwrapped(schema);
    for part in path {
        let next = match part {
            PathPart::Key(key) => std::iter::once(node)
                .chain(alternatives(node))
                .map(|n| &unwrapped(n)["properties"][key])
                .find(|child| !child.is_null()),
            PathPart::Index(_) => Some(&node["items"]),
        };
        node = unwrapped(next.unwrap_or(&Value::Null));
    }
    node
}

/// The alternatives of `node`, and theirs in turn: an optional enum (`Option<Auth>`) is an
/// `anyOf` whose first choice is a `oneOf`.
fn alternatives(node: &Value) -> impl Iterator<Item = &Value> {
    let mut found = Vec::new();
    let mut stack = vec![unwrapped(node)];
    while let Some(node) = stack.pop() {
        for choice in ["oneOf", "anyOf", "allOf"]
            .into_iter()
            .filter_map(|k| node[k].as_array())
            .flatten()
        {
            found.push(choice);
            stack.push(unwrapped(choice));
        }
    }
    found.into_iter()
}

/// The keys the object at `path` takes, for a message.
fn allowed_keys(schema: &Value, path: &[PathPart]) -> String {
    let node = schema_at(schema, path);
    let mut keys: Vec<&str> = std::iter::once(node)
        .chain(alternatives(node))
        .filter_map(|n| unwrapped(n)["properties"].as_object())
        .flat_map(|props| props.keys().map(String::as_str))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        "none".to_owned()
    } else {
        keys.join(", ")
    }
}

/// The schema inside a node [`templated`] wrapped.
fn unwrapped(node: &Value) -> &Value {
    match node["anyOf"].as_array() {
        Some(options) if options.len() == 2 && options[1] == template_schema() => &options[0],
        _ => node,
    }
}

fn template_schema() -> Value {
    json!({ "type": "string", "pattern": TEMPLATE_PATTERN })
}

/// `schema` with a template string allowed wherever a value is constrained: a node that names a
/// type (other than a plain string), an enum, a constant, a format or alternatives becomes
/// `anyOf: [node, <a string with a template>]`, so `timeout: "{{ input.t }}"` passes where a
/// duration is expected and `headers: "{{ input.h }}"` where a map is. The root (`with` itself)
/// stays as it is: a `with` that is one template is not checked at all.
pub fn templated(schema: &Value) -> Value {
    template_children(schema)
}

/// `node` with its children allowed templates, and itself too (see [`templated`]).
fn allow_template(node: &Value) -> Value {
    let Value::Object(map) = node else {
        return node.clone();
    };
    let plain_string = map.get("type") == Some(&json!("string"))
        && !["enum", "const", "pattern", "format"]
            .iter()
            .any(|k| map.contains_key(*k));
    let constrained = ["type", "enum", "const", "format", "anyOf", "oneOf", "allOf"]
        .iter()
        .any(|k| map.contains_key(*k));
    // A field that refuses templates (`not: {pattern: TEMPLATE_PATTERN}`) takes none, and one
    // taken as written has none.
    let refuses_templates = map.get("not").and_then(|n| n.get("pattern"))
        == Some(&json!(TEMPLATE_PATTERN))
        || map.get(LITERAL) == Some(&Value::Bool(true));
    let Value::Object(mut inner) = template_children(node) else {
        unreachable!("an object stays an object");
    };
    if !constrained || plain_string || refuses_templates {
        return Value::Object(inner);
    }
    let mut wrapper = Map::new();
    if let Some(description) = inner.remove("description") {
        wrapper.insert("description".to_owned(), description);
    }
    wrapper.insert(
        "anyOf".to_owned(),
        Value::Array(vec![Value::Object(inner), template_schema()]),
    );
    Value::Object(wrapper)
}

/// `node` with the values it describes allowed templates, but not itself. Alternatives
/// (`anyOf`, `oneOf`, `allOf`) describe the node itself, so their branches are not wrapped:
/// a template would match every branch of a `oneOf`.
fn template_children(node: &Value) -> Value {
    let Value::Object(map) = node else {
        return node.clone();
    };
    let mut map = map.clone();
    for key in ["properties", "patternProperties"] {
        if let Some(Value::Object(children)) = map.get_mut(key) {
            for child in children.values_mut() {
                *child = allow_template(child);
            }
        }
    }
    for key in ["items", "additionalProperties", "contains"] {
        if let Some(child @ Value::Object(_)) = map.get_mut(key) {
            *child = allow_template(child);
        }
    }
    if let Some(Value::Array(children)) = map.get_mut("prefixItems") {
        for child in children.iter_mut() {
            *child = allow_template(child);
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(children)) = map.get_mut(key) {
            for child in children.iter_mut() {
                *child = template_children(child);
            }
        }
    }
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> StepKinds {
        StepKinds::new([(
            "call".to_owned(),
            json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["url"],
                "properties": {
                    "url": { "type": "string" },
                    "method": { "enum": ["GET", "POST"] },
                    "retries": { "type": "integer", "minimum": 0 },
                    "timeout": { "type": "string", "format": DURATION_FORMAT },
                    "headers": {
                        "type": "object",
                        "additionalProperties": { "type": "string" }
                    }
                }
            }),
        )])
        .unwrap()
    }

    #[test]
    fn an_unknown_key_is_named_with_the_keys_the_kind_takes() {
        let problems = kinds().check("call", &json!({ "url": "u", "methd": "GET" }));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, [PathPart::Key("methd".into())]);
        assert!(problems[0].at_key);
        assert_eq!(
            problems[0].message,
            "call step: `with` takes no key `methd` (it takes: headers, method, retries, timeout, url)"
        );
    }

    #[test]
    fn mistyped_values_missing_keys_and_bad_durations_are_each_reported() {
        let problems = kinds().check(
            "call",
            &json!({ "method": "PUT", "retries": -1, "timeout": "5 parsecs" }),
        );
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(problems.len(), 4, "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("needs `with.url`")));
        assert!(
            messages
                .iter()
                .any(|m| m.contains("`with.timeout` is \"5 parsecs\", not a duration"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("call step: `with.retries`"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("call step: `with.method`"))
        );
    }

    #[test]
    fn a_template_stands_for_any_value() {
        let with = json!({
            "url": "{{ input.url }}",
            "method": "{{ input.method }}",
            "retries": "{{ input.n }}",
            "timeout": "{{ input.t }}",
            "headers": "{{ input.headers }}"
        });
        assert_eq!(kinds().check("call", &with), []);
        assert_eq!(
            kinds()
                .check("call", &json!({ "url": "u", "retries": "three" }))
                .len(),
            1,
            "a string that is no template is still not a number"
        );
    }

    #[test]
    fn an_untyped_kind_takes_anything() {
        let kinds = StepKinds::untyped(&["free"]);
        assert!(kinds.contains("free"));
        assert_eq!(kinds.check("free", &json!({ "anything": [1, 2] })), []);
    }
}
