//! Where the traffic goes: messages per storage partition and the hottest conversations,
//! for `/metrics`. The seeds ask operators to chart traffic per database partition, not
//! only global rates, and to find the hot group that overloads one partition. Bounded: a
//! fixed number of partitions, and a Space-Saving top-k summary per one-minute window
//! (at most `TOP_K` conversations tracked, whatever the number of conversations).

use crate::ids::{ConversationId, Millis};
use std::collections::BTreeMap;

/// Partitions the conversation keyspace is charted in (by a stable hash of the id).
pub const PARTITIONS: usize = 16;
/// Conversations the top-k summary tracks at once.
pub const TOP_K: usize = 32;
/// Length of one window of the hottest-conversation summary.
pub const WINDOW_MS: u64 = 60_000;

/// The partition `conv` is charted in: FNV-1a of its id, modulo `PARTITIONS`.
pub fn partition_of(conv: &ConversationId) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in conv.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % PARTITIONS as u64) as usize
}

/// Message counters by partition and the hottest conversations of the last window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hot {
    /// Messages stored per partition since start.
    pub per_partition: [u64; PARTITIONS],
    window_start: Option<Millis>,
    /// Space-Saving counts of the current window: conversation → (count, overcount).
    current: BTreeMap<ConversationId, (u64, u64)>,
    /// The last complete window's hottest conversation and its count (at least that
    /// many messages, at most count + overcount).
    last: Option<(ConversationId, u64)>,
}

impl Hot {
    /// Counts one message stored in `conv` at `now`.
    pub fn record(&mut self, conv: &ConversationId, now: Millis) {
        self.roll(now);
        self.per_partition[partition_of(conv)] += 1;
        if let Some(e) = self.current.get_mut(conv) {
            e.0 += 1;
            return;
        }
        if self.current.len() < TOP_K {
            self.current.insert(conv.clone(), (1, 0));
            return;
        }
        // Space-Saving: the newcomer takes the place of the smallest count, inheriting it
        // as its possible overcount (ties broken by id: deterministic).
        let Some((evict, (min, _))) = self
            .current
            .iter()
            .min_by(|a, b| a.1 .0.cmp(&b.1 .0).then(a.0.cmp(b.0)))
            .map(|(k, v)| (k.clone(), *v))
        else {
            return;
        };
        self.current.remove(&evict);
        self.current.insert(conv.clone(), (min + 1, min));
    }

    /// Closes the window if `now` is past it (an idle gap closes it empty).
    fn roll(&mut self, now: Millis) {
        let start = *self.window_start.get_or_insert(now);
        if now.0 >= start.0 + WINDOW_MS {
            self.last = self.hottest_now();
            self.current.clear();
            let skipped = (now.0 - start.0) / WINDOW_MS;
            if skipped > 1 {
                self.last = None; // a whole window passed with nothing stored
            }
            self.window_start = Some(Millis(start.0 + skipped * WINDOW_MS));
        }
    }

    fn hottest_now(&self) -> Option<(ConversationId, u64)> {
        self.current
            .iter()
            .max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.0.cmp(a.0)))
            .map(|(k, v)| (k.clone(), v.0))
    }

    /// The hottest conversation of the last complete window, with its message count.
    pub fn hottest(&self, now: Millis) -> Option<(ConversationId, u64)> {
        let mut me = self.clone();
        me.roll(now);
        me.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ConversationId {
        ConversationId(s.to_string())
    }

    #[test]
    fn the_hot_group_of_the_last_minute_is_named_and_partitions_add_up() {
        let mut h = Hot::default();
        for i in 0..1000u64 {
            // One hot group among many quiet chats, more of them than the summary holds.
            h.record(&c("grp:hot"), Millis(i * 50));
            h.record(&c(&format!("dm:a{i}:b{i}")), Millis(i * 50));
        }
        assert_eq!(h.per_partition.iter().sum::<u64>(), 2000);
        assert!(h.per_partition.iter().filter(|n| **n > 0).count() > 1);
        let (conv, n) = h.hottest(Millis(60_001)).expect("a window closed");
        assert_eq!(conv, c("grp:hot"));
        assert_eq!(n, 1000);
        // Nothing for a whole window: no hottest conversation any more.
        assert_eq!(h.hottest(Millis(200_000)), None);
    }

    #[test]
    fn the_summary_stays_bounded() {
        let mut h = Hot::default();
        for i in 0..10_000u64 {
            h.record(&c(&format!("dm:u{i}:v{i}")), Millis(i));
        }
        assert!(h.current.len() <= TOP_K);
    }
}
