//! The registry node: user → device → (gateway, connection), each entry held by a lease
//! its gateway renews, as in a Redis-style connection registry (seed 001's "user
//! connection cache").
//!
//! What it promises, and what it does not:
//! - A gateway that stops renewing (it crashed, or it is cut off) keeps its entries until
//!   their lease expires: lookups in that window return *stale* entries. Delivery must not
//!   depend on them being fresh: the chat shard writes the inbox first, then routes.
//! - A gateway that restarts comes back with a higher epoch; its first renewal or
//!   registration drops every entry of its older epochs, and a registration carrying an
//!   older epoch than the gateway's latest is refused (fencing a zombie).
//! - Bounded: at most `max_entries` devices are registered; past that a registration is
//!   refused rather than growing without limit.

use crate::ids::{ConnId, DeviceId, GatewayId, Millis, UserId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A message to the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RegistryMsg {
    /// `device` of `user` is connected on `gateway` as `conn` (the gateway at `epoch`).
    Register {
        user: UserId,
        device: DeviceId,
        gateway: GatewayId,
        epoch: u64,
        conn: ConnId,
    },
    /// The connection closed: forget the entry if it is still this connection's.
    Unregister {
        user: UserId,
        device: DeviceId,
        conn: ConnId,
    },
    /// `gateway` at `epoch` is alive: extend the lease of every entry it holds.
    Renew { gateway: GatewayId, epoch: u64 },
    /// Where are `users`' devices? `id` is echoed in the answer.
    Lookup { id: u64, users: Vec<UserId> },
}

/// One device's entry, as a lookup returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub user: UserId,
    pub device: DeviceId,
    pub gateway: GatewayId,
    pub conn: ConnId,
    /// When the lease runs out unless renewed.
    pub expires: Millis,
}

/// The registry's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RegistryReply {
    Registered,
    /// A registration from an epoch older than the gateway's latest, or past the bound.
    Refused {
        reason: String,
    },
    /// Leases extended for this many entries.
    Renewed {
        entries: usize,
    },
    /// Every unexpired entry of the users asked for, in (user, device) order.
    Routes {
        id: u64,
        routes: Vec<Route>,
    },
    /// An unregister or a lookup needs no other answer.
    Done,
}

#[derive(Clone, Debug)]
struct Entry {
    gateway: GatewayId,
    epoch: u64,
    conn: ConnId,
    expires: Millis,
}

/// The registry's state.
#[derive(Debug)]
pub struct Registry {
    lease_ms: u64,
    max_entries: usize,
    entries: BTreeMap<(UserId, DeviceId), Entry>,
    /// Latest epoch seen from each gateway.
    epochs: BTreeMap<GatewayId, u64>,
}

impl Registry {
    /// An empty registry whose leases last `lease_ms`, holding at most `max_entries`.
    pub fn new(lease_ms: u64, max_entries: usize) -> Self {
        Registry {
            lease_ms,
            max_entries,
            entries: BTreeMap::new(),
            epochs: BTreeMap::new(),
        }
    }

    /// Entries held now (expired ones included until the next purge).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records `epoch` for `gateway`; false when it is older than the latest seen. A newer
    /// epoch drops every entry of the gateway's older ones (their connections died with it).
    fn fence(&mut self, gateway: &GatewayId, epoch: u64) -> bool {
        let latest = self.epochs.get(gateway).copied().unwrap_or(0);
        if epoch < latest {
            return false;
        }
        if epoch > latest {
            self.epochs.insert(gateway.clone(), epoch);
            self.entries
                .retain(|_, e| &e.gateway != gateway || e.epoch >= epoch);
        }
        true
    }

    /// Drops every entry whose lease ran out by `now`.
    pub fn purge(&mut self, now: Millis) {
        self.entries.retain(|_, e| e.expires > now);
    }

    /// Handles one message at `now`.
    pub fn handle(&mut self, msg: RegistryMsg, now: Millis) -> RegistryReply {
        match msg {
            RegistryMsg::Register {
                user,
                device,
                gateway,
                epoch,
                conn,
            } => {
                if !self.fence(&gateway, epoch) {
                    return RegistryReply::Refused {
                        reason: format!("gateway {gateway} epoch {epoch} is older than its latest"),
                    };
                }
                let key = (user, device);
                if !self.entries.contains_key(&key) && self.entries.len() >= self.max_entries {
                    self.purge(now);
                    if self.entries.len() >= self.max_entries {
                        return RegistryReply::Refused {
                            reason: format!("registry full ({} entries)", self.max_entries),
                        };
                    }
                }
                // The newest connection of a device wins, wherever it is.
                self.entries.insert(
                    key,
                    Entry {
                        gateway,
                        epoch,
                        conn,
                        expires: now.plus(self.lease_ms),
                    },
                );
                RegistryReply::Registered
            }
            RegistryMsg::Unregister { user, device, conn } => {
                let key = (user, device);
                if self.entries.get(&key).is_some_and(|e| e.conn == conn) {
                    self.entries.remove(&key);
                }
                RegistryReply::Done
            }
            RegistryMsg::Renew { gateway, epoch } => {
                if !self.fence(&gateway, epoch) {
                    return RegistryReply::Refused {
                        reason: format!("gateway {gateway} epoch {epoch} is older than its latest"),
                    };
                }
                let until = now.plus(self.lease_ms);
                let mut n = 0;
                for e in self.entries.values_mut() {
                    if e.gateway == gateway && e.epoch == epoch && e.expires > now {
                        e.expires = until;
                        n += 1;
                    }
                }
                RegistryReply::Renewed { entries: n }
            }
            RegistryMsg::Lookup { id, users } => {
                let mut routes = Vec::new();
                let mut users = users;
                users.sort();
                users.dedup();
                for u in &users {
                    let from = (u.clone(), DeviceId(String::new()));
                    for ((user, device), e) in self.entries.range(from..) {
                        if user != u {
                            break;
                        }
                        if e.expires > now {
                            routes.push(Route {
                                user: user.clone(),
                                device: device.clone(),
                                gateway: e.gateway.clone(),
                                conn: e.conn,
                                expires: e.expires,
                            });
                        }
                    }
                }
                RegistryReply::Routes { id, routes }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(
        r: &mut Registry,
        user: &str,
        device: &str,
        gw: &str,
        epoch: u64,
        conn: u64,
        now: u64,
    ) -> RegistryReply {
        r.handle(
            RegistryMsg::Register {
                user: user.into(),
                device: device.into(),
                gateway: gw.into(),
                epoch,
                conn: ConnId(conn),
            },
            Millis(now),
        )
    }

    fn gateways(r: &mut Registry, user: &str, now: u64) -> Vec<String> {
        match r.handle(
            RegistryMsg::Lookup {
                id: 1,
                users: vec![user.into()],
            },
            Millis(now),
        ) {
            RegistryReply::Routes { routes, .. } => routes
                .into_iter()
                .map(|r| format!("{}@{}", r.device, r.gateway))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_crashed_gateways_entries_stay_stale_until_their_lease_expires() {
        let mut r = Registry::new(10_000, 100);
        reg(&mut r, "bob", "phone", "gw-0", 1, 7, 0);
        reg(&mut r, "bob", "laptop", "gw-1", 1, 8, 0);
        // gw-1 keeps renewing; gw-0 crashed and says nothing.
        assert_eq!(
            r.handle(
                RegistryMsg::Renew {
                    gateway: "gw-1".into(),
                    epoch: 1
                },
                Millis(9_000)
            ),
            RegistryReply::Renewed { entries: 1 }
        );
        // Within the lease the dead gateway's entry is still returned (stale, by design).
        assert_eq!(
            gateways(&mut r, "bob", 9_999),
            ["laptop@gw-1", "phone@gw-0"]
        );
        // After it, only the renewed one.
        assert_eq!(gateways(&mut r, "bob", 10_000), ["laptop@gw-1"]);
        r.purge(Millis(10_000));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_restarted_gateway_fences_its_older_epoch() {
        let mut r = Registry::new(10_000, 100);
        reg(&mut r, "bob", "phone", "gw-0", 1, 7, 0);
        reg(&mut r, "amy", "phone", "gw-0", 1, 8, 0);
        // gw-0 restarts with epoch 2: its old connections died with it.
        assert_eq!(
            reg(&mut r, "bob", "phone", "gw-0", 2, 1, 100),
            RegistryReply::Registered
        );
        assert_eq!(gateways(&mut r, "amy", 200), Vec::<String>::new());
        // A zombie of epoch 1 can no longer register or renew.
        assert!(matches!(
            reg(&mut r, "amy", "phone", "gw-0", 1, 9, 300),
            RegistryReply::Refused { .. }
        ));
        assert!(matches!(
            r.handle(
                RegistryMsg::Renew {
                    gateway: "gw-0".into(),
                    epoch: 1
                },
                Millis(300)
            ),
            RegistryReply::Refused { .. }
        ));
    }

    #[test]
    fn the_newest_connection_wins_and_an_old_close_does_not_remove_it() {
        let mut r = Registry::new(10_000, 100);
        reg(&mut r, "bob", "phone", "gw-0", 1, 7, 0);
        // The phone reconnects through another gateway before gw-0 saw the close.
        reg(&mut r, "bob", "phone", "gw-1", 1, 3, 50);
        r.handle(
            RegistryMsg::Unregister {
                user: "bob".into(),
                device: "phone".into(),
                conn: ConnId(7),
            },
            Millis(60),
        );
        assert_eq!(gateways(&mut r, "bob", 70), ["phone@gw-1"]);
    }

    #[test]
    fn registrations_past_the_bound_are_refused_after_a_purge() {
        let mut r = Registry::new(1_000, 2);
        reg(&mut r, "a", "d", "gw-0", 1, 1, 0);
        reg(&mut r, "b", "d", "gw-0", 1, 2, 0);
        assert!(matches!(
            reg(&mut r, "c", "d", "gw-0", 1, 3, 500),
            RegistryReply::Refused { .. }
        ));
        // Once the others' leases ran out, there is room again.
        assert_eq!(
            reg(&mut r, "c", "d", "gw-0", 1, 3, 1_000),
            RegistryReply::Registered
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = RegistryMsg::Lookup {
            id: 4,
            users: vec!["bob".into()],
        };
        let text = serde_json::to_string(&m).expect("json");
        assert_eq!(text, r#"{"type":"lookup","id":4,"users":["bob"]}"#);
        assert_eq!(serde_json::from_str::<RegistryMsg>(&text).expect("back"), m);
    }
}
