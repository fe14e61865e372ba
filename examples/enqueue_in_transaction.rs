//! Embedding Switchyard: start a run in the same PostgreSQL transaction as your own data, so the
//! order and the run that fulfils it are committed together, or neither is.
//!
//! ```sh
//! cargo run --example enqueue_in_transaction -- 'postgres://postgres@127.0.0.1:5432/test'
//! ```
//!
//! Then `switchyard worker` (or `serve`) on the same database runs `fulfil_order`.

use std::sync::Arc;

use anyhow::Context;
use serde_json::json;
use switchyard_engine::clock::SystemClock;
use switchyard_engine::definition::{Format, WorkflowMap, parse_str};
use switchyard_engine::plan::Trigger;
use switchyard_engine::service::{Engine, EngineError};
use switchyard_engine::store::{DefinitionOrigin, PostgresStore, Store};

const WORKFLOW: &str = r#"
id: fulfil_order
steps:
  - {id: reserve, type: transform, with: {output: {order: "{{ input.order_id }}"}}}
  - {id: notify, type: noop, needs: [reserve]}
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("SWITCHYARD_DATABASE_URL").ok())
        .context("usage: enqueue_in_transaction postgres://USER@HOST/DATABASE")?;

    // Switchyard's side: its store (kept as the concrete type for `enqueue_in`) and engine.
    let store = Arc::new(PostgresStore::connect(&url, 4).await?);
    store.migrate().await?;
    let engine = Engine::new(store.clone(), Arc::new(SystemClock));
    let mut workflows = WorkflowMap::new();
    for workflow in parse_str("fulfil_order.yaml", WORKFLOW, Format::Yaml)? {
        workflows.insert(workflow.id.clone(), Arc::new(workflow));
    }
    engine
        .install(&workflows, DefinitionOrigin::Files, None)
        .await?;

    // The application's side: its own pool and table.
    let app = sqlx::PgPool::connect(&url).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (id BIGSERIAL PRIMARY KEY, item TEXT NOT NULL, \
         run_id TEXT)",
    )
    .execute(&app)
    .await?;

    // Committed: the order and its run exist together.
    let mut tx = app.begin().await?;
    let order: i64 = sqlx::query_scalar("INSERT INTO orders (item) VALUES ($1) RETURNING id")
        .bind("a book")
        .fetch_one(&mut *tx)
        .await?;
    let run = engine
        .plan(
            "fulfil_order",
            json!({ "order_id": order }),
            Trigger::default(),
        )
        .await?;
    let run_id = store
        .enqueue_in(&mut tx, vec![run], engine.now())
        .await?
        .remove(0);
    sqlx::query("UPDATE orders SET run_id = $1 WHERE id = $2")
        .bind(&run_id)
        .bind(order)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let status = engine.run(&run_id).await?.summary.status;
    println!("order {order} committed with run {run_id} ({status})");

    // Rolled back: no order, and no run either.
    let mut tx = app.begin().await?;
    sqlx::query("INSERT INTO orders (item) VALUES ($1)")
        .bind("a mistake")
        .execute(&mut *tx)
        .await?;
    let run = engine
        .plan(
            "fulfil_order",
            json!({ "order_id": -1 }),
            Trigger::default(),
        )
        .await?;
    let lost_id = store
        .enqueue_in(&mut tx, vec![run], engine.now())
        .await?
        .remove(0);
    tx.rollback().await?;
    match engine.run(&lost_id).await {
        Err(EngineError::UnknownRun(_)) => println!("rolled back: run {lost_id} never existed"),
        other => anyhow::bail!("run {lost_id} outlived its rolled-back transaction: {other:?}"),
    }
    Ok(())
}
