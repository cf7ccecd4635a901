//! A ws-gateway on `127.0.0.1:0` (public and internal API), and clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dak_runtime::auth::{self, Verifier};
use dak_runtime::bus::{Bus, Log, LogOptions, Topics};
use dak_runtime::config::LimitArgs;
use dak_runtime::dedup::{Dedup, MemoryDedup};
use dak_runtime::http::ConnectionLimits;
use dak_runtime::ingress::Ingress;
use dak_runtime::presence::{Gateway, MemoryPresence};
use dak_runtime::shutdown::Shutdown;
use dak_wire::{DeviceId, UserId};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};
use ws_gateway::{Config, Deps, WsGateway};

pub const SECRET: &str = "ws-test-secret";
pub const INTERNAL_TOKEN: &str = "ws-test-internal";

pub struct Ws {
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub gateway: WsGateway,
    http: reqwest::Client,
    shutdown: Shutdown,
    _dir: tempfile::TempDir,
}

impl Drop for Ws {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn config() -> Config {
    Config {
        ping_interval: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(60),
        send_queue: 1024,
        send_queue_bytes: 1024 * 1024,
        rate_limit: 0,
        max_pending: 256,
        limits: LimitArgs {
            max_body_bytes: 64 * 1024,
            max_frame_bytes: 96 * 1024,
            group_max_members: 1024,
            group_notice_users: 64,
        },
    }
}

impl Ws {
    pub async fn start(config: Config) -> Self {
        Self::start_with_dedup(config, Arc::new(MemoryDedup::new(Duration::from_secs(60)))).await
    }

    /// A gateway whose dedup store is `dedup`.
    pub async fn start_with_dedup(config: Config, dedup: Arc<dyn Dedup>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&dir.path().join("bus.db"), LogOptions::default()).unwrap();
        let bus = Bus::log(log, Topics::with_prefix(""));
        bus.create_topics().await.unwrap();
        let ingress = Ingress::new(bus.producer().unwrap(), bus.topics().inbound.clone(), dedup);
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let internal = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (public_addr, internal_addr) =
            (public.local_addr().unwrap(), internal.local_addr().unwrap());
        let shutdown = Shutdown::new();
        let gateway = WsGateway::new(
            config,
            Deps {
                verifier: Verifier::hs256(SECRET),
                ingress,
                presence: Arc::new(MemoryPresence::default()),
                gateway: Gateway::new(format!("http://{internal_addr}")),
                internal_token: INTERNAL_TOKEN.into(),
                presence_ttl: Duration::from_secs(30),
            },
            shutdown.clone(),
        );
        tokio::spawn(dak_runtime::http::serve(
            public,
            gateway.public_router(),
            ConnectionLimits::default(),
            shutdown.clone(),
        ));
        tokio::spawn(dak_runtime::http::serve(
            internal,
            gateway.internal_router(),
            ConnectionLimits::NONE,
            shutdown.clone(),
        ));
        Self {
            public: public_addr,
            internal: internal_addr,
            gateway,
            http: reqwest::Client::new(),
            shutdown,
            _dir: dir,
        }
    }

    /// `POST /internal/v1/send` of `frames` to `user`'s `phone`: the outcomes.
    pub async fn send(&self, user: &str, frames: &[Value]) -> Vec<String> {
        let deliveries: Vec<Value> = frames
            .iter()
            .map(|frame| json!({"user": user, "device": "phone", "frame": frame}))
            .collect();
        let answer: Value = self
            .http
            .post(format!("http://{}/internal/v1/send", self.internal))
            .bearer_auth(INTERNAL_TOKEN)
            .json(&json!({ "deliveries": deliveries }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until `user`'s socket is registered.
    pub async fn wait_connected(&self, user: &str) {
        for _ in 0..1000 {
            if self.send(user, &[json!({"type": "pong"})]).await[0] != "not_connected" {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{user} never connected");
    }
}

pub fn token(user: &str) -> String {
    auth::mint(
        SECRET,
        &UserId::parse(user).unwrap(),
        &DeviceId::parse("phone").unwrap(),
        Duration::from_secs(3600),
    )
}

/// A message frame of about `size` bytes, numbered `seq`.
pub fn message(seq: usize, size: usize) -> Value {
    json!({
        "type": "message", "mid": format!("01JDQ8V9Q6F4S9G4Z9Y8X7{seq:04}"), "from": "alice",
        "to": "bob", "chat": "direct", "body": {"seq": seq, "pad": "x".repeat(size)}, "ts": 1
    })
}

pub type Client = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A client whose socket takes in only a few kilobytes at a time.
pub async fn connect(addr: SocketAddr, user: &str, receive_buffer: Option<u32>) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes).unwrap();
    }
    let stream = socket.connect(addr).await.unwrap();
    let url = format!("ws://{addr}/v1/ws?access_token={}", token(user));
    let (client, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    client
}
