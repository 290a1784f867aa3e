//! Per-user event-time ordering with a grace period.
//!
//! Events may arrive slightly out of order (batching, multiple devices). The buffer holds each
//! event until the user's newest event time is `grace` ahead of it, then releases events in time
//! order. An event older than the last released one cannot be placed any more: it is counted as
//! late and dropped, because the windows it belonged to are already scored.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::event::KeyEvent;

/// Most events held at once. Typing puts a handful within any grace; past this many the oldest
/// is released early, so a flood of events stamped at one instant cannot grow a user's state
/// (and its changelog record) without bound.
pub const MAX_HELD: usize = 256;

/// Outcome of [`ReorderBuffer::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Buffered; it will be released in order.
    Accepted,
    /// Older than what was already released: counted and dropped.
    Late,
}

/// Holds a user's not-yet-released events, sorted by time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReorderBuffer {
    pending: VecDeque<KeyEvent>,
    /// Time of the newest event seen.
    newest_us: Option<i64>,
    /// Time of the last event released; nothing older is accepted.
    released_us: Option<i64>,
    /// Events dropped for arriving after their slot was released.
    late_events: u64,
}

impl ReorderBuffer {
    /// Adds `event`, then hands every event that is now `grace_us` behind the newest one to
    /// `release`, oldest first. Equal times keep arrival order.
    pub fn push(&mut self, event: KeyEvent, grace_us: i64, mut release: impl FnMut(KeyEvent)) -> Admission {
        if self.released_us.is_some_and(|r| event.time_us < r) {
            self.late_events += 1;
            return Admission::Late;
        }
        if self.pending.back().is_none_or(|last| last.time_us <= event.time_us) {
            self.pending.push_back(event);
        } else {
            // Out of order: the search is over the short tail only.
            let at = self.pending.iter().rposition(|e| e.time_us <= event.time_us).map_or(0, |i| i + 1);
            self.pending.insert(at, event);
        }
        let newest = self.newest_us.map_or(event.time_us, |n| n.max(event.time_us));
        self.newest_us = Some(newest);
        let horizon = newest.saturating_sub(grace_us);
        while self.pending.front().is_some_and(|e| e.time_us <= horizon) || self.pending.len() > MAX_HELD {
            let e = self.pending.pop_front().expect("front checked");
            self.released_us = Some(e.time_us);
            release(e);
        }
        Admission::Accepted
    }

    /// Releases everything still held, oldest first (idle close, end of input).
    pub fn flush(&mut self, mut release: impl FnMut(KeyEvent)) {
        while let Some(e) = self.pending.pop_front() {
            self.released_us = Some(e.time_us);
            release(e);
        }
    }

    /// Events dropped as late so far.
    pub fn late_events(&self) -> u64 {
        self.late_events
    }

    /// Number of events held back.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Time of the newest event seen, if any.
    pub fn newest_us(&self) -> Option<i64> {
        self.newest_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::KeyAction;
    use proptest::prelude::*;

    fn ev(t: i64) -> KeyEvent {
        KeyEvent::new(t, 30, KeyAction::Down)
    }

    fn push_all(buf: &mut ReorderBuffer, times: &[i64], grace: i64) -> Vec<i64> {
        let mut out = Vec::new();
        for &t in times {
            buf.push(ev(t), grace, |e| out.push(e.time_us));
        }
        out
    }

    #[test]
    fn small_reordering_within_grace_is_absorbed() {
        let mut buf = ReorderBuffer::default();
        let mut out = push_all(&mut buf, &[100, 300, 200, 400, 1000], 300);
        buf.flush(|e| out.push(e.time_us));
        assert_eq!(out, vec![100, 200, 300, 400, 1000]);
        assert_eq!(buf.late_events(), 0);
    }

    #[test]
    fn event_older_than_released_is_late() {
        let mut buf = ReorderBuffer::default();
        let out = push_all(&mut buf, &[100, 1000, 50], 100);
        assert_eq!(out, vec![100]);
        assert_eq!(buf.late_events(), 1);
        assert_eq!(buf.pending_len(), 1, "the late event is not buffered");
    }

    #[test]
    fn a_flood_at_one_instant_is_held_only_up_to_the_cap() {
        let mut buf = ReorderBuffer::default();
        let out = push_all(&mut buf, &vec![7; 10_000], 200);
        assert_eq!(buf.pending_len(), MAX_HELD);
        assert_eq!(out.len() + MAX_HELD, 10_000, "the rest released early, in order, none lost");
    }

    #[test]
    fn zero_grace_releases_immediately() {
        let mut buf = ReorderBuffer::default();
        assert_eq!(push_all(&mut buf, &[5, 5, 9], 0), vec![5, 5, 9]);
    }

    proptest! {
        /// Whatever the arrival order, released events are sorted and nothing is lost or
        /// duplicated: every event is released or counted late.
        #[test]
        fn releases_sorted_and_conserves_events(
            times in proptest::collection::vec(0i64..10_000, 0..200),
            grace in 0i64..3_000,
        ) {
            let mut buf = ReorderBuffer::default();
            let mut out = push_all(&mut buf, &times, grace);
            buf.flush(|e| out.push(e.time_us));
            prop_assert!(out.windows(2).all(|w| w[0] <= w[1]));
            prop_assert_eq!(out.len() as u64 + buf.late_events(), times.len() as u64);
        }
    }
}
