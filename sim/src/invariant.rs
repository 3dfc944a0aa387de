//! The invariants by name: what the oracle checks, what `expect.violations` lists, and
//! what the phones flag the moment they see it happen (a breach recorded in the ledger).
//!
//! It sits below every other module (scenario files name these kinds, the ledger records
//! them during a run, the oracle adds the end-of-run ones), so imports flow one way.

use serde::{Deserialize, Serialize};

/// The invariants, by name (also what `expect.violations` lists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// An acked message never reached a device that must show it, or a valid send was
    /// refused for good.
    Loss,
    /// A device shows one send twice, or a retry got a second seq.
    Duplicate,
    /// A device's conversation has a gap, or a later tap by one device got a lower seq.
    Order,
    /// A sender saw a status go backward (or a group count decrease).
    ReceiptRegression,
    /// A receipt claimed more than happened: ✓✓ before any recipient device had the
    /// message, blue before any recipient read it, a group count above the truth.
    FalseReceipt,
    /// A phone saw an ack for a message that was not durable (and replicated) yet.
    NotDurable,
    /// The server resent a message the device had acked (and the server had read the ack).
    Redelivery,
    /// A device showed a message of a group its user was not a member of.
    NonMember,
    /// Plaintext reached the server (a commit, a push, a log line).
    Plaintext,
    /// An outbound queue held more frames or bytes than its bound.
    QueueBound,
    /// Inbox copies of messages every device of the user shows were still stored at the end.
    StorageLeak,
    /// A simulated task panicked or a lock was poisoned.
    Panic,
    /// After the quiet phase, something was still pending or presence had not converged.
    Liveness,
    /// The server let a device in with a token that had expired by its own clock.
    Auth,
    /// A `typing` notice reached the typist's own device, a non-participant, or claimed a
    /// user typed who never did in that conversation.
    Typing,
}

impl ViolationKind {
    /// Every kind, in report order.
    pub const ALL: [ViolationKind; 15] = [
        ViolationKind::Loss,
        ViolationKind::Duplicate,
        ViolationKind::Order,
        ViolationKind::ReceiptRegression,
        ViolationKind::FalseReceipt,
        ViolationKind::NotDurable,
        ViolationKind::Redelivery,
        ViolationKind::NonMember,
        ViolationKind::Plaintext,
        ViolationKind::QueueBound,
        ViolationKind::StorageLeak,
        ViolationKind::Panic,
        ViolationKind::Liveness,
        ViolationKind::Auth,
        ViolationKind::Typing,
    ];

    /// Name as written in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            ViolationKind::Loss => "loss",
            ViolationKind::Duplicate => "duplicate",
            ViolationKind::Order => "order",
            ViolationKind::ReceiptRegression => "receipt_regression",
            ViolationKind::FalseReceipt => "false_receipt",
            ViolationKind::NotDurable => "not_durable",
            ViolationKind::Redelivery => "redelivery",
            ViolationKind::NonMember => "non_member",
            ViolationKind::Plaintext => "plaintext",
            ViolationKind::QueueBound => "queue_bound",
            ViolationKind::StorageLeak => "storage_leak",
            ViolationKind::Panic => "panic",
            ViolationKind::Liveness => "liveness",
            ViolationKind::Auth => "auth",
            ViolationKind::Typing => "typing",
        }
    }
}

/// A violation seen while the run was going on (by a phone, the disk or the world), with
/// what a report needs; the oracle turns it into a `Violation` with trace context.
#[derive(Clone, Debug, PartialEq)]
pub struct Breach {
    pub kind: ViolationKind,
    /// Simulated ms.
    pub t: u64,
    pub conversation: Option<String>,
    pub device: Option<String>,
    pub cmid: Option<String>,
    pub expected: String,
    pub seen: String,
}
