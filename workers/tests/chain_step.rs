//! The `chain` step against a real local node (anvil, see `switchyard_engine::testing::Anvil`):
//! contract calls, reads, transfers, reverts, a wrong chain, bad keys, retries that send nothing
//! twice, and nonces from the shared allocator under concurrent steps.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use alloy::primitives::{Address, U256};
use alloy::providers::{Provider, RootProvider};
use serde_json::{Value, json};
use switchyard_engine::clock::SystemClock;
use switchyard_engine::definition::{Secrets, TemplateContext, render_value};
use switchyard_engine::service::Engine;
use switchyard_engine::state::StepFailure;
use switchyard_engine::testing::{ANVIL_KEYS, Anvil};
use switchyard_workers::steps::{Chain, NonceAllocator, StoreNonces};
use switchyard_workers::{EgressPolicy, StepCall, StepKind, StepOutcome};

const BADGES: &str = include_str!("../../tests/fixtures/chain/Badges.bin");
const CHAIN_ID: u64 = 31337;
/// anvil's dev account 9, which deploys the contract: the accounts the steps send from keep
/// their nonces to themselves.
const DEPLOYER: &str = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720";

fn address_of(key: &str) -> Address {
    key.parse::<alloy::signers::local::PrivateKeySigner>()
        .unwrap()
        .address()
}

fn node(anvil: &Anvil) -> RootProvider {
    RootProvider::new_http(anvil.url.parse().unwrap())
}

/// Deploys `Badges` from the deployer (an account anvil unlocks) and returns its address.
async fn deploy(anvil: &Anvil) -> String {
    let node = node(anvil);
    let hash: String = node
        .raw_request(
            "eth_sendTransaction".into(),
            [json!({ "from": DEPLOYER, "data": format!("0x{}", BADGES.trim()) })],
        )
        .await
        .unwrap();
    for _ in 0..100 {
        let receipt: Value = node
            .raw_request("eth_getTransactionReceipt".into(), [hash.clone()])
            .await
            .unwrap();
        if let Some(address) = receipt["contractAddress"].as_str() {
            return address.to_owned();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("Badges was not deployed");
}

/// A call with `with` rendered as a worker renders it, with the secret `base_key`.
fn call(with: Value, key: &str, owner: &str) -> StepCall {
    let secrets = Secrets::new(BTreeMap::from([("base_key".to_owned(), key.to_owned())]));
    let ctx = TemplateContext {
        secrets: secrets.clone(),
        ..TemplateContext::default()
    };
    StepCall {
        idempotency_key: owner.to_owned(),
        ..StepCall::first_attempt(render_value(&with, &ctx).unwrap(), secrets)
    }
}

fn chain(nonces: Arc<dyn NonceAllocator>) -> Chain {
    Chain::new(nonces)
}

/// The allocator every worker on a database shares, on a database of the test's own (kept
/// while the directory lives).
async fn store_nonces() -> (tempfile::TempDir, Arc<dyn NonceAllocator>) {
    let dir = tempfile::tempdir().unwrap();
    let store =
        switchyard_engine::store::connect(&format!("sqlite://{}/store.db", dir.path().display()))
            .await
            .unwrap();
    store.migrate().await.unwrap();
    let engine = Engine::new(store, Arc::new(SystemClock));
    (dir, Arc::new(StoreNonces::new(Arc::new(engine))))
}

/// Runs the step as the worker would: each park stores its checkpoint, the next attempt gets it.
/// Returns the output or failure, and every checkpoint it parked with.
async fn run_to_end(kind: &Chain, mut call: StepCall) -> (Result<Value, StepFailure>, Vec<Value>) {
    let mut parks = Vec::new();
    for _ in 0..10 {
        match kind.run(call.clone()).await {
            Ok(StepOutcome::Output(output)) => return (Ok(output), parks),
            Ok(StepOutcome::Park { checkpoint, .. }) => {
                parks.push(checkpoint.clone());
                call.checkpoint = Some(checkpoint);
            }
            Ok(other) => panic!("unexpected outcome {other:?}"),
            Err(failure) => return (Err(failure), parks),
        }
    }
    panic!("the step parked 10 times");
}

fn mint(anvil: &Anvil, contract: &str, to: &str, uri: &str) -> Value {
    json!({
        "rpc_url": anvil.url,
        "chain_id": CHAIN_ID,
        "key": "{{ secrets.base_key }}",
        "to": contract,
        "abi": "function mint(address,string)",
        "args": [to, uri],
    })
}

async fn sent_count(anvil: &Anvil, key: &str) -> u64 {
    node(anvil)
        .get_transaction_count(address_of(key))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_contract_call_mints_and_a_read_decodes_what_it_minted() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let contract = deploy(&anvil).await;
    let kind = chain(nonces.clone());
    let owner = address_of(ANVIL_KEYS[2]).to_checksum(None);

    let (output, parks) = run_to_end(
        &kind,
        call(
            mint(&anvil, &contract, &owner, "ipfs://badge/1"),
            ANVIL_KEYS[0],
            "r:mint",
        ),
    )
    .await;
    let output = output.unwrap();
    assert_eq!(parks.len(), 1, "it parks once, with the signed transaction");
    assert_eq!(parks[0]["hash"], output["hash"]);
    assert_eq!(output["status"], "success");
    assert_eq!(output["nonce"], 0);
    assert_eq!(
        output["from"].as_str().unwrap().to_lowercase(),
        address_of(ANVIL_KEYS[0]).to_string().to_lowercase()
    );
    assert!(output["block"].as_u64().unwrap() >= 1, "{output}");
    assert!(output["block_hash"].as_str().unwrap().starts_with("0x"));
    assert!(output["gas_used"].as_u64().unwrap() > 21_000);

    let read = |abi: &str, args: Value| {
        json!({
            "rpc_url": anvil.url, "chain_id": CHAIN_ID, "to": contract, "call": true,
            "abi": abi, "args": args,
        })
    };
    let (token, _) = run_to_end(
        &kind,
        call(
            read(
                "function token(uint256) view returns (address owner, string uri)",
                json!([1]),
            ),
            ANVIL_KEYS[0],
            "r:read",
        ),
    )
    .await;
    assert_eq!(
        token.unwrap(),
        json!({ "result": { "owner": owner, "uri": "ipfs://badge/1" } })
    );
    let (supply, _) = run_to_end(
        &kind,
        call(
            read("function totalSupply() view returns (uint256)", json!([])),
            ANVIL_KEYS[0],
            "r:supply",
        ),
    )
    .await;
    assert_eq!(supply.unwrap(), json!({ "result": "1" }));
    assert_eq!(sent_count(&anvil, ANVIL_KEYS[0]).await, 1);
}

#[tokio::test]
async fn a_value_transfer_pays_the_account() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let payee = address_of(ANVIL_KEYS[3]);
    let before = node(&anvil).get_balance(payee).await.unwrap();
    let (output, _) = run_to_end(
        &chain(nonces.clone()),
        call(
            json!({
                "rpc_url": anvil.url, "chain_id": CHAIN_ID, "key": "{{ secrets.base_key }}",
                "to": payee.to_string(), "value": "1.5 ether",
            }),
            ANVIL_KEYS[1],
            "r:pay",
        ),
    )
    .await;
    let output = output.unwrap();
    assert_eq!(output["gas_used"], 21_000);
    let after = node(&anvil).get_balance(payee).await.unwrap();
    assert_eq!(after - before, U256::from(1_500_000_000_000_000_000u128));
}

#[tokio::test]
async fn a_revert_fails_once_without_retry_and_with_its_reason() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let contract = deploy(&anvil).await;
    let kind = chain(nonces.clone());
    let to = address_of(ANVIL_KEYS[2]).to_string();

    // The estimate reverts: nothing is signed, no nonce is taken.
    let (failure, parks) = run_to_end(
        &kind,
        call(mint(&anvil, &contract, &to, ""), ANVIL_KEYS[0], "r:a"),
    )
    .await;
    let failure = failure.unwrap_err();
    assert!(!failure.retryable, "{failure:?}");
    assert_eq!(failure.kind, "reverted");
    assert!(
        failure.message.contains("Badges: empty token URI"),
        "{failure}"
    );
    assert!(parks.is_empty());
    assert_eq!(sent_count(&anvil, ANVIL_KEYS[0]).await, 0);

    // With its gas given, the transaction is mined and reverts: the reason is replayed.
    let mut with = mint(&anvil, &contract, &to, "");
    with["gas_limit"] = json!(200_000);
    let (failure, parks) = run_to_end(&kind, call(with, ANVIL_KEYS[0], "r:b")).await;
    let failure = failure.unwrap_err();
    assert!(!failure.retryable, "{failure:?}");
    assert!(
        failure.message.contains("Badges: empty token URI"),
        "{failure}"
    );
    assert_eq!(parks.len(), 1);
    assert_eq!(sent_count(&anvil, ANVIL_KEYS[0]).await, 1, "mined once");
}

#[tokio::test]
async fn a_node_on_another_chain_fails_the_step_for_good() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let mut with = mint(&anvil, &DEPLOYER.to_lowercase(), DEPLOYER, "x");
    with["chain_id"] = json!(8453);
    let (failure, parks) =
        run_to_end(&chain(nonces.clone()), call(with, ANVIL_KEYS[0], "r:s")).await;
    let failure = failure.unwrap_err();
    assert!(!failure.retryable);
    assert_eq!(failure.kind, "chain_mismatch");
    assert!(
        failure.message.contains("8453") && failure.message.contains("31337"),
        "{failure}"
    );
    assert!(parks.is_empty());
}

#[tokio::test]
async fn a_retry_after_a_lost_receipt_sends_the_same_transaction_and_no_other() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let contract = deploy(&anvil).await;
    let kind = chain(nonces.clone());
    let to = address_of(ANVIL_KEYS[2]).to_string();
    let first = call(mint(&anvil, &contract, &to, "one"), ANVIL_KEYS[0], "r:once");
    let signed = |outcome| match outcome {
        StepOutcome::Park { checkpoint, .. } => checkpoint,
        other => panic!("it did not park with the signed transaction: {other:?}"),
    };
    let checkpoint = signed(kind.run(first.clone()).await.unwrap());
    // An attempt that crashed before its checkpoint was stored signs again, with its nonce.
    let resigned = signed(kind.run(first.clone()).await.unwrap());
    assert_eq!(resigned["nonce"], checkpoint["nonce"]);
    // The attempt that broadcasts loses the receipt; the next attempt, with the same checkpoint,
    // sends the same bytes (the node knows them) and succeeds with the same hash.
    let again = StepCall {
        checkpoint: Some(checkpoint.clone()),
        ..first.clone()
    };
    let StepOutcome::Output(one) = kind.run(again.clone()).await.unwrap() else {
        panic!("no output");
    };
    let StepOutcome::Output(two) = kind.run(again).await.unwrap() else {
        panic!("no output");
    };
    assert_eq!(one["hash"], checkpoint["hash"]);
    assert_eq!(one, two);
    // Run again without its checkpoint (a retried run clears it): its nonce is spent, and it
    // signs nothing new.
    let failure = kind.run(first).await.unwrap_err();
    assert_eq!(failure.kind, "nonce_spent", "{failure}");
    assert!(!failure.retryable);
    assert_eq!(sent_count(&anvil, ANVIL_KEYS[0]).await, 1);
}

#[tokio::test]
async fn bad_keys_fail_for_good_and_no_error_output_or_log_shows_a_key() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let contract = deploy(&anvil).await;
    let to = address_of(ANVIL_KEYS[2]).to_string();
    let kind = chain(nonces.clone());
    let almost = format!("{}zz", &ANVIL_KEYS[0][..64]);
    for bad in [almost.as_str(), "0x1234", "not a key at all"] {
        let (failure, _) =
            run_to_end(&kind, call(mint(&anvil, &contract, &to, "x"), bad, "r:bad")).await;
        let failure = failure.unwrap_err();
        assert!(!failure.retryable);
        assert!(failure.message.contains("`with.key`"), "{failure}");
        assert!(!failure.message.contains(bad), "{failure}");
        assert!(
            !failure.message.contains(&ANVIL_KEYS[0][2..20]),
            "{failure}"
        );
    }
    // A key written into the definition, not a secret.
    let mut with = mint(&anvil, &contract, &to, "x");
    with["key"] = json!(ANVIL_KEYS[0]);
    let failure = kind.run(call(with, "", "r:lit")).await.unwrap_err();
    assert!(failure.message.contains("secret reference"), "{failure}");
    assert!(!failure.message.contains(&ANVIL_KEYS[0][2..]), "{failure}");

    // A revert, a success and a read: the key is in none of their errors, outputs or lines.
    let secret = &ANVIL_KEYS[0][2..];
    for (with, owner) in [
        (mint(&anvil, &contract, &to, ""), "r:1"),
        (mint(&anvil, &contract, &to, "y"), "r:2"),
    ] {
        let first = call(with, ANVIL_KEYS[0], owner);
        let log = first.log.clone();
        let (result, parks) = run_to_end(&kind, first).await;
        let text = format!("{result:?} {parks:?}");
        assert!(!text.contains(secret), "{text}");
        let lines: Vec<String> = log.take().into_iter().map(|l| l.text).collect();
        assert!(!lines.iter().any(|l| l.contains(secret)), "{lines:?}");
    }
}

#[test]
fn a_definitions_chain_steps_load_with_only_the_keys_they_need() {
    let kinds = switchyard_workers::Registry::builtin()
        .step_kinds()
        .unwrap();
    let mint = json!({
        "rpc_url": "{{ vars.rpc_url }}", "chain_id": 8453, "key": "{{ secrets.base_key }}",
        "to": DEPLOYER, "abi": "function mint(address,string)", "args": ["{{ input.to }}", "x"],
    });
    let pay = json!({ "rpc_url": "http://node", "chain_id": 1, "key": "{{ secrets.k }}",
        "to": DEPLOYER, "value": "0.1 ether", "confirmations": 3, "timeout": "5m" });
    let read = json!({ "rpc_url": "http://node", "chain_id": 1, "to": DEPLOYER, "call": true,
        "abi": "function balanceOf(address) view returns (uint256)", "args": [DEPLOYER] });
    for with in [mint, pay, read] {
        let problems: Vec<String> = kinds
            .check("chain", &with)
            .into_iter()
            .map(|p| p.message)
            .collect();
        assert_eq!(problems, Vec::<String>::new(), "{with}");
    }
    let typo = json!({ "rpc_url": "http://node", "chain_id": 1, "to": DEPLOYER, "vaule": 1 });
    assert!(!kinds.check("chain", &typo).is_empty());
}

#[tokio::test]
async fn input_that_does_not_fit_fails_for_good_naming_the_field() {
    // None of these reaches a node: the address is nobody's.
    let base = json!({
        "rpc_url": "http://127.0.0.1:9", "chain_id": CHAIN_ID, "key": "{{ secrets.base_key }}",
        "to": DEPLOYER, "abi": "function mint(address,string)", "args": [DEPLOYER, "x"],
    });
    let cases: [(&str, Value, &str); 10] = [
        ("abi", json!("function mint(address,strin)"), "`with.abi`"),
        ("abi", json!("mint address string"), "`with.abi`"),
        ("args", json!([DEPLOYER]), "`with.args`"),
        ("args", json!(["0x12", "x"]), "`with.args[0]`"),
        ("args", json!([DEPLOYER, 5]), "`with.args[1]`"),
        ("to", json!("0xnope"), "`with.to`"),
        ("rpc_url", json!("ftp://x"), "`with.rpc_url`"),
        ("value", json!("1.5 bananas"), "`with.value`"),
        ("chain_id", json!("one"), "`with.chain_id`"),
        ("confirmations", json!(0), "`with.confirmations`"),
    ];
    let kind = chain(Arc::new(switchyard_workers::steps::NoNonces));
    for (field, value, named) in cases {
        let mut with = base.clone();
        with[field] = value.clone();
        let failure = kind
            .run(call(with, ANVIL_KEYS[0], "r:s"))
            .await
            .unwrap_err();
        assert!(!failure.retryable, "{field}={value}: {failure:?}");
        assert_eq!(failure.kind, "invalid_parameters", "{field}={value}");
        assert!(
            failure.message.contains(named),
            "{field}={value}: {failure}"
        );
    }
    let mut with = base.clone();
    with.as_object_mut().unwrap().remove("key");
    let failure = kind.run(call(with, "", "r:s")).await.unwrap_err();
    assert!(failure.message.contains("`with.key`"), "{failure}");
}

#[tokio::test]
async fn an_rpc_url_from_run_data_may_not_reach_loopback_unless_an_operator_allows_it() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let contract = deploy(&anvil).await;
    let read = |url: String| {
        let with = json!({
            "rpc_url": url, "chain_id": CHAIN_ID, "to": contract, "call": true,
            "abi": "function totalSupply() view returns (uint256)",
        });
        StepCall {
            reads_run_data: vec!["rpc_url".to_owned()],
            ..call(with, ANVIL_KEYS[0], "r:s")
        }
    };
    let by_name = anvil.url.replace("127.0.0.1", "localhost");
    let kind = Chain::with_policy(nonces.clone(), Default::default());
    // An address in the URL, and a name that resolves to loopback.
    for url in [anvil.url.clone(), by_name.clone()] {
        let failure = kind.run(read(url.clone())).await.unwrap_err();
        assert_eq!(failure.kind, "egress", "{url}: {failure}");
        assert!(!failure.retryable);
        assert!(failure.message.contains("loopback"), "{failure}");
    }
    let allowed = Chain::with_policy(
        nonces.clone(),
        Arc::new(EgressPolicy {
            allow: vec!["127.0.0.0/8".parse().unwrap(), "localhost".parse().unwrap()],
            deny: Vec::new(),
        }),
    );
    for url in [anvil.url.clone(), by_name] {
        let StepOutcome::Output(output) = allowed.run(read(url)).await.unwrap() else {
            panic!("no output");
        };
        assert_eq!(output, json!({ "result": "0" }));
    }
}

#[tokio::test]
async fn concurrent_steps_on_two_workers_share_nonces_without_gaps_or_duplicates() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let contract = deploy(&anvil).await;
    let dir = tempfile::tempdir().unwrap();
    let store =
        switchyard_engine::store::connect(&format!("sqlite://{}/store.db", dir.path().display()))
            .await
            .unwrap();
    store.migrate().await.unwrap();
    // Two workers, each with its own engine and kind, on one database.
    let worker = || {
        let engine = Engine::new(store.clone(), Arc::new(SystemClock));
        Arc::new(chain(Arc::new(StoreNonces::new(Arc::new(engine)))))
    };
    let workers = [worker(), worker()];
    let to = address_of(ANVIL_KEYS[2]).to_string();
    let steps = 24;
    let runs = (0..steps).map(|i| {
        let kind = workers[i % 2].clone();
        let with = mint(&anvil, &contract, &to, &format!("ipfs://{i}"));
        tokio::spawn(async move {
            run_to_end(&kind, call(with, ANVIL_KEYS[1], &format!("r:mint[{i}]"))).await
        })
    });
    let mut nonces = BTreeSet::new();
    for run in futures::future::join_all(runs).await {
        let output = run.unwrap().0.unwrap();
        assert!(nonces.insert(output["nonce"].as_u64().unwrap()), "{output}");
    }
    assert_eq!(nonces, (0..steps as u64).collect());
    assert_eq!(sent_count(&anvil, ANVIL_KEYS[1]).await, steps as u64);
}

/// A step whose key changed since it stored its signed transaction (a rotated secret) fails:
/// signing anew under the new key would send a second transaction.
#[tokio::test]
async fn a_stored_transaction_for_another_key_fails_the_step_and_nothing_new_is_signed() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let contract = deploy(&anvil).await;
    let kind = chain(nonces.clone());
    let to = address_of(ANVIL_KEYS[2]).to_string();
    let first = call(
        mint(&anvil, &contract, &to, "one"),
        ANVIL_KEYS[0],
        "r:rotated",
    );
    let StepOutcome::Park { checkpoint, .. } = kind.run(first).await.unwrap() else {
        panic!("it did not park with the signed transaction");
    };
    let rotated = StepCall {
        checkpoint: Some(checkpoint),
        ..call(
            mint(&anvil, &contract, &to, "one"),
            ANVIL_KEYS[1],
            "r:rotated",
        )
    };
    let failure = kind.run(rotated).await.unwrap_err();
    assert_eq!(failure.kind, "checkpoint_mismatch", "{failure}");
    assert!(!failure.retryable);
    assert_eq!(sent_count(&anvil, ANVIL_KEYS[0]).await, 0);
    assert_eq!(sent_count(&anvil, ANVIL_KEYS[1]).await, 0);
}

#[tokio::test]
async fn a_transaction_the_base_fee_passed_is_replaced_with_higher_fees_and_only_one_is_mined() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let node = node(&anvil);
    let raw = |method: &'static str, params: Value| {
        let node = node.clone();
        async move {
            node.raw_request::<_, Value>(method.into(), params)
                .await
                .unwrap()
        }
    };
    raw("evm_setAutomine", json!([false])).await;
    let from = address_of(ANVIL_KEYS[3]);
    let transfer = json!({
        "rpc_url": anvil.url,
        "chain_id": CHAIN_ID,
        "key": "{{ secrets.base_key }}",
        "to": address_of(ANVIL_KEYS[2]).to_string(),
        "value": "1 gwei",
    });
    let kind = chain(nonces);
    let step =
        tokio::spawn(
            async move { run_to_end(&kind, call(transfer, ANVIL_KEYS[3], "r:bumped")).await },
        );

    // Once the transaction waits in the pool, the base fee jumps far above what it pays, so no
    // block can take it; blocks keep coming, each with a slightly lower base fee.
    let pooled = loop {
        let pool = raw("txpool_content", json!([])).await;
        let mine = pool["pending"]
            .as_object()
            .and_then(|by_sender| {
                by_sender
                    .iter()
                    .find(|(address, _)| address.eq_ignore_ascii_case(&from.to_string()))
            })
            .map(|(_, by_nonce)| by_nonce["0"].clone());
        if let Some(tx) = mine {
            break tx;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let paid = u128::from_str_radix(
        pooled["maxFeePerGas"]
            .as_str()
            .unwrap()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    raw(
        "anvil_setNextBlockBaseFeePerGas",
        json!([format!("{:#x}", paid * 100)]),
    )
    .await;
    while !step.is_finished() {
        raw("evm_mine", json!([])).await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    let (output, parks) = step.await.unwrap();
    let output = output.unwrap();
    assert_eq!(parks.len(), 2, "signed, then signed again: {parks:#?}");
    let (first, replacement) = (&parks[0], &parks[1]);
    assert_eq!(first["nonce"], replacement["nonce"]);
    assert_eq!(replacement["replaced"], json!([first["hash"]]));
    assert_eq!(output["hash"], replacement["hash"], "{output}");
    assert_eq!(pooled["hash"], first["hash"]);
    assert_eq!(node.get_transaction_count(from).await.unwrap(), 1);
    let dropped: Value = raw("eth_getTransactionByHash", json!([first["hash"]])).await;
    assert!(
        dropped.is_null() || dropped["blockHash"].is_null(),
        "{dropped}"
    );
}

#[tokio::test]
async fn a_nonce_someone_else_used_before_the_broadcast_fails_the_step_for_good_after_its_wait() {
    let Some(anvil) = Anvil::start(&[]) else {
        return;
    };
    let (_db, nonces) = store_nonces().await;
    let kind = chain(nonces);
    // anvil's dev account 0 is unlocked: the node itself signs for it, outside the allocator.
    let from = address_of(ANVIL_KEYS[0]);
    let transfer = json!({
        "rpc_url": anvil.url,
        "chain_id": CHAIN_ID,
        "key": "{{ secrets.base_key }}",
        "to": DEPLOYER,
        "value": "1 gwei",
        "timeout": "2s",
    });
    let first = call(transfer, ANVIL_KEYS[0], "r:raced");
    let StepOutcome::Park { checkpoint, .. } = kind.run(first.clone()).await.unwrap() else {
        panic!("it did not park with the signed transaction");
    };
    assert_eq!(checkpoint["nonce"], 0);
    // Between the park and the broadcast, another sender of the key takes nonce 0.
    let theirs: Value = node(&anvil)
        .raw_request(
            "eth_sendTransaction".into(),
            [json!({ "from": from.to_string(), "to": DEPLOYER, "value": "0x1" })],
        )
        .await
        .unwrap();
    let failure = kind
        .run(StepCall {
            checkpoint: Some(checkpoint.clone()),
            ..first
        })
        .await
        .unwrap_err();
    assert_eq!(failure.kind, "nonce_spent", "{failure}");
    assert!(!failure.retryable);
    assert!(failure.message.contains("can never be mined"), "{failure}");
    assert_eq!(sent_count(&anvil, ANVIL_KEYS[0]).await, 1, "theirs only");
    let ours: Value = node(&anvil)
        .raw_request(
            "eth_getTransactionByHash".into(),
            [checkpoint["hash"].clone()],
        )
        .await
        .unwrap();
    assert!(ours.is_null(), "{ours} (theirs: {theirs})");
}
