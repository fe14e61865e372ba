//! `script`: a few lines of code run as a step, as n8n's Code node or Windmill's scripts do.
//! `with: { run: python3, code: "...", input, env }` writes `code` to a file in a scratch folder
//! of its own and runs `run <file>` there, with `input` as JSON on standard input. The output is
//! the last line of standard output that parses as JSON (`null` when none does); an exit status
//! other than 0 fails the attempt (retryably) with the end of standard error.
//!
//! The script gets a clean environment: `PATH` (the worker's, to find its interpreter), `HOME`
//! (its scratch folder), `LANG`, and the variables `env` names, whose values may be secrets.
//! It runs in a process group of its own, killed whole when the step times out, is cancelled,
//! or its worker stops waiting: nothing it started outlives the attempt. `code` and `run` are
//! the definition's own text, taken as written and never rendered: a run's input never becomes
//! code, and `{{` or `${#list[@]}` in code are the code's own.

use std::collections::BTreeMap;
use std::process::Stdio;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use switchyard_engine::definition::TEMPLATE_PATTERN;
use switchyard_engine::state::StepFailure;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{StepCall, StepKind, StepLog, StepOutcome, StepResult, parse_with, with_schema};

/// Most of standard output kept to find the output in; a script that prints more fails.
const MAX_STDOUT: usize = 1024 * 1024;
/// The end of standard error kept for the log; a failure's message quotes its last
/// [`ERROR_TAIL`] bytes.
const STDERR_TAIL: usize = 64 * 1024;
const ERROR_TAIL: usize = 2048;

/// Runs scripts only where the operator allowed it (`--allow-scripts`): a script runs with the
/// worker's own rights, so whoever may install a definition may then do what the worker's user
/// can.
pub struct Script {
    allowed: bool,
}

impl Script {
    pub fn allowed() -> Self {
        Script { allowed: true }
    }

    /// Knows what a `script` step takes (definitions load) but runs none.
    pub fn refused() -> Self {
        Script { allowed: false }
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [{ "required": ["code"] }, { "required": ["file"] }]))]
struct ScriptWith {
    /// The program that runs the code, found on the worker's PATH, with any arguments before
    /// the code's file: `python3`, `node`, `bash`, `deno run`. Taken as written.
    run: String,
    /// The code, taken as written: `{{` and `{#` in it are the code's own, not templates.
    code: Option<String>,
    /// Instead of `code`: a file beside the definition file (in its folder), whose text becomes
    /// `code` when the definition loads.
    #[schemars(extend("x-file-for" = "code"))]
    file: Option<String>,
    /// Sent as JSON on standard input (default `null`).
    #[schemars(with = "Option<serde_json::Value>")]
    input: Option<Value>,
    /// Environment variables the script gets besides PATH, HOME and LANG; values may
    /// reference secrets. Written out as a map (its names are never a template's).
    #[schemars(extend("not" = { "type": "string", "pattern": TEMPLATE_PATTERN }))]
    env: Option<BTreeMap<String, String>>,
}

fn invalid(message: impl Into<String>) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

/// Kills a script's whole process group when dropped: on success it has ended already; on a
/// timeout or cancel the attempt's future is dropped mid-run, and this is what stops it.
#[cfg(unix)]
struct ProcessGroup(Option<rustix::process::Pid>);

#[cfg(unix)]
impl ProcessGroup {
    fn kill(&mut self) {
        if let Some(group) = self.0.take() {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

#[cfg(unix)]
impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A task that ends when its handle is dropped: an attempt dropped mid-run leaves no reader or
/// writer of the script's pipes behind.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Option<T> {
        (&mut self.0).await.ok()
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long the output may take to end once the script has exited and its group is killed.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Which end of a stream a limit cut.
enum Cut {
    Start,
    End,
}

/// `bytes` as text with every value this attempt sent that carries a secret replaced, and,
/// where a limit cut the stream (`cut`), without the line it halved.
fn redacted(call: &StepCall, bytes: &[u8], cut: bool, at: Cut) -> String {
    let mut text = Value::String(String::from_utf8_lossy(bytes).into_owned());
    call.secrets.redact_sent(&mut text);
    let text = text.as_str().unwrap_or_default();
    match (cut, at) {
        (false, _) => text.to_owned(),
        (true, Cut::Start) => text
            .split_once('\n')
            .map_or("", |(_, rest)| rest)
            .to_owned(),
        (true, Cut::End) => text
            .rsplit_once('\n')
            .map_or("", |(kept, _)| kept)
            .to_owned(),
    }
}

/// The longest line the log keeps whole; the rest of a longer one is dropped.
const MAX_LINE: usize = 64 * 1024;

/// Reads `stream` to its end: each line goes to the step's log under `name` as it comes (so a
/// script that times out leaves what it printed), and at most `limit` bytes are kept, the first
/// ones, or with `tail` the last ones. Returns them and whether more came.
async fn read_bounded(
    mut stream: impl AsyncRead + Unpin,
    limit: usize,
    tail: bool,
    log: StepLog,
    name: &'static str,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    let mut more = false;
    let mut line: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            if !line.is_empty() {
                log.line(name, String::from_utf8_lossy(&line));
            }
            return Ok((kept, more));
        }
        for piece in chunk[..n].split_inclusive(|b| *b == b'\n') {
            let ends = piece.ends_with(b"\n");
            let text = if ends {
                &piece[..piece.len() - 1]
            } else {
                piece
            };
            let room = MAX_LINE.saturating_sub(line.len());
            line.extend_from_slice(&text[..text.len().min(room)]);
            if ends {
                log.line(name, String::from_utf8_lossy(&line));
                line.clear();
            }
        }
        kept.extend_from_slice(&chunk[..n]);
        if kept.len() > limit {
            more = true;
            if tail {
                kept.drain(..kept.len() - limit);
            } else {
                kept.truncate(limit);
            }
        }
    }
}

/// Whether a script may be given a variable named `name`: not one that makes its interpreter
/// or the dynamic loader run something else.
fn allowed_variable(name: &str) -> bool {
    let well_formed = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let upper = name.to_ascii_uppercase();
    let changes_what_runs = [
        "PATH",
        "HOME",
        "BASH_ENV",
        "ENV",
        "NODE_OPTIONS",
        "RUBYOPT",
        "IFS",
    ]
    .contains(&upper.as_str())
        || ["LD_", "PYTHON", "PERL5", "DYLD_"]
            .iter()
            .any(|prefix| upper.starts_with(prefix));
    well_formed && !changes_what_runs
}

/// The last line of `stdout` that parses as JSON.
fn last_json_line(stdout: &str) -> Option<Value> {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .find_map(|line| serde_json::from_str(line).ok())
}

#[async_trait]
impl StepKind for Script {
    fn name(&self) -> &'static str {
        "script"
    }

    fn secret_fields(&self) -> &'static [&'static str] {
        &["env"]
    }

    fn literal_fields(&self) -> &'static [&'static str] {
        &["run", "code"]
    }

    fn with_schema(&self) -> Value {
        with_schema::<ScriptWith>()
    }

    async fn run(&self, call: StepCall) -> StepResult {
        if !self.allowed {
            return Err(invalid(
                "this worker runs no `script` steps: start it with --allow-scripts \
                 (SWITCHYARD_ALLOW_SCRIPTS=true) where scripts may run with the worker's own rights",
            ));
        }
        let with: ScriptWith = parse_with("script", &call.with)?;
        let Some(code) = with.code else {
            return Err(invalid(match with.file {
                Some(file) => format!(
                    "script step: `with.file` {file:?} was not read: only a definition loaded \
                     from a file may name one"
                ),
                None => "script step needs `with.code`".to_owned(),
            }));
        };
        if call.reads_run_data("code") || call.reads_run_data("run") {
            return Err(invalid(
                "script step: `code` and `run` are written out in the definition; pass data in \
                 `input`",
            ));
        }
        let mut words = with.run.split_whitespace();
        let program = words
            .next()
            .ok_or_else(|| invalid("script step: `with.run` names no program"))?;
        let scratch = tempfile::Builder::new()
            .prefix("switchyard-script-")
            .tempdir()
            .map_err(|e| StepFailure::transient("script", format!("no scratch folder: {e}")))?;
        let file = scratch.path().join("step");
        tokio::fs::write(&file, &code)
            .await
            .map_err(|e| StepFailure::transient("script", format!("cannot write the code: {e}")))?;

        let mut command = tokio::process::Command::new(program);
        command
            .args(words)
            .arg(&file)
            .current_dir(scratch.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", scratch.path())
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        command.process_group(0);
        for (name, value) in with.env.iter().flatten() {
            if !allowed_variable(name) {
                return Err(invalid(format!(
                    "script step: `with.env.{name}` is not a variable a script may be given \
                     (names are letters, digits and `_`; not PATH, HOME, LD_*, BASH_ENV, ENV, \
                     NODE_OPTIONS, PYTHON*, PERL5*, RUBYOPT: those change what runs)"
                )));
            }
            let value = call
                .secrets
                .reveal(value)
                .map_err(|e| invalid(format!("script step: `with.env.{name}`: {e}")))?;
            command.env(name, value);
        }
        let mut child = command.spawn().map_err(|e| {
            invalid(format!(
                "script step: cannot run `{program}` (is it installed on the worker's PATH?): {e}"
            ))
        })?;
        #[cfg(unix)]
        let mut group = ProcessGroup(
            child
                .id()
                .and_then(|id| rustix::process::Pid::from_raw(id as i32)),
        );

        let input = serde_json::to_vec(&with.input.unwrap_or(Value::Null))
            .expect("a JSON value serializes");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        // A script that does not read its input must not block on a full pipe, nor fail us.
        let feed = AbortOnDrop(tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
        }));
        let out = AbortOnDrop(tokio::spawn(read_bounded(
            stdout,
            MAX_STDOUT,
            false,
            call.log.clone(),
            "stdout",
        )));
        let err = AbortOnDrop(tokio::spawn(read_bounded(
            stderr,
            STDERR_TAIL,
            true,
            call.log.clone(),
            "stderr",
        )));
        let io = |e: std::io::Error| StepFailure::transient("script", e.to_string());
        let status = child.wait().await.map_err(io)?;
        // What the script left running would keep its pipes open and the step waiting: it ends
        // with the script.
        #[cfg(unix)]
        group.kill();
        drop(feed);
        let drained = |task: AbortOnDrop<std::io::Result<(Vec<u8>, bool)>>| async move {
            match tokio::time::timeout(DRAIN, task.join()).await {
                Ok(Some(read)) => read.map_err(io),
                _ => Err(StepFailure::transient(
                    "script",
                    "the script's output did not end after it exited (something it started \
                     left its own process group)",
                )),
            }
        };
        let (out, too_much) = drained(out).await?;
        let (err, cut) = drained(err).await?;
        // Secrets go before anything is split or cut: a secret over several lines, or one a
        // cut would halve, is still found whole.
        let stdout = redacted(&call, &out, too_much, Cut::End);
        let stderr = redacted(&call, &err, cut, Cut::Start);
        if !status.success() {
            let how = match status.code() {
                Some(code) => format!("exited with status {code}"),
                None => "was killed by a signal".to_owned(),
            };
            let trimmed = stderr.trim();
            let mut at = trimmed.len().saturating_sub(ERROR_TAIL);
            while !trimmed.is_char_boundary(at) {
                at += 1;
            }
            // Whole lines only: a cut line could hold part of a secret.
            let tail = match at {
                0 => trimmed,
                _ => trimmed[at..].split_once('\n').map_or("", |(_, rest)| rest),
            };
            return Err(StepFailure::transient(
                "script",
                if tail.is_empty() {
                    format!("`{}` {how}", with.run)
                } else {
                    format!("`{}` {how}: {tail}", with.run)
                },
            ));
        }
        if too_much {
            return Err(invalid(format!(
                "script step: the script printed over {MAX_STDOUT} bytes; print the output as \
                 one JSON line"
            )));
        }
        let output = last_json_line(&stdout).unwrap_or(Value::Null);
        Ok(StepOutcome::Output(output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_is_the_last_line_that_parses_as_json() {
        assert_eq!(
            last_json_line("working...\n{\"a\": 1}\ndone\n"),
            Some(serde_json::json!({"a": 1}))
        );
        assert_eq!(last_json_line("1\n[2]\n  \n"), Some(serde_json::json!([2])));
        assert_eq!(last_json_line("no json here\n"), None);
    }
}
