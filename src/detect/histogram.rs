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
pub fn densest_span(sorted_us: &[i64], width_us: i64) -> (f64, i64) {
    debug_assert!(sorted_us.windows(2).all(|w| w[0] <= w[1]));
    let n = sorted_us.len();
    if n == 0 {
        return (0.0, 0);
    }
    let width = width_us.max(1);
    let (mut best, mut best_at) = (0usize, 0usize);
    let mut end = 0;
    for start in 0..n {
        let limit = sorted_us[start].saturating_add(width);
        while end < n && sorted_us[end] < limit {
            end += 1;
        }
        if end - start > best {
            best = end - start;
            best_at = start;
        }
    }
    let mid = sorted_us[best_at] + (sorted_us[best_at + best - 1] - sorted_us[best_at]) / 2;
    (best as f64 / n as f64, mid)
}

/// The clock step the values sit on, or 0 when they do not sit on a coarse lattice.
///
/// `sorted_us` must be ascending. The candidate step is the third smallest positive gap between
/// neighbours (so one or two glitched timestamps cannot fake a fine clock); it is accepted when
/// at least 80 % of the gaps are within a tenth of a step (and at least 1 ms) of a multiple of
/// it. A macro's fixed hold alone does not pass: its other gaps are off the lattice.
/// `gaps` is scratch.
pub fn lattice_step(sorted_us: &[i64], gaps: &mut Vec<i64>) -> i64 {
    gaps.clear();
    gaps.extend(sorted_us.windows(2).map(|w| w[1] - w[0]).filter(|&d| d > 0));
    if gaps.len() < 3 {
        return 0;
    }
    let step = *gaps.select_nth_unstable(2).1;
    let tolerance = (step / 10).max(1_000);
    if step <= tolerance {
        return 0;
    }
    let on_lattice = gaps
        .iter()
        .filter(|&&d| {
            let r = d % step;
            r.min(step - r) <= tolerance
        })
        .count();
    if on_lattice * 5 >= gaps.len() * 4 {
        step
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let (share, _) = densest_span(&[0, 10_000], 10_000);
        assert_eq!(share, 0.5);
    }

    #[test]
    fn lattice_is_found_despite_equal_times_and_a_glitch() {
        let mut gaps = Vec::new();
        let times = [0, 0, 16_000, 48_000, 48_000, 64_000, 65_000, 112_000, 160_000, 176_000];
        assert_eq!(lattice_step(&times, &mut gaps), 16_000);
        assert_eq!(lattice_step(&[5, 5], &mut gaps), 0);
    }

    #[test]
    fn fine_clock_and_fixed_hold_macro_are_not_a_lattice() {
        let mut gaps = Vec::new();
        // Downs jittered on a fine clock, each released 30 ms later.
        let mut times: Vec<i64> = (0..40i64)
            .flat_map(|i| {
                let down = i * 100_000 + (i * i * 7_919) % 37_000;
                [down, down + 30_000]
            })
            .collect();
        times.sort_unstable();
        assert_eq!(lattice_step(&times, &mut gaps), 0);
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
