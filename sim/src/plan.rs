//! The deterministic plan of a run: users, devices, groups, every send and every fault,
//! drawn from the scenario and the seed before the simulation starts.
//!
//! Drawing everything up front (rather than inside client tasks) keeps the workload
//! identical however the network behaves, so two runs of a seed differ only if the
//! system under test does, and shrinking can remove sends and faults one by one.

use crate::scenario::{Fault, FaultKind, MembershipChange, Scenario};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Where a send goes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Target {
    User(usize),
    Group(usize),
}

/// One message a user will send.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlannedSend {
    pub at_ms: u64,
    pub user: usize,
    pub device: usize,
    pub target: Target,
    /// The client's idempotency key, the same on every retry.
    pub cmid: String,
    /// Size of the file it carries over the media lane (0: text only).
    #[serde(default)]
    pub media_bytes: u64,
}

/// A group created before the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedGroup {
    pub admin: usize,
    pub members: Vec<usize>,
    pub announcement_only: bool,
}

/// Everything a run will do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub users: usize,
    pub devices_per_user: usize,
    pub groups: Vec<PlannedGroup>,
    pub sends: Vec<PlannedSend>,
    pub faults: Vec<Fault>,
    /// Devices linked during the run: (user, device) -> when they first open the app.
    pub links: std::collections::BTreeMap<(usize, usize), u64>,
    /// Membership changes during the run, in scenario order.
    pub membership: Vec<MembershipChange>,
    /// Devices unlinked during the run: (user, device) -> (from when it is asked for,
    /// the asking device of the same user).
    pub unlinks: std::collections::BTreeMap<(usize, usize), (u64, usize)>,
}

/// Name of user `i`.
pub fn user_name(i: usize) -> String {
    format!("u{i}")
}

/// Name of device `d`.
pub fn device_name(d: usize) -> String {
    format!("d{d}")
}

impl Plan {
    /// Draws the plan of `sc` for `seed`.
    pub fn draw(sc: &Scenario, seed: u64) -> Plan {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_91a4);
        let w = &sc.workload;
        let n = w.users;
        let window = w.send_window_ms.unwrap_or([0, sc.duration_ms * 4 / 5]);
        let mut sends = Vec::new();
        let mut next_id = 0usize;
        let mut push = |rng: &mut SmallRng, user: usize, target: Target, media_bytes: u64| {
            let at_ms = rng.random_range(window[0]..=window[1].max(window[0]));
            let device = rng.random_range(0..w.devices_per_user);
            sends.push(PlannedSend {
                at_ms,
                user,
                device,
                target,
                cmid: format!("m{next_id}"),
                media_bytes,
            });
            next_id += 1;
        };
        for u in 0..n {
            let partners: Vec<usize> = match w.pattern.as_str() {
                "ring" => vec![(u + 1) % n],
                "star" | "one-way" if u == 0 => (1..n).collect(),
                "star" => vec![0],
                "one-way" => Vec::new(),
                _ => vec![if u % 2 == 0 { (u + 1) % n } else { u - 1 }],
            };
            for k in 0..w.messages_per_user {
                let Some(&p) = partners.get(k % partners.len().max(1)) else {
                    break;
                };
                if p != u {
                    push(&mut rng, u, Target::User(p), 0);
                }
            }
        }
        let mut groups = Vec::new();
        for (gi, g) in w.groups.iter().enumerate() {
            let mut members = match &g.members {
                Some(m) => m.clone(),
                None => {
                    let mut all: Vec<usize> = (0..n).collect();
                    // Partial Fisher-Yates: a seeded random subset of members.
                    for i in 0..g.size {
                        let j = rng.random_range(i..n);
                        all.swap(i, j);
                    }
                    all[..g.size].to_vec()
                }
            };
            members.sort_unstable();
            members.dedup();
            let admin = members[0];
            for k in 0..g.messages {
                let from = if g.announcement_only {
                    admin
                } else if g.round_robin {
                    members[k % members.len()]
                } else {
                    members[rng.random_range(0..members.len())]
                };
                let media = if k < g.media_messages {
                    g.media_bytes
                } else {
                    0
                };
                push(&mut rng, from, Target::Group(gi), media);
            }
            groups.push(PlannedGroup {
                admin,
                members,
                announcement_only: g.announcement_only,
            });
        }
        sends.sort_by(|a, b| (a.at_ms, &a.cmid).cmp(&(b.at_ms, &b.cmid)));
        let mut faults = sc.faults.clone();
        if let Some(sw) = &sc.swarm {
            faults.extend(draw_swarm(
                sc,
                &sw.kinds,
                sw.max_faults,
                sw.max_fault_ms.unwrap_or(10_000).max(1_000),
                &mut rng,
            ));
        }
        faults.sort_by_key(|f| f.at_ms);
        Plan {
            users: n,
            devices_per_user: w.devices_per_user,
            groups,
            sends,
            faults,
            links: w
                .links
                .iter()
                .map(|l| ((l.user, l.device), l.at_ms))
                .collect(),
            membership: w.membership.clone(),
            unlinks: w
                .unlinks
                .iter()
                .map(|u| ((u.user, u.device), (u.at_ms, u.requester())))
                .collect(),
        }
    }

    /// Host carrying device `d` of user `u`.
    pub fn host_of(&self, sc: &Scenario, u: usize, d: usize) -> usize {
        (u * self.devices_per_user + d) % sc.topology.client_hosts
    }
}

/// Random faults within the scenario's bounds (swarm testing: each seed its own mix).
fn draw_swarm(
    sc: &Scenario,
    kinds: &[FaultKind],
    max: usize,
    max_ms: u64,
    rng: &mut SmallRng,
) -> Vec<Fault> {
    if kinds.is_empty() {
        return Vec::new();
    }
    let count = rng.random_range(0..=max);
    let gateways = sc.gateways();
    let clients = sc.client_hosts();
    let d = sc.duration_ms;
    let mut out = Vec::new();
    for _ in 0..count {
        let kind = kinds[rng.random_range(0..kinds.len())];
        let at_ms = rng.random_range(0..=d * 7 / 10);
        let until = (at_ms + rng.random_range(1_000..=max_ms)).min(d);
        let gw = gateways[rng.random_range(0..gateways.len())].0.clone();
        let client = clients[rng.random_range(0..clients.len())].clone();
        let user = rng.random_range(0..sc.workload.users);
        let mut f = Fault {
            at_ms,
            kind,
            until_ms: Some(until),
            a: None,
            b: None,
            one_way: false,
            host: None,
            user: None,
            device: None,
            region: None,
            frames_per_sec: None,
            skew_ms: None,
            fail_rate: None,
            max_ms: None,
            point: None,
        };
        // Tiered, one network fault in three cuts a gateway's link to the chat service
        // instead of a client's link to the gateway (drawn only then: untiered seeds keep
        // their faults).
        let client = if sc.topology.tiered
            && matches!(
                kind,
                FaultKind::Partition | FaultKind::Hold | FaultKind::Flaky | FaultKind::Latency
            )
            && rng.random_bool(1.0 / 3.0)
        {
            "chat".to_string()
        } else {
            client
        };
        match kind {
            FaultKind::Partition | FaultKind::Hold => {
                f.a = Some(client);
                f.b = Some(gw);
                f.one_way = kind == FaultKind::Partition && rng.random_bool(0.3);
            }
            FaultKind::Flaky => {
                f.a = Some(client);
                f.b = Some(gw);
                f.fail_rate = Some(0.02);
            }
            FaultKind::Latency => {
                f.a = Some(client);
                f.b = Some(gw);
                f.max_ms = Some(rng.random_range(sc.topology.latency_ms[1].max(1)..=2_000));
            }
            FaultKind::Crash | FaultKind::Deploy => {
                // A crash hits a gateway or, one time in four, the chat service itself.
                f.host = Some(if kind == FaultKind::Crash && rng.random_bool(0.25) {
                    "chat".into()
                } else {
                    gw
                });
                if kind == FaultKind::Deploy {
                    f.until_ms = None;
                }
            }
            FaultKind::Offline | FaultKind::Kill | FaultKind::BatteryDeath => f.user = Some(user),
            FaultKind::SlowConsumer => {
                f.user = Some(user);
                f.frames_per_sec = Some(rng.random_range(0..=5));
            }
            FaultKind::ClockSkew => {
                f.user = Some(user);
                f.skew_ms = Some(rng.random_range(-3_600_000..=3_600_000));
                f.until_ms = None;
            }
            FaultKind::CrashPoint => {
                let all = crate::scenario::CrashPoint::ALL;
                f.point = Some(all[rng.random_range(0..all.len())]);
                f.until_ms = None;
            }
            FaultKind::StoreErrors => {
                f.fail_rate = Some(f64::from(rng.random_range(5u32..=50)) / 100.0);
            }
            FaultKind::Pause | FaultKind::SlowHandler => {
                // A gateway, or one time in three the whole chat service.
                f.host = Some(if rng.random_bool(1.0 / 3.0) {
                    "chat".into()
                } else {
                    gw
                });
                if kind == FaultKind::SlowHandler {
                    f.max_ms = Some(rng.random_range(5..=1_000));
                }
            }
            FaultKind::ClockJump => {
                // Mostly forward (past heartbeat, presence and rate windows, up to half a
                // day), sometimes back (an NTP step) by up to ten minutes.
                f.skew_ms = Some(if rng.random_bool(0.7) {
                    let exp = rng.random_range(3.0..=(12.0f64 * 3_600_000.0).log10());
                    10f64.powf(exp) as i64
                } else {
                    -rng.random_range(1_000..=600_000)
                });
                f.until_ms = None;
            }
            FaultKind::RegionFailover => {
                if sc.topology.regions.len() < 2 {
                    continue;
                }
                f.region = Some(
                    sc.topology.regions[rng.random_range(0..sc.topology.regions.len())].clone(),
                );
            }
        }
        out.push(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc() -> Scenario {
        Scenario::parse(
            "name=\"p\"\nduration_ms=10000\n[workload]\nusers=6\nmessages_per_user=3\n[[workload.groups]]\nsize=4\nmessages=5\n[swarm]\nkinds=[\"partition\",\"deploy\"]\nmax_faults=3\n",
            "p.toml",
        )
        .expect("parses")
    }

    #[test]
    fn same_seed_same_plan_different_seed_different_plan() {
        let a = Plan::draw(&sc(), 1);
        let b = Plan::draw(&sc(), 1);
        let c = Plan::draw(&sc(), 2);
        assert_eq!(a.sends, b.sends);
        assert_eq!(a.faults, b.faults);
        assert_ne!(a.sends, c.sends);
        assert_eq!(a.sends.len(), 6 * 3 + 5);
    }

    #[test]
    fn pairs_pattern_talks_to_the_partner_and_cmids_are_unique() {
        let p = Plan::draw(&sc(), 3);
        for s in &p.sends {
            if let Target::User(t) = s.target {
                assert_eq!(
                    t,
                    if s.user % 2 == 0 {
                        s.user + 1
                    } else {
                        s.user - 1
                    }
                );
            }
        }
        let mut ids: Vec<_> = p.sends.iter().map(|s| s.cmid.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), p.sends.len());
    }

    #[test]
    fn one_way_pattern_only_the_first_user_sends_and_round_robin_takes_turns() {
        let sc = Scenario::parse(
            "name=\"p\"\nduration_ms=10000\n[workload]\nusers=3\nmessages_per_user=4\npattern=\"one-way\"\n[[workload.groups]]\nsize=3\nmessages=6\nround_robin=true\n",
            "p.toml",
        )
        .expect("parses");
        let p = Plan::draw(&sc, 1);
        let direct: Vec<_> = p
            .sends
            .iter()
            .filter(|s| matches!(s.target, Target::User(_)))
            .collect();
        assert_eq!(direct.len(), 4);
        assert!(direct.iter().all(|s| s.user == 0));
        let mut group_senders: Vec<usize> = p
            .sends
            .iter()
            .filter(|s| matches!(s.target, Target::Group(_)))
            .map(|s| s.user)
            .collect();
        group_senders.sort_unstable();
        assert_eq!(group_senders, vec![0, 0, 1, 1, 2, 2]);
    }
}
