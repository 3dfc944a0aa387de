//! The reference model the oracle judges against: what the design promises each device,
//! built only from the plan and from what phones did and saw (taps, acks, links, the
//! admin's membership requests and the `group_update`s it received), never from the
//! server's own counters or state.
//!
//! The promises:
//! - an acked 1:1 message reaches every device of both users;
//! - an acked group message reaches every device of every member at creation, except
//!   users removed from the group during the run (they are promised nothing more of it),
//!   and reaches users added during the run if it was tapped after the admin saw the add;
//! - a device linked during the run gets every message tapped after its first login;
//! - a device whose unlink was asked for is promised nothing more (only its own sends,
//!   which it shows from their ack on), and once its user saw the unlink answered it must
//!   show nothing tapped later.

use crate::ledger::{DeviceKey, Ledger};
use crate::plan::{Plan, Target};
use std::collections::BTreeMap;

/// A user's membership of one group over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Member from creation to the end.
    Always,
    /// Never a member.
    Never,
    /// Added: requested at `requested`, seen done at `confirmed` (if ever).
    Added {
        requested: Option<u64>,
        confirmed: Option<u64>,
    },
    /// Removed: requested at `requested`, seen done at `confirmed` (if ever).
    Removed {
        requested: Option<u64>,
        confirmed: Option<u64>,
    },
}

/// What the design promises, per send and device.
pub struct Reference<'a> {
    plan: &'a Plan,
    ledger: &'a Ledger,
    /// (group, user) -> membership, for users touched by a change.
    changes: BTreeMap<(usize, usize), Membership>,
}

impl<'a> Reference<'a> {
    pub fn new(plan: &'a Plan, ledger: &'a Ledger) -> Self {
        let mut changes = BTreeMap::new();
        for (i, c) in plan.membership.iter().enumerate() {
            let log = ledger.membership.get(i).cloned().unwrap_or_default();
            let (requested, confirmed) = (log.requested_ms, log.confirmed_ms);
            changes.insert(
                (c.group, c.user),
                if c.op == "add" {
                    Membership::Added {
                        requested,
                        confirmed,
                    }
                } else {
                    Membership::Removed {
                        requested,
                        confirmed,
                    }
                },
            );
        }
        Reference {
            plan,
            ledger,
            changes,
        }
    }

    /// `user`'s membership of group `g`.
    pub fn membership(&self, g: usize, user: usize) -> Membership {
        if let Some(m) = self.changes.get(&(g, user)) {
            return *m;
        }
        if self.plan.groups[g].members.contains(&user) {
            Membership::Always
        } else {
            Membership::Never
        }
    }

    /// When device `k` joined its account: 0 for devices linked before the run, the first
    /// login for devices linked during it, `None` if it never logged in.
    pub fn linked_at(&self, k: DeviceKey) -> Option<u64> {
        if self.plan.links.contains_key(&k) {
            self.ledger.devices.get(&k).and_then(|d| d.linked_ms)
        } else {
            Some(0)
        }
    }

    /// Was device `k` asked to be unlinked during the run (whether or not it happened)?
    pub fn unlink_asked(&self, k: DeviceKey) -> bool {
        self.ledger
            .unlinks
            .get(&k)
            .is_some_and(|u| u.requested_ms.is_some())
    }

    /// When the user of device `k` saw its unlink answered: from then on the server holds
    /// it unlinked.
    pub fn unlinked_at(&self, k: DeviceKey) -> Option<u64> {
        self.ledger.unlinks.get(&k).and_then(|u| u.confirmed_ms)
    }

    /// Must device `k` show send `i` (acked or not)?
    pub fn required(&self, i: usize, k: DeviceKey) -> bool {
        let s = &self.plan.sends[i];
        if self.unlink_asked(k) && k != (s.user, s.device) {
            return false;
        }
        let Some(linked) = self.linked_at(k) else {
            return false;
        };
        if s.at_ms < linked {
            return false;
        }
        let user = k.0;
        if k == (s.user, s.device) {
            return true; // the sending device shows its own message from the ack on
        }
        match s.target {
            Target::User(to) => user == to || user == s.user,
            Target::Group(g) => match self.membership(g, user) {
                Membership::Always => true,
                Membership::Never | Membership::Removed { .. } => false,
                Membership::Added { confirmed, .. } => confirmed.is_some_and(|c| s.at_ms >= c),
            },
        }
    }

    /// Does device `k` take part in the conversation of send `i` from its first message on
    /// (so it must end with seq 1..n)? Otherwise its promise starts later (see `required`).
    pub fn from_the_start(&self, i: usize, k: DeviceKey) -> bool {
        if self.linked_at(k) != Some(0) || self.unlink_asked(k) {
            return false;
        }
        let s = &self.plan.sends[i];
        match s.target {
            Target::User(to) => k.0 == to || k.0 == s.user,
            Target::Group(g) => self.membership(g, k.0) == Membership::Always,
        }
    }

    /// Users who may take part in the conversation of send `i` at some time.
    pub fn participants(&self, i: usize) -> Vec<usize> {
        let s = &self.plan.sends[i];
        match s.target {
            Target::User(to) => vec![s.user.min(to), s.user.max(to)],
            Target::Group(g) => (0..self.plan.users)
                .filter(|u| self.membership(g, *u) != Membership::Never)
                .collect(),
        }
    }
}
