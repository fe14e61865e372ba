//! Embedding on PostgreSQL: a run enqueued in the caller's transaction exists only if that
//! transaction commits, and workers hear of it through `LISTEN/NOTIFY` at the commit.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchyard_engine::clock::SystemClock;
use switchyard_engine::definition::{Format, WorkflowMap, parse_str};
use switchyard_engine::plan::Trigger;
use switchyard_engine::service::{Engine, EngineError};
use switchyard_engine::store::{ClaimParams, DefinitionOrigin, PostgresStore, Store};

struct Db {
    store: Arc<PostgresStore>,
    engine: Engine,
    app: sqlx::PgPool,
    schema: String,
}

/// A migrated schema of its own, or `None` (said to be skipped) without a server, unless
/// `SWITCHYARD_REQUIRE_POSTGRES` is set, as in CI.
async fn open() -> Option<Db> {
    let base = switchyard_engine::testing::postgres_url();
    let schema = format!("embedding_{}_{}", std::process::id(), rand_suffix());
    let url = format!("{base}?options[search_path]={schema}");
    let store = match PostgresStore::connect(&url, 2).await {
        Ok(store) => Arc::new(store),
        Err(e) => {
            switchyard_engine::testing::postgres_unreachable(e);
            return None;
        }
    };
    store.migrate().await.unwrap();
    let engine = Engine::new(store.clone(), Arc::new(SystemClock));
    let mut workflows = WorkflowMap::new();
    for wf in parse_str(
        "order.yaml",
        "id: order\nsteps:\n  - {id: a, type: noop}\n",
        Format::Yaml,
    )
    .unwrap()
    {
        workflows.insert(wf.id.clone(), Arc::new(wf));
    }
    engine
        .install(&workflows, DefinitionOrigin::Files, None)
        .await
        .unwrap();
    let app = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE orders (id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL)")
        .execute(&app)
        .await
        .unwrap();
    Some(Db {
        store,
        engine,
        app,
        schema,
    })
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

impl Db {
    async fn enqueue_with_order(&self) -> (sqlx::Transaction<'static, sqlx::Postgres>, String) {
        let mut tx = self.app.begin().await.unwrap();
        let run = self
            .engine
            .plan("order", json!({}), Trigger::default())
            .await
            .unwrap();
        let id = self
            .store
            .enqueue_in(&mut tx, vec![run], self.engine.now())
            .await
            .unwrap()
            .remove(0);
        sqlx::query("INSERT INTO orders (run_id) VALUES ($1)")
            .bind(&id)
            .execute(&mut *tx)
            .await
            .unwrap();
        (tx, id)
    }

    async fn remove(self) {
        sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
            .execute(&self.app)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn run_enqueued_in_a_committed_transaction_exists_with_the_callers_row() {
    let Some(db) = open().await else { return };
    let (tx, id) = db.enqueue_with_order().await;
    assert!(
        matches!(db.engine.run(&id).await, Err(EngineError::UnknownRun(_))),
        "the run is visible before its transaction commits"
    );
    tx.commit().await.unwrap();
    assert_eq!(
        db.engine.run(&id).await.unwrap().summary.workflow_id,
        "order"
    );
    let now = db.engine.now();
    let claimed = db
        .store
        .claim(ClaimParams {
            limit: 10,
            now,
            lease_until: now + 30_000,
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].run_id, id);
    db.remove().await;
}

#[tokio::test]
async fn run_enqueued_in_a_rolled_back_transaction_never_exists() {
    let Some(db) = open().await else { return };
    let (tx, id) = db.enqueue_with_order().await;
    tx.rollback().await.unwrap();
    assert!(matches!(
        db.engine.run(&id).await,
        Err(EngineError::UnknownRun(_))
    ));
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db.app)
        .await
        .unwrap();
    assert_eq!(orders, 0);
    db.remove().await;
}

#[tokio::test]
async fn workers_are_woken_through_listen_when_the_callers_transaction_commits() {
    let Some(db) = open().await else { return };
    let wakeup = db.store.wakeup();
    // The listener wakes everyone once when it connects; take that wake-up first.
    tokio::time::timeout(Duration::from_secs(10), wakeup.notified())
        .await
        .expect("the LISTEN connection comes up");
    let (tx, _) = db.enqueue_with_order().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), wakeup.notified())
            .await
            .is_err(),
        "woken before the commit"
    );
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), wakeup.notified())
        .await
        .expect("a wake-up after the commit");
    db.remove().await;
}
