//! The dashboard in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (chromedriver) against the real `switchyard serve`. Each page is also photographed at 1280 and
//! 390 px wide (under the target folder's `tmp/dashboard-screenshots/`) and checked by axe-core
//! for serious or critical accessibility violations.
//!
//! Needs `chromedriver` and `chromium` (`SWITCHYARD_CHROMEDRIVER`, `SWITCHYARD_CHROMIUM`, or
//! Debian's paths); without them the test says it is skipped, and fails where
//! `SWITCHYARD_REQUIRE_CHROMIUM` is set, as in CI.
#![cfg(target_os = "linux")]

mod common;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Sandbox;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const DEFINITIONS: &str = r#"
workflows:
  greet:
    description: says hello to whom the input names
    input_schema:
      type: object
      required: [name]
      properties:
        name: {type: string, minLength: 1, description: Who to greet}
    steps:
      - id: hello
        type: transform
        with: {output: {message: "Hello, {{ input.name }}!"}}
      - id: pause
        type: sleep
        needs: [hello]
        with: {duration: 2s}
      - id: done
        type: transform
        needs: [pause]
        with: {output: {text: "{{ steps.hello.output.message }}"}}
  slow:
    steps:
      - id: wait_long
        type: sleep
        with: {duration: 10m}
  flaky:
    retry: {max_retries: 0}
    steps:
      - id: needs_flag
        type: transform
        with: {output: {flag: "{{ vars.release_flag }}"}}
  approve:
    steps:
      - id: ask
        type: wait
        with: {signal: approval, timeout: 1h}
      - id: publish
        type: transform
        needs: [ask]
        with: {output: {approved: "{{ steps.ask.output.ok }}"}}
  batch:
    inputs:
      items: [{name: a, score: 2}, {name: b, score: 4}, {name: c, score: 9}]
    steps:
      - id: score_each
        type: transform
        for_each: "{{ input.items }}"
        parallel: 2
        with: {output: {name: "{{ item.name }}", high: "{{ item.score > 5 }}"}}
      - id: count
        type: transform
        needs: [score_each]
        with: {output: {scored: "{{ steps.score_each.output | length }}"}}
  speak:
    steps:
      - id: fetch
        type: http
        with: {url: "FILES/audio"}
  nightly:
    schedule: "0 3 * * *"
    steps:
      - id: tick
        type: noop
"#;

const PASSWORD: &str = "correct horse battery";
const AXE: &str = include_str!("../engine/src/dashboard/vendor/axe.min.js");

fn executable(env: &str, debian: &str) -> Option<PathBuf> {
    match std::env::var_os(env) {
        Some(path) => Some(PathBuf::from(path)),
        None => Path::new(debian).exists().then(|| PathBuf::from(debian)),
    }
}

/// chromedriver on a free port of 127.0.0.1, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    /// Ends chromedriver and the Chromium it started, which is in its process group: a test
    /// that fails before it closes its browser leaves none behind.
    fn drop(&mut self) {
        if let Some(group) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(binary: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            // Its own process group, which the browsers it starts join.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn browser(&self, chromium: &Path) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1280,900", "--hide-scrollbars",
                         "--force-device-scale-factor=1"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

/// A browser on the dashboard at `base`.
struct Page {
    client: Client,
    base: String,
    shots: PathBuf,
    /// The sandbox's folder: its server's log, for a failure to show.
    dir: PathBuf,
}

impl Page {
    async fn open(&self, path: &str) {
        if let Err(e) = self.client.goto(&format!("{}{path}", self.base)).await {
            let log = std::fs::read_to_string(self.dir.join("proc-0.log")).unwrap_or_default();
            panic!("{path}: {e}\nserver log:\n{log}");
        }
    }

    /// The text of `css`, once the page has one (a page a click asked for may still load).
    async fn text(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.text().await,
                Err(e) => Err(e),
            };
            match found {
                Ok(text) => return text,
                Err(e) if Instant::now() > deadline => panic!("{css}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap()
            .is_empty()
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap();
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_owned()
    }

    /// Waits, without reloading, until `css`'s text contains `text`.
    async fn wait_text(&self, css: &str, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let found = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if found.contains(text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never read {text:?}; it reads {found:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn login(&self, user: &str) {
        self.open("/login").await;
        self.fill("#username", user).await;
        self.fill("#password", PASSWORD).await;
        self.click("form button[type=submit]").await;
        self.wait_path("/").await;
    }

    async fn logout(&self) {
        self.click(".who button").await;
        self.wait_path("/login").await;
    }

    /// Waits until the browser is on `path` (a form's answer may take a moment).
    async fn wait_path(&self, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.path().await != path {
            if Instant::now() > deadline {
                panic!(
                    "never reached {path}; on {}:\n{}",
                    self.path().await,
                    self.text("main").await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the browser is on a page whose path starts with `prefix`, and returns it.
    async fn wait_under(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let path = self.path().await;
            if path.starts_with(prefix) {
                return path;
            }
            if Instant::now() > deadline {
                panic!(
                    "never under {prefix}; on {path}:\n{}",
                    self.text("main").await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Photographs the whole page at `width`, and checks it with axe-core.
    async fn survey(&self, name: &str) {
        for width in [1280u32, 390] {
            self.client.set_window_size(width, 900).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            // The whole page: the window as tall as the page is at this width, twice, since
            // a taller window may change how the page flows.
            for _ in 0..2 {
                let height = self
                    .client
                    .execute(
                        "return Math.min(8000, document.documentElement.scrollHeight \
                         + Math.max(0, window.outerHeight - window.innerHeight));",
                        vec![],
                    )
                    .await
                    .unwrap()
                    .as_u64()
                    .unwrap_or(900) as u32;
                self.client
                    .set_window_size(width, height.max(600))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(self.shots.join(format!("{name}-{width}.png")), png).unwrap();
            self.accessible(&format!("{name} at {width} px")).await;
            let elsewhere = self
                .client
                .execute(
                    "return performance.getEntriesByType('resource').map(e => e.name) \
                     .filter(n => !n.startsWith(location.origin + '/'));",
                    vec![],
                )
                .await
                .unwrap();
            assert_eq!(elsewhere, json!([]), "{name} loaded from another host");
        }
        self.client.set_window_size(1280, 900).await.unwrap();
    }

    async fn accessible(&self, what: &str) {
        let loaded = self
            .client
            .execute(&format!("{AXE}\n;return typeof window.axe;"), vec![])
            .await
            .unwrap();
        assert_eq!(loaded, json!("object"), "axe-core did not load in {what}");
        let found = self
            .client
            .execute_async(
                r#"const done = arguments[arguments.length - 1];
                axe.run(document, {resultTypes: ["violations"]}).then(r => done(
                    r.violations.filter(v => v.impact === "serious" || v.impact === "critical")
                      .map(v => ({id: v.id, impact: v.impact, help: v.help,
                                  nodes: v.nodes.slice(0, 5).map(n => n.target.join(" "))}))
                )).catch(e => done({error: String(e)}));"#,
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(found, json!([]), "axe-core found in {what}: {found:#}");
    }
}

fn add_user(sandbox: &Sandbox, name: &str, role: &str) {
    let out = sandbox
        .command()
        .env("SWITCHYARD_PASSWORD", PASSWORD)
        .args(["user", "add", name, "--role", role])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The run id of the run page the browser goes to.
async fn run_id(page: &Page) -> String {
    let path = page.wait_under("/runs/").await;
    path["/runs/".len()..].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_and_mends_workflows_in_the_browser_and_a_viewer_only_looks() {
    let (Some(driver), Some(chromium)) = (
        executable("SWITCHYARD_CHROMEDRIVER", "/usr/bin/chromedriver"),
        executable("SWITCHYARD_CHROMIUM", "/usr/bin/chromium"),
    ) else {
        switchyard_engine::testing::skipped(
            "SWITCHYARD_REQUIRE_CHROMIUM",
            "no chromedriver and chromium to drive the dashboard with: set \
             SWITCHYARD_CHROMEDRIVER and SWITCHYARD_CHROMIUM (.ci/run installs Debian's)",
        );
        return;
    };
    // A file server for a step that keeps what it fetched as an artifact.
    let audio: Vec<u8> = (0..50_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let served = audio.clone();
    let files = common::serve_in_thread(axum::Router::new().route(
        "/audio",
        axum::routing::get(move || {
            let audio = served.clone();
            async move { ([("content-type", "audio/mpeg")], audio) }
        }),
    ));
    let mut sandbox = Sandbox::new("dashboard", &DEFINITIONS.replace("FILES", &files));
    add_user(&sandbox, "olga", "operator");
    add_user(&sandbox, "vera", "viewer");
    add_user(&sandbox, "ada", "admin");
    let base = sandbox.serve_api(&[]);
    let driver = Driver::start(&driver);
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let page = Page {
        client: driver.browser(&chromium).await,
        base: base.clone(),
        shots,
        dir: sandbox.dir.clone(),
    };

    // Every page needs a login, and its headers keep it out of frames and inline scripts.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let reply = http.get(format!("{base}/runs")).send().await.unwrap();
    assert_eq!(reply.status(), 303);
    assert_eq!(reply.headers()["location"], "/login?next=/runs");
    let reply = http.get(format!("{base}/login")).send().await.unwrap();
    let csp = reply.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(reply.headers()["x-frame-options"], "DENY");

    page.open("/login").await;
    page.survey("login").await;
    page.login("olga").await;

    // Start a run with input: the schema refuses an empty name, then the run finishes on its page
    // without a reload.
    page.open("/workflows/greet").await;
    page.fill("#in-name", "").await;
    page.client
        .execute(
            "document.getElementById('in-name').removeAttribute('required');",
            vec![],
        )
        .await
        .unwrap();
    page.click("#start").await;
    page.wait_text(".problem", "input_schema", Duration::from_secs(30))
        .await;
    page.fill("#in-name", "Ada").await;
    page.click("#start").await;
    let greet = run_id(&page).await;
    page.client
        .execute(
            "document.body.setAttribute('data-loaded-once', 'yes');",
            vec![],
        )
        .await
        .unwrap();
    page.wait_text("#run-status", "succeeded", Duration::from_secs(30))
        .await;
    assert!(
        page.has("body[data-loaded-once='yes']").await,
        "the page was reloaded"
    );
    assert!(page.text("#run-output").await.contains("Hello, Ada!"));
    page.survey("run-succeeded").await;

    // New runs appear in the list as they start, without a reload.
    page.open("/runs").await;
    page.client
        .execute(
            "document.body.setAttribute('data-loaded-once', 'yes');",
            vec![],
        )
        .await
        .unwrap();
    let reply = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": "olga", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    let token: Value = reply.json().await.unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let slow = start_over_api(&http, &base, &token, "slow").await;
    page.wait_text(&format!("#run-{slow}"), "slow", Duration::from_secs(30))
        .await;
    assert!(
        page.has("body[data-loaded-once='yes']").await,
        "the list was reloaded"
    );
    assert!(page.has(&format!("#run-{greet}")).await);
    page.survey("runs").await;

    // A section opened on a running run's page stays open as the page follows the run.
    page.open(&format!("/runs/{slow}")).await;
    page.click("#input-details summary").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        page.has("#input-details[open]").await,
        "the live refresh closed the section"
    );

    // A file a step kept is linked from its run, and served as the API serves it: sandboxed.
    let speak = start_over_api(&http, &base, &token, "speak").await;
    page.open(&format!("/runs/{speak}")).await;
    page.wait_text("#run-status", "succeeded", Duration::from_secs(30))
        .await;
    let link = page
        .client
        .find(Locator::Css("a[href^='/artifacts/']"))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    let session = page
        .client
        .get_named_cookie("switchyard_session")
        .await
        .unwrap();
    let file = http
        .get(format!("{base}{link}"))
        .header("cookie", format!("switchyard_session={}", session.value()))
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), 200);
    assert_eq!(file.headers()["content-type"], "audio/mpeg");
    let policy = file.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("sandbox"), "{policy}");
    assert_eq!(file.bytes().await.unwrap().as_ref(), audio.as_slice());

    // Cancel a run.
    page.open(&format!("/runs/{slow}")).await;
    page.click("#cancel").await;
    page.wait_text("#run-status", "cancelled", Duration::from_secs(30))
        .await;

    // The list filters by status.
    page.open("/runs?status=cancelled").await;
    assert!(page.has(&format!("#run-{slow}")).await);
    assert!(!page.has(&format!("#run-{greet}")).await);

    // Send a signal to a run that waits for one.
    page.open("/workflows/approve").await;
    page.click("#start").await;
    run_id(&page).await;
    page.wait_text("#step-ask summary", "parked", Duration::from_secs(30))
        .await;
    page.fill("#signal-payload", r#"{"ok": true}"#).await;
    page.click("#signal").await;
    page.wait_text("#run-status", "succeeded", Duration::from_secs(30))
        .await;
    assert!(page.text("#run-output").await.contains("true"));

    // Read a failed step's error, set what it missed, retry it.
    page.open("/workflows/flaky").await;
    page.click("#start").await;
    let flaky = run_id(&page).await;
    page.wait_text("#run-status", "failed", Duration::from_secs(30))
        .await;
    let error = page.text("#step-needs_flag .step-error").await;
    assert!(error.contains("release_flag"), "{error}");
    page.survey("run-failed").await;
    // An operator cannot set variables: no admin page in the menu, and the page refuses.
    assert!(!page.has("a[href='/admin']").await);
    page.logout().await;
    page.login("ada").await;
    page.open("/admin").await;
    page.fill("#var-name", "release_flag").await;
    page.fill("#var-value", "\"go\"").await;
    page.click("#variables form.row-form button").await;
    page.wait_text("#variables table", "release_flag", Duration::from_secs(30))
        .await;
    page.fill("#secret-name", "shop_key").await;
    page.fill("#secret-value", "sk-never-shown").await;
    page.click("#secrets form.row-form button").await;
    page.wait_text("#secrets table", "shop_key", Duration::from_secs(30))
        .await;
    let html = page.client.source().await.unwrap();
    assert!(html.contains("shop_key") && !html.contains("sk-never-shown"));
    page.survey("admin").await;
    page.logout().await;
    page.login("olga").await;
    page.open(&format!("/runs/{flaky}")).await;
    page.click("#retry").await;
    page.wait_text("#run-status", "succeeded", Duration::from_secs(30))
        .await;
    assert!(page.text("#run-output").await.contains("go"));

    // Pause a schedule.
    page.open("/workflows/nightly").await;
    assert_eq!(page.text("#paused").await, "no");
    page.click("#pause").await;
    page.wait_text("#paused", "yes", Duration::from_secs(30))
        .await;
    assert!(page.has("#resume").await);
    page.survey("workflow").await;

    // A form posted without the session's token is refused, and changes nothing.
    let session = page
        .client
        .get_named_cookie("switchyard_session")
        .await
        .unwrap();
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(
        session.same_site().map(|s| format!("{s:?}")).as_deref(),
        Some("Strict")
    );
    let cookie = format!("switchyard_session={}", session.value());
    for body in ["", "csrf=forged"] {
        let reply = http
            .post(format!("{base}/workflows/nightly/resume"))
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 403, "a post with {body:?} was not refused");
    }
    page.open("/workflows/nightly").await;
    assert_eq!(page.text("#paused").await, "yes");

    // A loop's items, each with its state and output.
    page.open("/workflows/batch").await;
    page.click("#start").await;
    run_id(&page).await;
    page.wait_text("#run-status", "succeeded", Duration::from_secs(30))
        .await;
    page.click("#step-score_each summary").await;
    let items = page.text("#step-score_each table").await;
    assert!(
        items.contains("\"name\":\"c\"") && items.contains("\"high\":true"),
        "{items}"
    );
    page.survey("run-loop").await;

    // Older runs are a cursor page away.
    for _ in 0..50 {
        let reply = http
            .post(format!("{base}/api/workflows/nightly/start"))
            .bearer_auth(&token)
            .json(&json!({"input": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 201);
    }
    page.open("/runs").await;
    assert_eq!(
        page.client
            .find_all(Locator::Css("tbody tr"))
            .await
            .unwrap()
            .len(),
        50
    );
    page.click("a[rel=next]").await;
    page.wait_text("main", "Newest", Duration::from_secs(30))
        .await;
    assert!(
        page.has(&format!("#run-{greet}")).await,
        "the first run is on the second page"
    );

    for (name, path) in [
        ("overview", "/"),
        ("workflows", "/workflows"),
        ("fires", "/fires"),
        ("webhooks", "/webhooks"),
        ("notifications", "/notifications"),
        ("alerts", "/alerts"),
        ("usage", "/usage"),
    ] {
        page.open(path).await;
        page.survey(name).await;
    }
    page.logout().await;

    // A viewer sees no operator button, and the server refuses the action anyway: on a run that
    // waits for a signal, an operator would find cancel and the signal form.
    let waiting = start_over_api(&http, &base, &token, "approve").await;
    page.login("vera").await;
    page.open(&format!("/runs/{waiting}")).await;
    page.wait_text("#step-ask summary", "parked", Duration::from_secs(30))
        .await;
    assert!(page.text("#run-status").await.contains("running"));
    assert!(!page.has("#cancel").await && !page.has("#signal-form").await);
    page.open(&format!("/runs/{slow}")).await;
    assert!(!page.has("#retry").await && !page.has("#cancel").await);
    page.open("/workflows/greet").await;
    assert!(!page.has("#start").await && !page.has("#start-form").await);
    page.open("/workflows/nightly").await;
    assert!(!page.has("#resume").await && !page.has("#pause").await);
    let csrf = page
        .client
        .find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let viewer = page
        .client
        .get_named_cookie("switchyard_session")
        .await
        .unwrap();
    let reply = http
        .post(format!("{base}/workflows/nightly/resume"))
        .header("cookie", format!("switchyard_session={}", viewer.value()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 403);
    let reply = http
        .get(format!("{base}/admin"))
        .header("cookie", format!("switchyard_session={}", viewer.value()))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 403);

    // Logging out ends the session on the server, not only in the browser.
    page.logout().await;
    let reply = http
        .get(format!("{base}/runs"))
        .header("cookie", format!("switchyard_session={}", viewer.value()))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 303, "a logged-out session still works");
    // A page's live part, asked for by htmx once the session ended, sends the whole page to the
    // login, and back to that page after it.
    let reply = http
        .get(format!("{base}/runs/{slow}/live"))
        .header("cookie", format!("switchyard_session={}", viewer.value()))
        .header("hx-request", "true")
        .header("hx-current-url", format!("{base}/runs/{slow}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        reply
            .headers()
            .get("hx-redirect")
            .and_then(|v| v.to_str().ok()),
        Some(format!("/login?next=/runs/{slow}").as_str()),
        "{:?}",
        reply.headers()
    );

    page.client.close().await.unwrap();
    drop(sandbox);
}

/// Starts a run of `workflow` over the API with `token`; returns its id.
async fn start_over_api(http: &reqwest::Client, base: &str, token: &str, workflow: &str) -> String {
    let started: Value = http
        .post(format!("{base}/api/workflows/{workflow}/start"))
        .bearer_auth(token)
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    started["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{workflow} did not start: {started}"))
        .to_owned()
}
