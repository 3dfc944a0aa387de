//! A small harness for driving the core in unit tests: connect and authenticate devices,
//! send client frames, and read back decoded server frames.

use super::{ChatCore, Effects};
use crate::auth::{mint, Secret};
use crate::config::Limits;
use crate::ids::{ConnId, GatewayId, Millis, RegionId};
use crate::protocol::ServerFrame;
use crate::store::MemoryStore;

pub const SECRET: &[u8] = b"test-secret-0123456789";

pub struct Harness {
    pub core: ChatCore<MemoryStore>,
    pub store: MemoryStore,
    pub now: Millis,
    /// Every push request emitted so far.
    pub pushes: Vec<super::PushRequest>,
    /// Every close emitted so far.
    pub closes: Vec<super::Close>,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Self {
        let store = MemoryStore::new();
        Self::with_store(limits, store)
    }

    /// A core over an existing store (a "restart" keeps the store, loses the rest).
    pub fn with_store(limits: Limits, store: MemoryStore) -> Self {
        let secret = Secret::new(SECRET.to_vec()).expect("secret");
        let mut core = ChatCore::new(limits, secret, store.clone());
        core.add_gateway(GatewayId::from("gw1"), RegionId::from("eu"));
        core.add_gateway(GatewayId::from("gw2"), RegionId::from("us"));
        Harness {
            core,
            store,
            now: Millis(1_700_000_000_000),
            pushes: Vec::new(),
            closes: Vec::new(),
        }
    }

    pub fn token(&self, user: &str, device: &str) -> String {
        let secret = Secret::new(SECRET.to_vec()).expect("secret");
        mint(
            &secret,
            &user.into(),
            &device.into(),
            self.now.plus(3_600_000),
        )
    }

    fn absorb(&mut self, fx: Effects) {
        self.pushes.extend(fx.push);
        self.closes.extend(fx.close);
    }

    /// Opens a connection on gateway `gw` without authenticating.
    pub fn open(&mut self, gw: &str) -> ConnId {
        self.core
            .connect(&GatewayId::from(gw), self.now)
            .expect("gateway up")
    }

    /// Opens and authenticates `user`'s `device` on gw1; returns the connection after
    /// consuming `auth_success`.
    pub fn login(&mut self, user: &str, device: &str) -> ConnId {
        self.login_on(user, device, "gw1")
    }

    pub fn login_on(&mut self, user: &str, device: &str, gw: &str) -> ConnId {
        let c = self.open(gw);
        let tok = self.token(user, device);
        self.send(
            c,
            &format!(
                r#"{{"type":"auth","payload":{{"user_id":"{user}","auth_token":"{tok}","device_id":"{device}"}}}}"#
            ),
        );
        let frames = self.recv(c);
        assert!(
            matches!(frames.first(), Some(ServerFrame::AuthSuccess { .. })),
            "login failed: {frames:?}"
        );
        c
    }

    /// Sends one raw text frame.
    pub fn send(&mut self, c: ConnId, text: &str) {
        let fx = self.core.on_text(c, text, self.now);
        self.absorb(fx);
    }

    /// Sends a 1:1 message.
    pub fn say(&mut self, c: ConnId, to: &str, cmid: &str, content: &str) {
        self.send(
            c,
            &format!(
                r#"{{"type":"message","client_message_id":"{cmid}","payload":{{"receiver_id":"{to}","content":"{content}"}}}}"#
            ),
        );
    }

    /// Everything queued for `c`, decoded.
    pub fn recv(&mut self, c: ConnId) -> Vec<ServerFrame> {
        self.core
            .drain(c, usize::MAX)
            .iter()
            .map(|t| serde_json::from_str(t).expect("server frames decode"))
            .collect()
    }

    /// Advances time and ticks the core.
    pub fn advance(&mut self, ms: u64) {
        self.now = self.now.plus(ms);
        let fx = self.core.tick(self.now);
        self.absorb(fx);
    }

    pub fn disconnect(&mut self, c: ConnId) {
        let fx = self.core.disconnected(c, self.now);
        self.absorb(fx);
    }
}
