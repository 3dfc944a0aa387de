//! Fault points inside the chat service (BUGGIFY, after FoundationDB's simulator).
//!
//! The simulator arms them per seed to crash the service between a commit and its ack,
//! between the ack and the fan-out or in the middle of a fan-out, to slow a gateway's
//! handlers or freeze it (a process pause), and to make the server's clock jump. The real
//! server never arms them; unarmed, each point costs one branch.

use crate::ids::GatewayId;
use std::time::Duration;

/// Where the chat service may be made to fail. Every method has a harmless default.
pub trait FaultPoints: Send + Sync {
    /// A frame handled by `gateway` committed at least one new message. Its ack and
    /// fan-out are queued, none written yet. Return true to crash the chat service now:
    /// the commit stays, the queued frames are lost with the process.
    fn after_commit(&self, _gateway: &GatewayId) -> bool {
        false
    }

    /// `gateway` has just written `frames` (JSON text) to one socket. Return true to
    /// crash the chat service now (after an ack, or part-way through a fan-out).
    fn after_write(&self, _gateway: &GatewayId, _frames: &[String]) -> bool {
        false
    }

    /// How long `gateway` waits before handling the next frame it read or writing the
    /// next batch: a slow handler, or a frozen process until it resumes.
    fn hold(&self, _gateway: &GatewayId) -> Option<Duration> {
        None
    }

    /// Milliseconds added to the server's clock (a clock step forward or backward).
    fn clock_offset_ms(&self) -> i64 {
        0
    }

    /// Crashes and restarts the chat service: volatile state is lost, the store keeps
    /// what it made durable. Called by the points above when they return true.
    fn crash(&self, hub: &super::Hub);
}
