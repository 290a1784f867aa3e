//! Timing features of one window: what a macro gives away.
//!
//! The vector is computed once per scored window and reused by the timing rules, the alert
//! explanation and (later) the LSTM's side inputs, so the names and order in
//! [`WindowFeatures::NAMES`] are part of the output format.
//!
//! Terms: an *interval* is down-to-down time between consecutive presses; a *hold* is down-to-up
//! time of one press; a *pause* is an interval too long to be rhythm (thinking, reading).

use serde::{Deserialize, Serialize};

use super::histogram::{densest_span, lattice_step, lattice_step_sorted, IntervalHistogram};
use super::window::{repeats_after, Press};

/// Feature extraction settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    /// Histogram bin width on a fine clock, milliseconds (the original system's 10 ms).
    pub bin_ms: f64,
    /// Intervals longer than this are pauses and are left out of rhythm features, milliseconds.
    pub pause_ms: f64,
    /// A hold at most this long counts as tiny, milliseconds.
    pub tiny_hold_ms: f64,
    /// Longest key-sequence period searched for, presses.
    pub max_period: usize,
    /// Two intervals at the same loop position are equal within this, milliseconds (widened to
    /// the clock resolution on coarse clocks).
    pub period_tolerance_ms: f64,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        Self { bin_ms: 10.0, pause_ms: 1500.0, tiny_hold_ms: 5.0, max_period: 40, period_tolerance_ms: 2.0 }
    }
}

/// Reusable buffers so scoring a window allocates nothing.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    intervals: Vec<i32>,
    holds: Vec<i32>,
    gaps: Vec<i64>,
    keys: Vec<u32>,
    key_counts: Vec<(u32, u32)>,
}

/// The features of one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowFeatures {
    /// Robust histogram score: share of rhythm intervals in the densest bin-wide span, 0..1.
    pub histogram_score: f64,
    /// Middle of that densest span, milliseconds.
    pub histogram_peak_ms: f64,
    /// Step of the coarse clock the window's timestamps sit on, milliseconds; 0 on a fine clock.
    pub clock_resolution_ms: f64,
    /// Median interval, milliseconds.
    pub interval_median_ms: f64,
    /// Robust coefficient of variation of intervals (1.4826 MAD / median).
    pub interval_cv: f64,
    /// Median hold, milliseconds.
    pub hold_median_ms: f64,
    /// Robust spread of holds (1.4826 MAD), milliseconds.
    pub hold_spread_ms: f64,
    /// Step of the coarse lattice the gaps between hold values sit on, milliseconds; 0 on a fine
    /// clock or when all holds are equal. Catches clocks that quantise holds but not intervals.
    pub hold_resolution_ms: f64,
    /// Share of holds within the fullest 2 ms span: 1 when every key is held alike.
    pub hold_mode_share: f64,
    /// Share of known holds that are tiny.
    pub tiny_hold_share: f64,
    /// Share of presses that start before the previous key is released.
    pub rollover_share: f64,
    /// Key-sequence period with the most repetition (1 when none stands out).
    pub key_period: f64,
    /// Share of presses whose key equals the key one period earlier.
    pub key_period_share: f64,
    /// Among period-matched presses, share whose interval equals the one a period earlier.
    pub timing_period_share: f64,
    /// Distinct keys in the window.
    pub distinct_keys: f64,
    /// Share of presses on the window's most pressed key.
    pub top_key_share: f64,
    /// Share of intervals that are pauses.
    pub pause_share: f64,
    /// Share of auto-repeats among the window's presses and the repeats that followed them.
    pub repeat_share: f64,
    /// Presses in the window.
    pub presses: f64,
    /// Rhythm intervals (non-pause) used by the histogram.
    pub rhythm_intervals: f64,
    /// Known holds.
    pub known_holds: f64,
    /// Runs of the user's longer memory that recurred at the best recent period
    /// ([`super::recurrence`]): a replayed recording.
    pub replay_recurrences: f64,
    /// That period, presses (0 without recurrences).
    pub replay_period: f64,
    /// Mean difference of the recurring runs' flights and holds, ms.
    pub replay_error_ms: f64,
    /// 1 when the agent reported the keys' device as virtual (uinput), else 0.
    pub virtual_device: f64,
    /// The user's key-dependence evidence ([`super::dependence`]): the weaker of its recent and
    /// session-wide chi-squared, small for timing that ignores the keys (0 before a verdict).
    pub key_dependence_chi2: f64,
    /// Presses behind that verdict's recent horizon (0: no verdict yet).
    pub key_dependence_presses: f64,
    /// Share of presses after the window's first whose key is among the
    /// [`RECURRENCE_SPAN`] presses before it: what survives of key identity in the agent's
    /// labels, which a typist's keys always show and labels drawn fresh per press do not.
    pub key_recurrence_share: f64,
}

/// Presses back a key's recurrence counts over: the agent's label lifetime
/// (`agent::labels::SHORT_LIFETIME`), within which a key keeps its label.
pub const RECURRENCE_SPAN: usize = 16;

impl WindowFeatures {
    /// Feature names, in [`Self::to_array`] order.
    pub const NAMES: [&'static str; 28] = [
        "histogram_score",
        "histogram_peak_ms",
        "clock_resolution_ms",
        "interval_median_ms",
        "interval_cv",
        "hold_median_ms",
        "hold_spread_ms",
        "hold_resolution_ms",
        "hold_mode_share",
        "tiny_hold_share",
        "rollover_share",
        "key_period",
        "key_period_share",
        "timing_period_share",
        "distinct_keys",
        "top_key_share",
        "pause_share",
        "repeat_share",
        "presses",
        "rhythm_intervals",
        "known_holds",
        "replay_recurrences",
        "replay_period",
        "replay_error_ms",
        "virtual_device",
        "key_dependence_chi2",
        "key_dependence_presses",
        "key_recurrence_share",
    ];

    /// The vector in [`Self::NAMES`] order.
    pub fn to_array(&self) -> [f64; 28] {
        [
            self.histogram_score,
            self.histogram_peak_ms,
            self.clock_resolution_ms,
            self.interval_median_ms,
            self.interval_cv,
            self.hold_median_ms,
            self.hold_spread_ms,
            self.hold_resolution_ms,
            self.hold_mode_share,
            self.tiny_hold_share,
            self.rollover_share,
            self.key_period,
            self.key_period_share,
            self.timing_period_share,
            self.distinct_keys,
            self.top_key_share,
            self.pause_share,
            self.repeat_share,
            self.presses,
            self.rhythm_intervals,
            self.known_holds,
            self.replay_recurrences,
            self.replay_period,
            self.replay_error_ms,
            self.virtual_device,
            self.key_dependence_chi2,
            self.key_dependence_presses,
            self.key_recurrence_share,
        ]
    }
}

const MAD_TO_SIGMA: f64 = 1.4826;
const US_PER_MS: f64 = 1000.0;

/// The rhythm intervals of the window `scratch` last held (after [`extract`]) in bins of
/// `bin_ms`.
pub fn interval_histogram(scratch: &Scratch, bin_ms: f64) -> IntervalHistogram {
    IntervalHistogram::of(&scratch.intervals, bin_ms)
}

/// Computes the features of `presses` (oldest first).
pub fn extract(presses: &[Press], cfg: &FeatureConfig, scratch: &mut Scratch) -> WindowFeatures {
    let mut f = WindowFeatures { presses: presses.len() as f64, ..WindowFeatures::default() };
    if presses.len() < 2 {
        return f;
    }
    let pause_us = (cfg.pause_ms * US_PER_MS) as i64;

    // Intervals, pauses, rollover.
    scratch.intervals.clear();
    let (mut pauses, mut rollovers, mut rollover_known) = (0usize, 0usize, 0usize);
    for pair in presses.windows(2) {
        let interval = pair[1].down_us.saturating_sub(pair[0].down_us);
        if interval > pause_us {
            pauses += 1;
        } else {
            // Sorted as i32 (half the bytes of i64); rhythm intervals are far below 35 minutes.
            scratch.intervals.push(interval.clamp(0, i64::from(i32::MAX)) as i32);
        }
        if let Some(h) = pair[0].hold() {
            rollover_known += 1;
            if pair[1].down_us < pair[0].down_us.saturating_add(i64::from(h)) {
                rollovers += 1;
            }
        }
    }
    f.pause_share = pauses as f64 / (presses.len() - 1) as f64;
    f.rollover_share = ratio(rollovers, rollover_known);
    f.rhythm_intervals = scratch.intervals.len() as f64;
    scratch.intervals.sort_unstable();
    scratch.holds.clear();
    scratch.holds.extend(presses.iter().filter_map(Press::hold));
    scratch.holds.sort_unstable();
    f.known_holds = scratch.holds.len() as f64;

    // The clock: every interval and hold is a difference of two of its timestamps.
    let clock_us = lattice_step_sorted(&[&scratch.intervals[..], &scratch.holds[..]]);
    f.clock_resolution_ms = clock_us as f64 / US_PER_MS;

    if !scratch.intervals.is_empty() {
        let width = ((cfg.bin_ms * US_PER_MS) as i64).max(clock_us);
        let (share, peak) = densest_span(&scratch.intervals, width);
        f.histogram_score = share;
        f.histogram_peak_ms = peak as f64 / US_PER_MS;
        let (median, mad) = median_and_mad_sorted(&scratch.intervals);
        f.interval_median_ms = median as f64 / US_PER_MS;
        f.interval_cv = if median > 0 { MAD_TO_SIGMA * mad as f64 / median as f64 } else { 0.0 };
    }

    if !scratch.holds.is_empty() {
        let tiny_us = (cfg.tiny_hold_ms * US_PER_MS) as i32;
        let tiny = scratch.holds.partition_point(|&h| h <= tiny_us);
        f.tiny_hold_share = ratio(tiny, scratch.holds.len());
        // Gaps between sorted hold values: equal holds (a macro's) make no gap and no lattice.
        scratch.gaps.clear();
        scratch.gaps.extend(scratch.holds.windows(2).map(|w| i64::from(w[1] - w[0])));
        f.hold_resolution_ms = lattice_step(&scratch.gaps) as f64 / US_PER_MS;
        let (same, _) = densest_span(&scratch.holds, 2 * US_PER_MS as i64);
        f.hold_mode_share = same;
        let (median, mad) = median_and_mad_sorted(&scratch.holds);
        f.hold_median_ms = median as f64 / US_PER_MS;
        f.hold_spread_ms = MAD_TO_SIGMA * mad as f64 / US_PER_MS;
    }

    let (distinct, top) = key_counts(presses, &mut scratch.key_counts);
    f.distinct_keys = distinct as f64;
    f.top_key_share = ratio(top, presses.len());
    f.key_recurrence_share = ratio(recurring_presses(presses), presses.len() - 1);

    let tolerance_us = ((cfg.period_tolerance_ms * US_PER_MS) as i64).max(clock_us);
    let (period, key_share, timing_share) = periodicity(presses, &mut scratch.keys, cfg.max_period, tolerance_us);
    f.key_period = period as f64;
    f.key_period_share = key_share;
    f.timing_period_share = timing_share;
    let repeats = repeats_after(presses);
    f.repeat_share = f64::from(repeats) / (f64::from(repeats) + presses.len() as f64);
    f
}

/// Median and median absolute deviation of ascending `sorted` (upper median for even lengths).
///
/// The deviations from the median grow outwards on both sides, so the MAD is found by walking
/// two cursors out from the median: linear, no second sort.
fn median_and_mad_sorted<T: Copy + Into<i64> + Ord>(sorted: &[T]) -> (i64, i64) {
    debug_assert!(!sorted.is_empty() && sorted.windows(2).all(|w| w[0] <= w[1]));
    let n = sorted.len();
    let mid = n / 2;
    let at = |i: usize| -> i64 { sorted[i].into() };
    let median = at(mid);
    // Take the (mid + 1) smallest deviations; the last one taken is the MAD.
    let (mut lo, mut hi) = (mid as isize - 1, mid + 1);
    let mut mad = 0;
    for _ in 0..mid {
        let down = (lo >= 0).then(|| median - at(lo as usize));
        let up = (hi < n).then(|| at(hi) - median);
        mad = match (down, up) {
            (Some(d), Some(u)) if d <= u => {
                lo -= 1;
                d
            }
            (_, Some(u)) => {
                hi += 1;
                u
            }
            (Some(d), None) => {
                lo -= 1;
                d
            }
            (None, None) => break,
        };
    }
    (median, mad)
}

/// Distinct keys and the count of the most pressed one, with a small open-addressing table
/// (`table` is scratch): linear in the window, where sorting the keys is not.
fn key_counts(presses: &[Press], table: &mut Vec<(u32, u32)>) -> (usize, usize) {
    let slots = (presses.len() * 2).next_power_of_two().max(16);
    table.clear();
    table.resize(slots, (0, 0));
    let mask = slots - 1;
    let (mut distinct, mut top) = (0usize, 0u32);
    for p in presses {
        // Fibonacci hashing spreads sequential key codes and random labels alike.
        let mut slot = (p.key.wrapping_mul(0x9E37_79B9) as usize) & mask;
        loop {
            let (key, count) = &mut table[slot];
            if *count == 0 {
                (*key, *count) = (p.key, 1);
                distinct += 1;
                top = top.max(1);
                break;
            }
            if *key == p.key {
                *count += 1;
                top = top.max(*count);
                break;
            }
            slot = (slot + 1) & mask;
        }
    }
    (distinct, top as usize)
}

/// Presses after the first whose key is among the [`RECURRENCE_SPAN`] presses before them.
fn recurring_presses(presses: &[Press]) -> usize {
    (1..presses.len())
        .filter(|&i| presses[i.saturating_sub(RECURRENCE_SPAN)..i].iter().any(|q| q.key == presses[i].key))
        .count()
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Finds the key-sequence period `p` (1..=max, among the distances back to earlier presses of
/// the window's newest key) at which keys repeat most, then measures how often the interval
/// into a press equals the interval one period earlier (a replayed loop or a skill rotation on
/// a timer repeats both).
fn periodicity(presses: &[Press], keys: &mut Vec<u32>, max_period: usize, tolerance_us: i64) -> (usize, f64, f64) {
    let n = presses.len();
    keys.clear();
    keys.extend(presses.iter().map(|p| p.key));
    let max_p = max_period.min(n.saturating_sub(10));
    let (mut best_p, mut best_share) = (1usize, 0.0f64);
    // A loop of period p repeats the newest key p presses back, so only the distances to
    // earlier presses of the newest key are candidates: a handful instead of every p.
    let newest = keys[n - 1];
    for p in 1..=max_p {
        if keys[n - 1 - p] != newest {
            continue;
        }
        // Branch-free count over two shifted slices: the compiler vectorises it.
        let matches: u32 = keys[p..].iter().zip(&keys[..n - p]).map(|(a, b)| u32::from(a == b)).sum();
        let share = f64::from(matches) / (n - p) as f64;
        // Strictly better only: multiples of the true period tie with it and lose.
        if share > best_share + 1e-9 {
            best_share = share;
            best_p = p;
        }
    }
    if best_share == 0.0 {
        return (1, 0.0, 0.0);
    }
    let (mut compared, mut equal) = (0usize, 0usize);
    for i in (best_p + 1)..n {
        if keys[i] == keys[i - best_p] && keys[i - 1] == keys[i - 1 - best_p] {
            compared += 1;
            let now = presses[i].down_us.saturating_sub(presses[i - 1].down_us);
            let then = presses[i - best_p].down_us.saturating_sub(presses[i - best_p - 1].down_us);
            if now.saturating_sub(then).saturating_abs() <= tolerance_us {
                equal += 1;
            }
        }
    }
    (best_p, best_share, ratio(equal, compared))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presses(intervals_ms: &[i64], holds_ms: &[i64], keys: &[u32]) -> Vec<Press> {
        let mut t = 1_000_000;
        let mut out = Vec::new();
        for i in 0..=intervals_ms.len() {
            out.push(Press {
                down_us: t,
                key: keys[i % keys.len()],
                hold_us: (holds_ms[i % holds_ms.len()] * 1000) as i32,
                repeats: 0,
            });
            if i < intervals_ms.len() {
                t += intervals_ms[i] * 1000;
            }
        }
        out
    }

    fn feats(p: &[Press]) -> WindowFeatures {
        extract(p, &FeatureConfig::default(), &mut Scratch::default())
    }

    #[test]
    fn fixed_macro_is_perfectly_regular() {
        let f = feats(&presses(&[50; 49], &[20], &[2, 3, 4, 5]));
        assert_eq!(f.histogram_score, 1.0);
        assert_eq!(f.interval_cv, 0.0);
        assert_eq!(f.hold_spread_ms, 0.0);
        assert_eq!(f.key_period, 4.0);
        assert_eq!(f.key_period_share, 1.0);
        assert_eq!(f.timing_period_share, 1.0);
        assert_eq!(f.distinct_keys, 4.0);
        assert_eq!(f.top_key_share, 13.0 / 50.0);
        assert_eq!(f.histogram_peak_ms, 50.0);
    }

    #[test]
    fn varied_typing_is_not() {
        let intervals: Vec<i64> = (0..49).map(|i| 90 + (i * 37) % 180).collect();
        let holds: Vec<i64> = (0..50).map(|i| 60 + (i * 13) % 70).collect();
        let keys: Vec<u32> = "the quick brown fox jumps over a lazy dog at night".bytes().map(u32::from).collect();
        let f = feats(&presses(&intervals, &holds, &keys));
        assert!(f.histogram_score < 0.2, "{f:?}");
        assert!(f.interval_cv > 0.3, "{f:?}");
        assert!(f.hold_spread_ms > 10.0, "{f:?}");
        assert!(f.key_period_share < 0.5, "{f:?}");
    }

    #[test]
    fn pauses_are_left_out_of_rhythm() {
        let mut intervals = vec![100; 49];
        intervals[10] = 5_000;
        let f = feats(&presses(&intervals, &[30], &[1, 2]));
        assert_eq!(f.rhythm_intervals, 48.0);
        assert_eq!(f.histogram_score, 1.0);
        assert!((f.pause_share - 1.0 / 49.0).abs() < 1e-9);
    }

    #[test]
    fn rollover_and_tiny_holds_are_measured() {
        // Holds longer than the interval: every press overlaps the next.
        let f = feats(&presses(&[80; 9], &[120], &[1, 2, 3]));
        assert_eq!(f.rollover_share, 1.0);
        let f = feats(&presses(&[80; 9], &[1], &[1, 2, 3]));
        assert_eq!(f.tiny_hold_share, 1.0);
        assert_eq!(f.rollover_share, 0.0);
    }

    #[test]
    fn coarse_clock_widens_the_span() {
        // Intervals on a 47 ms lattice: spread across 4 lattice points, one bin each.
        let intervals: Vec<i64> = (0..49).map(|i| 94 + 47 * (i % 4)).collect();
        let f = feats(&presses(&intervals, &[94], &[1, 2, 3, 5, 8, 13, 21]));
        assert_eq!(f.clock_resolution_ms, 47.0);
        assert!(f.histogram_score <= 0.3, "{f:?}");
    }

    #[test]
    fn unknown_holds_are_skipped() {
        let mut p = presses(&[100; 9], &[40], &[1, 2]);
        p[3].hold_us = crate::detect::window::HOLD_UNKNOWN;
        let f = feats(&p);
        assert_eq!(f.known_holds, 9.0);
    }

    #[test]
    fn tiny_windows_do_not_panic() {
        assert_eq!(feats(&[]).presses, 0.0);
        assert_eq!(feats(&presses(&[], &[1], &[1])).histogram_score, 0.0);
    }

    #[test]
    fn key_recurrence_counts_keys_seen_within_the_span() {
        let intervals = [120; 40];
        // Three keys in turn: every press from the fourth on recurs.
        assert_eq!(feats(&presses(&intervals, &[30], &[1, 2, 3])).key_recurrence_share, 38.0 / 40.0);
        // A loop longer than the span, or a fresh label for every press: nothing recurs.
        let loop_keys: Vec<u32> = (1..=RECURRENCE_SPAN as u32 + 1).collect();
        assert_eq!(feats(&presses(&intervals, &[30], &loop_keys)).key_recurrence_share, 0.0);
        let fresh: Vec<u32> = (100..141).collect();
        assert_eq!(feats(&presses(&intervals, &[30], &fresh)).key_recurrence_share, 0.0);
    }

    #[test]
    fn median_and_mad_match_the_definition() {
        let cases: [&[i32]; 5] = [&[5], &[1, 2], &[1, 2, 3, 4, 100], &[0, 0, 0, 7, 9, 9], &[-3, 1, 1, 2, 8, 20, 21]];
        for values in cases {
            let median = i64::from(values[values.len() / 2]);
            let mut dev: Vec<i64> = values.iter().map(|&v| (i64::from(v) - median).abs()).collect();
            dev.sort_unstable();
            assert_eq!(median_and_mad_sorted(values), (median, dev[dev.len() / 2]), "{values:?}");
        }
    }

    #[test]
    fn names_are_the_serialized_field_names_in_array_order() {
        // Distinct values per field, so a name/array mismatch cannot hide behind equal values.
        let mut f = WindowFeatures::default();
        let json = serde_json::to_value(f).unwrap();
        let fields: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        let mut sorted_names = WindowFeatures::NAMES.to_vec();
        sorted_names.sort_unstable();
        assert_eq!(fields, sorted_names, "serde_json orders keys alphabetically");
        f = serde_json::from_value(serde_json::Value::Object(
            WindowFeatures::NAMES
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), serde_json::json!(i as f64)))
                .collect(),
        ))
        .unwrap();
        let expected: Vec<f64> = (0..WindowFeatures::NAMES.len()).map(|i| i as f64).collect();
        assert_eq!(f.to_array().to_vec(), expected);
    }
}
