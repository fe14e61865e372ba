//! Workflow definition format: parsing, validation with `file:line:column` errors,
//! JSON Schema, templates and secrets in templates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use switchyard_engine::definition::{
    self, Backoff, CatchUp, DefinitionErrors, Format, NonRetryable, Overlap, TemplateContext,
    TemplateError, WorkflowMap,
};

const KIND_NAMES: &[&str] = &[
    "http",
    "n8n",
    "transform",
    "sleep",
    "noop",
    "workflow",
    "wait",
];

/// The kinds these tests know, taking anything in `with`: what each takes is the workers'
/// (`workers/tests/with_schemas.rs`).
fn kinds() -> definition::StepKinds {
    definition::StepKinds::untyped(KIND_NAMES)
}

fn fixtures(dir: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/definitions"
    ))
    .join(dir)
}

/// Parses and validates one YAML text as "wf.yaml".
fn check(yaml: &str) -> Result<Vec<definition::Workflow>, DefinitionErrors> {
    definition::check_str("wf.yaml", yaml, Format::Yaml, &WorkflowMap::new(), &kinds())
}

/// The errors of an invalid YAML text, as `origin:line:column: message` lines.
fn errors(yaml: &str) -> Vec<String> {
    match check(yaml) {
        Ok(wfs) => panic!("expected errors, got {wfs:#?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts that exactly one error is reported, at `line:column`, containing `needle`.
fn assert_one_error(yaml: &str, line: usize, column: usize, needle: &str) {
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    let prefix = format!("wf.yaml:{line}:{column}: ");
    assert!(
        errs[0].starts_with(&prefix) && errs[0].contains(needle),
        "expected `{prefix}...{needle}...`, got {:?}",
        errs[0]
    );
}

// ---------------------------------------------------------------------------------------------
// Loading

#[test]
fn seed_configuration_loads_unchanged() {
    // The seed's file ships in `definitions/` byte for byte as the business wrote it.
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../definitions/workflow-config.json"
    ));
    let map = definition::load_paths(&[path], &kinds()).unwrap_or_else(|e| panic!("{e}"));
    let wf = &map["amazon_influencer"];
    assert_eq!(wf.id, "amazon_influencer");
    // The seed's workflows have no steps: their work lives in n8n, which calls back where
    // `webhookUrl` says.
    assert_eq!(wf.steps.len(), 1);
    assert_eq!(wf.steps[0].kind, "n8n");
    assert_eq!(
        wf.steps[0].with,
        json!({
            "webhook": "amazon_influencer",
            "input": "{{ input }}",
            "wait": true,
            "timeout": "30m",
            "callback_url": "/api/webhooks/n8n",
        })
    );
    let schedule = wf.schedule.as_ref().expect("schedule");
    assert_eq!(schedule.cron, "0 8,16 * * *");
    assert_eq!(schedule.timezone, "UTC");
    assert_eq!(wf.timeout.map(|t| t.0), Some(Duration::from_secs(30 * 60)));
    let retry = wf.retry.as_ref().expect("retryPolicy");
    assert_eq!(retry.max_retries, 3);
    assert_eq!(retry.backoff, Backoff::Exponential);
    let n = wf.notifications.as_ref().expect("notifications");
    assert!(n.on_success && n.on_failure);
    assert_eq!(n.webhook_url.as_deref(), Some("/api/webhooks/n8n"));
}

#[test]
fn shipped_definitions_load_together() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../definitions"));
    let map = definition::load_paths(&[dir], &kinds()).unwrap_or_else(|e| panic!("{e}"));
    for id in ["hello", "fanout_demo", "amazon_influencer", "approval"] {
        assert!(map.contains_key(id), "{id} missing from definitions/");
    }
}

#[test]
fn directory_of_yaml_and_json_files_loads_and_cross_references_resolve() {
    let map =
        definition::load_paths(&[fixtures("valid")], &kinds()).unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&str> = map.keys().map(String::as_str).collect();
    assert_eq!(ids, ["amazon_influencer", "fan_out", "publish_post"]);

    let wf = &map["amazon_influencer"];
    assert_eq!(wf.name.as_deref(), Some("Amazon Influencer"));
    let schedule = wf.schedule.as_ref().unwrap();
    assert_eq!(
        (schedule.overlap, schedule.catch_up),
        (Overlap::Skip, CatchUp::Latest)
    );
    let retry = wf.retry.as_ref().unwrap();
    assert_eq!(
        retry.non_retryable,
        [
            NonRetryable::Status(400),
            NonRetryable::Status(404),
            NonRetryable::Kind("validation".into())
        ]
    );
    let concurrency = wf.concurrency.as_ref().unwrap();
    assert_eq!(concurrency.limit, 1);
    assert_eq!(concurrency.key.as_deref(), Some("{{ input.region }}"));
    assert_eq!(wf.retention(), Duration::from_secs(30 * 24 * 3600));
    assert_eq!(wf.steps.len(), 3);
    assert_eq!(wf.steps[1].needs, ["pick_products"]);
    assert_eq!(
        wf.sink_steps().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["publish"]
    );
}

#[test]
fn camel_case_aliases_of_the_seed_are_accepted() {
    let wfs = check(
        r#"
id: camel
schedule: { cron: "*/5 * * * *", catchUp: all }
retryPolicy: { maxRetries: 0, nonRetryable: [500] }
notifications: { onSuccess: true, onFailure: false, webhookUrl: "https://hooks.example/done" }
steps:
  - id: a
    type: noop
    retryPolicy: { maxRetries: 7 }
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let wf = &wfs[0];
    assert_eq!(wf.schedule.as_ref().unwrap().catch_up, CatchUp::All);
    let retry = wf.retry.as_ref().unwrap();
    assert_eq!(retry.max_retries, 0);
    assert_eq!(retry.non_retryable, [NonRetryable::Status(500)]);
    assert_eq!(wf.steps[0].retry.as_ref().unwrap().max_retries, 7);
    assert_eq!(wf.retry_policy(&wf.steps[0]).max_retries, 7);
    assert!(wf.notifications.as_ref().unwrap().on_success);
}

#[test]
fn bare_string_schedule_is_shorthand_for_cron_with_defaults() {
    let wfs = check("id: s\nschedule: \"0 8 * * *\"\n").unwrap();
    let s = wfs[0].schedule.as_ref().unwrap();
    assert_eq!(s.cron, "0 8 * * *");
    assert_eq!(s.timezone, "UTC");
    assert_eq!((s.overlap, s.catch_up), (Overlap::Skip, CatchUp::Latest));
}

#[test]
fn six_field_cron_with_seconds_and_time_zones_are_accepted() {
    let wfs = check("id: s\nschedule: { cron: \"30 0 8 * * MON-FRI\", timezone: Europe/Paris, overlap: queue }\n").unwrap();
    assert_eq!(wfs[0].schedule.as_ref().unwrap().overlap, Overlap::Queue);
}

#[test]
fn bare_integer_concurrency_is_a_plain_limit() {
    let wfs = check("id: c\nconcurrency: 3\n").unwrap();
    let c = wfs[0].concurrency.as_ref().unwrap();
    assert_eq!((c.limit, c.key.as_deref()), (3, None));
}

#[test]
fn a_workflow_without_steps_runs_as_one_n8n_step_that_calls_its_webhook_and_waits() {
    let wfs = check("id: bridge_only\n").unwrap();
    let step = &wfs[0].steps[0];
    assert_eq!((step.id.as_str(), step.kind.as_str()), ("n8n", "n8n"));
    assert_eq!(
        step.with,
        json!({ "webhook": "bridge_only", "input": "{{ input }}", "wait": true })
    );
    let with_steps = check("id: own\nsteps:\n  - {id: a, type: noop}\n").unwrap();
    assert_eq!(
        with_steps[0].steps.len(),
        1,
        "only a workflow without steps"
    );
}

#[test]
fn workflows_map_fills_ids_from_keys_and_keeps_source_order() {
    let wfs = definition::parse_str(
        "body",
        "workflows:\n  zeta: {}\n  alpha: { id: alpha }\n",
        Format::Yaml,
    )
    .unwrap();
    let ids: Vec<&str> = wfs.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["zeta", "alpha"]);
}

#[test]
fn format_is_chosen_by_extension() {
    use std::path::Path;
    assert_eq!(Format::from_path(Path::new("a/b.yaml")), Some(Format::Yaml));
    assert_eq!(Format::from_path(Path::new("b.YML")), Some(Format::Yaml));
    assert_eq!(Format::from_path(Path::new("b.json")), Some(Format::Json));
    assert_eq!(Format::from_path(Path::new("b.toml")), None);
    assert_eq!(Format::from_path(Path::new("yaml")), None);
}

#[test]
fn parsed_workflows_round_trip_through_json_for_the_store() {
    let map = definition::load_paths(&[fixtures("valid")], &kinds()).unwrap();
    for wf in map.values() {
        let stored = serde_json::to_string(&**wf).unwrap();
        let back: definition::Workflow = serde_json::from_str(&stored).unwrap();
        assert_eq!(&back, &**wf, "{stored}");
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax and type errors

#[test]
fn yaml_syntax_error_is_reported_with_file_line_and_column() {
    let err = definition::load_paths(&[fixtures("broken/bad_syntax.yaml")], &kinds()).unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    let e = &err.0[0];
    assert!(e.origin.ends_with("bad_syntax.yaml"), "{e}");
    assert_eq!((e.line, e.column), (5, 4), "{e}");
}

#[test]
fn type_error_points_at_the_value() {
    assert_one_error("id: t\nretry:\n  max_retries: lots\n", 3, 16, "");
}

#[test]
fn unknown_field_is_an_error_at_its_key() {
    assert_one_error("id: t\ntimeuot: 5m\n", 2, 1, "timeuot");
}

#[test]
fn bad_duration_is_reported_at_its_value() {
    assert_one_error(
        "id: t\nsteps:\n  - id: a\n    type: noop\n    timeout: 5 parsecs\n",
        5,
        14,
        "\"5 parsecs\" is not a duration (write it like 30s, 5m or 1h 30m)",
    );
}

#[test]
fn every_value_of_the_wrong_type_in_a_file_is_named_not_only_the_first() {
    let errs = errors(
        "id: t
retry: {max_retries: -1, initial: soonish}
timeout: 5 parsecs
steps:
  - {id: a, type: noop, timeout: never}
  - {id: b, type: noop, needs: [a], retry: {max_retries: 1.5}}
",
    );
    assert_eq!(
        errs,
        [
            "wf.yaml:2:22: expected a whole number from 0 to 4294967295",
            "wf.yaml:2:35: \"soonish\" is not a duration (write it like 30s, 5m or 1h 30m)",
            "wf.yaml:3:10: \"5 parsecs\" is not a duration (write it like 30s, 5m or 1h 30m)",
            "wf.yaml:5:34: \"never\" is not a duration (write it like 30s, 5m or 1h 30m)",
            "wf.yaml:6:58: expected a whole number from 0 to 4294967295",
        ]
    );
}

#[test]
fn json_syntax_error_uses_json_line_and_column() {
    let err =
        definition::parse_str("body.json", "{\n  \"id\": \"x\",\n}\n", Format::Json).unwrap_err();
    let e = &err.0[0];
    assert_eq!((e.origin.as_str(), e.line), ("body.json", 3), "{e}");
    assert!(
        !e.message.contains("at line"),
        "position is not repeated: {e}"
    );
}

#[test]
fn json_type_error_is_located_like_yaml() {
    let err = definition::parse_str(
        "body.json",
        "{\n  \"id\": \"x\",\n  \"timeout\": 5\n}\n",
        Format::Json,
    )
    .unwrap_err();
    let e = &err.0[0];
    assert_eq!((e.line, e.column), (3, 14), "{e}");
}

#[test]
fn single_workflow_without_id_is_an_error() {
    assert_one_error("name: nameless\n", 1, 1, "needs an `id`");
}

#[test]
fn id_that_differs_from_its_workflows_key_is_an_error() {
    assert_one_error(
        "workflows:\n  a:\n    id: b\n",
        3,
        9,
        "differs from its key",
    );
}

#[test]
fn empty_and_whitespace_definitions_are_errors() {
    for text in ["", "  \n\n", "# only a comment\n"] {
        let err = definition::parse_str("e.yaml", text, Format::Yaml).unwrap_err();
        assert_eq!(err.len(), 1, "{text:?}: {err}");
    }
}

#[test]
fn multiple_yaml_documents_are_refused() {
    let err = definition::parse_str("m.yaml", "id: a\n---\nid: b\n", Format::Yaml).unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
}

// ---------------------------------------------------------------------------------------------
// Semantic rules

#[test]
fn invalid_workflow_and_step_ids_are_reported() {
    let errs = errors("id: Bad.Id\nsteps:\n  - id: \"has space\"\n    type: noop\n");
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("wf.yaml:1:5: invalid workflow id `Bad.Id`"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("wf.yaml:3:9: invalid step id `has space`"),
        "{errs:#?}"
    );
}

#[test]
fn invalid_workflow_id_in_a_map_is_reported_at_its_key() {
    assert_one_error(
        "workflows:\n  ok: {}\n  NotOk: {}\n",
        3,
        3,
        "invalid workflow id `NotOk`",
    );
}

#[test]
fn duplicate_step_ids_are_reported_at_the_second() {
    assert_one_error(
        "id: d\nsteps:\n  - id: a\n    type: noop\n  - id: a\n    type: noop\n",
        5,
        9,
        "duplicate step id `a`",
    );
}

#[test]
fn duplicate_yaml_keys_are_refused() {
    assert_one_error("workflows:\n  a: {}\n  a: {}\n", 3, 3, "");
}

#[test]
fn duplicate_workflow_ids_across_files_name_both_places() {
    let err = definition::load_paths(&[fixtures("duplicates")], &kinds()).unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    let e = &err.0[0];
    assert!(e.origin.ends_with("b.yml"), "{e}");
    assert_eq!((e.line, e.column), (1, 5), "{e}");
    assert!(e.message.contains("duplicate workflow id `report`"), "{e}");
    assert!(
        e.message.contains("a.yaml:2:3"),
        "first definition is named: {e}"
    );
}

#[test]
fn unknown_needs_is_reported_at_the_entry() {
    assert_one_error(
        "id: n\nsteps:\n  - id: a\n    type: noop\n    needs: [a_typo]\n",
        5,
        13,
        "needs unknown step `a_typo`",
    );
}

#[test]
fn cycle_in_needs_is_reported_with_location() {
    let yaml = "\
id: cyc
steps:
  - id: a
    type: noop
    needs: [c]
  - id: b
    type: noop
    needs: [a]
  - id: c
    type: noop
    needs:
      - b
  - id: free
    type: noop
";
    assert_one_error(yaml, 5, 13, "cycle in `needs`: a -> c -> b -> a");
}

#[test]
fn step_needing_itself_is_a_cycle() {
    assert_one_error(
        "id: s\nsteps:\n  - id: a\n    type: noop\n    needs: [a]\n",
        5,
        13,
        "cycle in `needs`: a -> a",
    );
}

#[test]
fn unknown_step_type_lists_known_kinds() {
    assert_one_error(
        "id: k\nsteps:\n  - id: a\n    type: teleport\n",
        4,
        11,
        "unknown step type `teleport` (known: http, n8n, noop, sleep, transform, wait, workflow)",
    );
}

#[test]
fn bad_cron_is_reported_at_the_expression() {
    assert_one_error(
        "id: c\nschedule: \"61 * * * *\"\n",
        2,
        11,
        "invalid cron expression",
    );
    assert_one_error(
        "id: c\nschedule:\n  cron: \"* * *\"\n",
        3,
        9,
        "invalid cron expression",
    );
    assert_one_error(
        "id: c\nschedule: \"0 0 0 1 1 * 2030\"\n",
        2,
        11,
        "invalid cron expression",
    );
}

#[test]
fn unknown_time_zone_is_reported() {
    assert_one_error(
        "id: z\nschedule:\n  cron: \"0 8 * * *\"\n  timezone: Mars/Olympus_Mons\n",
        4,
        13,
        "unknown time zone `Mars/Olympus_Mons`",
    );
}

#[test]
fn bad_enum_value_is_reported() {
    assert_one_error(
        "id: z\nschedule: { cron: \"0 8 * * *\", overlap: sometimes }\n",
        2,
        41,
        "sometimes",
    );
}

#[test]
fn zero_limits_and_inverted_backoff_are_reported() {
    let errs = errors(
        "id: z\ntimeout: 0s\nconcurrency: 0\nretry: { initial: 1m, max: 1s }\nnotifications: { webhook_url: hooks.example }\n",
    );
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs[0].starts_with("wf.yaml:2:10: timeout must be"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("wf.yaml:3:14: concurrency limit"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("wf.yaml:4:19: retry initial delay 1m"),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("wf.yaml:5:31: webhook_url"),
        "{errs:#?}"
    );
}

#[test]
fn errors_under_camel_case_aliases_point_at_what_was_written() {
    let errs = errors(
        "id: z\nretryPolicy:\n  initial: 1m\n  max: 1s\nnotifications: { webhookUrl: \"ftp://x\" }\n",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("wf.yaml:3:12: retry initial delay"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("wf.yaml:5:30: webhook_url"),
        "{errs:#?}"
    );
}

#[test]
fn json_with_tabs_and_compact_syntax_loads_with_locations() {
    let text = "{\"workflows\":{\"a\":{\"steps\":[\n\t{\"id\":\"s\",\"type\":\"noop\"},\n\t{\"id\":\"t\",\"type\":\"noop\",\"needs\":[\"zz\"]}]}}}";
    let err = definition::check_str("wf.json", text, Format::Json, &WorkflowMap::new(), &kinds())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "wf.json:3:35: step `t` needs unknown step `zz`"
    );
}

#[test]
fn template_referencing_a_step_that_is_not_upstream_is_reported() {
    let yaml = "\
id: t
steps:
  - id: a
    type: noop
  - id: b
    type: noop
  - id: c
    type: http
    needs: [b]
    with:
      url: \"https://x/{{ steps.a.output.id }}\"
";
    assert_one_error(yaml, 11, 12, "step `a`, which is not upstream of `c`");
}

#[test]
fn template_may_reference_transitive_upstream_steps() {
    let yaml = "\
id: t
steps:
  - id: a
    type: noop
  - id: b
    type: noop
    needs: [a]
  - id: c
    type: http
    needs: [b]
    with:
      headers: [{ x: \"{{ steps.a.output.token }}\" }]
      body: \"{{ steps.b.output }}\"
";
    check(yaml).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn template_referencing_unknown_steps_variables_and_attributes_is_reported() {
    let yaml = "\
id: t
steps:
  - id: a
    type: noop
  - id: b
    type: http
    needs: [a]
    with:
      - \"{{ steps.nope.output }}\"
      - \"{{ inputs.region }}\"
      - \"{{ steps.a.items }}\"
      - \"{% for x in steps.a.output %}{{ x }}{{ loop.index }}{% endfor %}{{ range(3) | list }}\"
";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with("wf.yaml:9:9: template references unknown step `nope`"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("wf.yaml:10:9: template uses unknown variable `inputs`"),
        "{errs:#?}"
    );
    assert!(
        errs[2].contains("`steps.a.items` does not exist"),
        "{errs:#?}"
    );
}

#[test]
fn template_syntax_error_is_reported_at_the_string() {
    assert_one_error(
        "id: t\nsteps:\n  - id: a\n    type: http\n    with: { url: \"{{ input.x \" }\n",
        5,
        18,
        "invalid template",
    );
}

#[test]
fn concurrency_key_templates_cannot_see_steps() {
    assert_one_error(
        "id: t\nconcurrency: { limit: 1, key: \"{{ steps.a.output }}\" }\n",
        2,
        31,
        "not available here",
    );
}

#[test]
fn child_workflow_steps_must_name_existing_workflows() {
    let yaml = "\
workflows:
  parent:
    steps:
      - id: fan
        type: workflow
        with: { workflows: [child, ghost] }
      - id: each
        type: workflow
        with: { workflow: phantom, for_each: \"{{ input.items }}\" }
      - id: empty
        type: workflow
  child: {}
";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with("wf.yaml:6:36: unknown workflow `ghost`"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("wf.yaml:9:27: unknown workflow `phantom`"),
        "{errs:#?}"
    );
    assert!(errs[2].contains("a `workflow` step needs"), "{errs:#?}");
}

#[test]
fn child_workflows_may_reference_already_loaded_workflows() {
    let existing = definition::load_paths(&[fixtures("valid")], &kinds()).unwrap();
    let body = "id: caller\nsteps:\n  - id: go\n    type: workflow\n    with: { workflows: [publish_post] }\n";
    definition::check_str("request body", body, Format::Yaml, &existing, &kinds()).unwrap();
    let err = definition::check_str(
        "request body",
        body,
        Format::Yaml,
        &WorkflowMap::new(),
        &kinds(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("request body:5:25: unknown workflow `publish_post`"),
        "{err}"
    );
}

#[test]
fn workflow_that_starts_itself_transitively_is_reported() {
    let yaml = "\
workflows:
  a:
    steps:
      - id: to_b
        type: workflow
        with: { workflows: [b] }
  b:
    steps:
      - id: to_a
        type: workflow
        with: { workflow: a }
  loner:
    steps:
      - id: me
        type: workflow
        with: { workflows: [loner] }
";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("wf.yaml:6:29: workflow `a` starts itself: a -> b -> a"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("wf.yaml:16:29: workflow `loner` starts itself: loner -> loner"),
        "{errs:#?}"
    );
}

#[test]
fn all_errors_of_a_file_are_reported() {
    let yaml = "\
id: many_problems
schedule: \"not a cron\"
steps:
  - id: a
    type: teleport
    needs: [ghost]
  - id: a
    type: noop
    with: { x: \"{{ steps.zzz.output }}\" }
";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    for e in &errs {
        assert!(e.starts_with("wf.yaml:"), "{e}");
        assert!(!e.starts_with("wf.yaml:0:0"), "{e}");
    }
}

#[test]
fn errors_of_all_files_are_collected() {
    let err =
        definition::load_paths(&[fixtures("broken"), fixtures("valid")], &kinds()).unwrap_err();
    let text = err.to_string();
    assert_eq!(
        text.lines().count(),
        err.len(),
        "one error per line:\n{text}"
    );
    assert!(text.contains("bad_syntax.yaml:5:4:"), "{text}");
    assert!(
        text.contains("bad_semantics.yaml:2:11: invalid cron"),
        "{text}"
    );
    assert!(
        text.contains("bad_semantics.yaml:5:11: unknown step type `teleport`"),
        "{text}"
    );
    assert!(text.contains("binary.yaml:2:1: not valid UTF-8"), "{text}");
    assert_eq!(err.len(), 4, "{text}");
}

#[test]
fn unsupported_and_missing_paths_are_errors() {
    let err = definition::load_paths(
        &[fixtures("valid/notes.txt"), fixtures("does-not-exist.yaml")],
        &kinds(),
    )
    .unwrap_err();
    assert_eq!(err.len(), 2, "{err}");
    // In source order: by file, then place.
    assert!(err.0[0].message.contains("cannot read file"), "{err}");
    assert!(err.0[1].message.contains("unsupported file type"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Hostile input

fn parse_fails_cleanly(text: &str) -> DefinitionErrors {
    let started = std::time::Instant::now();
    let err = definition::parse_str("evil.yaml", text, Format::Yaml).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.len(), 1, "{err}");
    err
}

#[test]
fn binary_garbage_is_a_clear_error() {
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let err = definition::parse_bytes("garbage.yaml", &bytes, Format::Yaml).unwrap_err();
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");
    let text = String::from_utf8_lossy(&bytes);
    assert!(definition::parse_str("garbage.yaml", &text, Format::Yaml).is_err());
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let big = format!(
        "id: big\ndescription: \"{}\"\n",
        "x".repeat(50 * 1024 * 1024)
    );
    let err = parse_fails_cleanly(&big);
    assert!(err.to_string().contains("too large"), "{err}");
}

#[test]
fn deep_nesting_is_refused() {
    let flow = format!(
        "id: deep\ninputs: {{ x: {}{} }}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    parse_fails_cleanly(&flow);
    let mut block = String::from("id: deep\ninputs:\n");
    for depth in 1..10_000 {
        block.push_str(&" ".repeat(depth.min(2000)));
        block.push_str("k:\n");
    }
    parse_fails_cleanly(&block);
    let json = format!(
        "{{\"id\": \"deep\", \"inputs\": {{\"x\": {}{}}}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(definition::parse_str("deep.json", &json, Format::Json).is_err());
}

#[test]
fn billion_laughs_aliases_are_refused() {
    let mut yaml = String::from(
        "id: lol\ninputs:\n  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        yaml.push_str(&format!("  a{i}: &a{i} [{refs}]\n"));
    }
    let err = parse_fails_cleanly(&yaml);
    assert!(!err.0[0].message.is_empty());
}

#[test]
fn small_aliases_still_work() {
    let wfs = check("id: anchors\ninputs:\n  base: &base { region: us }\n  copy: *base\n").unwrap();
    assert_eq!(wfs[0].inputs["copy"], json!({ "region": "us" }));
}

fn valid_yaml() -> &'static str {
    include_str!("fixtures/definitions/valid/amazon_influencer.yaml")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_arbitrary_strings(text in "\\PC{0,300}") {
        let _ = definition::parse_str("p.yaml", &text, Format::Yaml);
        let _ = definition::parse_str("p.json", &text, Format::Json);
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = definition::parse_bytes("p.yaml", &bytes, Format::Yaml);
    }

    #[test]
    fn validation_never_panics_on_mutated_valid_yaml(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, "[ -~\n]{0,4}"), 1..6)
    ) {
        let mut text = valid_yaml().to_owned();
        for (at, op, s) in edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) { i -= 1; }
            match op {
                0 => text.insert_str(i, &s),
                1 => { let end = (i + s.len()).min(text.len()); if text.is_char_boundary(end) { text.replace_range(i..end, ""); } }
                2 => { let end = (i + s.len()).min(text.len()); if text.is_char_boundary(end) { text.replace_range(i..end, &s); } }
                _ => text.insert(i, '\n'),
            }
        }
        if let Err(e) = definition::check_str("m.yaml", &text, Format::Yaml, &WorkflowMap::new(), &kinds()) {
            for err in e.iter() {
                prop_assert!(err.line >= 1 && err.column >= 1, "{err}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON Schema

#[test]
fn schema_covers_both_file_shapes_and_the_shorthands() {
    let schema = definition::json_schema();
    let text = schema.to_string();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(schema["anyOf"].as_array().map(Vec::len), Some(2));
    let defs = &schema["$defs"];
    assert!(
        defs["Workflow"]["properties"]["steps"].is_object(),
        "{text}"
    );
    assert!(
        defs["Workflow"]["properties"]["retryPolicy"].is_object(),
        "alias: {text}"
    );
    assert!(
        defs["Notifications"]["properties"]["webhookUrl"].is_object(),
        "alias: {text}"
    );
    assert!(
        defs["Schedule"]["anyOf"][0]["type"] == "string",
        "bare cron: {text}"
    );
    assert!(
        defs["Concurrency"]["anyOf"][0]["type"] == "integer",
        "bare limit: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Templates

fn ctx() -> TemplateContext {
    let mut steps = serde_json::Map::new();
    steps.insert(
        "fetch".into(),
        json!({ "items": [{ "title": "Lamp", "price": 12.5 }, { "title": "Desk", "price": 80 }] }),
    );
    TemplateContext {
        input: json!({ "region": "us", "count": 2 }),
        steps,
        vars: json!({ "api": "https://api.example", "tags": { "us": "tag-20" } }),
        secrets: definition::Secrets::new(BTreeMap::from([(
            "token".to_owned(),
            "s3cr3t-value".to_owned(),
        )])),
        run: json!({ "id": "run-1", "attempt": 1 }),
        env: BTreeMap::from([("REGION".to_owned(), "eu-west-1".to_owned())]),
        item: None,
    }
}

#[test]
fn whole_expression_yields_its_json_value() {
    let out = definition::render_value(
        &json!({
            "items": "{{ steps.fetch.output.items }}",
            "count": "{{ input.count + 1 }}",
            "first": " {{ steps.fetch.output.items[0] }}\n",
            "flag": "{{ input.count > 1 }}",
            "plain": "no template",
            "n": 7,
        }),
        &ctx(),
    )
    .unwrap();
    assert_eq!(out["items"][1]["title"], "Desk");
    assert_eq!(out["count"], 3);
    assert_eq!(out["first"], json!({ "title": "Lamp", "price": 12.5 }));
    assert_eq!(out["flag"], true);
    assert_eq!(out["plain"], "no template");
    assert_eq!(out["n"], 7);
}

#[test]
fn mixed_text_renders_to_a_string() {
    let out = definition::render_value(
        &json!([
            "{{ vars.api }}/p?tag={{ vars.tags[input.region] }}",
            "{{ input.count }} items",
            "{{ env.REGION }}/{{ run.id }}"
        ]),
        &ctx(),
    )
    .unwrap();
    assert_eq!(
        out,
        json!([
            "https://api.example/p?tag=tag-20",
            "2 items",
            "eu-west-1/run-1"
        ])
    );
    assert_eq!(
        definition::render_str("{{ input.region | upper }}", &ctx()).unwrap(),
        "US"
    );
}

#[test]
fn undefined_variables_are_errors_not_empty_strings() {
    for t in [
        "{{ input.missing }}",
        "x {{ input.missing }} y",
        "{{ nothing.at.all }}",
        "{{ steps.fetch.output.items[9].title }}",
        "{{ [input.missing] }}",
        "{{ {'a': input.missing} }}",
    ] {
        let err = definition::render_value(&json!(t), &ctx()).unwrap_err();
        assert!(
            matches!(err, TemplateError::Undefined(_) | TemplateError::Render(_)),
            "{t}: {err:?}"
        );
    }
    assert!(definition::render_str("{{ input.missing }}", &ctx()).is_err());
}

#[test]
fn template_syntax_errors_are_reported() {
    let err = definition::render_str("{{ input.region ", &ctx()).unwrap_err();
    assert!(matches!(err, TemplateError::Syntax(_)), "{err:?}");
}

#[test]
fn fuel_stops_runaway_templates() {
    let started = std::time::Instant::now();
    let t = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
    let err = definition::render_str(t, &ctx()).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let t = "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}";
    let err2 = definition::render_str(t, &ctx()).unwrap_err();
    assert_eq!(err2, TemplateError::OutOfFuel, "first error was {err:?}");
}

/// What each template renders to, or its error, as text.
fn rendered(t: &str, ctx: &TemplateContext) -> String {
    match definition::render_value(&json!(t), ctx) {
        Ok(v) => v.to_string(),
        Err(e) => format!("{e} {e:?}"),
    }
}

#[test]
fn no_template_can_render_a_secret_or_a_transform_of_one() {
    let ctx = ctx();
    let forms = [
        "s3cr3t-value",
        "S3CR3T-VALUE",
        "eulav-t3rc3s",
        "s3cr",
        "3cr3t",
        "s3cr3t%2Dvalue",
        "czNjcjN0LXZhbHVl",
        "s3cr3t-valuex",
    ];
    for t in [
        "{{ secrets.token }}",
        "x{{ secrets.token }}",
        "{{ secrets.token | upper }}",
        "{{ secrets.token | reverse }}",
        "{{ secrets.token[0:4] }}",
        "{{ (secrets.token ~ '')[1:6] }}",
        "{{ secrets.token | replace('-', '%2D') }}",
        "{{ secrets.token | escape }}",
        "{{ secrets.token | urlencode }}",
        "{{ secrets.token | list }}",
        "{{ secrets.token | tojson }}",
        "{{ secrets }}",
        "{{ secrets | tojson }}",
        "{{ debug() }}",
        "{% for c in secrets.token %}{{ c }}{% endfor %}",
        "{{ secrets.token ~ 'x' }}",
        "{{ secrets.token | int + [] }}",
        "{{ (secrets.token ~ 'x')() }}",
        "{{ {}[secrets.token] }}",
    ] {
        let out = rendered(t, &ctx);
        for form in forms {
            assert!(
                !out.contains(form),
                "{t} rendered {out:?}, which holds {form:?}"
            );
        }
    }
}

#[test]
fn comparing_a_secret_in_a_template_tells_nothing() {
    let ctx = ctx();
    for t in [
        "{{ secrets.token == 's3cr3t-value' }}",
        "{{ 's3cr3t' in secrets.token }}",
        "{{ secrets.token is startingwith('s3') }}",
        "{{ secrets.token | length == 12 }}",
    ] {
        assert_eq!(rendered(t, &ctx), "false", "{t}");
    }
}

#[test]
fn only_an_unchanged_reference_reveals_its_secret() {
    let ctx = ctx();
    let whole = definition::render_str("Bearer {{ secrets.token }}", &ctx).unwrap();
    assert!(ctx.secrets.referenced_in(&whole));
    assert_eq!(ctx.secrets.reveal(&whole).unwrap(), "Bearer s3cr3t-value");
    for changed in [
        "{{ secrets.token | upper }}",
        "{{ secrets.token | replace('n', 'm') }}",
        "{{ secrets.token[:-1] }}",
    ] {
        let out = definition::render_str(changed, &ctx).unwrap();
        assert_eq!(
            ctx.secrets.reveal(&out),
            Err(definition::SecretError::Changed),
            "{changed}"
        );
    }
    // A reversed reference is not one any more; it reveals nothing.
    let reversed = definition::render_str("{{ secrets.token | reverse }}", &ctx).unwrap();
    assert_eq!(ctx.secrets.reveal(&reversed).unwrap(), reversed);
}

#[test]
fn text_from_elsewhere_cannot_forge_a_secret_reference() {
    let ctx = ctx();
    for forged in ["\u{e000}0:token\u{e001}", "\u{e000}:token\u{e001}"] {
        assert!(!ctx.secrets.referenced_in(forged));
        assert_eq!(ctx.secrets.reveal(forged).unwrap(), forged);
    }
    let other = TemplateContext {
        secrets: definition::Secrets::new(BTreeMap::from([(
            "token".to_owned(),
            "s3cr3t-value".to_owned(),
        )])),
        ..TemplateContext::default()
    };
    let theirs = definition::render_str("{{ secrets.token }}", &other).unwrap();
    assert_eq!(ctx.secrets.reveal(&theirs).unwrap(), theirs);
    assert_eq!(ctx.secrets.find_in(&json!({ "a": [theirs] })), None);
    let mine = definition::render_str("{{ secrets.token }}", &ctx).unwrap();
    assert_eq!(
        ctx.secrets.find_in(&json!({ "a": [1, mine] })).as_deref(),
        Some("$.a[1]")
    );
}

#[test]
fn templates_that_read_the_run_input_or_step_outputs_are_told_apart() {
    for (t, reads) in [
        ("{{ input.url }}", true),
        ("https://x/{{ steps.a.output.id }}", true),
        ("{% for p in input.paths %}{{ p }}{% endfor %}", true),
        // A `for_each` item may come from the run's input.
        ("{{ item.url }}", true),
        ("{{ vars.api }}/products", false),
        ("https://api.example/{{ run.id }}", false),
        ("https://plain.example", false),
    ] {
        assert_eq!(definition::reads_run_data(&json!(t)), reads, "{t}");
    }
    assert!(definition::reads_run_data(
        &json!({ "a": ["x", "{{ input.y }}"] })
    ));
}

#[test]
fn wait_steps_name_one_literal_signal_each() {
    assert!(
        check("id: w\nsteps:\n  - {id: a, type: wait, with: {signal: approve, timeout: 24h}}\n")
            .is_ok()
    );
    assert_one_error(
        "id: w\nsteps:\n  - id: a\n    type: wait\n    with: {signal: \"{{ input.s }}\"}\n",
        5,
        20,
        "invalid signal name",
    );
    assert_one_error(
        "id: w\nsteps:\n  - {id: a, type: wait, with: {signal: go}}\n  - {id: b, type: wait, with: {signal: go}}\n",
        4,
        40,
        "waits for signal `go` already",
    );
}

#[test]
fn an_input_schema_that_is_not_a_schema_is_an_error_at_its_key() {
    assert_one_error(
        "id: w\ninput_schema: {type: object, properties: {n: {minimum: one}}}\nsteps:\n  - {id: a, type: noop}\n",
        2,
        15,
        "input_schema is not a usable JSON Schema",
    );
}

#[test]
fn a_priority_out_of_range_is_an_error_at_its_value() {
    assert!(check("id: w\npriority: -100\nsteps:\n  - {id: a, type: noop}\n").is_ok());
    assert_one_error(
        "id: w\npriority: 101\nsteps:\n  - {id: a, type: noop}\n",
        2,
        11,
        "priority 101 is out of range",
    );
}

// ---------------------------------------------------------------------------------------------
// Control flow

#[test]
fn a_when_condition_may_reference_only_upstream_steps() {
    let yaml = "\
id: t
steps:
  - id: a
    type: noop
  - id: b
    type: noop
  - id: c
    type: noop
    needs: [b]
    when: \"{{ steps.a.output.ok }}\"
";
    assert_one_error(yaml, 10, 11, "step `a`, which is not upstream of `c`");
    let fine = yaml.replace("needs: [b]", "needs: [a, b]");
    check(&fine).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn an_unknown_run_if_is_reported_with_the_rules_there_are() {
    let yaml = "\
id: t
steps:
  - {id: a, type: noop}
  - {id: b, type: noop, needs: [a], run_if: sometimes}
";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("wf.yaml:4:"), "{errs:?}");
    for rule in ["all_succeeded", "all_done", "any_failed", "none_failed"] {
        assert!(errs[0].contains(rule), "{errs:?}");
    }
}

#[test]
fn failure_handlers_need_only_each_other_and_share_no_id_with_the_steps() {
    let needs_main = "\
id: t
steps:
  - {id: a, type: noop}
on_failure:
  - {id: alert, type: noop, needs: [a]}
";
    assert_one_error(
        needs_main,
        5,
        37,
        "step `alert` needs `a`, one of `steps`: a step of `on_failure` needs only others",
    );
    let same_id = "\
id: t
steps:
  - {id: a, type: noop}
on_failure:
  - {id: a, type: noop}
";
    assert_one_error(same_id, 5, 10, "duplicate step id `a`: `steps` has it too");
    let fine = "\
id: t
steps:
  - {id: a, type: noop}
on_failure:
  - {id: alert, type: noop, with: {message: \"{{ run.error }}\"}}
  - {id: cleanup, type: noop, needs: [alert], run_if: all_done}
";
    let wf = check(fine).unwrap_or_else(|e| panic!("{e}")).remove(0);
    assert!(wf.has_control_flow());
    assert_eq!(wf.on_failure.len(), 2);
}

#[test]
fn item_and_index_are_the_item_of_a_step_level_for_each_and_nothing_else() {
    let looped = "\
id: t
steps:
  - {id: list, type: noop}
  - id: each
    type: transform
    needs: [list]
    for_each: \"{{ steps.list.output }}\"
    parallel: 4
    with: {output: \"{{ index }}: {{ item.name }}\"}
";
    check(looped).unwrap_or_else(|e| panic!("{e}"));
    // A `workflow` step's `with.for_each` gives each child `input.item`; its own templates are
    // rendered once, before any item, so `item` there would be undefined at run time.
    let children = "\
workflows:
  parent:
    steps:
      - id: each
        type: workflow
        with: {workflow: child, for_each: [1, 2], input: {n: \"{{ item }}\"}}
  child:
    steps:
      - {id: only, type: transform, with: {output: \"{{ input.item }}\"}}
";
    assert_one_error(children, 6, 58, "unknown variable `item`");
    let in_when = looped.replace("parallel: 4", "when: \"{{ item }}\"");
    assert_one_error(&in_when, 8, 11, "unknown variable `item`");
}

#[test]
fn a_loop_names_its_limit_sensibly_and_only_on_kinds_that_can_loop() {
    let no_loop = "id: t\nsteps:\n  - {id: a, type: noop, parallel: 2}\n";
    assert_one_error(no_loop, 3, 35, "this step has none");
    let zero = "id: t\nsteps:\n  - {id: a, type: noop, for_each: '{{ [1] }}', parallel: 0}\n";
    assert_one_error(zero, 3, 58, "parallel must be from 1 to 10000");
    let huge = zero.replace("parallel: 0", "parallel: 4294967295");
    assert_one_error(&huge, 3, 58, "parallel must be from 1 to 10000");
    let root_rule = "id: t\nsteps:\n  - {id: a, type: noop, run_if: any_failed}\n";
    assert_one_error(root_rule, 3, 33, "`a` needs none");
    let waits =
        "id: t\nsteps:\n  - {id: a, type: wait, for_each: '{{ [1] }}', with: {signal: go}}\n";
    assert_one_error(waits, 3, 19, "a wait step cannot loop");
}

#[test]
fn crons_and_negative_numbers_are_explained_in_words() {
    assert_one_error(
        "id: c\nschedule: \"61 * * * *\"\nsteps:\n  - {id: a, type: noop}\n",
        2,
        11,
        "the minute field `61` is not valid (it takes 0-59)",
    );
    assert_one_error(
        "id: c\nschedule: \"* * *\"\nsteps:\n  - {id: a, type: noop}\n",
        2,
        11,
        "it has 3 fields; a cron expression has 5",
    );
    assert_one_error(
        "id: c\nretry: {max_retries: -1}\nsteps:\n  - {id: a, type: noop}\n",
        2,
        22,
        "expected a whole number from 0 to 4294967295",
    );
}

#[test]
fn webhook_triggers_need_a_servable_path_a_secret_to_sign_with_and_public_to_be_open() {
    let errs = errors(
        "workflows:
  a:
    triggers:
      - webhook: { path: Pay Here, auth: stripe }
      - webhook: { path: open, auth: none }
      - webhook: { path: tok, auth: bearer, secret: s }
      - webhook: { path: shared, auth: bearer }
    steps: [{id: s, type: noop}]
  b:
    triggers:
      - webhook: { path: shared, auth: hmac-sha256, secret: s, respond: { wait: 5s } }
    steps: [{id: s, type: noop}]
",
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(
        errs[0].starts_with("wf.yaml:4:26: webhook path `Pay Here`"),
        "{errs:#?}"
    );
    assert!(
        errs[1].contains("name the secret that signs deliveries"),
        "{errs:#?}"
    );
    assert!(
        errs[2].contains("`auth: none` lets anyone start runs"),
        "{errs:#?}"
    );
    assert!(
        errs[3].contains("`secret` is for `auth: hmac-sha256`"),
        "{errs:#?}"
    );
    assert!(
        errs[4].starts_with(
            "wf.yaml:11:26: webhook path `shared` is also workflow a's (at wf.yaml:7:26)"
        ),
        "{errs:#?}"
    );
    let ok = check(
        "id: pay\ntriggers:\n  - webhook: { path: stripe/payments, auth: stripe, secret: whsec, dedupeKey: \"{{ input.body.id }}\" }\n  - webhook: { path: open, auth: none, public: true }\nsteps: [{id: s, type: noop}]\n",
    )
    .unwrap();
    assert_eq!(ok[0].triggers.len(), 2);
}

#[test]
fn a_path_as_webhook_url_needs_a_workflow_that_runs_in_n8n() {
    assert_one_error(
        "id: local\nnotifications: {onFailure: true, webhookUrl: /api/webhooks/n8n}\nsteps:\n  - {id: a, type: noop}\n",
        2,
        46,
        "is a path: where n8n calls back",
    );
    check("id: bridged\nnotifications: {onFailure: true, webhookUrl: /api/webhooks/n8n}\n")
        .unwrap();
}

#[test]
fn a_quota_names_its_bucket_and_gives_a_limit_with_its_period_or_neither() {
    let ok = "id: t\nsteps:\n  - {id: a, type: noop, quota: {name: openai, limit: 5, per: 1s}}\n";
    check(ok).unwrap_or_else(|e| panic!("{e}"));
    check("id: t\nsteps:\n  - {id: a, type: noop, quota: {name: openai}}\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let bad_name = ok.replace("name: openai", "name: Open AI");
    assert_one_error(&bad_name, 3, 39, "is not [a-z0-9_-]+");
    let no_period = ok.replace(", per: 1s", "");
    assert_one_error(&no_period, 3, 54, "needs `per`");
    let no_limit = ok.replace("limit: 5, ", "");
    assert_one_error(&no_limit, 3, 52, "needs a limit");
    let zero = ok.replace("limit: 5", "limit: 0");
    assert_one_error(&zero, 3, 54, "at least 1");
}
