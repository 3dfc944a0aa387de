//! The chatsim chat server model.
//!
//! - `core`: the sans-IO server (protocol handling, inbox, receipts, presence, groups,
//!   media, limits). Frames and `now` in; frames, closes and push requests out.
//! - `protocol`: the wire frames of docs/PROTOCOL.md.
//! - `store`: one storage trait with an in-memory and a durable (redb) backend.
//! - `auth`: HMAC-signed tokens.
//! - `runtime`: the tokio + tokio-tungstenite shell that serves the core on a socket,
//!   generic over the listener so the simulator can run it on turmoil.

pub mod auth;
pub mod config;
pub mod core;
pub mod ids;
pub mod nodes;
pub mod protocol;
pub mod runtime;
pub mod store;

pub use crate::core::{ChatCore, Effects};
pub use config::Limits;
