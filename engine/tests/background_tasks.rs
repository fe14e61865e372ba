//! The engine's background loops end when told to, and also when whoever could tell them is gone.

use std::sync::Arc;
use std::time::Duration;

use switchyard_engine::clock::SystemClock;
use switchyard_engine::service::Engine;
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
    use std::collections::BTreeMap;
    use switchyard_engine::clock::ManualClock;
    use switchyard_engine::definition::{Format, parse_str};
    use switchyard_engine::store::DefinitionOrigin;

    let dir = temp_dir("refused-fire");
    let _ = std::fs::remove_file(dir.join("store.db"));
    let url = format!("sqlite://{}/store.db", dir.display());
    let store = switchyard_engine::store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    // Half past a minute: the next fire is 30 s away.
    let start = 1_800_007_230_000 - 1_800_007_230_000 % 60_000 + 30_000;
    let clock = ManualClock::new(start);
    let engine = Engine::new(store, Arc::new(clock.clone()));
    let yaml = "\
id: digest
schedule: \"* * * * *\"
input_schema: {type: object, required: [topic]}
steps:
  - {id: a, type: noop}
";
    let workflows: BTreeMap<_, _> = parse_str("digest.yaml", yaml, Format::Yaml)
        .unwrap()
        .into_iter()
        .map(|wf| (wf.id.clone(), Arc::new(wf)))
        .collect();
    engine
        .install(&workflows, DefinitionOrigin::Files, None)
        .await
        .unwrap();
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
