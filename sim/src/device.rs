//! What every simulated device of a run shares: the run's plan and ledger, the faults'
//! effect on each device (`Control`), the simulated clock and names, and the order in
//! which a device tries gateways. The phone's WebSocket session (`client`) and its media
//! lane (`media`) both build on it, so neither imports the other's internals.

use crate::ledger::{DeviceKey, Ledger};
use crate::plan::{device_name, user_name, Plan};
use crate::scenario::Scenario;
use model_server::auth::{mint, Secret};
use model_server::ids::Millis;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// Simulated epoch (ms since 1970) at the start of every run.
pub const EPOCH_MS: u64 = 1_700_000_000_000;

/// Simulated ms since the start of the run.
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed()
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What faults have done to one device; read by its task.
#[derive(Clone, Debug, Default)]
pub struct Control {
    /// App in the background or killed until then: no socket.
    pub away_until: u64,
    /// Bumped when the app is killed or backgrounded: the current socket must die.
    pub generation: u64,
    /// Reading at most this many frames per second (0: not reading) until `slow_until`.
    pub slow_rate: Option<u32>,
    pub slow_until: u64,
    /// Local clock error, ms.
    pub skew_ms: i64,
    /// The current absence is a battery death: the socket vanishes without a FIN.
    pub silent: bool,
}

/// Everything the device tasks share (single-threaded: turmoil runs hosts on one thread).
pub struct Ctx {
    pub sc: Scenario,
    pub plan: Plan,
    pub seed: u64,
    pub secret: Secret,
    pub ledger: Rc<RefCell<Ledger>>,
    pub control: Rc<RefCell<BTreeMap<DeviceKey, Control>>>,
    /// Sends of each device, by plan index, in time order.
    pub device_sends: BTreeMap<DeviceKey, Vec<usize>>,
    /// Conversation id of each send.
    pub send_conv: Vec<String>,
    /// Server group id of each planned group.
    pub group_ids: Vec<String>,
    pub cmid_index: BTreeMap<String, usize>,
    /// Where taps have got to, per device (durable: survives kills).
    pub tapped: RefCell<BTreeMap<DeviceKey, usize>>,
    /// Media uploads by send index (the phone's own record: survives kills).
    pub uploads: RefCell<BTreeMap<usize, Upload>>,
    /// (device, send) downloads started.
    pub downloads: RefCell<std::collections::BTreeSet<(DeviceKey, usize)>>,
    /// Planned groups whose `grow_at_ms` request has been sent.
    pub grown: RefCell<std::collections::BTreeSet<usize>>,
    pub end_ms: u64,
    /// The simulated disk under the chat service: an ack is checked against it at once.
    pub disk: crate::disk::SimDisk,
    /// Conversations each user takes part in at some time of the run (for per-conversation
    /// sync).
    pub user_convs: BTreeMap<usize, std::collections::BTreeSet<String>>,
    /// The server's retention (a late ack may answer a message already expired).
    pub retention_ms: u64,
    /// The server clock's steps the plan's clock jumps will make.
    pub clock: crate::horizon::ServerClock,
    /// With `client.token_life_ms`: each device's session token expiry, in server-clock
    /// ms after the epoch (kept across reconnects until refused).
    pub session_tokens: RefCell<BTreeMap<DeviceKey, i64>>,
}

impl Ctx {
    pub(crate) fn token(&self, u: usize, d: usize) -> String {
        mint(
            &self.secret,
            &user_name(u).as_str().into(),
            &device_name(d).as_str().into(),
            Millis(EPOCH_MS + self.end_ms + 86_400_000),
        )
    }

    /// The token a device authenticates its WebSocket with at simulated `now`, and its
    /// expiry by the server's clock (`None`: it outlives the run). With a token life, the
    /// device keeps the one it has, or logs in for a new one (minted by the server's clock).
    pub(crate) fn session_token(&self, k: DeviceKey, now: u64) -> (String, Option<i64>) {
        let Some(life) = self.sc.client.token_life_ms else {
            return (self.token(k.0, k.1), None);
        };
        let exp = *self
            .session_tokens
            .borrow_mut()
            .entry(k)
            .or_insert_with(|| self.clock.reading(now) + life as i64);
        let token = mint(
            &self.secret,
            &user_name(k.0).as_str().into(),
            &device_name(k.1).as_str().into(),
            Millis((EPOCH_MS as i64 + exp).max(0) as u64),
        );
        (token, Some(exp))
    }

    /// Moves sends whose tap time has come into the device's outbox. Offline-first: a tap
    /// lands in the local queue whether or not there is a connection.
    pub(crate) fn tap_due(&self, k: DeviceKey, now: u64) -> Vec<usize> {
        let Some(list) = self.device_sends.get(&k) else {
            return Vec::new();
        };
        let mut tapped = self.tapped.borrow_mut();
        let pos = tapped.entry(k).or_insert(0);
        let mut new = Vec::new();
        while *pos < list.len() && self.plan.sends[list[*pos]].at_ms <= now {
            new.push(list[*pos]);
            *pos += 1;
        }
        if !new.is_empty() {
            let mut l = self.ledger.borrow_mut();
            for &i in &new {
                l.device(k).outbox.push(i);
                let s = &self.plan.sends[i];
                l.sends[i].first_sent_ms.get_or_insert(s.at_ms);
                l.trace(
                    now,
                    dev(k),
                    "tap",
                    Some(&self.send_conv[i]),
                    None,
                    Some(&s.cmid),
                    "",
                );
            }
        }
        new
    }

    /// The send the user is typing now (the next one not yet tapped, if its typing phase
    /// has begun) and when its next `typing` notice is due, given the last one sent.
    pub(crate) fn typing(&self, k: DeviceKey, now: u64, last: Option<u64>) -> Option<(usize, u64)> {
        let w = &self.sc.workload;
        if w.typing_ms == 0 {
            return None;
        }
        let list = self.device_sends.get(&k)?;
        let pos = *self.tapped.borrow().get(&k).unwrap_or(&0);
        let &i = list.get(pos)?;
        let at = self.plan.sends[i].at_ms;
        let start = at.saturating_sub(w.typing_ms);
        let due = match last {
            Some(t) if t >= start => t + w.typing_every_ms,
            _ => start,
        };
        (due < at && at > now).then_some((i, due))
    }

    /// When the device's next tap is due, if any.
    pub(crate) fn next_tap(&self, k: DeviceKey) -> Option<u64> {
        let list = self.device_sends.get(&k)?;
        let pos = *self.tapped.borrow().get(&k).unwrap_or(&0);
        list.get(pos).map(|&i| self.plan.sends[i].at_ms)
    }

    pub(crate) fn control(&self, k: DeviceKey) -> Control {
        self.control.borrow().get(&k).cloned().unwrap_or_default()
    }
}

/// `u3/d0`.
pub fn dev(k: DeviceKey) -> String {
    format!("{}/{}", user_name(k.0), device_name(k.1))
}

/// Gateways to try, home region first, starting from this device's own gateway.
pub fn gateway_order(ctx: &Ctx, k: DeviceKey) -> Vec<String> {
    let regions = &ctx.sc.topology.regions;
    let home = &regions[k.0 % regions.len()];
    let all = ctx.sc.gateways();
    let mut home_gws: Vec<String> = all
        .iter()
        .filter(|(_, r)| r == home)
        .map(|(g, _)| g.clone())
        .collect();
    let rot = (k.0 * ctx.plan.devices_per_user + k.1) % home_gws.len().max(1);
    home_gws.rotate_left(rot);
    home_gws.extend(
        all.iter()
            .filter(|(_, r)| r != home)
            .map(|(g, _)| g.clone()),
    );
    home_gws
}

/// Where one send's upload has got to (kept on the phone: survives an app kill).
#[derive(Clone, Debug, Default)]
pub struct Upload {
    pub media_id: Option<String>,
    pub chunk_size: u64,
    pub received: u64,
    pub done: bool,
    /// A task is uploading it now.
    pub running: bool,
}
