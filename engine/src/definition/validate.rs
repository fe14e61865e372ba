//! Load-time checks of parsed workflows: everything that is not a syntax or type
//! error. All problems are collected, each pinned to the key or value it concerns.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use croner::parser::{CronParser, Seconds, Year};
use serde_json::Value;

use super::error::{DefinitionError, DefinitionErrors};
use super::input_schema::InputSchema;
use super::kinds::{PathPart, StepKinds};
use super::locate::Seg;
use super::model::{
    HookAuth, MAX_ITEMS, PRIORITIES, Respond, Step, WAIT_KIND, Workflow, WorkflowMap,
    WorkflowTrigger,
};
use super::parse::{Format, ParsedSource, make_error, parse_source};
use super::template::{ENV, is_template};

/// The variables templates see (see [`super::TemplateContext`]).
pub const TEMPLATE_ROOTS: &[&str] = &["input", "steps", "vars", "secrets", "run", "env"];

/// minijinja's global functions; they show up as "undeclared variables" in its analysis.
const TEMPLATE_GLOBALS: &[&str] = &[
    "range",
    "dict",
    "namespace",
    "debug",
    "lipsum",
    "cycler",
    "joiner",
    "loop",
    "self",
];

/// The step kind that starts child workflows.
const WORKFLOW_KIND: &str = "workflow";

/// For an API body: parses and validates it against the workflows already loaded (which it may
/// start as children, and which it replaces when ids are equal).
pub fn check_str(
    origin: &str,
    text: &str,
    format: Format,
    existing: &WorkflowMap,
    kinds: &StepKinds,
) -> Result<Vec<Workflow>, DefinitionErrors> {
    let mut source = parse_source(origin, text, format)?;
    let unread = super::files::read_named_files(&mut source, None, kinds);
    if !unread.is_empty() {
        return Err(DefinitionErrors::in_source_order(unread));
    }
    validate(std::slice::from_ref(&source), existing, kinds)?;
    Ok(source.workflows)
}

/// Validates parsed sources together. `existing` holds workflows loaded elsewhere (e.g. the store)
/// that `type: workflow` steps may name; a source workflow with the same id replaces one there.
/// `kinds` are the step kinds the workers provide, with what each takes in `with`. Returns the sources' workflows by id.
pub fn validate(
    sources: &[ParsedSource],
    existing: &WorkflowMap,
    kinds: &StepKinds,
) -> Result<WorkflowMap, DefinitionErrors> {
    let mut errors: Vec<DefinitionError> = Vec::new();
    let mut map = WorkflowMap::new();
    let mut first_seen: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut hook_paths: HashMap<&str, (&str, &str, (usize, usize))> = HashMap::new();

    for (si, src) in sources.iter().enumerate() {
        errors.extend(src.problems.iter().cloned());
        for (wi, wf) in src.workflows.iter().enumerate() {
            if wf.id.is_empty() {
                continue; // already reported by the parser
            }
            if let Some(&(fs, fw)) = first_seen.get(wf.id.as_str()) {
                let first = &sources[fs];
                let (line, col) = first.workflow_at(fw);
                errors.push(src.error(
                    src.workflow_at(wi),
                    format!(
                        "duplicate workflow id `{}` (first defined at {}:{line}:{col})",
                        wf.id, first.origin
                    ),
                ));
                continue;
            }
            first_seen.insert(&wf.id, (si, wi));
            for (ti, trigger) in wf.triggers.iter().enumerate() {
                let WorkflowTrigger::Webhook(hook) = trigger;
                if let Some((other, origin, (line, col))) = hook_paths.get(hook.path.as_str()) {
                    let path = [
                        Seg::Key("triggers"),
                        Seg::Index(ti),
                        Seg::Key("webhook"),
                        Seg::Key("path"),
                    ];
                    errors.push(src.error(
                        src.at(wi, &path, false),
                        format!(
                            "webhook path `{}` is also workflow {other}'s (at {origin}:{line}:{col})",
                            hook.path
                        ),
                    ));
                } else {
                    let path = [
                        Seg::Key("triggers"),
                        Seg::Index(ti),
                        Seg::Key("webhook"),
                        Seg::Key("path"),
                    ];
                    hook_paths.insert(
                        hook.path.as_str(),
                        (
                            wf.id.as_str(),
                            src.origin.as_str(),
                            src.at(wi, &path, false),
                        ),
                    );
                }
            }
            map.insert(wf.id.clone(), Arc::new(wf.clone()));
        }
    }

    // A path a workflow loaded before (installed through the API) serves, unless the sources
    // replace that workflow.
    for (id, wf) in existing.iter().filter(|(id, _)| !map.contains_key(*id)) {
        for WorkflowTrigger::Webhook(hook) in &wf.triggers {
            if let Some((other, origin, (line, col))) = hook_paths.get(hook.path.as_str()) {
                errors.push(make_error(
                    origin,
                    (*line, *col),
                    format!(
                        "webhook path `{}` of workflow {other} is also workflow {id}'s, \
                         installed before: remove one, or give another path",
                        hook.path
                    ),
                ));
            }
        }
    }

    // Every workflow a child step may name: the sources' and those loaded before.
    let mut all: HashMap<&str, &Workflow> =
        existing.iter().map(|(k, v)| (k.as_str(), &**v)).collect();
    for wf in map.values() {
        all.insert(wf.id.as_str(), wf);
    }

    for src in sources {
        for (wi, wf) in src.workflows.iter().enumerate() {
            let mut check = Check {
                src,
                wi,
                kinds,
                all: &all,
                errors: &mut errors,
                part: "steps",
            };
            check.workflow(wf);
        }
    }
    start_cycles(sources, &first_seen, &all, &mut errors);

    if errors.is_empty() {
        Ok(map)
    } else {
        Err(DefinitionErrors::in_source_order(errors))
    }
}

/// `[a-z0-9_-]+`: ids appear in URLs, CLI arguments and templates (`steps.<id>`).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

struct Check<'a, 'e> {
    src: &'a ParsedSource,
    wi: usize,
    kinds: &'a StepKinds,
    all: &'a HashMap<&'a str, &'a Workflow>,
    errors: &'e mut Vec<DefinitionError>,
    /// The list of steps being checked: `steps` or `on_failure`.
    part: &'static str,
}

impl Check<'_, '_> {
    /// Each webhook trigger: a path that can be served, an authentication that holds.
    fn triggers(&mut self, wf: &Workflow) {
        for (i, trigger) in wf.triggers.iter().enumerate() {
            let WorkflowTrigger::Webhook(hook) = trigger;
            let at = |key| {
                [
                    Seg::Key("triggers"),
                    Seg::Index(i),
                    Seg::Key("webhook"),
                    Seg::Key(key),
                ]
            };
            if !valid_hook_path(&hook.path) {
                self.err(
                    &at("path"),
                    false,
                    format!(
                        "webhook path `{}`: use `[a-z0-9_-]` segments separated by `/`, such as \
                         stripe/payments",
                        hook.path
                    ),
                );
            }
            match (hook.auth, &hook.secret) {
                (HookAuth::HmacSha256 | HookAuth::Stripe, None) => self.err(
                    &at("auth"),
                    false,
                    "this auth checks a signature: name the secret that signs deliveries in \
                     `secret`"
                        .to_owned(),
                ),
                (HookAuth::Bearer | HookAuth::None, Some(_)) => self.err(
                    &at("secret"),
                    true,
                    "`secret` is for `auth: hmac-sha256` or `auth: stripe`".to_owned(),
                ),
                _ => {}
            }
            if let Respond::Wait(limit) = hook.respond
                && !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&limit.0)
            {
                self.err(
                    &at("respond"),
                    false,
                    "a webhook waits 1s to 60s for its run; a longer run answers 202 {run_id}, \
                     and its caller reads the run"
                        .to_owned(),
                );
            }
            if hook.auth == HookAuth::None && !hook.public {
                self.err(
                    &at("auth"),
                    false,
                    "`auth: none` lets anyone start runs: say so with `public: true`, or choose \
                     hmac-sha256, stripe or bearer"
                        .to_owned(),
                );
            }
            if let Some(key) = &hook.dedupe_key {
                for msg in template_problems(
                    key,
                    &Scope {
                        steps: None,
                        item: false,
                    },
                ) {
                    self.err(&at("dedupe_key"), false, msg);
                }
            }
        }
    }

    fn err(&mut self, path: &[Seg<'_>], key: bool, message: String) {
        let at = self.src.at(self.wi, path, key);
        self.errors.push(make_error(&self.src.origin, at, message));
    }

    /// Step `i`'s `with` against what its kind takes, each problem at its key or value.
    fn with_fits_kind(&mut self, i: usize, step: &Step) {
        for problem in self.kinds.check(&step.kind, &step.with) {
            let mut path = vec![Seg::Key(self.part), Seg::Index(i), Seg::Key("with")];
            path.extend(problem.path.iter().map(|part| match part {
                PathPart::Key(key) => Seg::Key(key),
                PathPart::Index(index) => Seg::Index(*index),
            }));
            self.err(&path, problem.at_key, problem.message);
        }
    }

    fn workflow(&mut self, wf: &Workflow) {
        if !wf.id.is_empty() && !valid_id(&wf.id) {
            let at = self.src.workflow_at(self.wi);
            self.errors.push(self.src.error(
                at,
                format!(
                    "invalid workflow id `{}`: use lowercase letters, digits, `_` and `-`",
                    wf.id
                ),
            ));
        }
        if let Some(schedule) = &wf.schedule {
            if let Err(e) = parse_cron(&schedule.cron) {
                self.err(
                    &[Seg::Key("schedule"), Seg::Key("cron")],
                    false,
                    format!(
                        "invalid cron expression `{}`: {}",
                        schedule.cron,
                        cron_problem(&schedule.cron, &e)
                    ),
                );
            }
            if jiff::tz::TimeZone::get(&schedule.timezone).is_err() {
                self.err(
                    &[Seg::Key("schedule"), Seg::Key("timezone")],
                    false,
                    format!(
                        "unknown time zone `{}` (expected an IANA name such as `Europe/Paris`)",
                        schedule.timezone
                    ),
                );
            }
        }
        if wf.timeout.is_some_and(|t| t.0.is_zero()) {
            self.err(
                &[Seg::Key("timeout")],
                false,
                "timeout must be longer than 0s".to_owned(),
            );
        }
        if !PRIORITIES.contains(&wf.priority) {
            self.err(
                &[Seg::Key("priority")],
                false,
                format!("priority {} is out of range: -100 to 100", wf.priority),
            );
        }
        if wf.retention.is_some_and(|t| t.0.is_zero()) {
            self.err(
                &[Seg::Key("retention")],
                false,
                "retention must be longer than 0s".to_owned(),
            );
        }
        if let Some(retry) = &wf.retry {
            let key = self.src.spelling(self.wi, &[], &["retry", "retryPolicy"]);
            self.retry(&[Seg::Key(key)], retry);
        }
        if let Some(c) = &wf.concurrency {
            if c.limit == 0 {
                self.err(
                    &[Seg::Key("concurrency"), Seg::Key("limit")],
                    false,
                    "concurrency limit must be at least 1".to_owned(),
                );
            }
            if let Some(key) = &c.key {
                let path = [Seg::Key("concurrency"), Seg::Key("key")];
                for msg in template_problems(
                    key,
                    &Scope {
                        steps: None,
                        item: false,
                    },
                ) {
                    self.err(&path, false, msg);
                }
            }
        }
        if let Some(schema) = &wf.input_schema
            && let Err(problem) = InputSchema::compile(schema)
        {
            let key = self
                .src
                .spelling(self.wi, &[], &["input_schema", "inputSchema"]);
            self.err(
                &[Seg::Key(key)],
                false,
                format!("input_schema is not a usable JSON Schema (draft 2020-12): {problem}"),
            );
        }
        if let Some(url) = wf
            .notifications
            .as_ref()
            .and_then(|n| n.webhook_url.as_deref())
        {
            let problem = if !(url.starts_with('/')
                || url.starts_with("https://")
                || url.starts_with("http://"))
            {
                Some(format!(
                    "webhook_url `{url}` must be an http(s) URL or a path starting with `/`"
                ))
            } else if url.starts_with('/') && !wf.steps.iter().any(|s| s.kind == "n8n") {
                Some(format!(
                    "webhook_url `{url}` is a path: where n8n calls back a workflow that runs in \
                     n8n; to be notified when a run ends, give an http(s) URL"
                ))
            } else {
                None
            };
            if let Some(message) = problem {
                let key = self.src.spelling(
                    self.wi,
                    &[Seg::Key("notifications")],
                    &["webhook_url", "webhookUrl"],
                );
                self.err(&[Seg::Key("notifications"), Seg::Key(key)], false, message);
            }
        }
        self.triggers(wf);
        let mut signals = HashMap::new();
        self.part = "steps";
        self.steps(wf, &wf.steps, &mut signals);
        self.part = if self
            .src
            .spelling(self.wi, &[], &["on_failure", "onFailure"])
            == "onFailure"
        {
            "onFailure"
        } else {
            "on_failure"
        };
        self.steps(wf, &wf.on_failure, &mut signals);
        self.part = "steps";
    }

    fn retry(&mut self, path: &[Seg<'_>], retry: &super::model::RetryPolicy) {
        if retry.initial > retry.max {
            let mut p = path.to_vec();
            p.push(Seg::Key("initial"));
            self.err(
                &p,
                false,
                format!(
                    "retry initial delay {} is longer than its max {}",
                    humantime::format_duration(retry.initial.0),
                    humantime::format_duration(retry.max.0)
                ),
            );
        }
    }

    /// One list of steps (`self.part`): ids, kinds, `needs` (within the list) and templates.
    fn steps<'w>(
        &mut self,
        wf: &Workflow,
        steps: &'w [Step],
        signals: &mut HashMap<&'w str, &'w str>,
    ) {
        let handlers = self.part != "steps";
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            let id_path = [Seg::Key(self.part), Seg::Index(i), Seg::Key("id")];
            if !valid_id(&step.id) {
                self.err(
                    &id_path,
                    false,
                    format!(
                        "invalid step id `{}`: use lowercase letters, digits, `_` and `-`",
                        step.id
                    ),
                );
            }
            if index.contains_key(step.id.as_str()) {
                self.err(&id_path, false, format!("duplicate step id `{}`", step.id));
            } else if handlers && wf.steps.iter().any(|s| s.id == step.id) {
                self.err(
                    &id_path,
                    false,
                    format!("duplicate step id `{}`: `steps` has it too", step.id),
                );
            } else {
                index.insert(&step.id, i);
            }
            if !self.kinds.contains(&step.kind) {
                self.err(
                    &[Seg::Key(self.part), Seg::Index(i), Seg::Key("type")],
                    false,
                    format!(
                        "unknown step type `{}` (known: {})",
                        step.kind,
                        self.kinds.names().join(", ")
                    ),
                );
            }
            self.with_fits_kind(i, step);
            if step.timeout.is_some_and(|t| t.0.is_zero()) {
                self.err(
                    &[Seg::Key(self.part), Seg::Index(i), Seg::Key("timeout")],
                    false,
                    "timeout must be longer than 0s".to_owned(),
                );
            }
            if let Some(retry) = &step.retry {
                let step_path = [Seg::Key(self.part), Seg::Index(i)];
                let key = self
                    .src
                    .spelling(self.wi, &step_path, &["retry", "retryPolicy"]);
                self.retry(&[Seg::Key(self.part), Seg::Index(i), Seg::Key(key)], retry);
            }
        }

        // needs -> edges (dependent -> dependency), by step index.
        let mut edges: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
        for (i, step) in steps.iter().enumerate() {
            for (j, need) in step.needs.iter().enumerate() {
                match index.get(need.as_str()) {
                    Some(&t) => edges[i].push(t),
                    None => self.err(
                        &[
                            Seg::Key(self.part),
                            Seg::Index(i),
                            Seg::Key("needs"),
                            Seg::Index(j),
                        ],
                        false,
                        if handlers && wf.steps.iter().any(|s| s.id == *need) {
                            format!(
                                "step `{}` needs `{need}`, one of `steps`: a step of `{}` \
                                 needs only others of `{}`",
                                step.id, self.part, self.part
                            )
                        } else {
                            format!("step `{}` needs unknown step `{need}`", step.id)
                        },
                    ),
                }
            }
        }
        for cycle in cycles(&edges) {
            let names: Vec<&str> = cycle.iter().map(|&i| steps[i].id.as_str()).collect();
            let (first, next) = (cycle[0], cycle[1]);
            let j = steps[first]
                .needs
                .iter()
                .position(|n| *n == steps[next].id)
                .unwrap_or(0);
            self.err(
                &[
                    Seg::Key(self.part),
                    Seg::Index(first),
                    Seg::Key("needs"),
                    Seg::Index(j),
                ],
                false,
                format!("cycle in `needs`: {}", names.join(" -> ")),
            );
        }

        let mut upstream_cache: HashMap<usize, HashSet<usize>> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            if step.kind == WORKFLOW_KIND {
                self.child_workflows(i, step);
            }
            if step.kind == WAIT_KIND {
                self.wait(i, step, signals);
            }
            self.loops(i, step);
            self.quota(i, step);
            if !step.run_if.is_default() && step.needs.is_empty() {
                let key = self.src.spelling(
                    self.wi,
                    &[Seg::Key(self.part), Seg::Index(i)],
                    &["run_if", "runIf"],
                );
                self.err(
                    &[Seg::Key(self.part), Seg::Index(i), Seg::Key(key)],
                    false,
                    format!(
                        "run_if {} says what the steps a step needs must have come to; `{}` \
                         needs none",
                        step.run_if, step.id
                    ),
                );
            }
            // `item` and `index` are the item a `for_each` step runs for: its `with` sees them,
            // its `when` and `for_each` (rendered before any item exists) do not. A `workflow`
            // step's `with.for_each` hands each child `input.item` instead.
            let mut strings = Vec::new();
            let literal = self.kinds.literal_fields(&step.kind);
            match &step.with {
                Value::Object(fields) => {
                    for (key, value) in fields.iter().filter(|(k, _)| !literal.contains(k)) {
                        let mut path = vec![Seg::Key("with"), Seg::Key(key)];
                        collect_templates(value, &mut path, &mut strings);
                    }
                }
                whole => collect_templates(whole, &mut vec![Seg::Key("with")], &mut strings),
            }
            let looped = strings.len();
            if let Some(when) = &step.when {
                strings.push((vec![Seg::Key("when")], when.as_str()));
            }
            if let Some(for_each) = &step.for_each {
                let key = self.src.spelling(
                    self.wi,
                    &[Seg::Key(self.part), Seg::Index(i)],
                    &["for_each", "forEach"],
                );
                strings.push((vec![Seg::Key(key)], for_each.as_str()));
            }
            for (n, (path, text)) in strings.into_iter().enumerate() {
                let item = step.for_each.is_some() && n < looped;
                let upstream = upstream_cache
                    .entry(i)
                    .or_insert_with(|| ancestors(&edges, i));
                let scope = Scope {
                    steps: Some(StepScope {
                        me: &step.id,
                        index: &index,
                        upstream,
                    }),
                    item,
                };
                let problems = template_problems(text, &scope);
                if problems.is_empty() {
                    continue;
                }
                let mut full = vec![Seg::Key(self.part), Seg::Index(i)];
                full.extend(path);
                for msg in problems {
                    self.err(&full, false, msg);
                }
            }
        }
    }

    /// `quota`: a bucket's name, and its limit and period together or not at all.
    fn quota(&mut self, i: usize, step: &Step) {
        let Some(quota) = &step.quota else { return };
        let at = |key| {
            [
                Seg::Key(self.part),
                Seg::Index(i),
                Seg::Key("quota"),
                Seg::Key(key),
            ]
        };
        let name_ok = !quota.name.is_empty()
            && quota
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            self.err(
                &at("name"),
                false,
                format!("quota name {:?} is not [a-z0-9_-]+", quota.name),
            );
        }
        match (quota.limit, &quota.per) {
            (Some(0), _) => self.err(&at("limit"), false, "a quota's limit is at least 1".into()),
            (Some(_), None) => self.err(
                &at("limit"),
                false,
                "a quota with a limit needs `per`, such as 1m".into(),
            ),
            (None, Some(_)) => {
                self.err(&at("per"), false, "a quota with `per` needs a limit".into())
            }
            (_, Some(per)) if per.0.is_zero() => self.err(
                &at("per"),
                false,
                "a quota's period is longer than 0".into(),
            ),
            _ => {}
        }
    }

    /// `for_each` and `parallel`: a loop on a step kind that can run once per item.
    fn loops(&mut self, i: usize, step: &Step) {
        let at = |key| [Seg::Key(self.part), Seg::Index(i), Seg::Key(key)];
        if step.parallel.is_some() && step.for_each.is_none() {
            self.err(
                &at("parallel"),
                false,
                "parallel limits the items of a for_each; this step has none".to_owned(),
            );
        }
        if step
            .parallel
            .is_some_and(|p| p == 0 || p as usize > MAX_ITEMS)
        {
            self.err(
                &at("parallel"),
                false,
                format!("parallel must be from 1 to {MAX_ITEMS}"),
            );
        }
        if step.for_each.is_none() {
            return;
        }
        if step.kind == WAIT_KIND {
            self.err(
                &at("type"),
                false,
                "a wait step cannot loop: its signal names one step".to_owned(),
            );
        }
    }

    /// `with.signal`: a literal name, one step per name (a signal finds its step by name). That
    /// it is there, and `timeout` a duration, is what the kind's `with` schema says.
    fn wait<'w>(&mut self, i: usize, step: &'w Step, signals: &mut HashMap<&'w str, &'w str>) {
        let signal_path = [
            Seg::Key(self.part),
            Seg::Index(i),
            Seg::Key("with"),
            Seg::Key("signal"),
        ];
        match step.with.get("signal").and_then(Value::as_str) {
            None => {}
            Some(name) if !valid_id(name) => self.err(
                &signal_path,
                false,
                format!(
                    "invalid signal name `{name}`: use lowercase letters, digits, `_` and `-` \
                     (no template: a signal finds its step by name)"
                ),
            ),
            Some(name) => {
                if let Some(other) = signals.insert(name, &step.id) {
                    self.err(
                        &signal_path,
                        false,
                        format!("step `{other}` waits for signal `{name}` already"),
                    );
                }
            }
        }
    }

    /// `with.workflows: [ids]` or `with.workflow: id` (optionally with `for_each`).
    fn child_workflows(&mut self, i: usize, step: &Step) {
        let base = [Seg::Key(self.part), Seg::Index(i), Seg::Key("with")];
        let Some(with) = step.with.as_object() else {
            self.err(&base, false, "a `workflow` step needs `with: { workflows: [ids] }` or `with: { workflow: id, for_each: ... }`".to_owned());
            return;
        };
        match (with.get("workflows"), with.get("workflow")) {
            (Some(_), Some(_)) => {
                self.err(
                    &base,
                    false,
                    "give either `workflows` or `workflow`, not both".to_owned(),
                );
            }
            (None, None) => {
                self.err(&base, false, "a `workflow` step needs `with.workflows` (a list of ids) or `with.workflow` (one id)".to_owned());
            }
            (Some(list), None) => {
                if with.contains_key("for_each") {
                    self.err(
                        &[base[0], base[1], base[2], Seg::Key("for_each")],
                        true,
                        "`for_each` goes with `workflow` (one id), not `workflows`".to_owned(),
                    );
                }
                match list.as_array() {
                    Some(ids) if !ids.is_empty() => {
                        for (j, id) in ids.iter().enumerate() {
                            let path = [
                                base[0],
                                base[1],
                                base[2],
                                Seg::Key("workflows"),
                                Seg::Index(j),
                            ];
                            self.child_id(&path, id);
                        }
                    }
                    _ => self.err(
                        &[base[0], base[1], base[2], Seg::Key("workflows")],
                        false,
                        "`workflows` must be a non-empty list of workflow ids".to_owned(),
                    ),
                }
            }
            (None, Some(id)) => {
                self.child_id(&[base[0], base[1], base[2], Seg::Key("workflow")], id);
            }
        }
    }

    fn child_id(&mut self, path: &[Seg<'_>], id: &Value) {
        match id.as_str() {
            Some(id) if self.all.contains_key(id) => {}
            Some(id) => self.err(path, false, format!("unknown workflow `{id}`")),
            None => self.err(path, false, "a workflow id must be a string".to_owned()),
        }
    }
}

pub(crate) fn parse_cron(expr: &str) -> Result<croner::Cron, croner::errors::CronError> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
}

/// What is wrong with a cron expression croner refused, in words: the field count, or the first
/// field that croner refuses on its own (the others made `*`) with the values that field takes.
fn cron_problem(expr: &str, error: &croner::errors::CronError) -> String {
    const FIVE: [(&str, &str); 5] = [
        ("minute", "0-59"),
        ("hour", "0-23"),
        ("day-of-month", "1-31"),
        ("month", "1-12 or JAN-DEC"),
        ("day-of-week", "0-7 or SUN-SAT, 0 and 7 both Sunday"),
    ];
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let names: Vec<(&str, &str)> = match fields.len() {
        5 => FIVE.to_vec(),
        6 => std::iter::once(("second", "0-59")).chain(FIVE).collect(),
        n => {
            return format!(
                "it has {n} fields; a cron expression has 5 (minute hour day-of-month month \
                 day-of-week), or 6 with seconds first"
            );
        }
    };
    for (i, (name, takes)) in names.iter().enumerate() {
        let alone: Vec<&str> = (0..fields.len())
            .map(|j| if j == i { fields[j] } else { "*" })
            .collect();
        if parse_cron(&alone.join(" ")).is_err() {
            return format!(
                "the {name} field `{}` is not valid (it takes {takes})",
                fields[i]
            );
        }
    }
    error.to_string()
}

/// Every string in `value` that holds a template, with its path.
fn collect_templates<'a>(
    value: &'a Value,
    path: &mut Vec<Seg<'a>>,
    out: &mut Vec<(Vec<Seg<'a>>, &'a str)>,
) {
    match value {
        Value::String(s) if is_template(s) => out.push((path.clone(), s)),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                collect_templates(v, path, out);
                path.pop();
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                path.push(Seg::Key(k));
                collect_templates(v, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

struct StepScope<'a> {
    me: &'a str,
    index: &'a HashMap<&'a str, usize>,
    upstream: &'a HashSet<usize>,
}

/// What a template may reference: steps upstream of its step (None: no steps at all, e.g. the
/// concurrency key, rendered before any step runs), and `item` and `index` in the `with` of a step
/// with `for_each`.
struct Scope<'a> {
    steps: Option<StepScope<'a>>,
    item: bool,
}

/// Syntax errors and references to variables or steps the template cannot see.
fn template_problems(text: &str, scope: &Scope<'_>) -> Vec<String> {
    let tmpl = match ENV.template_from_str(text) {
        Ok(t) => t,
        Err(e) => return vec![format!("invalid template: {e}")],
    };
    let mut vars: Vec<String> = tmpl.undeclared_variables(true).into_iter().collect();
    vars.sort();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for var in &vars {
        let mut parts = var.split('.');
        let root = parts.next().unwrap_or_default();
        if TEMPLATE_GLOBALS.contains(&root) || (scope.item && (root == "item" || root == "index")) {
            continue;
        }
        if !TEMPLATE_ROOTS.contains(&root) {
            if seen.insert(root.to_owned()) {
                problems.push(format!(
                    "template uses unknown variable `{root}` (templates see {})",
                    TEMPLATE_ROOTS.join(", ")
                ));
            }
            continue;
        }
        if root != "steps" {
            continue;
        }
        // `steps` alone (or `steps[expr]`) cannot be checked statically.
        let Some(id) = parts.next() else { continue };
        // One report per step (and per bad attribute), however often the template uses it.
        let attr = parts.next().filter(|a| *a != "output");
        let first_use = seen.insert(format!("steps.{id}"));
        let Some(steps) = &scope.steps else {
            if first_use {
                problems.push(format!(
                    "`steps.{id}` is not available here: no step has run yet"
                ));
            }
            continue;
        };
        match steps.index.get(id) {
            None if first_use => problems.push(format!("template references unknown step `{id}`")),
            Some(i) if first_use && !steps.upstream.contains(i) => problems.push(format!(
                "template references step `{id}`, which is not upstream of `{}`: add it to `needs`",
                steps.me
            )),
            Some(_) => {
                if let Some(attr) = attr
                    && seen.insert(format!("steps.{id}.{attr}"))
                {
                    problems.push(format!(
                        "`steps.{id}.{attr}` does not exist: a step's result is `steps.{id}.output`"
                    ));
                }
            }
            None => {}
        }
    }
    problems
}

/// Steps reachable from `start` through `needs` (excluding `start` unless on a cycle).
fn ancestors(edges: &[Vec<usize>], start: usize) -> HashSet<usize> {
    let mut seen = HashSet::new();
    let mut stack: Vec<usize> = edges[start].clone();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(edges[n].iter().copied());
        }
    }
    seen
}

/// One cycle per strongly connected component that has one, each as a path `a, b, ..., a`
/// starting at the component's first node and following each node's first edge inside it, so
/// the report is deterministic.
fn cycles(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for comp in tarjan(edges) {
        let members: HashSet<usize> = comp.iter().copied().collect();
        let Some(&start) = comp.iter().min() else {
            continue;
        };
        let self_loop = edges[start].contains(&start);
        if comp.len() == 1 && !self_loop {
            continue;
        }
        let mut path = vec![start];
        let mut cur = start;
        // Inside a component every node has an edge inside it, so this ends on a repeat.
        while let Some(&next) = edges[cur].iter().find(|n| members.contains(n)) {
            if let Some(p) = path.iter().position(|&n| n == next) {
                let mut cycle = path.split_off(p);
                cycle.push(next);
                out.push(cycle);
                break;
            }
            path.push(next);
            cur = next;
        }
    }
    out.sort();
    out
}

/// Strongly connected components (iterative Tarjan: definitions come from users, so no
/// recursion whose depth they control).
fn tarjan(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = edges.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut comps = Vec::new();
    let mut next = 0;
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut work: Vec<(usize, usize)> = vec![(root, 0)];
        while let Some(&mut (v, ref mut ei)) = work.last_mut() {
            if *ei == 0 && index[v] == usize::MAX {
                index[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on_stack[v] = true;
            }
            if let Some(&w) = edges[v].get(*ei) {
                *ei += 1;
                if index[w] == usize::MAX {
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut comp = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                comps.push(comp);
            }
        }
    }
    comps
}

/// The workflows a `type: workflow` step starts.
fn children(step: &Step) -> Vec<&str> {
    if step.kind != WORKFLOW_KIND {
        return Vec::new();
    }
    if let Some(ids) = step.with.get("workflows").and_then(Value::as_array) {
        return ids.iter().filter_map(Value::as_str).collect();
    }
    step.with
        .get("workflow")
        .and_then(Value::as_str)
        .into_iter()
        .collect()
}

/// No workflow may start itself, directly or through children: the run would never finish.
fn start_cycles(
    sources: &[ParsedSource],
    first_seen: &HashMap<&str, (usize, usize)>,
    all: &HashMap<&str, &Workflow>,
    errors: &mut Vec<DefinitionError>,
) {
    let mut ids: Vec<&str> = all.keys().copied().collect();
    ids.sort_unstable();
    let pos: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let edges: Vec<Vec<usize>> = ids
        .iter()
        .map(|id| {
            all[id]
                .steps
                .iter()
                .flat_map(children)
                .filter_map(|c| pos.get(c).copied())
                .collect()
        })
        .collect();
    for cycle in cycles(&edges) {
        // Report at a source workflow on the cycle (cycles purely among already-stored workflows
        // were reported when those were loaded).
        let Some(k) = cycle[..cycle.len() - 1]
            .iter()
            .position(|&w| first_seen.contains_key(ids[w]))
        else {
            continue;
        };
        let (from, to) = (ids[cycle[k]], ids[cycle[k + 1]]);
        let names: Vec<&str> = cycle[k..cycle.len() - 1]
            .iter()
            .chain(&cycle[..=k])
            .map(|&w| ids[w])
            .collect();
        let (si, wi) = first_seen[from];
        let src = &sources[si];
        let wf = &src.workflows[wi];
        let mut path_buf: Vec<Seg<'_>> = Vec::new();
        for (i, step) in wf.steps.iter().enumerate() {
            if let Some(j) = children(step).iter().position(|c| *c == to) {
                path_buf = vec![Seg::Key("steps"), Seg::Index(i), Seg::Key("with")];
                if step.with.get("workflows").is_some() {
                    path_buf.extend([Seg::Key("workflows"), Seg::Index(j)]);
                } else {
                    path_buf.push(Seg::Key("workflow"));
                }
                break;
            }
        }
        errors.push(src.error(
            src.at(wi, &path_buf, false),
            format!("workflow `{from}` starts itself: {}", names.join(" -> ")),
        ));
    }
}

/// A webhook path: `[a-z0-9_-]` segments separated by `/`, at most 200 bytes.
pub fn valid_hook_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 200
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        })
}
