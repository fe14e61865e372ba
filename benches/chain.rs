//! `chain` steps against a real local node, through the real `switchyard serve` (release build).
//! `cargo bench --bench chain` starts anvil (`SWITCHYARD_ANVIL`, as for the tests; automine: a
//! block per transaction), deploys the tests' `Badges` contract, and runs one workflow whose
//! `for_each` mints 1,000 badges from one key, 32 at once, on 32 workers, every nonce from the
//! allocator the workers share through the store. It prints chain steps finished per second
//! (each is two attempts: sign and store, then broadcast and wait for the receipt), and checks
//! that the nonces have no gap and no duplicate: the sender's nonce on chain is the number of
//! steps, and each step's nonce is distinct.
//!
//! `SWITCHYARD_BENCH_STORES` (default `sqlite,postgres`) and `SWITCHYARD_BENCH_POSTGRES` as for
//! the queue bench.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_engine::testing::{ANVIL_KEYS, Anvil};

const STEPS: u64 = 1_000;
const AT_ONCE: u32 = 32;
const BADGES: &str = include_str!("../tests/fixtures/chain/Badges.bin");
/// anvil's dev account 9, unlocked: it deploys the contract.
const DEPLOYER: &str = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn rpc(url: &str, method: &str, params: Value) -> Value {
    let answer: Value = reqwest::Client::new()
        .post(url)
        .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(answer["error"].is_null(), "{method}: {answer}");
    answer["result"].clone()
}

fn quantity(value: &Value) -> u64 {
    u64::from_str_radix(value.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

async fn deploy(url: &str) -> String {
    let hash = rpc(
        url,
        "eth_sendTransaction",
        json!([{ "from": DEPLOYER, "data": format!("0x{}", BADGES.trim()) }]),
    )
    .await;
    loop {
        let receipt = rpc(url, "eth_getTransactionReceipt", json!([hash])).await;
        if let Some(address) = receipt["contractAddress"].as_str() {
            return address.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn switchyard(dir: &std::path::Path, database: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.current_dir(dir)
        .env("SWITCHYARD_DATABASE_URL", database)
        .env("SWITCHYARD_SECRET_BASE_KEY", ANVIL_KEYS[1])
        .env("RUST_LOG", "warn");
    cmd
}

fn cli(dir: &std::path::Path, database: &str, args: &[&str]) -> String {
    let out = switchyard(dir, database).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn measure(store: &str, database: &str) {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let contract = deploy(&anvil.url).await;
    let sender = "0x70997970C51812dc3A010C7d01b50e0d17dC79C8";
    let dir = std::env::temp_dir().join(format!(
        "switchyard-bench-chain-{store}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("definitions")).unwrap();
    std::fs::write(
        dir.join("definitions/mint.yaml"),
        format!(
            "id: mint_many\nsteps:\n\
             \x20 - id: mint\n\
             \x20   type: chain\n\
             \x20   for_each: \"{{{{ range({STEPS}) | list }}}}\"\n\
             \x20   parallel: {AT_ONCE}\n\
             \x20   with:\n\
             \x20     rpc_url: \"{url}\"\n\
             \x20     chain_id: 31337\n\
             \x20     key: \"{{{{ secrets.base_key }}}}\"\n\
             \x20     to: \"{contract}\"\n\
             \x20     abi: \"function mint(address,string)\"\n\
             \x20     args: [\"{sender}\", \"ipfs://badge/{{{{ item }}}}\"]\n",
            url = anvil.url
        ),
    )
    .unwrap();
    cli(&dir, database, &["migrate"]);
    let _server = Server(
        switchyard(&dir, database)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--workers",
                &AT_ONCE.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let run = cli(&dir, database, &["run", "mint_many"]).trim().to_owned();
    let detail = loop {
        let detail: Value =
            serde_json::from_str(&cli(&dir, database, &["show", &run, "--json"])).unwrap();
        if detail["status"] != "running" {
            break detail;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = started.elapsed();
    assert_eq!(detail["status"], "succeeded", "{detail}");
    let outputs = detail["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step_id"] == "mint")
        .unwrap()["output"]
        .as_array()
        .unwrap()
        .clone();
    let mut nonces: Vec<u64> = outputs
        .iter()
        .map(|o| o["nonce"].as_u64().unwrap())
        .collect();
    nonces.sort_unstable();
    nonces.dedup();
    assert_eq!(
        nonces,
        (0..STEPS).collect::<Vec<_>>(),
        "a gap or a duplicate"
    );
    let sent = quantity(
        &rpc(
            &anvil.url,
            "eth_getTransactionCount",
            json!([sender, "latest"]),
        )
        .await,
    );
    assert_eq!(sent, STEPS, "the sender's nonce is not the number of steps");
    println!(
        "{store}: {STEPS} chain steps ({AT_ONCE} at once, one key) in {:.1} s: {:.0} steps/s; \
         nonces 0..{STEPS} each once, sender's nonce {sent}",
        took.as_secs_f64(),
        STEPS as f64 / took.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "switchyard chain benchmark, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let postgres = std::env::var("SWITCHYARD_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".to_owned());
    let stores =
        std::env::var("SWITCHYARD_BENCH_STORES").unwrap_or_else(|_| "sqlite,postgres".to_owned());
    runtime.block_on(async {
        for store in stores.split(',').map(str::trim) {
            match store {
                "sqlite" => {
                    let dir = std::env::temp_dir()
                        .join(format!("switchyard-bench-chain-db-{}", std::process::id()));
                    std::fs::create_dir_all(&dir).unwrap();
                    measure("sqlite", &format!("sqlite://{}/bench.db", dir.display())).await;
                    let _ = std::fs::remove_dir_all(&dir);
                }
                "postgres" => {
                    let schema = format!("bench_chain_{}", std::process::id());
                    let admin = sqlx::PgPool::connect(&postgres).await.unwrap();
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&admin)
                        .await
                        .unwrap();
                    let sep = if postgres.contains('?') { '&' } else { '?' };
                    measure(
                        "postgres",
                        &format!("{postgres}{sep}options[search_path]={schema}"),
                    )
                    .await;
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&admin)
                        .await
                        .unwrap();
                }
                other => panic!("unknown store {other}"),
            }
        }
    });
}
