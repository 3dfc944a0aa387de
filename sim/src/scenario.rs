//! Scenario files: a workload, a fault timeline and expectations, in TOML.
//!
//! Parsing is strict (unknown keys are errors) and every error names the file, the line
//! and what was wrong, because these files are written by hand in CI repos. The format is
//! documented in docs/SCENARIOS.md.

use model_server::Limits;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Default `[topology] tcp_segments`: segments in flight per TCP stream (turmoil's flow
/// control) and the accept backlog. Small enough that a phone that stops reading pushes
/// back on the server's writer within a few hundred frames, as a real TCP window would.
pub const TCP_CAPACITY: usize = 256;

/// A whole scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seed used when none is given on the command line.
    #[serde(default = "one")]
    pub seed: u64,
    /// Length of the fault phase, simulated ms.
    pub duration_ms: u64,
    /// Quiet phase after the faults stop: everything pending must be delivered in it.
    #[serde(default = "default_quiet")]
    pub quiet_ms: u64,
    /// Simulation tick, ms (coarser is faster; latencies are multiples of it).
    #[serde(default = "default_tick")]
    pub tick_ms: u64,
    #[serde(default)]
    pub topology: Topology,
    /// Overrides of the server's limits (any field of `Limits`).
    #[serde(default)]
    pub server: Option<toml::Table>,
    #[serde(default)]
    pub client: ClientConfig,
    pub workload: Workload,
    #[serde(default)]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub swarm: Option<Swarm>,
    #[serde(default)]
    pub expect: Expect,
    /// Design flaws this scenario studies (planted bug names, as for `--bug`): a teaching
    /// scenario switches one on and expects the violation it causes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub design_flaws: Vec<String>,
}

fn one() -> u64 {
    1
}
fn default_quiet() -> u64 {
    60_000
}
fn default_tick() -> u64 {
    5
}

/// Regions, gateways and client hosts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    pub regions: Vec<String>,
    pub gateways_per_region: usize,
    /// Hosts that carry the simulated devices (many devices per host).
    pub client_hosts: usize,
    /// Per-segment latency range, ms.
    pub latency_ms: [u64; 2],
    /// Segments a simulated TCP socket buffers before its writer blocks (turmoil's
    /// `tcp_capacity`, also the accept backlog). Small values let a slow phone's
    /// backpressure reach the server's outbound queue sooner.
    pub tcp_segments: usize,
    /// Run the hosts in an order drawn from the seed at every step (turmoil's random
    /// host ordering) instead of their fixed order.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub random_order: bool,
    /// Group commit in the chat service's store: commits are durable only once a sync
    /// round (taking this many simulated ms, the fsync) covers them, and every answer
    /// waits for it. A crash keeps a seeded prefix of the batches no sync covered (lost
    /// or partly kept unsynced writes). Unset: every commit is durable when it returns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_commit_ms: Option<u64>,
    /// With `group_commit_ms`: the disk, not the server's overlay, holds the unsynced
    /// batches, and a crash keeps a seeded prefix of them (torn writes) instead of losing
    /// them all.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub torn_writes: bool,
    /// Gateways are nodes of their own that reach the chat service over a network link
    /// (host `chat`), so faults between a gateway and `chat` cut that link (and the media
    /// requests they pass through). The default; `false`: every gateway calls the chat
    /// service in-process (the first version's topology).
    #[serde(skip_serializing_if = "is_true")]
    pub tiered: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            regions: vec!["eu".into()],
            gateways_per_region: 1,
            client_hosts: 1,
            latency_ms: [1, 20],
            tcp_segments: TCP_CAPACITY,
            random_order: false,
            group_commit_ms: None,
            torn_writes: false,
            tiered: true,
        }
    }
}

/// How simulated phones behave.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// First reconnect backoff, ms; doubles per failure up to `backoff_max_ms` (jittered).
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// No frame from the server for this long: the socket is considered dead.
    pub idle_timeout_ms: u64,
    /// Resend an unacked message after this long on the same connection.
    pub ack_timeout_ms: u64,
    /// Fraction of received messages the user reads (blue ticks).
    pub read_probability: f64,
    /// Delay before reading, ms range.
    pub read_delay_ms: [u64; 2],
    /// Devices open the app at a random time in 0..=this at the start, ms.
    pub start_jitter_ms: u64,
    /// Chance, per connection, that the phone also catches up conversation by conversation
    /// (`sync` with `conversation_id` and `after_seq`, its highest seq without a gap) before
    /// the pending sync it always sends.
    #[serde(default)]
    pub sync_after_seq_probability: f64,
    /// Page size the phone asks for in `sync` (`limit`); 0: none (the server's cap).
    #[serde(default)]
    pub sync_limit: usize,
    /// How long a session token lasts, ms by the server's clock (the login service and
    /// the chat server share a clock). Unset: a token outlives the run. Set: a phone keeps
    /// its token across reconnects until the server refuses it as expired, then logs in
    /// again; the oracle flags an expired token the server let in (`auth`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_life_ms: Option<u64>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
            heartbeat_ms: 5_000,
            idle_timeout_ms: 12_000,
            ack_timeout_ms: 4_000,
            read_probability: 1.0,
            read_delay_ms: [200, 2_000],
            start_jitter_ms: 500,
            sync_after_seq_probability: 0.0,
            sync_limit: 0,
            token_life_ms: None,
        }
    }
}

/// Who talks to whom, how much.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub users: usize,
    #[serde(default = "one_usize")]
    pub devices_per_user: usize,
    /// `pairs` (u0-u1, u2-u3, ...), `ring` (each user to the next), `star` (u0 to all and
    /// all to u0) or `one-way` (u0 to all, nobody back).
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// 1:1 messages each user sends.
    #[serde(default)]
    pub messages_per_user: usize,
    /// Sends are spread uniformly over this window of the fault phase, ms.
    #[serde(default)]
    pub send_window_ms: Option<[u64; 2]>,
    #[serde(default)]
    pub groups: Vec<GroupLoad>,
    /// Users type for this long before each send, ms (0: nobody types).
    #[serde(default)]
    pub typing_ms: u64,
    /// While typing, a `typing` notice every this many ms (keystrokes, roughly).
    #[serde(default = "default_typing_every")]
    pub typing_every_ms: u64,
    /// Devices linked to their account during the run (not before it): each first opens
    /// the app at `at_ms`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<Link>,
    /// Members added to or removed from groups during the run, by the group's admin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub membership: Vec<MembershipChange>,
    /// Devices unlinked from their account during the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unlinks: Vec<Unlink>,
}

/// A device unlinked mid-run (`[[workload.unlinks]]`): device `by` of the same user (the
/// device itself, logging out, when `by` is left out) sends `device_unlink` once it is
/// connected at or after `at_ms`, and again on each new connection until it is answered.
/// The unlinked phone keeps its old token and keeps trying it, as a stolen phone would.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Unlink {
    pub user: usize,
    pub device: usize,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<usize>,
}

impl Unlink {
    /// The device that asks.
    pub fn requester(&self) -> usize {
        self.by.unwrap_or(self.device)
    }
}

/// A device linked mid-run (`[[workload.links]]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub user: usize,
    pub device: usize,
    pub at_ms: u64,
}

/// A membership change mid-run (`[[workload.membership]]`): the admin's first device asks
/// the server to add or remove `user` in group `group` (index into `[[workload.groups]]`)
/// once it is connected at or after `at_ms`, and asks again on each new connection until it
/// sees the change in a `group_update`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MembershipChange {
    pub at_ms: u64,
    pub group: usize,
    pub user: usize,
    /// `add` or `remove`.
    pub op: String,
}

fn default_typing_every() -> u64 {
    500
}

fn one_usize() -> usize {
    1
}
fn default_pattern() -> String {
    "pairs".into()
}

/// A group and how many messages its members send to it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupLoad {
    pub size: usize,
    pub messages: usize,
    #[serde(default)]
    pub announcement_only: bool,
    /// Members take turns sending (lowest id first) instead of a random member each time.
    #[serde(default)]
    pub round_robin: bool,
    /// At this time the admin asks to add every user who is not a member; the run checks
    /// that the server refuses (the group would grow past `group_cap`).
    #[serde(default)]
    pub grow_at_ms: Option<u64>,
    /// The first `media_messages` of the group's messages carry a file of `media_bytes`
    /// bytes, uploaded over the media lane before the message (which carries only the
    /// pointer) is sent; every recipient device downloads it.
    #[serde(default)]
    pub media_messages: usize,
    #[serde(default)]
    pub media_bytes: u64,
    /// The members, by user index (`size` of them, the lowest is the admin); drawn from
    /// the seed when absent. Needed by `[[workload.membership]]` changes to the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<usize>>,
}

/// What kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Drop everything between `a` and `b` (one way if `one_way`) until `until_ms`.
    Partition,
    /// Delay (without dropping) everything between `a` and `b` until `until_ms`.
    Hold,
    /// Crash `host`; restart it at `until_ms` if given. `chat` crashes the chat service.
    Crash,
    /// Restart a gateway at once: every socket on it drops (reconnect storm).
    Deploy,
    /// A user's app goes to the background: socket closed, no reconnect until `until_ms`.
    Offline,
    /// A user's app is killed (mid-send) and restarted at `until_ms`.
    Kill,
    /// A user's phone dies (battery) and is back at `until_ms`: it vanishes without closing
    /// its socket, so the server learns of it only by its own timeouts.
    BatteryDeath,
    /// A user's device reads `frames_per_sec` frames per second (0: stops) until `until_ms`.
    SlowConsumer,
    /// A whole region's gateways crash; clients move to another region. Back at `until_ms`.
    RegionFailover,
    /// A user's clock is off by `skew_ms`.
    ClockSkew,
    /// Links between `a` and `b` fail at random (`fail_rate` per segment) until `until_ms`.
    Flaky,
    /// Links between `a` and `b` get a latency distribution up to `max_ms` until `until_ms`
    /// (a congested or distant link).
    Latency,
    /// Armed from `at_ms` (to `until_ms` if given): the chat service crashes at the next
    /// `point` (`after_commit`, `after_ack`, `mid_fanout`), then restarts at once.
    CrashPoint,
    /// Every store commit fails (an I/O error) with probability `fail_rate` until `until_ms`.
    StoreErrors,
    /// `host` (a gateway, or `chat`: every gateway and the chat service's timers) is frozen
    /// until `until_ms`, while its peers' timers run on (a GC or VM pause).
    Pause,
    /// `host` (a gateway, or `chat` for all) waits `max_ms` before each frame it handles
    /// and each batch it writes, until `until_ms`.
    SlowHandler,
    /// The chat service's clock steps by `skew_ms` (forward or back) and stays stepped.
    ClockJump,
}

impl FaultKind {
    /// Faults carried out through the server's own fault points (BUGGIFY).
    pub fn inside_server(self) -> bool {
        matches!(
            self,
            FaultKind::CrashPoint
                | FaultKind::Pause
                | FaultKind::SlowHandler
                | FaultKind::ClockJump
        )
    }
}

/// Where a `crash_point` fault crashes the chat service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashPoint {
    /// After a message is committed, before its ack or any fan-out is written.
    AfterCommit,
    /// Right after an ack is written to the sender's socket, before the fan-out is.
    AfterAck,
    /// After a message is committed, at the next delivery frame written (usually its first
    /// recipient's), before the rest of what is queued.
    MidFanout,
}

impl CrashPoint {
    /// The name used in scenarios.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::AfterCommit => "after_commit",
            CrashPoint::AfterAck => "after_ack",
            CrashPoint::MidFanout => "mid_fanout",
        }
    }

    /// Every point, in a fixed order (the swarm draws from it).
    pub const ALL: [CrashPoint; 3] = [
        CrashPoint::AfterCommit,
        CrashPoint::AfterAck,
        CrashPoint::MidFanout,
    ];
}

/// One fault on the timeline.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub at_ms: u64,
    pub kind: FaultKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_way: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_per_sec: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skew_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<CrashPoint>,
}

/// Random faults drawn per seed (swarm testing).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Swarm {
    pub kinds: Vec<FaultKind>,
    pub max_faults: usize,
    /// Longest a drawn fault lasts, ms (each lasts 1 s up to this; default 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fault_ms: Option<u64>,
    /// The design space: when present, each seed also draws the server's limits, the
    /// phones' behaviour, the topology, the workload and mid-run operations, within these
    /// bounds (knob name -> [min, max]; see `crate::knobs::KNOBS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<std::collections::BTreeMap<String, [f64; 2]>>,
}

/// What a run must show.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Violations this scenario is meant to find (teaching scenarios); empty: none allowed.
    #[serde(default)]
    pub violations: Vec<crate::invariant::ViolationKind>,
    #[serde(default)]
    pub p99_deliver_ms: Option<u64>,
    #[serde(default)]
    pub p99_ack_ms: Option<u64>,
}

/// A scenario file that could not be used. `line` is 0 when no line is to blame (the
/// file could not be read); it is then left out of the message.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {message}", if *line > 0 { format!(":{line}") } else { String::new() })]
pub struct ScenarioError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: path.display().to_string(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks scenario text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Scenario, ScenarioError> {
        let err = |line: usize, message: String| ScenarioError {
            file: file.to_string(),
            line,
            message,
        };
        let sc: Scenario = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            err(line, e.message().to_string())
        })?;
        // Lines of each [[faults]] entry, to point semantic errors at them.
        let mut fault_lines = Vec::new();
        let mut pos = 0;
        while let Some(i) = text[pos..].find("[[faults]]") {
            fault_lines.push(line_of(text, pos + i));
            pos += i + 10;
        }
        let key_line = |key: &str| {
            text.lines()
                .position(|l| l.trim_start().starts_with(key))
                .map(|i| i + 1)
                .unwrap_or(0)
        };
        sc.validate().map_err(|(fault, key, msg)| match fault {
            Some(i) => err(
                fault_lines.get(i).copied().unwrap_or(0),
                format!("faults[{i}]: {msg}"),
            ),
            None => err(key_line(key), msg),
        })?;
        Ok(sc)
    }

    /// The server limits for this scenario: defaults, then `[server]` overrides.
    pub fn limits(&self) -> Result<Limits, String> {
        match &self.server {
            None => Ok(Limits::default()),
            Some(t) => t
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| format!("[server]: {}", e.message())),
        }
    }

    /// Every host name of the topology.
    pub fn gateways(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for r in &self.topology.regions {
            for i in 0..self.topology.gateways_per_region {
                out.push((format!("gw-{r}-{i}"), r.clone()));
            }
        }
        out
    }

    /// Names of the client hosts.
    pub fn client_hosts(&self) -> Vec<String> {
        (0..self.topology.client_hosts)
            .map(|i| format!("client-{i}"))
            .collect()
    }

    fn is_host(&self, h: &str) -> bool {
        h == "chat"
            || self.gateways().iter().any(|(g, _)| g == h)
            || self.client_hosts().iter().any(|c| c == h)
    }

    fn validate(&self) -> Result<(), (Option<usize>, &'static str, String)> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err((
                None,
                "name",
                "name must be 1-64 of [A-Za-z0-9_-] (it names report files)".into(),
            ));
        }
        let top = &self.topology;
        if top.regions.is_empty() || top.gateways_per_region == 0 || top.client_hosts == 0 {
            return Err((
                None,
                "[topology]",
                "topology needs at least one region, gateway and client host".into(),
            ));
        }
        if top.latency_ms[0] > top.latency_ms[1] {
            return Err((
                None,
                "latency_ms",
                "latency_ms must be [min, max] with min <= max".into(),
            ));
        }
        if !(4..=4096).contains(&top.tcp_segments) {
            return Err((None, "tcp_segments", "tcp_segments must be 4..=4096".into()));
        }
        if self.tick_ms == 0 || self.tick_ms > 100 {
            return Err((None, "tick_ms", "tick_ms must be 1..=100".into()));
        }
        let w = &self.workload;
        if w.users < 2 || w.users > 100_000 {
            return Err((None, "users", "workload.users must be 2..=100000".into()));
        }
        if w.devices_per_user == 0 || w.devices_per_user > 8 {
            return Err((
                None,
                "devices_per_user",
                "devices_per_user must be 1..=8".into(),
            ));
        }
        if !["pairs", "ring", "star", "one-way"].contains(&w.pattern.as_str()) {
            return Err((
                None,
                "pattern",
                format!(
                    "unknown pattern '{}': use pairs, ring, star or one-way",
                    w.pattern
                ),
            ));
        }
        if w.typing_ms > 0 && !(50..=60_000).contains(&w.typing_every_ms) {
            return Err((
                None,
                "typing_every_ms",
                "typing_every_ms must be 50..=60000".into(),
            ));
        }
        if let Some([a, b]) = w.send_window_ms {
            if a > b || b > self.duration_ms {
                return Err((
                    None,
                    "send_window_ms",
                    format!(
                        "send_window_ms must be [start, end] within duration_ms ({})",
                        self.duration_ms
                    ),
                ));
            }
        }
        let cap = self.limits().map(|l| l.group_cap).unwrap_or(usize::MAX);
        for g in &w.groups {
            if g.size > cap {
                return Err((
                    None,
                    "[[workload.groups]]",
                    format!(
                        "group size {} is above the server's group_cap {cap}",
                        g.size
                    ),
                ));
            }
            if let Some(at) = g.grow_at_ms {
                if at > self.duration_ms || w.users <= cap {
                    return Err((
                        None,
                        "grow_at_ms",
                        format!(
                            "grow_at_ms must be within duration_ms ({}) and users ({}) must be \
                             above group_cap ({cap}): growing a group is only simulated to show \
                             the cap refusing it",
                            self.duration_ms, w.users
                        ),
                    ));
                }
            }
            if g.media_messages > 0 {
                let max = self.limits().map(|l| l.max_media_bytes).unwrap_or(0);
                if g.media_bytes == 0 || g.media_bytes > max || g.media_messages > g.messages {
                    return Err((
                        None,
                        "media_bytes",
                        format!(
                            "with media_messages, media_bytes must be 1..={max} (max_media_bytes) \
                             and media_messages at most messages ({})",
                            g.messages
                        ),
                    ));
                }
            }
            if g.size < 2 || g.size > w.users {
                return Err((
                    None,
                    "[[workload.groups]]",
                    format!("group size {} must be 2..=users ({})", g.size, w.users),
                ));
            }
        }
        for g in &w.groups {
            if let Some(m) = &g.members {
                let mut sorted = m.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != g.size || sorted.iter().any(|u| *u >= w.users) {
                    return Err((
                        None,
                        "members",
                        format!(
                            "group members must be {} different users below users ({})",
                            g.size, w.users
                        ),
                    ));
                }
            }
        }
        for l in &w.links {
            if l.user >= w.users || l.device >= w.devices_per_user || l.at_ms > self.duration_ms {
                return Err((
                    None,
                    "[[workload.links]]",
                    format!(
                        "a link needs user < users ({}), device < devices_per_user ({}) and \
                         at_ms within duration_ms ({})",
                        w.users, w.devices_per_user, self.duration_ms
                    ),
                ));
            }
            if w.links
                .iter()
                .filter(|x| x.user == l.user && x.device == l.device)
                .count()
                > 1
            {
                return Err((
                    None,
                    "[[workload.links]]",
                    format!("device u{}/d{} is linked twice", l.user, l.device),
                ));
            }
        }
        for u in &w.unlinks {
            let bad = |m: String| Err((None, "[[workload.unlinks]]", m));
            if u.user >= w.users
                || u.device >= w.devices_per_user
                || u.requester() >= w.devices_per_user
                || u.at_ms > self.duration_ms
            {
                return bad(format!(
                    "an unlink needs user < users ({}), device and by < devices_per_user ({}) \
                     and at_ms within duration_ms ({})",
                    w.users, w.devices_per_user, self.duration_ms
                ));
            }
            let dev = format!("u{}/d{}", u.user, u.device);
            if w.unlinks
                .iter()
                .filter(|x| x.user == u.user && x.device == u.device)
                .count()
                > 1
            {
                return bad(format!("device {dev} is unlinked twice"));
            }
            if w.links
                .iter()
                .any(|l| l.user == u.user && l.device == u.device)
            {
                return bad(format!(
                    "device {dev} is both linked and unlinked during the run; pick one"
                ));
            }
            if u.requester() != u.device
                && w.unlinks
                    .iter()
                    .any(|x| x.user == u.user && x.device == u.requester())
            {
                return bad(format!(
                    "device {dev} is to be unlinked by u{}/d{}, which is itself unlinked",
                    u.user,
                    u.requester()
                ));
            }
        }
        for u in 0..w.users {
            let gone = w.unlinks.iter().filter(|x| x.user == u).count();
            if gone > 0 && gone >= w.devices_per_user {
                return Err((
                    None,
                    "[[workload.unlinks]]",
                    format!(
                        "every device of u{u} is unlinked; keep at least one (devices_per_user = {})",
                        w.devices_per_user
                    ),
                ));
            }
        }
        for c in &w.membership {
            let bad = |m: String| Err((None, "[[workload.membership]]", m));
            let Some(g) = w.groups.get(c.group) else {
                return bad(format!("group {} does not exist", c.group));
            };
            let Some(members) = &g.members else {
                return bad(format!(
                    "group {} needs explicit members to change them mid-run",
                    c.group
                ));
            };
            let admin = members.iter().min().copied();
            let ok = match c.op.as_str() {
                "add" => c.user < w.users && !members.contains(&c.user),
                "remove" => members.contains(&c.user) && Some(c.user) != admin,
                _ => return bad(format!("op must be add or remove, not '{}'", c.op)),
            };
            if !ok || c.at_ms > self.duration_ms {
                return bad(format!(
                    "{} u{} in group {}: add a non-member or remove a member other than the \
                     admin, at_ms within duration_ms",
                    c.op, c.user, c.group
                ));
            }
            if w.membership
                .iter()
                .filter(|x| x.group == c.group && x.user == c.user)
                .count()
                > 1
            {
                return bad(format!("u{} changes twice in group {}", c.user, c.group));
            }
        }
        if let Some(space) = self.swarm.as_ref().and_then(|s| s.space.as_ref()) {
            if let Err(e) = crate::knobs::check_bounds(space) {
                return Err((None, "space", e));
            }
        }
        if let Err(e) = self.limits() {
            return Err((None, "[server]", e));
        }
        for b in &self.design_flaws {
            if let Err(e) = model_server::config::Bugs::default().enable(b) {
                return Err((None, "design_flaws", e));
            }
        }
        let user_ok = |u: Option<usize>| u.is_some_and(|u| u < w.users);
        for (i, f) in self.faults.iter().enumerate() {
            let e = |m: String| Err((Some(i), "", m));
            if f.at_ms > self.duration_ms {
                return e(format!(
                    "at_ms {} is after duration_ms {}",
                    f.at_ms, self.duration_ms
                ));
            }
            if let Some(u) = f.until_ms {
                if u < f.at_ms || u > self.duration_ms {
                    return e(format!(
                        "until_ms {u} must be between at_ms and duration_ms"
                    ));
                }
            }
            if let Some(d) = f.device {
                if d >= w.devices_per_user {
                    return e(format!(
                        "device {d} does not exist (devices_per_user = {})",
                        w.devices_per_user
                    ));
                }
            }
            use FaultKind::*;
            match f.kind {
                Partition | Hold | Flaky | Latency => {
                    for h in [&f.a, &f.b] {
                        match h {
                            Some(h) if self.is_host(h) || h == "*" => {}
                            Some(h) => return e(format!("unknown host '{h}'")),
                            None => {
                                return e(format!("{:?} needs hosts a and b", f.kind).to_lowercase())
                            }
                        }
                    }
                    if f.kind == Flaky && !f.fail_rate.is_some_and(|r| (0.0..=1.0).contains(&r)) {
                        return e("flaky needs fail_rate in 0..=1".into());
                    }
                    if f.kind == Latency
                        && !f
                            .max_ms
                            .is_some_and(|m| m >= top.latency_ms[0] && m <= 60_000)
                    {
                        return e(
                            "latency needs max_ms between topology.latency_ms[0] and 60000".into(),
                        );
                    }
                    if f.until_ms.is_none() {
                        return e("needs until_ms (faults must end before the quiet phase)".into());
                    }
                }
                Crash => match &f.host {
                    Some(h) if h.starts_with("client-") && f.until_ms.is_none() => {
                        return e(
                            "crashing a client host needs until_ms (its phones restart then)"
                                .into(),
                        )
                    }
                    Some(h) if self.is_host(h) => {}
                    Some(h) => return e(format!("unknown host '{h}'")),
                    None => return e("crash needs host".into()),
                },
                Deploy => match &f.host {
                    Some(h) if self.gateways().iter().any(|(g, _)| g == h) => {}
                    _ => return e("deploy needs host = a gateway (gw-REGION-N)".into()),
                },
                Offline | Kill | BatteryDeath | SlowConsumer => {
                    if !user_ok(f.user) {
                        return e(format!("needs user = 0..{}", w.users));
                    }
                    if f.until_ms.is_none() {
                        return e("needs until_ms".into());
                    }
                }
                ClockSkew => {
                    if !user_ok(f.user) || f.skew_ms.is_none() {
                        return e("clock_skew needs user and skew_ms".into());
                    }
                }
                CrashPoint => {
                    if f.point.is_none() {
                        return e(
                            "crash_point needs point = after_commit, after_ack or mid_fanout"
                                .into(),
                        );
                    }
                }
                StoreErrors => {
                    if !f.fail_rate.is_some_and(|r| (0.0..=1.0).contains(&r)) {
                        return e("store_errors needs fail_rate in 0..=1".into());
                    }
                    if f.until_ms.is_none() {
                        return e("store_errors needs until_ms".into());
                    }
                }
                Pause | SlowHandler => {
                    match &f.host {
                        Some(h) if h == "chat" || self.gateways().iter().any(|(g, _)| g == h) => {}
                        _ => {
                            return e(format!(
                                "{:?} needs host = chat or a gateway (gw-REGION-N)",
                                f.kind
                            )
                            .to_lowercase())
                        }
                    }
                    if f.until_ms.is_none() {
                        return e("needs until_ms (faults must end before the quiet phase)".into());
                    }
                    if f.kind == SlowHandler && !f.max_ms.is_some_and(|m| (1..=10_000).contains(&m))
                    {
                        return e("slow_handler needs max_ms (the delay) in 1..=10000".into());
                    }
                }
                ClockJump => {
                    if f.skew_ms.is_none() {
                        return e(
                            "clock_jump needs skew_ms (the step, ms; negative steps back)".into(),
                        );
                    }
                }
                RegionFailover => match &f.region {
                    Some(r) if top.regions.contains(r) => {
                        if top.regions.len() < 2 {
                            return e("region_failover needs at least two regions".into());
                        }
                    }
                    _ => return e("region_failover needs region = one of topology.regions".into()),
                },
            }
        }
        Ok(())
    }
}

/// Scenario files named by `path`: the file itself, or every `*.toml` in the directory
/// (sorted), recursively.
pub fn collect(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            out.extend(collect(&p)?);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "name = \"x\"\nduration_ms = 1000\n[workload]\nusers = 2\nmessages_per_user = 1\n";

    #[test]
    fn minimal_scenario_parses_with_defaults() {
        let s = Scenario::parse(MIN, "x.toml").expect("parses");
        assert_eq!(s.topology.regions, vec!["eu"]);
        assert_eq!(s.workload.pattern, "pairs");
    }

    #[test]
    fn unknown_key_error_names_file_and_line() {
        let text = format!("{MIN}colour = \"red\"\n");
        let e = Scenario::parse(&text, "bad.toml").expect_err("unknown key");
        assert_eq!(e.file, "bad.toml");
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("colour"), "{e}");
    }

    #[test]
    fn semantic_fault_errors_point_at_the_fault() {
        let text =
            format!("{MIN}\n[[faults]]\nat_ms = 10\nkind = \"crash\"\nhost = \"gw-mars-0\"\n");
        let e = Scenario::parse(&text, "f.toml").expect_err("bad host");
        assert_eq!(e.line, 7, "{e}");
        assert!(e.to_string().contains("unknown host 'gw-mars-0'"), "{e}");
    }

    #[test]
    fn gateways_are_tiered_unless_a_scenario_says_in_process() {
        let default = Scenario::parse(MIN, "t.toml").expect("parses");
        assert!(default.topology.tiered);
        let text = MIN.replace("[workload]", "[topology]\ntiered = false\n[workload]");
        let flat = Scenario::parse(&text, "t.toml").expect("parses");
        assert!(!flat.topology.tiered);
    }

    #[test]
    fn server_overrides_reach_the_limits() {
        let text = format!("{MIN}[server]\nheartbeat_interval_ms = 1234\n");
        let s = Scenario::parse(&text, "s.toml").expect("parses");
        assert_eq!(s.limits().expect("limits").heartbeat_interval_ms, 1234);
        let bad = format!("{MIN}[server]\nheartbeat = 1\n");
        assert!(Scenario::parse(&bad, "s.toml").is_err());
    }

    #[test]
    fn tcp_segments_defaults_and_is_bounded() {
        let s = Scenario::parse(MIN, "x.toml").expect("parses");
        assert_eq!(s.topology.tcp_segments, TCP_CAPACITY);
        let bad = format!("{MIN}[topology]\ntcp_segments = 2\n");
        let e = Scenario::parse(&bad, "t.toml").expect_err("too small");
        assert!(e.message.contains("tcp_segments must be 4..=4096"), "{e}");
    }

    #[test]
    fn growing_a_group_is_only_accepted_past_the_cap() {
        let within = "name = \"x\"\nduration_ms = 1000\n[workload]\nusers = 4\n\
                      [[workload.groups]]\nsize = 3\nmessages = 1\ngrow_at_ms = 500\n";
        let e = Scenario::parse(within, "g.toml").expect_err("4 users fit under the cap");
        assert!(e.message.contains("above group_cap"), "{e}");
        let past = format!("{within}[server]\ngroup_cap = 3\n");
        let s = Scenario::parse(&past, "g.toml").expect("past the cap");
        assert_eq!(s.workload.groups[0].grow_at_ms, Some(500));
    }

    #[test]
    fn unlinks_are_checked_and_point_at_their_table() {
        let base =
            "name = \"x\"\nduration_ms = 1000\n[workload]\nusers = 2\ndevices_per_user = 2\n";
        let ok = format!("{base}[[workload.unlinks]]\nuser = 1\ndevice = 1\nby = 0\nat_ms = 500\n");
        let s = Scenario::parse(&ok, "u.toml").expect("parses");
        assert_eq!(s.workload.unlinks[0].requester(), 0);
        for (bad, says) in [
            (
                "user = 1\ndevice = 2\nat_ms = 500\n",
                "device and by < devices_per_user",
            ),
            ("user = 1\ndevice = 1\nat_ms = 5000\n", "within duration_ms"),
        ] {
            let text = format!("{base}[[workload.unlinks]]\n{bad}");
            let e = Scenario::parse(&text, "u.toml").expect_err("bad unlink");
            assert!(e.message.contains(says), "{e}");
            assert_eq!(e.line, 6, "points at [[workload.unlinks]]: {e}");
        }
        let twice = format!("{ok}[[workload.unlinks]]\nuser = 1\ndevice = 1\nat_ms = 600\n");
        let e = Scenario::parse(&twice, "u.toml").expect_err("twice");
        assert!(e.message.contains("unlinked twice"), "{e}");
        let chained = format!("{base}[[workload.unlinks]]\nuser = 1\ndevice = 1\nby = 0\nat_ms = 500\n[[workload.unlinks]]\nuser = 1\ndevice = 0\nat_ms = 600\n");
        let e = Scenario::parse(&chained, "u.toml").expect_err("by an unlinked device");
        assert!(e.message.contains("itself unlinked"), "{e}");
        let all = format!("{base}[[workload.unlinks]]\nuser = 1\ndevice = 1\nat_ms = 500\n[[workload.unlinks]]\nuser = 1\ndevice = 0\nat_ms = 600\n");
        let e = Scenario::parse(&all, "u.toml").expect_err("no device left");
        assert!(e.message.contains("keep at least one"), "{e}");
    }

    #[test]
    fn typing_every_ms_is_checked_when_users_type() {
        let text = format!("{MIN}typing_ms = 3000\ntyping_every_ms = 10\n");
        let e = Scenario::parse(&text, "t.toml").expect_err("too fast");
        assert!(e.message.contains("typing_every_ms"), "{e}");
    }

    #[test]
    fn unknown_pattern_lists_the_known_ones() {
        let text = MIN.replace("users = 2\n", "users = 2\npattern = \"mesh\"\n");
        let e = Scenario::parse(&text, "p.toml").expect_err("unknown");
        assert!(e.message.contains("pairs, ring, star or one-way"), "{e}");
    }
}
