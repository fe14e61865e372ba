//! Support for the test suites of every crate of the workspace (not for production code): where
//! the PostgreSQL tests find their server, and how a test says that it could not run what it is
//! for, so that a skip never reads as a pass.

/// The database the PostgreSQL tests use, each in a schema of its own:
/// `SWITCHYARD_TEST_POSTGRES`, or the local server.
pub fn postgres_url() -> String {
    std::env::var("SWITCHYARD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Says that a test did not run what it is for, and why: on stderr, and in the file named by
/// `SWITCHYARD_SKIPPED` (CI lists it in its closing summary). Panics instead when `required`
/// names an environment variable that is set: there, as in CI, the test must run.
pub fn skipped(required: &str, reason: &str) {
    assert!(
        std::env::var_os(required).is_none(),
        "{required} is set, and this test cannot run: {reason}"
    );
    eprintln!("skipped: {reason}");
    if let Some(path) = std::env::var_os("SWITCHYARD_SKIPPED") {
        use std::io::Write as _;
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{test}: {reason}");
        }
    }
}

/// [`skipped`] for a PostgreSQL test without a server; required where
/// `SWITCHYARD_REQUIRE_POSTGRES` is set.
pub fn postgres_unreachable(error: impl std::fmt::Display) {
    skipped(
        "SWITCHYARD_REQUIRE_POSTGRES",
        &format!(
            "PostgreSQL at {} is not reachable ({error})",
            postgres_url()
        ),
    );
}
