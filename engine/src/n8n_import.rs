//! `switchyard import-n8n`: an n8n workflow export becomes a definition, with a report of what
//! was converted and what was not. Nodes with a Switchyard counterpart become it (Schedule
//! Trigger → `schedule`, Webhook → a webhook trigger, HTTP Request → `http`, Set → `transform`,
//! IF/Switch → `when` on the steps behind them, Execute Workflow → `workflow`, Wait → `sleep` or
//! `wait`); any other node stays in n8n, called through an `n8n` step. n8n expressions are
//! translated where the mapping is plain (`$json.x`, `$('Node').item.json.x`,
//! `$node["Node"].json.x`, `$execution.id`) and reported where not.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error(
        "not an n8n workflow export: it has no `nodes` list (export one from n8n's editor, \
         ... → Download, or with `n8n export:workflow`)"
    )]
    NotAnExport,
    #[error("node {0}: {1}")]
    BadNode(String, String),
    #[error("writing the definition: {0}")]
    Yaml(String),
}

/// What the import made, and what it could not.
#[derive(Debug)]
pub struct Imported {
    pub id: String,
    /// The definition, as YAML.
    pub yaml: String,
    pub report: Vec<Note>,
    /// Workflows its `workflow` steps start, to import as well.
    pub children: Vec<String>,
}

/// One line of the report: a node, and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub node: String,
    pub outcome: Outcome,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Outcome {
    Converted,
    /// Converted, but something needs a person: a credential, an expression left as written.
    Check,
    /// Called in n8n through an `n8n` step.
    #[strum(serialize = "stays in n8n")]
    StaysInN8n,
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[derive(Serialize)]
struct Definition {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schedule: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    triggers: Vec<Value>,
    steps: Vec<StepOut>,
}

#[derive(Serialize)]
struct StepOut {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    needs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    when: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_if: Option<&'static str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    continue_on_error: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry: Option<Value>,
    with: Value,
}

const N8N: &str = "n8n-nodes-base.";

/// A node of the export, with where its items come from.
struct Node<'a> {
    name: &'a str,
    kind: &'a str,
    value: &'a Value,
    /// (source node, the source's output index).
    inputs: Vec<(&'a str, usize)>,
}

impl Node<'_> {
    fn param(&self, key: &str) -> &Value {
        &self.value["parameters"][key]
    }
}

/// What `$json` means in a node, and the condition it runs under.
#[derive(Clone, Default)]
struct Upstream {
    /// Template path of the items the node gets (`input`, `steps.fetch.output.body`).
    path: Option<String>,
    needs: BTreeSet<String>,
    conditions: Vec<String>,
    /// Branches of an IF or Switch meet here again: it runs once none of its needs failed.
    joins: bool,
}

struct Importer<'a> {
    nodes: BTreeMap<&'a str, Node<'a>>,
    /// Step id of each converted node, and the template path of its output's items.
    steps: HashMap<&'a str, (String, String)>,
    trigger_path: HashMap<&'a str, String>,
    /// Nodes whose steps may be skipped: with a `when`, or after one that may be.
    conditional: BTreeSet<&'a str>,
    report: Vec<Note>,
}

/// Converts `export` (an n8n workflow export) into a definition and a report.
pub fn import(export: &str) -> Result<Imported, ImportError> {
    let doc: Value =
        serde_json::from_str(export).map_err(|e| ImportError::NotJson(e.to_string()))?;
    let Some(node_list) = doc["nodes"].as_array() else {
        return Err(ImportError::NotAnExport);
    };
    let mut nodes: BTreeMap<&str, Node> = BTreeMap::new();
    for value in node_list {
        let (Some(name), Some(kind)) = (value["name"].as_str(), value["type"].as_str()) else {
            return Err(ImportError::NotAnExport);
        };
        nodes.insert(
            name,
            Node {
                name,
                kind,
                value,
                inputs: Vec::new(),
            },
        );
    }
    if let Some(connections) = doc["connections"].as_object() {
        for (source, outputs) in connections {
            let Some(outputs) = outputs["main"].as_array() else {
                continue;
            };
            for (index, targets) in outputs.iter().enumerate() {
                for target in targets.as_array().into_iter().flatten() {
                    let Some(name) = target["node"].as_str() else {
                        continue;
                    };
                    let source = nodes
                        .get_key_value(source.as_str())
                        .map(|(k, _)| *k)
                        .ok_or_else(|| {
                            ImportError::BadNode(source.clone(), "connected but not a node".into())
                        })?;
                    if let Some(node) = nodes.get_mut(name) {
                        node.inputs.push((source, index));
                    }
                }
            }
        }
    }
    let name = doc["name"].as_str().unwrap_or("imported").to_owned();
    let mut importer = Importer {
        nodes,
        steps: HashMap::new(),
        trigger_path: HashMap::new(),
        conditional: BTreeSet::new(),
        report: Vec::new(),
    };
    let mut definition = Definition {
        id: slug(&name),
        name: Some(name),
        schedule: None,
        timeout: doc["settings"]["executionTimeout"]
            .as_i64()
            .filter(|s| *s > 0)
            .map(|s| format!("{s}s")),
        triggers: Vec::new(),
        steps: Vec::new(),
    };
    importer.triggers(&doc, &mut definition);
    for name in importer.order() {
        if let Some(step) = importer.step(name)? {
            definition.steps.push(step);
        }
    }
    if definition.steps.is_empty() {
        definition.steps.push(StepOut {
            id: "start".into(),
            kind: "noop".into(),
            needs: Vec::new(),
            when: None,
            run_if: None,
            continue_on_error: false,
            retry: None,
            with: Value::Null,
        });
    }
    let yaml =
        serde_saphyr::to_string(&definition).map_err(|e| ImportError::Yaml(e.to_string()))?;
    let children = definition
        .steps
        .iter()
        .filter(|s| s.kind == "workflow")
        .filter_map(|s| s.with["workflows"][0].as_str().map(str::to_owned))
        .collect();
    Ok(Imported {
        id: definition.id,
        yaml,
        report: importer.report,
        children,
    })
}

/// A workflow or step id from an n8n name: `[a-z0-9_-]`.
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        match c {
            'a'..='z' | '0'..='9' | '-' => out.push(c),
            'A'..='Z' => out.push(c.to_ascii_lowercase()),
            _ if !out.ends_with('_') => out.push('_'),
            _ => {}
        }
    }
    let out = out.trim_matches('_').to_owned();
    if out.is_empty() { "node".into() } else { out }
}

fn is_trigger(kind: &str) -> bool {
    kind.ends_with("Trigger") || kind == "n8n-nodes-base.webhook"
}

impl<'a> Importer<'a> {
    fn note(&mut self, node: &str, outcome: Outcome, detail: impl Into<String>) {
        self.report.push(Note {
            node: node.to_owned(),
            outcome,
            detail: detail.into(),
        });
    }

    /// Schedule and Webhook triggers; other trigger nodes are skipped.
    fn triggers(&mut self, doc: &Value, definition: &mut Definition) {
        let triggers: Vec<&Node> = self.nodes.values().filter(|n| is_trigger(n.kind)).collect();
        let mut notes = Vec::new();
        let mut paths = Vec::new();
        for node in triggers {
            if node.value["disabled"] == true {
                notes.push((node.name, Outcome::Skipped, "disabled in n8n".to_owned()));
                continue;
            }
            match node.kind.strip_prefix(N8N) {
                Some("scheduleTrigger") if definition.schedule.is_none() => {
                    let zone = doc["settings"]["timezone"].as_str();
                    match schedule(node.param("rule")) {
                        Ok((cron, more)) => {
                            definition.schedule = Some(json!({
                                "cron": cron,
                                // n8n's own default, where the export names none.
                                "timezone": zone.unwrap_or("America/New_York"),
                            }));
                            let mut detail = format!("schedule `{cron}`");
                            if zone.is_none() {
                                detail.push_str(" in America/New_York, n8n's default zone");
                            }
                            if more {
                                detail.push_str(
                                    "; only its first rule: a definition has one schedule",
                                );
                            }
                            let outcome = if more {
                                Outcome::Check
                            } else {
                                Outcome::Converted
                            };
                            notes.push((node.name, outcome, detail));
                        }
                        Err(why) => notes.push((node.name, Outcome::Skipped, why)),
                    }
                    paths.push((node.name, "input".to_owned()));
                }
                Some("webhook") => {
                    let path = node.param("path").as_str().unwrap_or(node.name);
                    let path = path.split('/').map(slug).collect::<Vec<_>>().join("/");
                    let mut hook = json!({ "path": path });
                    let (auth, mut detail) = match node.param("authentication").as_str() {
                        None | Some("none") => (
                            "none",
                            "anyone may call it, as in n8n: consider `auth: hmac-sha256`"
                                .to_owned(),
                        ),
                        Some(other) => (
                            "bearer",
                            format!("n8n's {other}: callers now send a webhook key or a token"),
                        ),
                    };
                    hook["auth"] = auth.into();
                    if auth == "none" {
                        hook["public"] = true.into();
                    }
                    match node.param("responseMode").as_str() {
                        Some("lastNode") => hook["respond"] = json!({ "wait": "30s" }),
                        Some("responseNode") => detail
                            .push_str("; its Respond to Webhook node answers 202 {run_id} now"),
                        _ => {}
                    }
                    if let Some(method) = node.param("httpMethod").as_str()
                        && method != "POST"
                    {
                        detail.push_str(&format!("; it took {method}, a trigger takes POST"));
                    }
                    definition.triggers.push(json!({ "webhook": hook }));
                    notes.push((
                        node.name,
                        Outcome::Check,
                        format!("webhook trigger at /api/hooks/{path}; {detail}"),
                    ));
                    // n8n's `$json` of a webhook is `{headers, params, query, body}`.
                    paths.push((node.name, "input".to_owned()));
                }
                _ => {
                    notes.push((
                        node.name,
                        Outcome::Skipped,
                        format!("{}: a trigger Switchyard does not have", node.kind),
                    ));
                    paths.push((node.name, "input".to_owned()));
                }
            }
        }
        for (node, outcome, detail) in notes {
            self.note(node, outcome, detail);
        }
        for (node, path) in paths {
            self.trigger_path.insert(node, path);
        }
    }

    /// Nodes in an order where each comes after those it takes items from.
    fn order(&self) -> Vec<&'a str> {
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut out = Vec::new();
        let mut left: Vec<&'a str> = self
            .nodes
            .values()
            .filter(|n| !is_trigger(n.kind))
            .map(|n| n.name)
            .collect();
        // Sorted by position in the editor, left to right, for a stable, readable order.
        left.sort_by_key(|name| {
            let p = &self.nodes[name].value["position"];
            (p[0].as_i64().unwrap_or(0), p[1].as_i64().unwrap_or(0))
        });
        while !left.is_empty() {
            let before = left.len();
            left.retain(|name| {
                let ready = self.nodes[name]
                    .inputs
                    .iter()
                    .all(|(from, _)| is_trigger(self.nodes[from].kind) || done.contains(from));
                if ready {
                    done.insert(name);
                    out.push(*name);
                }
                !ready
            });
            if left.len() == before {
                // A loop back in n8n: what is left follows in editor order.
                out.append(&mut left);
            }
        }
        out
    }

    /// Where the items of `node` come from: the steps it needs, `$json`'s path, and the
    /// conditions IF and Switch nodes on the way put on it.
    fn upstream(&self, node: &Node<'a>, depth: usize) -> Upstream {
        let mut up = Upstream::default();
        // Items come from any input: the node runs when one of them carries items.
        let mut per_input: Vec<Vec<String>> = Vec::new();
        for (from, output) in &node.inputs {
            if let Some(path) = self.trigger_path.get(from) {
                up.path = Some(path.clone());
                per_input.push(Vec::new());
                continue;
            }
            let source = &self.nodes[from];
            match source.kind.strip_prefix(N8N) {
                Some("if" | "switch") if depth < 32 => {
                    let mut through = self.upstream(source, depth + 1);
                    if let Some(condition) = self.branch_condition(source, *output, &through) {
                        through.conditions.push(condition);
                    }
                    up.path = up.path.or(through.path);
                    up.needs.extend(through.needs);
                    up.joins |= through.joins;
                    per_input.push(through.conditions);
                }
                _ => {
                    if let Some((step, path)) = self.steps.get(from) {
                        up.needs.insert(step.clone());
                        up.path = Some(path.clone());
                    }
                    per_input.push(Vec::new());
                }
            }
        }
        let conditional_input = node
            .inputs
            .iter()
            .any(|(from, _)| self.conditional.contains(from));
        if per_input.len() > 1 && (conditional_input || per_input.iter().any(|c| !c.is_empty())) {
            // Branches meeting again: some of the steps it needs will have been skipped.
            up.joins = true;
        }
        if per_input.iter().all(|c| !c.is_empty()) {
            let each: Vec<String> = per_input
                .iter()
                .map(|c| {
                    c.iter()
                        .map(|t| format!("({t})"))
                        .collect::<Vec<_>>()
                        .join(" and ")
                })
                .collect();
            up.conditions = if each.len() == 1 {
                per_input.remove(0)
            } else {
                vec![each.join(" or ")]
            };
        }
        up
    }

    /// The condition under which `output` of an IF or Switch node carries items.
    fn branch_condition(&self, node: &Node<'a>, output: usize, up: &Upstream) -> Option<String> {
        let test = |conditions: &Value| conditions_expr(conditions, up, self);
        if node.kind.ends_with(".if") {
            let condition = test(node.param("conditions")).ok()?;
            Some(if output == 0 {
                condition
            } else {
                format!("not ({condition})")
            })
        } else {
            let rules = node.param("rules")["values"].as_array()?;
            test(&rules.get(output)?["conditions"]).ok()
        }
    }

    /// Converts one node, noting what became of it.
    fn step(&mut self, name: &'a str) -> Result<Option<StepOut>, ImportError> {
        let (step, outcome, detail) = self.convert(name);
        self.note(name, outcome, detail);
        Ok(step.map(|converted| {
            let after_conditional = self.nodes[name]
                .inputs
                .iter()
                .any(|(from, _)| self.conditional.contains(from));
            if converted.step.when.is_some() || after_conditional {
                self.conditional.insert(name);
            }
            self.steps
                .insert(name, (converted.step.id.clone(), converted.output_path));
            converted.step
        }))
    }

    fn convert(&self, name: &'a str) -> (Option<Converted>, Outcome, String) {
        let node = &self.nodes[name];
        let kind = node.kind;
        if node.value["disabled"] == true {
            return (None, Outcome::Skipped, "disabled in n8n".into());
        }
        let up = self.upstream(node, 0);
        let mut checks: Vec<String> = Vec::new();
        if let Some(branch) = node
            .kind
            .strip_prefix(N8N)
            .filter(|k| *k == "if" || *k == "switch")
        {
            return match self.conditions_of(node, &up) {
                Ok(()) if branch == "switch" => (
                    None,
                    Outcome::Check,
                    "switch: `when` on the steps behind each output. n8n sends an item to the \
                     first rule that holds, and to its fallback output when none does; here the \
                     steps of each output run when its own rule holds, and a fallback output's \
                     always"
                        .to_owned(),
                ),
                Ok(()) => (
                    None,
                    Outcome::Converted,
                    format!("{branch}: `when` on the steps behind it"),
                ),
                Err(why) => (
                    None,
                    Outcome::Check,
                    format!(
                        "{branch}: its condition was not translated ({why}); the steps behind it run always"
                    ),
                ),
            };
        }
        let mut cautions: Vec<String> = Vec::new();
        for (from, output) in &node.inputs {
            let source = &self.nodes[from];
            if *output > 0 && !matches!(source.kind.strip_prefix(N8N), Some("if" | "switch")) {
                cautions.push(format!(
                    "it takes {from}'s error output, and here runs after {from} succeeds: give \
                     {from} `continue_on_error` and this step `run_if: any_failed`"
                ));
            }
        }
        let id = self.unique_id(name);
        let paths = NodePaths {
            steps: &self.steps,
            triggers: &self.trigger_path,
        };
        let mut translate =
            |text: &Value| -> Value { translate_value(text, &up, &paths, &mut checks) };
        let prev = up.path.clone().unwrap_or_else(|| "input".into());
        let (step_kind, with, output_path, outcome, detail) = match kind.strip_prefix(N8N) {
            Some("httpRequest") => {
                let mut with = Map::new();
                with.insert(
                    "method".into(),
                    node.param("method").as_str().unwrap_or("GET").into(),
                );
                with.insert("url".into(), translate(node.param("url")));
                let pairs = |list: &Value, translate: &mut dyn FnMut(&Value) -> Value| {
                    list["parameters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| {
                            Some((p["name"].as_str()?.to_owned(), translate(&p["value"])))
                        })
                        .collect::<Map<String, Value>>()
                };
                if node.param("sendQuery") == true {
                    with.insert(
                        "query".into(),
                        Value::Object(pairs(node.param("queryParameters"), &mut translate)),
                    );
                }
                if node.param("sendHeaders") == true {
                    with.insert(
                        "headers".into(),
                        Value::Object(pairs(node.param("headerParameters"), &mut translate)),
                    );
                }
                if node.param("sendBody") == true {
                    let body = match node.param("specifyBody").as_str() {
                        Some("json") => {
                            let text = node.param("jsonBody").as_str().unwrap_or_default();
                            // `={ "a": "{{ $json.x }}" }`: JSON whose strings hold expressions.
                            let (expression, json) = match text.strip_prefix('=') {
                                Some(rest) => (true, rest),
                                None => (false, text),
                            };
                            match serde_json::from_str::<Value>(json) {
                                Ok(skeleton) if expression => {
                                    translate_leaves(skeleton, &mut translate)
                                }
                                Ok(literal) => literal,
                                Err(_) => translate(node.param("jsonBody")),
                            }
                        }
                        _ => Value::Object(pairs(node.param("bodyParameters"), &mut translate)),
                    };
                    with.insert("body".into(), body);
                }
                if let Some(ms) = node.param("options")["timeout"].as_i64() {
                    with.insert("timeout".into(), format!("{ms}ms").into());
                }
                let mut detail = "http".to_owned();
                if node.value["credentials"].is_object()
                    || node
                        .param("authentication")
                        .as_str()
                        .is_some_and(|a| a != "none")
                {
                    detail.push_str(": its credential is not carried over; give it `auth` or `headers` with a secret");
                    checks.push("credential".into());
                }
                (
                    "http",
                    Value::Object(with),
                    format!("steps.{id}.output.body"),
                    Outcome::Converted,
                    detail,
                )
            }
            Some("set") => {
                let mut output = Map::new();
                for assignment in node.param("assignments")["assignments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let Some(field) = assignment["name"].as_str() else {
                        continue;
                    };
                    let mut value = translate(&assignment["value"]);
                    if assignment["type"] == "number"
                        && let Some(n) = value.as_str().and_then(|s| s.parse::<f64>().ok())
                    {
                        value = json!(n);
                    }
                    insert_dotted(&mut output, field, value);
                }
                (
                    "transform",
                    json!({ "output": output }),
                    format!("steps.{id}.output"),
                    Outcome::Converted,
                    "transform".to_owned(),
                )
            }
            Some("executeWorkflow") => {
                let target = node.param("workflowId");
                let child = target["cachedResultName"]
                    .as_str()
                    .or_else(|| target.as_str())
                    .or_else(|| target["value"].as_str())
                    .map(|n| {
                        if target["cachedResultName"].is_string() {
                            slug(n)
                        } else {
                            format!("n8n_{}", slug(n))
                        }
                    })
                    .unwrap_or_else(|| "child".into());
                let with = json!({ "workflows": [child], "input": format!("{{{{ {prev} }}}}") });
                let detail = format!(
                    "workflow step starting `{child}`: import that workflow too, as `{child}`"
                );
                (
                    "workflow",
                    with,
                    format!("steps.{id}.output[0]"),
                    Outcome::Check,
                    detail,
                )
            }
            Some("wait") => match node.param("resume").as_str().unwrap_or("timeInterval") {
                "timeInterval" => {
                    let amount = node.param("amount").as_f64().unwrap_or(1.0);
                    let unit = match node.param("unit").as_str().unwrap_or("hours") {
                        "seconds" => "s",
                        "minutes" => "m",
                        "days" => "d",
                        _ => "h",
                    };
                    let duration = format!("{}{unit}", amount.round() as i64);
                    let detail = format!("sleep {duration}");
                    (
                        "sleep",
                        json!({ "duration": duration }),
                        prev.clone(),
                        Outcome::Converted,
                        detail,
                    )
                }
                "webhook" | "form" => {
                    let detail = format!(
                        "wait for the signal `{id}` where n8n waited for its resume URL: \
                         `switchyard signal RUN {id} --payload '{{\"body\": ...}}'` (the payload is \
                         what n8n's $json was)"
                    );
                    (
                        "wait",
                        json!({ "signal": id }),
                        format!("steps.{id}.output"),
                        Outcome::Converted,
                        detail,
                    )
                }
                other => {
                    let detail = format!("a Wait node resuming at {other}: waits 1h; set the time");
                    (
                        "sleep",
                        json!({ "duration": "1h" }),
                        prev.clone(),
                        Outcome::Check,
                        detail,
                    )
                }
            },
            Some("noOp") => (
                "noop",
                Value::Null,
                prev.clone(),
                Outcome::Converted,
                "noop".to_owned(),
            ),
            _ => {
                let hook = format!("{}/{id}", "imported");
                let detail = format!(
                    "{kind}: make an n8n workflow with a Webhook trigger at /webhook/{hook} that does what it did, and answers"
                );
                let with = json!({ "webhook": hook, "input": format!("{{{{ {prev} }}}}") });
                (
                    "n8n",
                    with,
                    format!("steps.{id}.output"),
                    Outcome::StaysInN8n,
                    detail,
                )
            }
        };
        let outcome =
            if outcome == Outcome::Converted && !(checks.is_empty() && cautions.is_empty()) {
                Outcome::Check
            } else {
                outcome
            };
        let mut detail = detail;
        for caution in &cautions {
            detail.push_str("; ");
            detail.push_str(caution);
        }
        let untranslated: Vec<&String> = checks.iter().filter(|c| *c != "credential").collect();
        if !untranslated.is_empty() {
            detail.push_str(&format!(
                "; expressions kept as written (not translated): {}",
                untranslated
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let retry = (node.value["retryOnFail"] == true).then(|| {
            let tries = node.value["maxTries"].as_i64().unwrap_or(3).max(1);
            let wait = node.value["waitBetweenTries"].as_i64().unwrap_or(1000);
            json!({ "max_retries": tries - 1, "backoff": "fixed", "initial": format!("{wait}ms") })
        });
        let step = StepOut {
            id: id.clone(),
            kind: step_kind.into(),
            needs: up.needs.iter().cloned().collect(),
            when: (!up.conditions.is_empty()).then(|| {
                format!(
                    "{{{{ {} }}}}",
                    up.conditions
                        .iter()
                        .map(|c| format!("({c})"))
                        .collect::<Vec<_>>()
                        .join(" and ")
                )
            }),
            run_if: up.joins.then_some("none_failed"),
            continue_on_error: node.value["onError"] == "continueRegularOutput",
            retry,
            with,
        };
        (Some(Converted { step, output_path }), outcome, detail)
    }

    /// Checks that an IF or Switch node's conditions translate, for the report.
    fn conditions_of(&self, node: &Node<'a>, up: &Upstream) -> Result<(), String> {
        if node.kind.ends_with(".if") {
            conditions_expr(node.param("conditions"), up, self).map(|_| ())
        } else {
            let rules = node.param("rules")["values"].as_array().ok_or("no rules")?;
            for rule in rules {
                conditions_expr(&rule["conditions"], up, self)?;
            }
            Ok(())
        }
    }

    fn unique_id(&self, name: &str) -> String {
        let base = slug(name);
        let taken: BTreeSet<&str> = self.steps.values().map(|(id, _)| id.as_str()).collect();
        if !taken.contains(base.as_str()) {
            return base;
        }
        (2..)
            .map(|n| format!("{base}_{n}"))
            .find(|id| !taken.contains(id.as_str()))
            .expect("unbounded")
    }
}

/// A converted node: its step, and where its output's items are.
struct Converted {
    step: StepOut,
    output_path: String,
}

/// Where each named node's items are, for `$('Node')` and `$node["Node"]`.
struct NodePaths<'s, 'a> {
    steps: &'s HashMap<&'a str, (String, String)>,
    triggers: &'s HashMap<&'a str, String>,
}

impl NodePaths<'_, '_> {
    fn of(&self, node: &str) -> Option<String> {
        self.steps
            .get(node)
            .map(|(_, path)| path.clone())
            .or_else(|| self.triggers.get(node).cloned())
    }
}

/// A parameter: `=`-prefixed text is an n8n expression, translated where it can be; anything
/// else is taken as written. What does not translate is kept as text (in a `raw` block, so the
/// definition loads) and named in `checks`.
fn translate_value(
    value: &Value,
    up: &Upstream,
    paths: &NodePaths<'_, '_>,
    checks: &mut Vec<String>,
) -> Value {
    let Some(text) = value.as_str() else {
        return value.clone();
    };
    let Some(expression) = text.strip_prefix('=') else {
        return value.clone();
    };
    match translate_text(expression, up, paths) {
        Ok(template) => Value::String(template),
        Err(_) => {
            checks.push(format!("`{expression}`"));
            Value::String(format!("{{% raw %}}{expression}{{% endraw %}}"))
        }
    }
}

/// `text` with each `{{ ... }}` translated; an error names the first that does not.
fn translate_text(text: &str, up: &Upstream, paths: &NodePaths<'_, '_>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or("an unclosed {{")?;
        out.push_str("{{ ");
        out.push_str(&translate_expr(after[..close].trim(), up, paths)?);
        out.push_str(" }}");
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// One n8n expression as a template expression, where the mapping is plain.
fn translate_expr(expr: &str, up: &Upstream, paths: &NodePaths<'_, '_>) -> Result<String, String> {
    let current = || up.path.clone().unwrap_or_else(|| "input".into());
    let (base, rest) = if let Some(rest) = expr.strip_prefix("$json") {
        (current(), rest)
    } else if let Some(rest) = expr.strip_prefix("$execution.id") {
        ("run.id".to_owned(), rest)
    } else if let Some(rest) = expr
        .strip_prefix("$workflow.name")
        .or_else(|| expr.strip_prefix("$workflow.id"))
    {
        ("run.workflow".to_owned(), rest)
    } else if let Some(after) = expr
        .strip_prefix("$('")
        .or_else(|| expr.strip_prefix("$(\""))
    {
        let end = after.find(['\'', '"']).ok_or("an unclosed node name")?;
        let node = &after[..end];
        let after = &after[end + 1..];
        let after = after.strip_prefix(')').ok_or("not $('Node')")?;
        let after = [".item.json", ".first().json", ".last().json"]
            .iter()
            .find_map(|p| after.strip_prefix(p))
            .ok_or("only .item.json, .first().json and .last().json of a node")?;
        (
            paths.of(node).ok_or(format!("no step for node {node}"))?,
            after,
        )
    } else if let Some(after) = expr
        .strip_prefix("$node[\"")
        .or_else(|| expr.strip_prefix("$node['"))
    {
        let end = after.find(['\'', '"']).ok_or("an unclosed node name")?;
        let node = &after[..end];
        let after = after[end + 1..]
            .strip_prefix("].json")
            .ok_or("only $node[\"Node\"].json")?;
        (
            paths.of(node).ok_or(format!("no step for node {node}"))?,
            after,
        )
    } else {
        return Err(format!("`{expr}`"));
    };
    if !plain_path(rest) {
        return Err(format!("`{expr}`"));
    }
    Ok(format!("{base}{rest}"))
}

/// `.name`, `["name"]`, `['name']` and `[0]` accesses, and nothing else.
fn plain_path(mut rest: &str) -> bool {
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 || after.starts_with(|c: char| c.is_ascii_digit()) {
                return false;
            }
            rest = &after[len..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let Some(end) = after.find(']') else {
                return false;
            };
            let inside = &after[..end];
            let quoted = (inside.starts_with('"') && inside.ends_with('"') && inside.len() >= 2)
                || (inside.starts_with('\'') && inside.ends_with('\'') && inside.len() >= 2);
            if !(quoted || (!inside.is_empty() && inside.bytes().all(|b| b.is_ascii_digit()))) {
                return false;
            }
            rest = &after[end + 1..];
        } else {
            return false;
        }
    }
    true
}

/// An IF/Switch `conditions` block (`{conditions: [...], combinator}`) as a test.
fn conditions_expr(
    block: &Value,
    up: &Upstream,
    importer: &Importer<'_>,
) -> Result<String, String> {
    let paths = NodePaths {
        steps: &importer.steps,
        triggers: &importer.trigger_path,
    };
    let list = block["conditions"].as_array().ok_or("no conditions")?;
    let operand = |v: &Value| -> Result<String, String> {
        match v.as_str() {
            Some(text) if text.starts_with('=') => {
                let inner = text[1..].trim();
                let inner = inner
                    .strip_prefix("{{")
                    .and_then(|i| i.strip_suffix("}}"))
                    .ok_or_else(|| format!("`{text}`"))?;
                translate_expr(inner.trim(), up, &paths)
            }
            _ => Ok(v.to_string()),
        }
    };
    let mut tests = Vec::new();
    for condition in list {
        let left = operand(&condition["leftValue"])?;
        let right = operand(&condition["rightValue"]);
        let op = condition["operator"]["operation"]
            .as_str()
            .unwrap_or("equals");
        let test = match op {
            "equals" => format!("{left} == {}", right?),
            "notEquals" => format!("{left} != {}", right?),
            "gt" => format!("{left} > {}", right?),
            "gte" => format!("{left} >= {}", right?),
            "lt" => format!("{left} < {}", right?),
            "lte" => format!("{left} <= {}", right?),
            "contains" => format!("{} in {left}", right?),
            "notContains" => format!("{} not in {left}", right?),
            "true" => left,
            "false" => format!("not {left}"),
            other => return Err(format!("the operation {other}")),
        };
        tests.push(test);
    }
    if tests.is_empty() {
        return Err("no conditions".into());
    }
    let joiner = if block["combinator"] == "or" {
        " or "
    } else {
        " and "
    };
    Ok(tests.join(joiner))
}

/// `value` with each string leaf that holds `{{ ... }}` translated as an expression.
fn translate_leaves(value: Value, translate: &mut dyn FnMut(&Value) -> Value) -> Value {
    match value {
        Value::String(text) if text.contains("{{") => translate(&Value::String(format!("={text}"))),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|item| translate_leaves(item, translate))
                .collect(),
        ),
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, translate_leaves(v, translate)))
                .collect(),
        ),
        other => other,
    }
}

fn insert_dotted(map: &mut Map<String, Value>, field: &str, value: Value) {
    match field.split_once('.') {
        Some((head, tail)) => {
            let inner = map
                .entry(head.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = inner {
                insert_dotted(inner, tail, value);
            }
        }
        None => {
            map.insert(field.to_owned(), value);
        }
    }
}

/// A Schedule Trigger's `rule` as a cron expression; whether it had more rules than the first.
fn schedule(rule: &Value) -> Result<(String, bool), String> {
    let intervals = rule["interval"].as_array().cloned().unwrap_or_default();
    let first = intervals.first().cloned().unwrap_or(json!({}));
    let n = |key: &str, default: i64| first[key].as_i64().unwrap_or(default);
    let every = |interval: i64| {
        if interval <= 1 {
            "*".to_owned()
        } else {
            format!("*/{interval}")
        }
    };
    let cron = match first["field"].as_str().unwrap_or("days") {
        "cronExpression" => first["expression"]
            .as_str()
            .ok_or("a cron rule without its expression")?
            .to_owned(),
        "seconds" => format!("{} * * * * *", every(n("secondsInterval", 30))),
        "minutes" => format!("{} * * * *", every(n("minutesInterval", 5))),
        "hours" => format!(
            "{} {} * * *",
            n("triggerAtMinute", 0),
            every(n("hoursInterval", 1))
        ),
        "days" => format!(
            "{} {} {} * *",
            n("triggerAtMinute", 0),
            n("triggerAtHour", 0),
            every(n("daysInterval", 1))
        ),
        "weeks" => {
            let days: Vec<String> = first["triggerAtDay"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(Value::as_i64)
                        .map(|d| d.to_string())
                        .collect()
                })
                .unwrap_or_else(|| vec!["0".into()]);
            if n("weeksInterval", 1) > 1 {
                return Err("every few weeks: cron cannot say it; set the schedule by hand".into());
            }
            format!(
                "{} {} * * {}",
                n("triggerAtMinute", 0),
                n("triggerAtHour", 0),
                days.join(",")
            )
        }
        "months" => format!(
            "{} {} {} {} *",
            n("triggerAtMinute", 0),
            n("triggerAtHour", 0),
            n("triggerAtDayOfMonth", 1),
            every(n("monthsInterval", 1))
        ),
        other => return Err(format!("a schedule rule by {other}")),
    };
    Ok((cron, intervals.len() > 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, kind: &str, x: i64, parameters: Value) -> Value {
        json!({ "name": name, "type": format!("n8n-nodes-base.{kind}"), "position": [x, 0],
                "parameters": parameters })
    }

    fn imported(nodes: Vec<Value>, connections: Value) -> Value {
        let export = json!({ "name": "t", "nodes": nodes, "connections": connections });
        serde_saphyr::from_str(&import(&export.to_string()).unwrap().yaml).unwrap()
    }

    #[test]
    fn a_json_body_with_expressions_is_json_with_templates_in_its_strings() {
        let body = "={ \"a\": \"{{ $json.body.x }}\", \"n\": 1 }";
        let definition = imported(
            vec![
                node(
                    "Hook",
                    "webhook",
                    0,
                    json!({ "path": "p", "httpMethod": "POST" }),
                ),
                node(
                    "Send",
                    "httpRequest",
                    1,
                    json!({ "method": "POST", "url": "https://x.example",
                    "sendBody": true, "specifyBody": "json", "jsonBody": body }),
                ),
            ],
            json!({ "Hook": { "main": [[{ "node": "Send", "type": "main", "index": 0 }]] } }),
        );
        assert_eq!(
            definition["steps"][0]["with"]["body"],
            json!({ "a": "{{ input.body.x }}", "n": 1 })
        );
    }

    #[test]
    fn branches_of_an_if_that_meet_again_run_the_step_after_them() {
        let condition = json!({ "conditions": { "conditions": [{ "leftValue": "={{ $json.body.n }}",
            "rightValue": 1, "operator": { "operation": "gt" } }], "combinator": "and" } });
        let set =
            |v: &str| json!({ "assignments": { "assignments": [{ "name": "v", "value": v }] } });
        let definition = imported(
            vec![
                node("Hook", "webhook", 0, json!({ "path": "p" })),
                node("If", "if", 1, condition),
                node("Yes", "set", 2, set("yes")),
                node("No", "set", 3, set("no")),
                node("After", "set", 4, set("after")),
            ],
            json!({
                "Hook": { "main": [[{ "node": "If", "type": "main", "index": 0 }]] },
                "If": { "main": [[{ "node": "Yes", "type": "main", "index": 0 }],
                                 [{ "node": "No", "type": "main", "index": 0 }]] },
                "Yes": { "main": [[{ "node": "After", "type": "main", "index": 0 }]] },
                "No": { "main": [[{ "node": "After", "type": "main", "index": 0 }]] },
            }),
        );
        let after = &definition["steps"][2];
        assert_eq!(after["id"], "after");
        assert_eq!(after["needs"], json!(["no", "yes"]));
        assert_eq!(after["run_if"], "none_failed");
        assert!(after.get("when").is_none(), "{after}");
    }
}
