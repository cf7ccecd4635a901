//! The fault-schedule soak: three users' devices send direct and group
//! messages through the separate services while a schedule SIGKILLs and
//! restarts, one after another, message-router, session, persistence,
//! group-router, ws-gateway, the Kafka broker and Redis. Devices behave as an
//! app does: an outbox that resends an id until it is accepted, a reconnect
//! (with its replay) whenever the socket drops, an ack for every message.
//!
//! At the end every accepted message is acked by the device of each of its
//! recipients or waits in that device's inbox (0 lost), each (sender, id) was
//! accepted under one mid only, and a message that arrived twice arrived under
//! the mid it was accepted with.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::support::{rest_group, rest_sync_all, token, Process, Server, Services};

const USERS: [&str; 3] = ["alice", "bob", "carol"];
const GROUP: &str = "crew";
/// Messages each user sends: every third to the group, the rest to the next user.
const PER_USER: usize = 60;
/// A device releases one message from its outbox this often.
const PACE: Duration = Duration::from_millis(1000);
/// Sends a device keeps unanswered.
const WINDOW: usize = 16;
/// Between one fault and the next.
const STEP: Duration = Duration::from_secs(5);
const DOWNTIME: Duration = Duration::from_millis(1500);

/// What the devices saw, for the checks at the end.
#[derive(Default)]
struct Report {
    /// (sender, id) → mid, as `accepted` said.
    accepted: HashMap<(String, String), String>,
    /// (recipient, mid) → how many times it arrived.
    arrivals: HashMap<(String, String), usize>,
    /// (sender, id) as carried in the body → the mids it arrived under.
    arrived_as: HashMap<(String, String), HashSet<String>>,
    reconnects: usize,
    /// Sends answered `unavailable`, and sent again.
    refused: usize,
}

/// Who should get the message `id` that `from` sent.
fn recipients(from: &str, to: &str) -> Vec<String> {
    if to == GROUP {
        USERS
            .iter()
            .filter(|u| **u != from)
            .map(|u| u.to_string())
            .collect()
    } else {
        vec![to.to_owned()]
    }
}

fn plan(me: &str) -> Vec<(String, String)> {
    let i = USERS.iter().position(|u| *u == me).unwrap();
    let next = USERS[(i + 1) % USERS.len()];
    (0..PER_USER)
        .map(|n| {
            let to = if n % 3 == 2 { GROUP } else { next };
            (format!("{me}-{n}"), to.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_schedule_over_every_part_loses_nothing() {
    let mut kafka = Server::kafka().await;
    let mut redis = Server::redis().await;
    let services = Services::new(
        &kafka.brokers(),
        &[
            ("DAK_REDIS_URL", &redis.url()),
            ("DAK_WS_RATE_LIMIT", "0"),
            ("DAK_ACK_TIMEOUT", "2s"),
            ("DAK_DELIVERY_RETRIES", "3"),
            ("DAK_PRESENCE_TTL", "3s"),
            ("DAK_KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ],
    );
    let mut running: HashMap<&str, Process> = HashMap::new();
    running.insert(
        "message-router",
        services.start("message-router", &[]).await.0,
    );
    running.insert("session", services.start("session", &[]).await.0);
    let (persistence, sync) = services.start_persistence().await;
    running.insert("persistence", persistence);
    let (group_router, groups_api) = services.start_group_router().await;
    running.insert("group-router", group_router);
    let (rest_gateway, rest) = services.start_rest_gateway().await;
    running.insert("rest-gateway", rest_gateway);
    let (gateway, public) = services.start_ws_gateway().await;
    running.insert("ws-gateway", gateway);
    let (gateway_at, gateway_rx) = watch::channel(public);
    let (sync_at, sync_rx) = watch::channel(sync);

    // Everyone is in the group before the first message.
    let (status, answer) = rest_group(
        rest,
        "alice",
        "POST",
        "",
        Some(json!({"id": GROUP, "name": "Crew", "members": ["bob", "carol"]})),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = rest_group(groups_api, "carol", "GET", &format!("/{GROUP}"), None).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the group was not created");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let report: Arc<Mutex<Report>> = Default::default();
    let (schedule_done, schedule_rx) = watch::channel(false);
    let devices: Vec<_> = USERS
        .iter()
        .map(|me| {
            let (gateway, done, report) = (gateway_rx.clone(), schedule_rx.clone(), report.clone());
            tokio::spawn(device(me, gateway, done, report))
        })
        .collect();

    // The schedule: each part in turn, killed and started again.
    let parts = [
        "message-router",
        "session",
        "ws-gateway",
        "kafka",
        "persistence",
        "group-router",
        "redis",
        "rest-gateway",
    ];
    for part in parts {
        tokio::time::sleep(STEP).await;
        tracing::info!(part, "killing");
        match part {
            "kafka" => {
                kafka.kill();
                tokio::time::sleep(DOWNTIME).await;
                kafka.restart().await;
            }
            "redis" => {
                redis.kill();
                tokio::time::sleep(DOWNTIME).await;
                redis.restart().await;
            }
            service => {
                running.remove(service).expect("running").kill();
                tokio::time::sleep(DOWNTIME).await;
                let started = match service {
                    "persistence" => {
                        let (process, sync) = services.start_persistence().await;
                        sync_at.send_replace(sync);
                        process
                    }
                    "group-router" => services.start_group_router().await.0,
                    "rest-gateway" => services.start_rest_gateway().await.0,
                    "ws-gateway" => {
                        let (process, public) = services.start_ws_gateway().await;
                        gateway_at.send_replace(public);
                        process
                    }
                    other => services.start(other, &[]).await.0,
                };
                running.insert(service, started);
            }
        }
    }

    schedule_done.send_replace(true);
    for device in devices {
        tokio::time::timeout(Duration::from_secs(240), device)
            .await
            .expect("every device got every message accepted")
            .unwrap();
    }

    // Every accepted message reaches each recipient's device or its inbox.
    let sync = *sync_rx.borrow();
    let deadline = Instant::now() + Duration::from_secs(120);
    let missing = loop {
        let stored: HashSet<(String, String)> = {
            let mut stored = HashSet::new();
            for user in USERS {
                for m in rest_sync_all(sync, user, "default", 500).await {
                    stored.insert((user.to_owned(), m["mid"].as_str().unwrap().to_owned()));
                }
            }
            stored
        };
        let missing: Vec<(String, String)> = {
            let report = report.lock().unwrap();
            report
                .accepted
                .iter()
                .flat_map(|((from, id), mid)| {
                    let to = plan(from)
                        .into_iter()
                        .find(|(planned, _)| planned == id)
                        .map(|(_, to)| to)
                        .unwrap();
                    recipients(from, &to)
                        .into_iter()
                        .map(|user| (user, mid.clone()))
                        .collect::<Vec<_>>()
                })
                .filter(|key| !report.arrivals.contains_key(key) && !stored.contains(key))
                .collect()
        };
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let report = report.lock().unwrap();
    assert_eq!(report.accepted.len(), USERS.len() * PER_USER);
    assert!(missing.is_empty(), "lost: {missing:?}");
    for ((from, id), mids) in &report.arrived_as {
        let accepted = &report.accepted[&(from.clone(), id.clone())];
        assert_eq!(
            mids,
            &HashSet::from([accepted.clone()]),
            "{from}/{id} arrived under another mid than it was accepted with"
        );
    }
    // The ws-gateway's death dropped every device's socket.
    assert!(
        report.reconnects >= USERS.len(),
        "{} reconnects",
        report.reconnects
    );
    let repeats = report.arrivals.values().filter(|n| **n > 1).count();
    eprintln!(
        "soak: {} accepted, {} arrivals ({repeats} repeated), {} reconnects, {} sends refused",
        report.accepted.len(),
        report.arrivals.values().sum::<usize>(),
        report.reconnects,
        report.refused
    );
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, me: &str) -> Option<Socket> {
    let mut request = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(me, "default")).parse().unwrap(),
    );
    let connecting = tokio_tungstenite::connect_async(request);
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok((ws, _))) => Some(ws),
        _ => None,
    }
}

/// One user's device, as an app runs it, until each of its messages was
/// accepted and the fault schedule is over. It reads and acks all along.
async fn device(
    me: &'static str,
    gateway: watch::Receiver<SocketAddr>,
    schedule_done: watch::Receiver<bool>,
    report: Arc<Mutex<Report>>,
) {
    let plan = plan(me);
    let mut released = 0;
    let mut outbox: VecDeque<(String, String)> = VecDeque::new();
    let mut next_release = Instant::now();
    let mut first = true;
    loop {
        let addr = *gateway.borrow();
        let Some(ws) = connect(addr, me).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if !first {
            report.lock().unwrap().reconnects += 1;
        }
        first = false;
        let (mut sink, mut stream) = ws.split();
        // Sent on this socket and not answered yet: sent again after a reconnect.
        let mut unanswered: Vec<(String, String)> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let closed = loop {
            tokio::select! {
                frame = stream.next() => {
                    let text = match frame {
                        Some(Ok(WsMessage::Text(text))) => text,
                        Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break true,
                        Some(Ok(_)) => continue,
                    };
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                    let ack = handle(me, &frame, &mut unanswered, &mut outbox, &report);
                    if let Some(ack) = ack {
                        let ack = json!({"type": "ack", "mids": [ack]}).to_string();
                        if sink.send(WsMessage::Text(ack.into())).await.is_err() {
                            break true;
                        }
                    }
                }
                _ = tick.tick() => {
                    if released < plan.len() && Instant::now() >= next_release {
                        outbox.push_back(plan[released].clone());
                        released += 1;
                        next_release += PACE;
                    }
                    let mut failed = false;
                    while unanswered.len() < WINDOW {
                        let Some((id, to)) = outbox.pop_front() else { break };
                        let chat = if to == GROUP { "group" } else { "direct" };
                        let frame = json!({"type": "message", "id": id, "to": to, "chat": chat,
                            "body": {"from": me, "id": id}});
                        unanswered.push((id, to));
                        if sink.send(WsMessage::Text(frame.to_string().into())).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        break true;
                    }
                    let done = released == plan.len()
                        && outbox.is_empty()
                        && unanswered.is_empty()
                        && *schedule_done.borrow();
                    if done {
                        break false;
                    }
                }
            }
        };
        // What was not answered goes back to the front of the outbox, in order.
        for sent in unanswered.into_iter().rev() {
            outbox.push_front(sent);
        }
        if !closed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Handles one frame; returns what to ack.
fn handle(
    me: &str,
    frame: &Value,
    unanswered: &mut Vec<(String, String)>,
    outbox: &mut VecDeque<(String, String)>,
    report: &Mutex<Report>,
) -> Option<String> {
    match frame["type"].as_str() {
        Some("accepted") => {
            let id = frame["id"].as_str().unwrap().to_owned();
            let mid = frame["mid"].as_str().unwrap().to_owned();
            unanswered.retain(|(sent, _)| *sent != id);
            let mut report = report.lock().unwrap();
            if let Some(earlier) = report
                .accepted
                .insert((me.to_owned(), id.clone()), mid.clone())
            {
                assert_eq!(earlier, mid, "{me}/{id} accepted under two mids");
            }
            None
        }
        Some("error") => {
            assert_eq!(frame["code"], "unavailable", "{me} got {frame}");
            if let Some(id) = frame["id"].as_str() {
                if let Some(i) = unanswered.iter().position(|(sent, _)| sent == id) {
                    let again = unanswered.remove(i);
                    outbox.push_back(again);
                    report.lock().unwrap().refused += 1;
                }
            }
            None
        }
        Some("message") => {
            let mid = frame["mid"].as_str().unwrap().to_owned();
            if frame["body"].is_object() {
                let from = frame["body"]["from"].as_str().unwrap().to_owned();
                let id = frame["body"]["id"].as_str().unwrap().to_owned();
                let mut report = report.lock().unwrap();
                *report
                    .arrivals
                    .entry((me.to_owned(), mid.clone()))
                    .or_default() += 1;
                report
                    .arrived_as
                    .entry((from, id))
                    .or_default()
                    .insert(mid.clone());
            }
            Some(mid)
        }
        Some("receipt") => frame["rid"].as_str().map(str::to_owned),
        Some("rejected") => panic!("{me} got {frame}"),
        Some("sync.done") | Some("pong") => None,
        _ => panic!("{me} got {frame}"),
    }
}
