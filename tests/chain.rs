//! The `chain` step through the real binary, against a real local node (anvil, which `.ci/run`
//! installs): a server killed with `kill -9` while its transaction waits in the node's pool sends
//! nothing twice after a restart, and chain steps run at once by several worker processes take
//! nonces without a gap or a duplicate.

mod common;

use std::time::{Duration, Instant};

use common::{Sandbox, step};
use serde_json::{Value, json};
use switchyard_engine::testing::{ANVIL_KEYS, Anvil};

const BADGES: &str = include_str!("fixtures/chain/Badges.bin");
/// anvil's dev account 9, unlocked: it deploys the contract, so the senders' nonces start at 0.
const DEPLOYER: &str = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720";
/// The addresses of `ANVIL_KEYS[1]` and `ANVIL_KEYS[2]`.
const SENDER: &str = "0x70997970C51812dc3A010C7d01b50e0d17dC79C8";
const SENDER_2: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";

/// One JSON-RPC call to the node.
fn rpc(anvil: &Anvil, method: &str, params: Value) -> Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer: Value = runtime.block_on(async {
        reqwest::Client::new()
            .post(&anvil.url)
            .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert!(answer["error"].is_null(), "{method}: {answer}");
    answer["result"].clone()
}

fn quantity(value: &Value) -> u64 {
    u64::from_str_radix(value.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

fn nonce(anvil: &Anvil, address: &str, block: &str) -> u64 {
    quantity(&rpc(
        anvil,
        "eth_getTransactionCount",
        json!([address, block]),
    ))
}

/// Deploys `Badges` while the node mines each transaction at once; returns its address.
fn deploy(anvil: &Anvil) -> String {
    let hash = rpc(
        anvil,
        "eth_sendTransaction",
        json!([{ "from": DEPLOYER, "data": format!("0x{}", BADGES.trim()) }]),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let receipt = rpc(anvil, "eth_getTransactionReceipt", json!([hash]));
        if let Some(address) = receipt["contractAddress"].as_str() {
            return address.to_owned();
        }
        assert!(Instant::now() < deadline, "Badges was not deployed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_until(what: &str, sandbox: &Sandbox, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            sandbox.server_logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_server_killed_with_its_transaction_in_the_pool_sends_it_once_after_a_restart() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let contract = deploy(&anvil);
    // From now on, blocks are mined only when the test says.
    rpc(&anvil, "evm_setAutomine", json!([false]));
    let definition = format!(
        "id: mint\nretry: {{max_retries: 5, initial: 100ms}}\nsteps:\n\
         \x20 - id: mint\n\
         \x20   type: chain\n\
         \x20   with:\n\
         \x20     rpc_url: \"{url}\"\n\
         \x20     chain_id: 31337\n\
         \x20     key: \"{{{{ secrets.base_key }}}}\"\n\
         \x20     to: \"{contract}\"\n\
         \x20     abi: \"function mint(address,string)\"\n\
         \x20     args: [\"{SENDER}\", \"ipfs://badge/1\"]\n",
        url = anvil.url
    );
    let mut sandbox = Sandbox::new("chain-kill", &definition);
    sandbox
        .env
        .push(("SWITCHYARD_SECRET_BASE_KEY".into(), ANVIL_KEYS[1].into()));
    sandbox.serve();
    let run = sandbox.cli(&["run", "mint"]).trim().to_owned();
    wait_until("the transaction in the node's pool", &sandbox, || {
        nonce(&anvil, SENDER, "pending") == 1
    });
    let pooled = rpc(&anvil, "txpool_content", json!([]));
    assert_eq!(nonce(&anvil, SENDER, "latest"), 0, "nothing mined yet");
    let killed_in = step(&sandbox.show(&run), "mint")["attempt"]
        .as_u64()
        .unwrap();
    sandbox.kill_all();

    sandbox.serve();
    // The restarted server takes the step over once its lease runs out; then a block comes.
    wait_until("the step to be taken over", &sandbox, || {
        let mint = &sandbox.show(&run)["steps"][0];
        mint["attempt"].as_u64().unwrap() > killed_in && mint["state"] == "running"
    });
    rpc(&anvil, "evm_mine", json!([]));
    wait_until("the run to finish", &sandbox, || {
        sandbox.show(&run)["status"] != "running"
    });
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    let output = &step(&detail, "mint")["output"];
    assert_eq!(nonce(&anvil, SENDER, "latest"), 1, "one transaction sent");
    assert_eq!(nonce(&anvil, SENDER, "pending"), 1, "and none waiting");
    let block = rpc(&anvil, "eth_getBlockByNumber", json!(["latest", false]));
    assert_eq!(block["transactions"], json!([output["hash"]]), "{output}");
    assert_eq!(output["block"], quantity(&block["number"]));
    assert_eq!(output["block_hash"], block["hash"]);
    assert_eq!(output["nonce"], 0);
    // What was in the pool before the kill is what was mined.
    let pooled_hash = pooled["pending"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(address, _)| address.eq_ignore_ascii_case(SENDER))
        .map(|(_, by_nonce)| by_nonce["0"]["hash"].clone());
    assert_eq!(pooled_hash.as_ref(), Some(&output["hash"]), "{pooled}");
    // totalSupply(): one badge.
    let supply = rpc(
        &anvil,
        "eth_call",
        json!([{ "to": contract, "data": "0x18160ddd" }, "latest"]),
    );
    assert_eq!(supply.as_str().unwrap(), format!("0x{:064x}", 1));
}

#[test]
fn chain_steps_of_one_run_on_several_workers_take_nonces_without_gaps_or_duplicates() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let contract = deploy(&anvil);
    let items = 30;
    let definition = format!(
        "id: mint_many\nretry: {{max_retries: 5, initial: 100ms}}\nsteps:\n\
         \x20 - id: mint\n\
         \x20   type: chain\n\
         \x20   for_each: \"{{{{ range({items}) | list }}}}\"\n\
         \x20   parallel: 16\n\
         \x20   with:\n\
         \x20     rpc_url: \"{url}\"\n\
         \x20     chain_id: 31337\n\
         \x20     key: \"{{{{ secrets.base_key }}}}\"\n\
         \x20     to: \"{contract}\"\n\
         \x20     abi: \"function mint(address,string)\"\n\
         \x20     args: [\"{SENDER}\", \"ipfs://badge/{{{{ item }}}}\"]\n",
        url = anvil.url
    );
    let mut sandbox = Sandbox::new("chain-many", &definition);
    sandbox
        .env
        .push(("SWITCHYARD_SECRET_BASE_KEY".into(), ANVIL_KEYS[2].into()));
    sandbox.serve();
    for _ in 0..2 {
        sandbox.spawn(&["worker", "--workers", "8", "--lease", "5s"]);
    }
    let run = sandbox.cli(&["run", "mint_many"]).trim().to_owned();
    wait_until("the run to finish", &sandbox, || {
        sandbox.show(&run)["status"] != "running"
    });
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    let outputs = step(&detail, "mint")["output"].as_array().unwrap().clone();
    let mut nonces: Vec<u64> = outputs
        .iter()
        .map(|o| o["nonce"].as_u64().unwrap())
        .collect();
    nonces.sort_unstable();
    assert_eq!(nonces, (0..items).collect::<Vec<_>>(), "{outputs:?}");
    assert_eq!(nonce(&anvil, SENDER_2, "latest"), items);
    assert_eq!(nonce(&anvil, SENDER_2, "pending"), items);
}

#[test]
fn a_nonce_left_by_a_step_that_failed_before_sending_is_filled_so_the_next_step_is_mined() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    /// The address of `ANVIL_KEYS[3]`.
    const SENDER_3: &str = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";
    // Both workflows name the node through a secret: its address may hold an API key.
    let transfer = |id: &str, value: &str| {
        format!(
            "id: {id}\nretry: {{max_retries: 0}}\nsteps:\n\
             \x20 - id: send\n\
             \x20   type: chain\n\
             \x20   with:\n\
             \x20     rpc_url: \"{{{{ secrets.node_url }}}}\"\n\
             \x20     chain_id: 31337\n\
             \x20     key: \"{{{{ secrets.base_key }}}}\"\n\
             \x20     to: \"{SENDER}\"\n\
             \x20     value: \"{value}\"\n\
             \x20     gas_limit: 21000\n"
        )
    };
    let mut sandbox = Sandbox::new("chain-gap", &transfer("refused", "1000000 ether"));
    std::fs::write(
        sandbox.dir.join("definitions/paid.yaml"),
        transfer("paid", "1 ether"),
    )
    .unwrap();
    sandbox
        .env
        .push(("SWITCHYARD_SECRET_BASE_KEY".into(), ANVIL_KEYS[3].into()));
    sandbox
        .env
        .push(("SWITCHYARD_SECRET_NODE_URL".into(), anvil.url.clone()));
    sandbox.serve();

    // The first step takes nonce 0 and signs, but the node refuses to pool what it cannot pay.
    let refused = sandbox.cli(&["run", "refused"]).trim().to_owned();
    wait_until("the refused run to end", &sandbox, || {
        sandbox.show(&refused)["status"] != "running"
    });
    let detail = sandbox.show(&refused);
    assert_eq!(detail["status"], "failed", "{detail:#}");
    assert_eq!(
        nonce(&anvil, SENDER_3, "pending"),
        0,
        "nothing reached the pool"
    );

    // The next step takes nonce 1, which the node cannot mine until 0 is used.
    let paid = sandbox.cli(&["run", "paid"]).trim().to_owned();
    wait_until("the paid run to end", &sandbox, || {
        sandbox.show(&paid)["status"] != "running"
    });
    let detail = sandbox.show(&paid);
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    let output = &step(&detail, "send")["output"];
    assert_eq!(output["nonce"], 1, "{output}");
    assert_eq!(nonce(&anvil, SENDER_3, "latest"), 2);
    // Nonce 0 went to an empty transfer to the sender itself.
    let filler = (0..=quantity(&rpc(&anvil, "eth_blockNumber", json!([]))))
        .flat_map(|n| {
            let block = rpc(
                &anvil,
                "eth_getBlockByNumber",
                json!([format!("{n:#x}"), true]),
            );
            block["transactions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|tx| {
            tx["from"].as_str().unwrap().eq_ignore_ascii_case(SENDER_3) && tx["nonce"] == "0x0"
        })
        .expect("a transaction with nonce 0");
    assert!(
        filler["to"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(SENDER_3),
        "{filler}"
    );
    assert_eq!(filler["value"], "0x0", "{filler}");
    // Once the account can pay, the refused run is retried: its step finds its nonce filled by
    // a mined transaction, so its own never can be, and it takes a new one.
    rpc(
        &anvil,
        "anvil_setBalance",
        json!([SENDER_3, format!("{:#x}", 2_000_000u128 * 10u128.pow(18))]),
    );
    sandbox.cli(&["retry", &refused]);
    wait_until("the retried run to end", &sandbox, || {
        sandbox.show(&refused)["status"] != "running"
    });
    let detail = sandbox.show(&refused);
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    assert_eq!(step(&detail, "send")["output"]["nonce"], 2);
    assert_eq!(nonce(&anvil, SENDER_3, "latest"), 3);
    // The node's address was a secret: no run shows it.
    for run in [&refused, &paid] {
        let shown = sandbox.cli(&["show", run, "--json"]);
        assert!(!shown.contains(&anvil.url), "{shown}");
    }
}

#[test]
fn an_rpc_url_from_a_secret_appears_in_no_error_output_or_log() {
    // A closed port: the client's error names the address it could not reach.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v2/provider-key-0c1d2e3f");
    let definition = format!(
        "id: hidden\nretry: {{max_retries: 0}}\nsteps:\n\
         \x20 - id: send\n\
         \x20   type: chain\n\
         \x20   with:\n\
         \x20     rpc_url: \"{{{{ secrets.node_url }}}}\"\n\
         \x20     chain_id: 31337\n\
         \x20     key: \"{{{{ secrets.base_key }}}}\"\n\
         \x20     to: \"{SENDER}\"\n\
         \x20     value: \"1 wei\"\n"
    );
    let mut sandbox = Sandbox::new("chain-hidden-url", &definition);
    sandbox
        .env
        .push(("SWITCHYARD_SECRET_BASE_KEY".into(), ANVIL_KEYS[3].into()));
    sandbox
        .env
        .push(("SWITCHYARD_SECRET_NODE_URL".into(), url.clone()));
    sandbox.env.push(("RUST_LOG".into(), "debug".into()));
    sandbox.serve();
    let run = sandbox.cli(&["run", "hidden"]).trim().to_owned();
    wait_until("the run to end", &sandbox, || {
        sandbox.show(&run)["status"] != "running"
    });
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "failed", "{detail:#}");
    let error = step(&detail, "send")["error"].as_str().unwrap().to_owned();
    assert!(error.contains("chain step"), "{error}");
    let shown = sandbox.cli(&["show", &run, "--json"]) + &sandbox.cli(&["logs", &run]);
    let logs = sandbox.server_logs();
    // (At debug level, hyper names the address it connects to: an IP address and port, never
    // the URL's path or name.)
    for secret in ["provider-key-0c1d2e3f", &url] {
        assert!(!shown.contains(secret), "{secret} in\n{shown}");
        assert!(!logs.contains(secret), "{secret} in\n{logs}");
    }
}
