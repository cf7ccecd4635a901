//! The client side of the gateways' internal API: `POST /internal/v1/send`.
//! Session delivers through it, persistence replays.
//!
//! Every delivery gets an outcome of its own. A gateway that cannot be reached,
//! or answers with an error, yields `Busy` for what it was sent: the caller tries
//! again later, and never takes a failed request for a device that is gone (a
//! gateway that really died drops out of presence when its heartbeat expires).
//! A batch is split into requests of at most [`REQUEST_BYTES`], and a request
//! the gateway finds too large is split again, so a big batch is never refused
//! as a whole.
//!
//! In `dak up` the gateway runs in the same process: its sockets are reached
//! through [`LocalGateway`], with no HTTP request and no JSON, and with the
//! same outcomes per delivery.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use dak_wire::send::{SendItem, SendOutcome, SendResponse};
use dak_wire::{DeviceId, UserId};
use reqwest::StatusCode;

/// Frame bytes per request, below any sensible body limit of a gateway.
pub const REQUEST_BYTES: usize = 1024 * 1024;

/// Failed `/send` requests, by reason.
pub const SEND_FAILURES: &str = "dak_gateway_send_failures_total";

#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the request is larger than the gateway accepts")]
    TooLarge,
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("answered {got} results for {sent} deliveries")]
    Mismatch { sent: usize, got: usize },
}

/// [`SendRequest`], borrowed.
#[derive(serde::Serialize)]
struct Request<'a> {
    deliveries: &'a [SendItem],
}

/// What a gateway does with a batch of deliveries: one outcome per item, in
/// order, with a device's later frames refused `busy` once one of its frames
/// was not queued.
pub trait Sockets: Send + Sync + 'static {
    fn send(&self, items: &[SendItem]) -> Vec<SendOutcome>;
}

/// The gateway of this process and the internal URL presence knows it by.
#[derive(Clone)]
pub struct LocalGateway {
    pub url: String,
    pub sockets: Arc<dyn Sockets>,
}

#[derive(Clone)]
pub struct Gateways {
    http: reqwest::Client,
    token: String,
    request_bytes: usize,
    local: Option<LocalGateway>,
}

impl Gateways {
    pub fn new(token: String, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(16)
            .build()
            .expect("building the HTTP client");
        ::metrics::describe_counter!(
            SEND_FAILURES,
            "internal /send requests to a gateway that failed; their deliveries are retried"
        );
        Self {
            http,
            token,
            request_bytes: REQUEST_BYTES,
            local: None,
        }
    }

    /// Sends to `local` directly when a delivery is for its URL.
    pub fn with_local(mut self, local: Option<LocalGateway>) -> Self {
        self.local = local;
        self
    }

    /// Sends `items` to the gateway at `url`, returning one outcome per item, in
    /// order. Frames for one device keep their order: once one of them is not
    /// written, the later ones are not sent either and come back `Busy`.
    pub async fn send(&self, url: &str, items: Vec<SendItem>) -> Vec<SendOutcome> {
        if let Some(local) = self.local.as_ref().filter(|l| l.url == url) {
            return local.sockets.send(&items);
        }
        let mut outcomes = vec![SendOutcome::Busy; items.len()];
        let mut stalled: HashSet<(UserId, DeviceId)> = HashSet::new();
        let mut queue: VecDeque<Vec<(usize, SendItem)>> =
            chunks(items.into_iter().enumerate(), self.request_bytes).collect();
        while let Some(chunk) = queue.pop_front() {
            let chunk: Vec<(usize, SendItem)> = chunk
                .into_iter()
                .filter(|(_, item)| !stalled.contains(&(item.user.clone(), item.device.clone())))
                .collect();
            if chunk.is_empty() {
                continue;
            }
            let (indexes, items): (Vec<usize>, Vec<SendItem>) = chunk.into_iter().unzip();
            match self.request(url, &items).await {
                Ok(results) => {
                    for ((i, item), outcome) in indexes.into_iter().zip(items).zip(results) {
                        outcomes[i] = outcome;
                        if outcome != SendOutcome::Sent {
                            stalled.insert((item.user, item.device));
                        }
                    }
                }
                Err(RequestError::TooLarge) if items.len() > 1 => {
                    ::metrics::counter!(SEND_FAILURES, "reason" => "too_large").increment(1);
                    let mut first: Vec<(usize, SendItem)> =
                        indexes.into_iter().zip(items).collect();
                    let second = first.split_off(first.len() / 2);
                    queue.push_front(second);
                    queue.push_front(first);
                }
                Err(e) => {
                    let reason = match e {
                        RequestError::TooLarge => "too_large",
                        RequestError::Http(_) => "http",
                        RequestError::Mismatch { .. } => "mismatch",
                    };
                    ::metrics::counter!(SEND_FAILURES, "reason" => reason).increment(1);
                    tracing::warn!(gateway = url, error = %e, deliveries = outcomes.len(), "sending to a gateway failed; its deliveries will be retried");
                    // Everything not yet answered stays `Busy`.
                    break;
                }
            }
        }
        outcomes
    }

    async fn request(
        &self,
        url: &str,
        items: &[SendItem],
    ) -> Result<Vec<SendOutcome>, RequestError> {
        let response = self
            .http
            .post(format!("{url}/internal/v1/send"))
            .bearer_auth(&self.token)
            .json(&Request { deliveries: items })
            .send()
            .await?;
        if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Err(RequestError::TooLarge);
        }
        let response: SendResponse = response.error_for_status()?.json().await?;
        if response.results.len() != items.len() {
            return Err(RequestError::Mismatch {
                sent: items.len(),
                got: response.results.len(),
            });
        }
        Ok(response.results)
    }

    /// Sends every gateway's batch, the gateways concurrently.
    pub async fn send_all(
        &self,
        batches: HashMap<String, Vec<(usize, SendItem)>>,
    ) -> Vec<(usize, SendOutcome)> {
        let requests = batches.into_iter().map(|(url, batch)| async move {
            let (indexes, items): (Vec<usize>, Vec<SendItem>) = batch.into_iter().unzip();
            let outcomes = self.send(&url, items).await;
            indexes.into_iter().zip(outcomes).collect::<Vec<_>>()
        });
        futures_util::future::join_all(requests)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Consecutive runs of `items` whose frames add up to at most `bytes`, each
/// holding at least one item.
fn chunks(
    items: impl Iterator<Item = (usize, SendItem)>,
    bytes: usize,
) -> impl Iterator<Item = Vec<(usize, SendItem)>> {
    let mut items = items.peekable();
    std::iter::from_fn(move || {
        let first = items.next()?;
        let mut size = first.1.frame.get().len();
        let mut chunk = vec![first];
        while let Some(next) = items.peek() {
            size += next.1.frame.get().len();
            if size > bytes {
                break;
            }
            chunk.push(items.next().expect("peeked"));
        }
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::{Json, Router};
    use serde_json::value::RawValue;

    use dak_wire::send::SendRequest;

    use super::*;

    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn item(device: &str, frame_bytes: usize) -> SendItem {
        SendItem {
            user: UserId::parse("bob").unwrap(),
            device: DeviceId::parse(device).unwrap(),
            connection: None,
            frame: RawValue::from_string(format!("\"{}\"", "x".repeat(frame_bytes))).unwrap(),
        }
    }

    #[test]
    fn chunks_stay_under_the_budget_and_keep_order() {
        let items = (0..10).map(|i| (i, item("phone", 100)));
        let chunks: Vec<Vec<usize>> = chunks(items, 350)
            .map(|c| c.into_iter().map(|(i, _)| i).collect())
            .collect();
        assert_eq!(
            chunks,
            [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]
        );
        // An item larger than the budget still goes, alone.
        let big = chunks_of_sizes(&[10, 500, 10], 100);
        assert_eq!(big, [vec![0], vec![1], vec![2]]);
    }

    fn chunks_of_sizes(sizes: &[usize], budget: usize) -> Vec<Vec<usize>> {
        let items = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| (i, item("phone", *s)));
        chunks(items, budget)
            .map(|c| c.into_iter().map(|(i, _)| i).collect())
            .collect()
    }

    /// A gateway that takes at most `limit` body bytes, and answers `sent` for
    /// each delivery of what it takes.
    async fn gateway(limit: usize) -> (String, Arc<AtomicUsize>) {
        let taken = Arc::new(AtomicUsize::new(0));
        let app =
            Router::new()
                .route(
                    "/internal/v1/send",
                    post(
                        |State(taken): State<Arc<AtomicUsize>>,
                         Json(request): Json<SendRequest>| async move {
                            taken.fetch_add(request.deliveries.len(), Ordering::SeqCst);
                            Json(SendResponse {
                                results: vec![SendOutcome::Sent; request.deliveries.len()],
                            })
                        },
                    ),
                )
                .layer(axum::extract::DefaultBodyLimit::max(limit))
                .with_state(taken.clone());
        (serve(app).await, taken)
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_gateway_takes_is_split_not_refused() {
        let (url, taken) = gateway(64 * 1024).await;
        let gateways = Gateways::new("t".into(), Duration::from_secs(5));
        let items: Vec<SendItem> = (0..20).map(|_| item("phone", 20 * 1024)).collect();
        let outcomes = gateways.send(&url, items).await;
        assert_eq!(outcomes, vec![SendOutcome::Sent; 20]);
        assert_eq!(taken.load(Ordering::SeqCst), 20);
    }

    /// Sockets that answer `not_connected` for everything and count what
    /// they were given.
    struct Counted(AtomicUsize);

    impl Sockets for Counted {
        fn send(&self, items: &[SendItem]) -> Vec<SendOutcome> {
            self.0.fetch_add(items.len(), Ordering::SeqCst);
            vec![SendOutcome::NotConnected; items.len()]
        }
    }

    #[tokio::test]
    async fn the_gateway_of_this_process_is_sent_to_without_http() {
        let (remote, taken) = gateway(64 * 1024).await;
        let local = Arc::new(Counted(AtomicUsize::new(0)));
        // Nothing listens at the local URL: a request there would fail.
        let local_url = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let gateways =
            Gateways::new("t".into(), Duration::from_secs(5)).with_local(Some(LocalGateway {
                url: local_url.clone(),
                sockets: local.clone(),
            }));
        let outcomes = gateways
            .send(&local_url, vec![item("phone", 10), item("tablet", 10)])
            .await;
        assert_eq!(outcomes, vec![SendOutcome::NotConnected; 2]);
        assert_eq!(local.0.load(Ordering::SeqCst), 2);
        // Any other gateway still gets a request.
        let outcomes = gateways.send(&remote, vec![item("phone", 10)]).await;
        assert_eq!(outcomes, vec![SendOutcome::Sent]);
        assert_eq!(taken.load(Ordering::SeqCst), 1);
        assert_eq!(local.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_gateway_that_fails_yields_busy_not_gone() {
        let app = Router::new().route(
            "/internal/v1/send",
            post(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        );
        let failing = serve(app).await;
        // And one that is not there at all.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let gateways = Gateways::new("t".into(), Duration::from_secs(5));
        for url in [failing, closed] {
            let outcomes = gateways
                .send(&url, vec![item("phone", 10), item("tablet", 10)])
                .await;
            assert_eq!(outcomes, vec![SendOutcome::Busy; 2], "{url}");
        }
    }

    #[tokio::test]
    async fn after_a_device_stalls_its_later_frames_are_not_sent() {
        // The gateway refuses every frame for `phone` as busy and counts them;
        // `tablet` always fits.
        let phone_frames = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route(
                "/internal/v1/send",
                post(
                    |State(seen): State<Arc<AtomicUsize>>, Json(request): Json<SendRequest>| async move {
                        let results = request
                            .deliveries
                            .iter()
                            .map(|d| {
                                if d.device.as_str() == "phone" {
                                    seen.fetch_add(1, Ordering::SeqCst);
                                    SendOutcome::Busy
                                } else {
                                    SendOutcome::Sent
                                }
                            })
                            .collect();
                        Json(SendResponse { results })
                    },
                ),
            )
            .with_state(phone_frames.clone());
        let url = serve(app).await;
        let mut gateways = Gateways::new("t".into(), Duration::from_secs(5));
        // Two items per request.
        gateways.request_bytes = 30;
        let items = vec![
            item("phone", 10),
            item("tablet", 10),
            item("phone", 10),
            item("tablet", 10),
        ];
        let outcomes = gateways.send(&url, items).await;
        assert_eq!(
            outcomes,
            [
                SendOutcome::Busy,
                SendOutcome::Sent,
                SendOutcome::Busy,
                SendOutcome::Sent
            ]
        );
        assert_eq!(
            phone_frames.load(Ordering::SeqCst),
            1,
            "the second phone frame was sent"
        );
    }
}
