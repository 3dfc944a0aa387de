//! The bounded outbound queue of one connection, and what happens when it fills.
//!
//! Seed 002: "limit queue size per connection; merge repeated typing events; disconnect
//! gracefully and give a resume token". Frames are classed when queued: `Essential` frames
//! (messages, acks, receipts) are never dropped: they live in the inbox too, so when the
//! queue cannot take one the connection is closed and the client syncs. `Droppable` frames
//! (typing, presence, group receipt counts) are coalesced by key and shed first.

use std::collections::VecDeque;

/// How a queued frame may be treated under pressure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameClass {
    /// Must reach the client or the client must be told to resync.
    Essential,
    /// May be replaced by a newer frame with the same key, or dropped.
    Droppable,
    /// Droppable, and queued only if it fits as the queue is: it sheds nothing to make
    /// room. For answers to a query the client repeats (status answers), which must not
    /// push out one another: a later answer shedding an earlier one of the same query
    /// would starve the earlier ones on every repeat.
    Spare,
}

#[derive(Debug)]
struct Queued {
    text: String,
    class: FrameClass,
    coalesce_key: Option<String>,
    /// Commits made before this frame was queued: it may leave only once they are durable.
    after: u64,
}

/// What `push` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued at the back.
    Queued,
    /// Replaced an older frame with the same coalescing key, in place.
    Coalesced,
    /// A droppable frame that did not fit; it was discarded.
    Dropped,
    /// An essential frame that did not fit even after shedding droppable ones: the
    /// connection must be closed (its messages wait in the inbox).
    Overflow,
}

/// A bounded FIFO of encoded frames, limited in count and bytes.
#[derive(Debug)]
pub struct OutboundQueue {
    frames: VecDeque<Queued>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    /// Droppable frames discarded so far.
    pub dropped: u64,
    /// Highest depth seen, in frames.
    pub high_water: usize,
    /// Planted bug `unbounded-outbound-queue`: ignore the bounds.
    pub unbounded: bool,
}

impl OutboundQueue {
    /// An empty queue with these bounds.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        assert!(
            max_frames > 0 && max_bytes > 0,
            "queue bounds must be positive"
        );
        OutboundQueue {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames,
            max_bytes,
            dropped: 0,
            high_water: 0,
            unbounded: false,
        }
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes queued now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn fits(&self, extra: usize) -> bool {
        self.unbounded
            || self.frames.len() < self.max_frames && self.bytes + extra <= self.max_bytes
    }

    /// Queues `text`, coalescing, shedding or refusing as the class and bounds require.
    pub fn push(
        &mut self,
        text: String,
        class: FrameClass,
        coalesce_key: Option<String>,
    ) -> PushOutcome {
        self.push_after(text, class, coalesce_key, 0)
    }

    /// `push` for a frame that may leave only once the first `after` commits are durable
    /// (group commit: see `drain_durable`).
    pub fn push_after(
        &mut self,
        text: String,
        class: FrameClass,
        coalesce_key: Option<String>,
        after: u64,
    ) -> PushOutcome {
        if let Some(k) = &coalesce_key {
            if let Some(old) = self
                .frames
                .iter_mut()
                .find(|q| q.coalesce_key.as_deref() == Some(k.as_str()))
            {
                if self.bytes - old.text.len() + text.len() <= self.max_bytes {
                    self.bytes = self.bytes - old.text.len() + text.len();
                    old.text = text;
                    // The newer text may tell of newer commits.
                    old.after = old.after.max(after);
                    return PushOutcome::Coalesced;
                }
            }
        }
        while class != FrameClass::Spare && !self.fits(text.len()) {
            match self
                .frames
                .iter()
                .position(|q| q.class != FrameClass::Essential)
            {
                Some(i) => {
                    if let Some(q) = self.frames.remove(i) {
                        self.bytes -= q.text.len();
                        self.dropped += 1;
                    }
                }
                None => break,
            }
        }
        if !self.fits(text.len()) {
            return match class {
                FrameClass::Droppable | FrameClass::Spare => {
                    self.dropped += 1;
                    PushOutcome::Dropped
                }
                FrameClass::Essential => PushOutcome::Overflow,
            };
        }
        self.bytes += text.len();
        self.frames.push_back(Queued {
            text,
            class,
            coalesce_key,
            after,
        });
        self.high_water = self.high_water.max(self.frames.len());
        debug_assert!(
            self.unbounded
                || (self.frames.len() <= self.max_frames && self.bytes <= self.max_bytes)
        );
        PushOutcome::Queued
    }

    /// Takes up to `max` frames from the front, oldest first.
    pub fn drain(&mut self, max: usize) -> Vec<String> {
        self.drain_durable(max, u64::MAX).0
    }

    /// Takes up to `max` frames from the front, oldest first, stopping at the first that
    /// must wait for a commit past `durable` (order is kept: what follows it waits too).
    /// The flag says whether such a frame is waiting.
    pub fn drain_durable(&mut self, max: usize, durable: u64) -> (Vec<String>, bool) {
        let ready = self
            .frames
            .iter()
            .take(max)
            .take_while(|q| q.after <= durable)
            .count();
        let mut out = Vec::with_capacity(ready);
        for q in self.frames.drain(..ready) {
            self.bytes -= q.text.len();
            out.push(q.text);
        }
        let waiting = self.frames.front().is_some_and(|q| q.after > durable);
        (out, waiting)
    }

    /// Empties the queue (the connection is closing; its messages wait in the inbox).
    pub fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_frame_waits_for_the_commits_before_it_and_holds_those_behind_it() {
        let mut q = OutboundQueue::new(10, 1000);
        q.push_after("ack1".into(), FrameClass::Essential, None, 1);
        q.push_after("ack2".into(), FrameClass::Essential, None, 2);
        q.push_after("pong".into(), FrameClass::Essential, None, 2);
        assert_eq!(q.drain_durable(10, 0), (Vec::<String>::new(), true));
        assert_eq!(q.drain_durable(10, 1), (vec!["ack1".to_string()], true));
        assert_eq!(
            q.drain_durable(10, 2),
            (vec!["ack2".to_string(), "pong".to_string()], false)
        );
    }

    #[test]
    fn a_coalesced_frame_waits_for_the_newer_commits() {
        let mut q = OutboundQueue::new(10, 1000);
        q.push_after("count=1".into(), FrameClass::Droppable, Some("g".into()), 1);
        q.push_after("count=2".into(), FrameClass::Droppable, Some("g".into()), 3);
        assert_eq!(q.drain_durable(10, 2), (Vec::<String>::new(), true));
        assert_eq!(q.drain_durable(10, 3).0, vec!["count=2".to_string()]);
    }

    #[test]
    fn typing_frames_with_the_same_key_are_coalesced() {
        let mut q = OutboundQueue::new(10, 1000);
        q.push("t1".into(), FrameClass::Droppable, Some("typing:c".into()));
        q.push("m1".into(), FrameClass::Essential, None);
        let o = q.push("t2".into(), FrameClass::Droppable, Some("typing:c".into()));
        assert_eq!(o, PushOutcome::Coalesced);
        assert_eq!(q.drain(10), vec!["t2".to_string(), "m1".to_string()]);
    }

    #[test]
    fn droppable_frames_are_shed_before_an_essential_frame_overflows() {
        let mut q = OutboundQueue::new(3, 1000);
        q.push("p1".into(), FrameClass::Droppable, Some("a".into()));
        q.push("m1".into(), FrameClass::Essential, None);
        q.push("p2".into(), FrameClass::Droppable, Some("b".into()));
        assert_eq!(
            q.push("m2".into(), FrameClass::Essential, None),
            PushOutcome::Queued
        );
        assert_eq!(q.dropped, 1);
        assert_eq!(
            q.push("m3".into(), FrameClass::Essential, None),
            PushOutcome::Queued
        );
        assert_eq!(
            q.push("m4".into(), FrameClass::Essential, None),
            PushOutcome::Overflow
        );
        assert_eq!(
            q.push("p3".into(), FrameClass::Droppable, None),
            PushOutcome::Dropped
        );
        assert_eq!(q.drain(10), vec!["m1", "m2", "m3"]);
    }

    #[test]
    fn a_spare_frame_sheds_nothing_but_is_shed_for_others() {
        let mut q = OutboundQueue::new(2, 1000);
        q.push("a1".into(), FrameClass::Spare, None);
        q.push("a2".into(), FrameClass::Spare, None);
        // A later answer of the same query does not push out an earlier one...
        assert_eq!(
            q.push("a3".into(), FrameClass::Spare, None),
            PushOutcome::Dropped
        );
        // ...nor a droppable frame already queued; but an essential frame sheds it.
        assert_eq!(
            q.push("m1".into(), FrameClass::Essential, None),
            PushOutcome::Queued
        );
        assert_eq!(q.drain(10), vec!["a2", "m1"]);
    }

    #[test]
    fn byte_bound_is_enforced() {
        let mut q = OutboundQueue::new(100, 10);
        assert_eq!(
            q.push("12345".into(), FrameClass::Essential, None),
            PushOutcome::Queued
        );
        assert_eq!(
            q.push("123456".into(), FrameClass::Essential, None),
            PushOutcome::Overflow
        );
        assert_eq!(q.bytes(), 5);
    }

    proptest! {
        #[test]
        fn queue_never_exceeds_its_bounds_and_keeps_essential_order(
            ops in proptest::collection::vec((any::<bool>(), 1usize..40, 0u8..4), 1..200)
        ) {
            let mut q = OutboundQueue::new(8, 120);
            let mut essential_in = Vec::new();
            let mut out = Vec::new();
            for (i, (essential, len, key)) in ops.into_iter().enumerate() {
                if i % 7 == 6 { out.extend(q.drain(3)); }
                let text = format!("{}{}", if essential {'E'} else {'D'}, "x".repeat(len));
                let text = format!("{i:04}{text}");
                let class = if essential { FrameClass::Essential } else { FrameClass::Droppable };
                let ck = if essential { None } else { Some(format!("k{key}")) };
                let o = q.push(text.clone(), class, ck);
                if essential && o == PushOutcome::Queued { essential_in.push(text); }
                prop_assert!(q.len() <= 8 && q.bytes() <= 120);
            }
            out.extend(q.drain(usize::MAX));
            let essential_out: Vec<_> = out.into_iter().filter(|t| t.as_bytes()[4] == b'E').collect();
            prop_assert_eq!(essential_out, essential_in);
        }
    }
}
