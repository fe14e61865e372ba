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
