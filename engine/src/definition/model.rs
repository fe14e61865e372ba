//! The workflow definition as users write it. These types are the format: the JSON
//! Schema is generated from them and the store keeps them, serialized, as a workflow version.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One workflow. In a `workflows:` map the id comes from the map key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Unique id, `[a-z0-9_-]+`.
    #[serde(default)]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Whole-run timeout; the run is marked `timed_out` when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationSpec>,
    /// Default retry policy of every step.
    #[serde(
        default,
        alias = "retryPolicy",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// -100..100 (default 0): among due jobs, higher priority is claimed first.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = -100, max = 100))]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<Notifications>,
    /// What else starts runs besides schedules, the API and the CLI: webhook triggers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<WorkflowTrigger>,
    /// Input defaults, merged under the input a trigger gives.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub inputs: serde_json::Map<String, Value>,
    /// A JSON Schema (draft 2020-12) that a run's input, merged over `inputs`, must satisfy.
    #[serde(
        default,
        alias = "inputSchema",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<InputSchemaDocument>")]
    pub input_schema: Option<Value>,
    /// `input_schema` compiled, once per loaded workflow.
    #[serde(skip)]
    #[schemars(skip)]
    pub compiled_input_schema: CompiledInputSchema,
    /// How long finished runs are kept (default 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<DurationSpec>,
    /// The DAG. A workflow without steps is run by n8n through the bridge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    /// Steps that run only when the run fails, after its other steps have stopped; they see
    /// `run.error`, their `needs` name only each other, and the run stays `failed`.
    #[serde(default, alias = "onFailure", skip_serializing_if = "Vec::is_empty")]
    pub on_failure: Vec<Step>,
}

/// A workflow's `input_schema`, compiled on first use. Not part of the format: a clone starts
/// empty, and it never makes two workflows differ.
#[derive(Default)]
pub struct CompiledInputSchema(
    std::sync::OnceLock<Result<std::sync::Arc<super::InputSchema>, String>>,
);

impl CompiledInputSchema {
    /// `schema` compiled, the first call's answer for every call.
    pub fn get(&self, schema: &Value) -> Result<std::sync::Arc<super::InputSchema>, String> {
        self.0
            .get_or_init(|| super::InputSchema::compile(schema).map(std::sync::Arc::new))
            .clone()
    }
}

impl Clone for CompiledInputSchema {
    fn clone(&self) -> Self {
        CompiledInputSchema::default()
    }
}

impl PartialEq for CompiledInputSchema {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for CompiledInputSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompiledInputSchema")
    }
}

/// The schema of `input_schema`: a JSON Schema document, an object or a boolean.
#[derive(JsonSchema)]
#[schemars(untagged)]
#[allow(dead_code)]
enum InputSchemaDocument {
    Object(serde_json::Map<String, Value>),
    Bool(bool),
}

/// `schedule: "0 8 * * *"` or `schedule: { cron, timezone, overlap, catch_up }`.
///
/// Deserialize and JsonSchema are written by hand (below) because of the bare-string shorthand: an
/// untagged enum would lose serde-saphyr's source locations and give a vague error message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    /// 5-field crontab, or 6 fields with seconds first.
    pub cron: String,
    /// IANA time zone name.
    pub timezone: String,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
}

/// A schedule in full.
// The map form of `Schedule`, deserialized through it; its schema is the object branch.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ScheduleObject")]
struct ScheduleFields {
    /// 5-field crontab, or 6 fields with seconds first.
    cron: String,
    /// IANA time zone name.
    #[serde(default = "utc")]
    timezone: String,
    #[serde(default)]
    overlap: Overlap,
    #[serde(default, alias = "catchUp")]
    catch_up: CatchUp,
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Schedule;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a cron expression or a map { cron, timezone, overlap, catch_up }")
            }
            fn visit_str<E: serde::de::Error>(self, cron: &str) -> Result<Schedule, E> {
                Ok(Schedule {
                    cron: cron.to_owned(),
                    timezone: utc(),
                    overlap: Overlap::default(),
                    catch_up: CatchUp::default(),
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Schedule, A::Error> {
                // Delegating through MapAccessDeserializer keeps the YAML deserializer underneath,
                // so errors inside the map still carry their line and column.
                let f =
                    ScheduleFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Schedule {
                    cron: f.cron,
                    timezone: f.timezone,
                    overlap: f.overlap,
                    catch_up: f.catch_up,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Schedule {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Schedule".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A cron expression (shorthand for `{ cron: ... }`) or the full map.",
            "anyOf": [
                { "type": "string", "description": "5-field crontab, or 6 fields with seconds first." },
                generator.subschema_for::<ScheduleFields>(),
            ]
        })
    }
}

fn utc() -> String {
    "UTC".to_owned()
}

/// What a fire does while a run of the same workflow is still going.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    #[default]
    Skip,
    Queue,
    Allow,
}

/// What happens to fires missed while no scheduler was running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    None,
    #[default]
    Latest,
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 means one attempt only.
    #[serde(default = "default_max_retries", alias = "maxRetries")]
    pub max_retries: u32,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default = "default_initial")]
    pub initial: DurationSpec,
    #[serde(default = "default_max_backoff")]
    pub max: DurationSpec,
    #[serde(default = "yes")]
    pub jitter: bool,
    /// HTTP statuses (numbers) or error kinds (strings) that fail at once.
    #[serde(default, alias = "nonRetryable", skip_serializing_if = "Vec::is_empty")]
    pub non_retryable: Vec<NonRetryable>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: default_max_retries(),
            backoff: Backoff::default(),
            initial: default_initial(),
            max: default_max_backoff(),
            jitter: true,
            non_retryable: Vec::new(),
        }
    }
}

fn default_max_retries() -> u32 {
    3
}
fn default_initial() -> DurationSpec {
    DurationSpec(Duration::from_secs(1))
}
fn default_max_backoff() -> DurationSpec {
    DurationSpec(Duration::from_secs(300))
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    Fixed,
    #[default]
    Exponential,
}

/// An HTTP status (a number) or an error kind (a string).
// Deserialize is by hand: serde's untagged enums buffer the value and so lose its location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum NonRetryable {
    Status(u16),
    Kind(String),
}

impl<'de> Deserialize<'de> for NonRetryable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = NonRetryable;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an HTTP status (100-599) or an error kind")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NonRetryable, E> {
                match u16::try_from(v) {
                    Ok(status) if (100..=599).contains(&status) => Ok(NonRetryable::Status(status)),
                    _ => Err(E::custom(format!("{v} is not an HTTP status (100-599)"))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<NonRetryable, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{v} is not an HTTP status (100-599)"))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NonRetryable, E> {
                Ok(NonRetryable::Kind(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `concurrency: 2` or `concurrency: { limit: 1, key: "{{ input.region }}" }`.
///
/// Deserialize and JsonSchema by hand for the bare-integer shorthand, as for [`Schedule`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Concurrency {
    pub limit: u32,
    /// Template rendered against the run's input; runs with equal keys share the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A concurrency limit, optionally per rendered key.
// The map form of `Concurrency`, deserialized through it; its schema is the object branch.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ConcurrencyObject")]
struct ConcurrencyFields {
    /// Runs at once (per key, when `key` is given).
    limit: u32,
    /// Template rendered against the run's input; runs with equal keys share the limit.
    #[serde(default)]
    key: Option<String>,
}

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Concurrency;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a non-negative integer or a map { limit, key }")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Concurrency, E> {
                let limit = u32::try_from(v)
                    .map_err(|_| E::custom(format!("concurrency {v} is out of range")))?;
                Ok(Concurrency { limit, key: None })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Concurrency, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("concurrency {v} is negative"))),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Concurrency, A::Error> {
                let f = ConcurrencyFields::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(Concurrency {
                    limit: f.limit,
                    key: f.key,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Concurrency {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Concurrency".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Runs of this workflow at once, or a limit per rendered key.",
            "anyOf": [
                { "type": "integer", "format": "uint32", "minimum": 0 },
                generator.subschema_for::<ConcurrencyFields>(),
            ]
        })
    }
}

/// A way a workflow's runs start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkflowTrigger {
    /// `POST /api/hooks/{path}` starts a run with `{body, headers, query}` as its input.
    Webhook(WebhookTrigger),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookTrigger {
    /// Served at `/api/hooks/{path}`: `[a-z0-9_-]` segments separated by `/`.
    pub path: String,
    /// How a delivery proves who sent it.
    pub auth: HookAuth,
    /// With `hmac-sha256` or `stripe`: the name of the secret that signs deliveries (set with
    /// `PUT /api/admin/secrets/{name}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// `accepted` (the default): 202 `{run_id}` at once. `{wait: 30s}`: 200 with the run's
    /// output if it ends in time, else 202 `{run_id}`.
    #[serde(default, skip_serializing_if = "Respond::is_default")]
    pub respond: Respond,
    /// A template over the run's input (`input.body`, `input.headers`, `input.query`) naming
    /// the delivery, where neither Stripe's `id` nor an `X-Event-Id` header does: one run per
    /// name, however often it is delivered.
    #[serde(default, alias = "dedupeKey", skip_serializing_if = "Option::is_none")]
    pub dedupe_key: Option<String>,
    /// Required with `auth: none`: anyone may start runs of this workflow.
    #[serde(default, skip_serializing_if = "is_false")]
    pub public: bool,
}

/// How a webhook delivery is authenticated.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum HookAuth {
    /// `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">` under `secret`, at most
    /// 5 minutes from now.
    HmacSha256,
    /// Stripe's `Stripe-Signature: t=...,v1=...` under `secret` (the endpoint's `whsec_...`),
    /// at most 300 s from now; any of several `v1` values.
    Stripe,
    /// An API token of role operator or above, or a webhook key, as `Authorization: Bearer`.
    Bearer,
    /// Nothing: only with `public: true`.
    None,
}

/// What a webhook delivery is answered with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Respond {
    /// 202 `{run_id}` at once.
    #[default]
    Accepted,
    /// Waits up to this long for the run to end: 200 with its output, else 202 `{run_id}`.
    Wait(DurationSpec),
}

impl Respond {
    fn is_default(&self) -> bool {
        *self == Respond::Accepted
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Notifications {
    #[serde(default, alias = "onSuccess")]
    pub on_success: bool,
    #[serde(default, alias = "onFailure")]
    pub on_failure: bool,
    /// Absolute URL, or a path resolved against Switchyard's public base URL.
    #[serde(default, alias = "webhookUrl", skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique within the workflow, `[a-z0-9_-]+`.
    pub id: String,
    /// The step kind: `http`, `transform`, `sleep`, `noop`, `workflow`, ...
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// The step kind's parameters; strings may hold `{{ ... }}` templates.
    #[serde(default, rename = "with", skip_serializing_if = "Value::is_null")]
    pub with: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationSpec>,
    #[serde(
        default,
        alias = "retryPolicy",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry: Option<RetryPolicy>,
    /// When the step fails for good (its retries spent, or a failure retrying cannot help), its
    /// failure is recorded, its output is `{error}`, and the steps that need it run.
    #[serde(default, alias = "continueOnError", skip_serializing_if = "is_false")]
    pub continue_on_error: bool,
    /// A template rendered once the step's needs are met: false, empty, null or 0 skips the step
    /// (and, by default, the steps that need it) with the rendered value as the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// What the steps it needs must have come to for this step to run.
    #[serde(default, alias = "runIf", skip_serializing_if = "RunIf::is_default")]
    pub run_if: RunIf,
    /// A template that renders to a list (up to [`MAX_ITEMS`]): the step runs once per item, with
    /// `item` and `index` in its templates, each item retried on its own; its output is the list
    /// of the items' outputs, in order.
    #[serde(default, alias = "forEach", skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// How many items of a `for_each` run at once (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub parallel: Option<u32>,
    /// A rate limit shared by every worker and process of the database: each time the step's
    /// kind runs it takes one from the bucket `name`, and with none left the step parks, its
    /// slot free, until its turn. Without `limit` and `per`, the bucket's are read from the
    /// variable `quotas` (`{NAME: {limit, per}}`, set over the admin API) when the step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// `[a-z0-9_-]+`: steps that name the same bucket share it, across workflows.
    #[schemars(regex(pattern = r"^[a-z0-9_-]+$"))]
    pub name: String,
    /// How many may go per `per`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<DurationSpec>,
}

/// The most items a `for_each` may render.
pub const MAX_ITEMS: usize = 10_000;

/// A step's trigger rule: what its needs must have come to once all of them have finished. A
/// step whose rule cannot hold is skipped, with the reason.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    JsonSchema,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum RunIf {
    /// Every need succeeded (the default): a skipped or failed need skips this step.
    #[default]
    AllSucceeded,
    /// Every need finished, whatever it came to.
    AllDone,
    /// Every need finished and at least one failed.
    AnyFailed,
    /// Every need succeeded or was skipped.
    NoneFailed,
}

impl RunIf {
    pub fn is_default(&self) -> bool {
        *self == RunIf::AllSucceeded
    }

    /// Whether a step with this rule may run after a step it needs failed.
    pub fn runs_after_failure(self) -> bool {
        matches!(self, RunIf::AllDone | RunIf::AnyFailed)
    }
}

fn is_false(b: &bool) -> bool {
    !b
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// The range of `priority`, on a workflow and on a start.
pub const PRIORITIES: std::ops::RangeInclusive<i32> = -100..=100;

/// A duration written the humantime way (`30s`, `10m`, `1h 30m`, `30d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[schemars(with = "String")]
pub struct DurationSpec(pub Duration);

impl Serialize for DurationSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(DurationSpec)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a duration (write it like 30s, 5m or 1h 30m)"
                ))
            })
    }
}

/// How long a finished run is kept unless its workflow says otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The step kind that waits for a signal.
pub const WAIT_KIND: &str = "wait";

impl Step {
    /// The signal a `wait` step waits for.
    pub fn signal(&self) -> Option<&str> {
        (self.kind == WAIT_KIND)
            .then(|| self.with.get("signal").and_then(Value::as_str))
            .flatten()
    }
}

/// The step a workflow with no steps of its own runs: its work lives in n8n.
pub const N8N_STEP: &str = "n8n";

impl Workflow {
    /// A workflow with no steps (the seed's: its work lives in n8n) runs as one `n8n` step that
    /// calls its n8n workflow's Webhook trigger, `{--n8n-url}/webhook/{id}`, with the run's input,
    /// and waits for n8n to call back, at most the workflow's timeout. A relative
    /// `notifications.webhook_url` is where n8n calls back, under `--public-url`.
    pub(crate) fn imply_n8n_step(&mut self) {
        if !self.steps.is_empty() {
            return;
        }
        let mut with = serde_json::json!({
            "webhook": self.id,
            "input": "{{ input }}",
            "wait": true,
        });
        if let Some(timeout) = self.timeout {
            with["timeout"] = humantime::format_duration(timeout.0).to_string().into();
        }
        if let Some(path) = self
            .notifications
            .as_ref()
            .and_then(|n| n.webhook_url.as_deref())
            .filter(|url| url.starts_with('/'))
        {
            with["callback_url"] = path.into();
        }
        self.steps.push(Step {
            id: N8N_STEP.to_owned(),
            kind: "n8n".to_owned(),
            needs: Vec::new(),
            with,
            timeout: None,
            retry: None,
            continue_on_error: false,
            when: None,
            run_if: RunIf::default(),
            for_each: None,
            parallel: None,
            quota: None,
        });
    }

    /// The retry policy that governs `step`.
    pub fn retry_policy(&self, step: &Step) -> RetryPolicy {
        step.retry
            .clone()
            .or_else(|| self.retry.clone())
            .unwrap_or_default()
    }

    /// The step `id`, among `steps` or `on_failure`.
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps
            .iter()
            .chain(&self.on_failure)
            .find(|s| s.id == id)
    }

    /// Whether runs of this workflow need the control-flow decisions (`store::machine::advance`):
    /// a step may be skipped, may run after a failure, or the run has failure handlers.
    pub fn has_control_flow(&self) -> bool {
        !self.on_failure.is_empty()
            || self
                .steps
                .iter()
                .any(|s| s.when.is_some() || !s.run_if.is_default())
    }

    /// The `wait` step that waits for signal `name` (validation keeps names unique).
    pub fn step_waiting_for(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.signal() == Some(name))
    }

    /// Steps no other step needs: their outputs make the run's output.
    pub fn sink_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps
            .iter()
            .filter(|s| !self.steps.iter().any(|o| o.needs.contains(&s.id)))
    }

    pub fn retention(&self) -> Duration {
        self.retention.map(|d| d.0).unwrap_or(DEFAULT_RETENTION)
    }
}

/// Every loaded workflow by id.
pub type WorkflowMap = BTreeMap<String, std::sync::Arc<Workflow>>;
