//! Support for the test suites of every crate of the workspace (not for production code): where
//! the PostgreSQL tests find their server, and how a test says that it could not run what it is
//! for, so that a skip never reads as a pass.

/// The database the PostgreSQL tests use, each in a schema of its own:
/// `SWITCHYARD_TEST_POSTGRES`, or the local server.
pub fn postgres_url() -> String {
    std::env::var("SWITCHYARD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Says that a test did not run what it is for, and why: on stderr, and in the file named by
/// `SWITCHYARD_SKIPPED` (CI lists it in its closing summary). Panics instead when `required`
/// names an environment variable that is set: there, as in CI, the test must run.
pub fn skipped(required: &str, reason: &str) {
    assert!(
        std::env::var_os(required).is_none(),
        "{required} is set, and this test cannot run: {reason}"
    );
    eprintln!("skipped: {reason}");
    if let Some(path) = std::env::var_os("SWITCHYARD_SKIPPED") {
        use std::io::Write as _;
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{test}: {reason}");
        }
    }
}

/// [`skipped`] for a PostgreSQL test without a server; required where
/// `SWITCHYARD_REQUIRE_POSTGRES` is set.
pub fn postgres_unreachable(error: impl std::fmt::Display) {
    skipped(
        "SWITCHYARD_REQUIRE_POSTGRES",
        &format!(
            "PostgreSQL at {} is not reachable ({error})",
            postgres_url()
        ),
    );
}

/// moto's S3 server (PyPI `moto[server]`), a real S3 wire peer, on a free port of 127.0.0.1
/// with an empty bucket `artifacts`; stopped when dropped.
pub struct S3Server {
    child: std::process::Child,
    /// Its base URL, for `AWS_ENDPOINT`.
    pub endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// The variables that point `object_store` (and `switchyard --artifacts s3://...`) here.
    pub fn env(&self) -> [(&'static str, String); 5] {
        [
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

/// Starts moto's S3 server from `SWITCHYARD_MOTO` (or `moto_server` on the `PATH`); `None`, with
/// the test marked skipped, where there is none (required where `SWITCHYARD_REQUIRE_MOTO` is set).
pub fn s3_server() -> Option<S3Server> {
    use std::io::{Read as _, Write as _};
    let program = std::env::var("SWITCHYARD_MOTO").unwrap_or_else(|_| "moto_server".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let child = match std::process::Command::new(&program)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            skipped(
                "SWITCHYARD_REQUIRE_MOTO",
                &format!(
                    "no S3 server to test against ({program}: {e}): `pip install 'moto[server]'` \
                     and set SWITCHYARD_MOTO (.ci/run does)"
                ),
            );
            return None;
        }
    };
    let server = S3Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    // Creates the bucket once the server answers: S3's `PUT /bucket`, which moto takes unsigned.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let request = format!(
                "PUT /artifacts HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            );
            let mut answer = String::new();
            if stream.write_all(request.as_bytes()).is_ok()
                && stream.read_to_string(&mut answer).is_ok()
                && answer.starts_with("HTTP/1.1 200")
            {
                return Some(server);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "moto's S3 server did not start on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A local Ethereum node for the `chain` step's tests: anvil (`.ci/run` installs it from npm and
/// names its binary in `SWITCHYARD_ANVIL`), on a free port of the loopback, ended when dropped.
/// Its chain id is 31337 and its dev accounts ([`ANVIL_KEYS`]) hold 10,000 ether each.
pub struct Anvil {
    child: std::process::Child,
    pub url: String,
}

/// The private keys of anvil's first dev accounts (its default mnemonic), as anvil prints them.
pub const ANVIL_KEYS: [&str; 4] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
];

impl Anvil {
    /// Starts anvil with `args` added (`--no-mining`, ...). Without `SWITCHYARD_ANVIL`, says the
    /// test is skipped (a failure where `SWITCHYARD_REQUIRE_ANVIL` is set) and returns `None`.
    pub fn start(args: &[&str]) -> Option<Anvil> {
        let Some(binary) = std::env::var_os("SWITCHYARD_ANVIL") else {
            skipped(
                "SWITCHYARD_REQUIRE_ANVIL",
                "no anvil to run against: set SWITCHYARD_ANVIL to its binary (.ci/run installs \
                 it from tests/anvil/package.json)",
            );
            return None;
        };
        // A port another process takes between this probe and anvil's start fails the start,
        // which is tried again on another.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut child = std::process::Command::new(&binary)
                .args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--silent",
                ])
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting anvil ({}): {e}", binary.display()));
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_secs(20) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Anvil {
                        child,
                        url: format!("http://127.0.0.1:{port}"),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("anvil did not start on any of 5 ports");
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis server of the test's own (Debian's `redis-server`) on a free port of the loopback,
/// keeping nothing on disk, killed when dropped: for tests that freeze it, which the shared
/// server must never be.
pub struct OwnRedis {
    child: std::process::Child,
    pub url: String,
}

impl OwnRedis {
    /// Without `redis-server`, says the test is skipped (a failure where
    /// `SWITCHYARD_REQUIRE_REDIS` is set) and returns `None`.
    pub fn start() -> Option<OwnRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                skipped(
                    "SWITCHYARD_REQUIRE_REDIS",
                    &format!("redis-server cannot be started ({e})"),
                );
                return None;
            }
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(OwnRedis {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
        })
    }

    /// Stops the server (SIGSTOP) with its connections open: it answers nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill {signal} failed");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
