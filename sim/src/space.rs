//! The design space of a swarm scenario: what each seed draws besides its faults.
//!
//! FoundationDB and TigerBeetle find bugs by letting every seed pick its own system as
//! well as its own faults: small pages and large ones, groups on both sides of the fan-out
//! threshold, one device per user or four, tight queues and rates. A scenario with a
//! `[swarm.space]` table is resolved, per seed, into a concrete scenario with every knob
//! written out (`draw`): the run, `--explain` and a shrunk repro all use that concrete
//! scenario, so a failing seed replays as a plain scenario on its own.
//!
//! Every knob has default bounds (`KNOBS`); a scenario narrows or widens them with
//! `name = [min, max]` in `[swarm.space]` (within the knob's hard limits).

pub use crate::knobs::{check_bounds, Knob, KNOBS};
use crate::scenario::{GroupLoad, Link, MembershipChange, Scenario, Unlink};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// Draws knob values within bounds.
struct Drawer<'a> {
    rng: SmallRng,
    bounds: &'a BTreeMap<String, [f64; 2]>,
    explain: Vec<(String, String)>,
}

impl Drawer<'_> {
    fn range(&self, name: &str) -> [f64; 2] {
        self.bounds.get(name).copied().unwrap_or_else(|| {
            KNOBS
                .iter()
                .find(|k| k.name == name)
                .map(|k| k.default)
                .unwrap_or([0.0, 0.0])
        })
    }
    /// An integer knob, clamped into `[lo, hi]` as well (for knobs that depend on others).
    fn int_within(&mut self, name: &str, lo: u64, hi: u64) -> u64 {
        let [a, b] = self.range(name);
        let (a, b) = (
            (a.round() as u64).clamp(lo, hi),
            (b.round() as u64).clamp(lo, hi),
        );
        let v = self.rng.random_range(a.min(b)..=b.max(a));
        self.explain.push((name.to_string(), v.to_string()));
        v
    }
    fn int(&mut self, name: &str) -> u64 {
        self.int_within(name, 0, u64::MAX)
    }
    /// An integer knob drawn uniformly in log space (small values as often as large ones:
    /// a page cap of 2 finds other bugs than one of 200).
    fn log_int(&mut self, name: &str, lo: u64) -> u64 {
        let [a, b] = self.range(name);
        let (a, b) = (
            (a.round() as u64).max(lo).max(1),
            (b.round() as u64).max(lo).max(1),
        );
        let (a, b) = (a.min(b), a.max(b));
        let x = self.rng.random_range((a as f64).ln()..=(b as f64).ln());
        let v = (x.exp().round() as u64).clamp(a, b);
        self.explain.push((name.to_string(), v.to_string()));
        v
    }
    fn float(&mut self, name: &str) -> f64 {
        let [a, b] = self.range(name);
        let v = if a < b {
            self.rng.random_range(a..=b)
        } else {
            a
        };
        let v = (v * 1000.0).round() / 1000.0;
        self.explain.push((name.to_string(), v.to_string()));
        v
    }
    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p.clamp(0.0, 1.0))
    }
}

/// A concrete scenario of one seed, and the knobs drawn (name, value) for `--explain`.
pub struct Drawn {
    pub scenario: Scenario,
    pub knobs: Vec<(String, String)>,
}

/// Resolves `sc` for `seed`: without `[swarm.space]`, the scenario itself; with it, a
/// concrete scenario whose every drawn knob is written out (and `space` removed, so the
/// result runs and shrinks as a plain scenario). Faults are still drawn by the plan.
pub fn draw(sc: &Scenario, seed: u64) -> Result<Drawn, String> {
    let Some(bounds) = sc.swarm.as_ref().and_then(|s| s.space.clone()) else {
        return Ok(Drawn {
            scenario: sc.clone(),
            knobs: Vec::new(),
        });
    };
    let mut d = Drawer {
        rng: SmallRng::seed_from_u64(seed ^ 0xd35_16e5_a5ce),
        bounds: &bounds,
        explain: Vec::new(),
    };
    let mut out = sc.clone();
    if let Some(s) = out.swarm.as_mut() {
        s.space = None;
    }
    let dur = sc.duration_ms;
    // Topology.
    let regions = d.int("regions") as usize;
    out.topology.regions = ["eu", "us", "ap"][..regions.clamp(1, 3)]
        .iter()
        .map(|r| r.to_string())
        .collect();
    out.topology.gateways_per_region = d.int("gateways_per_region") as usize;
    out.topology.client_hosts = d.int("client_hosts") as usize;
    let lat = d.int("latency_max_ms");
    out.topology.latency_ms = [1.min(lat), lat];
    // Workload.
    let users = d.int("users") as usize;
    let devices = d.int("devices_per_user") as usize;
    let mut tcp = d.log_int("tcp_segments", 4) as usize;
    // The accept backlog must hold the devices that may connect to one gateway at once.
    // (All of them may: a failover or a pause sends every phone to one gateway.)
    tcp = tcp.max(users * devices + 8);
    out.topology.tcp_segments = tcp.min(4096);
    let w = &mut out.workload;
    w.users = users;
    w.devices_per_user = devices;
    w.pattern = ["pairs", "ring", "star", "one-way"][d.rng.random_range(0..4)].to_string();
    d.explain.push(("pattern".into(), w.pattern.clone()));
    w.messages_per_user = d.int("messages_per_user") as usize;
    let typing_p = d.float("typing_probability");
    if d.chance(typing_p) {
        w.typing_ms = d.rng.random_range(500..=3_000);
        w.typing_every_ms = d.rng.random_range(100..=1_000);
        d.explain.push((
            "typing".into(),
            format!("{} ms every {} ms", w.typing_ms, w.typing_every_ms),
        ));
    } else {
        w.typing_ms = 0;
    }
    let burst_p = d.float("burst_probability");
    w.send_window_ms = if d.chance(burst_p) {
        let width = d.rng.random_range(200..=2_000).min(dur);
        let start = d.rng.random_range(0..=(dur * 7 / 10).saturating_sub(width));
        Some([start, start + width])
    } else {
        Some([0, dur * 4 / 5])
    };
    d.explain.push((
        "send_window_ms".into(),
        format!("{:?}", w.send_window_ms.unwrap_or_default()),
    ));
    // Server limits (drawn before groups: sizes straddle the fan-out threshold).
    let mut limits = sc.limits()?;
    limits.sync_page_cap = d.log_int("sync_page_cap", 1) as usize;
    limits.sync_scan_rows = d.log_int("sync_scan_rows", 1) as usize;
    limits.group_fanout_threshold = d.int("group_fanout_threshold") as usize;
    limits.outbound_max_frames = d.log_int("outbound_max_frames", 1) as usize;
    limits.outbound_max_bytes = d.log_int("outbound_max_bytes", 1) as usize;
    limits.send_rate_per_sec = d.int_within("send_rate_per_sec", 1, u32::MAX as u64) as u32;
    limits.send_burst = d.int_within("send_burst", 1, u32::MAX as u64) as u32;
    limits.presence_timeout_ms = d.int("presence_timeout_ms");
    limits.media_chunk_bytes = d.int("media_chunk_bytes") as usize;
    let keep_p = d.float("keep_history_probability");
    limits.keep_history = d.chance(keep_p);
    d.explain
        .push(("keep_history".into(), limits.keep_history.to_string()));
    limits.auth_timeout_ms = d.int("auth_timeout_ms");
    limits.typing_min_interval_ms = d.int("typing_min_interval_ms");
    // Retention is also the dedup window: a short one lets offline gaps, retries and
    // clock jumps cross both within a run.
    let short_p = d.float("short_retention_probability");
    if d.chance(short_p) {
        limits.retention_ms = d.log_int("retention_ms", 1);
    } else {
        d.explain
            .push(("retention_ms".into(), limits.retention_ms.to_string()));
    }
    limits.sweep_interval_ms = d.log_int("sweep_interval_ms", 1);
    limits.sweep_batch = d.log_int("sweep_batch", 1) as usize;
    let groups = d.int("groups") as usize;
    let announce_p = d.float("announcement_probability");
    let media_p = d.float("media_probability");
    let thr = limits.group_fanout_threshold;
    let mut new_groups = Vec::new();
    for _ in 0..groups {
        // Half the groups sit right around the threshold, the rest anywhere up to all users.
        let size = if d.chance(0.5) {
            d.rng.random_range(thr.saturating_sub(1)..=thr + 2)
        } else {
            d.rng.random_range(2..=users)
        }
        .clamp(2, users.min(limits.group_cap));
        let mut all: Vec<usize> = (0..users).collect();
        for i in 0..size {
            let j = d.rng.random_range(i..users);
            all.swap(i, j);
        }
        let mut members = all[..size].to_vec();
        members.sort_unstable();
        let messages = d.int("group_messages") as usize;
        let announcement_only = d.chance(announce_p);
        let round_robin = d.chance(0.3);
        let (media_messages, media_bytes) = if messages > 0 && d.chance(media_p) {
            let chunk = limits.media_chunk_bytes as u64;
            (1, d.rng.random_range(1..=chunk * 3))
        } else {
            (0, 0)
        };
        new_groups.push(GroupLoad {
            size,
            messages,
            announcement_only,
            round_robin,
            grow_at_ms: None,
            media_messages,
            media_bytes,
            members: Some(members),
        });
    }
    out.workload.groups = new_groups;
    // Operations during the run.
    let link_p = d.float("link_probability");
    let mut links = Vec::new();
    for u in 0..users {
        for dev in 1..devices {
            if d.chance(link_p) {
                let at_ms = d.rng.random_range(0..=dur * 4 / 5);
                links.push(Link {
                    user: u,
                    device: dev,
                    at_ms,
                });
            }
        }
    }
    out.workload.links = links;
    let changes = if out.workload.groups.is_empty() {
        0
    } else {
        d.int("membership_changes") as usize
    };
    let mut membership: Vec<MembershipChange> = Vec::new();
    for _ in 0..changes {
        let gi = d.rng.random_range(0..out.workload.groups.len());
        let members = out.workload.groups[gi].members.clone().unwrap_or_default();
        let admin = members.first().copied();
        let touched: Vec<usize> = membership
            .iter()
            .filter(|c| c.group == gi)
            .map(|c| c.user)
            .collect();
        let addable: Vec<usize> = (0..users)
            .filter(|u| !members.contains(u) && !touched.contains(u))
            .collect();
        let removable: Vec<usize> = members
            .iter()
            .copied()
            .filter(|u| Some(*u) != admin && !touched.contains(u))
            .collect();
        let add = match (addable.is_empty(), removable.is_empty()) {
            (true, true) => continue,
            (false, true) => true,
            (true, false) => false,
            (false, false) => d.chance(0.5),
        };
        let user = if add {
            addable[d.rng.random_range(0..addable.len())]
        } else {
            removable[d.rng.random_range(0..removable.len())]
        };
        membership.push(MembershipChange {
            at_ms: d.rng.random_range(0..=dur * 7 / 10),
            group: gi,
            user,
            op: if add { "add" } else { "remove" }.into(),
        });
    }
    out.workload.membership = membership;
    let fault_max = d.int_within("fault_max_ms", 1_000, u64::MAX);
    if let Some(sw) = out.swarm.as_mut() {
        sw.max_fault_ms = Some(fault_max);
    }
    // Phones.
    let c = &mut out.client;
    c.heartbeat_ms = d.int("heartbeat_ms");
    let hb = c.heartbeat_ms;
    c.idle_timeout_ms = d.int_within("idle_timeout_ms", hb * 3, u64::MAX);
    // The server must not time a phone out between two heartbeats.
    limits.presence_timeout_ms = limits.presence_timeout_ms.max(hb * 3);
    c.ack_timeout_ms = d.int("ack_timeout_ms");
    c.backoff_initial_ms = d.int("backoff_initial_ms");
    let init = c.backoff_initial_ms;
    c.backoff_max_ms = d.int_within("backoff_max_ms", init, u64::MAX);
    c.read_probability = d.float("read_probability");
    let rd = d.int("read_delay_max_ms");
    c.read_delay_ms = [rd / 4, rd];
    c.sync_after_seq_probability = d.float("sync_after_seq_probability");
    c.sync_limit = d.int("sync_limit") as usize;
    c.start_jitter_ms = d.int("start_jitter_ms");
    let order_p = d.float("random_order_probability");
    out.topology.random_order = d.chance(order_p);
    d.explain
        .push(("random_order".into(), out.topology.random_order.to_string()));
    let group_p = d.float("group_commit_probability");
    out.topology.group_commit_ms = if d.chance(group_p) {
        out.topology.torn_writes = d.chance(0.5);
        d.explain
            .push(("torn_writes".into(), out.topology.torn_writes.to_string()));
        Some(d.int("fsync_ms"))
    } else {
        d.explain.push(("group_commit".into(), "false".into()));
        None
    };
    let token_p = d.float("short_token_probability");
    out.client.token_life_ms = if d.chance(token_p) {
        Some(d.log_int("token_life_ms", 1))
    } else {
        d.explain
            .push(("token_life_ms".into(), "the whole run".into()));
        None
    };
    // Devices unlinked mid-run (drawn last, so earlier draws keep their seeds): a second..
    // fourth device not linked mid-run, by the user's first device or by itself.
    let unlink_p = d.float("unlink_probability");
    let mut unlinks = Vec::new();
    for u in 0..users {
        for dev in 1..devices {
            let linked_later = out
                .workload
                .links
                .iter()
                .any(|l| l.user == u && l.device == dev);
            if !linked_later && d.chance(unlink_p) {
                let at_ms = d.rng.random_range(0..=dur * 4 / 5);
                let by = d.chance(0.5).then_some(0);
                unlinks.push(Unlink {
                    user: u,
                    device: dev,
                    at_ms,
                    by,
                });
            }
        }
    }
    out.workload.unlinks = unlinks;
    // The tiered topology (drawn after everything else, so the other draws of a seed stay
    // as they were): gateway nodes linked to the chat service over the network, or (the
    // rest of the seeds, and every seed of a scenario that says `tiered = false`) every
    // gateway calling the chat service in-process.
    let tiered_p = d.float("tiered_probability");
    out.topology.tiered = sc.topology.tiered && d.chance(tiered_p);
    d.explain
        .push(("tiered".into(), out.topology.tiered.to_string()));
    out.server =
        Some(toml::Table::try_from(&limits).map_err(|e| format!("encoding drawn limits: {e}"))?);
    // Knobs that ended up adjusted by others are explained by their final value.
    let knobs = d.explain;
    let text = toml::to_string(&out).map_err(|e| format!("encoding drawn scenario: {e}"))?;
    Scenario::parse(&text, &format!("{} (seed {seed}, drawn)", sc.name))
        .map_err(|e| format!("drawn scenario is invalid: {e}"))?;
    Ok(Drawn {
        scenario: out,
        knobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swarm(space: &str) -> Scenario {
        Scenario::parse(
            &format!(
                "name=\"s\"\nduration_ms=20000\n[workload]\nusers=4\n[swarm]\nkinds=[]\nmax_faults=0\n[swarm.space]\n{space}"
            ),
            "s.toml",
        )
        .expect("parses")
    }

    #[test]
    fn every_seed_draws_a_valid_concrete_scenario_within_bounds() {
        let sc = swarm("users = [3, 9]\nsync_page_cap = [2, 5]\n");
        let mut thresholds = std::collections::BTreeSet::new();
        let mut both_sides = (false, false);
        for seed in 1..200 {
            let d = draw(&sc, seed).expect("draws");
            let c = &d.scenario;
            assert!(c.swarm.as_ref().is_some_and(|s| s.space.is_none()));
            assert!((3..=9).contains(&c.workload.users));
            let l = c.limits().expect("limits");
            assert!((2..=5).contains(&l.sync_page_cap));
            thresholds.insert(l.group_fanout_threshold);
            for g in &c.workload.groups {
                if g.size > l.group_fanout_threshold {
                    both_sides.1 = true;
                } else {
                    both_sides.0 = true;
                }
            }
            // Written out, it parses back to the same scenario.
            let text = toml::to_string(c).expect("encodes");
            let back = Scenario::parse(&text, "back").expect("parses");
            assert_eq!(toml::to_string(&back).expect("encodes"), text);
        }
        assert!(thresholds.len() > 3, "thresholds vary: {thresholds:?}");
        assert_eq!(
            both_sides,
            (true, true),
            "groups on both sides of the threshold"
        );
    }

    #[test]
    fn same_seed_same_draw_and_plain_scenarios_are_left_alone() {
        let sc = swarm("");
        let a = toml::to_string(&draw(&sc, 7).expect("draws").scenario).expect("enc");
        let b = toml::to_string(&draw(&sc, 7).expect("draws").scenario).expect("enc");
        let c = toml::to_string(&draw(&sc, 8).expect("draws").scenario).expect("enc");
        assert_eq!(a, b);
        assert_ne!(a, c);
        let plain = Scenario::parse(
            "name=\"p\"\nduration_ms=1000\n[workload]\nusers=2\n",
            "p.toml",
        )
        .expect("parses");
        let d = draw(&plain, 3).expect("draws");
        assert!(d.knobs.is_empty());
        assert_eq!(d.scenario.workload.users, 2);
    }

    #[test]
    fn bad_bounds_are_errors_naming_the_knob() {
        let e = Scenario::parse(
            "name=\"s\"\nduration_ms=1000\n[workload]\nusers=2\n[swarm]\nkinds=[]\nmax_faults=0\n[swarm.space]\nuserz = [1, 2]\n",
            "s.toml",
        )
        .expect_err("unknown knob");
        assert!(e.to_string().contains("unknown knob 'userz'"), "{e}");
        let e = Scenario::parse(
            "name=\"s\"\nduration_ms=1000\n[workload]\nusers=2\n[swarm]\nkinds=[]\nmax_faults=0\n[swarm.space]\nusers = [9, 3]\n",
            "s.toml",
        )
        .expect_err("min > max");
        assert!(e.to_string().contains("users = [9, 3]"), "{e}");
    }
}
