//! Queue benchmarks, side by side on SQLite (durable: WAL, synchronous=FULL) and PostgreSQL
//! (durable commits). `cargo bench --bench queue [-- NAME]` prints, as measured on this machine:
//! - drain: no-op jobs per second emptying a backlog of 100k one-step runs
//! - latency: enqueue-to-start p50/p99 under steady load
//! - 40 sequential no-op steps: time of one run
//! - fan-out: a master starting 7 children of 3 steps each and aggregating
//! - priority: start delay of urgent runs behind a backlog of 100k low-priority jobs
//! - loop: one run's `for_each` over 10k no-op items against 10k queued one-step runs
//! - claim: time of one claim of 100 jobs with 10k and with 1M queued
//! - peak RSS (SQLite)
//!
//! `SWITCHYARD_BENCH_STORES` (default `sqlite,postgres`) picks the stores;
//! `SWITCHYARD_BENCH_POSTGRES` (default the local `test` database, without TLS) is where
//! PostgreSQL runs, in a schema `bench_queue_N` per measurement, all dropped when the bench ends.
//!
//! Timing comes from a `probe` step kind (also an example of a custom step kind) that reports the
//! instant it runs, so the figures include no polling by the benchmark itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use switchyard_engine::clock::SystemClock;
use switchyard_engine::definition::{Format, Workflow, WorkflowMap, parse_str};
use switchyard_engine::plan::{Trigger, plan_run};
use switchyard_engine::service::Engine;
use switchyard_engine::store::{ClaimParams, DefinitionOrigin, NewRun, RunFilter, Store};
use switchyard_workers::{Registry, StepCall, StepKind, StepOutcome, StepResult, WorkerConfig};
use tokio::sync::{mpsc, watch};

/// Reports `(input.n, now)` each time it runs.
struct Probe(mpsc::UnboundedSender<(u64, Instant)>);

#[async_trait]
impl StepKind for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }
    fn with_schema(&self) -> Value {
        serde_json::json!({})
    }
    async fn run(&self, call: StepCall) -> StepResult {
        let n = call.with.get("n").and_then(Value::as_u64).unwrap_or(0);
        let _ = self.0.send((n, Instant::now()));
        Ok(StepOutcome::Output(Value::Null))
    }
}

const DEFINITIONS: &str = r#"
workflows:
  one_noop:
    steps: [{id: a, type: noop}]
  loop_noop:
    steps: [{id: each, type: noop, for_each: "{{ input.items }}"}]
  probe_once:
    steps: [{id: a, type: probe, with: {n: "{{ input.n }}"}}]
  child3:
    steps:
      - {id: a, type: noop}
      - {id: b, type: noop, needs: [a]}
      - {id: c, type: noop, needs: [b]}
  master:
    steps:
      - {id: fan, type: workflow, with: {workflow: child3, for_each: "{{ [1, 2, 3, 4, 5, 6, 7] }}"}}
      - {id: done, type: probe, needs: [fan], with: {n: "{{ steps.fan.output | length }}"}}
"#;

fn sequential() -> String {
    let mut yaml = String::from("id: seq40\nsteps:\n  - {id: s0, type: noop}\n");
    for i in 1..39 {
        yaml.push_str(&format!(
            "  - {{id: s{i}, type: noop, needs: [s{}]}}\n",
            i - 1
        ));
    }
    yaml.push_str("  - {id: s39, type: probe, needs: [s38], with: {n: 40}}\n");
    yaml
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite,
    Postgres(String),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// A fresh, migrated database for one measurement.
    async fn fresh(&self, dir: &std::path::Path) -> Arc<dyn Store> {
        let url = match self {
            Backend::Sqlite => format!("sqlite://{}/bench.db", dir.display()),
            Backend::Postgres(base) => {
                // A schema per measurement: the last one's tasks may still be winding down.
                use std::sync::atomic::{AtomicUsize, Ordering};
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let sep = if base.contains('?') { '&' } else { '?' };
                format!("{base}{sep}options[search_path]=bench_queue_{n}")
            }
        };
        let store = switchyard_engine::store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    /// Drops the schemas of earlier measurements, and of earlier runs of the bench.
    async fn clean_up(&self) {
        if let Backend::Postgres(base) = self {
            let admin = sqlx::PgPool::connect(base).await.unwrap();
            let schemas: Vec<String> = sqlx::query_scalar(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench\\_queue\\_%'",
            )
            .fetch_all(&admin)
            .await
            .unwrap();
            for schema in schemas {
                sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                    .execute(&admin)
                    .await
                    .unwrap();
            }
            admin.close().await;
        }
    }
}

struct Bench {
    engine: Arc<Engine>,
    versions: std::collections::BTreeMap<String, (i64, Arc<Workflow>)>,
    probes: mpsc::UnboundedReceiver<(u64, Instant)>,
    /// For the `probe` kind of more workers.
    probe: mpsc::UnboundedSender<(u64, Instant)>,
    stop: watch::Sender<bool>,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Stops the bench's worker and maintenance tasks, so they do not load the next measurement.
impl Drop for Bench {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl Bench {
    async fn new(backend: &Backend, slots: usize) -> Bench {
        let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = backend.fresh(&dir).await;
        let engine = Arc::new(Engine::new(store, Arc::new(SystemClock)));
        let mut workflows = WorkflowMap::new();
        for text in [DEFINITIONS.to_owned(), sequential()] {
            for wf in parse_str("bench.yaml", &text, Format::Yaml).unwrap() {
                workflows.insert(wf.id.clone(), Arc::new(wf));
            }
        }
        let versions = engine
            .install(&workflows, DefinitionOrigin::Files, None)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, v)| {
                let wf = workflows[&id].clone();
                (id, (v, wf))
            })
            .collect();
        let (probe, probes) = mpsc::unbounded_channel();
        let mut registry = Registry::builtin();
        registry.add(Probe(probe.clone()));
        let (stop, stopped) = watch::channel(false);
        let config = WorkerConfig {
            slots,
            ..WorkerConfig::default()
        };
        tokio::spawn(switchyard_workers::run_worker(
            engine.clone(),
            registry,
            config,
            stopped.clone(),
        ));
        tokio::spawn(switchyard_engine::maintenance::run_maintenance(
            engine.clone(),
            stopped,
        ));
        Bench {
            engine,
            versions,
            probes,
            probe,
            stop,
            _dir: tempdir::Dir(dir),
        }
    }

    fn plan(&self, id: &str, input: Value) -> NewRun {
        self.plan_at(id, input, None)
    }

    /// A run at `priority` instead of its workflow's.
    fn plan_at(&self, id: &str, input: Value, priority: Option<i32>) -> NewRun {
        let (version, wf) = &self.versions[id];
        let trigger = Trigger {
            priority,
            ..Trigger::default()
        };
        plan_run(wf, *version, input, trigger).unwrap()
    }

    async fn unfinished(&self) -> bool {
        !self
            .engine
            .runs(&RunFilter {
                status: Some(switchyard_engine::state::RunStatus::Running),
                limit: 1,
                ..RunFilter::default()
            })
            .await
            .unwrap()
            .is_empty()
    }
}

impl Bench {
    /// A bench whose own worker is stopped, with `jobs` one-step runs queued.
    async fn queued(backend: &Backend, jobs: usize) -> Bench {
        Bench::queued_at(backend, jobs, None).await
    }

    /// The same, the runs at `priority`.
    async fn queued_at(backend: &Backend, jobs: usize, priority: Option<i32>) -> Bench {
        let bench = Bench::new(backend, 1).await;
        bench.stop.send_replace(true);
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..jobs / 1_000 {
            let runs = (0..1_000)
                .map(|_| bench.plan_at("one_noop", Value::Null, priority))
                .collect();
            bench
                .engine
                .store()
                .create_runs(runs, bench.engine.now())
                .await
                .unwrap();
        }
        bench
    }
}

/// `loops` worker loops of `slots` each empty a backlog of 100k one-step runs.
async fn drain(backend: &Backend, loops: usize, slots: usize) {
    const JOBS: usize = 100_000;
    let (rate, secs, rss_queued) = drain_rate(backend, JOBS, loops, slots).await;
    println!(
        "[{}] drain 100k queued no-op jobs, {loops} worker loop(s) x {slots} slots: {rate:.0} jobs/s ({secs:.2} s); peak RSS of the process so far: {rss_queued:.1} MiB",
        backend.name(),
    );
}

/// Jobs per second (and seconds) of `loops` worker loops of `slots` emptying a backlog of `jobs`
/// one-step runs, and the peak RSS once they were queued.
async fn drain_rate(backend: &Backend, jobs: usize, loops: usize, slots: usize) -> (f64, f64, f64) {
    // Enqueue first with no worker running, then measure the drain alone.
    let bench = Bench::queued(backend, jobs).await;
    let rss_queued = peak_rss_mib();
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    for _ in 0..loops {
        tokio::spawn(switchyard_workers::run_worker(
            bench.engine.clone(),
            Registry::builtin(),
            WorkerConfig {
                slots,
                ..WorkerConfig::default()
            },
            stopped.clone(),
        ));
    }
    while bench.unfinished().await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    stop.send_replace(true);
    (jobs as f64 / secs, secs, rss_queued)
}

/// One run whose `for_each` has 10k no-op items, from its start to its end, against the drain
/// of 10k queued one-step runs by the same worker: what a loop costs over separate jobs.
async fn loop_items(backend: &Backend) {
    const ITEMS: usize = 10_000;
    let (separate, _, _) = drain_rate(backend, ITEMS, 1, 1_000).await;
    let bench = Bench::new(backend, 1_000).await;
    let items: Vec<usize> = (0..ITEMS).collect();
    let run = bench.plan("loop_noop", json!({ "items": items }));
    let started = Instant::now();
    bench
        .engine
        .store()
        .create_runs(vec![run], bench.engine.now())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    while bench.unfinished().await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let looped = ITEMS as f64 / started.elapsed().as_secs_f64();
    println!(
        "[{}] for_each of 10k no-op items: {looped:.0} items/s; 10k queued one-step runs: {separate:.0} jobs/s; the loop at {:.0}% of separate jobs",
        backend.name(),
        looped / separate * 100.0
    );
}

/// One claim of 100 jobs, with `queued` jobs waiting: the claim must not slow down as the
/// backlog grows.
async fn claim_time(backend: &Backend, queued: usize) {
    let bench = Bench::queued(backend, queued).await;
    let store = bench.engine.store();
    let mut times = Vec::new();
    for _ in 0..30 {
        let now = bench.engine.now();
        let start = Instant::now();
        let got = store
            .claim(ClaimParams {
                limit: 100,
                now,
                lease_until: now + 60_000,
            })
            .await
            .unwrap();
        times.push(start.elapsed());
        assert_eq!(got.len(), 100);
    }
    times.sort();
    println!(
        "[{}] claim of 100 with {queued} queued: median {:.2} ms, p90 {:.2} ms",
        backend.name(),
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() * 9 / 10].as_secs_f64() * 1e3
    );
}

async fn latency(backend: &Backend) {
    const RATE: u64 = 500; // runs per second
    let mut bench = Bench::new(backend, 64).await;
    let delays = start_delays(&mut bench, 2_000, RATE, None).await;
    println!(
        "[{}] enqueue-to-start latency at {RATE} runs/s: p50 {:.2} ms, p99 {:.2} ms",
        backend.name(),
        percentile_ms(&delays, 0.50),
        percentile_ms(&delays, 0.99)
    );
}

/// Starts `runs` probe runs at `rate` a second (at `priority`), and returns how long each took
/// from its enqueue to the start of its step, sorted.
async fn start_delays(
    bench: &mut Bench,
    runs: u64,
    rate: u64,
    priority: Option<i32>,
) -> Vec<Duration> {
    let mut sent = vec![None; runs as usize];
    let mut delays = Vec::with_capacity(runs as usize);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for n in 0..runs {
        tick.tick().await;
        let run = bench.plan_at("probe_once", json!({ "n": n }), priority);
        sent[n as usize] = Some(Instant::now());
        bench
            .engine
            .store()
            .create_runs(vec![run], bench.engine.now())
            .await
            .unwrap();
        while let Ok((n, at)) = bench.probes.try_recv() {
            delays.push(at - sent[n as usize].unwrap());
        }
    }
    while delays.len() < runs as usize {
        let (n, at) = bench.probes.recv().await.unwrap();
        delays.push(at - sent[n as usize].unwrap());
    }
    delays.sort();
    delays
}

/// The `p` quantile of sorted `delays`, in milliseconds.
fn percentile_ms(delays: &[Duration], p: f64) -> f64 {
    delays[((delays.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e3
}

/// The start delay of urgent runs (priority 10) while a worker drains a backlog of 100k
/// low-priority jobs (-10) ahead of them in time.
async fn priority_delay(backend: &Backend) {
    const RATE: u64 = 100; // urgent runs per second
    let mut bench = Bench::queued_at(backend, 100_000, Some(-10)).await;
    let (stop, stopped) = watch::channel(false);
    let mut registry = Registry::builtin();
    registry.add(Probe(bench.probe.clone()));
    tokio::spawn(switchyard_workers::run_worker(
        bench.engine.clone(),
        registry,
        WorkerConfig {
            slots: 1_000,
            ..WorkerConfig::default()
        },
        stopped,
    ));
    let delays = start_delays(&mut bench, 200, RATE, Some(10)).await;
    let backlog_left = bench.engine.queue_depth().await.unwrap_or(-1);
    stop.send_replace(true);
    println!(
        "[{}] start delay of priority-10 runs at {RATE}/s behind 100k queued priority -10 jobs: \
         p50 {:.2} ms, p99 {:.2} ms ({backlog_left} of the backlog still queued at the end)",
        backend.name(),
        percentile_ms(&delays, 0.50),
        percentile_ms(&delays, 0.99)
    );
}

async fn timed_runs(backend: &Backend, name: &str, workflow: &str, repeat: usize) {
    let mut bench = Bench::new(backend, 64).await;
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let run = bench.plan(workflow, Value::Null);
        let start = Instant::now();
        bench
            .engine
            .store()
            .create_runs(vec![run], bench.engine.now())
            .await
            .unwrap();
        let (_, at) = bench.probes.recv().await.unwrap();
        times.push(at - start);
        // let the run's last completion commit before the next one starts
        while bench.unfinished().await {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    times.sort();
    let median = times[times.len() / 2].as_secs_f64() * 1e3;
    let best = times[0].as_secs_f64() * 1e3;
    println!(
        "[{}] {name}: median {median:.1} ms, best {best:.1} ms over {repeat} runs",
        backend.name()
    );
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "switchyard queue benchmarks, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    let postgres = std::env::var("SWITCHYARD_BENCH_POSTGRES")
        // Loopback: no TLS, which the server offers and sqlx would otherwise negotiate
        // (`sslmode=prefer`); it costs a few percent (README).
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".to_owned());
    let backends: Vec<Backend> = std::env::var("SWITCHYARD_BENCH_STORES")
        .unwrap_or_else(|_| "sqlite,postgres".to_owned())
        .split(',')
        .map(|name| match name.trim() {
            "sqlite" => Backend::Sqlite,
            "postgres" => Backend::Postgres(postgres.clone()),
            other => panic!("unknown store {other:?}: sqlite or postgres"),
        })
        .collect();
    runtime.block_on(async {
        for backend in &backends {
            backend.clean_up().await;
            if wants("sequential") {
                timed_runs(backend, "one run of 40 sequential no-op steps", "seq40", 20).await;
            }
            if wants("fanout") {
                timed_runs(
                    backend,
                    "master fanning out to 7 children x 3 steps, aggregated",
                    "master",
                    20,
                )
                .await;
            }
            if wants("latency") {
                latency(backend).await;
            }
            if wants("drain") {
                drain(backend, 1, 1_000).await;
                if matches!(backend, Backend::Postgres(_)) {
                    drain(backend, 4, 250).await;
                }
            }
            if wants("priority") {
                priority_delay(backend).await;
            }
            if wants("loop") {
                loop_items(backend).await;
            }
            if wants("claim") {
                claim_time(backend, 10_000).await;
                claim_time(backend, 1_000_000).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            backend.clean_up().await;
        }
    });
    println!(
        "peak RSS of the whole benchmark process: {:.1} MiB",
        peak_rss_mib()
    );
}
