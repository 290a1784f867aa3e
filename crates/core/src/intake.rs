//! What a user's records pass before their events reach the detector: duplicates set aside by
//! the agent's sequence numbers, and the clock shift a user's records carry from one to the next.
//!
//! The agent numbers every event of a capture session from 1 (`KeyEvent.seq`, per device and
//! session). A record it sends again after a restart, or any record replayed as it was, carries
//! numbers the user's [`SeqLedger`] has seen: those events are dropped, so windows, features
//! and alerts stay exactly as without the copy. Numbers that jump ahead leave a gap, counted,
//! never fatal; a late event that fills one is kept. Seq 0 means *unnumbered* (keylog files,
//! `publish`, older agents' first event): such events are never deduplicated.
//!
//! The ledger is part of the user's stored state, so it follows the changelog and a restore: a
//! record replayed after a rebalance is still a duplicate. It stays small whatever a sender
//! does: at most [`MAX_SESSIONS`] sessions per user (the least recently used is forgotten), each
//! a floor under which every number is settled plus at most [`MAX_HOLES`] runs above it (past
//! that the lowest hole is given up on: its events, already counted as a gap, are taken for
//! duplicates if they ever come).
//!
//! What a sender can do with it: drop their own events by numbering them as seen, which is no
//! more than not sending them; never anyone else's (a ledger is one user's, and a record's user
//! is its key).
//!
//! After the sequence numbers and the time bounds, a user's events spend an [`EventBudget`]
//! that refills with *event* time (`stream.max_user_events_per_s`, bursts up to
//! `max_user_event_burst`): what a flooding agent sends past it is dropped and counted, so one
//! user cannot take a task's time from the others. Event time, not the processor's clock: a
//! backlog read at full speed after a restart spans the hours it was typed in and passes whole,
//! and event time cannot run ahead of the reference clock by more than the time bounds allow.
//!
//! # Layout
//! - [`SessionKey`]: a device and session, hashed to 8 bytes.
//! - [`SeqLedger`]: the numbers seen per session, and [`SeqLedger::admit`].
//! - [`EventBudget`]: the per-user event rate limit, and [`EventBudget::spend`].
//! - [`UserIntake`]: what the stream keeps per user beside the detector's state.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::KeyEvent;

/// Sessions remembered per user; a user's ninth session forgets the least recently used.
pub const MAX_SESSIONS: usize = 8;
/// Runs of seen numbers kept above a session's floor before its lowest hole is given up on.
pub const MAX_HOLES: usize = 16;

/// A device and capture session, hashed: the ledger's key (8 bytes, not two ids of up to 256).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionKey(u64);

impl SessionKey {
    /// The key of `session_id` on `device_id`.
    pub fn of(device_id: &str, session_id: &str) -> Self {
        let mut h = Sha256::new();
        h.update((device_id.len() as u64).to_be_bytes());
        h.update(device_id.as_bytes());
        h.update(session_id.as_bytes());
        let digest = h.finalize();
        SessionKey(u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes")))
    }
}

/// What admitting one record's events did, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Admission {
    /// Events dropped because their number was seen before.
    pub duplicates: u32,
    /// Numbers skipped when a later one arrived (events missing, for now).
    pub gap_events: u64,
    /// Events that arrived after a later-numbered one and filled a gap.
    pub late_fills: u32,
}

/// The numbers seen of one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SessionSeqs {
    key: SessionKey,
    /// Every number below it is settled: seen, or given up on.
    floor: u64,
    /// Seen numbers above the floor as sorted, disjoint, non-touching `[start, end)` runs, the
    /// first starting above the floor (a run reaching down to it is folded into it).
    runs: Vec<(u64, u64)>,
}

impl SessionSeqs {
    fn new(key: SessionKey) -> Self {
        Self { key, floor: 1, runs: Vec::new() }
    }

    /// One past the highest number seen or settled.
    fn top(&self) -> u64 {
        self.runs.last().map_or(self.floor, |r| r.1)
    }

    /// Records `seq` as seen; `false` if it was seen already.
    fn insert(&mut self, seq: u64, admission: &mut Admission) -> bool {
        if seq < self.floor {
            return false;
        }
        let top = self.top();
        if seq >= top {
            admission.gap_events += seq - top;
        }
        // The first run that ends past `seq`: the one holding it, or the first above it.
        let i = self.runs.partition_point(|r| r.1 <= seq);
        if self.runs.get(i).is_some_and(|r| r.0 <= seq && seq < r.1) {
            return false;
        }
        if seq < top {
            admission.late_fills += 1;
        }
        let joins_prev = if i == 0 { seq == self.floor } else { self.runs[i - 1].1 == seq };
        let joins_next = self.runs.get(i).is_some_and(|r| r.0 == seq + 1);
        match (joins_prev, joins_next) {
            (true, true) if i == 0 => {
                self.floor = self.runs.remove(0).1;
            }
            (true, true) => {
                self.runs[i - 1].1 = self.runs.remove(i).1;
            }
            (true, false) if i == 0 => self.floor = seq + 1,
            (true, false) => self.runs[i - 1].1 = seq + 1,
            (false, true) => self.runs[i].0 = seq,
            (false, false) => self.runs.insert(i, (seq, seq + 1)),
        }
        if self.runs.len() > MAX_HOLES {
            // Give up on the lowest hole: its numbers count as settled from now on.
            self.floor = self.runs.remove(0).1;
        }
        true
    }
}

/// The sequence numbers one user's sessions have delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqLedger {
    /// Least recently used first.
    sessions: Vec<SessionSeqs>,
}

impl SeqLedger {
    /// Keeps the events of one record (`events[i]` numbered `seqs[i]`, of `session`) that were
    /// not delivered before, in order, and records their numbers.
    pub fn admit<T>(&mut self, session: SessionKey, seqs: &[u64], events: &mut Vec<T>) -> Admission {
        debug_assert_eq!(seqs.len(), events.len());
        let mut admission = Admission::default();
        if seqs.iter().all(|&s| s == 0) {
            return admission; // unnumbered: nothing to check
        }
        let entry = self.session(session);
        let mut next = seqs.iter();
        events.retain(|_| {
            let seq = *next.next().expect("one number per event");
            seq == 0 || entry.insert(seq, &mut admission)
        });
        admission.duplicates = (seqs.len() - events.len()) as u32;
        admission
    }

    /// The session's entry, made the most recently used (and created, forgetting the least
    /// recently used past [`MAX_SESSIONS`]).
    fn session(&mut self, key: SessionKey) -> &mut SessionSeqs {
        let entry = match self.sessions.iter().position(|s| s.key == key) {
            Some(i) => self.sessions.remove(i),
            None => {
                if self.sessions.len() >= MAX_SESSIONS {
                    self.sessions.remove(0);
                }
                SessionSeqs::new(key)
            }
        };
        self.sessions.push(entry);
        self.sessions.last_mut().expect("just pushed")
    }

    /// Sessions remembered.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }
}

/// A user's event rate limit, in event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Events per second of event time, sustained.
    pub events_per_s: u64,
    /// Events a user may send at once (and what a fresh user starts with).
    pub burst: u64,
}

/// One event, in the budget's units (a millionth of an event per microsecond at 1 event/s).
const EVENT: u64 = 1_000_000;

/// What a user may still send: a token bucket refilled by their events' own times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBudget {
    /// Events left, in millionths.
    tokens: u64,
    /// The newest event time spent so far; `None` for a user not seen yet (a full bucket).
    newest_us: Option<i64>,
}

impl EventBudget {
    /// Keeps the events (in capture order) the budget pays for and drops the rest; returns how
    /// many were dropped. Time moving back refills nothing.
    pub fn spend(&mut self, limit: RateLimit, events: &mut Vec<KeyEvent>) -> u32 {
        let cap = limit.burst.saturating_mul(EVENT);
        let mut tokens = if self.newest_us.is_some() { self.tokens } else { cap };
        let mut newest = self.newest_us;
        let before = events.len();
        events.retain(|e| {
            if let Some(n) = newest {
                let elapsed = u64::try_from(e.time_us.saturating_sub(n)).unwrap_or(0);
                tokens = tokens.saturating_add(elapsed.saturating_mul(limit.events_per_s)).min(cap);
            }
            newest = Some(newest.map_or(e.time_us, |n| n.max(e.time_us)));
            match tokens.checked_sub(EVENT) {
                Some(left) => {
                    tokens = left;
                    true
                }
                None => false,
            }
        });
        *self = Self { tokens, newest_us: newest };
        (before - events.len()) as u32
    }
}

/// What the stream keeps per user beside the detector's state (stored with it, format 6).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIntake {
    /// Sequence numbers delivered.
    pub ledger: SeqLedger,
    /// The shift the user's last rebased record got (`crate::timebound`), so the next one
    /// keeps its place after it instead of landing on the same append time.
    pub shift_us: Option<i64>,
    /// The user's event rate limit.
    pub budget: EventBudget,
}

/// [`UserIntake`] as format 5 stored it (before the event budget).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIntakeV5 {
    ledger: SeqLedger,
    shift_us: Option<i64>,
}

impl From<UserIntakeV5> for UserIntake {
    fn from(v5: UserIntakeV5) -> Self {
        Self { ledger: v5.ledger, shift_us: v5.shift_us, budget: EventBudget::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn admit(ledger: &mut SeqLedger, session: SessionKey, seqs: &[u64]) -> (Vec<u64>, Admission) {
        let mut kept = seqs.to_vec();
        let admission = ledger.admit(session, seqs, &mut kept);
        (kept, admission)
    }

    #[test]
    fn a_resent_record_is_dropped_whole_and_the_next_one_flows() {
        let s = SessionKey::of("kbd", "run-1");
        let mut ledger = SeqLedger::default();
        assert_eq!(admit(&mut ledger, s, &[1, 2, 3]).0, [1, 2, 3]);
        assert_eq!(admit(&mut ledger, s, &[4, 5]).0, [4, 5]);
        let (kept, a) = admit(&mut ledger, s, &[1, 2, 3]);
        assert!(kept.is_empty());
        assert_eq!(a, Admission { duplicates: 3, gap_events: 0, late_fills: 0 });
        assert_eq!(admit(&mut ledger, s, &[6, 7]).0, [6, 7]);
    }

    #[test]
    fn a_gap_is_counted_and_a_late_record_fills_it() {
        let s = SessionKey::of("kbd", "run-1");
        let mut ledger = SeqLedger::default();
        admit(&mut ledger, s, &[1, 2]);
        let (kept, a) = admit(&mut ledger, s, &[6, 7]);
        assert_eq!(kept, [6, 7]);
        assert_eq!(a.gap_events, 3, "3, 4 and 5 are missing");
        let (kept, a) = admit(&mut ledger, s, &[3, 4, 5]);
        assert_eq!(kept, [3, 4, 5]);
        assert_eq!(a, Admission { duplicates: 0, gap_events: 0, late_fills: 3 });
        assert_eq!(ledger.sessions[0].floor, 8, "the runs folded back into the floor");
        assert!(ledger.sessions[0].runs.is_empty());
    }

    #[test]
    fn sessions_are_apart_and_unnumbered_events_always_pass() {
        let (a, b) = (SessionKey::of("kbd", "run-1"), SessionKey::of("kbd", "run-2"));
        assert_ne!(a, b);
        assert_ne!(SessionKey::of("kbd", "1run"), SessionKey::of("kbd1", "run"), "the ids do not run together");
        let mut ledger = SeqLedger::default();
        admit(&mut ledger, a, &[1, 2, 3]);
        assert_eq!(admit(&mut ledger, b, &[1, 2, 3]).0, [1, 2, 3], "a new session numbers from 1 again");
        assert_eq!(admit(&mut ledger, a, &[0, 0]).0, [0, 0]);
        assert_eq!(admit(&mut ledger, a, &[0, 3, 0]).0, [0, 0], "only the numbered one is a duplicate");
    }

    #[test]
    fn a_record_repeating_its_own_number_keeps_the_first() {
        let s = SessionKey::of("", "s");
        let mut ledger = SeqLedger::default();
        let (kept, a) = admit(&mut ledger, s, &[1, 1, 2, 2]);
        assert_eq!(kept, [1, 2]);
        assert_eq!(a.duplicates, 2);
    }

    #[test]
    fn the_ledger_stays_small_whatever_a_sender_numbers() {
        let mut ledger = SeqLedger::default();
        for session in 0..100 {
            let key = SessionKey::of("kbd", &session.to_string());
            // Every other number: a hole after each.
            let seqs: Vec<u64> = (0..200).map(|i| 1 + 2 * i).collect();
            admit(&mut ledger, key, &seqs);
        }
        assert_eq!(ledger.sessions(), MAX_SESSIONS);
        assert!(ledger.sessions.iter().all(|s| s.runs.len() <= MAX_HOLES));
        let bytes = postcard::to_stdvec(&ledger).unwrap();
        assert!(bytes.len() < 4096, "{} bytes", bytes.len());
    }

    const LIMIT: RateLimit = RateLimit { events_per_s: 100, burst: 50 };

    fn at(times_us: impl IntoIterator<Item = i64>) -> Vec<KeyEvent> {
        times_us.into_iter().map(|t| KeyEvent::new(t, 30, crate::event::KeyAction::Down)).collect()
    }

    #[test]
    fn a_burst_past_the_budget_is_cut_and_time_refills_it() {
        let mut budget = EventBudget::default();
        // 200 events at one instant: the burst of 50 passes, the rest is dropped.
        let mut flood = at(std::iter::repeat_n(1_000_000, 200));
        assert_eq!(budget.spend(LIMIT, &mut flood), 150);
        assert_eq!(flood.len(), 50);
        // A second later 100 more are paid for (100 a second), but the bucket holds 50.
        let mut next = at(std::iter::repeat_n(2_000_000, 80));
        assert_eq!(budget.spend(LIMIT, &mut next), 30);
        // Typing at 20 events a second never meets the limit.
        let mut typing = at((0..400).map(|i| 10_000_000 + i * 50_000));
        assert_eq!(budget.spend(LIMIT, &mut typing), 0);
    }

    #[test]
    fn stepping_event_time_back_and_forth_refills_nothing_twice() {
        let mut budget = EventBudget::default();
        let mut first = at(std::iter::repeat_n(5_000_000, 50));
        assert_eq!(budget.spend(LIMIT, &mut first), 0);
        // Back a minute, then forward to where it was: no time has passed in between.
        let mut back = at([5_000_000 - 60_000_000, 5_000_000]);
        assert_eq!(budget.spend(LIMIT, &mut back), 2);
    }

    proptest! {
        /// However times are chosen, what passes is at most the burst plus the rate times the
        /// event time spanned.
        #[test]
        fn what_passes_is_bounded_by_burst_and_rate(times in proptest::collection::vec(0i64..10_000_000, 1..500)) {
            let mut budget = EventBudget::default();
            let mut events = at(times.iter().copied());
            budget.spend(LIMIT, &mut events);
            let span_s = (times.iter().max().unwrap() - times[0]).max(0) as u64 / 1_000_000 + 1;
            prop_assert!(events.len() as u64 <= LIMIT.burst + LIMIT.events_per_s * span_s);
        }

        /// Whatever the order and the copies, each numbered event is kept exactly once (while
        /// the holes stay within the cap), and the ledger's floor ends past every number when
        /// none is missing.
        #[test]
        fn copies_and_reordering_keep_each_number_once(
            records in 1usize..30,
            per_record in 1usize..8,
            copies in proptest::collection::vec((0usize..30, 0usize..40), 0..20),
            swaps in proptest::collection::vec((0usize..30, 0usize..30), 0..4),
        ) {
            let mut sent: Vec<Vec<u64>> = (0..records)
                .map(|r| (0..per_record).map(|i| 1 + (r * per_record + i) as u64).collect())
                .collect();
            for (r, at) in copies {
                let copy = sent[r % records].clone();
                let at = at.min(sent.len());
                sent.insert(at, copy);
            }
            for (a, b) in swaps {
                let n = sent.len();
                sent.swap(a % n, b % n);
            }
            let s = SessionKey::of("d", "s");
            let mut ledger = SeqLedger::default();
            let mut kept = Vec::new();
            let mut duplicates = 0;
            for seqs in &sent {
                let (k, a) = admit(&mut ledger, s, seqs);
                duplicates += a.duplicates as usize;
                kept.extend(k);
            }
            kept.sort_unstable();
            let all: Vec<u64> = (1..=(records * per_record) as u64).collect();
            prop_assert_eq!(&kept, &all);
            prop_assert_eq!(duplicates, sent.iter().map(Vec::len).sum::<usize>() - all.len());
            prop_assert_eq!(ledger.sessions[0].floor, all.len() as u64 + 1);
        }
    }
}
