//! Presence: online/offline and last seen, told to subscribers as it changes.
//!
//! A user is online while any of their devices holds an authenticated connection; the
//! connection is closed after `presence_timeout_ms` without a frame (seed 000: heartbeat
//! every 30 s, offline after 60 s). `last_seen` is when the last device went away, hidden
//! from everyone when the user asks.

use crate::ids::{ConnId, Millis, UserId};
use std::collections::{BTreeMap, BTreeSet};

/// Presence state kept in memory (volatile: after a restart everyone is offline and
/// `last_seen` is unknown until they come back).
#[derive(Debug, Default)]
pub struct Presence {
    pub last_seen: BTreeMap<UserId, Millis>,
    /// user -> connections subscribed to their presence.
    pub subscribers: BTreeMap<UserId, BTreeSet<ConnId>>,
}

impl Presence {
    /// Records that `conn` follows `user`.
    pub fn subscribe(&mut self, conn: ConnId, user: &UserId) {
        self.subscribers
            .entry(user.clone())
            .or_default()
            .insert(conn);
    }

    /// Forgets every subscription of `conn`.
    pub fn drop_conn(&mut self, conn: ConnId, users: &BTreeSet<UserId>) {
        for u in users {
            if let Some(s) = self.subscribers.get_mut(u) {
                s.remove(&conn);
                if s.is_empty() {
                    self.subscribers.remove(u);
                }
            }
        }
    }

    /// Connections following `user`, in order.
    pub fn watchers(&self, user: &UserId) -> Vec<ConnId> {
        self.subscribers
            .get(user)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}
