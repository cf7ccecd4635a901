//! A socket's outgoing queue, bounded both in frames and in bytes: a client
//! that stops reading holds at most `max_bytes` of frames in the gateway
//! (plus the one being written), however large they are. When the queue is
//! full, `/internal/v1/send` answers `busy` and the sender retries later
//! (session at its ack deadline, persistence's replay after a pause); a
//! socket whose writes stay stuck is closed by its own task (see
//! `connection`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// The sending side, held by the registry.
#[derive(Clone)]
pub struct Outbox {
    frames: mpsc::Sender<Utf8Bytes>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The receiving side, held by the socket's task.
pub struct OutboxReceiver {
    frames: mpsc::Receiver<Utf8Bytes>,
    bytes: Arc<AtomicUsize>,
}

pub fn outbox(max_frames: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::channel(max_frames.max(1));
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        Outbox {
            frames: tx,
            bytes: bytes.clone(),
            max_bytes,
        },
        OutboxReceiver { frames: rx, bytes },
    )
}

impl Outbox {
    /// Queues `frame` unless the queue is full, in frames or in bytes. An
    /// empty queue takes any one frame, so a frame larger than the byte
    /// limit is delayed, never refused for good.
    pub fn try_send(&self, frame: Utf8Bytes) -> Result<(), TrySendError<Utf8Bytes>> {
        let len = frame.len();
        let before = self.bytes.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > self.max_bytes {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(TrySendError::Full(frame));
        }
        self.frames.try_send(frame).inspect_err(|_| {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
        })
    }
}

impl OutboxReceiver {
    /// The next frame; cancel-safe.
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        let frame = self.frames.recv().await?;
        self.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// The next frame if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        let frame = self.frames.try_recv().ok()?;
        self.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Utf8Bytes {
        "x".repeat(len).into()
    }

    #[tokio::test]
    async fn bounded_in_bytes_and_in_frames() {
        let (tx, mut rx) = outbox(100, 1000);
        for _ in 0..3 {
            tx.try_send(frame(300)).unwrap();
        }
        assert!(matches!(
            tx.try_send(frame(300)),
            Err(TrySendError::Full(_))
        ));
        tx.try_send(frame(100)).unwrap();
        assert!(matches!(tx.try_send(frame(1)), Err(TrySendError::Full(_))));
        // Taking a frame out makes room for as many bytes.
        assert_eq!(rx.recv().await.unwrap().len(), 300);
        tx.try_send(frame(300)).unwrap();

        let (tx, _rx) = outbox(2, 1000);
        tx.try_send(frame(1)).unwrap();
        tx.try_send(frame(1)).unwrap();
        assert!(matches!(tx.try_send(frame(1)), Err(TrySendError::Full(_))));
    }

    #[tokio::test]
    async fn frames_taken_without_waiting_come_in_order_and_free_their_bytes() {
        let (tx, mut rx) = outbox(100, 1000);
        assert!(rx.try_recv().is_none());
        tx.try_send("a".into()).unwrap();
        tx.try_send("bb".into()).unwrap();
        assert_eq!(rx.try_recv().unwrap().as_str(), "a");
        assert_eq!(rx.recv().await.unwrap().as_str(), "bb");
        assert!(rx.try_recv().is_none());
        assert_eq!(tx.bytes.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_limit_goes_alone() {
        let (tx, mut rx) = outbox(100, 1000);
        tx.try_send(frame(5000)).unwrap();
        assert!(matches!(tx.try_send(frame(1)), Err(TrySendError::Full(_))));
        rx.recv().await.unwrap();
        tx.try_send(frame(1)).unwrap();
    }

    #[tokio::test]
    async fn a_closed_socket_is_reported_and_its_bytes_not_counted() {
        let (tx, rx) = outbox(100, 1000);
        drop(rx);
        assert!(matches!(
            tx.try_send(frame(10)),
            Err(TrySendError::Closed(_))
        ));
        assert_eq!(tx.bytes.load(Ordering::Acquire), 0);
    }
}
