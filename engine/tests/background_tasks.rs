//! The engine's background loops end when told to, and also when whoever could tell them is gone.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use switchyard_engine::clock::{ManualClock, SystemClock};
use switchyard_engine::definition::{Format, parse_str};
use switchyard_engine::scheduler::MAX_CATCH_UP;
use switchyard_engine::service::Engine;
use switchyard_engine::store::DefinitionOrigin;
use tokio::sync::watch;

async fn engine(dir: &std::path::Path) -> Arc<Engine> {
    let url = format!("sqlite://{}/store.db", dir.display());
    let store = switchyard_engine::store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Arc::new(Engine::new(store, Arc::new(SystemClock)))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn maintenance_and_scheduler_stop_when_their_shutdown_sender_is_dropped() {
    let dir = temp_dir("background");
    let engine = engine(&dir).await;
    let (tx, rx) = watch::channel(false);
    let maintenance = tokio::spawn(switchyard_engine::maintenance::run_maintenance(
        engine.clone(),
        rx.clone(),
    ));
    let scheduler = tokio::spawn(switchyard_engine::scheduler::run_scheduler(
        engine.clone(),
        Arc::new(switchyard_engine::health::Heartbeats::default()),
        rx,
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), maintenance)
        .await
        .expect("maintenance kept running without a sender")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), scheduler)
        .await
        .expect("scheduler kept running without a sender")
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_scheduled_fire_whose_input_fails_the_schema_is_recorded_refused_with_an_alert() {
    // Half past a minute (2027-01-15T08:00:30Z): the next fire is 30 s away.
    let start = 1_800_000_030_000;
    let clock = ManualClock::new(start);
    let yaml = "\
id: digest
schedule: \"* * * * *\"
input_schema: {type: object, required: [topic]}
steps:
  - {id: a, type: noop}
";
    let (engine, dir) = engine_with("refused-fire", &clock, yaml).await;
    clock.set(start + 31_000);
    switchyard_engine::scheduler::tick(&engine).await.unwrap();
    // The same fire again (a second scheduler, a tick repeated) adds nothing.
    switchyard_engine::scheduler::tick(&engine).await.unwrap();

    let fires = engine.fires(Some("digest"), 10).await.unwrap();
    assert_eq!(fires.len(), 1, "{fires:?}");
    assert_eq!(fires[0].run_id, None);
    let reason = fires[0].skipped_reason.as_deref().unwrap();
    assert!(reason.contains("input_schema"), "{reason}");
    let alerts = engine.alerts(Some("digest"), 10).await.unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, "fire_refused");
    assert!(alerts[0].message.contains(reason), "{alerts:?}");
    assert!(engine.runs(&Default::default()).await.unwrap().is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

/// An engine on a fresh SQLite file, on `clock`, with `yaml` installed.
async fn engine_with(name: &str, clock: &ManualClock, yaml: &str) -> (Engine, std::path::PathBuf) {
    let dir = temp_dir(name);
    let _ = std::fs::remove_file(dir.join("store.db"));
    let url = format!("sqlite://{}/store.db", dir.display());
    let store = switchyard_engine::store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let engine = Engine::new(store, Arc::new(clock.clone()));
    let workflows: BTreeMap<_, _> = parse_str("test.yaml", yaml, Format::Yaml)
        .unwrap()
        .into_iter()
        .map(|wf| (wf.id.clone(), Arc::new(wf)))
        .collect();
    engine
        .install(&workflows, DefinitionOrigin::Files, None)
        .await
        .unwrap();
    (engine, dir)
}

#[tokio::test]
async fn after_more_than_a_thousand_missed_periods_every_fire_is_started_or_recorded_skipped() {
    const MISSED: i64 = 1_500;
    let start = 1_800_000_030_000;
    let clock = ManualClock::new(start);
    let yaml = "\
id: minutely
schedule: {cron: \"* * * * *\", catch_up: all, overlap: allow}
steps:
  - {id: a, type: noop}
";
    let (engine, dir) = engine_with("catch-up-all", &clock, yaml).await;
    // The scheduler was down for 1,500 minutes.
    clock.set(start + MISSED * 60_000);
    let mut ticks = 0;
    while switchyard_engine::scheduler::tick(&engine).await.unwrap() == Some(engine.now()) {
        ticks += 1;
        assert!(ticks < 10, "the backlog does not shrink");
    }
    let fires = engine.fires(Some("minutely"), 10_000).await.unwrap();
    assert_eq!(fires.len() as i64, MISSED, "every missed fire is recorded");
    let (started, skipped): (Vec<_>, Vec<_>) = fires.iter().partition(|f| f.run_id.is_some());
    assert_eq!(started.len(), MAX_CATCH_UP);
    let oldest_started = started.iter().map(|f| f.fire_at).min().unwrap();
    assert!(
        skipped.iter().all(|f| f.fire_at < oldest_started
            && f.skipped_reason
                .as_deref()
                .is_some_and(|r| r.contains("catch_up: all"))),
        "the newest are started, the older recorded with a reason"
    );
    let _ = std::fs::remove_dir_all(dir);
}
