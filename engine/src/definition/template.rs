//! `{{ ... }}` templates in step parameters (minijinja).
//!
//! Templates come from definitions anyone with API access may upload, and see secrets, so: no
//! loader (no file access), strict undefined (a typo fails instead of rendering ""), fuel (bounded
//! time and memory per render), and error messages scrubbed of secret values.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::Serialize;
use serde_json::Value;

/// Instructions per render: about 64 bytes each, so a render can use at most ~13 MB. Real step
/// parameters use a few hundred; minijinja's fuel costs are not stable across releases, hence
/// the headroom.
const FUEL: u64 = 200_000;

/// What a template sees. In templates a step's result is `steps.<id>.output`.
#[derive(Debug, Clone, Default)]
pub struct TemplateContext {
    pub input: Value,
    /// Step id -> that step's output.
    pub steps: serde_json::Map<String, Value>,
    pub vars: Value,
    /// Never logged, never stored: rendered results that end up in outputs or events should go
    /// through [`redact_secrets`].
    pub secrets: BTreeMap<String, String>,
    /// Run id, attempt, scheduled time.
    pub run: Value,
    /// Only the environment variables the operator allows.
    pub env: BTreeMap<String, String>,
}

/// Why a template failed. Messages never contain secret values (they are replaced with
/// `[redacted]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template syntax error: {0}")]
    Syntax(String),
    #[error("template error: {0}")]
    Render(String),
    /// Stopped by the fuel limit: the template does too much work.
    #[error("template does too much work (out of fuel)")]
    OutOfFuel,
    #[error("template expression `{0}` is undefined")]
    Undefined(String),
    #[error("template result is not JSON: {0}")]
    NotJson(String),
}

pub(crate) static ENV: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    // Deep recursion costs stack, not fuel.
    env.set_recursion_limit(100);
    env
});

#[derive(Serialize)]
struct Scope<'a> {
    input: &'a Value,
    steps: BTreeMap<&'a str, StepScope<'a>>,
    vars: &'a Value,
    secrets: &'a BTreeMap<String, String>,
    run: &'a Value,
    env: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct StepScope<'a> {
    output: &'a Value,
}

fn scope(ctx: &TemplateContext) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(Scope {
        input: &ctx.input,
        steps: ctx
            .steps
            .iter()
            .map(|(k, v)| (k.as_str(), StepScope { output: v }))
            .collect(),
        vars: &ctx.vars,
        secrets: &ctx.secrets,
        run: &ctx.run,
        env: &ctx.env,
    }))
}

/// Renders every string in `template` (object keys are left alone). A string that is exactly one
/// `{{ expr }}` (surrounding whitespace aside) yields the expression's JSON value, so
/// `"{{ steps.fetch.output.items }}"` passes a list on rather than its text; any other string
/// renders to a string.
pub fn render_value(template: &Value, ctx: &TemplateContext) -> Result<Value, TemplateError> {
    // Building the scope converts the whole context; a literal `with` needs none of it.
    if !has_template(template) {
        return Ok(template.clone());
    }
    let scope = scope(ctx);
    render_tree(template, &scope).map_err(|e| scrub(e, &ctx.secrets))
}

fn has_template(value: &Value) -> bool {
    match value {
        Value::String(s) => is_template(s),
        Value::Array(items) => items.iter().any(has_template),
        Value::Object(map) => map.values().any(has_template),
        _ => false,
    }
}

/// Renders one template string.
pub fn render_str(template: &str, ctx: &TemplateContext) -> Result<String, TemplateError> {
    render_text(template, &scope(ctx)).map_err(|e| scrub(e, &ctx.secrets))
}

fn render_tree(template: &Value, scope: &minijinja::Value) -> Result<Value, TemplateError> {
    Ok(match template {
        Value::String(s) => render_string(s, scope)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_tree(v, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_tree(v, scope)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

fn render_string(s: &str, scope: &minijinja::Value) -> Result<Value, TemplateError> {
    if !is_template(s) {
        return Ok(Value::String(s.to_owned()));
    }
    let Some(expr) = whole_expression(s) else {
        return render_text(s, scope).map(Value::String);
    };
    let compiled = ENV.compile_expression(expr).map_err(from_minijinja)?;
    let value = compiled.eval(scope.clone()).map_err(from_minijinja)?;
    // Strict mode only refuses undefined where it is printed or iterated; `[input.typo]` would
    // otherwise slip through as `[null]`.
    if contains_undefined(&value) {
        return Err(TemplateError::Undefined(expr.to_owned()));
    }
    serde_json::to_value(&value).map_err(|e| TemplateError::NotJson(e.to_string()))
}

fn contains_undefined(value: &minijinja::Value) -> bool {
    use minijinja::value::ValueKind;
    // An explicit stack: values can be as deep as the step outputs they come from.
    let mut stack = vec![value.clone()];
    while let Some(v) = stack.pop() {
        match v.kind() {
            ValueKind::Undefined => return true,
            ValueKind::Seq | ValueKind::Iterable => {
                if let Ok(items) = v.try_iter() {
                    stack.extend(items);
                }
            }
            ValueKind::Map => {
                if let Ok(keys) = v.try_iter() {
                    for key in keys {
                        stack.push(v.get_item(&key).unwrap_or_default());
                    }
                }
            }
            _ => {}
        }
    }
    false
}

fn render_text(s: &str, scope: &minijinja::Value) -> Result<String, TemplateError> {
    if !is_template(s) {
        return Ok(s.to_owned());
    }
    let tmpl = ENV.template_from_str(s).map_err(from_minijinja)?;
    tmpl.render(scope).map_err(from_minijinja)
}

/// Cheap pre-check: most parameter strings hold no template at all.
pub(crate) fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// The expression of a string that is exactly one `{{ expr }}` (whitespace-control markers
/// allowed), or None.
pub(crate) fn whole_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    if is_template(inner) || inner.contains("}}") {
        return None;
    }
    let inner = inner.strip_prefix(['-', '+']).unwrap_or(inner);
    let inner = inner.strip_suffix(['-', '+']).unwrap_or(inner);
    let inner = inner.trim();
    (!inner.is_empty()).then_some(inner)
}

fn from_minijinja(e: minijinja::Error) -> TemplateError {
    match e.kind() {
        ErrorKind::OutOfFuel => TemplateError::OutOfFuel,
        ErrorKind::SyntaxError => TemplateError::Syntax(e.to_string()),
        _ => TemplateError::Render(e.to_string()),
    }
}

/// Error texts can quote values (a failed filter, a bad conversion); never let a secret through.
fn scrub(e: TemplateError, secrets: &BTreeMap<String, String>) -> TemplateError {
    let r = |s: String| redact_str(&s, secrets);
    match e {
        TemplateError::Syntax(s) => TemplateError::Syntax(r(s)),
        TemplateError::Render(s) => TemplateError::Render(r(s)),
        TemplateError::Undefined(s) => TemplateError::Undefined(r(s)),
        TemplateError::NotJson(s) => TemplateError::NotJson(r(s)),
        TemplateError::OutOfFuel => TemplateError::OutOfFuel,
    }
}

const REDACTED: &str = "[redacted]";

/// Replaces every occurrence of a secret value, in every string and object key of `value`, with
/// `[redacted]`. Empty secrets are ignored (they would match everywhere).
pub fn redact_secrets(value: &mut Value, secrets: &BTreeMap<String, String>) {
    if secrets.values().all(String::is_empty) {
        return;
    }
    match value {
        Value::String(s) if contains_secret(s, secrets) => *s = redact_str(s, secrets),
        Value::Array(items) => items.iter_mut().for_each(|v| redact_secrets(v, secrets)),
        Value::Object(map) => {
            if map.keys().any(|k| contains_secret(k, secrets)) {
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(k, v)| (redact_str(&k, secrets), v))
                    .collect();
            }
            map.values_mut().for_each(|v| redact_secrets(v, secrets));
        }
        _ => {}
    }
}

fn contains_secret(s: &str, secrets: &BTreeMap<String, String>) -> bool {
    secrets
        .values()
        .any(|secret| !secret.is_empty() && s.contains(secret.as_str()))
}

fn redact_str(s: &str, secrets: &BTreeMap<String, String>) -> String {
    // Longest first, so a secret that contains another is redacted whole.
    let mut values: Vec<&str> = secrets
        .values()
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    let mut out = s.to_owned();
    for secret in values {
        if out.contains(secret) {
            out = out.replace(secret, REDACTED);
        }
    }
    out
}
