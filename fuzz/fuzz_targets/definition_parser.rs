//! Definitions arrive from the API, so parsing and validation must survive any input:
//! `cargo +nightly fuzz run definition_parser` (from `fuzz/`; with only stable installed,
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run definition_parser`).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use switchyard_engine::definition::{self, Format, StepKinds, TemplateContext, WorkflowMap};

/// The built-in kinds, each `with` checked against what it takes.
static KINDS: LazyLock<StepKinds> =
    LazyLock::new(|| switchyard_workers::Registry::builtin().step_kinds().unwrap());

fuzz_target!(|data: &[u8]| {
    for format in [Format::Yaml, Format::Json] {
        let _ = definition::parse_bytes("fuzz", data, format);
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = definition::check_str("fuzz", text, format, &WorkflowMap::new(), &KINDS);
        }
    }
    // Templates are part of definitions too; the fuel limit must hold on any of them.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = definition::render_str(text, &TemplateContext::default());
    }
});
