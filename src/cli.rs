//! Command-line arguments (clap derive).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use switchyard_engine::auth::Role;
use switchyard_engine::state::{NotificationStatus, RunStatus};
use switchyard_workers::Destination;

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A durable workflow orchestration engine"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Database URL: sqlite://PATH (created on first use) or postgres://USER@HOST/DATABASE
    /// (add `?options[search_path]=SCHEMA` to keep Switchyard's tables in a schema of their own).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_DATABASE_URL",
        default_value = "sqlite://switchyard.db"
    )]
    pub database: String,
    /// Most PostgreSQL connections this process opens (one more is kept for LISTEN).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_DB_CONNECTIONS",
        default_value_t = 10
    )]
    pub db_connections: u32,
    /// Workflow definition files or folders.
    #[arg(long, global = true, default_value = "./definitions")]
    pub definitions: Vec<PathBuf>,
    /// A file holding the master key (64 hex characters; several separated by commas, the first
    /// encrypting) that secrets and signing keys are encrypted under. `SWITCHYARD_MASTER_KEY`
    /// takes precedence; with neither, `<database file>.key` beside a SQLite database (or
    /// `./switchyard.key` for PostgreSQL), created on first use.
    #[arg(long, global = true, env = "SWITCHYARD_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Show times in UTC instead of the local time zone.
    #[arg(long, global = true)]
    pub utc: bool,
    /// Log lines as text (the default) or as JSON objects, one a line, for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Jobs run at once by this process; 0 runs no worker.
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// How long a claimed job stays leased without a heartbeat.
    #[arg(long, default_value = "30s", value_parser = humantime_duration)]
    pub lease: Duration,
    /// On SIGTERM or Ctrl-C, how long running steps may take to finish.
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    pub grace: Duration,
    /// The HTTP API's address as n8n reaches it, such as https://switchyard.example.com: `n8n`
    /// steps with `wait: true` give n8n this address to call back.
    #[arg(long, env = "SWITCHYARD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// n8n's base URL, such as http://localhost:5678: a workflow with no steps runs as a call
    /// of its n8n workflow's Webhook trigger, `{n8n-url}/webhook/{workflow id}`.
    #[arg(long, env = "SWITCHYARD_N8N_URL")]
    pub n8n_url: Option<String>,
    /// Run `script` steps. A script runs with this process's own rights (its files, its network,
    /// beyond the egress rules): allow it only where whoever may install a definition may.
    #[arg(long, env = "SWITCHYARD_ALLOW_SCRIPTS")]
    pub allow_scripts: bool,
    /// Destinations steps may reach even where a deny rule says otherwise: address ranges
    /// (10.0.0.0/8), addresses, host names (api.example.com, *.example.com). Repeatable or
    /// comma-separated.
    #[arg(long, env = "SWITCHYARD_EGRESS_ALLOW", value_delimiter = ',')]
    pub egress_allow: Vec<Destination>,
    /// Destinations no step may reach, in the same forms. URLs rendered from a run's input or
    /// step outputs may never reach loopback, link-local or metadata addresses unless allowed.
    #[arg(long, env = "SWITCHYARD_EGRESS_DENY", value_delimiter = ',')]
    pub egress_deny: Vec<Destination>,
    /// Where the files steps make and send are kept: a folder, or s3://bucket/prefix (an
    /// S3-compatible bucket, with the AWS_* variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION, and AWS_ENDPOINT with AWS_ALLOW_HTTP=true for a server of one's own). Every
    /// process of one database must reach the same place: on several machines, a bucket.
    #[arg(long, env = "SWITCHYARD_ARTIFACTS", default_value = "artifacts")]
    pub artifacts: String,
    /// Redis (`redis://host:6379/0`): steps' quota buckets and the API's per-caller rate limits
    /// are kept there, one for every process that uses it (several control planes behind one
    /// load balancer), instead of in the database and in each process.
    #[arg(long, env = "SWITCHYARD_REDIS_URL")]
    pub redis: Option<String>,
    /// The largest file a step may store, in MiB.
    #[arg(long, env = "SWITCHYARD_ARTIFACT_MAX_MIB", default_value_t = 100)]
    pub artifact_max_mib: u64,
}

#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// API requests per second allowed to each user, each other token, and each client address
    /// without one.
    #[arg(long, default_value_t = NonZeroU32::new(50).expect("non-zero"))]
    pub api_rate: NonZeroU32,
    /// Requests a caller may send at once above that rate.
    #[arg(long, default_value_t = NonZeroU32::new(100).expect("non-zero"))]
    pub api_burst: NonZeroU32,
    /// Login attempts a minute for each user name.
    #[arg(long, default_value_t = NonZeroU32::new(10).expect("non-zero"))]
    pub login_rate: NonZeroU32,
    /// Login attempts a minute from each client address.
    #[arg(long, default_value_t = NonZeroU32::new(60).expect("non-zero"))]
    pub login_address_rate: NonZeroU32,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scheduler, workers and the HTTP listener in one process.
    Serve {
        /// Address of the HTTP listener (`/health`).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Workers only: claim and run jobs from the database.
    Worker {
        /// Serve `/health` and `/metrics` (Prometheus) on this address; nothing else.
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Start a run; prints its id.
    Run {
        workflow: String,
        /// The run's input, a JSON object.
        #[arg(long)]
        input: Option<String>,
        /// Show progress on stderr until the run ends; the exit code is its result.
        #[arg(long)]
        wait: bool,
        /// Instead of the workflow's priority: -100 to 100, higher claimed first.
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i32>,
    },
    /// Check definition files; lists every error as file:line:column: message.
    Validate { paths: Vec<PathBuf> },
    /// Print the JSON Schema of definition files.
    Schema,
    /// List runs, newest first.
    Runs {
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long, value_parser = run_status())]
        status: Option<RunStatus>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON, in the shape the API answers with.
        #[arg(long)]
        json: bool,
    },
    /// Show one run: steps, attempts, errors, timings.
    Show {
        run: String,
        /// Print JSON, in the shape the API answers with.
        #[arg(long)]
        json: bool,
    },
    /// What a run's steps printed (a script's output, each request and its status).
    Logs {
        run: String,
        /// Only this step's lines (a loop's items too).
        #[arg(long)]
        step: Option<String>,
        /// Keep printing new lines until the run ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a run; a running step stops within one heartbeat.
    Cancel { run: String },
    /// Run a failed, cancelled or timed-out run's unsuccessful steps again.
    Retry { run: String },
    /// Send a signal to the run's `wait` step that waits for it; the payload becomes its output.
    Signal {
        run: String,
        name: String,
        /// JSON (default null).
        #[arg(long)]
        payload: Option<String>,
    },
    /// Stop a workflow's schedule from firing (fires are recorded as skipped).
    Pause { workflow: String },
    /// Let a paused schedule fire again.
    Resume { workflow: String },
    /// Remove a workflow: its schedule stops and it can no longer be started; its runs stay.
    /// A definition file that provides it installs it again on the next start.
    Remove {
        workflow: String,
        /// Remove it although runs of it have not ended (they finish with their version).
        #[arg(long)]
        force: bool,
    },
    /// List workflows: versions, schedules, next fires, paused.
    Workflows {
        /// Print JSON, in the shape the API answers with.
        #[arg(long)]
        json: bool,
    },
    /// List schedule fires, with the reason of each skipped one.
    Fires {
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON, in the shape the API answers with.
        #[arg(long)]
        json: bool,
    },
    /// Convert an n8n workflow export (JSON) into a definition, with a report of what was
    /// converted, what needs a look, and what stays in n8n.
    #[command(name = "import-n8n")]
    ImportN8n {
        /// The export: n8n's editor, ... → Download, or `n8n export:workflow`.
        file: std::path::PathBuf,
        /// Where to write the definition (default: standard output).
        #[arg(short, long)]
        output: Option<std::path::PathBuf>,
    },
    /// List webhook triggers: the path each serves under /api/hooks/, its workflow and how a
    /// delivery is checked.
    Hooks {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List run notifications (the outbox): where each goes, its deliveries, the last error.
    Notifications {
        #[arg(long, value_parser = notification_status())]
        status: Option<NotificationStatus>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON, in the shape the API answers with.
        #[arg(long)]
        json: bool,
    },
    /// Apply database migrations.
    Migrate,
    /// API tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// API users, who log in with `POST /api/auth/login`.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// The master key and the token signing keys.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Re-encrypt every secret and signing key under the first master key, in one transaction.
    Rotate,
    /// Make a new token signing key; tokens signed with the old ones stay valid for `--grace`.
    RotateSigning {
        /// How long tokens signed with the old keys stay valid; 0 ends them at once (a leak).
        #[arg(long, default_value = "24h", value_parser = humantime_duration)]
        grace: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Print a new bearer token as the last line of standard output.
    Create {
        /// viewer (read), operator (start, cancel, retry, pause, signal), admin (everything), or
        /// webhook (deliver webhooks and answer waiting n8n steps, nothing else: n8n's key).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// How long the token is valid, e.g. `30m`, `12h`, `30days`; at most 365 days.
        #[arg(long, default_value = "12h", value_parser = humantime_duration)]
        ttl: Duration,
        /// Who or what the token is for; it appears in the server's logs.
        #[arg(long, default_value = "cli")]
        subject: String,
    },
    /// Revoke a token by its id (`jti`, printed when it was made, and in the audit log): every
    /// server refuses it within a second.
    Revoke { jti: String },
}

#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// Add a user, or replace its password and role. The password is read from standard input
    /// (or `SWITCHYARD_PASSWORD`).
    Add {
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    text.parse()
        .map_err(|_| format!("unknown role {text:?}: one of {}", Role::names().join(", ")))
}

/// A run status by its name, with the names listed in `--help` and in the error.
fn run_status() -> impl clap::builder::TypedValueParser<Value = RunStatus> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(RunStatus::ALL.iter().map(|s| s.as_str()))
        .map(|name| name.parse().expect("a listed name parses"))
}

/// A notification status by its name, listed in `--help` and in the error.
fn notification_status() -> impl clap::builder::TypedValueParser<Value = NotificationStatus> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(NotificationStatus::ALL.iter().map(|s| s.as_str()))
        .map(|name| name.parse().expect("a listed name parses"))
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}
