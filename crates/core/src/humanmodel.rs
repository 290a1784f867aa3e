//! A built-in parametric model of human typing, for the simulator and the demo when no real
//! recording (`../shared/data`) is at hand.
//!
//! Each simulated person gets their own pace and variability, drawn from ranges that cover the
//! Aalto study's typists (Dhakal et al., CHI 2018: mean inter-key intervals of about 120 to
//! 480 ms, holds of about 70 to 150 ms): inter-key intervals are log-normal around the person's
//! median, with a per-bigram offset (some letter pairs are always faster for a person), a longer
//! gap before and after a space, sentence pauses of seconds, a shifted capital at each sentence
//! start, and the odd typo corrected with Backspace. Holds are log-normal around the person's
//! median with a per-key offset; a key is released after the next one goes down whenever the
//! hold outlasts the interval (rollover), as in real typing. Letters follow English frequencies.
//! It is a model, not data: the detection figures in `models/EVAL.md` are measured on real
//! typing only.

use rand::Rng;
use rand_distr::{Distribution, LogNormal};

use crate::event::{KeyAction, KeyEvent};

/// evdev codes of a..z (`KEY_A` = 30 ...), in alphabetical order.
const LETTER_CODES: [u32; 26] =
    [30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22, 47, 17, 45, 21, 44];
/// English letter frequencies (per mille), alphabetical.
const LETTER_FREQ: [u32; 26] =
    [82, 15, 28, 43, 127, 22, 20, 61, 70, 2, 8, 40, 24, 67, 75, 19, 1, 60, 63, 91, 28, 10, 24, 2, 20, 1];
const KEY_SPACE: u32 = 57;
const KEY_LEFTSHIFT: u32 = 42;
const KEY_BACKSPACE: u32 = 14;
const KEY_DOT: u32 = 52;

/// One simulated person's typing habits.
#[derive(Debug, Clone, PartialEq)]
pub struct Typist {
    /// Median interval between key-downs inside a word, ms.
    pub interval_median_ms: f64,
    /// Log-normal sigma of those intervals.
    pub interval_sigma: f64,
    /// Median hold, ms.
    pub hold_median_ms: f64,
    /// Log-normal sigma of holds.
    pub hold_sigma: f64,
    /// Chance of a typo per word.
    pub typo_rate: f64,
    /// Per-person seed of the bigram and per-key offsets.
    pub habit_seed: u64,
}

impl Typist {
    /// A person drawn from the population.
    pub fn random(rng: &mut impl Rng) -> Self {
        Self {
            interval_median_ms: rng.random_range(110.0..300.0),
            interval_sigma: rng.random_range(0.35..0.65),
            hold_median_ms: rng.random_range(70.0..140.0),
            hold_sigma: rng.random_range(0.18..0.35),
            typo_rate: rng.random_range(0.0..0.08),
            habit_seed: rng.random(),
        }
    }

    /// A factor in 0.75..1.25 that this person always applies to `a` then `b`.
    fn habit(&self, a: u32, b: u32) -> f64 {
        let mut h = self.habit_seed ^ ((u64::from(a) << 32) | u64::from(b));
        // splitmix64: a stable hash without a dependency.
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        0.75 + (h % 1000) as f64 / 2000.0
    }

    /// `presses` key presses of this person's typing from `start_us`: down and up events in time
    /// order.
    pub fn type_text(&self, start_us: i64, presses: usize, rng: &mut impl Rng) -> Vec<KeyEvent> {
        let interval = LogNormal::new(self.interval_median_ms.ln(), self.interval_sigma).expect("valid sigma");
        let hold = LogNormal::new(self.hold_median_ms.ln(), self.hold_sigma).expect("valid sigma");
        let sentence_pause = LogNormal::new(2_000f64.ln(), 0.5).expect("valid sigma");
        let total: u32 = LETTER_FREQ.iter().sum();

        let mut keys: Vec<(u32, bool)> = Vec::with_capacity(presses + 16); // (key, starts a sentence)
        let mut words_left_in_sentence = 0;
        while keys.len() < presses {
            let sentence_start = words_left_in_sentence == 0;
            if sentence_start {
                words_left_in_sentence = rng.random_range(5..14);
            }
            words_left_in_sentence -= 1;
            let len = rng.random_range(1..=9);
            for i in 0..len {
                let mut pick = rng.random_range(0..total);
                let mut letter = 0;
                for (j, &f) in LETTER_FREQ.iter().enumerate() {
                    if pick < f {
                        letter = j;
                        break;
                    }
                    pick -= f;
                }
                keys.push((LETTER_CODES[letter], sentence_start && i == 0));
                if rng.random_bool(self.typo_rate / len as f64) {
                    keys.push((KEY_BACKSPACE, false));
                }
            }
            keys.push((if words_left_in_sentence == 0 { KEY_DOT } else { KEY_SPACE }, false));
        }
        keys.truncate(presses);

        let mut events = Vec::with_capacity(presses * 2 + 16);
        let mut t = start_us as f64;
        let mut previous = KEY_SPACE;
        // When each key was last released, so a doubled letter is re-pressed after its release.
        let mut released_at = std::collections::HashMap::new();
        for (key, sentence_start) in keys {
            let mut gap_ms = interval.sample(rng) * self.habit(previous, key);
            if key == KEY_SPACE || previous == KEY_SPACE {
                gap_ms *= rng.random_range(1.1..1.6);
            }
            if sentence_start {
                gap_ms += sentence_pause.sample(rng);
            }
            t += gap_ms.clamp(35.0, 20_000.0) * 1_000.0;
            if let Some(&up) = released_at.get(&key) {
                t = t.max(up + 25_000.0);
            }
            if sentence_start {
                // A capital: Shift goes down first and comes up after the letter.
                let shift_down = t - rng.random_range(60.0..160.0) * 1_000.0;
                events.push(KeyEvent::new(shift_down as i64, KEY_LEFTSHIFT, KeyAction::Down));
                events.push(KeyEvent::new(
                    (t + rng.random_range(40.0..120.0) * 1_000.0) as i64,
                    KEY_LEFTSHIFT,
                    KeyAction::Up,
                ));
            }
            let held_us = (hold.sample(rng) * self.habit(key, key)).clamp(25.0, 400.0) * 1_000.0;
            events.push(KeyEvent::new(t as i64, key, KeyAction::Down));
            events.push(KeyEvent::new((t + held_us) as i64, key, KeyAction::Up));
            released_at.insert(key, t + held_us);
            previous = key;
        }
        // Rollover interleaves presses; the stream is in time order, a key's down before its up.
        events.sort_by_key(|e| (e.time_us, e.action == KeyAction::Down));
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn downs(events: &[KeyEvent]) -> Vec<&KeyEvent> {
        events.iter().filter(|e| e.action == KeyAction::Down).collect()
    }

    #[test]
    fn typing_is_time_ordered_with_each_key_released_after_it_goes_down() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20 {
            let typist = Typist::random(&mut rng);
            let events = typist.type_text(1_000_000, 300, &mut rng);
            assert!(events.windows(2).all(|w| w[0].time_us <= w[1].time_us));
            let mut down: std::collections::HashMap<u32, i64> = Default::default();
            for e in &events {
                match e.action {
                    KeyAction::Down => assert!(down.insert(e.key, e.time_us).is_none(), "key down twice"),
                    KeyAction::Up => assert!(down.remove(&e.key).is_some_and(|d| d < e.time_us)),
                    KeyAction::Repeat => unreachable!(),
                }
            }
            assert!(down.is_empty());
        }
    }

    #[test]
    fn pace_and_holds_fall_in_human_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let typist = Typist::random(&mut rng);
        let events = typist.type_text(0, 2_000, &mut rng);
        let d = downs(&events);
        let mut intervals: Vec<i64> =
            d.windows(2).map(|w| w[1].time_us - w[0].time_us).filter(|&i| i < 1_500_000).collect();
        intervals.sort_unstable();
        let median_ms = intervals[intervals.len() / 2] as f64 / 1_000.0;
        assert!((80.0..500.0).contains(&median_ms), "{median_ms}");
        // Irregular, as people are: the middle half spans tens of milliseconds.
        let iqr_ms = (intervals[intervals.len() * 3 / 4] - intervals[intervals.len() / 4]) as f64 / 1_000.0;
        assert!(iqr_ms > 40.0, "{iqr_ms}");
        let keys: std::collections::HashSet<u32> = d.iter().map(|e| e.key).collect();
        assert!(keys.len() > 15, "text, not a key loop: {}", keys.len());
        assert!(keys.contains(&KEY_SPACE) && keys.contains(&KEY_LEFTSHIFT));
    }

    #[test]
    fn the_same_seed_types_the_same() {
        let a = Typist::random(&mut ChaCha8Rng::seed_from_u64(9)).type_text(0, 100, &mut ChaCha8Rng::seed_from_u64(1));
        let b = Typist::random(&mut ChaCha8Rng::seed_from_u64(9)).type_text(0, 100, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(a, b);
        assert_eq!(downs(&a).len(), 100 + a.iter().filter(|e| e.key == KEY_LEFTSHIFT).count() / 2);
    }
}
