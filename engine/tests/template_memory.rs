//! Crafted templates cost bounded memory: a list that holds one long string thousands of times
//! (its construction is cheap) is refused before it turns into text, however the template asks
//! for that text. Peak memory is read from the kernel, so this file holds one test: no other
//! test of the same process may allocate meanwhile.

use serde_json::json;
use switchyard_engine::definition::{self, TemplateContext};

/// The process's peak resident memory so far, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn templates_that_multiply_a_long_string_are_refused_within_bounded_memory() {
    // One megabyte, then 4,096 references to it: 4 GB of text if anything printed it.
    let repeated = "{% set s = 'x' * 1000000 %}{% set l = [s] * 4096 %}";
    let doubled = "{% set s = 'x' * 1000000 %}{% set ns = namespace(l=[s]) %}\
                   {% for i in range(12) %}{% set ns.l = ns.l + ns.l %}{% endfor %}\
                   {% set l = ns.l %}";
    let uses = [
        "{{ l | join }}",
        "{{ l | join(',') }}",
        "{{ l }}",
        "{{ l | string | length }}",
        "{{ l | pprint | length }}",
        "{{ '%s' | format(l) | length }}",
        "{{ {'a': l} }}",
        "{{ [l, l] }}",
        "{{ (l ~ '') | length }}",
        "{{ (l ~ l) | length }}",
        "{{ ([l] ~ '') | length }}",
        "{% set ns = namespace(t='x' * 100000) %}{% for i in range(30) %}\
         {% set ns.t = ns.t ~ ns.t %}{% endfor %}{{ ns.t | length }}",
    ];
    let before = peak_rss_kib();
    for prefix in [repeated, doubled] {
        for use_ in uses {
            let template = format!("{prefix}{use_}");
            let result = definition::render_value(&json!(template), &TemplateContext::default());
            assert!(result.is_err(), "{use_} rendered");
        }
    }
    for whole in [
        "{{ ['x' * 1000000] * 4096 }}",
        "{{ (['x' * 1000000] * 4096) ~ '' }}",
    ] {
        let result = definition::render_value(&json!(whole), &TemplateContext::default());
        assert!(result.is_err(), "{whole} rendered");
    }
    let grown_mib = (peak_rss_kib() - before) / 1024;
    assert!(
        grown_mib <= 64,
        "peak memory grew by {grown_mib} MiB while refusing the templates"
    );
}
