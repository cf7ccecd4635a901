//! The sockets this gateway holds, by (user, device). A device has at most one:
//! a reconnect replaces (and closes) the older socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use dak_wire::{DeviceId, UserId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub type Key = (UserId, DeviceId);

#[derive(Clone)]
pub struct Handle {
    pub connection_id: String,
    pub frames: mpsc::Sender<Utf8Bytes>,
    /// Cancelled when a newer socket of the same device takes over.
    pub replaced: CancellationToken,
    /// `sync.done` went to this socket: its replay is over.
    pub synced: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Registry {
    sockets: Mutex<HashMap<Key, Handle>>,
}

impl Registry {
    /// Registers `handle`, closing whatever socket the device had before.
    pub fn insert(&self, key: Key, handle: Handle) {
        let old = self
            .sockets
            .lock()
            .expect("registry lock")
            .insert(key, handle);
        if let Some(old) = old {
            old.replaced.cancel();
        }
    }

    /// Removes the entry if it is still this connection's.
    pub fn remove(&self, key: &Key, connection_id: &str) {
        let mut sockets = self.sockets.lock().expect("registry lock");
        if sockets
            .get(key)
            .is_some_and(|h| h.connection_id == connection_id)
        {
            sockets.remove(key);
        }
    }

    /// The device's socket.
    pub fn get(&self, user: &UserId, device: &DeviceId) -> Option<Handle> {
        // Borrowed-key lookup would need a (str, str) key; ids are short, cloning is cheap.
        let key = (user.clone(), device.clone());
        let sockets = self.sockets.lock().expect("registry lock");
        sockets.get(&key).cloned()
    }

    /// Every socket held: who, its connection id, and whether it is synced.
    pub fn sockets(&self) -> Vec<(Key, String, bool)> {
        let sockets = self.sockets.lock().expect("registry lock");
        sockets
            .iter()
            .map(|(key, h)| {
                (
                    key.clone(),
                    h.connection_id.clone(),
                    h.synced.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Whether `connection_id` is still the device's socket.
    pub fn holds(&self, key: &Key, connection_id: &str) -> bool {
        let sockets = self.sockets.lock().expect("registry lock");
        sockets
            .get(key)
            .is_some_and(|h| h.connection_id == connection_id)
    }

    pub fn len(&self) -> usize {
        self.sockets.lock().expect("registry lock").len()
    }
}
