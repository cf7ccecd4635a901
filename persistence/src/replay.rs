//! Replays run apart from the consumer: the consumer writes the stores that came
//! before a replay request and hands the request here, then goes on with the
//! next records. Each device has a queue of its own, worked through in request
//! order by one task, so a socket that reads slowly delays only its own device,
//! and a connect storm runs many replays at once (their `replayed` events then
//! share the bus's group commits).
//!
//! A request for a connection already queued or replaying is not queued again.
//! Requests live in memory: a replay cut short by a crash is not resumed here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dak_runtime::bus::batch_retry_delay;
use dak_wire::event::Connected;
use dak_wire::{DeviceId, UserId};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::Shared;

/// Replays running at once, all devices together.
const CONCURRENT: usize = 1024;

/// Attempts at one replay whose inbox read or bus write fails.
const ATTEMPTS: u32 = 5;

pub(crate) const RUNNING: &str = "dak_replays_running";

type Device = (UserId, DeviceId);

pub(crate) struct Replays {
    queues: Mutex<HashMap<Device, VecDeque<Request>>>,
    slots: Semaphore,
    tasks: TaskTracker,
}

#[derive(Clone)]
struct Request {
    connected: Connected,
    gateway_url: String,
}

impl Default for Replays {
    fn default() -> Self {
        ::metrics::describe_gauge!(RUNNING, "devices with a replay queued or running");
        Self {
            queues: Mutex::default(),
            slots: Semaphore::new(CONCURRENT),
            tasks: TaskTracker::new(),
        }
    }
}

impl Replays {
    /// Queues a request; true if its device had no queue, so a task must start.
    fn push(&self, request: Request) -> bool {
        let device = (
            request.connected.user.clone(),
            request.connected.device.clone(),
        );
        let mut queues = self.queues.lock().expect("replay queues");
        match queues.get_mut(&device) {
            Some(queue) => {
                if !queue
                    .iter()
                    .any(|r| r.connected.connection == request.connected.connection)
                {
                    queue.push_back(request);
                }
                false
            }
            None => {
                queues.insert(device, VecDeque::from([request]));
                ::metrics::gauge!(RUNNING).set(queues.len() as f64);
                true
            }
        }
    }

    /// The request at the front of the device's queue. It stays queued while it
    /// runs, so a repeat of it is not queued behind it.
    fn front(&self, device: &Device) -> Option<Request> {
        let queues = self.queues.lock().expect("replay queues");
        queues.get(device).and_then(|q| q.front().cloned())
    }

    /// Takes the finished front request off; false once the queue is empty and
    /// gone.
    fn pop(&self, device: &Device) -> bool {
        let mut queues = self.queues.lock().expect("replay queues");
        let Some(queue) = queues.get_mut(device) else {
            return false;
        };
        queue.pop_front();
        if queue.is_empty() {
            queues.remove(device);
            ::metrics::gauge!(RUNNING).set(queues.len() as f64);
            return false;
        }
        true
    }

    /// Waits up to `grace` for the replays under way.
    pub(crate) async fn finish(&self, grace: Duration) {
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "replays still running at shutdown; their devices get a replay when they reconnect"
            );
        }
    }
}

impl Shared {
    /// Queues the replay of `connected`'s inbox behind earlier ones of its
    /// device, and returns at once.
    pub(crate) fn start_replay(self: &Arc<Self>, connected: Connected, gateway_url: String) {
        let device = (connected.user.clone(), connected.device.clone());
        if !self.replays.push(Request {
            connected,
            gateway_url,
        }) {
            return;
        }
        let shared = self.clone();
        self.replays
            .tasks
            .spawn(async move { shared.replay_device(device).await });
    }

    async fn replay_device(&self, device: Device) {
        while let Some(request) = self.replays.front(&device) {
            let _slot = self.replays.slots.acquire().await.expect("never closed");
            let mut attempt = 1;
            while let Err(e) = self.replay(&request.connected, &request.gateway_url).await {
                if attempt == ATTEMPTS {
                    tracing::error!(user = %device.0, device = %device.1, error = %format!("{e:#}"), "replay failed; the device gets its inbox when it reconnects");
                    break;
                }
                let delay = batch_retry_delay(attempt);
                tracing::warn!(user = %device.0, device = %device.1, error = %format!("{e:#}"), attempt, ?delay, "replay failed, retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            if !self.replays.pop(&device) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(device: &str, connection: &str) -> Request {
        Request {
            connected: Connected {
                user: UserId::parse("bob").unwrap(),
                device: DeviceId::parse(device).unwrap(),
                connection: connection.into(),
            },
            gateway_url: "http://gateway".into(),
        }
    }

    fn key(device: &str) -> Device {
        (
            UserId::parse("bob").unwrap(),
            DeviceId::parse(device).unwrap(),
        )
    }

    #[test]
    fn one_queue_per_device_in_request_order_without_repeats() {
        let replays = Replays::default();
        assert!(
            replays.push(request("phone", "c1")),
            "a new device starts a task"
        );
        assert!(!replays.push(request("phone", "c2")));
        assert!(
            !replays.push(request("phone", "c1")),
            "a repeat is not queued"
        );
        assert!(replays.push(request("tablet", "c3")));

        let phone = key("phone");
        assert_eq!(replays.front(&phone).unwrap().connected.connection, "c1");
        assert!(replays.pop(&phone));
        assert_eq!(replays.front(&phone).unwrap().connected.connection, "c2");
        assert!(!replays.pop(&phone), "the queue is empty and gone");
        assert!(replays.front(&phone).is_none());
        assert!(
            replays.push(request("phone", "c1")),
            "a later request starts anew"
        );
    }
}
