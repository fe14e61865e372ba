//! What each built-in step kind takes in `with`, as definitions meet it: checked when they load,
//! at the key or value that is wrong, and published in the JSON Schema editors read.

use serde_json::{Value, json};
use switchyard_engine::definition::{self, Format, StepKinds, WorkflowMap, json_schema_with};
use switchyard_workers::{Registry, StepCall};

fn kinds() -> StepKinds {
    Registry::builtin().step_kinds().unwrap()
}

/// Every problem of `yaml`, as `line:column: message`.
fn problems(yaml: &str) -> Vec<String> {
    match definition::check_str("wf.yaml", yaml, Format::Yaml, &WorkflowMap::new(), &kinds()) {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
            .collect(),
    }
}

#[test]
fn the_shipped_definitions_fit_what_their_kinds_take() {
    let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../definitions"));
    definition::load_paths(&[dir], &kinds()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn every_mistake_in_with_is_named_at_its_key_or_value() {
    let found = problems(
        "id: typos
steps:
  - id: call
    type: http
    with:
      methd: GET
      url: https://example.com
      timeout: 5 parsecs
  - id: shape
    type: transform
    needs: [call]
    with:
      outptu: x
  - id: nap
    type: sleep
    with: { duration: -3 }
",
    );
    assert_eq!(
        found,
        [
            "6:7: http step: `with` takes no key `methd` (it takes: auth, body, follow_redirects, \
             headers, method, multipart, provider, query, timeout, url)",
            "8:16: http step: `with.timeout` is \"5 parsecs\", not a duration (write it like 30s, \
             5m or 1h 30m)",
            "12:5: transform step needs `with.output`",
            "13:7: transform step: `with` takes no key `outptu` (it takes: output)",
            "16:23: sleep step: `with.duration` is -3, not a duration (write it like 30s, 5m or \
             1h 30m)",
        ]
    );
}

#[test]
fn nested_shapes_are_checked_and_named() {
    let found = problems(
        "id: nested
steps:
  - id: call
    type: http
    with:
      url: https://example.com
      auth: { basic: { username: ann, pasword: pw } }
      headers: { X-Count: [1, 2] }
",
    );
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].starts_with("7:15: http step needs `with.auth.basic.password`"));
    assert!(
        found[1]
            .contains("`with.auth.basic` takes no key `pasword` (it takes: password, username)"),
        "{found:#?}"
    );
    assert!(
        found[2].starts_with(
            "8:27: http step: `with.headers.X-Count` is [1,2], where boolean or number or string"
        ),
        "{found:#?}"
    );
}

#[test]
fn a_template_stands_for_whatever_it_will_render_to() {
    let found = problems(
        "id: templated
steps:
  - id: call
    type: http
    with:
      method: \"{{ input.method }}\"
      url: \"https://example.com/{{ input.path }}\"
      timeout: \"{{ input.timeout }}\"
      headers: \"{{ input.headers }}\"
      auth: { bearer: \"{{ secrets.token }}\" }
  - id: nap
    type: sleep
    with: { duration: \"{{ input.pause }}\" }
  - id: shape
    type: transform
    with: { output: { list: \"{{ input.items }}\", n: 3 } }
",
    );
    assert_eq!(found, Vec::<String>::new());
}

#[test]
fn the_forms_the_kinds_always_took_still_load() {
    let found = problems(
        "id: forms
steps:
  - id: purge
    type: http
    with:
      method: PURGE
      url: https://cdn.example.com/page
      query: [[tag, a], [tag, b]]
      headers: { X-Retry: 3, X-Flag: true }
      auth: null
  - id: lower
    type: http
    with: { method: post, url: https://example.com, query: { page: 2 }, headers: null }
  - id: call
    type: n8n
    with: { url: https://n8n.example.com/webhook/x, headers: { X-Count: 3 }, wait: false }
",
    );
    assert_eq!(found, Vec::<String>::new());
}

#[test]
fn a_wait_step_needs_its_signal_and_a_duration() {
    let found = problems(
        "id: waiting
steps:
  - id: approve
    type: wait
    with: { timeout: soon }
",
    );
    assert_eq!(
        found,
        [
            "5:5: wait step needs `with.signal`",
            "5:22: wait step: `with.timeout` is \"soon\", not a duration (write it like 30s, 5m \
             or 1h 30m)",
        ]
    );
}

#[test]
fn a_script_steps_code_is_taken_as_written_and_its_env_names_too() {
    let found = problems(
        "id: scripted
steps:
  - id: run
    type: script
    with:
      run: bash
      code: |
        items=(a b c)
        echo \"{\\\"count\\\": ${#items[@]}, \\\"raw\\\": \\\"{{ not a template }}\\\"}\"
      input: \"{{ input }}\"
  - id: env
    type: script
    with: { run: sh, code: echo, env: \"{{ input.env }}\" }
",
    );
    assert_eq!(
        found,
        [
            "13:39: script step: `with.env` is \"{{ input.env }}\", where object is expected",
            "13:39: script step: `with.env`: holds a template; write it out (a run's data never \
             becomes it)"
        ]
    );
}

#[tokio::test]
async fn a_kind_refuses_for_good_what_only_rendering_could_show() {
    let kind = Registry::builtin();
    let sleep = kind.get("sleep").unwrap();
    let call = StepCall::first_attempt(json!({ "duration": "soon" }), Default::default());
    let failure = sleep.run(call.clone()).await.unwrap_err();
    assert!(!failure.retryable, "{failure:?}");
    assert!(failure.message.contains("duration"), "{failure:?}");
    let transform = kind.get("transform").unwrap();
    let failure = transform
        .run(StepCall {
            with: json!({ "outptu": 1 }),
            ..call
        })
        .await
        .unwrap_err();
    assert!(
        failure.message.contains("unknown field `outptu`"),
        "{failure:?}"
    );
}

#[test]
fn the_published_schema_checks_with_per_kind_and_is_committed() {
    let schema = json_schema_with(&kinds());
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schema/definition.schema.json"
    );
    let generated = serde_json::to_string_pretty(&schema).unwrap() + "\n";
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "schema/definition.schema.json is stale; regenerate it with \
         `UPDATE_SCHEMA=1 cargo test -p switchyard-workers --test with_schemas` \
         (or `switchyard schema > schema/definition.schema.json`)"
    );
    // An editor's validator meets the same rules: a typo in `with` fails, a template passes.
    let validator = jsonschema::validator_for(&schema).unwrap();
    let file =
        |with: Value| json!({ "id": "x", "steps": [{ "id": "a", "type": "http", "with": with }] });
    assert!(validator.is_valid(&file(json!({ "url": "https://example.com" }))));
    assert!(validator.is_valid(&file(
        json!({ "url": "{{ input.u }}", "headers": "{{ input.h }}" })
    )));
    assert!(!validator.is_valid(&file(
        json!({ "url": "https://example.com", "methd": "GET" })
    )));
}

#[test]
fn a_script_file_beside_the_definition_is_read_into_it_when_it_loads() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("definitions");
    std::fs::create_dir_all(defs.join("scripts")).unwrap();
    std::fs::write(defs.join("scripts/count.py"), "print('{\"n\": 1}')\n").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "not for you").unwrap();
    let definition = "id: filed
steps:
  - id: count
    type: script
    with: { run: python3, file: scripts/count.py }
";
    std::fs::write(defs.join("filed.yaml"), definition).unwrap();
    let loaded = definition::load_paths(std::slice::from_ref(&defs), &kinds())
        .unwrap_or_else(|e| panic!("{e}"));
    let with = &loaded["filed"].steps[0].with;
    assert_eq!(with["code"], "print('{\"n\": 1}')\n");
    assert!(with.get("file").is_none(), "{with}");

    std::fs::write(
        defs.join("filed.yaml"),
        definition.replace("scripts/count.py", "../secret.txt"),
    )
    .unwrap();
    let err = definition::load_paths(std::slice::from_ref(&defs), &kinds())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "filed.yaml:5:33: `with.file` \"../secret.txt\": is outside the definition's folder"
        ),
        "{err}"
    );
    std::fs::write(
        defs.join("filed.yaml"),
        definition.replace("count.py", "gone.py"),
    )
    .unwrap();
    let err = definition::load_paths(&[defs], &kinds())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`with.file` \"scripts/gone.py\": cannot be read"),
        "{err}"
    );

    // Over the API there is no folder to read from.
    let found = problems(definition);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("only a definition file can"), "{found:?}");
}
