//! Encrypted connections to PostgreSQL: `sslmode=require` in the database URL makes the store
//! connect over TLS (and refuse to connect without it).

use switchyard_engine::store::{PostgresStore, Reads, Store};

#[tokio::test]
async fn sslmode_require_connects_the_store_over_tls() {
    let base = switchyard_engine::testing::postgres_url();
    let plain = match sqlx::PgPool::connect(&base).await {
        Ok(pool) => pool,
        Err(e) => {
            switchyard_engine::testing::postgres_unreachable(e);
            return;
        }
    };
    let offered: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&plain)
        .await
        .unwrap();
    if offered != "on" {
        // CI turns TLS on for its server, and sets this.
        switchyard_engine::testing::skipped(
            "SWITCHYARD_REQUIRE_TLS",
            &format!("PostgreSQL at {base} does not offer TLS (ssl = {offered})"),
        );
        return;
    }
    let schema = format!("tls_{}", std::process::id());
    let url =
        format!("{base}?sslmode=require&application_name={schema}&options[search_path]={schema}");
    // One pooled connection, and the LISTEN one beside it.
    let store = PostgresStore::connect(&url, 1)
        .await
        .expect("the store connects with sslmode=require");
    store.migrate().await.unwrap();
    assert_eq!(store.queue_depth(0).await.unwrap(), 0);

    let (connections, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE ssl) \
         FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = $1",
    )
    .bind(&schema)
    .fetch_one(&plain)
    .await
    .unwrap();
    assert!(connections > 0, "the store's connections are open");
    assert_eq!(encrypted, connections, "every one of them is encrypted");
    drop(store);
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&plain)
        .await
        .unwrap();
}
