//! Step kinds: one file each, behind [`StepKind`]. A step kind gets its `with` already rendered
//! and returns an outcome; it never touches the store. One narrow exception: `chain` takes
//! nonces through a [`NonceAllocator`] given when the registry is built
//! ([`Registry::builtin_with`]), which the binary backs with the store's allocator.

mod chain;
mod http;
mod n8n;
mod noop;
mod notify;
mod openai;
mod script;
mod sleep;
mod transform;
mod wait;
mod workflow;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde::de::DeserializeOwned;
use serde_json::Value;
use switchyard_engine::definition::{Secrets, StepKinds};
use switchyard_engine::store::{JobId, LogLine};

use crate::artifacts::AttemptArtifacts;
use crate::egress::EgressPolicy;
use crate::usage::UsageMeter;
use switchyard_engine::state::{Millis, StepFailure};

pub use chain::{Chain, NoNonces, NonceAllocator, NonceError, StoreNonces};
pub use http::Http;
pub use n8n::{N8n, N8nUrls};
pub use noop::Noop;
pub use notify::Notify;
pub use openai::OpenAi;
pub use script::Script;
pub use sleep::Sleep;
pub use transform::Transform;
pub use wait::Wait;
pub use workflow::StartWorkflows;

/// One call of a step: its rendered parameters and where it stands.
#[derive(Debug, Clone)]
pub struct StepCall {
    pub with: Value,
    /// Resolves the secret references in the fields named by [`StepKind::secret_fields`]:
    /// elsewhere `with` holds none.
    pub secrets: Secrets,
    /// The top-level `with` fields whose templates read the run's input or step outputs: values
    /// whoever started the run, or a service a step called, chose.
    pub reads_run_data: Vec<String>,
    /// What the step saved when it last parked, if it did.
    pub checkpoint: Option<Value>,
    /// Stable across attempts of the same step of the same run: pass it to APIs that honour one.
    pub idempotency_key: String,
    /// The job the step runs in; none for a kind tried on its own.
    pub job_id: Option<JobId>,
    pub run_id: String,
    pub step_id: String,
    pub attempt: u32,
    pub now: Millis,
    /// Where the step writes what it prints.
    pub log: StepLog,
    /// The files it stores and reads.
    pub artifacts: AttemptArtifacts,
    /// The variables its templates saw (`vars`), for a kind's defaults
    /// (`vars.openai_base_url`).
    pub vars: Value,
    /// What it spends at the services it calls.
    pub usage: UsageMeter,
}

/// Most a step's lines may hold in one attempt, each line counting [`LINE_COST`] more than its
/// text (a row of its own); what comes after is dropped, with a note.
pub const MAX_LOG_BYTES: usize = 1024 * 1024;
const LINE_COST: usize = 64;

/// What a step prints during its attempt (a script's output, a request and its status), kept
/// with its settlement for `switchyard logs`: at most [`MAX_LOG_BYTES`], and with every value
/// the attempt sent that carries a secret replaced by `[secret]`.
#[derive(Clone, Default)]
pub struct StepLog(Arc<std::sync::Mutex<LogBuffer>>);

#[derive(Default)]
struct LogBuffer {
    lines: Vec<LogLine>,
    bytes: usize,
    dropped: usize,
    secrets: Option<Secrets>,
}

impl std::fmt::Debug for StepLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepLog")
            .field("lines", &self.buffer().lines.len())
            .finish()
    }
}

impl StepLog {
    /// Clears the lines of what `secrets` reveals before they are kept.
    pub fn redact_with(&self, secrets: Secrets) {
        self.buffer().secrets = Some(secrets);
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, LogBuffer> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a line to `stream` (`stdout`, `stderr`, or `info` for what a kind notes).
    pub fn line(&self, stream: &str, text: impl Into<String>) {
        let text = text.into();
        let cost = text.len() + LINE_COST;
        let mut buffer = self.buffer();
        if buffer.bytes + cost > MAX_LOG_BYTES {
            buffer.dropped += text.len();
            return;
        }
        buffer.bytes += cost;
        let at = jiff::Timestamp::now().as_millisecond();
        buffer.lines.push(LogLine {
            at,
            stream: stream.to_owned(),
            text,
        });
    }

    /// The lines so far, redacted, to be stored while the attempt goes on; the byte budget
    /// still counts them. `None` while a secret this attempt sent spans lines: those wait for
    /// [`StepLog::take`], which redacts each stream whole.
    pub fn take_live(&self) -> Option<Vec<LogLine>> {
        let mut buffer = self.buffer();
        if buffer.lines.is_empty()
            || buffer
                .secrets
                .as_ref()
                .is_some_and(Secrets::sent_spans_lines)
        {
            return None;
        }
        let lines = std::mem::take(&mut buffer.lines);
        Some(match &buffer.secrets {
            Some(secrets) => redact_streams(lines, secrets),
            None => lines,
        })
    }

    /// Puts back lines [`StepLog::take_live`] took that could not be stored, before those
    /// printed since.
    pub fn put_back(&self, mut lines: Vec<LogLine>) {
        let mut buffer = self.buffer();
        lines.append(&mut buffer.lines);
        buffer.lines = lines;
    }

    /// The lines so far, redacted, with a note of what did not fit; the log is empty after.
    pub fn take(&self) -> Vec<LogLine> {
        let mut buffer = self.buffer();
        let mut lines = std::mem::take(&mut buffer.lines);
        if buffer.dropped > 0 {
            lines.push(LogLine {
                at: jiff::Timestamp::now().as_millisecond(),
                stream: "info".to_owned(),
                text: format!(
                    "{} more bytes were not kept: an attempt keeps about {MAX_LOG_BYTES} at most",
                    buffer.dropped
                ),
            });
        }
        if let Some(secrets) = &buffer.secrets {
            lines = redact_streams(lines, secrets);
        }
        buffer.bytes = 0;
        buffer.dropped = 0;
        lines
    }
}

/// `lines` with every value the attempt sent that carries a secret replaced, a secret printed
/// over several lines too: each stream's lines are searched as one text, then split again (a
/// line that held only part of a secret takes the time of the line where the part began).
fn redact_streams(lines: Vec<LogLine>, secrets: &Secrets) -> Vec<LogLine> {
    // Each line keeps its place in the order they were printed.
    let mut streams: BTreeMap<String, Vec<(usize, LogLine)>> = BTreeMap::new();
    for (place, line) in lines.into_iter().enumerate() {
        streams
            .entry(line.stream.clone())
            .or_default()
            .push((place, line));
    }
    let mut out: Vec<(usize, LogLine)> = Vec::new();
    for (stream, lines) in streams {
        let joined: Vec<&str> = lines.iter().map(|(_, l)| l.text.as_str()).collect();
        let mut text = Value::String(joined.join("\n"));
        secrets.redact_sent(&mut text);
        let redacted: Vec<&str> = text.as_str().unwrap_or_default().split('\n').collect();
        for (i, text) in redacted.iter().enumerate() {
            let (place, line) = &lines[i.min(lines.len() - 1)];
            let place = if redacted.len() == lines.len() {
                *place
            } else {
                place + i
            };
            out.push((
                place,
                LogLine {
                    at: line.at,
                    stream: stream.clone(),
                    text: (*text).to_owned(),
                },
            ));
        }
    }
    out.sort_by_key(|(place, _)| *place);
    out.into_iter().map(|(_, line)| line).collect()
}

/// In [`StepCall::reads_run_data`]: `with` was rendered whole from run data, every field with it.
pub const EVERY_FIELD: &str = "*";

impl StepCall {
    /// The first attempt's call of a step with `with` as rendered, outside any run: for trying
    /// a kind on its own (its tests, an embedder's kinds).
    pub fn first_attempt(with: Value, secrets: Secrets) -> Self {
        StepCall {
            with,
            secrets,
            reads_run_data: Vec::new(),
            checkpoint: None,
            idempotency_key: "run:step".into(),
            job_id: None,
            run_id: "run".into(),
            step_id: "step".into(),
            attempt: 1,
            now: 0,
            log: StepLog::default(),
            artifacts: AttemptArtifacts::default(),
            vars: Value::Null,
            usage: UsageMeter::default(),
        }
    }

    /// Whether `with.<field>` was rendered from the run's input or step outputs.
    pub fn reads_run_data(&self, field: &str) -> bool {
        self.reads_run_data
            .iter()
            .any(|f| f == field || f == EVERY_FIELD)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Output(Value),
    /// Free the worker slot; run again at `until` (or when settled from outside, with `None`)
    /// with `checkpoint` in [`StepCall::checkpoint`].
    Park {
        until: Option<Millis>,
        checkpoint: Value,
    },
    /// Start these child runs and succeed with the list of their outputs once all succeeded.
    StartChildren(Vec<ChildRun>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChildRun {
    pub workflow: String,
    pub input: Value,
}

pub type StepResult = Result<StepOutcome, StepFailure>;

#[async_trait]
pub trait StepKind: Send + Sync + 'static {
    /// The `type:` that selects this kind in a definition.
    fn name(&self) -> &'static str;
    /// The top-level `with` fields this kind sends secrets in, and resolves with
    /// [`StepCall::secrets`]. A secret anywhere else fails the attempt before the kind runs.
    fn secret_fields(&self) -> &'static [&'static str] {
        &[]
    }
    /// The top-level `with` fields taken as written, never rendered: code, in which `{{`, `{%`
    /// and `{#` are the code's own (a shell's `${#list[@]}`, a Python f-string).
    fn literal_fields(&self) -> &'static [&'static str] {
        &[]
    }
    /// What `with` takes, as a JSON Schema (see [`with_schema`]): definitions are checked
    /// against it when they load, and editors complete it.
    fn with_schema(&self) -> Value;
    async fn run(&self, call: StepCall) -> StepResult;
}

/// The step kinds a worker can run, by name.
#[derive(Clone, Default)]
pub struct Registry(HashMap<&'static str, Arc<dyn StepKind>>);

impl Registry {
    /// Every kind that ships with Switchyard, for checking definitions and running steps that
    /// need nothing of a database: no egress rules beyond the default, no n8n addresses, and no
    /// nonce allocator ([`NoNonces`]: a `chain` step that sends fails, saying so).
    pub fn builtin() -> Self {
        Registry::builtin_with(N8nUrls::default(), Default::default(), Arc::new(NoNonces))
    }

    /// Every kind that ships with Switchyard: outbound requests under `egress`, n8n steps that
    /// reach n8n and are called back through `n8n`, `chain` steps that take their nonces from
    /// `nonces` (for workers on a database, [`StoreNonces`]: the one thing a kind gets of the
    /// store).
    pub fn builtin_with(
        n8n: N8nUrls,
        egress: Arc<EgressPolicy>,
        nonces: Arc<dyn NonceAllocator>,
    ) -> Self {
        let mut registry = Registry::default();
        registry.add(Chain::with_policy(nonces, egress.clone()));
        registry.add(Http::with_policy(egress.clone()));
        registry.add(Notify::new(Http::with_policy(egress.clone())));
        registry.add(OpenAi::with_policy(egress.clone()));
        registry.add(N8n::with_policy(n8n, egress));
        registry.add(Transform);
        registry.add(Script::refused());
        registry.add(Sleep);
        registry.add(Noop);
        registry.add(Wait);
        registry.add(StartWorkflows);
        registry
    }

    /// The same kinds, with `script` steps run rather than refused (`--allow-scripts`).
    pub fn allowing_scripts(mut self) -> Self {
        self.add(Script::allowed());
        self
    }

    pub fn add(&mut self, kind: impl StepKind) {
        self.0.insert(kind.name(), Arc::new(kind));
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn StepKind>> {
        self.0.get(name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.0.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// The kinds with what each takes in `with`, for checking definitions. Fails when a kind
    /// declares a schema that does not compile.
    pub fn step_kinds(&self) -> Result<StepKinds, String> {
        StepKinds::new(self.0.iter().map(|(name, kind)| {
            let mut schema = kind.with_schema();
            for field in kind.literal_fields() {
                if let Some(property) = schema.pointer_mut(&format!("/properties/{field}")) {
                    property[switchyard_engine::definition::LITERAL] = Value::Bool(true);
                }
            }
            ((*name).to_owned(), schema)
        }))
    }
}

/// The JSON Schema of `T` as a step kind's `with`: draft 2020-12, every subschema inline.
pub(crate) fn with_schema<T: JsonSchema>() -> Value {
    let mut schema = SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value();
    if let Some(map) = schema.as_object_mut() {
        map.remove("$schema");
        map.remove("title");
    }
    schema
}

/// Reads the rendered `with` (absent: `{}`) as the kind's parameters, or fails the attempt for
/// good naming what is wrong: rendering may give what loading could not check.
pub(crate) fn parse_with<T: DeserializeOwned>(kind: &str, with: &Value) -> Result<T, StepFailure> {
    let empty = Value::Object(serde_json::Map::new());
    let with = if with.is_null() { &empty } else { with };
    T::deserialize(with).map_err(|e| {
        StepFailure::permanent("invalid_parameters", format!("{kind} step: `with`: {e}"))
    })
}
