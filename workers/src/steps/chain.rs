//! `chain`: one Ethereum (EVM) transaction or read, with alloy. `with: { rpc_url, chain_id, key,
//! to, abi, args, value, call, confirmations, gas_limit, max_fee_per_gas,
//! max_priority_fee_per_gas, timeout }`.
//!
//! - A contract call: `abi: "function mint(address,string)"` with `args`, encoded by alloy from
//!   the human-readable signature (`Function::parse`, `abi_encode_input`); a value transfer: no
//!   `abi`, a `value`. Both are signed with `key` (a secret) as EIP-1559 transactions, with the
//!   node's fee estimate unless the fees are given, and succeed with the receipt after
//!   `confirmations` blocks: `{hash, block, block_hash, status, gas_used, from, to, nonce}`.
//! - A read (`call: true`): `eth_call`, decoded with the signature's `returns (...)` into
//!   `{result}`: one value, or a list (an object when every output is named). Numbers are
//!   decimal text, so none loses precision in JSON.
//!
//! **A retry never sends a second transaction.** The step estimates gas first (a call that would
//! revert fails for good with its reason, before any nonce is taken), takes a nonce from the
//! [`NonceAllocator`] every worker on the database shares, signs, and parks at once with the
//! signed bytes and their hash as its checkpoint: the store commits them before anything is
//! broadcast. The next attempt broadcasts those bytes (a node that knows them already, or has
//! mined them, answers with an error that is no failure here) and waits for that hash's receipt.
//! After a crash, a timeout or a lost receipt, a later attempt broadcasts the same bytes again
//! and waits for the same hash: whatever happens, the step's one nonce can be mined once. A
//! mined transaction that reverted fails for good, with the reason its call gives when replayed
//! by `eth_call` on the state its block started from (receipts carry no reason).
//!
//! **While it waits.** A transaction whose fees were the node's estimate, once the base fee has
//! passed what it pays, is signed again with the same nonce and higher fees and parked with
//! before it is sent; the checkpoint keeps the hashes it replaced, and whichever is mined ends
//! the step. A nonce below the step's own that the node has no transaction for, held by a step
//! that failed or was cancelled, is filled with an empty transfer to the sender
//! (`Store::fill_nonce_gap` decides), so the step's own can be mined.
//!
//! **Secrets.** `key` must be a secret reference: a key written in a definition would be in its
//! history. `rpc_url` may hold one (a provider's key in its path). No error, log line or output
//! carries either.
//!
//! **Egress.** `rpc_url` is under the same policy as an `http` step's URL: checked before the
//! first request and on every address its name resolves to, and one rendered from run data may
//! not reach internal addresses unless an operator allows them.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use alloy::consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy::dyn_abi::{DynSolType, DynSolValue, FunctionExt, JsonAbiExt, Specifier};
use alloy::eips::{BlockId, Decodable2718, Encodable2718};
use alloy::json_abi::Function;
use alloy::network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder, TxSignerSync};
use alloy::primitives::utils::parse_units;
use alloy::primitives::{Address, B256, Bytes, TxKind, U256, hex};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::client::RpcClient;
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::{RpcError, TransportErrorKind};
use async_trait::async_trait;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchyard_engine::service::Engine;
use switchyard_engine::state::StepFailure;
use switchyard_engine::store::{GapFill, NonceAllocation, NonceGap, NonceRequest, retry_transient};

use super::{StepCall, StepKind, StepOutcome, StepResult, with_schema};
use crate::egress::{EgressPolicy, Refused, checked_client};

/// How long one request to the node may take before the attempt fails, retryably.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an attempt waits for a receipt unless `with.timeout` says.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest receipt wait a step may ask for; its own timeout bounds an attempt anyway.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const MAX_CONFIRMATIONS: u64 = 10_000;
/// The first and the longest pause between two looks for a receipt: short first, since a local
/// or fast chain mines within a second.
const FIRST_POLL: Duration = Duration::from_millis(50);
const LONGEST_POLL: Duration = Duration::from_secs(2);
/// Replacements a step signs for its nonce at most, each paying an eighth more than the last:
/// past them, the last waits for the base fee to come down.
const MAX_REPLACEMENTS: usize = 10;

/// Where a `chain` step takes its nonces: one shared by every worker on the database (the
/// store's, [`StoreNonces`]) so no two steps sign with the same nonce and none is skipped. The
/// only way the kind reaches the store.
#[async_trait]
pub trait NonceAllocator: Send + Sync + 'static {
    async fn allocate(&self, request: &NonceRequest) -> Result<NonceAllocation, NonceError>;
    /// Whether the step waiting above `gap` may take it (`Store::fill_nonce_gap`).
    async fn fill_gap(&self, gap: &NonceGap) -> Result<GapFill, NonceError>;
    /// Records the transaction a step fills `gap` with, before it is sent.
    async fn note_fill(&self, gap: &NonceGap, hash: B256) -> Result<(), NonceError>;
}

#[derive(Debug, thiserror::Error)]
pub enum NonceError {
    /// The store did not answer: the attempt may go otherwise later.
    #[error("cannot allocate a nonce: {0}")]
    Unavailable(String),
    #[error(
        "this worker allocates no nonces: it was built to check definitions \
         (`Registry::builtin`); a worker that sends transactions takes them from its database \
         (`StoreNonces`)"
    )]
    NotShared,
}

/// The nonce allocator of the engine's store (`Store::allocate_nonce`), for every worker process
/// on its database.
pub struct StoreNonces(Arc<Engine>);

impl StoreNonces {
    pub fn new(engine: Arc<Engine>) -> Self {
        StoreNonces(engine)
    }
}

#[async_trait]
impl NonceAllocator for StoreNonces {
    async fn allocate(&self, request: &NonceRequest) -> Result<NonceAllocation, NonceError> {
        let allocate = || self.0.store().allocate_nonce(request, self.0.now());
        // A lost connection or a deadlock is retried here, as completions are: the step keeps
        // its slot rather than spending an attempt.
        retry_transient("allocating a nonce", allocate)
            .await
            .map_err(|e| NonceError::Unavailable(e.to_string()))
    }

    async fn fill_gap(&self, gap: &NonceGap) -> Result<GapFill, NonceError> {
        let fill = || self.0.store().fill_nonce_gap(gap, self.0.now());
        retry_transient("filling a nonce gap", fill)
            .await
            .map_err(|e| NonceError::Unavailable(e.to_string()))
    }

    async fn note_fill(&self, gap: &NonceGap, hash: B256) -> Result<(), NonceError> {
        let hash = format!("{hash:#x}");
        let note = || self.0.store().note_nonce_fill(gap, &hash);
        retry_transient("noting a nonce's filler", note)
            .await
            .map_err(|e| NonceError::Unavailable(e.to_string()))
    }
}

/// No allocator: for a registry that checks definitions and runs no `chain` step that sends
/// (`Registry::builtin`). A send fails for good, saying why; reads work.
pub struct NoNonces;

#[async_trait]
impl NonceAllocator for NoNonces {
    async fn allocate(&self, _: &NonceRequest) -> Result<NonceAllocation, NonceError> {
        Err(NonceError::NotShared)
    }

    async fn fill_gap(&self, _: &NonceGap) -> Result<GapFill, NonceError> {
        Ok(GapFill::Wait)
    }

    async fn note_fill(&self, _: &NonceGap, _: B256) -> Result<(), NonceError> {
        Err(NonceError::NotShared)
    }
}

pub struct Chain {
    nonces: Arc<dyn NonceAllocator>,
    policy: Arc<EgressPolicy>,
    /// For an `rpc_url` written by the definition's author (and `vars`). Built once: a client
    /// keeps its connections and its TLS roots across steps.
    client: reqwest::Client,
    /// For an `rpc_url` rendered from a run's input or step outputs: internal addresses refused.
    from_input_client: reqwest::Client,
}

impl Chain {
    /// The kind with the default egress policy.
    pub fn new(nonces: Arc<dyn NonceAllocator>) -> Self {
        Chain::with_policy(nonces, Arc::new(EgressPolicy::default()))
    }

    /// The kind whose JSON-RPC requests go only where `policy` allows, as the `http` kind's do.
    pub fn with_policy(nonces: Arc<dyn NonceAllocator>, policy: Arc<EgressPolicy>) -> Self {
        let client = |from_input| {
            checked_client(&policy, from_input)
                .timeout(RPC_TIMEOUT)
                .build()
                .expect("TLS backend initialises")
        };
        Chain {
            nonces,
            client: client(false),
            from_input_client: client(true),
            policy,
        }
    }

    /// The node at `plan.rpc_url`, if the egress policy lets the step reach it.
    fn node(&self, plan: &Plan, call: &StepCall) -> Result<RootProvider, StepFailure> {
        let from_input = call.reads_run_data("rpc_url");
        let host = plan.rpc_url.host_str().unwrap_or_default();
        self.policy.check_host(host, from_input).map_err(|why| {
            StepFailure::permanent(
                "egress",
                format!("chain step: `with.rpc_url` is refused by the egress policy: {why}"),
            )
        })?;
        let client = if from_input {
            &self.from_input_client
        } else {
            &self.client
        };
        Ok(RootProvider::new(RpcClient::new_http_with_client(
            client.clone(),
            plan.rpc_url.clone(),
        )))
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ChainWith {
    /// The node's JSON-RPC endpoint, `http://` or `https://`. A provider's key in it may come
    /// from a secret: `https://base-mainnet.example.com/v2/{{ secrets.node_key }}`.
    rpc_url: String,
    /// The chain the step is meant for (1 for Ethereum, 8453 for Base, ...): a node on another
    /// chain fails the step for good.
    chain_id: u64,
    /// The signing key, from a secret: `{{ secrets.NAME }}` (32 bytes as hex). Sending needs it;
    /// a read uses its address as the caller, if given.
    key: Option<String>,
    /// The contract called, or the account paid: an address (`0x` and 40 hex digits).
    to: String,
    /// The function called, human-readable: `function mint(address,string)`; a read names what
    /// it returns: `function balanceOf(address) view returns (uint256)`. None: a plain transfer.
    abi: Option<String>,
    /// The function's arguments in order, as JSON: text or numbers for integers (text for those
    /// past 2^53), `0x` hex for addresses and bytes, lists for arrays and tuples.
    #[serde(default)]
    args: Vec<Value>,
    /// Wei sent with the transaction: an integer, or text with a unit: `"0.5 ether"`, `"20 gwei"`.
    #[serde(default)]
    #[schemars(schema_with = "amount")]
    value: Option<Value>,
    /// Read with `eth_call` instead of sending a transaction: nothing is signed or paid.
    #[serde(default)]
    call: bool,
    /// Blocks that must hold the transaction before the step succeeds: 1 (the default) is the
    /// block that mined it.
    #[schemars(range(min = 1))]
    confirmations: Option<u64>,
    /// Gas the transaction may use; none: the node's estimate.
    #[schemars(range(min = 21000))]
    gas_limit: Option<u64>,
    /// The most paid per gas, in wei (or with a unit); none: the node's estimate.
    #[serde(default)]
    #[schemars(schema_with = "amount")]
    max_fee_per_gas: Option<Value>,
    /// The tip per gas, in wei (or with a unit); none: the node's estimate.
    #[serde(default)]
    #[schemars(schema_with = "amount")]
    max_priority_fee_per_gas: Option<Value>,
    /// How long an attempt waits for the receipt, such as `5m` (2 minutes by default): then it
    /// fails retryably, and the retry sends the same signed transaction again.
    #[schemars(extend("format" = "duration"))]
    timeout: Option<String>,
}

/// An amount of wei: an integer, or text (`"1000"`, `"1.5 ether"`, `"30 gwei"`).
fn amount(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": ["string", "integer", "null"], "minimum": 0 })
}

/// The rendered `with`, or a failure for good that names the field at fault.
fn parse_chain_with(with: &Value) -> Result<ChainWith, StepFailure> {
    serde_path_to_error::deserialize(with).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if field == "." {
            invalid(format!("chain step: `with`: {inner}"))
        } else {
            invalid(format!("chain step: `with.{field}`: {inner}"))
        }
    })
}

fn invalid(message: impl Into<String>) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

/// What the step does, read and checked from `with` before the node is asked anything.
struct Plan {
    rpc_url: url::Url,
    chain_id: u64,
    signer: Option<PrivateKeySigner>,
    to: Address,
    function: Option<Function>,
    input: Bytes,
    value: U256,
    call: bool,
    confirmations: u64,
    gas_limit: Option<u64>,
    max_fee_per_gas: Option<u128>,
    max_priority_fee_per_gas: Option<u128>,
    timeout: Duration,
}

impl Plan {
    fn from_with(with: ChainWith, call: &StepCall) -> Result<Plan, StepFailure> {
        // A provider's key is often part of its URL, so it may come from a secret.
        let revealed = call
            .secrets
            .reveal(&with.rpc_url)
            .map_err(|e| invalid(format!("chain step: `with.rpc_url`: {e}")))?;
        let rpc_url = url::Url::parse(&revealed)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                invalid(format!(
                    "chain step: `with.rpc_url` {:?} is not an http(s) URL",
                    with.rpc_url
                ))
            })?;
        let signer = with
            .key
            .as_deref()
            .map(|key| signer(call, key))
            .transpose()?;
        let to = Address::from_str(with.to.trim()).map_err(|_| {
            invalid(format!(
                "chain step: `with.to` {:?} is not an address (0x and 40 hex digits)",
                with.to
            ))
        })?;
        let (function, input) = match &with.abi {
            Some(abi) => {
                let function = parse_function(abi)?;
                let input = encode_args(&function, &with.args)?;
                (Some(function), input)
            }
            None if !with.args.is_empty() => {
                return Err(invalid(
                    "chain step: `with.args` needs `with.abi`, the function they are passed to",
                ));
            }
            None if with.call => {
                return Err(invalid(
                    "chain step: a read (`call: true`) needs `with.abi`, the function to call",
                ));
            }
            None => (None, Bytes::new()),
        };
        if !with.call && signer.is_none() {
            return Err(invalid(
                "chain step: `with.key` is needed to send a transaction (or `call: true` to read)",
            ));
        }
        let timeout = match &with.timeout {
            None => RECEIPT_TIMEOUT,
            Some(text) => humantime::parse_duration(text)
                .map_err(|e| invalid(format!("chain step: `with.timeout` {text:?}: {e}")))?,
        };
        if timeout > MAX_TIMEOUT {
            return Err(invalid(format!(
                "chain step: `with.timeout` is at most {}",
                humantime::format_duration(MAX_TIMEOUT)
            )));
        }
        if with.confirmations == Some(0) {
            return Err(invalid(
                "chain step: `with.confirmations` is at least 1, the block that mines the transaction",
            ));
        }
        if with.confirmations.is_some_and(|n| n > MAX_CONFIRMATIONS) {
            return Err(invalid(format!(
                "chain step: `with.confirmations` is at most {MAX_CONFIRMATIONS}"
            )));
        }
        let fee = |field: &str, value: &Option<Value>| -> Result<Option<u128>, StepFailure> {
            value
                .as_ref()
                .map(|v| {
                    let wei = wei(field, v)?;
                    u128::try_from(wei)
                        .map_err(|_| invalid(format!("chain step: `with.{field}` is too large")))
                })
                .transpose()
        };
        Ok(Plan {
            rpc_url,
            chain_id: with.chain_id,
            signer,
            to,
            function,
            input,
            value: with
                .value
                .as_ref()
                .map(|v| wei("value", v))
                .transpose()?
                .unwrap_or_default(),
            call: with.call,
            confirmations: with.confirmations.unwrap_or(1),
            gas_limit: with.gas_limit,
            max_fee_per_gas: fee("max_fee_per_gas", &with.max_fee_per_gas)?,
            max_priority_fee_per_gas: fee(
                "max_priority_fee_per_gas",
                &with.max_priority_fee_per_gas,
            )?,
            timeout,
        })
    }

    /// The transaction or call, without what the node and the allocator decide.
    fn request(&self) -> TransactionRequest {
        let mut request = TransactionRequest::default()
            .with_to(self.to)
            .with_input(self.input.clone())
            .with_value(self.value);
        if let Some(signer) = &self.signer {
            request = request.with_from(signer.address());
        }
        request
    }
}

/// The key behind `with.key`, which must be a secret reference. No message quotes the key, nor
/// the parser's error (which may quote part of it).
fn signer(call: &StepCall, key: &str) -> Result<PrivateKeySigner, StepFailure> {
    if !call.secrets.referenced_in(key) {
        return Err(invalid(
            "chain step: `with.key` must be a secret reference, `{{ secrets.NAME }}`: a key \
             written in a definition is kept in its history",
        ));
    }
    let revealed = call
        .secrets
        .reveal(key)
        .map_err(|e| invalid(format!("chain step: `with.key`: {e}")))?;
    PrivateKeySigner::from_str(revealed.trim()).map_err(|_| {
        invalid(
            "chain step: `with.key` is not a valid private key (32 bytes as 64 hex digits, \
             with or without 0x)",
        )
    })
}

fn parse_function(abi: &str) -> Result<Function, StepFailure> {
    let text = abi.trim();
    let text = text.strip_prefix("function ").unwrap_or(text);
    Function::parse(text).map_err(|e| {
        invalid(format!(
            "chain step: `with.abi` {abi:?} is not a function signature such as \
             \"function mint(address,string)\": {e}"
        ))
    })
}

/// The calldata: selector and arguments, each argument read as its parameter's type says.
fn encode_args(function: &Function, args: &[Value]) -> Result<Bytes, StepFailure> {
    if args.len() != function.inputs.len() {
        return Err(invalid(format!(
            "chain step: `with.args` has {} values; {} takes {}",
            args.len(),
            function.signature(),
            function.inputs.len()
        )));
    }
    let values = function
        .inputs
        .iter()
        .zip(args)
        .enumerate()
        .map(|(i, (param, arg))| {
            let ty = param
                .resolve()
                .map_err(|e| invalid(format!("chain step: `with.abi`: parameter {i}: {e}")))?;
            to_sol(&ty, arg).map_err(|why| {
                invalid(format!(
                    "chain step: `with.args[{i}]` is not a {}: {why}",
                    ty.sol_type_name()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    function
        .abi_encode_input(&values)
        .map(Bytes::from)
        .map_err(|e| invalid(format!("chain step: `with.args`: {e}")))
}

/// `value` as a value of `ty`: scalars through alloy's own parser of Solidity values, arrays and
/// tuples element by element, so JSON lists and objects need no quoting.
fn to_sol(ty: &DynSolType, value: &Value) -> Result<DynSolValue, String> {
    match (ty, value) {
        (DynSolType::Array(inner), Value::Array(items)) => Ok(DynSolValue::Array(
            items
                .iter()
                .map(|item| to_sol(inner, item))
                .collect::<Result<_, _>>()?,
        )),
        (DynSolType::FixedArray(inner, len), Value::Array(items)) => {
            if items.len() != *len {
                return Err(format!("{} items, not {len}", items.len()));
            }
            Ok(DynSolValue::FixedArray(
                items
                    .iter()
                    .map(|item| to_sol(inner, item))
                    .collect::<Result<_, _>>()?,
            ))
        }
        (DynSolType::Tuple(types), Value::Array(items)) => {
            if items.len() != types.len() {
                return Err(format!("{} items, not {}", items.len(), types.len()));
            }
            Ok(DynSolValue::Tuple(
                types
                    .iter()
                    .zip(items)
                    .map(|(ty, item)| to_sol(ty, item))
                    .collect::<Result<_, _>>()?,
            ))
        }
        (DynSolType::String, Value::String(text)) => Ok(DynSolValue::String(text.clone())),
        (_, Value::String(text)) => ty.coerce_str(text).map_err(|e| e.to_string()),
        (DynSolType::Uint(_) | DynSolType::Int(_), Value::Number(n)) => {
            if n.is_f64() {
                return Err(format!("{n} is not an integer"));
            }
            ty.coerce_str(&n.to_string()).map_err(|e| e.to_string())
        }
        (DynSolType::Bool, Value::Bool(b)) => Ok(DynSolValue::Bool(*b)),
        (_, other) => Err(format!("got {}", json_type(other))),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A decoded value as JSON: integers as decimal text, addresses checksummed, bytes as hex.
fn to_json(value: &DynSolValue) -> Value {
    match value {
        DynSolValue::Bool(b) => Value::Bool(*b),
        DynSolValue::Int(i, _) => Value::String(i.to_string()),
        DynSolValue::Uint(u, _) => Value::String(u.to_string()),
        DynSolValue::FixedBytes(word, size) => Value::String(hex::encode_prefixed(&word[..*size])),
        DynSolValue::Address(a) => Value::String(a.to_checksum(None)),
        DynSolValue::Function(f) => Value::String(hex::encode_prefixed(f.as_slice())),
        DynSolValue::Bytes(b) => Value::String(hex::encode_prefixed(b)),
        DynSolValue::String(s) => Value::String(s.clone()),
        DynSolValue::Array(items) | DynSolValue::FixedArray(items) | DynSolValue::Tuple(items) => {
            Value::Array(items.iter().map(to_json).collect())
        }
    }
}

/// A read's outputs: one value; several in a list, or an object when each is named.
fn outputs_json(function: &Function, values: &[DynSolValue]) -> Value {
    match values {
        [] => Value::Null,
        [one] => to_json(one),
        many if function.outputs.iter().all(|o| !o.name.is_empty()) => Value::Object(
            function
                .outputs
                .iter()
                .zip(many)
                .map(|(o, v)| (o.name.clone(), to_json(v)))
                .collect::<Map<_, _>>(),
        ),
        many => Value::Array(many.iter().map(to_json).collect()),
    }
}

/// Wei from an integer, or from text with an optional unit (`wei`, `gwei`, `ether`, ...).
fn wei(field: &str, value: &Value) -> Result<U256, StepFailure> {
    let bad = |why: String| invalid(format!("chain step: `with.{field}` {value}: {why}"));
    match value {
        Value::Number(n) => n
            .as_u64()
            .map(U256::from)
            .ok_or_else(|| bad("not a whole number of wei at least 0".into())),
        Value::String(text) => {
            let mut words = text.split_whitespace();
            let (Some(number), unit, None) = (words.next(), words.next(), words.next()) else {
                return Err(bad("an amount is a number and an optional unit".into()));
            };
            parse_units(number, unit.unwrap_or("wei"))
                .map(Into::into)
                .map_err(|e| bad(e.to_string()))
        }
        other => Err(bad(format!("got {}", json_type(other)))),
    }
}

/// What an attempt stores before it broadcasts: the signed transaction, for every later attempt
/// to send again and wait for.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
struct Signed {
    signed_tx: Bytes,
    hash: B256,
    nonce: u64,
    from: Address,
    to: Address,
    chain_id: u64,
    /// The transactions this one replaced, with the same nonce and lower fees: one of them may
    /// still be mined instead (only one of all can be).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    replaced: Vec<B256>,
}

impl Signed {
    /// This transaction's hash and those of the ones it replaced.
    fn hashes(&self) -> impl Iterator<Item = B256> + '_ {
        std::iter::once(self.hash).chain(self.replaced.iter().copied())
    }

    fn eip1559(&self) -> Option<TxEip1559> {
        let envelope = TxEnvelope::decode_2718(&mut self.signed_tx.as_ref()).ok()?;
        envelope.as_eip1559().map(|signed| signed.tx().clone())
    }
}

/// Fails the attempt retryably: the node or the network may answer next time.
fn unreachable_node(what: &str, e: impl std::fmt::Display) -> StepFailure {
    StepFailure::transient("chain_rpc", format!("chain step: {what}: {e}"))
}

/// What a failed request to the node says. Final when the egress policy refused every address
/// of the node (found among the causes) or the node says the sender cannot pay, which waiting
/// rarely changes; anything else may go otherwise next time.
fn rpc_failure(what: &str, e: RpcError<TransportErrorKind>) -> StepFailure {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = match &e {
        RpcError::Transport(TransportErrorKind::Custom(inner)) => Some(inner.as_ref()),
        other => Some(other),
    };
    while let Some(c) = cause {
        if let Some(why) = c.downcast_ref::<Refused>() {
            return StepFailure::permanent(
                "egress",
                format!("chain step: `with.rpc_url` is refused by the egress policy: {why}"),
            );
        }
        cause = c.source();
    }
    let cannot_pay = e
        .as_error_resp()
        .is_some_and(|p| p.message.to_lowercase().contains("insufficient funds"));
    if cannot_pay {
        StepFailure::permanent("insufficient_funds", format!("chain step: {what}: {e}"))
    } else {
        unreachable_node(what, e)
    }
}

fn reverted(what: &str, reason: &str) -> StepFailure {
    StepFailure::permanent("reverted", format!("chain step: {what} reverted: {reason}"))
}

/// The reason a node gave for a call that reverted: its `Error(string)` (or panic code)
/// decoded, else the node's message. `None` when the error is no revert.
fn revert_reason(e: &RpcError<TransportErrorKind>) -> Option<String> {
    let payload = e.as_error_resp()?;
    let decoded = payload.as_revert_data().map(|data| {
        alloy::sol_types::decode_revert_reason(&data)
            .unwrap_or_else(|| format!("custom error {data}"))
    });
    match decoded {
        Some(reason) => Some(reason),
        None if payload.message.contains("revert") => Some(payload.message.to_string()),
        None => None,
    }
}

/// `future`, unless the node takes longer than [`RPC_TIMEOUT`].
async fn rpc<T>(
    what: &str,
    future: impl std::future::IntoFuture<Output = Result<T, RpcError<TransportErrorKind>>>,
) -> Result<T, StepFailure> {
    match tokio::time::timeout(RPC_TIMEOUT, future.into_future()).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(rpc_failure(what, e)),
        Err(_) => Err(unreachable_node(
            what,
            format!("no answer within {}s", RPC_TIMEOUT.as_secs()),
        )),
    }
}

#[async_trait]
impl StepKind for Chain {
    fn name(&self) -> &'static str {
        "chain"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["key", "rpc_url"]
    }

    fn with_schema(&self) -> Value {
        with_schema::<ChainWith>()
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let with = parse_chain_with(&call.with)?;
        let plan = Plan::from_with(with, &call)?;
        let node = self.node(&plan, &call)?;
        // A stored transaction is sent again as it is, or not at all: signing anew for a step
        // whose chain or key changed since would send a second one.
        if let Some(kept) = call
            .checkpoint
            .as_ref()
            .filter(|c| c.get("signed_tx").is_some())
        {
            let signed = serde_json::from_value::<Signed>(kept.clone())
                .ok()
                .filter(|s| {
                    s.chain_id == plan.chain_id
                        && plan.signer.as_ref().is_some_and(|k| k.address() == s.from)
                })
                .ok_or_else(|| {
                    StepFailure::permanent(
                        "checkpoint_mismatch",
                        "chain step: this step stored a transaction for another chain or key; \
                         it is not signed again, so that the step never sends two",
                    )
                })?;
            return self.send(&node, &plan, &signed, &call).await;
        }
        let chain_id = rpc("eth_chainId", node.get_chain_id()).await?;
        if chain_id != plan.chain_id {
            return Err(StepFailure::permanent(
                "chain_mismatch",
                format!(
                    "chain step: `with.chain_id` is {} but the node at `with.rpc_url` is on chain \
                     {chain_id}",
                    plan.chain_id
                ),
            ));
        }
        if plan.call {
            return read(&node, &plan).await;
        }
        self.sign(&node, &plan, &call).await
    }
}

/// `eth_call` at the latest block, decoded.
async fn read(node: &RootProvider, plan: &Plan) -> StepResult {
    let function = plan.function.as_ref().expect("a read has a function");
    let answer =
        match tokio::time::timeout(RPC_TIMEOUT, node.call(plan.request()).into_future()).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                return Err(match revert_reason(&e) {
                    Some(reason) => reverted(&format!("the call of {}", function.name), &reason),
                    None => rpc_failure("eth_call", e),
                });
            }
            Err(_) => return Err(unreachable_node("eth_call", "no answer in time")),
        };
    let values = function.abi_decode_output(&answer).map_err(|e| {
        StepFailure::permanent(
            "undecodable",
            format!(
                "chain step: the answer of {} does not decode as its `returns` ({}): {e}",
                function.name,
                hex::encode_prefixed(&answer)
            ),
        )
    })?;
    Ok(StepOutcome::Output(
        json!({ "result": outputs_json(function, &values) }),
    ))
}

impl Chain {
    /// Estimates, takes a nonce, signs, and parks with the signed transaction: broadcast comes
    /// only after the store has it.
    async fn sign(&self, node: &RootProvider, plan: &Plan, call: &StepCall) -> StepResult {
        let signer = plan.signer.clone().expect("a send has a key");
        let from = signer.address();
        let what = match &plan.function {
            Some(f) => format!("the call of {}", f.name),
            None => "the transfer".to_owned(),
        };
        let gas = match plan.gas_limit {
            Some(gas) => gas,
            None => {
                let estimate = tokio::time::timeout(
                    RPC_TIMEOUT,
                    node.estimate_gas(plan.request()).into_future(),
                )
                .await
                .map_err(|_| unreachable_node("eth_estimateGas", "no answer in time"))?;
                match estimate {
                    Ok(gas) => gas,
                    Err(e) => {
                        return Err(match revert_reason(&e) {
                            Some(reason) => reverted(&what, &reason),
                            None => rpc_failure("eth_estimateGas", e),
                        });
                    }
                }
            }
        };
        let (max_fee, tip) = match (plan.max_fee_per_gas, plan.max_priority_fee_per_gas) {
            (Some(max_fee), Some(tip)) => (max_fee, tip),
            (given_max, given_tip) => {
                let estimate = rpc("fee estimate", node.estimate_eip1559_fees()).await?;
                let tip = given_tip.unwrap_or(estimate.max_priority_fee_per_gas);
                (given_max.unwrap_or(estimate.max_fee_per_gas.max(tip)), tip)
            }
        };
        if tip > max_fee {
            return Err(invalid(format!(
                "chain step: `with.max_priority_fee_per_gas` ({tip}) is above the most paid per \
                 gas ({max_fee})"
            )));
        }
        let floor = pending_nonce(node, from).await?;
        let request = NonceRequest {
            chain_id: plan.chain_id,
            address: format!("{from:#x}"),
            owner: call.idempotency_key.clone(),
            floor,
            job_id: call.job_id,
            filled: None,
        };
        let mut allocation = self.nonces.allocate(&request).await;
        if let Ok(NonceAllocation::Filled { nonce, hash }) = &allocation {
            // Another step filled this step's nonce. Once its filler is mined, as deep as the
            // step trusts its own transactions (`confirmations`: a block a reorg drops would
            // leave room for this step's own), this step's transaction never can be, and it
            // signs with a new nonce.
            let filler = hash.parse::<B256>().ok();
            let block = match filler {
                Some(filler) => rpc(
                    "eth_getTransactionReceipt",
                    node.get_transaction_receipt(filler),
                )
                .await?
                .and_then(|receipt| receipt.block_number),
                None => None,
            };
            let mined = match block {
                Some(block) => confirmed(node, block, plan.confirmations).await?,
                None => false,
            };
            if mined {
                call.log.line(
                    "info",
                    format!(
                        "nonce {nonce} of {from} was filled by {hash}, which is mined: this step \
                         takes a new one"
                    ),
                );
                let again = NonceRequest {
                    filled: Some(*nonce),
                    ..request.clone()
                };
                allocation = self.nonces.allocate(&again).await;
            }
        }
        let nonce = match allocation {
            Ok(NonceAllocation::New(n) | NonceAllocation::Again(n)) => n,
            Ok(NonceAllocation::Spent(n) | NonceAllocation::Filled { nonce: n, .. }) => {
                return Err(StepFailure::permanent(
                    "nonce_spent",
                    format!(
                        "chain step: this step signs only with nonce {n} of {from}, which the node \
                         has seen used since, and it holds no transaction of its own to wait for \
                         (a run retried after it failed starts without it): it may have sent its \
                         transaction already, so it sends nothing. Look for a transaction of \
                         {from} with nonce {n} before starting a new run"
                    ),
                ));
            }
            Err(e @ NonceError::NotShared) => {
                return Err(StepFailure::permanent("nonce", format!("chain step: {e}")));
            }
            Err(e) => return Err(StepFailure::transient("nonce", format!("chain step: {e}"))),
        };
        let request = plan
            .request()
            .with_nonce(nonce)
            .with_chain_id(plan.chain_id)
            .with_gas_limit(gas)
            .with_max_fee_per_gas(max_fee)
            .with_max_priority_fee_per_gas(tip);
        let wallet = EthereumWallet::from(signer);
        let envelope: TxEnvelope = request
            .build(&wallet)
            .await
            .map_err(|e| StepFailure::permanent("signing", format!("chain step: signing: {e}")))?;
        let signed = Signed {
            signed_tx: envelope.encoded_2718().into(),
            hash: *envelope.tx_hash(),
            nonce,
            from,
            to: plan.to,
            chain_id: plan.chain_id,
            replaced: Vec::new(),
        };
        call.log.line(
            "info",
            format!(
                "signed {} with nonce {nonce} from {from}; stored before it is sent",
                signed.hash
            ),
        );
        tracing::debug!(hash = %signed.hash, nonce, %from, "chain transaction signed");
        Ok(park_with(&signed, call))
    }

    /// Broadcasts the stored transaction (again) and waits for its receipt, or for that of one
    /// it replaced.
    async fn send(
        &self,
        node: &RootProvider,
        plan: &Plan,
        signed: &Signed,
        call: &StepCall,
    ) -> StepResult {
        let hash = signed.hash;
        let broadcast =
            tokio::time::timeout(RPC_TIMEOUT, node.send_raw_transaction(&signed.signed_tx))
                .await
                .map_err(|_| unreachable_node("eth_sendRawTransaction", "no answer in time"))?;
        // The node said the nonce is used and knows none of the step's transactions.
        let mut unseen = false;
        match broadcast {
            Ok(_) => call.log.line("info", format!("sent {hash}")),
            Err(e) => match refusal(&e) {
                Refusal::Ours => call.log.line(
                    "info",
                    format!("the node has {hash} already: waiting for it"),
                ),
                Refusal::NonceUsed => {
                    call.log.line(
                        "info",
                        format!(
                            "the node knows nonce {} already ({e}): waiting for {hash}",
                            signed.nonce
                        ),
                    );
                    unseen = !knows_any(node, signed).await?;
                }
                // A replacement the node will not take (the sender cannot pay its higher fees,
                // a fee cap): the one it replaces may still be mined, so the step waits for it.
                Refusal::Other if !signed.replaced.is_empty() => call.log.line(
                    "warn",
                    format!("the node refused {hash} ({e}): waiting for the one it replaced"),
                ),
                Refusal::Other => return Err(rpc_failure("eth_sendRawTransaction", e)),
            },
        }
        let receipt = match self.wait(node, plan, signed, call, unseen).await? {
            Waited::Mined(receipt) => *receipt,
            Waited::Underpriced { base_fee } => {
                return self.replace(node, plan, signed, base_fee, call).await;
            }
        };
        let mined = receipt.transaction_hash;
        if !receipt.status() {
            let reason = replay_revert(node, plan, signed, &receipt).await;
            return Err(reverted(&format!("transaction {mined}"), &reason));
        }
        Ok(StepOutcome::Output(json!({
            "hash": mined,
            "block": receipt.block_number,
            "block_hash": receipt.block_hash,
            "status": "success",
            "gas_used": receipt.gas_used,
            "from": signed.from,
            "to": signed.to,
            "nonce": signed.nonce,
        })))
    }

    /// Waits until one of the step's transactions has `confirmations` blocks. Meanwhile, once the
    /// first looks found nothing, it fills a gap below its nonce that a finished step left, and
    /// stops when the node's base fee has passed what the transaction pays (when the step left
    /// its fees to the node's estimate), to sign it again with more.
    async fn wait(
        &self,
        node: &RootProvider,
        plan: &Plan,
        signed: &Signed,
        call: &StepCall,
        unseen: bool,
    ) -> Result<Waited, StepFailure> {
        let deadline = tokio::time::Instant::now() + plan.timeout;
        let mut pause = FIRST_POLL;
        loop {
            if let Some(receipt) = mined(node, signed).await? {
                let block = receipt.block_number.unwrap_or_default();
                if plan.confirmations <= 1 {
                    return Ok(Waited::Mined(Box::new(receipt)));
                }
                if confirmed(node, block, plan.confirmations).await? {
                    // A reorg may have moved it meanwhile: then it counts again from the block
                    // that holds it now.
                    let again = rpc(
                        "eth_getTransactionReceipt",
                        node.get_transaction_receipt(receipt.transaction_hash),
                    )
                    .await?;
                    if let Some(again) = again.filter(|r| r.block_hash == receipt.block_hash) {
                        return Ok(Waited::Mined(Box::new(again)));
                    }
                }
            } else if pause == LONGEST_POLL && !unseen {
                if let Some(base_fee) = self.underpriced(node, plan, signed).await? {
                    return Ok(Waited::Underpriced { base_fee });
                }
                self.fill_gap_below(node, plan, signed, call).await?;
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(if unseen {
                    // Past the wait, a node behind a balancer that had not indexed it yet would
                    // have: none of the step's transactions will be mined.
                    StepFailure::permanent(
                        "nonce_spent",
                        format!(
                            "chain step: nonce {} of {} was used by another transaction; this \
                             step's {} can never be mined",
                            signed.nonce, signed.from, signed.hash
                        ),
                    )
                } else {
                    StepFailure::transient(
                        "receipt_timeout",
                        format!(
                            "chain step: no receipt of {} with {} confirmation(s) within {}; a \
                             retry sends the same signed transaction again and waits for it",
                            signed.hash,
                            plan.confirmations,
                            humantime::format_duration(plan.timeout)
                        ),
                    )
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_POLL);
        }
    }

    /// The latest base fee, when it is above what the step's transaction pays per gas and the
    /// step may pay more: its fees were the node's estimate, not given, and it has not been
    /// replaced [`MAX_REPLACEMENTS`] times.
    async fn underpriced(
        &self,
        node: &RootProvider,
        plan: &Plan,
        signed: &Signed,
    ) -> Result<Option<u128>, StepFailure> {
        let fees_given = plan.max_fee_per_gas.is_some() || plan.max_priority_fee_per_gas.is_some();
        if fees_given || signed.replaced.len() >= MAX_REPLACEMENTS {
            return Ok(None);
        }
        let Some(tx) = signed.eip1559() else {
            return Ok(None);
        };
        let latest = rpc("eth_getBlockByNumber", node.get_block(BlockId::latest())).await?;
        let base_fee = latest
            .and_then(|block| block.header.base_fee_per_gas)
            .map(u128::from);
        Ok(base_fee.filter(|&base| base > tx.max_fee_per_gas))
    }

    /// Signs the step's transaction again with the same nonce and higher fees, and parks with it:
    /// it is stored before it is sent, like the first. Whichever of the two is mined, the other
    /// cannot be.
    async fn replace(
        &self,
        node: &RootProvider,
        plan: &Plan,
        signed: &Signed,
        base_fee: u128,
        call: &StepCall,
    ) -> StepResult {
        let signer = plan.signer.as_ref().expect("a send has a key");
        let mut tx = signed
            .eip1559()
            .expect("only an EIP-1559 transaction is found underpriced");
        let estimate = rpc("fee estimate", node.estimate_eip1559_fees()).await?;
        // A node takes a replacement only with both fees at least a tenth higher.
        let bump = |fee: u128| fee.saturating_add(fee / 8).saturating_add(1);
        tx.max_priority_fee_per_gas =
            bump(tx.max_priority_fee_per_gas).max(estimate.max_priority_fee_per_gas);
        tx.max_fee_per_gas = bump(tx.max_fee_per_gas)
            .max(estimate.max_fee_per_gas)
            .max(base_fee.saturating_mul(2))
            .max(tx.max_priority_fee_per_gas);
        let envelope = sign_eip1559(signer, tx)?;
        let mut replaced = signed.replaced.clone();
        replaced.push(signed.hash);
        let replacement = Signed {
            signed_tx: envelope.encoded_2718().into(),
            hash: *envelope.tx_hash(),
            replaced,
            ..signed.clone()
        };
        call.log.line(
            "info",
            format!(
                "the base fee ({base_fee} wei) passed what {} pays per gas: signed {} with nonce \
                 {} and higher fees; stored before it is sent",
                signed.hash, replacement.hash, signed.nonce
            ),
        );
        Ok(park_with(&replacement, call))
    }

    /// Fills the nonce below the step's own that the node has no transaction for, when the step
    /// that held it has ended without sending (`Store::fill_nonce_gap` decides): with an empty
    /// transfer to itself, so the step's transaction can be mined. What goes wrong is noted and
    /// left to the next look.
    async fn fill_gap_below(
        &self,
        node: &RootProvider,
        plan: &Plan,
        signed: &Signed,
        call: &StepCall,
    ) -> Result<(), StepFailure> {
        let Some(job_id) = call.job_id else {
            return Ok(());
        };
        let pending = pending_nonce(node, signed.from).await?;
        if pending >= signed.nonce {
            return Ok(());
        }
        let gap = NonceGap {
            chain_id: signed.chain_id,
            address: format!("{:#x}", signed.from),
            nonce: pending,
            job_id,
        };
        match self.nonces.fill_gap(&gap).await {
            Ok(GapFill::Fill) => {}
            Ok(GapFill::Wait) => return Ok(()),
            Err(e) => {
                call.log
                    .line("warn", format!("nonce gap at {pending}: {e}"));
                return Ok(());
            }
        }
        let estimate = rpc("fee estimate", node.estimate_eip1559_fees()).await?;
        let filler = TxEip1559 {
            chain_id: signed.chain_id,
            nonce: pending,
            gas_limit: 21_000,
            max_fee_per_gas: estimate.max_fee_per_gas,
            max_priority_fee_per_gas: estimate.max_priority_fee_per_gas,
            to: TxKind::Call(signed.from),
            value: U256::ZERO,
            access_list: Default::default(),
            input: Bytes::new(),
        };
        let signer = plan.signer.as_ref().expect("a send has a key");
        let envelope = sign_eip1559(signer, filler)?;
        let hash = *envelope.tx_hash();
        // Before it is sent: the step that held the nonce, retried, learns whether it may take
        // another by looking for this transaction.
        if let Err(e) = self.nonces.note_fill(&gap, hash).await {
            call.log
                .line("warn", format!("nonce gap at {pending}: {e}"));
            return Ok(());
        }
        let sent = tokio::time::timeout(
            RPC_TIMEOUT,
            node.send_raw_transaction(&envelope.encoded_2718()),
        )
        .await;
        match sent {
            Ok(Ok(_)) => call.log.line(
                "info",
                format!(
                    "nonce {pending} of {} was given to a step that ended without sending: \
                     filled it with {hash}, an empty transfer to itself, so that {} can be mined",
                    signed.from, signed.hash
                ),
            ),
            Ok(Err(e)) => call
                .log
                .line("warn", format!("filling nonce {pending} with {hash}: {e}")),
            Err(_) => call.log.line(
                "warn",
                format!("filling nonce {pending} with {hash}: no answer in time"),
            ),
        }
        Ok(())
    }
}

/// What [`Chain::wait`] saw.
enum Waited {
    Mined(Box<TransactionReceipt>),
    /// The base fee passed what the transaction pays: it would never be mined as it is.
    Underpriced {
        base_fee: u128,
    },
}

/// Whether `block` has `confirmations` blocks on the node, itself included.
async fn confirmed(
    node: &RootProvider,
    block: u64,
    confirmations: u64,
) -> Result<bool, StepFailure> {
    let head = rpc("eth_blockNumber", node.get_block_number()).await?;
    Ok(head.saturating_add(1) >= block.saturating_add(confirmations))
}

/// The step's outcome after signing: park at once, so the store commits the transaction before
/// the next attempt sends it.
fn park_with(signed: &Signed, call: &StepCall) -> StepOutcome {
    StepOutcome::Park {
        until: Some(call.now),
        checkpoint: serde_json::to_value(signed).expect("a signed transaction serialises"),
    }
}

fn sign_eip1559(signer: &PrivateKeySigner, mut tx: TxEip1559) -> Result<TxEnvelope, StepFailure> {
    let signature = signer
        .sign_transaction_sync(&mut tx)
        .map_err(|e| StepFailure::permanent("signing", format!("chain step: signing: {e}")))?;
    Ok(TxEnvelope::from(tx.into_signed(signature)))
}

/// The node's pending nonce of `from`: one past the last of its transactions that the node has
/// mined or holds ready, with none missing before it.
async fn pending_nonce(node: &RootProvider, from: Address) -> Result<u64, StepFailure> {
    rpc(
        "eth_getTransactionCount",
        node.get_transaction_count(from)
            .block_id(BlockId::pending()),
    )
    .await
}

/// Why the node refused a broadcast.
enum Refusal {
    /// It has these very bytes already.
    Ours,
    /// It has a transaction with that nonce: another of the step's own, or someone else's.
    NonceUsed,
    Other,
}

fn refusal(e: &RpcError<TransportErrorKind>) -> Refusal {
    let Some(payload) = e.as_error_resp() else {
        return Refusal::Other;
    };
    let message = payload.message.to_lowercase();
    let says = |phrases: &[&str]| phrases.iter().any(|p| message.contains(p));
    if says(&["already known", "known transaction", "already imported"]) {
        Refusal::Ours
    } else if says(&["nonce too low", "replacement transaction underpriced"]) {
        Refusal::NonceUsed
    } else {
        Refusal::Other
    }
}

/// Whether the node knows one of the step's transactions, pending or mined.
async fn knows_any(node: &RootProvider, signed: &Signed) -> Result<bool, StepFailure> {
    for hash in signed.hashes() {
        let known = rpc(
            "eth_getTransactionByHash",
            node.get_transaction_by_hash(hash),
        )
        .await?;
        if known.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The receipt of whichever of the step's transactions is mined, if one is.
async fn mined(
    node: &RootProvider,
    signed: &Signed,
) -> Result<Option<TransactionReceipt>, StepFailure> {
    for hash in signed.hashes() {
        let receipt = rpc(
            "eth_getTransactionReceipt",
            node.get_transaction_receipt(hash),
        )
        .await?;
        if let Some(receipt) = receipt.filter(|r| r.block_number.is_some()) {
            return Ok(Some(receipt));
        }
    }
    Ok(None)
}

/// Why a mined transaction reverted: receipts carry no reason, so the call is replayed with
/// `eth_call` at the block that mined it, before that block's own changes.
async fn replay_revert(
    node: &RootProvider,
    plan: &Plan,
    signed: &Signed,
    receipt: &TransactionReceipt,
) -> String {
    let Some(block) = receipt.block_number else {
        return "no reason known".to_owned();
    };
    let request = plan
        .request()
        .with_from(signed.from)
        .with_gas_limit(receipt.gas_used.max(21_000));
    let at = BlockId::number(block.saturating_sub(1));
    match tokio::time::timeout(RPC_TIMEOUT, node.call(request).block(at).into_future()).await {
        Ok(Err(e)) => revert_reason(&e).unwrap_or_else(|| format!("no reason known ({e})")),
        Ok(Ok(_)) => "no reason known (the call succeeds when replayed)".to_owned(),
        Err(_) => "no reason known (the replay had no answer)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_wei_or_a_number_with_a_unit() {
        let ether = U256::from(10u64).pow(U256::from(18));
        assert_eq!(wei("value", &json!(1000)).unwrap(), U256::from(1000));
        assert_eq!(wei("value", &json!("1000")).unwrap(), U256::from(1000));
        assert_eq!(
            wei("value", &json!("1.5 ether")).unwrap(),
            ether * U256::from(3) / U256::from(2)
        );
        assert_eq!(
            wei("value", &json!("30 gwei")).unwrap(),
            U256::from(30_000_000_000u64)
        );
        for bad in [
            json!(-1),
            json!(1.5),
            json!("1.5 bananas"),
            json!("1 2 3"),
            json!(true),
        ] {
            let failure = wei("max_fee_per_gas", &bad).unwrap_err();
            assert!(!failure.retryable);
            assert!(
                failure.message.contains("`with.max_fee_per_gas`"),
                "{failure}"
            );
        }
    }

    #[test]
    fn arguments_are_read_as_their_parameters_types_say() {
        let function = parse_function(
            "function f(uint256 a, int8 b, bool c, bytes d, bytes32 e, address[] f, (string,uint16) g)",
        )
        .unwrap();
        let args = [
            json!("115792089237316195423570985008687907853269984665640564039457584007913129639935"),
            json!(-5),
            json!(true),
            json!("0x0102"),
            json!(format!("0x{}", "ab".repeat(32))),
            json!([
                "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
                "0x70997970c51812dc3a010c7d01b50e0d17dc79c8"
            ]),
            json!(["hi", 7]),
        ];
        let data = encode_args(&function, &args).unwrap();
        assert_eq!(data[..4], function.selector()[..]);
        // What alloy encodes, alloy decodes back to the same values.
        let decoded = function.abi_decode_input(&data[4..]).unwrap();
        let back: Vec<Value> = decoded.iter().map(to_json).collect();
        assert_eq!(back[0], args[0]);
        assert_eq!(back[1], json!("-5"));
        assert_eq!(
            back[5][0],
            json!("0xa0Ee7A142d267C1f36714E4a8F75612F20a79720")
        );
        assert_eq!(back[6], json!(["hi", "7"]));

        let failure = encode_args(&function, &[json!(1)]).unwrap_err();
        assert!(failure.message.contains("has 1 values"), "{failure}");
        let mut wrong = args.clone();
        wrong[6] = json!(["hi"]);
        let failure = encode_args(&function, &wrong).unwrap_err();
        assert!(failure.message.contains("`with.args[6]`"), "{failure}");
        let mut wrong = args;
        wrong[1] = json!(300);
        let failure = encode_args(&function, &wrong).unwrap_err();
        assert!(failure.message.contains("`with.args[1]`"), "{failure}");
    }

    #[test]
    fn a_reads_outputs_are_one_value_a_list_or_an_object_when_all_are_named() {
        let named =
            parse_function("function t() view returns (address owner, uint256 id)").unwrap();
        let values = [
            DynSolValue::Address(Address::ZERO),
            DynSolValue::Uint(U256::from(7), 256),
        ];
        assert_eq!(
            outputs_json(&named, &values),
            json!({ "owner": Address::ZERO.to_checksum(None), "id": "7" })
        );
        let unnamed = parse_function("function t() view returns (address, uint256)").unwrap();
        assert_eq!(
            outputs_json(&unnamed, &values),
            json!([Address::ZERO.to_checksum(None), "7"])
        );
        assert_eq!(outputs_json(&unnamed, &values[1..]), json!("7"));
        assert_eq!(outputs_json(&unnamed, &[]), Value::Null);
    }
}
