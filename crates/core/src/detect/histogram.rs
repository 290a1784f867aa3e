//! The inter-key-interval histogram: the original system's rule, made robust.
//!
//! The original rule rounds every interval between key-downs to a 10 ms bin and scores the share
//! of intervals in the most common bin: macros press keys at near-equal intervals and score high.
//! Three things make that rule unfair or blind on real data, and are handled here:
//! - Bin edges: an interval of 15 ms +/- 1 ms splits into two fixed bins and halves the score.
//!   The densest *span* of bin width is used instead, over sorted intervals, so no interval sits
//!   on an edge.
//! - Coarse client clocks: with timestamps that step in 16 or 40-50 ms, every human interval is
//!   one of a few lattice values. The span widens to the clock resolution seen in the window.
//! - Auto-repeat: held keys produce presses 30 ms apart; [`crate::detect::window`] removes them
//!   before intervals are taken.

/// A window's rhythm intervals counted in fixed bins from 0: what security staff see drawn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IntervalHistogram {
    /// Bin width, milliseconds.
    pub bin_ms: f64,
    /// `counts[i]`: intervals in `[i * bin_ms, (i + 1) * bin_ms)`, up to the longest interval.
    pub counts: Vec<u32>,
}

impl IntervalHistogram {
    /// Counts `intervals_us` in bins of `bin_ms` (a non-positive width counts nothing).
    pub fn of<T: Copy + Into<i64>>(intervals_us: &[T], bin_ms: f64) -> Self {
        let bin_us = (bin_ms * 1000.0).round() as i64;
        let mut counts = Vec::new();
        if bin_us > 0 {
            for &i in intervals_us {
                let bin = (i.into().max(0) / bin_us) as usize;
                if counts.len() <= bin {
                    counts.resize(bin + 1, 0);
                }
                counts[bin] += 1;
            }
        }
        Self { bin_ms, counts }
    }
}

/// The original system's score: share of intervals in the most common 10 ms rounded bin.
/// Kept as the baseline the robust score is measured against.
pub fn naive_bin_share(intervals_us: &[i64], bin_us: i64) -> f64 {
    if intervals_us.is_empty() || bin_us <= 0 {
        return 0.0;
    }
    let mut bins: Vec<i64> = intervals_us.iter().map(|&x| (x + bin_us / 2).div_euclid(bin_us)).collect();
    bins.sort_unstable();
    let mut best = 0;
    let mut run = 0;
    for i in 0..bins.len() {
        run = if i > 0 && bins[i] == bins[i - 1] { run + 1 } else { 1 };
        best = best.max(run);
    }
    best as f64 / intervals_us.len() as f64
}

/// The densest span of `width_us` over `sorted_us` (ascending): the share of values in the
/// fullest half-open span `[x, x + width)`, and the span's midpoint.
///
/// Returns `(0.0, 0)` for no input.
pub fn densest_span<T: Copy + Into<i64> + Ord>(sorted_us: &[T], width_us: i64) -> (f64, i64) {
    debug_assert!(sorted_us.windows(2).all(|w| w[0] <= w[1]));
    let n = sorted_us.len();
    if n == 0 {
        return (0.0, 0);
    }
    let width = width_us.max(1);
    let at = |i: usize| -> i64 { sorted_us[i].into() };
    let (mut best, mut best_at) = (0usize, 0usize);
    let mut end = 0;
    for start in 0..n {
        let limit = at(start).saturating_add(width);
        while end < n && at(end) < limit {
            end += 1;
        }
        // Branch-free update: which start wins is data-dependent and mispredicts.
        let better = end - start > best;
        best_at = if better { start } else { best_at };
        best = best.max(end - start);
    }
    let mid = at(best_at) + (at(best_at + best - 1) - at(best_at)) / 2;
    (best as f64 / n as f64, mid)
}

/// The clock step that time differences sit on, or 0 when they do not sit on a coarse lattice.
///
/// `diffs` are differences between timestamps of one clock (intervals, holds, gaps), in any
/// order; zero and negative ones are ignored. The candidate step is the third smallest positive
/// difference (so one or two glitched timestamps cannot fake a fine clock), or its half or third;
/// a step is accepted when at least 80 % of the differences, and half of the first eight, are
/// within a tenth of it (and at least 1 ms) of a multiple of it. A macro's fixed hold alone does
/// not pass: its jittered intervals are off the lattice.
pub fn lattice_step(diffs: &[i64]) -> i64 {
    // The three smallest positive values, ascending, in one branch-free pass.
    let (mut a, mut b, mut c) = (i64::MAX, i64::MAX, i64::MAX);
    let mut count = 0usize;
    for &d in diffs {
        count += usize::from(d > 0);
        let d = if d > 0 { d } else { i64::MAX };
        c = c.min(b.max(d));
        b = b.min(a.max(d));
        a = a.min(d);
        // No step at or below this can be a coarse clock (see `on_lattice`): done early.
        if c <= 2 * MIN_TOLERANCE_US {
            return 0;
        }
    }
    best_step(&[diffs], c, count)
}

/// [`lattice_step`] over several ascending slices (sorted intervals and sorted holds): the
/// three smallest values come from their heads, so no pass is needed to find them.
pub fn lattice_step_sorted<T: Copy + Into<i64> + Ord>(groups: &[&[T]]) -> i64 {
    let (mut smallest, mut count) = ([i64::MAX; 3], 0);
    for g in groups {
        let first_positive = g.partition_point(|&x| x.into() <= 0);
        count += g.len() - first_positive;
        for &x in g[first_positive..].iter().take(3) {
            // Insert into the sorted three, dropping the largest.
            let x: i64 = x.into();
            if x < smallest[2] {
                smallest[2] = x;
                smallest.sort_unstable();
            }
        }
    }
    let third = smallest[2];
    best_step(groups, third, count)
}

fn best_step<T: Copy + Into<i64>>(groups: &[&[T]], third_smallest: i64, count: usize) -> i64 {
    if count < 3 {
        return 0;
    }
    // The candidate may span two or three steps of the clock (no gap of exactly one step among
    // the smallest three), so its halves and thirds are tried too.
    (1..=3).map(|k| third_smallest / k).find(|&step| on_lattice(groups, step, count)).unwrap_or(0)
}

/// The smallest distance to a multiple of the step that still counts as on the lattice.
const MIN_TOLERANCE_US: i64 = 1_000;

fn on_lattice<T: Copy + Into<i64>>(groups: &[&[T]], step: i64, count: usize) -> bool {
    let tolerance = (step / 10).max(MIN_TOLERANCE_US);
    if step <= 2 * tolerance {
        return false;
    }
    // Float remainder: an integer division per value would dominate the window's cost.
    let (step_f, inverse, tolerance_f) = (step as f64, 1.0 / step as f64, tolerance as f64);
    // Give up as soon as more than a fifth are off, or more than half of the first eight: a
    // real lattice is rarely off at all, a fine clock fails within a few values. Checked per
    // chunk so the inner loop has no data-dependent branch.
    let allowed_misses = count / 5;
    let mut misses = 0;
    let mut first = true;
    for group in groups {
        let mut rest: &[T] = group;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(if first { 8 } else { 16 }));
            rest = tail;
            for &d in chunk {
                let d: i64 = d.into();
                let x = d as f64;
                // Nearest multiple by truncating x/step + 0.5 (x > 0): `round` is a libm call.
                let nearest = ((x * inverse + 0.5) as i64) as f64 * step_f;
                misses += usize::from(d > 0 && (x - nearest).abs() > tolerance_f);
            }
            if misses > allowed_misses || (first && misses * 2 > chunk.len()) {
                return false;
            }
            first = false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_histogram_counts_every_interval_in_its_bin() {
        let h = IntervalHistogram::of(&[0i64, 9_999, 10_000, 95_000, 95_500], 10.0);
        assert_eq!(h.counts, vec![2, 1, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(h.counts.iter().sum::<u32>(), 5);
        assert!(IntervalHistogram::of(&[5i64], 0.0).counts.is_empty());
        assert!(IntervalHistogram::of::<i64>(&[], 10.0).counts.is_empty());
    }
    use proptest::prelude::*;

    #[test]
    fn naive_rule_splits_on_a_bin_edge_and_the_span_does_not() {
        // 15 ms +/- 1 ms: half round to 10 ms, half to 20 ms.
        let intervals: Vec<i64> = (0..40).map(|i| if i % 2 == 0 { 14_000 } else { 16_000 }).collect();
        assert!((naive_bin_share(&intervals, 10_000) - 0.5).abs() < 1e-9);
        let mut sorted = intervals.clone();
        sorted.sort_unstable();
        let (share, mid) = densest_span(&sorted, 10_000);
        assert_eq!(share, 1.0);
        assert_eq!(mid, 15_000);
    }

    #[test]
    fn spread_intervals_score_low() {
        let sorted: Vec<i64> = (0..50).map(|i| 80_000 + i * 7_000).collect();
        let (share, _) = densest_span(&sorted, 10_000);
        assert!(share <= 2.0 / 50.0 + 1e-9, "share {share}");
    }

    #[test]
    fn span_is_half_open() {
        let (share, _) = densest_span(&[0i64, 10_000], 10_000);
        assert_eq!(share, 0.5);
    }

    fn gaps(sorted: &[i64]) -> Vec<i64> {
        sorted.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[test]
    fn lattice_is_found_despite_equal_times_and_a_glitch() {
        let times = [0, 0, 16_000, 48_000, 48_000, 64_000, 65_000, 112_000, 160_000, 176_000];
        assert_eq!(lattice_step(&gaps(&times)), 16_000);
        assert_eq!(lattice_step(&gaps(&[5, 5])), 0);
        // Intervals and holds of a 47 ms clock, in any order.
        let diffs = [94_000, 47_000, 141_000, 47_000, 94_000, 188_000, 0, 47_000];
        assert_eq!(lattice_step(&diffs), 47_000);
    }

    #[test]
    fn sorted_groups_agree_with_the_unsorted_form() {
        let mut intervals = [94_000, 141_000, 47_000, 188_000, 94_000, 0, 47_000];
        let mut holds = [47_000, 94_000, 47_000];
        let all: Vec<i64> = intervals.iter().chain(&holds).copied().collect();
        intervals.sort_unstable();
        holds.sort_unstable();
        assert_eq!(lattice_step_sorted(&[&intervals[..], &holds[..]]), lattice_step(&all));
        assert_eq!(lattice_step(&all), 47_000);
    }

    #[test]
    fn fine_clock_and_fixed_hold_macro_are_not_a_lattice() {
        // Intervals jittered on a fine clock, each key held 30 ms.
        let intervals = (0..40i64).map(|i| 100_000 + (i * i * 7_919) % 37_000);
        let diffs: Vec<i64> = intervals.chain(std::iter::repeat_n(30_000, 40)).collect();
        assert_eq!(lattice_step(&diffs), 0);
    }

    proptest! {
        /// The densest span never scores below the naive rule's fullest bin: a rounded bin is
        /// one particular span of the same width.
        #[test]
        fn span_dominates_naive_bins(mut xs in proptest::collection::vec(0i64..2_000_000, 1..80)) {
            let naive = naive_bin_share(&xs, 10_000);
            xs.sort_unstable();
            let (span, _) = densest_span(&xs, 10_000);
            prop_assert!(span + 1e-12 >= naive, "span {} naive {}", span, naive);
            prop_assert!(span > 0.0 && span <= 1.0);
        }

        #[test]
        fn shifting_all_intervals_does_not_change_the_score(
            mut xs in proptest::collection::vec(0i64..1_000_000, 1..60), shift in 0i64..1_000_000
        ) {
            xs.sort_unstable();
            let shifted: Vec<i64> = xs.iter().map(|x| x + shift).collect();
            prop_assert_eq!(densest_span(&xs, 10_000).0, densest_span(&shifted, 10_000).0);
        }
    }
}
