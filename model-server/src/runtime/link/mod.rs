//! The tiered server's first split (issue 11): gateway nodes that hold the client sockets
//! and reach the chat service over a network link, instead of calling it in-process.
//!
//! - `wire`: the link's messages and framing (docs/PROTOCOL.md, part 2).
//! - `chat`: the chat service's end (`ChatLinks`): serves each linked gateway's
//!   connections from the hub, declares silent links dead and closes their connections.
//! - `gateway`: the gateway node (`GatewayNode`): WebSocket sockets, the link to the chat
//!   service kept alive with pings and re-made when it dies; with no link it closes its
//!   clients (1012) and refuses new ones (503), so devices move to another gateway.
//!
//! Both ends run on tokio or, with the `sim` feature, on turmoil's network.

pub mod chat;
pub mod gateway;
pub mod wire;

pub use chat::ChatLinks;
pub use gateway::{Connector, GatewayNode, TcpConnector};

use std::time::Duration;

/// Timeouts and bounds of a link, the same at both ends.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// How often a gateway pings the chat service.
    pub ping_interval: Duration,
    /// A link with nothing received for this long is dead (both ends).
    pub dead_after: Duration,
    /// Longest wait for `hello` (chat service) or `welcome` (gateway), and for a connect.
    pub hello_timeout: Duration,
    /// Frames per `frames` batch (one batch per connection in flight).
    pub write_batch: usize,
    /// Messages waiting to be written on one link.
    pub queue: usize,
    /// Most links the chat service accepts at once.
    pub max_links: usize,
    /// Most client connections one link may hold.
    pub max_conns_per_link: usize,
    /// Longest a close's last frames wait for the group commit that covers them.
    pub settle_timeout: Duration,
    /// First wait before a gateway re-makes a dead link; doubles up to 2 s.
    pub retry_initial: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            ping_interval: Duration::from_millis(1_000),
            dead_after: Duration::from_millis(4_000),
            hello_timeout: Duration::from_millis(4_000),
            write_batch: 64,
            queue: 4_096,
            max_links: 256,
            max_conns_per_link: 100_000,
            settle_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(100),
        }
    }
}
