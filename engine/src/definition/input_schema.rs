//! `input_schema:`, a JSON Schema (draft 2020-12) that a run's merged input must satisfy. The
//! `jsonschema` crate validates; this module only fixes how: no `$ref` leaves the document, and
//! `pattern` runs on the linear-time `regex` engine, so a crafted schema costs bounded time.

use serde_json::Value;

/// A compiled `input_schema`.
pub struct InputSchema(jsonschema::Validator);

/// One way an input fails its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Where in the input, as a JSON Pointer (`""` is the input itself).
    pub path: String,
    /// What is wrong there, without the value itself (it may be large, or private).
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        write!(f, "at {path}: {}", self.message)
    }
}

/// A compiled regular expression may take this much memory; a schema over it is refused.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// How many violations an input reports: an input of 10,000 wrong items names the first ones.
pub const MAX_VIOLATIONS: usize = 20;

impl InputSchema {
    /// Compiles `schema`, which must itself be a valid draft 2020-12 schema.
    pub fn compile(schema: &Value) -> Result<Self, String> {
        jsonschema::draft202012::options()
            .with_pattern_options(
                jsonschema::PatternOptions::regex()
                    .size_limit(PATTERN_SIZE_LIMIT)
                    .dfa_size_limit(PATTERN_SIZE_LIMIT),
            )
            .build(schema)
            .map(InputSchema)
            .map_err(|e| {
                let at = e.instance_path().as_str();
                if at.is_empty() {
                    e.masked().to_string()
                } else {
                    format!("at {at}: {}", e.masked())
                }
            })
    }

    /// The ways `input` fails the schema, the first [`MAX_VIOLATIONS`] of them; empty when it
    /// satisfies it.
    pub fn violations(&self, input: &Value) -> Vec<Violation> {
        self.0
            .iter_errors(input)
            .take(MAX_VIOLATIONS)
            .map(|e| Violation {
                path: e.instance_path().as_str().to_owned(),
                message: e.masked().to_string(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn each_violation_names_its_path_and_not_the_value() {
        let schema = InputSchema::compile(&json!({
            "type": "object",
            "required": ["topic"],
            "properties": {
                "count": { "type": "integer", "minimum": 1 },
                "tags": { "type": "array", "items": { "type": "string" } }
            }
        }))
        .unwrap();
        assert!(
            schema
                .violations(&json!({ "topic": "x", "count": 2 }))
                .is_empty()
        );
        let found = schema.violations(&json!({ "count": "secret-ish", "tags": ["a", 7] }));
        let paths: Vec<&str> = found.iter().map(|v| v.path.as_str()).collect();
        assert!(paths.contains(&""), "{found:?}");
        assert!(paths.contains(&"/count"), "{found:?}");
        assert!(paths.contains(&"/tags/1"), "{found:?}");
        assert!(
            found.iter().all(|v| !v.message.contains("secret-ish")),
            "{found:?}"
        );
    }

    #[test]
    fn a_schema_that_is_not_a_schema_or_reaches_outside_is_refused() {
        assert!(InputSchema::compile(&json!({ "type": "integr" })).is_err());
        assert!(InputSchema::compile(&json!({ "minimum": "one" })).is_err());
        let remote = InputSchema::compile(&json!({ "$ref": "https://example.com/s.json" }));
        assert!(remote.is_err(), "a remote $ref is not fetched");
        let file = InputSchema::compile(&json!({ "$ref": "file:///etc/passwd" }));
        assert!(file.is_err(), "nor a file");
        assert!(InputSchema::compile(&json!(true)).is_ok());
    }

    #[test]
    fn a_backtracking_pattern_is_refused_or_runs_in_linear_time() {
        // Look-around and back-references need a backtracking engine: refused outright.
        assert!(InputSchema::compile(&json!({ "pattern": "^(a+)+\\1$" })).is_err());
        let schema = InputSchema::compile(&json!({ "pattern": "^(a+)+$" })).unwrap();
        let input = json!(format!("{}!", "a".repeat(100_000)));
        assert_eq!(schema.violations(&input).len(), 1);
    }

    #[test]
    fn a_flood_of_violations_reports_a_bounded_number() {
        let schema =
            InputSchema::compile(&json!({ "type": "array", "items": { "type": "string" } }))
                .unwrap();
        let input = Value::Array(vec![json!(1); 10_000]);
        assert_eq!(schema.violations(&input).len(), MAX_VIOLATIONS);
    }
}
