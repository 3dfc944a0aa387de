//! The push node: content-free wake-ups for devices with no live connection (seed 001:
//! "if offline, save to their inbox first, then send APNs/FCM push").
//!
//! - A wake-up carries a pending count and nothing else: the type has no field that could
//!   hold message content.
//! - Per-platform rate limits (token buckets): past them a wake-up is dropped and counted,
//!   never queued without bound; the inbox still holds the message and the phone syncs
//!   when it next connects.
//! - One wake-up per user per `coalesce_ms`: a phone syncs everything on waking.
//! - Dead tokens (the provider answered "unregistered") are deleted.
//! - Bounded: at most `max_tokens` device tokens, and coalescing windows are forgotten
//!   once over.

use crate::core::ratelimit::TokenBucket;
use crate::ids::{DeviceId, Millis, UserId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A push platform (APNs, FCM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Apns,
    Fcm,
}

/// A message to the push node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PushMsg {
    /// `device` of `user` can be woken through `platform` with `token`.
    RegisterToken {
        user: UserId,
        device: DeviceId,
        platform: Platform,
        token: String,
    },
    /// `user` has `pending` messages waiting and no live device (from a chat shard).
    Wake { user: UserId, pending: u32 },
    /// The provider said `token` is no longer registered.
    TokenDead { platform: Platform, token: String },
}

/// One wake-up to hand to a provider: where, and how many messages wait. No content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeUp {
    pub platform: Platform,
    pub token: String,
    pub pending: u32,
}

/// What a message to the push node led to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushOut {
    pub send: Vec<WakeUp>,
    /// Wake-ups dropped by a platform's rate limit.
    pub rate_limited: u32,
    /// A registration refused because the node holds `max_tokens` already.
    pub refused: bool,
}

/// Per-platform limits and the node's bounds.
#[derive(Clone, Debug)]
pub struct PushLimits {
    pub per_platform_per_sec: u32,
    pub burst: u32,
    pub coalesce_ms: u64,
    pub max_tokens: usize,
}

/// The push node's state.
#[derive(Debug)]
pub struct Push {
    limits: PushLimits,
    tokens: BTreeMap<(UserId, DeviceId), (Platform, String)>,
    buckets: BTreeMap<Platform, TokenBucket>,
    last_wake: BTreeMap<UserId, Millis>,
}

impl Push {
    pub fn new(limits: PushLimits) -> Self {
        Push {
            limits,
            tokens: BTreeMap::new(),
            buckets: BTreeMap::new(),
            last_wake: BTreeMap::new(),
        }
    }

    /// Device tokens held.
    pub fn tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Handles one message at `now`.
    pub fn handle(&mut self, msg: PushMsg, now: Millis) -> PushOut {
        let mut out = PushOut::default();
        match msg {
            PushMsg::RegisterToken {
                user,
                device,
                platform,
                token,
            } => {
                let key = (user, device);
                if !self.tokens.contains_key(&key) && self.tokens.len() >= self.limits.max_tokens {
                    out.refused = true;
                } else {
                    self.tokens.insert(key, (platform, token));
                }
            }
            PushMsg::TokenDead { platform, token } => {
                self.tokens
                    .retain(|_, (p, t)| !(*p == platform && *t == token));
            }
            PushMsg::Wake { user, pending } => {
                if self
                    .last_wake
                    .get(&user)
                    .is_some_and(|t| now.since(*t) < self.limits.coalesce_ms)
                {
                    return out;
                }
                self.last_wake.insert(user.clone(), now);
                // Bounded: forget coalescing windows that are over once it grows.
                if self.last_wake.len() > self.limits.max_tokens {
                    let gap = self.limits.coalesce_ms;
                    self.last_wake.retain(|_, t| now.since(*t) < gap);
                }
                let from = (user.clone(), DeviceId(String::new()));
                let targets: Vec<(Platform, String)> = self
                    .tokens
                    .range(from..)
                    .take_while(|((u, _), _)| *u == user)
                    .map(|(_, v)| v.clone())
                    .collect();
                for (platform, token) in targets {
                    let (rate, burst) = (self.limits.per_platform_per_sec, self.limits.burst);
                    let bucket = self
                        .buckets
                        .entry(platform)
                        .or_insert_with(|| TokenBucket::full(burst, now));
                    if bucket.try_take(rate, burst, now).is_ok() {
                        out.send.push(WakeUp {
                            platform,
                            token,
                            pending,
                        });
                    } else {
                        out.rate_limited += 1;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(rate: u32, burst: u32) -> Push {
        Push::new(PushLimits {
            per_platform_per_sec: rate,
            burst,
            coalesce_ms: 1_000,
            max_tokens: 3,
        })
    }

    fn token(p: &mut Push, user: &str, device: &str, platform: Platform, t: &str) -> PushOut {
        p.handle(
            PushMsg::RegisterToken {
                user: user.into(),
                device: device.into(),
                platform,
                token: t.into(),
            },
            Millis(0),
        )
    }

    fn wake(p: &mut Push, user: &str, now: u64) -> PushOut {
        p.handle(
            PushMsg::Wake {
                user: user.into(),
                pending: 2,
            },
            Millis(now),
        )
    }

    #[test]
    fn a_wake_reaches_every_device_of_the_user_with_only_a_count() {
        let mut p = node(100, 100);
        token(&mut p, "bob", "phone", Platform::Apns, "t1");
        token(&mut p, "bob", "tablet", Platform::Fcm, "t2");
        token(&mut p, "bobby", "phone", Platform::Fcm, "t3");
        let out = wake(&mut p, "bob", 10);
        assert_eq!(
            out.send,
            vec![
                WakeUp {
                    platform: Platform::Apns,
                    token: "t1".into(),
                    pending: 2
                },
                WakeUp {
                    platform: Platform::Fcm,
                    token: "t2".into(),
                    pending: 2
                },
            ]
        );
        // Coalesced: a second wake within a second sends nothing.
        assert!(wake(&mut p, "bob", 500).send.is_empty());
        assert_eq!(wake(&mut p, "bob", 1_010).send.len(), 2);
    }

    #[test]
    fn past_the_platform_limit_wakes_are_dropped_and_counted() {
        let mut p = node(1, 1);
        token(&mut p, "a", "d", Platform::Apns, "ta");
        token(&mut p, "b", "d", Platform::Apns, "tb");
        assert_eq!(wake(&mut p, "a", 0).send.len(), 1);
        let out = wake(&mut p, "b", 0);
        assert_eq!((out.send.len(), out.rate_limited), (0, 1));
    }

    #[test]
    fn dead_tokens_are_deleted_and_the_token_table_is_bounded() {
        let mut p = node(100, 100);
        token(&mut p, "a", "d", Platform::Apns, "ta");
        token(&mut p, "b", "d", Platform::Apns, "tb");
        token(&mut p, "c", "d", Platform::Apns, "tc");
        assert!(token(&mut p, "e", "d", Platform::Apns, "te").refused);
        p.handle(
            PushMsg::TokenDead {
                platform: Platform::Apns,
                token: "ta".into(),
            },
            Millis(0),
        );
        assert_eq!(p.tokens(), 2);
        assert!(wake(&mut p, "a", 0).send.is_empty());
        assert!(!token(&mut p, "e", "d", Platform::Apns, "te").refused);
    }
}
