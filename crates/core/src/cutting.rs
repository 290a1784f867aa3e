//! How key events are cut into records, as the agent sends them: a user's events go out every
//! ~100 ms of typing or every `max_events`, whichever comes first, and a user who stops typing
//! has the last partial record sent once its span has passed.
//!
//! Pure: the agent (one user, live clock), the traffic simulator (many users, merged in time
//! order) and `metronome publish` (a keylog file) share [`RecordCutter`]; each hands the records
//! it emits to its own producer.

use std::collections::{HashMap, VecDeque};

use crate::event::KeyEvent;

/// How a publisher cuts a user's events into records. An agent sends a record every ~100 ms
/// or every `max_events`, whichever comes first: for human typing that is 1-2 events a record
/// (1.36 on average over the first 1.7 M rows of the Aalto data's subset A, cut into fixed 100 ms
/// slices per user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordShape {
    /// Most events per record.
    pub max_events: usize,
    /// A record spans at most this much event time (microseconds) from its first event; 0: cut
    /// by count alone.
    pub span_us: i64,
}

impl RecordShape {
    /// As the agent sends: every 100 ms of typing or `max_events` events.
    pub const fn agent(max_events: usize) -> Self {
        Self { max_events, span_us: 100_000 }
    }

    /// By count alone: `max_events` a record, however long they took to type.
    pub const fn by_count(max_events: usize) -> Self {
        Self { max_events, span_us: 0 }
    }
}

/// A record ready to send: one user's consecutive events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutRecord {
    /// The user.
    pub user_id: String,
    /// The session the events came from.
    pub session_id: String,
    /// The events, in the order they were pushed.
    pub events: Vec<KeyEvent>,
}

/// A user's record being filled.
#[derive(Debug, Default)]
struct Pending {
    session_id: String,
    events: Vec<KeyEvent>,
    /// Bumped at every cut, so stale entries of the expiry queue are recognised.
    generation: u64,
}

/// Cuts each user's events into records as a [`RecordShape`] says.
///
/// [`RecordCutter::push`] cuts on count and on span (an event past the span of the user's
/// pending record starts a new one); [`RecordCutter::expire`] cuts the pending records whose
/// span has passed by a clock (event time), for callers whose events arrive in time order: the
/// live agent and the simulator. A file sorted by user has no such clock and calls
/// [`RecordCutter::finish`] only.
#[derive(Debug)]
pub struct RecordCutter {
    shape: RecordShape,
    pending: HashMap<String, Pending>,
    /// `(first event time, user, generation)` of pending records, oldest first.
    expiry: VecDeque<(i64, String, u64)>,
}

impl RecordCutter {
    /// A cutter with no pending record.
    pub fn new(shape: RecordShape) -> Self {
        Self {
            shape: RecordShape { max_events: shape.max_events.max(1), ..shape },
            pending: HashMap::new(),
            expiry: VecDeque::new(),
        }
    }

    /// Adds one event of `user_id`; returns the records it completed (at most two: the user's
    /// previous record when the event falls past its span, and the new one when it is full).
    pub fn push(&mut self, user_id: &str, session_id: &str, event: KeyEvent) -> Vec<CutRecord> {
        let mut out = Vec::new();
        let span_us = self.shape.span_us;
        if !self.pending.contains_key(user_id) {
            // Allocates the user's name once, not on every event.
            self.pending.insert(user_id.to_owned(), Pending::default());
        }
        let pending = self.pending.get_mut(user_id).expect("inserted above");
        if span_us > 0 && pending.events.first().is_some_and(|first| event.time_us - first.time_us >= span_us) {
            out.push(Self::cut(user_id, pending));
        }
        if pending.events.is_empty() {
            pending.session_id.clear();
            pending.session_id.push_str(session_id);
            if span_us > 0 {
                self.expiry.push_back((event.time_us, user_id.to_owned(), pending.generation));
            }
        }
        pending.events.push(event);
        if pending.events.len() >= self.shape.max_events {
            out.push(Self::cut(user_id, pending));
        }
        out
    }

    /// Cuts every pending record whose span has passed at `now_us` (event time).
    pub fn expire(&mut self, now_us: i64) -> Vec<CutRecord> {
        let mut out = Vec::new();
        if self.shape.span_us <= 0 {
            return out;
        }
        while let Some((first_us, _, _)) = self.expiry.front() {
            if now_us - first_us < self.shape.span_us {
                break;
            }
            let (_, user, generation) = self.expiry.pop_front().expect("front exists");
            if let Some(p) = self.pending.get_mut(&user) {
                if p.generation == generation && !p.events.is_empty() {
                    out.push(Self::cut(&user, p));
                }
            }
        }
        out
    }

    /// Cuts every pending record, users in name order.
    pub fn finish(&mut self) -> Vec<CutRecord> {
        let mut users: Vec<String> =
            self.pending.iter().filter(|(_, p)| !p.events.is_empty()).map(|(u, _)| u.clone()).collect();
        users.sort_unstable();
        self.expiry.clear();
        users
            .into_iter()
            .map(|u| {
                let p = self.pending.get_mut(&u).expect("listed above");
                Self::cut(&u, p)
            })
            .collect()
    }

    /// Distinct users seen so far.
    pub fn users(&self) -> usize {
        self.pending.len()
    }

    fn cut(user_id: &str, pending: &mut Pending) -> CutRecord {
        pending.generation += 1;
        CutRecord {
            user_id: user_id.to_owned(),
            session_id: pending.session_id.clone(),
            events: std::mem::take(&mut pending.events),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::KeyAction;

    fn down(time_ms: i64) -> KeyEvent {
        KeyEvent::new(time_ms * 1_000, 30, KeyAction::Down)
    }

    fn times(records: &[CutRecord]) -> Vec<(String, Vec<i64>)> {
        records.iter().map(|r| (r.user_id.clone(), r.events.iter().map(|e| e.time_us / 1_000).collect())).collect()
    }

    #[test]
    fn records_span_at_most_the_shapes_span_of_one_users_typing() {
        let mut cutter = RecordCutter::new(RecordShape::agent(50));
        let mut out = Vec::new();
        for (user, t) in [("a", 0), ("b", 10), ("a", 60), ("a", 100), ("a", 150), ("b", 400)] {
            out.extend(cutter.push(user, "s", down(t)));
        }
        out.extend(cutter.finish());
        assert_eq!(
            times(&out),
            vec![
                ("a".to_owned(), vec![0, 60]),
                ("b".to_owned(), vec![10]),
                ("a".to_owned(), vec![100, 150]),
                ("b".to_owned(), vec![400]),
            ]
        );
        assert_eq!(cutter.users(), 2);
        assert!(cutter.finish().is_empty(), "nothing left pending");
    }

    #[test]
    fn a_record_is_cut_at_max_events_whatever_its_span() {
        let mut cutter = RecordCutter::new(RecordShape::agent(2));
        let mut out: Vec<CutRecord> = (0..5).flat_map(|t| cutter.push("a", "s", down(t))).collect();
        out.extend(cutter.finish());
        assert_eq!(times(&out), vec![("a".into(), vec![0, 1]), ("a".into(), vec![2, 3]), ("a".into(), vec![4])]);
        let mut cutter = RecordCutter::new(RecordShape::by_count(3));
        let mut out: Vec<CutRecord> = (0..5).flat_map(|t| cutter.push("a", "s", down(t * 1_000))).collect();
        assert!(cutter.expire(i64::MAX / 2).is_empty(), "no span, no expiry");
        out.extend(cutter.finish());
        assert_eq!(times(&out), vec![("a".into(), vec![0, 1_000, 2_000]), ("a".into(), vec![3_000, 4_000])]);
    }

    #[test]
    fn a_quiet_users_record_leaves_once_its_span_has_passed() {
        let mut cutter = RecordCutter::new(RecordShape::agent(50));
        assert!(cutter.push("a", "s", down(0)).is_empty());
        assert!(cutter.push("b", "s", down(50)).is_empty());
        assert!(cutter.expire(99_999 / 1_000 * 1_000).is_empty(), "a's span has not passed");
        assert_eq!(times(&cutter.expire(100_000)), vec![("a".into(), vec![0])]);
        // a's next record starts a new span; the old expiry entry must not cut it early.
        assert!(cutter.push("a", "s", down(120)).is_empty());
        assert_eq!(times(&cutter.expire(150_000)), vec![("b".into(), vec![50])]);
        assert!(cutter.expire(219_000).is_empty());
        assert_eq!(times(&cutter.expire(220_000)), vec![("a".into(), vec![120])]);
        assert!(cutter.finish().is_empty());
    }

    #[test]
    fn a_record_cut_by_count_drops_its_expiry() {
        let mut cutter = RecordCutter::new(RecordShape::agent(2));
        assert!(cutter.push("a", "s", down(0)).is_empty());
        assert_eq!(cutter.push("a", "s", down(10)).len(), 1);
        assert!(cutter.push("a", "s", down(90)).is_empty());
        // The first record's expiry (at 100 ms) must not cut the second (due at 190 ms).
        assert!(cutter.expire(100_000).is_empty());
        assert_eq!(times(&cutter.expire(190_000)), vec![("a".into(), vec![90])]);
    }

    #[test]
    fn the_session_is_the_one_of_the_records_first_event() {
        let mut cutter = RecordCutter::new(RecordShape::by_count(2));
        cutter.push("a", "s1", down(0));
        let r = cutter.push("a", "s2", down(1));
        assert_eq!(r[0].session_id, "s1");
        cutter.push("a", "s2", down(2));
        assert_eq!(cutter.finish()[0].session_id, "s2");
    }
}
