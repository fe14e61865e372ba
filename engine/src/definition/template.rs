//! `{{ ... }}` templates in step parameters (minijinja).
//!
//! Templates come from definitions anyone with API access may upload, so: no loader (no file
//! access), strict undefined (a typo fails instead of rendering ""), fuel (bounded time and
//! memory per render). Templates never see a secret's value: `secrets.NAME` renders as a
//! reference that only the fields a step kind sends secrets in resolve ([`Secrets`]), so no
//! filter, output, error or log can hold a secret or any transform of one.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::Serialize;
use serde_json::Value;

/// Instructions per render: about 64 bytes each, so a render can use at most ~13 MB. Real step
/// parameters use a few hundred; minijinja's fuel costs are not stable across releases, hence
/// the headroom.
const FUEL: u64 = 200_000;

/// Marks a secret reference in rendered text: `\u{E000}<nonce>:<name>\u{E001}`. Private-use
/// characters, which no filter changes; the nonce is drawn for each attempt and never stored, so
/// text from elsewhere (an input, a step output) cannot forge a reference.
const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

/// The secrets of one attempt. A template sees only references; [`Secrets::reveal`] turns
/// them back into values, and only step kinds call it, for the fields they send secrets in.
#[derive(Clone, Default)]
pub struct Secrets {
    values: Arc<BTreeMap<String, String>>,
    nonce: u64,
    /// What this attempt sent: the secrets revealed, and the values built from them (a header,
    /// a Basic credential). A service may echo them back; see [`Secrets::redact_sent`].
    sent: Arc<std::sync::Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Secrets")
            .field(&self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a rendered field's secret references cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "a secret was changed by a template (a filter, a slice, a concatenation inside a \
         filter): secrets can only be inserted whole"
    )]
    Changed,
}

impl Secrets {
    pub fn new(values: BTreeMap<String, String>) -> Self {
        Secrets {
            values: Arc::new(values),
            nonce: rand::random(),
            sent: Arc::default(),
        }
    }

    fn reference(&self, name: &str) -> String {
        format!("{OPEN}{}:{name}{CLOSE}", self.nonce)
    }

    fn opening(&self) -> String {
        format!("{OPEN}{}", self.nonce)
    }

    /// What templates see as `secrets`: each name with its reference.
    fn references(&self) -> BTreeMap<&str, String> {
        self.values
            .keys()
            .map(|name| (name.as_str(), self.reference(name)))
            .collect()
    }

    /// Whether `text` holds a reference of this attempt, whole or changed.
    pub fn referenced_in(&self, text: &str) -> bool {
        text.contains(&self.opening())
    }

    /// Where in `value` (a path such as `$.body.token`) a reference of this attempt stands.
    pub fn find_in(&self, value: &Value) -> Option<String> {
        let opening = self.opening();
        let mut stack = vec![(value, "$".to_owned())];
        while let Some((value, path)) = stack.pop() {
            match value {
                Value::String(s) if s.contains(&opening) => return Some(path),
                Value::Array(items) => stack.extend(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, v)| (v, format!("{path}[{i}]"))),
                ),
                Value::Object(map) => {
                    if map.keys().any(|k| k.contains(&opening)) {
                        return Some(path);
                    }
                    stack.extend(map.iter().map(|(k, v)| (v, format!("{path}.{k}"))));
                }
                _ => {}
            }
        }
        None
    }

    /// `text` with each reference replaced by its secret's value. A reference a filter changed
    /// is an error, never sent as it is. What it reveals counts as sent ([`Secrets::note_sent`]).
    pub fn reveal(&self, text: &str) -> Result<String, SecretError> {
        if !self.referenced_in(text) {
            return Ok(text.to_owned());
        }
        let opening = self.opening();
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find(&opening) {
            out.push_str(&rest[..at]);
            let after = &rest[at + opening.len()..];
            let named = after.strip_prefix(':').and_then(|a| a.split_once(CLOSE));
            match named.and_then(|(name, tail)| Some((self.values.get(name)?, tail))) {
                Some((value, tail)) => {
                    out.push_str(value);
                    self.note_sent(value);
                    rest = tail;
                }
                None => return Err(SecretError::Changed),
            }
        }
        out.push_str(rest);
        self.note_sent(&out);
        Ok(out)
    }

    /// The secret `name`, for a step kind that reads one by a name of its own when its
    /// definition names none (`openai` and `openai_api_key`); it counts as sent.
    pub fn named(&self, name: &str) -> Option<String> {
        let value = self.values.get(name)?;
        self.note_sent(value);
        Some(value.clone())
    }

    /// Records a value this attempt sends that carries a secret, such as an encoded credential.
    pub fn note_sent(&self, value: &str) {
        if !value.is_empty() {
            self.sent
                .lock()
                .expect("sent secrets poisoned")
                .push(value.to_owned());
        }
    }

    /// Whether a value this attempt sent holds a line break: printed, it spans lines, so lines
    /// can only be redacted together.
    pub fn sent_spans_lines(&self) -> bool {
        self.sent
            .lock()
            .expect("sent secrets poisoned")
            .iter()
            .any(|s| s.contains('\n'))
    }

    /// Replaces in `value` every value this attempt sent with a secret in it, as a service that
    /// echoes its request would return them. Only what was sent is looked for: searching for
    /// every secret would tell whoever starts a run whether a guess in its input was right.
    pub fn redact_sent(&self, value: &mut Value) {
        let mut sent = self.sent.lock().expect("sent secrets poisoned").clone();
        if sent.is_empty() {
            return;
        }
        // Longest first, so a value that holds another is replaced whole.
        sent.sort_by_key(|s| std::cmp::Reverse(s.len()));
        sent.dedup();
        let redact = |text: &str| {
            sent.iter()
                .filter(|s| text.contains(s.as_str()))
                .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "[secret]"))
        };
        let mut stack = vec![value];
        while let Some(value) = stack.pop() {
            match value {
                Value::String(s) => *s = redact(s),
                Value::Array(items) => stack.extend(items.iter_mut()),
                Value::Object(map) => {
                    if map.keys().any(|k| redact(k) != *k) {
                        *map = std::mem::take(map)
                            .into_iter()
                            .map(|(k, v)| (redact(&k), v))
                            .collect();
                    }
                    stack.extend(map.values_mut());
                }
                _ => {}
            }
        }
    }
}

/// What a template sees. In templates a step's result is `steps.<id>.output`.
#[derive(Debug, Clone, Default)]
pub struct TemplateContext {
    pub input: Value,
    /// Step id -> that step's output.
    pub steps: serde_json::Map<String, Value>,
    pub vars: Value,
    /// Rendered as references, never as values.
    pub secrets: Secrets,
    /// Run id, attempt, scheduled time.
    pub run: Value,
    /// Only the environment variables the operator allows.
    pub env: BTreeMap<String, String>,
    /// In a step's run for one item of its `for_each`: the item and its index.
    pub item: Option<(Value, i64)>,
}

/// Why a template failed. Messages cannot contain secret values: templates never see them.
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
    // Fuel pays for text as it is made; text made from a list or map at once (printing it,
    // joining it, serializing it) is paid for only afterwards, and a list can hold the same
    // long string thousands of times (a list doubled in a loop). These check first.
    env.set_formatter(|out, state, value| {
        fits(value, 0)?;
        minijinja::escape_formatter(out, state, value)
    });
    env.add_function("__concat", concat);
    env.add_filter("join", bounded::join);
    env.add_filter("string", bounded::string);
    env.add_filter("pprint", bounded::pprint);
    env.add_filter("format", bounded::format);
    env
});

/// The most text a list or map may turn into in one step: a step's output is capped at 1 MiB
/// anyway, and the input it is rendered from at 2 MiB.
const MAX_TEXT_BYTES: usize = 2 * 1024 * 1024;

/// Refuses a value whose text (printed or serialized, with `per_item` more bytes for each item
/// of a list) would exceed [`MAX_TEXT_BYTES`]. Counts only up to the limit, so it costs at most
/// a walk of that many bytes' worth of items.
fn fits(value: &minijinja::Value, per_item: usize) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    if !matches!(
        value.kind(),
        ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
    ) {
        return Ok(());
    }
    let mut size = 0usize;
    let mut stack = vec![value.clone()];
    while let Some(v) = stack.pop() {
        size = size.saturating_add(match v.kind() {
            ValueKind::String => v.as_str().map_or(0, str::len) + 2,
            ValueKind::Bytes => v.as_bytes().map_or(0, <[u8]>::len),
            ValueKind::Seq | ValueKind::Iterable => {
                for item in v.try_iter().into_iter().flatten() {
                    size = size.saturating_add(per_item + 2);
                    stack.push(item);
                    if size > MAX_TEXT_BYTES {
                        break;
                    }
                }
                2
            }
            ValueKind::Map => {
                for key in v.try_iter().into_iter().flatten() {
                    size = size.saturating_add(4);
                    stack.push(v.get_item(&key).unwrap_or_default());
                    stack.push(key);
                    if size > MAX_TEXT_BYTES {
                        break;
                    }
                }
                2
            }
            _ => 24,
        });
        if size > MAX_TEXT_BYTES {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("this would make more than {MAX_TEXT_BYTES} bytes of text"),
            ));
        }
    }
    Ok(())
}

/// Built-in filters that turn a whole list or map into text, each after [`fits`] allows it.
mod bounded {
    use minijinja::value::{Kwargs, Rest, StringInput, ValueOrKwargs};
    use minijinja::{Error, State, Value, filters};

    use super::fits;

    pub fn join(
        state: &mut State,
        value: &Value,
        joiner: Option<StringInput<'_>>,
        attribute: Option<&str>,
        kwargs: Kwargs,
    ) -> Result<Value, Error> {
        fits(value, joiner.as_ref().map_or(0, |j| j.as_str().len()))?;
        filters::join(state, value, joiner, attribute, kwargs)
    }

    pub fn string(state: &State, value: &Value) -> Result<Value, Error> {
        fits(value, 0)?;
        filters::string(state, value)
    }

    pub fn pprint(value: &Value) -> Result<String, Error> {
        fits(value, 8)?;
        Ok(filters::pprint(value))
    }

    pub fn format(
        state: &mut State,
        format_str: &Value,
        args: Rest<ValueOrKwargs>,
    ) -> Result<Value, Error> {
        for arg in args.iter() {
            fits(arg, 0)?;
        }
        filters::format(state, format_str, args)
    }
}

#[derive(Serialize)]
struct Scope<'a> {
    input: &'a Value,
    steps: BTreeMap<&'a str, StepScope<'a>>,
    vars: &'a Value,
    secrets: BTreeMap<&'a str, String>,
    run: &'a Value,
    env: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<i64>,
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
        secrets: ctx.secrets.references(),
        run: &ctx.run,
        env: &ctx.env,
        item: ctx.item.as_ref().map(|(item, _)| item),
        index: ctx.item.as_ref().map(|(_, index)| *index),
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
    render_tree(template, &scope)
}

/// Whether rendering `template` reads the run's input or step outputs: data that whoever
/// starts a run, or a service a step called, chose. A template that does not parse counts as
/// reading them: it is refused when rendered anyway.
pub fn reads_run_data(template: &Value) -> bool {
    // `item` too: a `for_each` list may come from the run's data (a loop over a literal list
    // is held to the same rules, which costs it nothing it needs).
    let reads = |variables: std::collections::HashSet<String>| {
        variables.contains("input") || variables.contains("steps") || variables.contains("item")
    };
    match template {
        Value::String(s) if is_template(s) => match whole_expression(s) {
            Some(expr) => ENV
                .compile_expression(expr)
                .map_or(true, |e| reads(e.undeclared_variables(false))),
            None => ENV
                .template_from_str(s)
                .map_or(true, |t| reads(t.undeclared_variables(false))),
        },
        Value::Array(items) => items.iter().any(reads_run_data),
        Value::Object(map) => map.values().any(reads_run_data),
        _ => false,
    }
}

/// Whether a rendered condition (`when`) holds: false, null, 0, an empty string, list or map,
/// and the text `false`, `0`, `null` or `none` (what a template that mixes text renders) do not.
pub fn is_truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        Value::String(s) => !matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "" | "false" | "0" | "null" | "none"
        ),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

/// Whether any string in `value` is a template: one that is not renders to itself.
pub fn has_template(value: &Value) -> bool {
    match value {
        Value::String(s) => is_template(s),
        Value::Array(items) => items.iter().any(has_template),
        Value::Object(map) => map.values().any(has_template),
        _ => false,
    }
}

/// Renders one template string.
pub fn render_str(template: &str, ctx: &TemplateContext) -> Result<String, TemplateError> {
    render_text(template, &scope(ctx))
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
    let mut discarded = String::new();
    let value = eval(expr, true, scope, &mut discarded)
        .map_err(from_minijinja)?
        .unwrap_or_default();
    fits(&value, 0).map_err(from_minijinja)?;
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
    let mut text = String::new();
    eval(s, false, scope, &mut text).map_err(from_minijinja)?;
    Ok(text)
}

/// Compiles and runs a template (or, with `expression`, one expression) writing into `text`.
/// Compiled here rather than by the environment to route `~` through `__concat`: the
/// built-in operator turns a list or map into text before fuel can refuse it, and a list can
/// hold one long string thousands of times. The instruction is swapped in place for a call of
/// the same arity, so no jump moves.
fn eval(
    source: &str,
    expression: bool,
    scope: &minijinja::Value,
    text: &mut String,
) -> Result<Option<minijinja::Value>, minijinja::Error> {
    use minijinja::machinery::{CodeGenerator, Instruction, Instructions, parse, parse_expr};
    let (mut instructions, mut blocks) = if expression {
        let ast = parse_expr(source)?;
        let mut generator = CodeGenerator::new("<expression>", source);
        generator.compile_expr(&ast);
        generator.finish()
    } else {
        let ast = parse(source, "<template>", Default::default())?;
        let mut generator = CodeGenerator::new("<template>", source);
        generator.compile_stmt(&ast);
        generator.finish()
    };
    let route_concat = |instructions: &mut Instructions<'_>| {
        let mut at = 0;
        while let Some(instruction) = instructions.get_mut(at) {
            if matches!(instruction, Instruction::StringConcat) {
                *instruction = Instruction::CallFunction("__concat", Some(2));
            }
            at += 1;
        }
    };
    route_concat(&mut instructions);
    blocks.values_mut().for_each(route_concat);
    let mut out = minijinja::machinery::make_string_output(text);
    minijinja::machinery::eval(
        &ENV,
        &instructions,
        scope.clone(),
        &blocks,
        &mut out,
        minijinja::AutoEscape::None,
    )
    .map(|(value, _)| value)
}

/// `a ~ b`, once both sides are known to fit.
fn concat(a: minijinja::Value, b: minijinja::Value) -> Result<minijinja::Value, minijinja::Error> {
    fits(&a, 0)?;
    fits(&b, 0)?;
    let text = match (a.as_str(), b.as_str()) {
        (Some(a), Some(b)) => [a, b].concat(),
        _ => format!("{a}{b}"),
    };
    if text.len() > MAX_TEXT_BYTES {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("this would make more than {MAX_TEXT_BYTES} bytes of text"),
        ));
    }
    Ok(minijinja::Value::from(text))
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
