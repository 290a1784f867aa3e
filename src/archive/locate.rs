//! Finding where a day starts in a partition: the first position whose record is at or after a
//! time.
//!
//! Kafka answers this from its time index (`ListOffsets` by timestamp). The archive does not take
//! the answer on trust: it reads the records on both sides of it, and when they contradict it
//! (a Kafka-compatible broker that indexes by write time, or not at all, or records whose
//! producer-set timestamps were not in order when they were written) it
//! searches the partition itself. Pure logic over an [`OffsetProbe`], so the search is tested on
//! in-memory partitions.

/// Reads one record's timestamp from a partition.
pub trait OffsetProbe {
    /// The error of a failed read.
    type Error;

    /// The offset and timestamp (ms) of the first record at or after `position`, or `None` when
    /// there is none before the end of the partition.
    fn first_at_or_after(&mut self, position: i64) -> Result<Option<(i64, i64)>, Self::Error>;
}

/// Whether the record at or after `position` is at or after `time_ms` (or none is there).
fn reached<P: OffsetProbe>(probe: &mut P, position: i64, time_ms: i64) -> Result<bool, P::Error> {
    Ok(probe.first_at_or_after(position)?.is_none_or(|(_, ts)| ts >= time_ms))
}

/// The first position in `[low, high]` (the partition's watermarks) whose record is at or after
/// `time_ms`; `high` when none is. `hint` is the broker's answer, checked first: it is taken when
/// the record at it is at or after the time and the one before it is not.
pub fn first_position_at<P: OffsetProbe>(
    probe: &mut P,
    low: i64,
    high: i64,
    time_ms: i64,
    hint: Option<i64>,
) -> Result<i64, P::Error> {
    if low >= high {
        return Ok(high);
    }
    if let Some(h) = hint.filter(|h| (low..=high).contains(h)) {
        let ok_here = reached(probe, h, time_ms)?;
        let ok_before = h == low || !reached(probe, h - 1, time_ms)?;
        if ok_here && ok_before {
            return Ok(h);
        }
    }
    // Lower bound over positions: `reached` is false below the answer and true from it on
    // (timestamps grow with offsets, as producers stamp them).
    let (mut lo, mut hi) = (low, high);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if reached(probe, mid, time_ms)? {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A partition in memory: `(offset, timestamp)` in offset order, with gaps allowed.
    struct Partition {
        records: Vec<(i64, i64)>,
        reads: usize,
    }

    impl OffsetProbe for Partition {
        type Error = std::convert::Infallible;
        fn first_at_or_after(&mut self, position: i64) -> Result<Option<(i64, i64)>, Self::Error> {
            self.reads += 1;
            Ok(self.records.iter().copied().find(|(o, _)| *o >= position))
        }
    }

    fn expected(records: &[(i64, i64)], high: i64, t: i64) -> i64 {
        records.iter().find(|(_, ts)| *ts >= t).map_or(high, |(o, _)| *o)
    }

    proptest! {
        #[test]
        fn finds_the_first_record_at_or_after_the_time(
            steps in proptest::collection::vec((1i64..3, 0i64..50), 0..200),
            t in 0i64..6000,
            hint in proptest::option::of(0i64..500),
        ) {
            let (mut offset, mut ts) = (10, 0);
            let records: Vec<(i64, i64)> = steps.iter().map(|(gap, dt)| {
                offset += gap;
                ts += dt;
                (offset, ts)
            }).collect();
            let high = offset + 1;
            let mut p = Partition { records: records.clone(), reads: 0 };
            let found = first_position_at(&mut p, 10, high, t, hint).unwrap();
            // A position, not always an offset: gaps before the record are the same answer.
            let want = expected(&records, high, t);
            let got = p.records.iter().find(|(o, _)| *o >= found).map_or(high, |(o, _)| *o);
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_right_hint_costs_two_reads_and_a_wrong_one_is_corrected() {
        let records: Vec<(i64, i64)> = (0..1000).map(|i| (i, i * 10)).collect();
        let mut p = Partition { records, reads: 0 };
        assert_eq!(first_position_at(&mut p, 0, 1000, 5000, Some(500)).unwrap(), 500);
        assert_eq!(p.reads, 2);
        // A broker that indexes by write time answers offset 0 for every time here.
        assert_eq!(first_position_at(&mut p, 0, 1000, 5000, Some(0)).unwrap(), 500);
        assert_eq!(first_position_at(&mut p, 0, 1000, 99_999, Some(0)).unwrap(), 1000, "after the last record");
        assert_eq!(first_position_at(&mut p, 0, 1000, -5, None).unwrap(), 0);
        assert_eq!(first_position_at(&mut p, 7, 7, 0, None).unwrap(), 7, "empty partition");
    }
}
