//! Workflow definitions: the format, its parsing with source locations, load-time
//! validation, the JSON Schema, and `{{ ... }}` templates.
//!
//! Loading is two-phase so that the HTTP API can reuse it: [`parse_source`] turns one file or
//! request body into workflows plus a map of where each node sits in the text, and [`validate`]
//! checks a set of parsed sources together (cross-file duplicates, child-workflow references),
//! reporting every problem as `origin:line:column: message`.

mod error;
mod files;
mod input_schema;
mod kinds;
mod locate;
pub mod model;
mod parse;
mod schema;
mod template;
mod validate;

pub use error::{DefinitionError, DefinitionErrors};
pub use files::FILE_FOR;
pub use input_schema::{InputSchema, Violation};
pub use kinds::{
    DURATION_FORMAT, LITERAL, PathPart, StepKinds, TEMPLATE_PATTERN, WithProblem, templated,
};
pub use model::*;
pub use parse::{
    Format, MAX_DEFINITION_BYTES, ParsedSource, load_paths, parse_bytes, parse_source, parse_str,
};
pub use schema::{DefinitionFile, WorkflowsFile, json_schema, json_schema_with};
pub use template::{
    SecretError, Secrets, TemplateContext, TemplateError, has_template, is_truthy, reads_run_data,
    render_str, render_value,
};
pub use validate::{TEMPLATE_ROOTS, check_str, validate};
