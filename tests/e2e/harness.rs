//! The end-to-end harness: starts a real `sluice up` process against the local stack (broker,
//! ClickHouse, PostgreSQL, all started by `deploy/local/up`) with its own topic prefix, ports
//! and tenants, so tests run in parallel without seeing each other.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    ClientConfig, Message,
};
use serde_json::Value;

/// Settings of the local stack, from the environment `deploy/local/test` exports.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn bootstrap() -> String {
    env_or("SLUICE_KAFKA__BOOTSTRAP", "127.0.0.1:9092")
}

pub fn clickhouse_url() -> String {
    env_or("SLUICE_CLICKHOUSE__URL", "http://127.0.0.1:8123")
}

pub fn app_database_url() -> String {
    env_or(
        "SLUICE_POSTGRES__URL",
        "postgres://sluice_app@127.0.0.1:5432/sluice",
    )
}

pub fn admin_database_url() -> String {
    env_or(
        "SLUICE_POSTGRES__ADMIN_URL",
        "postgres://sluice@127.0.0.1:5432/sluice",
    )
}

/// The `sluice` binary cargo built for these tests.
pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A `sluice` command with the stack's settings and this test's prefix.
pub fn sluice(prefix: &str) -> Command {
    let mut command = Command::new(sluice_bin());
    command
        .env("SLUICE_KAFKA__BOOTSTRAP", bootstrap())
        .env("SLUICE_KAFKA__TOPIC_PREFIX", prefix)
        .env("SLUICE_KAFKA__PARTITIONS", "3")
        .env("SLUICE_CLICKHOUSE__URL", clickhouse_url())
        .env("SLUICE_POSTGRES__URL", app_database_url())
        .env("SLUICE_POSTGRES__ADMIN_URL", admin_database_url())
        .env("SLUICE_LOG__FORMAT", "json")
        .env("SLUICE_ORCHESTRATOR__SIM__FIRST_TOKEN_MS", "5")
        .env("SLUICE_ORCHESTRATOR__SIM__TOKENS_PER_SECOND", "2000.0")
        // Every test logs in from 127.0.0.1 and shares one Redis.
        .env("SLUICE_EDGE__LIMITS__LOGIN_ATTEMPTS_PER_MINUTE", "0");
    command
}

/// Runs a `sluice` command to completion and returns its stdout.
pub fn run_cli(prefix: &str, args: &[&str]) -> String {
    let output = sluice(prefix).args(args).output().expect("running sluice");
    assert!(
        output.status.success(),
        "sluice {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A tenant and its API key.
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub key: String,
}

impl Tenant {
    /// The tenant's id, as the stores take it.
    pub fn uuid(&self) -> uuid::Uuid {
        self.id.parse().expect("a tenant id is a UUID")
    }
}

/// Creates a tenant through the CLI.
pub fn create_tenant(prefix: &str) -> Tenant {
    let name = unique("tenant-");
    let out = run_cli(prefix, &["tenant", "create", &name, "--json"]);
    let v: Value = serde_json::from_str(out.trim()).expect("tenant JSON");
    Tenant {
        id: v["tenant_id"].as_str().expect("id").to_owned(),
        name,
        key: v["api_key"].as_str().expect("key").to_owned(),
    }
}

/// A running `sluice up`.
pub struct Sluice {
    pub prefix: String,
    pub url: String,
    pub registry_url: String,
    edge_port: u16,
    registry_port: u16,
    child: Option<Child>,
    /// Extra environment for the process (applies from the next start).
    pub extra_env: Vec<(String, String)>,
}

impl Sluice {
    /// Prepares topics for a fresh prefix and starts `sluice up`.
    pub fn start() -> Self {
        Self::start_with(&unique("t"), Vec::new())
    }

    /// Starts `sluice up` for `prefix` with extra environment variables.
    pub fn start_with(prefix: &str, extra_env: Vec<(String, String)>) -> Self {
        run_cli(prefix, &["setup"]);
        let edge_port = free_port();
        let registry_port = free_port();
        let mut sluice = Self {
            prefix: prefix.to_owned(),
            url: format!("http://127.0.0.1:{edge_port}"),
            registry_url: format!("http://127.0.0.1:{registry_port}"),
            edge_port,
            registry_port,
            child: None,
            extra_env,
        };
        // A port chosen free can be taken by a parallel test before `sluice up` binds it:
        // then it exits at once, and it is started again on other ports.
        for _ in 0..3 {
            sluice.spawn_child();
            match sluice.ready_or_exit() {
                Ok(()) => return sluice,
                Err(status) if sluice.log_says("cannot listen on") => {
                    eprintln!("sluice up lost a port race ({status}); new ports");
                    sluice.edge_port = free_port();
                    sluice.registry_port = free_port();
                    sluice.url = format!("http://127.0.0.1:{}", sluice.edge_port);
                    sluice.registry_url = format!("http://127.0.0.1:{}", sluice.registry_port);
                }
                Err(status) => sluice.exited(status),
            }
        }
        panic!("sluice up could not get free ports three times");
    }

    fn log_path(&self) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".sluice/logs")
            .join(format!("test-{}.log", self.prefix))
    }

    fn log_says(&self, text: &str) -> bool {
        std::fs::read_to_string(self.log_path())
            .map(|log| log.contains(text))
            .unwrap_or(false)
    }

    fn exited(&self, status: std::process::ExitStatus) -> ! {
        panic!(
            "sluice up exited early with {status}; see .sluice/logs/test-{}.log",
            self.prefix
        );
    }

    fn spawn(&mut self) {
        self.spawn_child();
        self.wait_ready();
    }

    fn spawn_child(&mut self) {
        let log = log_file(&format!("test-{}.log", self.prefix));
        let mut command = sluice(&self.prefix);
        command
            .arg("up")
            .env(
                "SLUICE_EDGE__LISTEN",
                format!("127.0.0.1:{}", self.edge_port),
            )
            .env(
                "SLUICE_REGISTRY__LISTEN",
                format!("127.0.0.1:{}", self.registry_port),
            )
            .env("SLUICE_REGISTRY__URL", &self.registry_url)
            .env("SLUICE_OPS__LISTEN", format!("127.0.0.1:{}", free_port()))
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.extra_env {
            command.env(k, v);
        }
        self.child = Some(command.spawn().expect("starting sluice up"));
    }

    /// Waits until `/readyz` is green (at most 60 s).
    pub fn wait_ready(&mut self) {
        if let Err(status) = self.ready_or_exit() {
            self.exited(status);
        }
    }

    /// Waits until `/readyz` is green (at most 60 s), or the process exits.
    fn ready_or_exit(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(status);
                }
            }
            if ready(&self.url) {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "sluice up did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process's resident memory, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().map(Child::id).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Starts the process again after a [`Sluice::kill`], once the broker has expired the dead
    /// process's group memberships (10 s): tansu has no join barrier, so a member joining
    /// earlier shares the partitions with the dead one until its session expires and the group
    /// rebalances again. Waiting keeps the restart to one rebalance.
    pub async fn restart_after_crash(&mut self, killed_at: Instant) {
        let expired = killed_at + Duration::from_secs(12);
        tokio::time::sleep_until(expired.into()).await;
        self.spawn();
    }

    /// Kills the process without warning (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process (SIGTERM, so it leaves its consumer groups) if it runs, and starts it
    /// again with the same prefix and ports.
    pub fn restart(&mut self) {
        self.terminate();
        self.spawn();
    }

    /// Asks the process to stop (SIGTERM) and waits for it; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        match self.child.take() {
            Some(mut child) => {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
                child.wait().map(|s| s.success()).unwrap_or(false)
            }
            None => true,
        }
    }

    /// Runs a `sluice` command against this instance (its topics and registry).
    pub fn cli(&self, args: &[&str]) -> String {
        let output = sluice(&self.prefix)
            .env("SLUICE_REGISTRY__URL", &self.registry_url)
            .args(args)
            .output()
            .expect("running sluice");
        assert!(
            output.status.success(),
            "sluice {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts another `sluice` part (e.g. `edge`) on this instance's topics and registry; it is
    /// killed when the returned guard drops.
    pub fn spawn_part(&self, args: &[&str], env: &[(&str, String)]) -> Part {
        spawn_part(&self.prefix, &self.registry_url, args, env)
    }

    /// Starts another `sluice edge` on this instance's topics, on a free port; returns it and
    /// its URL without waiting for it (see [`ready_within`]).
    pub fn spawn_edge(&self, env: &[(&str, String)]) -> (Part, String) {
        let port = free_port();
        let mut env = env.to_vec();
        env.push(("SLUICE_EDGE__LISTEN", format!("127.0.0.1:{port}")));
        (
            self.spawn_part(&["edge"], &env),
            format!("http://127.0.0.1:{port}"),
        )
    }

    pub fn v1(&self, path: &str) -> String {
        format!("{}/v1{path}", self.url)
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }
}

/// A log file under `.sluice/logs/`, appended to, so a restarted process keeps its history.
fn log_file(name: &str) -> std::fs::File {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".sluice/logs");
    std::fs::create_dir_all(&dir).expect("log dir");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .expect("log file")
}

/// Starts a `sluice` part (`edge`, `registry`, `run <stage>`, ...) on `prefix`'s topics with
/// the registry at `registry_url`, serving its operations endpoint on a free port; it is killed
/// when the returned guard drops.
pub fn spawn_part(prefix: &str, registry_url: &str, args: &[&str], env: &[(&str, String)]) -> Part {
    let log = log_file(&format!("test-{prefix}-{}.log", args.join("-")));
    let ops_port = free_port();
    let mut command = sluice(prefix);
    command
        .args(args)
        .env("SLUICE_REGISTRY__URL", registry_url)
        .env("SLUICE_OPS__LISTEN", format!("127.0.0.1:{ops_port}"))
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        command.env(k, v);
    }
    Part {
        child: command.spawn().expect("starting a sluice part"),
        ops_url: format!("http://127.0.0.1:{ops_port}"),
    }
}

/// A `sluice` part started by [`spawn_part`].
pub struct Part {
    child: Child,
    /// Where a stage-only part serves `/metrics`, `/healthz` and `/readyz`.
    pub ops_url: String,
}

impl Part {
    /// Whether the process has exited (a part that lost a race for its port exits at once).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kills the part (SIGKILL: no leave, no final commit) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the part to stop (SIGTERM: it leaves its consumer groups) and waits; true if it
    /// exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits, off the async threads, until `url`'s `/readyz` is green (at most 60 s).
pub async fn ready_within(url: &str) {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || wait_ready(&url))
        .await
        .expect("waiting for readiness");
}

/// Waits until `url`'s `/readyz` is green (at most 60 s).
pub fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready(url) {
        assert!(Instant::now() < deadline, "{url} did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        self.terminate();
    }
}

pub fn ready(url: &str) -> bool {
    // A bare blocking probe keeps the harness free of a runtime.
    use std::io::{Read, Write};
    let Some(address) = url.strip_prefix("http://") else {
        return false;
    };
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

/// An async HTTP client.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// POSTs a chat completion; returns status and JSON body.
pub async fn chat(sluice: &Sluice, key: &str, body: Value) -> (u16, Value) {
    let response = http()
        .post(sluice.v1("/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Environment for a simulated model that streams `tokens_per_second`.
pub fn sim_speed(tokens_per_second: f64) -> Vec<(String, String)> {
    vec![(
        "SLUICE_ORCHESTRATOR__SIM__TOKENS_PER_SECOND".to_owned(),
        format!("{tokens_per_second:.1}"),
    )]
}

/// Sends an `auto` chat completion in the background after `delay`; resolves to its status and
/// JSON body, or status 0 if the connection failed (the process was killed, say).
pub fn spawn_chat(
    sluice: &Sluice,
    key: &str,
    content: String,
    max_tokens: u32,
    delay: Duration,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let (url, key) = (sluice.v1("/chat/completions"), key.to_owned());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let body = serde_json::json!({
            "model": "auto", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        });
        match http().post(url).bearer_auth(key).json(&body).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    })
}

/// GETs a JSON endpoint with a key.
pub async fn get_json(url: &str, key: &str) -> (u16, Value) {
    let response = http()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Polls `check` every 200 ms until it returns Some, for at most `seconds`.
pub async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A consumer reading `topic` from the beginning, in its own group.
pub fn topic_reader(topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("reader-"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// Reads records from `consumer` until `found` accepts one (at most `seconds`).
pub async fn find_record<T>(
    consumer: &StreamConsumer,
    seconds: u64,
    mut found: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "record not found in time");
        if let Ok(Ok(message)) = tokio::time::timeout(left, consumer.recv()).await {
            if let Some(value) = found(&message) {
                return value;
            }
            let _ = message.offset();
        }
    }
}

/// A ClickHouse client for the `sluice` database.
pub fn clickhouse() -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(clickhouse_url())
        .with_database("sluice")
        .with_validation(false)
}

/// The value of one series (name with its labels, as `/metrics` prints it) on `base`'s
/// `/metrics` page; 0 when absent.
pub async fn metric(base: &str, series: &str) -> f64 {
    let Ok(response) = http().get(format!("{base}/metrics")).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// How many usage facts `tenant_id` has (each event once), or `None` if ClickHouse did not answer.
pub async fn facts_of(tenant_id: &str) -> Option<u64> {
    clickhouse()
        .query("SELECT count() FROM usage_events FINAL WHERE tenant_id = ?")
        .bind(tenant_id)
        .fetch_one()
        .await
        .ok()
}

/// (request_id, rows) for every request billed to `tenant_id`, read through `FINAL`.
pub async fn billed_per_request(tenant_id: &str) -> Option<Vec<(String, u64)>> {
    clickhouse()
        .query("SELECT request_id, count() FROM usage_events FINAL WHERE tenant_id = ? GROUP BY request_id")
        .bind(tenant_id)
        .fetch_all()
        .await
        .ok()
}

/// A usage event of `request_id` (event id `<request_id>:0`) for `tenant` on `sim-small`: one
/// token each way, now, no latency. Tests override what they measure.
pub fn usage_event(request_id: String, tenant: &str) -> sluice_schemas::UsageEvent {
    sluice_schemas::UsageEvent {
        event_id: format!("{request_id}:0"),
        request_id,
        tenant_id: tenant.to_owned(),
        model: "sim-small".into(),
        provider: "sim".into(),
        input_tokens: 1,
        output_tokens: 1,
        occurred_at_ms: sluice_pipelines::now_ms(),
        latency_ms: None,
        key_id: None,
        user_id: None,
        cached_input_tokens: None,
        trace_id: None,
        outcome: None,
        billable: true,
    }
}

/// Settings for the local broker, everything else at its default.
pub fn kafka_config() -> sluice_pipelines::KafkaConfig {
    sluice_pipelines::KafkaConfig {
        bootstrap: bootstrap(),
        ..Default::default()
    }
}

/// Whether the broker's metadata lists `topic`.
pub fn topic_exists(topic: &str) -> bool {
    use rdkafka::consumer::BaseConsumer;
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("metadata client");
    let metadata = client
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    metadata.topics().iter().any(|t| t.name() == topic)
}

/// Produces every (key, payload) to `topic` on the local broker and waits for them all.
pub async fn produce_all(topic: &str, records: impl Iterator<Item = (String, Vec<u8>)>) {
    let kafka = kafka_config();
    sluice_pipelines::kafka::produce_all(&kafka, topic, records.map(Ok))
        .await
        .unwrap();
}

/// The password every test's registered admin has.
pub const ADMIN_PASSWORD: &str = "a long enough password";

/// Registers a new tenant and its first admin through the API: (email, session), the session
/// with `tenant_id` and `access_token`.
pub async fn register_tenant_admin(sluice: &Sluice) -> (String, Value) {
    let email = format!("{}@example.com", unique("admin-"));
    let response = http()
        .post(sluice.v1("/auth/register"))
        .json(&serde_json::json!({ "tenant": unique("org-"), "email": email, "password": ADMIN_PASSWORD }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let session: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{session}");
    (email, session)
}

/// A new key of the tenant whose admin holds `access_token`: (its id, the key).
pub async fn create_key(sluice: &Sluice, access_token: &str, name: &str) -> (String, String) {
    let created: Value = http()
        .post(sluice.v1("/keys"))
        .bearer_auth(access_token)
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        created["id"].as_str().unwrap().to_owned(),
        created["api_key"].as_str().unwrap().to_owned(),
    )
}

/// A new platform admin (made by an operator with the CLI), logged in: the session.
pub async fn platform_admin_session(sluice: &Sluice) -> Value {
    let email = format!("{}@example.com", unique("ops-"));
    let mut create = self::sluice(&sluice.prefix);
    create
        .args(["user", "create", &email, "--role", "platform_admin"])
        .stdin(Stdio::piped());
    let mut child = create.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"platform password\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let response = http()
        .post(sluice.v1("/auth/login"))
        .json(&serde_json::json!({ "email": email, "password": "platform password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

/// What `input` and `output` tokens of `sim-small` cost at the price in force now, exactly, in
/// pico-units (10⁻¹² of the currency).
pub async fn sim_small_pico(input: u64, output: u64) -> i128 {
    let admin = sluice_stores::postgres::connect(&admin_database_url(), 1)
        .await
        .unwrap();
    let (input_price, output_price): (i64, i64) = sqlx::query_as(
        "SELECT input_per_mtok, output_per_mtok FROM price_versions WHERE item = 'model:sim-small' \
          AND valid_from <= now() ORDER BY valid_from DESC LIMIT 1",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    i128::from(input) * i128::from(input_price) + i128::from(output) * i128::from(output_price)
}

/// What `input` and `output` tokens of `sim-small` cost at the price in force now, as invoice
/// lines show it: (exact amount, amount rounded to the cent).
pub async fn sim_small_amounts(input: u64, output: u64) -> (String, String) {
    let pico = sim_small_pico(input, output).await;
    let cents = (pico + 5_000_000_000) / 10_000_000_000;
    (
        format!(
            "{}.{:012}",
            pico / 1_000_000_000_000,
            pico % 1_000_000_000_000
        ),
        format!("{}.{:02}", cents / 100, cents % 100),
    )
}

/// Asserts that the hourly and daily rollups hold exactly what `tenant`'s facts hold.
pub async fn assert_rollups_equal_facts(tenant: &str) {
    type Bucket = (u32, String, u64, u64, u64, u64);
    let read = |sql: &'static str| async move {
        clickhouse()
            .query(sql)
            .bind(tenant)
            .fetch_all::<Bucket>()
            .await
            .unwrap()
    };
    let facts = read(
        "SELECT toUInt32(toStartOfHour(toDateTime(occurred_at, 'UTC'))) AS h, model, count(), \
                sum(input_tokens), sum(output_tokens), sum(cached_input_tokens) \
           FROM usage_events FINAL WHERE tenant_id = ? GROUP BY h, model ORDER BY h, model",
    )
    .await;
    let hourly = read(
        "SELECT toUInt32(hour) AS h, model, sum(requests), sum(input_tokens), sum(output_tokens), \
                sum(cached_input_tokens) \
           FROM usage_hourly WHERE tenant_id = ? GROUP BY h, model ORDER BY h, model",
    )
    .await;
    assert!(!facts.is_empty(), "no facts of {tenant}");
    assert_eq!(hourly, facts, "usage_hourly of {tenant}");
    let daily = read(
        "SELECT toUInt32(toDate(day)) AS d, '' AS m, sum(requests), sum(input_tokens), \
                sum(output_tokens), sum(cached_input_tokens) \
           FROM usage_daily WHERE tenant_id = ? GROUP BY d ORDER BY d",
    )
    .await;
    let facts_daily = read(
        "SELECT toUInt32(toDate(occurred_at, 'UTC')) AS d, '' AS m, count(), sum(input_tokens), \
                sum(output_tokens), sum(cached_input_tokens) \
           FROM usage_events FINAL WHERE tenant_id = ? GROUP BY d ORDER BY d",
    )
    .await;
    assert_eq!(daily, facts_daily, "usage_daily of {tenant}");
}

/// One request a [`WebhookReceiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
    /// What the receiver answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// Requests of one event type (`*`: any) to answer with 503, and how many more.
type Failing = std::sync::Arc<std::sync::Mutex<(String, usize)>>;

/// A local HTTP server standing in for a tenant's webhook endpoint: records every POST and
/// answers 503 to the next requests [`fail_next`](Self::fail_next) names, 200 to the rest.
pub struct WebhookReceiver {
    pub url: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    failing: Failing,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        use axum::{extract::State, http::HeaderMap, routing::post, Router};
        type Shared = (std::sync::Arc<std::sync::Mutex<Vec<Received>>>, Failing);
        async fn hook(
            State((received, failing)): State<Shared>,
            headers: HeaderMap,
            body: String,
        ) -> axum::http::StatusCode {
            let event = headers
                .get("sluice-event")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let fails = {
                let mut failing = failing.lock().unwrap();
                let matches = failing.0 == "*" || failing.0 == event;
                if matches && failing.1 > 0 {
                    failing.1 -= 1;
                    true
                } else {
                    false
                }
            };
            let status = if fails { 503 } else { 200 };
            let headers = headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            received.lock().unwrap().push(Received {
                headers,
                body,
                status,
            });
            axum::http::StatusCode::from_u16(status).unwrap()
        }
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let failing: Failing = std::sync::Arc::new(std::sync::Mutex::new((String::new(), 0)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state((received.clone(), failing.clone()));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            received,
            failing,
        }
    }

    /// Answers the next `n` requests of event type `kind` (`*`: any) with 503.
    pub fn fail_next(&self, kind: &str, n: usize) {
        *self.failing.lock().unwrap() = (kind.to_owned(), n);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// What was received of event type `kind`.
    pub fn of_type(&self, kind: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.header("sluice-event") == kind)
            .collect()
    }
}

/// Checks `received`'s `Sluice-Signature` against `secret` with `openssl` (an implementation
/// of HMAC-SHA256 other than Sluice's): the signed timestamp.
pub fn verify_signature(received: &Received, secret: &str) -> i64 {
    let header = received.header("sluice-signature");
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("a signature header: {header:?}"));
    use std::io::Write;
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{t}.{}", received.body).as_bytes())
        .unwrap();
    let out = String::from_utf8(openssl.wait_with_output().unwrap().stdout).unwrap();
    let expected = out.trim().rsplit(' ').next().unwrap().to_owned();
    assert_eq!(v1, expected, "the signature of {}", received.body);
    t.parse().unwrap()
}
