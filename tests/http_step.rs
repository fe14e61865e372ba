//! The `http` step against a real server: what it sends, on the real binary.

mod common;

use common::{Sandbox, count, start_counter, step};

#[test]
fn http_step_sends_the_same_idempotency_key_on_every_attempt() {
    let (base, hits) = start_counter();
    // `/flaky/<name>` answers 503 once, then 200: each step takes two attempts.
    let mut sandbox = Sandbox::new(
        "idempotency",
        &format!(
            "id: keyed\nretry: {{max_retries: 2, initial: 50ms}}\nsteps:\n\
             \x20 - {{id: charge, type: http, with: {{url: \"{base}/flaky/charge\"}}}}\n\
             \x20 - {{id: refund, type: http, with: {{url: \"{base}/flaky/refund\"}}}}\n"
        ),
    );
    sandbox.serve();
    let out = sandbox.output_within(&["run", "keyed", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let detail = sandbox.show(&run);
    for id in ["charge", "refund"] {
        assert_eq!(step(&detail, id)["attempt"], 2, "{detail:#}");
        let key = format!("flaky/{id}/{run}:{id}");
        assert_eq!(
            count(&hits, &key),
            2,
            "both attempts of {id} carry `Idempotency-Key: {run}:{id}`; seen: {:?}",
            hits.lock().unwrap()
        );
    }
    let sent: u32 = hits.lock().unwrap().values().sum();
    assert_eq!(sent, 4, "no request without the key: {:?}", hits.lock());
}
