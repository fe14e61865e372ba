//! The JSON Schema of definition files, generated from the model (published as
//! `schema/definition.schema.json` for editors).

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::Value;

use super::kinds::StepKinds;
use super::model::Workflow;

/// A definition file: one workflow (with `id`), or `workflows: {<id>: <workflow>}`.
/// Only its schema is used; parsing goes through [`super::parse_source`] for source positions.
pub enum DefinitionFile {
    Many(WorkflowsFile),
    One(Box<Workflow>),
}

/// The seed's shape: workflows keyed by id.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowsFile {
    pub workflows: BTreeMap<String, Workflow>,
}

impl JsonSchema for DefinitionFile {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "DefinitionFile".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "title": "Switchyard workflow definition",
            "description": "One workflow (with `id`), or `workflows: {<id>: <workflow>}`.",
            "anyOf": [
                generator.subschema_for::<WorkflowsFile>(),
                { "allOf": [generator.subschema_for::<Workflow>()], "required": ["id"] },
            ]
        })
    }
}

/// camelCase spellings the parser accepts (serde `alias`), per schema definition. schemars does
/// not emit aliases, and with `additionalProperties: false` editors would flag the seed's
/// `retryPolicy` as unknown, so they are added as copies of the snake_case property.
const ALIASES: &[(&str, &str, &str)] = &[
    ("Workflow", "retry", "retryPolicy"),
    ("Step", "retry", "retryPolicy"),
    ("RetryPolicy", "max_retries", "maxRetries"),
    ("RetryPolicy", "non_retryable", "nonRetryable"),
    ("Notifications", "on_success", "onSuccess"),
    ("Notifications", "on_failure", "onFailure"),
    ("Notifications", "webhook_url", "webhookUrl"),
    ("ScheduleObject", "catch_up", "catchUp"),
    ("WebhookTrigger", "dedupe_key", "dedupeKey"),
];

/// [`json_schema`] with each step's `with` checked against its kind's schema (templates allowed
/// wherever a value is), so that editors complete and check it per `type`.
pub fn json_schema_with(kinds: &StepKinds) -> Value {
    let mut schema = json_schema();
    let by_kind: Vec<Value> = kinds
        .schemas()
        .map(|(name, with)| {
            serde_json::json!({
                "if": { "properties": { "type": { "const": name } }, "required": ["type"] },
                "then": { "properties": { "with": with } }
            })
        })
        .collect();
    if let Some(step) = schema
        .pointer_mut("/$defs/Step")
        .and_then(Value::as_object_mut)
    {
        if let Some(Value::Object(kind)) =
            step.get_mut("properties").and_then(|p| p.get_mut("type"))
        {
            let names: Vec<&str> = kinds.names();
            kind.insert("enum".to_owned(), serde_json::json!(names));
        }
        step.insert("allOf".to_owned(), Value::Array(by_kind));
    }
    schema
}

/// The schema of [`DefinitionFile`] (Draft 2020-12), aliases included.
pub fn json_schema() -> Value {
    let mut schema = schemars::schema_for!(DefinitionFile).to_value();
    for (def, field, alias) in ALIASES {
        let props = schema
            .pointer_mut(&format!("/$defs/{def}/properties"))
            .and_then(Value::as_object_mut);
        if let Some(props) = props
            && let Some(original) = props.get(*field).cloned()
        {
            let mut copy = original;
            if let Some(obj) = copy.as_object_mut() {
                obj.insert(
                    "description".to_owned(),
                    Value::String(format!("Alias of `{field}`.")),
                );
            }
            props.insert((*alias).to_owned(), copy);
        }
    }
    schema
}
