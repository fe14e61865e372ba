//! What each command does, in terms of the engine and workers libraries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use switchyard_engine::quotas::{QuotaBuckets, RedisBuckets};

use anyhow::{Context, bail};
use serde_json::Value;
use switchyard_engine::api::types;
use switchyard_engine::api::{
    AppState, LoginLimit, Observability, RateLimit, RateLimiter, TlsFiles, observability_router,
    router, serve_http, tls_config,
};
use switchyard_engine::auth::{TokenKeys, cli_actor, put_user};
use switchyard_engine::clock::SystemClock;
use switchyard_engine::dashboard::Dashboard;
use switchyard_engine::definition::{Respond, WorkflowMap, json_schema_with, load_paths};
use switchyard_engine::health::{Heartbeats, watch_database};
use switchyard_engine::keys::{self, MasterKeys};
use switchyard_engine::maintenance::run_maintenance;
use switchyard_engine::plan::Trigger;
use switchyard_engine::scheduler::run_scheduler;
use switchyard_engine::service::Engine;
use switchyard_engine::state::{JobState, Millis, NotificationStatus, RunStatus};
use switchyard_engine::store::{self, DefinitionOrigin, RunDetail, RunFilter};
use switchyard_workers::notifier::{NOTIFICATION_SECRET, NotifierConfig, run_notifier};
use switchyard_workers::steps::StoreNonces;
use switchyard_workers::{EgressPolicy, N8nUrls, Registry, WorkerConfig, run_worker};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cli::{
    ApiArgs, Cli, Command, Global, KeysAction, LogFormat, TokenAction, UserAction, WorkerArgs,
};
use crate::display::{self, duration, time};

/// Writes a line to stdout. A reader that went away (`switchyard runs | head`) ends the command
/// quietly, as it would any Unix tool, instead of a panic on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

/// How many next fires `workflows` lists per workflow.
const NEXT_FIRES_SHOWN: usize = 3;

/// Exit codes of `run --wait` beyond 0 (succeeded) and 1 (failed or error).
const EXIT_CANCELLED: u8 = 3;
const EXIT_TIMED_OUT: u8 = 4;

pub fn init_logging(cli: &Cli) {
    use std::io::IsTerminal;
    let default = match cli.command {
        Command::Serve { .. } | Command::Worker { .. } => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
        // alloy's HTTP transport names the node's URL in a debug span, and a `chain` step's URL
        // may hold a provider's key.
        .add_directive(
            "alloy_transport_http=info"
                .parse()
                .expect("a valid directive"),
        );
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a file or a pipe, and not
        // when `NO_COLOR` says no (https://no-color.org).
        .with_ansi(
            std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        );
    match cli.global.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let Cli { global, command } = cli;
    if global.utc {
        display::use_utc();
    }
    match command {
        Command::Validate { paths } => validate(&global, paths),
        Command::ImportN8n { file, output } => import_n8n(&file, output.as_deref()),
        Command::Schema => {
            out!(
                "{}",
                serde_json::to_string_pretty(&json_schema_with(&step_kinds()?))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            action: TokenAction::Create { role, ttl, subject },
        } => {
            let (engine, master) = open(&global).await?;
            let keys = token_keys(&engine, &master).await?;
            let (token, claims) = keys
                .issue(&subject, role, ttl, &cli_actor(), engine.now())
                .await?;
            eprintln!(
                "token for {} with role {}, valid until {}; its id (to revoke it): {}",
                claims.sub,
                claims.role,
                time(claims.exp * 1000),
                claims.jti
            );
            out!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            action: TokenAction::Revoke { jti },
        } => {
            let (engine, master) = open(&global).await?;
            let keys = token_keys(&engine, &master).await?;
            if keys.revoke(&jti, &cli_actor(), engine.now()).await? {
                out!("token {jti} revoked: servers refuse it within a second");
            } else {
                out!("token {jti} was revoked already");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::User {
            action: UserAction::Add { name, role },
        } => {
            let (engine, _) = open(&global).await?;
            let password = read_password()?;
            put_user(&engine, &name, &password, role, &cli_actor()).await?;
            eprintln!("user {name} stored with role {role}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            action: KeysAction::Rotate,
        } => {
            let (engine, master) = open(&global).await?;
            let rows = keys::reseal(&engine, &master, true, &cli_actor()).await?;
            out!(
                "{rows} secrets and signing keys re-encrypted under master key {}",
                master.ids()[0]
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            action: KeysAction::RotateSigning { grace },
        } => {
            let (engine, master) = open(&global).await?;
            let keys = token_keys(&engine, &master).await?;
            let kid = keys.rotate(grace, &cli_actor(), engine.now()).await?;
            out!(
                "signing key {kid} is current; tokens signed before stay valid for {}",
                humantime::format_duration(grace)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            open(&global).await?;
            eprintln!("migrations applied to {}", global.database);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            listen,
            api,
            worker,
        } => serve(&global, Some(Http::Api(listen, api)), worker).await,
        Command::Worker { listen, worker } => {
            serve(&global, listen.map(Http::Metrics), worker).await
        }
        Command::Run {
            workflow,
            input,
            wait,
            priority,
        } => run(&global, &workflow, input.as_deref(), wait, priority).await,
        Command::Runs {
            workflow,
            status,
            limit,
            json,
        } => {
            let (engine, _) = open(&global).await?;
            let runs = engine
                .runs(&RunFilter {
                    workflow_id: workflow,
                    status,
                    limit,
                    ..RunFilter::default()
                })
                .await?;
            if json {
                let runs: Vec<types::RunSummary> = runs.into_iter().map(Into::into).collect();
                out!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                let mut table =
                    display::table(&["RUN", "WORKFLOW", "STATUS", "CREATED", "DURATION"]);
                for r in runs {
                    table.add_row([
                        r.id,
                        r.workflow_id,
                        r.status.to_string(),
                        time(r.created_at),
                        duration(r.started_at, r.finished_at),
                    ]);
                }
                out!("{}", table.trim_fmt());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { run, json } => {
            let (engine, _) = open(&global).await?;
            let run = engine.resolve_run(&run).await?;
            let detail = engine.run(&run).await?;
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&types::RunDetail::from(detail))?
                );
            } else {
                print_run(&detail);
                let children = engine.child_runs(&run, CHILDREN_SHOWN + 1).await?;
                print_children(&children);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { run, step, follow } => {
            let (engine, _) = open(&global).await?;
            let run = engine.resolve_run(&run).await?;
            print_logs(&engine, &run, step.as_deref(), follow).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { run } => {
            let (engine, _) = open(&global).await?;
            let run = engine.resolve_run(&run).await?;
            let status = engine.cancel(&run).await?;
            out!("run {run} is {status}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry { run } => {
            let (engine, _) = open(&global).await?;
            let run = engine.resolve_run(&run).await?;
            engine.retry(&run).await?;
            out!("run {run} is running again from its unsuccessful steps");
            Ok(ExitCode::SUCCESS)
        }
        Command::Signal { run, name, payload } => {
            let payload = match payload {
                None => serde_json::Value::Null,
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("--payload is not valid JSON: {e}"))?,
            };
            let (engine, _) = open(&global).await?;
            let run = engine.resolve_run(&run).await?;
            engine.signal(&run, &name, payload).await?;
            out!("run {run} has signal {name}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { workflow } => {
            let (engine, _) = open(&global).await?;
            engine.set_paused(&workflow, true).await?;
            out!("workflow {workflow} paused: its fires are recorded as skipped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { workflow } => {
            let (engine, _) = open(&global).await?;
            engine.set_paused(&workflow, false).await?;
            out!("workflow {workflow} resumed");
            Ok(ExitCode::SUCCESS)
        }
        Command::Remove { workflow, force } => {
            let (engine, _) = open(&global).await?;
            engine.remove(&workflow, force).await?;
            out!("workflow {workflow} removed: it no longer fires or starts; its runs stay");
            Ok(ExitCode::SUCCESS)
        }
        Command::Workflows { json } => {
            let (engine, _) = open(&global).await?;
            let overviews = engine.overviews(NEXT_FIRES_SHOWN).await?;
            if json {
                let infos: Vec<types::WorkflowInfo> = overviews.iter().map(Into::into).collect();
                out!("{}", serde_json::to_string_pretty(&infos)?);
            } else {
                let mut table =
                    display::table(&["WORKFLOW", "VERSION", "SCHEDULE", "NEXT FIRES", "STATE"]);
                for o in overviews {
                    let schedule = o
                        .workflow
                        .schedule
                        .as_ref()
                        .map_or("-".to_owned(), |s| format!("{} ({})", s.cron, s.timezone));
                    let fires: Vec<String> = o.next_fires.iter().map(|at| time(*at)).collect();
                    let state = if o.state.paused { "paused" } else { "active" };
                    table.add_row([
                        o.state.id,
                        o.state.latest_version.to_string(),
                        schedule,
                        if fires.is_empty() {
                            "-".to_owned()
                        } else {
                            fires.join("\n")
                        },
                        state.to_owned(),
                    ]);
                }
                out!("{}", table.trim_fmt());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Fires {
            workflow,
            limit,
            json,
        } => {
            let (engine, _) = open(&global).await?;
            let fires = engine.fires(workflow.as_deref(), limit).await?;
            if json {
                let fires: Vec<types::FireRecord> = fires.into_iter().map(Into::into).collect();
                out!("{}", serde_json::to_string_pretty(&fires)?);
            } else {
                let mut table = display::table(&["WORKFLOW", "FIRE TIME", "OUTCOME"]);
                for f in fires {
                    let outcome = match (&f.run_id, &f.skipped_reason) {
                        (Some(run), _) => format!("run {run}"),
                        (None, Some(reason)) => format!("skipped: {reason}"),
                        (None, None) => "recorded".to_owned(),
                    };
                    table.add_row([f.workflow_id, time(f.fire_at), outcome]);
                }
                out!("{}", table.trim_fmt());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Hooks { json } => {
            let (engine, _) = open(&global).await?;
            let hooks = engine.hooks_by_path().await?;
            if json {
                let listed: Vec<serde_json::Value> = hooks
                    .iter()
                    .map(|(path, hook)| {
                        serde_json::json!({
                            "path": path,
                            "url_path": format!("/api/hooks/{path}"),
                            "workflow": hook.workflow.id,
                            "trigger": hook.trigger,
                        })
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&listed)?);
            } else {
                let mut table = display::table(&["PATH", "WORKFLOW", "AUTH", "SECRET", "RESPOND"]);
                for (path, hook) in hooks {
                    let trigger = &hook.trigger;
                    let respond = match trigger.respond {
                        Respond::Accepted => "accepted".to_owned(),
                        Respond::Wait(limit) => {
                            format!("wait {}", humantime::format_duration(limit.0))
                        }
                    };
                    table.add_row([
                        format!("/api/hooks/{path}"),
                        hook.workflow.id.clone(),
                        <&str>::from(trigger.auth).to_owned(),
                        trigger.secret.clone().unwrap_or_default(),
                        respond,
                    ]);
                }
                out!("{}", table.trim_fmt());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Notifications {
            status,
            limit,
            json,
        } => {
            let (engine, _) = open(&global).await?;
            let found = engine.notifications(status, limit).await?;
            if json {
                let found: Vec<types::Notification> = found.into_iter().map(Into::into).collect();
                out!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                let mut table = display::table(&[
                    "RUN",
                    "WORKFLOW",
                    "ENDED",
                    "URL",
                    "STATUS",
                    "ATTEMPTS",
                    "NEXT / DONE",
                    "LAST ERROR",
                ]);
                for n in found {
                    let when = match n.delivered_at {
                        Some(at) => time(at),
                        None if n.status == NotificationStatus::Pending => time(n.next_at),
                        None => String::new(),
                    };
                    table.add_row([
                        n.run_id,
                        n.workflow_id,
                        n.run_status.to_string(),
                        n.url,
                        n.status.to_string(),
                        n.attempts.to_string(),
                        when,
                        n.last_error.unwrap_or_default(),
                    ]);
                }
                out!("{}", table.trim_fmt());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Connects, migrates, loads the master keys and encrypts any value stored before encryption:
/// every command that opens the database leaves none in plaintext.
async fn open(global: &Global) -> anyhow::Result<(Arc<Engine>, MasterKeys)> {
    let options = store::ConnectOptions {
        max_connections: global.db_connections,
    };
    // A relative SQLite path names a file in the current folder: from another folder, a command
    // would open a new, empty database and find nothing there.
    let new_file = store::sqlite_file(&global.database)
        .filter(|file| !file.exists())
        .map(|file| std::path::absolute(&file).unwrap_or(file));
    let engine = Arc::new(
        Engine::open(&global.database, &options, Arc::new(SystemClock))
            .await
            .with_context(|| format!("opening {}", store::redact_url(&global.database)))?,
    );
    let master = MasterKeys::load(
        std::env::var(keys::KEY_ENV).ok().as_deref(),
        global.master_key_file.as_deref(),
        keys::default_key_file(&global.database).as_deref(),
    )
    .context("loading the master key")?;
    let sealed = keys::reseal(&engine, &master, false, "system")
        .await
        .context("encrypting the secrets stored before encryption")?;
    if sealed > 0 {
        tracing::info!(
            rows = sealed,
            "secrets stored in plaintext are now encrypted"
        );
    }
    switchyard_engine::settings::use_master_keys(&engine, master.clone());
    if let Some(file) = new_file {
        tracing::warn!(
            path = %file.display(),
            "created a new, empty database (--database or SWITCHYARD_DATABASE_URL names another)"
        );
    }
    Ok((engine, master))
}

async fn token_keys(engine: &Engine, master: &MasterKeys) -> anyhow::Result<TokenKeys> {
    TokenKeys::load(
        engine,
        master,
        std::env::var("SWITCHYARD_JWT_SECRET").ok().as_deref(),
    )
    .await
    .context("loading the token signing keys")
}

/// `import-n8n`: the definition to `output` (or stdout), the report to stderr; checked as
/// `validate` would, so what it writes loads.
fn import_n8n(
    file: &std::path::Path,
    output: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let imported = switchyard_engine::n8n_import::import(&text)
        .with_context(|| format!("{}", file.display()))?;
    let origin = output.map_or_else(
        || format!("{}.yaml", imported.id),
        |o| o.display().to_string(),
    );
    // The workflows it starts come in their own imports.
    let mut children = WorkflowMap::new();
    for child in &imported.children {
        let stub = format!("id: {child}\nsteps: [{{id: a, type: noop}}]\n");
        let parsed = switchyard_engine::definition::parse_str(
            "child",
            &stub,
            switchyard_engine::definition::Format::Yaml,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        for workflow in parsed {
            children.insert(child.clone(), Arc::new(workflow));
        }
    }
    switchyard_engine::definition::check_str(
        &origin,
        &imported.yaml,
        switchyard_engine::definition::Format::Yaml,
        &children,
        &step_kinds()?,
    )
    .map_err(|errors| {
        anyhow::anyhow!("the imported definition does not load (please report it):\n{errors}")
    })?;
    let mut table = display::table(&["NODE", "BECAME", "DETAIL"]);
    for note in &imported.report {
        table.add_row([
            note.node.clone(),
            note.outcome.as_str().to_owned(),
            note.detail.clone(),
        ]);
    }
    eprintln!("{}", table.trim_fmt());
    match output {
        Some(path) => {
            std::fs::write(path, &imported.yaml)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote workflow {} to {}", imported.id, path.display());
        }
        None => out!("{}", imported.yaml.trim_end()),
    }
    Ok(ExitCode::SUCCESS)
}

/// The built-in step kinds with what each takes in `with`.
fn step_kinds() -> anyhow::Result<switchyard_engine::definition::StepKinds> {
    Registry::builtin()
        .step_kinds()
        .map_err(|e| anyhow::anyhow!(e))
}

fn load_definitions(paths: &[std::path::PathBuf]) -> anyhow::Result<WorkflowMap> {
    load_paths(paths, &step_kinds()?).map_err(|errors| anyhow::anyhow!("{errors}"))
}

fn validate(global: &Global, paths: Vec<std::path::PathBuf>) -> anyhow::Result<ExitCode> {
    let paths = if paths.is_empty() {
        global.definitions.clone()
    } else {
        paths
    };
    match load_paths(&paths, &step_kinds()?) {
        Ok(workflows) => {
            out!("ok: {} workflows", workflows.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} errors", errors.0.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A new user's password: `SWITCHYARD_PASSWORD` when set (scripts), else the first line of
/// standard input, so it never appears in the process list or shell history.
fn read_password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("SWITCHYARD_PASSWORD") {
        return Ok(password);
    }
    eprintln!("password (one line on standard input):");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// Secrets and variables for templates, from `SWITCHYARD_SECRET_<NAME>` and `SWITCHYARD_VAR_<NAME>`
/// (the name lower-cased).
fn env_values(prefix: &str) -> BTreeMap<String, String> {
    std::env::vars()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_ascii_lowercase(), v)))
        .collect()
}

/// Definitions stored through the API before the step kinds said what they take in `with` are
/// not checked again when they load from the database: name each problem now, since its step
/// will fail when it runs.
async fn warn_of_stored_definitions_the_kinds_refuse(engine: &Engine) -> anyhow::Result<()> {
    let kinds = step_kinds()?;
    for overview in engine.overviews(0).await? {
        let workflow = &overview.workflow;
        for step in workflow.steps.iter().chain(&workflow.on_failure) {
            for problem in kinds.check(&step.kind, &step.with) {
                tracing::warn!(
                    workflow = %workflow.id,
                    version = overview.state.latest_version,
                    step = %step.id,
                    "{}; the step will fail when it runs, until a new version fixes it",
                    problem.message
                );
            }
        }
    }
    Ok(())
}

/// What a long-running process serves over HTTP.
enum Http {
    /// `serve`: the admin API, `/health` and `/metrics`; and the scheduler runs here.
    Api(SocketAddr, ApiArgs),
    /// `worker --listen`: `/health` and `/metrics` only.
    Metrics(SocketAddr),
}

async fn serve(global: &Global, http: Option<Http>, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    // A step's process (a `script`) runs as this user: it must not read this process's memory
    // or environment (`/proc/<pid>/environ`: the master key, the secrets) as its owner could.
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(error = %e, "this process stays readable by other processes of its user");
    }
    let control_plane = matches!(http, Some(Http::Api(..)));
    // A control plane with a broken definition refuses to start: better than running half of them.
    let definitions = if control_plane {
        Some(load_definitions(&global.definitions)?)
    } else {
        None
    };
    let (engine, master) = open(global).await?;
    engine
        .keep_artifacts_in(
            &args.artifacts,
            args.artifact_max_mib.saturating_mul(1024 * 1024),
        )
        .context("opening the artifact store")?;
    // Quota buckets and the API's rate limits, shared through Redis by every process using it.
    let redis: Option<Arc<dyn QuotaBuckets>> = match &args.redis {
        Some(url) => Some(Arc::new(RedisBuckets::connect(url).await.with_context(
            || format!("connecting to Redis at {}", store::redact_url(url)),
        )?)),
        None => None,
    };
    if let Some(buckets) = &redis {
        engine.set_quotas(buckets.clone());
    }
    if let Some(definitions) = &definitions {
        for (id, version) in engine
            .install(definitions, DefinitionOrigin::Files, None)
            .await?
        {
            tracing::info!(workflow = %id, version, "definition loaded");
        }
        for id in engine.schedules_without_files(definitions).await? {
            tracing::warn!(workflow = %id, "no definition file provides this scheduled workflow, \
                yet it fires from the database; `switchyard remove {id}` stops it");
        }
        warn_of_stored_definitions_the_kinds_refuse(&engine).await?;
        if args.workers > 0 && args.n8n_url.is_none() {
            for (id, workflow) in definitions.iter() {
                let in_n8n = workflow
                    .steps
                    .iter()
                    .any(|s| s.kind == "n8n" && s.with.get("webhook").is_some());
                if in_n8n {
                    tracing::warn!(workflow = %id, "this workflow runs in n8n, and without \
                        --n8n-url (SWITCHYARD_N8N_URL) its runs fail at their n8n step");
                }
            }
        }
    }
    let (stop, stopped) = watch::channel(false);
    let heartbeats = Arc::new(Heartbeats::default());
    let mut tasks = JoinSet::new();
    tasks.spawn(run_maintenance(engine.clone(), stopped.clone()));
    tasks.spawn(watch_database(engine.clone(), stopped.clone()));
    let metrics = match &http {
        Some(_) => {
            let handle = install_metrics(&mut tasks, stopped.clone())?;
            // Counters at zero before the first scrape, so alert rules see a series for every
            // workflow from the start.
            for workflow in engine.workflows().await? {
                switchyard_engine::metrics::workflow_known(&workflow.id);
            }
            Some(handle)
        }
        None => None,
    };
    if let Some(Http::Metrics(addr)) = http {
        let listener = bind(addr).await?;
        let app = observability_router(Observability {
            engine: engine.clone(),
            heartbeats: heartbeats.clone(),
            metrics,
        });
        spawn_http(&mut tasks, serve_http(listener, None, app, stopped.clone()));
    } else if let Some(Http::Api(addr, api)) = http {
        let tls = match (&api.tls_cert, &api.tls_key) {
            (Some(cert), Some(key)) => Some(
                tls_config(&TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                })
                .await?,
            ),
            _ => None,
        };
        let listener = bind(addr).await?;
        let keys = token_keys(&engine, &master).await?;
        let app = router(AppState {
            engine: engine.clone(),
            heartbeats: heartbeats.clone(),
            keys,
            step_kinds: Arc::new(step_kinds()?),
            limiter: {
                let limit = RateLimit {
                    per_second: api.api_rate,
                    burst: api.api_burst,
                    login: LoginLimit {
                        per_user: api.login_rate,
                        per_address: api.login_address_rate,
                    },
                };
                match &redis {
                    Some(buckets) => RateLimiter::shared(limit, buckets.clone()),
                    None => RateLimiter::new(limit),
                }
            },
            metrics,
            dashboard: Arc::new(Dashboard::start(
                engine.clone(),
                heartbeats.clone(),
                // Behind a proxy that ends TLS, the public address says the browser uses HTTPS.
                tls.is_some()
                    || args
                        .public_url
                        .as_deref()
                        .is_some_and(|u| u.to_ascii_lowercase().starts_with("https://")),
            )),
        });
        spawn_http(&mut tasks, serve_http(listener, tls, app, stopped.clone()));
        tasks.spawn(run_scheduler(engine.clone(), heartbeats, stopped.clone()));
    }
    if args.workers > 0 {
        let config = WorkerConfig {
            slots: args.workers,
            lease: args.lease,
            grace: args.grace,
            secrets: env_values("SWITCHYARD_SECRET_"),
            vars: serde_json::to_value(env_values("SWITCHYARD_VAR_"))?,
            ..WorkerConfig::default()
        };
        tracing::info!(slots = config.slots, "workers running");
        let egress = Arc::new(EgressPolicy {
            allow: args.egress_allow.clone(),
            deny: args.egress_deny.clone(),
        });
        let mut registry = Registry::builtin_with(
            N8nUrls {
                n8n: args.n8n_url.clone(),
                public: args.public_url.clone(),
            },
            egress.clone(),
            Arc::new(StoreNonces::new(engine.clone())),
        );
        if args.allow_scripts {
            registry = registry.allowing_scripts();
        }
        // Every process with workers sends notifications too: one more sender is one more
        // place they go out from, never a second delivery at once.
        let notifier = NotifierConfig {
            http: switchyard_workers::steps::Http::with_policy(egress),
            public_url: args.public_url.clone(),
            env_secret: config.secrets.get(NOTIFICATION_SECRET).cloned(),
        };
        tasks.spawn(run_notifier(engine.clone(), notifier, stopped.clone()));
        tasks.spawn(run_worker(engine.clone(), registry, config, stopped));
    } else if !control_plane {
        bail!("`worker --workers 0` would run nothing");
    }

    shutdown_signal().await;
    tracing::info!("shutting down: no new claims; finishing running steps");
    stop.send_replace(true);
    // Every task ends by itself once told; the grace period bounds the workers.
    tokio::time::timeout(args.grace + Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .ok();
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!(%addr, "HTTP listening");
    Ok(listener.into_std()?)
}

fn spawn_http(
    tasks: &mut JoinSet<()>,
    serving: impl Future<Output = std::io::Result<()>> + Send + 'static,
) {
    tasks.spawn(async move {
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
}

/// Installs the Prometheus recorder that `/metrics` renders, with a task that keeps its
/// histograms from growing without bound.
fn install_metrics(
    tasks: &mut JoinSet<()>,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            switchyard_engine::metrics::BUCKETS,
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    switchyard_engine::metrics::describe();
    let upkeep = handle.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
                changed = stopped.changed() => if changed.is_err() || *stopped.borrow() { return },
            }
        }
    });
    Ok(handle)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.ok();
}

async fn run(
    global: &Global,
    workflow: &str,
    input: Option<&str>,
    wait: bool,
    priority: Option<i32>,
) -> anyhow::Result<ExitCode> {
    let input: Value = match input {
        None => Value::Null,
        Some(text) => {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| anyhow::anyhow!("--input is not valid JSON: {e}"))?;
            if !value.is_object() {
                bail!("--input must be a JSON object, like '{{\"region\": \"us\"}}'");
            }
            value
        }
    };
    // Definitions on disk are installed first, so `run` uses what the files say now.
    let definitions = if global.definitions.iter().any(|p| p.exists()) {
        Some(load_definitions(&global.definitions)?)
    } else {
        None
    };
    let (engine, _) = open(global).await?;
    if let Some(definitions) = &definitions {
        engine
            .install(definitions, DefinitionOrigin::Files, None)
            .await?;
    }
    let trigger = Trigger {
        priority,
        ..Trigger::default()
    };
    let (run_id, _) = engine.start(workflow, input, trigger).await?;
    out!("{run_id}");
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "waiting for run {run_id} in {}",
        database_name(&global.database)
    );
    let started = std::time::Instant::now();
    let mut told_unclaimed = false;
    let mut view = WaitView::new();
    loop {
        let detail = engine.run(&run_id).await?;
        if !told_unclaimed
            && started.elapsed() >= UNCLAIMED_NOTICE
            && detail.summary.status == RunStatus::Running
            && detail.steps.iter().all(|s| s.started_at.is_none())
        {
            told_unclaimed = true;
            eprintln!(
                "no worker has taken this run in {} s: is `switchyard serve` or `switchyard \
                 worker` running on this database? The run waits in it until one does.",
                UNCLAIMED_NOTICE.as_secs()
            );
            view.below();
        }
        // Only the live block counts child runs: plain lines would read them for nothing.
        let children = match view {
            WaitView::Live { .. } => {
                engine
                    .child_runs(&run_id, display::CHILDREN_COUNTED)
                    .await?
            }
            WaitView::Lines { .. } => Vec::new(),
        };
        view.show(&detail, &children, engine.now());
        let status = detail.summary.status;
        if status.is_finished() {
            eprintln!("run {run_id} {status}");
            if let Some(error) = &detail.summary.error {
                eprintln!("  error: {error}");
            }
            if let Some(output) = &detail.output {
                eprintln!("  output: {output}");
            }
            return Ok(match status {
                RunStatus::Succeeded => ExitCode::SUCCESS,
                RunStatus::Cancelled => ExitCode::from(EXIT_CANCELLED),
                RunStatus::TimedOut => ExitCode::from(EXIT_TIMED_OUT),
                _ => ExitCode::FAILURE,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How `run --wait` shows a run's progress: at a terminal, one block redrawn in place (each step
/// with its state and time, loops' items and child runs counted); elsewhere, a line for each
/// change, which reads in a log.
enum WaitView {
    Live { drawn: usize },
    Lines { shown: BTreeMap<String, String> },
}

impl WaitView {
    fn new() -> Self {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            WaitView::Live { drawn: 0 }
        } else {
            WaitView::Lines {
                shown: BTreeMap::new(),
            }
        }
    }

    /// Something else was printed: the block goes on below it.
    fn below(&mut self) {
        if let WaitView::Live { drawn } = self {
            *drawn = 0;
        }
    }

    fn show(&mut self, detail: &RunDetail, children: &[store::RunSummary], now: Millis) {
        match self {
            WaitView::Live { drawn } => {
                let block = display::progress(detail, children, now);
                // Up to the block's first line, clear to the end, draw it again. A line wider
                // than the terminal would wrap and leave copies behind: each is cut to fit.
                if *drawn > 0 {
                    eprint!("\x1b[{drawn}F\x1b[J");
                }
                let width = terminal_width();
                for line in &block {
                    eprintln!("{}", display::fitted(line, width));
                }
                *drawn = block.len();
            }
            WaitView::Lines { shown } => {
                // A loop's items show as a count of those finished, not one line each.
                for (step, (finished, total)) in display::item_progress(detail) {
                    let progress = format!("items {finished}/{total} finished");
                    if shown.get(&format!("{step}[]")) != Some(&progress) {
                        eprintln!("  {step:<24} {progress}");
                        shown.insert(format!("{step}[]"), progress);
                    }
                }
                for step in detail.steps.iter().filter(|s| s.item_index.is_none()) {
                    let state = step.state.to_string();
                    if shown.get(&step.step_id) != Some(&state) {
                        let attempt = if step.attempt > 1 {
                            format!(" (attempt {})", step.attempt)
                        } else {
                            String::new()
                        };
                        let error = step
                            .error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default();
                        eprintln!("  {:<24} {state}{attempt}{error}", step.step_id);
                        shown.insert(step.step_id.clone(), state);
                    }
                }
            }
        }
    }
}

/// The width of the terminal on stderr, if it says.
fn terminal_width() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        rustix::termios::tcgetwinsize(std::io::stderr())
            .ok()
            .map(|size| usize::from(size.ws_col))
            .filter(|cols| *cols > 0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// How long `run --wait` watches a run no worker takes before it says so.
const UNCLAIMED_NOTICE: Duration = Duration::from_secs(5);

/// The database as typed (password hidden), and for a SQLite file its absolute path.
fn database_name(url: &str) -> String {
    let typed = store::redact_url(url);
    match store::sqlite_file(url).map(|file| std::path::absolute(&file).unwrap_or(file)) {
        Some(file) => format!("{typed} ({})", file.display()),
        None => typed,
    }
}

/// Most items `show` lists one by one (those that did not succeed), per `for_each` step.
const ITEMS_SHOWN: usize = 10;

fn print_run(detail: &RunDetail) {
    let r = &detail.summary;
    out!("run       {}", r.id);
    out!("workflow  {} v{}", r.workflow_id, r.version);
    out!("status    {}", r.status);
    out!("created   {}", time(r.created_at));
    out!(
        "duration  {}",
        duration(r.started_at.or(Some(r.created_at)), r.finished_at)
    );
    if let Some(parent) = &r.parent_run_id {
        out!("parent    {parent}");
    }
    if let Some(error) = &r.error {
        out!("error     {error}");
    }
    out!("input     {}", detail.input);
    if let Some(output) = &detail.output {
        out!("output    {output}");
    }
    out!("steps");
    for s in detail.steps.iter().filter(|s| s.item_index.is_none()) {
        out!(
            "  {:<24} {:<10} attempt {:<2} {}",
            s.step_id,
            s.state.as_str(),
            s.attempt,
            duration(s.started_at, s.finished_at)
        );
        if let Some(attempts) = s.attempts.as_array() {
            for a in attempts.iter().filter(|a| a["outcome"] != "succeeded") {
                out!(
                    "      attempt {} {}: {}",
                    a["attempt"],
                    a["outcome"].as_str().unwrap_or("?"),
                    a["error"].as_str().unwrap_or("")
                );
            }
        }
        // A skipped step's reason is kept where an error would be.
        let label = match s.state {
            JobState::Skipped => "why",
            _ => "error",
        };
        if let Some(error) = &s.error {
            out!("      {label}: {error}");
        }
        if let Some(output) = s.output.as_ref().filter(|o| !o.is_null()) {
            out!("      output: {}", shortened(&output.to_string()));
        }
        print_items(detail, &s.step_id);
    }
}

/// Prints a run's log lines, `HH:MM:SS step#attempt stream | text`; with `follow`, goes on
/// until the run has ended and its last lines are printed.
async fn print_logs(
    engine: &Engine,
    run: &str,
    step: Option<&str>,
    follow: bool,
) -> anyhow::Result<()> {
    let mut after = None;
    loop {
        // Read before the status: lines stored before the run ended are then all printed.
        let finished = engine.run_summary(run).await?.status.is_finished();
        loop {
            let lines = engine.step_logs(run, after, 1000).await?;
            let Some(last) = lines.last() else { break };
            after = Some(last.id);
            for line in lines.iter().filter(|l| {
                step.is_none_or(|s| l.step_id == s || display::loop_step(&l.step_id) == s)
            }) {
                // What a script printed may hold terminal control sequences: shown, not obeyed.
                let text: String = line
                    .text
                    .chars()
                    .map(|c| {
                        if c.is_control() && c != '\t' {
                            '\u{fffd}'
                        } else {
                            c
                        }
                    })
                    .collect();
                out!(
                    "{} {}#{} {} | {text}",
                    display::clock(line.at),
                    line.step_id,
                    line.attempt,
                    line.stream,
                );
            }
        }
        if !follow || finished {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Most child runs `show` lists.
const CHILDREN_SHOWN: u32 = 20;

/// The runs this run's `workflow` steps started (`children` holds one more than are shown when
/// there are more).
fn print_children(children: &[store::RunSummary]) {
    if children.is_empty() {
        return;
    }
    out!("child runs");
    let mut table = display::table(&["RUN", "WORKFLOW", "STATUS", "DURATION"]);
    for child in children.iter().take(CHILDREN_SHOWN as usize) {
        table.add_row([
            child.id.clone(),
            child.workflow_id.clone(),
            child.status.to_string(),
            duration(child.started_at, child.finished_at),
        ]);
    }
    for line in table.trim_fmt().lines() {
        out!("  {line}");
    }
    if children.len() > CHILDREN_SHOWN as usize {
        out!("  ... and more");
    }
}

/// Longest step output `show` prints on its line; `--json` has them whole.
const OUTPUT_SHOWN: usize = 200;

fn shortened(text: &str) -> String {
    match text.char_indices().nth(OUTPUT_SHOWN) {
        Some((at, _)) => format!(
            "{}... ({} bytes; `show RUN --json` has it whole)",
            &text[..at],
            text.len()
        ),
        None => text.to_owned(),
    }
}

/// A `for_each` step's items: a count by state, then those that did not succeed.
fn print_items(detail: &RunDetail, step: &str) {
    let items: Vec<&store::JobDetail> = detail
        .steps
        .iter()
        .filter(|s| s.item_index.is_some() && display::loop_step(&s.step_id) == step)
        .collect();
    if items.is_empty() {
        return;
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for item in &items {
        *counts.entry(item.state.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    out!("      items {}: {}", items.len(), counts.join(", "));
    let unsuccessful: Vec<&&store::JobDetail> = items
        .iter()
        .filter(|i| i.state != JobState::Succeeded)
        .collect();
    for item in unsuccessful.iter().take(ITEMS_SHOWN) {
        out!(
            "      {:<22} {:<10} attempt {:<2} {}",
            item.step_id,
            item.state.as_str(),
            item.attempt,
            item.error.as_deref().unwrap_or("")
        );
    }
    if unsuccessful.len() > ITEMS_SHOWN {
        out!(
            "      ... and {} more (`show RUN --json` lists every item)",
            unsuccessful.len() - ITEMS_SHOWN
        );
    }
}
