//! The tiered server's nodes (issue 11), each a sans-IO state machine that owns its own
//! state and talks to the others only through messages: `handle(msg, now) -> replies`.
//! So far the registry and push; `core::ChatCore` still serves every runtime until the
//! gateway and chat-shard nodes exist and are wired in (see ARCHITECTURE.md).

pub mod push;
pub mod registry;
