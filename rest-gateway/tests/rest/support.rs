//! A rest-gateway on `127.0.0.1:0` with the embedded bus in a temp dir, and
//! a minimal HTTP/1.1 client on raw sockets, so tests control every byte.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dak_runtime::auth::{self, Verifier};
use dak_runtime::bus::{Bus, Log, LogOptions, Topics};
use dak_runtime::dedup::MemoryDedup;
use dak_runtime::http::ConnectionLimits;
use dak_runtime::ingress::Ingress;
use dak_runtime::presence::MemoryPresence;
use dak_runtime::shutdown::Shutdown;
use dak_wire::{DeviceId, UserId};
use rest_gateway::rate::RateLimit;
use rest_gateway::RestGateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const SECRET: &str = "rest-test-secret";

pub struct Rest {
    pub addr: SocketAddr,
    pub log: Log,
    pub bus: Bus,
    pub presence: Arc<MemoryPresence>,
    _shutdown: DropCancels,
    _dir: tempfile::TempDir,
}

struct DropCancels(Shutdown);

impl Drop for DropCancels {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Rest {
    pub async fn start() -> Self {
        Self::with_rate_limit(RateLimit {
            per_second: 0,
            max_users: 1,
        })
        .await
    }

    pub async fn with_rate_limit(rate: RateLimit) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&dir.path().join("bus.db"), LogOptions::default()).unwrap();
        let bus = Bus::log(log.clone(), Topics::with_prefix(""));
        bus.create_topics().await.unwrap();
        let ingress = Ingress::new(
            bus.producer().unwrap(),
            bus.topics().inbound.clone(),
            Arc::new(MemoryDedup::new(Duration::from_secs(60))),
        );
        let presence = Arc::new(MemoryPresence::default());
        let gateway = RestGateway::new(
            rate,
            Verifier::hs256(SECRET),
            ingress,
            dak_wire::Limits::default(),
            presence.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        tokio::spawn(dak_runtime::http::serve(
            listener,
            gateway.router(),
            ConnectionLimits::default(),
            shutdown.clone(),
        ));
        Self {
            addr,
            log,
            bus,
            presence,
            _shutdown: DropCancels(shutdown),
            _dir: dir,
        }
    }

    /// Records on `dak.inbound` so far.
    pub fn inbound(&self) -> i64 {
        self.log.len(&self.bus.topics().inbound).unwrap()
    }
}

pub fn token(user: &str) -> String {
    auth::mint(
        SECRET,
        &UserId::parse(user).unwrap(),
        &DeviceId::parse("phone").unwrap(),
        Duration::from_secs(600),
    )
}

/// An answer: status, headers (lowercase names) and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }

    pub fn error_message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }
}

/// Sends request headers and then as much of the body as given, which may
/// be less than `Content-Length` says.
pub async fn send_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    content_length: usize,
    body: &[u8],
) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: dak\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {content_length}\r\nConnection: close\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(body).await.unwrap();
    socket
}

/// Reads one answer (the server closes the connection after it).
pub async fn read_answer(socket: &mut TcpStream) -> Answer {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = socket.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(answer) = parse_answer(&raw) {
            return answer;
        }
    }
    parse_answer(&raw).unwrap_or_else(|| panic!("no answer: {:?}", String::from_utf8_lossy(&raw)))
}

fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let text = std::str::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())?;
    if body.len() < length {
        return None;
    }
    let body = serde_json::from_str(&body[..length]).unwrap_or(serde_json::Value::Null);
    Some(Answer {
        status,
        headers,
        body,
    })
}

/// A whole request and its answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &[u8],
) -> Answer {
    let mut socket = send_head(addr, method, path, token, body.len(), body).await;
    read_answer(&mut socket).await
}
