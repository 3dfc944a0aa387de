//! The user→gateway registry: which connections exist, which device each one speaks for,
//! and which gateway and region holds it.
//!
//! Seed 001's "user connection cache": routing a message means asking this registry for
//! the online devices of a user, wherever (whichever gateway, whichever region) they are.

use super::outbound::OutboundQueue;
use crate::ids::{ConnId, DeviceId, GatewayId, Millis, RegionId, UserId};
use std::collections::{BTreeMap, BTreeSet};

/// Who a connection speaks for, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user: UserId,
    pub device: DeviceId,
    pub session_id: String,
}

/// One open connection.
#[derive(Debug)]
pub struct Conn {
    pub gateway: GatewayId,
    pub opened_at: Millis,
    /// Last frame of any kind from the client (heartbeats included).
    pub last_frame: Millis,
    pub session: Option<Session>,
    pub out: OutboundQueue,
    /// Users whose presence this connection follows.
    pub subscriptions: BTreeSet<UserId>,
}

/// A gateway and whether it is serving.
#[derive(Clone, Debug)]
pub struct Gateway {
    pub region: RegionId,
    pub up: bool,
}

/// Connections, devices and gateways. Ordered maps only: iteration order is part of the
/// simulator's determinism.
#[derive(Debug, Default)]
pub struct Registry {
    pub conns: BTreeMap<ConnId, Conn>,
    pub by_device: BTreeMap<(UserId, DeviceId), ConnId>,
    pub gateways: BTreeMap<GatewayId, Gateway>,
    next_conn: u64,
}

impl Registry {
    /// A fresh connection id.
    pub fn next_id(&mut self) -> ConnId {
        self.next_conn += 1;
        ConnId(self.next_conn)
    }

    /// The last connection id handed out.
    pub fn last_id(&self) -> u64 {
        self.next_conn
    }

    /// Hands out ids above `last` from now on (a restarted core must never reuse an id a
    /// connection task of the crashed one may still present).
    pub fn continue_after(&mut self, last: u64) {
        self.next_conn = self.next_conn.max(last);
    }

    /// Online connections of `user`, in device order.
    pub fn user_conns(&self, user: &UserId) -> Vec<(DeviceId, ConnId)> {
        self.by_device
            .range((user.clone(), DeviceId(String::new()))..)
            .take_while(|((u, _), _)| u == user)
            .map(|((_, d), c)| (d.clone(), *c))
            .collect()
    }

    /// True when at least one device of `user` is connected and authenticated.
    pub fn is_online(&self, user: &UserId) -> bool {
        self.by_device
            .range((user.clone(), DeviceId(String::new()))..)
            .next()
            .is_some_and(|((u, _), _)| u == user)
    }

    /// The region of the gateway holding `conn`.
    pub fn region_of(&self, conn: ConnId) -> Option<&RegionId> {
        let gw = &self.conns.get(&conn)?.gateway;
        self.gateways.get(gw).map(|g| &g.region)
    }

    /// Regions with at least one gateway up, in order.
    pub fn healthy_regions(&self) -> Vec<RegionId> {
        let mut set = BTreeSet::new();
        for g in self.gateways.values().filter(|g| g.up) {
            set.insert(g.region.clone());
        }
        set.into_iter().collect()
    }
}
