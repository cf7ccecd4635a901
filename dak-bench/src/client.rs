//! The server under test as a client sees it: addresses, one token per simulated
//! device, sockets spread over source addresses, and the frames it answers with.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use dak_wire::{DeviceId, UserId};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Every simulated device uses this device id; users differ.
pub(crate) const DEVICE: &str = "bench";

/// How long one connection may take to reach `sync.done`. The first one after a
/// fresh start waits for Kafka consumer groups to form.
const SYNC_PATIENCE: Duration = Duration::from_secs(60);

pub(crate) struct Target {
    pub run_id: String,
    pub http_base: String,
    pub http: reqwest::Client,
    addr: SocketAddr,
    ws_url: String,
    secret: String,
    /// Source address per connection, round robin; `None` lets the kernel pick.
    sources: Vec<Option<IpAddr>>,
}

impl Target {
    pub async fn new(args: &crate::BenchArgs) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(&args.url).with_context(|| format!("--url {}", args.url))?;
        if url.scheme() != "http" {
            bail!("--url must be http://host:port (TLS is not supported yet)");
        }
        let host = url.host_str().context("--url has no host")?.to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} resolves to nothing"))?;
        let sources = if args.source_ips <= 1 {
            vec![None]
        } else {
            if !addr.ip().is_loopback() || !addr.is_ipv4() {
                bail!("--source-ips > 1 needs an IPv4 loopback --url, not {addr}");
            }
            (1..=args.source_ips)
                .map(|n| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))))
                .collect()
        };
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let http_base = match &args.rest_url {
            Some(rest) => rest.trim_end_matches('/').to_owned(),
            None => format!("http://{authority}"),
        };
        Ok(Self {
            run_id: ulid::Ulid::new().to_string()[20..].to_lowercase(),
            http_base,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()?,
            addr,
            ws_url: format!("ws://{authority}/v1/ws"),
            secret: args.secret.clone(),
            sources,
        })
    }

    /// The user id of simulated device `i`.
    pub fn user(&self, i: usize) -> String {
        format!("bench-{}-u{i}", self.run_id)
    }

    pub fn token(&self, i: usize) -> String {
        let user = UserId::parse(self.user(i)).expect("bench user ids are valid");
        let device = DeviceId::parse(DEVICE).expect("bench device id is valid");
        dak_runtime::auth::mint(&self.secret, &user, &device, Duration::from_secs(24 * 3600))
    }

    /// Opens device `i`'s socket and reads until `sync.done`; returns the socket
    /// and whatever came before `sync.done` (the replayed inbox).
    pub async fn connect(&self, i: usize) -> anyhow::Result<(Ws, Vec<Frame>)> {
        let source = self.sources[i % self.sources.len()];
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding {ip}"))?;
        }
        let stream = socket
            .connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let mut request = self.ws_url.as_str().into_client_request()?;
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.token(i)).parse()?,
        );
        // A small read buffer: tungstenite zero-fills all of it on every read,
        // and the default 128 KiB per socket would cap how many sockets one
        // generator holds.
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .context("websocket upgrade")?;
        let mut replayed = Vec::new();
        let deadline = tokio::time::Instant::now() + SYNC_PATIENCE;
        loop {
            let next = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| anyhow::anyhow!("no sync.done within {SYNC_PATIENCE:?}"))?;
            match next {
                None => bail!("socket closed before sync.done"),
                Some(Err(e)) => bail!("socket failed before sync.done: {e}"),
                Some(Ok(message)) => match Frame::parse(&message) {
                    Some(frame) if frame.kind == "sync.done" => return Ok((ws, replayed)),
                    Some(frame) if frame.kind == "error" => {
                        bail!("refused: {}", frame.message.unwrap_or_default())
                    }
                    Some(frame) => replayed.push(frame),
                    None => {}
                },
            }
        }
    }
}

/// The fields of a server frame the bench looks at.
#[derive(Debug, Deserialize)]
pub(crate) struct Frame {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub mid: Option<String>,
    /// A receipt's own id, which acks it.
    #[serde(default)]
    pub rid: Option<String>,
    /// A receipt's state: `delivered` or `read`.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub body: Option<Probe>,
    /// Set on a group's system notice (which has no body).
    #[serde(default)]
    pub system: Option<serde_json::Value>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// The body every bench message carries.
#[derive(Debug, Deserialize)]
pub(crate) struct Probe {
    pub seq: u64,
    pub sent_ns: u64,
}

impl Frame {
    /// A text frame as JSON; `None` for pings, pongs and closes.
    pub fn parse(message: &Message) -> Option<Frame> {
        match message {
            Message::Text(text) => serde_json::from_str(text.as_str()).ok(),
            _ => None,
        }
    }
}

/// The message frame for `seq` (`chat` is `direct` or `group`), stamped with
/// the time it is sent.
pub(crate) fn message_frame(to: &str, chat: &str, seq: u64) -> Message {
    let text = format!(
        r#"{{"type":"message","id":"{seq}","to":"{to}","chat":"{chat}","body":{{"seq":{seq},"sent_ns":{}}}}}"#,
        crate::measure::now_ns()
    );
    Message::Text(text.into())
}

pub(crate) fn ack_frame(mids: &[String]) -> Message {
    Message::Text(
        serde_json::json!({"type": "ack", "mids": mids})
            .to_string()
            .into(),
    )
}
