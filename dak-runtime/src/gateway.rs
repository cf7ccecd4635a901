//! The client side of the gateways' internal API: one `POST /internal/v1/send`
//! per gateway per batch. Session delivers through it, persistence replays.

use std::collections::HashMap;
use std::time::Duration;

use dak_wire::send::{SendItem, SendOutcome, SendRequest, SendResponse};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("gateway {url} answered {got} results for {sent} deliveries")]
    Mismatch {
        url: String,
        sent: usize,
        got: usize,
    },
}

#[derive(Clone)]
pub struct Gateways {
    http: reqwest::Client,
    token: String,
}

impl Gateways {
    pub fn new(token: String, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(16)
            .build()
            .expect("building the HTTP client");
        Self { http, token }
    }

    /// Sends `items` to the gateway at `url`, returning one outcome per item.
    pub async fn send(
        &self,
        url: &str,
        items: Vec<SendItem>,
    ) -> Result<Vec<SendOutcome>, GatewayError> {
        let sent = items.len();
        let http_error = |source| GatewayError::Http {
            url: url.to_owned(),
            source,
        };
        let response: SendResponse = self
            .http
            .post(format!("{url}/internal/v1/send"))
            .bearer_auth(&self.token)
            .json(&SendRequest { deliveries: items })
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(http_error)?
            .json()
            .await
            .map_err(http_error)?;
        if response.results.len() != sent {
            return Err(GatewayError::Mismatch {
                url: url.to_owned(),
                sent,
                got: response.results.len(),
            });
        }
        Ok(response.results)
    }

    /// Sends every batch concurrently; a gateway that cannot be reached yields
    /// `NotConnected` for all its items (the device will find the message in its
    /// inbox).
    pub async fn send_all(
        &self,
        batches: HashMap<String, Vec<(usize, SendItem)>>,
    ) -> Vec<(usize, SendOutcome)> {
        let requests = batches.into_iter().map(|(url, batch)| async move {
            let (indexes, items): (Vec<usize>, Vec<SendItem>) = batch.into_iter().unzip();
            let outcomes = match self.send(&url, items).await {
                Ok(outcomes) => outcomes,
                Err(e) => {
                    tracing::warn!(error = %e, "gateway unreachable, handing its deliveries to offline");
                    vec![SendOutcome::NotConnected; indexes.len()]
                }
            };
            indexes.into_iter().zip(outcomes).collect::<Vec<_>>()
        });
        futures_util::future::join_all(requests)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}
