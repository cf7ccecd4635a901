//! Test harness: dak stacks (in process on the embedded bus, or as separate
//! processes against Apache Kafka and Redis), WebSocket clients, and a watcher
//! on `dak.offline`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Parser;
use dak_runtime::bus::Bus;
use dak_runtime::shutdown::{self, Shutdown};
use dak_wire::event::{self, OfflineEvent};
use dak_wire::{DeviceId, UserId};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should happen. Generous: on Kafka,
/// the first message of fresh services waits for consumer groups to form.
pub const PATIENCE: Duration = Duration::from_secs(45);

pub const SECRET: &str = "test-secret";

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", ulid::Ulid::new().to_string().to_lowercase())
}

pub fn redis_url() -> String {
    std::env::var("DAK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn token(user: &str, device: &str) -> String {
    dak_runtime::auth::mint(
        SECRET,
        &UserId::parse(user).unwrap(),
        &DeviceId::parse(device).unwrap(),
        Duration::from_secs(3600),
    )
}

#[derive(Parser)]
struct UpCli {
    #[command(flatten)]
    up: dak::up::UpArgs,
}

/// Settings a test may change; everything else is `dak up`'s default.
pub struct Options {
    pub redis: bool,
    pub ack_timeout: &'static str,
    pub retries: u32,
    pub ping_interval: &'static str,
    pub idle_timeout: &'static str,
    pub extra: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            redis: false,
            ack_timeout: "10s",
            retries: 3,
            ping_interval: "20s",
            idle_timeout: "60s",
            extra: Vec::new(),
        }
    }
}

/// Metrics are per process, and tests run in parallel threads of one process. A
/// test that asserts on metrics runs alone ([`Stack::start_alone`]); every other
/// stack holds a shared guard.
fn metrics_lock() -> Arc<tokio::sync::RwLock<()>> {
    static LOCK: OnceLock<Arc<tokio::sync::RwLock<()>>> = OnceLock::new();
    LOCK.get_or_init(Default::default).clone()
}

enum MetricsGuard {
    #[allow(dead_code)]
    Shared(tokio::sync::OwnedRwLockReadGuard<()>),
    #[allow(dead_code)]
    Alone(tokio::sync::OwnedRwLockWriteGuard<()>),
}

/// `dak up` in this process, on an embedded bus of its own (in its data
/// directory).
pub struct Stack {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub bus: Bus,
    pub topic_prefix: String,
    /// The prefix of every Redis key of this stack, when it runs on Redis.
    pub redis_prefix: String,
    data_dir: tempfile::TempDir,
    _data_dir_lock: Option<dak_runtime::process::DataDirLock>,
    shutdown: Shutdown,
    supervisor: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _metrics: MetricsGuard,
}

impl Stack {
    /// The stack's data directory, removed with the stack.
    pub fn data_dir(&self) -> &std::path::Path {
        self.data_dir.path()
    }

    pub async fn start(options: Options) -> Stack {
        let guard = MetricsGuard::Shared(metrics_lock().read_owned().await);
        Self::start_with(options, guard).await
    }

    /// A stack whose metrics no other test's stack moves while it runs.
    pub async fn start_alone(options: Options) -> Stack {
        let guard = MetricsGuard::Alone(metrics_lock().write_owned().await);
        Self::start_with(options, guard).await
    }

    async fn start_with(options: Options, guard: MetricsGuard) -> Stack {
        dak_runtime::telemetry::init_for_tests();
        let topic_prefix = unique("t") + ".";
        let redis_prefix = unique("dak-test-");
        let mut args: Vec<String> = [
            "up",
            "--public-addr",
            "127.0.0.1:0",
            "--internal-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--partitions",
            "4",
            "--shutdown-grace",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend([
            "--topic-prefix".into(),
            topic_prefix.clone(),
            "--ack-timeout".into(),
            options.ack_timeout.into(),
            "--retries".into(),
            options.retries.to_string(),
            "--ping-interval".into(),
            options.ping_interval.into(),
            "--idle-timeout".into(),
            options.idle_timeout.into(),
            "--redis-prefix".into(),
            redis_prefix.clone(),
        ]);
        let data_dir = tempfile::tempdir().expect("temp data dir");
        args.extend(["--data-dir".into(), data_dir.path().display().to_string()]);
        if options.redis {
            args.extend(["--redis-url".into(), redis_url()]);
        }
        args.extend(options.extra);
        let cli = UpCli::try_parse_from(args).expect("test arguments parse");
        let shutdown = Shutdown::new();
        let running = dak::up::start(cli.up, shutdown.clone())
            .await
            .expect("stack starts");
        let supervisor = tokio::spawn(shutdown::supervise(
            running.tasks,
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        Stack {
            public: running.public_addr,
            admin: running.admin_addr,
            bus: running.bus.clone(),
            topic_prefix,
            redis_prefix,
            data_dir,
            _data_dir_lock: running.data_dir_lock,
            shutdown,
            supervisor: Some(supervisor),
            _metrics: guard,
        }
    }

    pub async fn connect(&self, user: &str, device: &str) -> Client {
        Client::connect(self.public, &token(user, device)).await
    }

    pub fn offline(&self) -> OfflineWatcher {
        OfflineWatcher::new(&self.bus)
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric(self.admin, name).await
    }

    /// Stops the stack and checks it shut down cleanly.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let supervisor = self.supervisor.take().expect("running");
        supervisor
            .await
            .expect("supervisor task")
            .expect("clean shutdown");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The whole `/metrics` text of the admin address.
pub async fn metrics_text(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("metrics endpoint")
        .text()
        .await
        .expect("metrics body")
}

/// Reads one metric (summing its label sets) from `/metrics`.
pub async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text = metrics_text(admin).await;
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking the JSON frames of DESIGN §4.
pub struct Client {
    ws: Ws,
}

impl Client {
    /// Connects and waits for `sync.done`, after which the device is routable.
    pub async fn connect(addr: SocketAddr, token: &str) -> Client {
        let mut client = Client::try_connect(addr, token)
            .await
            .expect("websocket upgrade");
        let first = client.recv().await;
        assert_eq!(first["type"], "sync.done", "first frame: {first}");
        client
    }

    /// Connects without waiting for anything: the stored inbox and `sync.done`
    /// are the caller's to read.
    pub async fn connect_raw(addr: SocketAddr, token: &str) -> Client {
        Client::try_connect(addr, token)
            .await
            .expect("websocket upgrade")
    }

    /// Reads the replay: every stored frame (messages, receipts, rejections) up
    /// to `sync.done`.
    pub async fn replay(&mut self) -> Vec<Value> {
        let mut messages = Vec::new();
        loop {
            let frame = self.recv().await;
            match frame["type"].as_str() {
                Some("sync.done") => return messages,
                Some("message" | "receipt" | "rejected") => messages.push(frame),
                _ => panic!("unexpected frame during replay: {frame}"),
            }
        }
    }

    pub async fn try_connect(
        addr: SocketAddr,
        token: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut request = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client { ws })
    }

    pub async fn connect_with_query(addr: SocketAddr, token: &str) -> Client {
        let (ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?access_token={token}"))
                .await
                .expect("websocket upgrade");
        let mut client = Client { ws };
        assert_eq!(client.recv().await["type"], "sync.done");
        client
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("websocket send");
    }

    pub async fn send_message(&mut self, id: &str, to: &str, body: Value) {
        self.send(json!({"type": "message", "id": id, "to": to, "chat": "direct", "body": body}))
            .await;
    }

    pub async fn ack(&mut self, mids: &[&str]) {
        self.send(json!({"type": "ack", "mids": mids})).await;
    }

    /// The next JSON frame; fails the test after [`PATIENCE`], or at once
    /// when the socket closes, saying which.
    pub async fn recv(&mut self) -> Value {
        match self.next_frame(PATIENCE).await {
            Ok(v) => v,
            Err(why) => panic!("{why}"),
        }
    }

    /// [`Client::recv`], for a test with many clients: a failure names `who`
    /// and what it was waiting for.
    pub async fn recv_as(&mut self, who: &str, waiting_for: &str) -> Value {
        match self.next_frame(PATIENCE).await {
            Ok(v) => v,
            Err(why) => panic!("{who}, waiting for {waiting_for}: {why}"),
        }
    }

    /// The next JSON frame, or `None` if none comes within `wait` (or the socket closed).
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        self.next_frame(wait).await.ok()
    }

    /// The next JSON frame, or why there is none.
    async fn next_frame(&mut self, wait: Duration) -> Result<Value, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| format!("no frame within {wait:?}"))?;
            match next {
                None => return Err("the socket ended without a close frame".into()),
                Some(Err(e)) => return Err(format!("the socket failed: {e}")),
                Some(Ok(Message::Text(text))) => {
                    return Ok(serde_json::from_str(text.as_str()).expect("server sends JSON"))
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("the server closed the socket: {frame:?}"))
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Like [`Client::recv_within`], but acks and passes over delivered
    /// receipts: for tests about messages, which every ack answers with a
    /// receipt to the sender.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.recv_within(wait).await?;
            if frame["type"] != "receipt" {
                return Some(frame);
            }
            self.ack(&[frame["rid"].as_str().expect("a receipt has a rid")])
                .await;
        }
    }

    /// The next frame, which must be of type `kind`. Delivered receipts (which
    /// every acked message sends back to its sender) are acked and passed over
    /// unless a receipt is what the caller waits for.
    pub async fn expect(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == "receipt" && kind != "receipt" {
                self.ack(&[frame["rid"].as_str().expect("a receipt has a rid")])
                    .await;
                continue;
            }
            assert_eq!(frame["type"], kind, "unexpected frame {frame}");
            return frame;
        }
    }

    /// The next frame, whatever its type, with delivered receipts acked and
    /// passed over; fails the test after [`PATIENCE`].
    pub async fn expect_any(&mut self) -> Value {
        match self.next_within(PATIENCE).await {
            Some(frame) => frame,
            None => panic!("no frame within {PATIENCE:?}"),
        }
    }

    /// Starts the close handshake with `code`.
    pub async fn close(&mut self, code: u16) {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let frame = CloseFrame {
            code: code.into(),
            reason: "bye".into(),
        };
        self.ws
            .send(Message::Close(Some(frame)))
            .await
            .expect("websocket close");
    }

    /// Waits for the server to close the socket, returning the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("socket still open after {PATIENCE:?}"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Hands the raw stream to a test that wants to stop reading it.
    pub fn into_inner(self) -> Ws {
        self.ws
    }
}

/// Reads `dak.offline` from the beginning, as a consumer group of its own.
pub struct OfflineWatcher {
    consumer: dak_runtime::bus::Consumer,
    shutdown: Shutdown,
    buffered: std::sync::Mutex<std::collections::VecDeque<Vec<u8>>>,
}

impl OfflineWatcher {
    pub fn new(bus: &Bus) -> Self {
        let consumer = bus
            .consumer(&unique("watch-"), &[&bus.topics().offline])
            .expect("watcher consumer");
        Self {
            consumer,
            shutdown: Shutdown::new(),
            buffered: Default::default(),
        }
    }

    /// The next `store` or `drop` (replay requests and push tokens are skipped).
    pub async fn next(&self) -> OfflineEvent {
        loop {
            match self.next_event().await {
                OfflineEvent::Replay { .. } | OfflineEvent::PushToken(_) => continue,
                event => return event,
            }
        }
    }

    async fn next_event(&self) -> OfflineEvent {
        match self.next_within(PATIENCE).await {
            Some(event) => event,
            None => panic!("nothing on dak.offline within {PATIENCE:?}"),
        }
    }

    /// The next event, unless none arrives within `wait`.
    pub async fn next_within(&self, wait: Duration) -> Option<OfflineEvent> {
        loop {
            if let Some(payload) = self.buffered.lock().unwrap().pop_front() {
                return Some(event::decode(&payload).expect("a valid offline event"));
            }
            let batch = tokio::time::timeout(wait, self.consumer.next_batch(100, &self.shutdown))
                .await
                .ok()??;
            self.buffered
                .lock()
                .unwrap()
                .extend(batch.into_iter().map(|r| r.payload));
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Process {
    child: Child,
    /// Where its output goes, to be shown when the test fails.
    log: Option<PathBuf>,
}

impl Process {
    pub fn from_child(child: Child) -> Self {
        Self { child, log: None }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process ended, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("waiting for a child")
    }

    /// SIGKILL: no shutdown, no cleanup, like a crashed host.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait for child")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        // The test failed: what the process said last may tell why. The whole
        // log is kept in dak-test-logs under the temporary directory.
        if let (true, Some(log)) = (std::thread::panicking(), &self.log) {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            let kept = std::env::temp_dir().join("dak-test-logs");
            let kept = std::fs::create_dir_all(&kept)
                .and_then(|()| {
                    let name = format!(
                        "{}-{}",
                        ulid::Ulid::new(),
                        log.file_name().unwrap().to_string_lossy()
                    );
                    std::fs::copy(log, kept.join(&name)).map(|_| kept.join(name))
                })
                .map(|path| path.display().to_string())
                .unwrap_or_else(|e| format!("not kept: {e}"));
            eprintln!(
                "--- last lines of {} (all of it: {kept}) ---\n{}",
                log.display(),
                tail.join("\n")
            );
        }
    }
}

/// The Apache Kafka broker of this test run (`DAK_TEST_KAFKA_BROKERS`, which
/// `scripts/test` sets); tests share it and keep apart by topic prefix.
pub fn kafka() -> String {
    std::env::var("DAK_TEST_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "the services tests need Apache Kafka: set DAK_TEST_KAFKA_BROKERS \
             (host:port), or run them with scripts/test, which starts one"
        )
    })
}

/// The environment shared by a set of separate dak service processes.
pub struct Services {
    pub data_dir: tempfile::TempDir,
    pub brokers: String,
    pub topic_prefix: String,
    pub redis_prefix: String,
    pub env: Vec<(String, String)>,
}

impl Services {
    pub fn new(brokers: &str, extra: &[(&str, &str)]) -> Self {
        let topic_prefix = unique("p") + ".";
        let redis_prefix = unique("dak-test-");
        let mut env: Vec<(String, String)> = [
            ("DAK_KAFKA_BROKERS", brokers),
            ("DAK_REDIS_URL", &redis_url()),
            ("DAK_REDIS_PREFIX", &redis_prefix),
            ("DAK_TOPIC_PREFIX", &topic_prefix),
            ("DAK_KAFKA_PARTITIONS", "4"),
            ("DAK_JWT_SECRET", SECRET),
            ("DAK_INTERNAL_TOKEN", "internal-test-token"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self {
            data_dir: tempfile::tempdir().expect("temp data dir"),
            brokers: brokers.to_owned(),
            topic_prefix,
            redis_prefix,
            env,
        }
    }

    /// Starts `dak <service>` with its own admin address and waits until it is ready.
    pub async fn start(&self, service: &str, extra: &[(&str, String)]) -> (Process, SocketAddr) {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // TEST_LOG=1 shows every service's output as it comes; otherwise it
        // goes to a file in the data directory, shown if the test fails.
        let (out, err, log) = if std::env::var_os("TEST_LOG").is_some() {
            (Stdio::inherit(), Stdio::inherit(), None)
        } else {
            let path = self
                .data_dir
                .path()
                .join(format!("{service}-{}.log", admin.port()));
            let file = std::fs::File::create(&path).expect("service log file");
            let copy = file.try_clone().expect("service log file");
            (Stdio::from(file), Stdio::from(copy), Some(path))
        };
        let child = Command::new(env!("CARGO_BIN_EXE_dak"))
            .arg(service)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .env("DAK_ADMIN_ADDR", admin.to_string())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawning dak");
        let process = Process { child, log };
        wait_ready(admin).await;
        (process, admin)
    }

    pub fn offline(&self) -> OfflineWatcher {
        let args = dak_runtime::config::KafkaArgs {
            brokers: Some(self.brokers.clone()),
            topic_prefix: self.topic_prefix.clone(),
            partitions: None,
            replication: 1,
            linger_ms: None,
            fetch_wait_ms: None,
            session_timeout_ms: 6000,
            ..dak_runtime::config::KafkaArgs::default()
        };
        OfflineWatcher::new(&Bus::kafka(
            dak_runtime::bus::KafkaConfig::new(self.brokers.clone(), &args).unwrap(),
        ))
    }

    /// Starts a ws-gateway on free public and internal ports; returns the
    /// process and its public address.
    pub async fn start_ws_gateway(&self) -> (Process, SocketAddr) {
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let internal = format!("127.0.0.1:{}", free_port());
        let (process, _) = self
            .start(
                "ws-gateway",
                &[
                    ("DAK_PUBLIC_ADDR", public.to_string()),
                    ("DAK_INTERNAL_ADDR", internal),
                ],
            )
            .await;
        (process, public)
    }

    /// Starts a rest-gateway on a free port; returns the process and its address.
    pub async fn start_rest_gateway(&self) -> (Process, SocketAddr) {
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (process, _) = self
            .start("rest-gateway", &[("DAK_PUBLIC_ADDR", public.to_string())])
            .await;
        (process, public)
    }

    /// Starts persistence with its SQLite inbox in this set's data directory;
    /// returns the process and its sync API address.
    pub async fn start_persistence(&self) -> (Process, SocketAddr) {
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dir = self.data_dir.path().display().to_string();
        let (process, _) = self
            .start(
                "persistence",
                &[
                    ("DAK_PUBLIC_ADDR", public.to_string()),
                    ("DAK_DATA_DIR", dir),
                ],
            )
            .await;
        (process, public)
    }
}

impl Services {
    /// Starts group-router with its SQLite store in this set's data directory;
    /// returns the process and its groups API address.
    pub async fn start_group_router(&self) -> (Process, SocketAddr) {
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dir = self.data_dir.path().display().to_string();
        let (process, _) = self
            .start(
                "group-router",
                &[
                    ("DAK_PUBLIC_ADDR", public.to_string()),
                    ("DAK_DATA_DIR", dir),
                ],
            )
            .await;
        (process, public)
    }
}

/// A group call over REST as `user` (device `default`): `method` on
/// `/v1/groups{path}` with an optional JSON body. (status, body)
pub async fn rest_group(
    public: SocketAddr,
    user: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://{public}/v1/groups{path}");
    let http = reqwest::Client::new();
    let request = match method {
        "GET" => http.get(url),
        "POST" => http.post(url),
        "PUT" => http.put(url),
        "DELETE" => http.delete(url),
        other => panic!("no such method {other}"),
    };
    let request = request.bearer_auth(token(user, "default"));
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    let response = request.send().await.expect("REST request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Reads frames until one of type `kind`, acking every message and receipt
/// read on the way; returns the frames skipped and the one found.
pub async fn until(client: &mut Client, kind: &str) -> (Vec<Value>, Value) {
    let mut skipped = Vec::new();
    loop {
        let frame = client.recv().await;
        if let Some(mid) = ack_id(&frame) {
            client.ack(&[&mid]).await;
        }
        if frame["type"] == kind {
            return (skipped, frame);
        }
        skipped.push(frame);
    }
}

/// The id a frame is acked by: a message's `mid`, a receipt's `rid`, a
/// rejection's `mid`.
pub fn ack_id(frame: &Value) -> Option<String> {
    match frame["type"].as_str()? {
        "message" | "rejected" => frame["mid"].as_str().map(str::to_owned),
        "receipt" => frame["rid"].as_str().map(str::to_owned),
        _ => None,
    }
}

/// `dak up` as a process of its own on `data_dir`, on embedded defaults (no
/// Kafka, no Redis) with `env` on top, bound to port 0. Returns the process
/// and the public and admin addresses it printed, once it is ready.
pub async fn spawn_dak_up(
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Process, SocketAddr, SocketAddr) {
    start_dak_up(dak_up_command(data_dir, env)).await
}

/// The command [`spawn_dak_up`] runs, for a test to change before
/// [`start_dak_up`] (to leave `DAK_JWT_SECRET` unset, say).
pub fn dak_up_command(data_dir: &std::path::Path, env: &[(&str, &str)]) -> Command {
    let log = std::env::var_os("TEST_LOG").is_some();
    let mut command = Command::new(env!("CARGO_BIN_EXE_dak"));
    command
        .arg("up")
        .env("DAK_DATA_DIR", data_dir)
        .env("DAK_PUBLIC_ADDR", "127.0.0.1:0")
        .env("DAK_INTERNAL_ADDR", "127.0.0.1:0")
        .env("DAK_ADMIN_ADDR", "127.0.0.1:0")
        .env("DAK_JWT_SECRET", SECRET)
        .envs(env.iter().copied())
        .env_remove("DAK_KAFKA_BROKERS")
        .env_remove("DAK_REDIS_URL")
        .stdout(Stdio::piped())
        .stderr(if log { Stdio::inherit() } else { Stdio::null() });
    command
}

/// Starts `dak up` (its stdout piped) and returns the process and the public
/// and admin addresses it printed, once it is ready.
pub async fn start_dak_up(mut command: Command) -> (Process, SocketAddr, SocketAddr) {
    let mut child = command.spawn().expect("spawning dak up");
    let stdout = child.stdout.take().expect("piped stdout");
    let process = Process::from_child(child);
    let (public, admin) = tokio::task::spawn_blocking(move || dak_up_addresses(stdout))
        .await
        .expect("reading dak up's addresses");
    wait_ready(admin).await;
    (process, public, admin)
}

/// The public and admin addresses `dak up` prints once it listens:
/// `dak is up: ws://ADDR/v1/ws, …` and `admin: http://ADDR/metrics …`. The
/// rest of its output is read on a thread of its own, so it never blocks.
pub fn dak_up_addresses(stdout: std::process::ChildStdout) -> (SocketAddr, SocketAddr) {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let between = |line: &str, start: &str, end: &str| -> Option<SocketAddr> {
        let rest = line.strip_prefix(start)?;
        rest[..rest.find(end)?].parse().ok()
    };
    let (mut public, mut admin) = (None, None);
    while public.is_none() || admin.is_none() {
        let line = lines
            .next()
            .expect("dak up exited before printing its addresses")
            .expect("dak up's output");
        public = public.or_else(|| between(&line, "dak is up: ws://", "/"));
        admin = admin.or_else(|| between(&line, "admin: http://", "/"));
    }
    std::thread::spawn(move || lines.for_each(drop));
    (public.unwrap(), admin.unwrap())
}

/// Tries `attempt` every 50 ms until it gives a value; fails the test,
/// naming `what`, when none comes within [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `/readyz` until it answers 200.
pub async fn wait_ready(admin: SocketAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("http://{admin}/readyz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{admin} not ready within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /v1/messages` as `user`.
pub async fn rest_send(public: SocketAddr, token: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{public}/v1/messages"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("REST request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Exchanges `n` messages from `alice` to `bob` and `n` from `bob` to `alice` at
/// once, acking everything, and checks that each side got every message once,
/// in the order sent.
pub async fn exchange(mut alice: Client, mut bob: Client, n: usize) -> (Client, Client) {
    let (a, b) = tokio::join!(
        converse(&mut alice, "alice", "bob", n),
        converse(&mut bob, "bob", "alice", n)
    );
    let _ = (a, b);
    (alice, bob)
}

/// Sends `n` messages to `peer` while receiving (and acking) `n` from it.
async fn converse(client: &mut Client, me: &str, peer: &str, n: usize) {
    let mut sent = 0;
    let mut accepted = std::collections::HashSet::new();
    let mut received: Vec<u64> = Vec::new();
    let mut mids = std::collections::HashSet::new();
    // Keep at most 64 sends unanswered, as a real client's outbox would.
    while accepted.len() < n || received.len() < n {
        while sent < n && sent - accepted.len() < 64 {
            client
                .send_message(&format!("{me}-{sent}"), peer, json!({ "seq": sent }))
                .await;
            sent += 1;
        }
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("accepted") => {
                assert!(
                    accepted.insert(frame["id"].as_str().unwrap().to_owned()),
                    "accepted twice: {frame}"
                );
            }
            // The peer's acks come back as delivered receipts.
            Some("receipt") => {
                assert_eq!(
                    (frame["by"].as_str(), frame["state"].as_str()),
                    (Some(peer), Some("delivered")),
                    "{frame}"
                );
                client.ack(&[frame["rid"].as_str().unwrap()]).await;
            }
            Some("message") => {
                assert_eq!(frame["from"], peer);
                assert_eq!(frame["to"], me);
                let mid = frame["mid"].as_str().unwrap().to_owned();
                assert!(mids.insert(mid.clone()), "{me} got {mid} twice");
                received.push(frame["body"]["seq"].as_u64().unwrap());
                client.ack(&[&mid]).await;
            }
            _ => panic!("{me} got an unexpected frame {frame}"),
        }
    }
    let expected: Vec<u64> = (0..n as u64).collect();
    assert_eq!(
        received, expected,
        "{me} received out of order or lost messages"
    );
}

/// Registers a push token for `user`'s `device`, which makes the device known.
pub async fn register_device(public: SocketAddr, user: &str, device: &str) {
    let response = reqwest::Client::new()
        .put(format!("http://{public}/v1/devices/{device}/push-token"))
        .bearer_auth(token(user, device))
        .json(&json!({"token": format!("fcm-{user}-{device}"), "platform": "android"}))
        .send()
        .await
        .expect("REST request");
    assert_eq!(response.status().as_u16(), 202);
}

/// `DELETE /v1/devices/{device}` as `user`'s device `by`, which must succeed.
pub async fn remove_device(public: SocketAddr, user: &str, by: &str, device: &str) {
    let response = reqwest::Client::new()
        .delete(format!("http://{public}/v1/devices/{device}"))
        .bearer_auth(token(user, by))
        .send()
        .await
        .expect("REST request");
    assert_eq!(response.status().as_u16(), 202);
}

/// `GET /v1/messages` as `user`'s `device`: (status, body).
pub async fn rest_sync(public: SocketAddr, user: &str, device: &str, query: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("http://{public}/v1/messages{query}"))
        .bearer_auth(token(user, device))
        .send()
        .await
        .expect("REST request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every stored message of the device, paging with `limit`.
pub async fn rest_sync_all(
    public: SocketAddr,
    user: &str,
    device: &str,
    limit: usize,
) -> Vec<Value> {
    let mut all = Vec::new();
    let mut query = format!("?limit={limit}");
    loop {
        let (status, page) = rest_sync(public, user, device, &query).await;
        assert_eq!(status, 200, "{page}");
        all.extend(page["messages"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => query = format!("?limit={limit}&after={next}"),
            None => return all,
        }
    }
}

/// Waits until the device's inbox holds `n` messages, and returns them.
pub async fn wait_for_inbox(public: SocketAddr, user: &str, device: &str, n: usize) -> Vec<Value> {
    wait_for_inbox_within(public, user, device, n, PATIENCE).await
}

/// [`wait_for_inbox`] with a bound of the caller's.
pub async fn wait_for_inbox_within(
    public: SocketAddr,
    user: &str,
    device: &str,
    n: usize,
    patience: Duration,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let all = rest_sync_all(public, user, device, 500).await;
        if all.len() == n {
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user}/{device} inbox has {} messages, expected {n}",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `body.seq` of each message frame.
pub fn seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["body"]["seq"].as_u64().expect("a seq body"))
        .collect()
}

/// Sends `range` as messages with `{"seq": n}` bodies and waits for every `accepted`.
pub async fn send_seq(client: &mut Client, to: &str, range: std::ops::Range<u64>) {
    let n = range.end - range.start;
    for seq in range {
        client
            .send_message(&format!("m-{seq}"), to, json!({ "seq": seq }))
            .await;
    }
    for _ in 0..n {
        client.expect("accepted").await;
    }
}

/// Waits until something accepts connections on 127.0.0.1:`port`, or fails
/// the test when `process` exits first or after `patience`.
async fn wait_listening(name: &str, process: &mut Process, port: u16, patience: Duration) {
    let deadline = tokio::time::Instant::now() + patience;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!("{name} exited with {status} before listening on {port}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} not listening on {port} within {patience:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server of one test's own that the test kills (SIGKILL) and starts
/// again on the same port and data directory: Apache Kafka or Redis.
pub struct Server {
    name: &'static str,
    process: Option<Process>,
    dir: tempfile::TempDir,
    port: u16,
    /// The command that runs the server in `dir` on `port`.
    command: fn(&std::path::Path, u16) -> Command,
}

impl Server {
    async fn start(
        name: &'static str,
        port: u16,
        command: fn(&std::path::Path, u16) -> Command,
    ) -> Self {
        let mut server = Self {
            name,
            process: None,
            dir: tempfile::tempdir().expect("server data dir"),
            port,
            command,
        };
        server.restart().await;
        server
    }

    /// A single-node Apache Kafka (`scripts/engines/kafka`): a restart finds
    /// its topics, records and committed offsets again.
    pub async fn kafka() -> Self {
        Self::start("kafka", server_ports(2), |dir, port| {
            let mut command = Command::new(repo_path("scripts/engines/kafka"));
            command.arg(dir.join("node")).arg(port.to_string());
            command
        })
        .await
    }

    /// A redis-server that writes every command to its append-only file
    /// before it answers, so a restart loses nothing it acknowledged.
    pub async fn redis() -> Self {
        Self::start("redis-server", server_ports(1), |dir, port| {
            let mut command = Command::new("redis-server");
            command
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .args(["--maxmemory-policy", "noeviction"])
                .arg("--dir")
                .arg(dir);
            command
        })
        .await
    }

    /// Kafka's `host:port`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Redis's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: nothing flushed, nothing closed.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again, on the same port and data directory.
    pub async fn restart(&mut self) {
        assert!(self.process.is_none(), "{} still runs", self.name);
        let log = std::fs::File::create(self.dir.path().join("stdout.log")).expect("log file");
        let child = (self.command)(self.dir.path(), self.port)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} (scripts/test installs it): {e}", self.name));
        let mut process = Process { child, log: None };
        wait_listening(self.name, &mut process, self.port, Duration::from_secs(120)).await;
        self.process = Some(process);
    }
}

/// `span` consecutive free ports on 127.0.0.1, the first returned, for a
/// server a test starts itself and starts again on the same ports after
/// killing it (Kafka's controller listens on the port after the broker's).
///
/// They are taken below the kernel's ephemeral range. [`free_port`] binds
/// port 0, which only ever gives a port from that range, so no service of a
/// test running alongside can take these while the server starts (a JVM
/// takes seconds to bind) or lies killed. Once there, a service answering
/// HTTP on the broker's port made a Kafka client read "HTTP" as a response
/// size. Ports handed out here are not handed out again in this process.
fn server_ports(span: u16) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const LOWEST: u16 = 10_000;
    let below = ephemeral_ports_start().max(LOWEST + 1_000);
    let mut given = GIVEN.lock().unwrap();
    loop {
        let mut random = std::collections::hash_map::RandomState::new().build_hasher();
        random.write_u16(span);
        let port = LOWEST + (random.finish() % u64::from(below - LOWEST - span)) as u16;
        let ports = port..port + span;
        if ports.clone().any(|p| given.contains(&p)) {
            continue;
        }
        if ports
            .clone()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            given.extend(ports);
            return port;
        }
    }
}

/// The first port of the kernel's ephemeral range (32768 unless configured).
fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A file of the repository. The package's directory comes from the variable
/// cargo sets when it runs the test, not from `env!`: a test binary that cargo
/// reuses from a build in another checkout (the same `CARGO_TARGET_DIR`,
/// unchanged sources) would otherwise look for the file in that checkout.
pub fn repo_path(relative: &str) -> PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    package.join("..").join(relative)
}
