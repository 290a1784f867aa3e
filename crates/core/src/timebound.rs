//! Event times the agent's owner cannot move far: each record's events are bounded against a
//! clock the player does not control.
//!
//! The agent stamps events with the player's clock, and the player owns it. One event stamped
//! in 2099 would otherwise carry the user's watermark there, and every real event after it
//! would be late and dropped: the user blinded until 2099. A clock stepped back a year would
//! make every later event late too. So each record's events are checked against a
//! *reference*: the record's broker append time when the topic keeps `LogAppendTime` (the
//! broker's clock), else the processor's clock. Within a record the agent's times are kept
//! exactly (they are the typing's rhythm); only their offset from the reference is bounded.
//!
//! - With an append time, a record whose median event lies outside
//!   `[reference - lag, reference + lead]` is *rebased*: every event shifted by one amount so that its median sits at the reference. A
//!   stepped clock, either way, or an agent shipping a buffer after hours offline, keeps its
//!   rhythm and its order, at the broker's time.
//! - The shift a user's last rebased record got is carried to the next one
//!   (`super::intake::UserIntake`) and reused while it keeps that record within the bounds, so
//!   records the agent sends in a burst keep their spacing rather than piling onto one append
//!   time (where all but the first would be late). A burst spanning more than the lead still
//!   overlaps where it is shifted afresh.
//! - Events still outside the bounds after that (a stray event far from the rest of its record)
//!   are dropped and counted.
//!
//! So no record moves a user's watermark more than `lead` past the reference: one stray event
//! blinds a user for at most `lead`. Without an append time (`CreateTime` topics: the
//! producer's, i.e. the player's, clock) the processor's clock is the reference, only the lead
//! is bounded (a processor working through a backlog sees old records whose events are rightly
//! old), and nothing is rebased: events ahead of the processor's clock by more than the lead
//! are dropped and counted. A clock stepped far ahead then loses that user's events, visibly
//! (`metronome_events_out_of_bounds_total`), for as long as it stays ahead; with
//! `stream.input_log_append_time` it costs them nothing but their watermark's lead.
//!
//! # Layout
//! - [`RecordTime`]: what the broker said of a record's time.
//! - [`TimeBounds`]: the configured lead and lag.
//! - [`TimeBounds::apply`]: bounds one record's events, returning a [`TimeFix`] for the metrics.

use crate::event::KeyEvent;

/// The timestamp a consumed record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordTime {
    /// None (older brokers, tests).
    #[default]
    Unknown,
    /// Set by the producer: the agent's clock, so not trusted.
    Create {
        /// Milliseconds since the epoch.
        ms: i64,
    },
    /// Set by the broker when it appended the record (`message.timestamp.type=LogAppendTime`).
    LogAppend {
        /// Milliseconds since the epoch.
        ms: i64,
    },
}

/// How far a record's events may sit from the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBounds {
    /// Most an event may lead the reference, microseconds.
    pub lead_us: i64,
    /// Most an event may lag the broker's append time, microseconds (not applied without one).
    pub lag_us: i64,
}

/// What bounding did to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeFix {
    /// Whether the record's events were shifted to the reference.
    pub rebased: bool,
    /// Events dropped as out of bounds after that.
    pub dropped: u32,
}

impl TimeBounds {
    /// Bounds `events` (one record's, in capture order) against `time`, or against `now_us`
    /// (the processor's clock) when the record has no append time. `carried` is the shift the
    /// user's last rebased record got: a record it brings within the bounds gets it too, so a
    /// burst of records appended at once keeps its spacing instead of piling onto one instant.
    /// `scratch` is reused between calls.
    pub fn apply(
        &self,
        events: &mut Vec<KeyEvent>,
        time: RecordTime,
        now_us: i64,
        carried: &mut Option<i64>,
        scratch: &mut Vec<i64>,
    ) -> TimeFix {
        let (reference, lag) = match time {
            RecordTime::LogAppend { ms } => (ms.saturating_mul(1000), Some(self.lag_us)),
            RecordTime::Create { .. } | RecordTime::Unknown => (now_us, None),
        };
        let lo = lag.map_or(i64::MIN, |lag| reference.saturating_sub(lag));
        let hi = reference.saturating_add(self.lead_us);
        let in_bounds = |t: i64| (lo..=hi).contains(&t);
        let mut fix = TimeFix::default();
        if events.iter().all(|e| in_bounds(e.time_us)) {
            if lag.is_some() && !events.is_empty() {
                *carried = None; // the clock is back: the next step starts afresh
            }
            return fix; // the common case: nothing to move or drop
        }
        // Only the broker's clock is one every honest record sits near: without it a record
        // out of bounds may be a backlog's, and moving it would carry the user's watermark.
        let median = lag.and_then(|_| median_time(events, scratch));
        if let Some(median) = median.filter(|&m| !in_bounds(m)) {
            let shift = match *carried {
                Some(s) if in_bounds(median.saturating_add(s)) => s,
                _ => reference.saturating_sub(median),
            };
            *carried = Some(shift);
            for e in events.iter_mut() {
                e.time_us = e.time_us.saturating_add(shift).max(0);
            }
            fix.rebased = true;
        }
        let before = events.len();
        events.retain(|e| in_bounds(e.time_us));
        fix.dropped = (before - events.len()) as u32;
        fix
    }
}

/// The median of the events' times (the lower one of an even count): robust to a few strays.
fn median_time(events: &[KeyEvent], scratch: &mut Vec<i64>) -> Option<i64> {
    if events.is_empty() {
        return None;
    }
    scratch.clear();
    scratch.extend(events.iter().map(|e| e.time_us));
    let mid = (scratch.len() - 1) / 2;
    Some(*scratch.select_nth_unstable(mid).1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::KeyAction;
    use proptest::prelude::*;

    const S: i64 = 1_000_000;
    const NOW: i64 = 1_800_000_000 * S;
    const BOUNDS: TimeBounds = TimeBounds { lead_us: 120 * S, lag_us: 300 * S };

    fn typing(start_us: i64, n: usize) -> Vec<KeyEvent> {
        (0..n).map(|i| KeyEvent::new(start_us + i as i64 * 97_000, 30, KeyAction::Down)).collect()
    }

    fn appended(us: i64) -> RecordTime {
        RecordTime::LogAppend { ms: us / 1000 }
    }

    fn times(events: &[KeyEvent]) -> Vec<i64> {
        events.iter().map(|e| e.time_us).collect()
    }

    #[test]
    fn a_record_within_the_bounds_is_left_alone() {
        let mut events = typing(NOW - 2 * S, 20);
        let before = events.clone();
        let fix = BOUNDS.apply(&mut events, appended(NOW), 0, &mut None, &mut Vec::new());
        assert_eq!(fix, TimeFix::default());
        assert_eq!(events, before);
    }

    #[test]
    fn one_event_stamped_in_2099_is_dropped_and_the_rest_kept() {
        let mut events = typing(NOW - 2 * S, 20);
        events.insert(7, KeyEvent::new(4_070_908_800 * S, 30, KeyAction::Down));
        let fix = BOUNDS.apply(&mut events, appended(NOW), 0, &mut None, &mut Vec::new());
        assert_eq!(fix, TimeFix { rebased: false, dropped: 1 });
        assert_eq!(events, typing(NOW - 2 * S, 20));
    }

    #[test]
    fn a_clock_stepped_a_year_either_way_keeps_its_rhythm_at_the_broker_s_time() {
        for step in [-365 * 86_400 * S, 365 * 86_400 * S] {
            let mut events = typing(NOW + step, 21);
            let gaps: Vec<i64> = events.windows(2).map(|w| w[1].time_us - w[0].time_us).collect();
            let fix = BOUNDS.apply(&mut events, appended(NOW), 0, &mut None, &mut Vec::new());
            assert_eq!(fix, TimeFix { rebased: true, dropped: 0 });
            assert_eq!(events[10].time_us, NOW, "the median lands on the append time");
            let after: Vec<i64> = events.windows(2).map(|w| w[1].time_us - w[0].time_us).collect();
            assert_eq!(after, gaps, "intervals are the agent's, unchanged");
        }
    }

    #[test]
    fn a_burst_of_records_appended_at_once_keeps_its_spacing() {
        // A clock a year behind, and ten 5-second records the agent sends in one go.
        let start = NOW - 365 * 86_400 * S;
        let records: Vec<Vec<KeyEvent>> = (0..10).map(|r| typing(start + r * 5 * S, 50)).collect();
        let mut carried = None;
        let mut placed = Vec::new();
        for mut events in records.clone() {
            let fix = BOUNDS.apply(&mut events, appended(NOW), 0, &mut carried, &mut Vec::new());
            assert_eq!(fix, TimeFix { rebased: true, dropped: 0 });
            placed.extend(times(&events));
        }
        let sent: Vec<i64> = records.iter().flat_map(|r| times(r)).collect();
        let shift = placed[0] - sent[0];
        assert!(placed.iter().zip(&sent).all(|(p, s)| p - s == shift), "one shift for the whole burst");
        // Back on time: the next record is left alone and the carried shift is dropped.
        let mut live = typing(NOW - S, 10);
        let before = live.clone();
        BOUNDS.apply(&mut live, appended(NOW), 0, &mut carried, &mut Vec::new());
        assert_eq!((live, carried), (before, None));
    }

    #[test]
    fn without_an_append_time_the_processor_s_clock_bounds_the_lead_only() {
        // A backlog: events an hour old by the processor's clock are kept as they are.
        let mut old = typing(NOW - 3600 * S, 10);
        let before = old.clone();
        for time in [RecordTime::Unknown, RecordTime::Create { ms: 0 }] {
            assert_eq!(BOUNDS.apply(&mut old, time, NOW, &mut None, &mut Vec::new()), TimeFix::default());
            assert_eq!(old, before);
        }
        // The producer's timestamp is the player's: a 2099 CreateTime buys nothing, and a
        // record ahead of the processor's clock is dropped, not moved.
        let mut ahead = typing(4_070_908_800 * S, 10);
        let fix =
            BOUNDS.apply(&mut ahead, RecordTime::Create { ms: 4_070_908_800_000 }, NOW, &mut None, &mut Vec::new());
        assert_eq!(fix, TimeFix { rebased: false, dropped: 10 });
        assert!(ahead.is_empty());
    }

    proptest! {
        #[test]
        fn no_kept_event_leads_the_reference_by_more_than_the_bound(
            offsets in proptest::collection::vec(-4_000_000_000i64 * S..4_000_000_000i64 * S, 0..40),
            appended_at in 0i64..4_000_000_000 * S,
            carried in proptest::option::of(-4_000_000_000i64 * S..4_000_000_000i64 * S),
        ) {
            let mut carried = carried;
            let mut events: Vec<KeyEvent> =
                offsets.iter().map(|&o| KeyEvent::new((appended_at + o).max(0), 30, KeyAction::Down)).collect();
            let n = events.len();
            let fix = BOUNDS.apply(&mut events, appended(appended_at), 0, &mut carried, &mut Vec::new());
            let reference = appended_at / 1000 * 1000;
            prop_assert_eq!(events.len() + fix.dropped as usize, n);
            for t in times(&events) {
                prop_assert!(t <= reference + BOUNDS.lead_us && t >= reference - BOUNDS.lag_us);
            }
            // The median at least survives: a record is never emptied by bounding alone.
            prop_assert!(n == 0 || !events.is_empty());
        }
    }
}
