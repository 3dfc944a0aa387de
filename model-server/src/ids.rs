//! Newtypes for every identifier and quantity that crosses the wire or the store.
//!
//! They exist so that a `Seq` cannot be passed where a timestamp is expected and a
//! conversation id cannot be confused with a user id; the validating constructors are the
//! one place where client-supplied ids are checked.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest user, device or group id accepted from a client.
pub const MAX_ID_LEN: usize = 64;

/// True when `s` is a valid client-chosen id: 1..=64 of `[A-Za-z0-9_-]`.
///
/// The alphabet excludes `:`, `#` and `.` so that derived conversation ids, message ids
/// and auth tokens can be split back into their parts without ambiguity.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

string_id!(
    /// A user account (`alice`). Chosen by the identity system, carried in the auth token.
    UserId
);
string_id!(
    /// One device of a user (`phone`, `laptop`). A user may have several online at once.
    DeviceId
);
string_id!(
    /// A group, assigned by the server (`g1`, `g2`, ...).
    GroupId
);
string_id!(
    /// The sender's idempotency key for one send; the same on every retry of that send.
    ClientMsgId
);
string_id!(
    /// An uploaded media object, assigned by the server.
    MediaId
);
string_id!(
    /// A connection gateway (one WebSocket front-end process or host).
    GatewayId
);
string_id!(
    /// A region: a set of gateways, and the home of some users.
    RegionId
);

/// A conversation: a 1:1 chat between two users, or a group.
///
/// 1:1 ids are derived from the ordered pair (`dm:alice:bob`) so that both sides and every
/// retry name the same conversation without a lookup.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConversationId(pub String);

/// What a conversation id names, once parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConversationKind {
    /// A 1:1 chat between these two users (in sorted order).
    Direct(UserId, UserId),
    /// A group chat.
    Group(GroupId),
}

impl ConversationId {
    /// The 1:1 conversation between `a` and `b`; the same whichever side asks.
    pub fn direct(a: &UserId, b: &UserId) -> Self {
        let (x, y) = if a <= b { (a, b) } else { (b, a) };
        Self(format!("dm:{x}:{y}"))
    }

    /// The conversation of a group.
    pub fn group(g: &GroupId) -> Self {
        Self(format!("grp:{g}"))
    }

    /// Parses a client-supplied conversation id; `None` when it is not one we could issue.
    pub fn parse(s: &str) -> Option<(Self, ConversationKind)> {
        if let Some(rest) = s.strip_prefix("dm:") {
            let (a, b) = rest.split_once(':')?;
            if is_valid_id(a) && is_valid_id(b) && a < b {
                return Some((
                    Self(s.to_owned()),
                    ConversationKind::Direct(UserId(a.into()), UserId(b.into())),
                ));
            }
        } else if let Some(g) = s.strip_prefix("grp:") {
            if is_valid_id(g) {
                return Some((
                    Self(s.to_owned()),
                    ConversationKind::Group(GroupId(g.into())),
                ));
            }
        }
        None
    }

    /// What this id names. Ids are only built by `direct`, `group` and `parse`, so this holds.
    pub fn kind(&self) -> Option<ConversationKind> {
        Self::parse(&self.0).map(|(_, k)| k)
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Position of a message in its conversation: 1, 2, 3, ... with no gaps.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The seq after this one. Saturates: a client-supplied `after_seq` of `u64::MAX`
    /// must not overflow (it names no message, so the scan from it is simply empty).
    pub fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Server-assigned message id: the conversation and the seq, `dm:alice:bob#17`.
///
/// Deriving it from (conversation, seq) means receipts can be routed without an index, and
/// two messages can never share an id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub String);

impl MessageId {
    /// The id of message `seq` in `conv`.
    pub fn new(conv: &ConversationId, seq: Seq) -> Self {
        Self(format!("{conv}#{seq}"))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Splits an id back into (conversation, seq); `None` for anything we did not issue.
    pub fn parse(&self) -> Option<(ConversationId, ConversationKind, Seq)> {
        let (c, s) = self.0.rsplit_once('#')?;
        let seq: u64 = s.parse().ok()?;
        if seq == 0 {
            return None;
        }
        let (conv, kind) = ConversationId::parse(c)?;
        Some((conv, kind, Seq(seq)))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Milliseconds since the Unix epoch, as handed in by the runtime (the core has no clock).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// This instant plus `ms`.
    pub fn plus(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// One connection, numbered by the core in the order connections arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_conversation_id_is_the_same_from_both_sides() {
        let a = UserId::from("alice");
        let b = UserId::from("bob");
        assert_eq!(
            ConversationId::direct(&a, &b),
            ConversationId::direct(&b, &a)
        );
        assert_eq!(ConversationId::direct(&a, &b).as_str(), "dm:alice:bob");
    }

    #[test]
    fn message_id_round_trips_through_parse() {
        let conv = ConversationId::direct(&"bob".into(), &"alice".into());
        let id = MessageId::new(&conv, Seq(42));
        let (c, kind, s) = id.parse().expect("parses");
        assert_eq!(c, conv);
        assert_eq!(s, Seq(42));
        assert_eq!(kind, ConversationKind::Direct("alice".into(), "bob".into()));
    }

    #[test]
    fn forged_ids_do_not_parse() {
        for bad in [
            "dm:bob:alice#1",
            "dm:a:b#0",
            "dm:a#1",
            "grp:#3",
            "x:y#1",
            "dm:a:b#x",
        ] {
            assert!(MessageId(bad.into()).parse().is_none(), "{bad}");
        }
        assert!(!is_valid_id("a:b"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a.b"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }
}
