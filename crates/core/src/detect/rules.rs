//! Timing rules: turn a window's features into a combined score and the names of what fired.
//!
//! Each rule maps one feature (or a pair) to a sub-score in 0..1 with a linear ramp that crosses
//! 0.5 exactly at the rule's threshold; the window's score is the largest sub-score. A rule
//! *fires* when its sub-score reaches 0.5, so "which features fired" and "why the score is high"
//! are the same statement. One exception: `virtual_device` is an explanation, not a score
//! (unless `virtual_device_alerts` is set): it joins the reasons of a window other evidence made
//! suspicious.

use serde::{Deserialize, Serialize};

use super::features::WindowFeatures;

/// Rule thresholds. Defaults were tuned on real human typing (see `docs/detection.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Rhythm intervals a window needs before any timing rule may fire.
    pub min_intervals: usize,
    /// `interval_histogram` fires at this histogram score or above.
    pub histogram_threshold: f64,
    /// `interval_regular` fires at this robust interval CV or below ...
    pub interval_cv_threshold: f64,
    /// ... unless one key has at least this share of the presses: one finger tapping one key
    /// (deleting text, a skill key) is as regular as that in people, so it needs other evidence.
    pub single_key_share: f64,
    /// `hold_constant` fires when at least this share of holds lie within one 2 ms span.
    pub hold_mode_threshold: f64,
    /// `hold_tiny` fires at this tiny-hold share or above.
    pub tiny_hold_threshold: f64,
    /// `sequence_loop` fires when both the key and the timing period shares reach this.
    pub loop_threshold: f64,
    /// `replay` fires when the user's memory holds this many recurrences at one period.
    pub replay_recurrences: u16,
    /// `keyless_timing` fires when the key-dependence chi-squared (eight degrees of freedom)
    /// stays below this on both horizons: 26, its 99.9 % point under the null of a sampler.
    pub key_dependence_chi2: f64,
    /// `keys_never_recur` fires when at most this share of a window's presses have their key
    /// among the 16 presses before them (`key_recurrence_share`). A typist's keys recur, and
    /// so do the agent's labels, which a key keeps for 16 presses; an agent changed to draw a
    /// fresh label for every press shows none (docs/agent.md, "Threat model").
    pub key_recurrence_floor: f64,
    /// Keys from a virtual device (uinput) make a window suspicious on their own. Off by default:
    /// key remappers (keyd, kmonad), remote desktops and on-screen keyboards type through uinput
    /// too, so by default `virtual_device` only explains an alert other evidence raised.
    pub virtual_device_alerts: bool,
    /// Hold rules need a clock at least this fine (ms), for timestamps and for hold values:
    /// coarse clocks round holds to 0 or a single step, which says nothing about the hand.
    pub hold_rules_max_clock_ms: f64,
}

impl Default for RuleConfig {
    fn default() -> Self {
        Self {
            min_intervals: 20,
            histogram_threshold: 0.6,
            interval_cv_threshold: 0.1,
            single_key_share: 0.5,
            hold_mode_threshold: 0.9,
            tiny_hold_threshold: 0.8,
            loop_threshold: 0.85,
            hold_rules_max_clock_ms: 4.0,
            replay_recurrences: 3,
            key_dependence_chi2: 26.0,
            key_recurrence_floor: 0.1,
            virtual_device_alerts: false,
        }
    }
}

/// A reason a window counts as suspicious: a timing rule, or the sequence model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Most intervals fall into one bin-wide span.
    IntervalHistogram,
    /// Intervals vary far less than human rhythm does.
    IntervalRegular,
    /// Every key is held for the same time.
    HoldConstant,
    /// Keys are released almost as soon as they are pressed.
    HoldTiny,
    /// The same keys recur with the same timing: a replayed loop or a timed rotation.
    SequenceLoop,
    /// The sequence model (LSTM) scored the window at or above its operating threshold.
    Lstm,
    /// Runs of flights and holds recurred, each within a few ms, beyond the window: a replay.
    Replay,
    /// The sequence model's evidence over many windows, none alarming alone, reached the
    /// sequential test's threshold (`detect::policy`).
    Accumulated,
    /// The keys came from a virtual input device (uinput), as the agent reported it.
    VirtualDevice,
    /// The account's timing fingerprints are shared with other accounts': one script run by
    /// many (`detect::fleet`). Decided across users by the fleet stages, never per window.
    Fleet,
    /// Over hundreds of presses, holds and flights showed none of the dependence on keys and on
    /// the previous press that a person's do (`detect::dependence`): a sampler.
    KeylessTiming,
    /// The per-press model's evidence (a CUSUM over its log-odds, `metronome_model::stream`) crossed its
    /// threshold: raised at that press, with no window to confirm it.
    PressLstm,
    /// Hardly any key recurred within 16 presses: the keys say nothing of the keyboard, as
    /// from an agent changed to send a fresh label for every press.
    KeysNeverRecur,
}

impl Rule {
    /// Every reason, in bit order.
    pub const ALL: [Rule; 13] = [
        Rule::IntervalHistogram,
        Rule::IntervalRegular,
        Rule::HoldConstant,
        Rule::HoldTiny,
        Rule::SequenceLoop,
        Rule::Lstm,
        Rule::Replay,
        Rule::Accumulated,
        Rule::VirtualDevice,
        Rule::Fleet,
        Rule::KeylessTiming,
        Rule::PressLstm,
        Rule::KeysNeverRecur,
    ];

    /// The scorer behind this reason: `histogram` for the timing rules over the
    /// inter-key-interval histogram and holds, `lstm` for the sequence model, `fleet` for the
    /// fleet stages.
    pub fn scorer(self) -> &'static str {
        match self {
            Rule::Lstm | Rule::Accumulated | Rule::PressLstm => "lstm",
            Rule::Fleet => "fleet",
            _ => "histogram",
        }
    }

    /// The features this rule reads, by [`WindowFeatures::NAMES`] name: what an alert marks as
    /// having fired when the rule is among its reasons.
    pub fn features(self) -> &'static [&'static str] {
        match self {
            Rule::IntervalHistogram => &["histogram_score"],
            Rule::IntervalRegular => &["interval_cv"],
            Rule::HoldConstant => &["hold_mode_share"],
            Rule::HoldTiny => &["tiny_hold_share"],
            Rule::SequenceLoop => &["key_period_share", "timing_period_share"],
            Rule::Lstm => &[],
            Rule::Replay => &["replay_recurrences", "replay_period", "replay_error_ms"],
            Rule::Accumulated => &[],
            Rule::VirtualDevice => &["virtual_device"],
            Rule::Fleet => &[],
            Rule::KeylessTiming => &["key_dependence_chi2", "key_dependence_presses"],
            Rule::PressLstm => &[],
            Rule::KeysNeverRecur => &["key_recurrence_share"],
        }
    }

    /// The name used in outputs.
    pub fn name(self) -> &'static str {
        match self {
            Rule::IntervalHistogram => "interval_histogram",
            Rule::IntervalRegular => "interval_regular",
            Rule::HoldConstant => "hold_constant",
            Rule::HoldTiny => "hold_tiny",
            Rule::SequenceLoop => "sequence_loop",
            Rule::Lstm => "lstm",
            Rule::Replay => "replay",
            Rule::Accumulated => "accumulated",
            Rule::VirtualDevice => "virtual_device",
            Rule::Fleet => "fleet",
            Rule::KeylessTiming => "keyless_timing",
            Rule::PressLstm => "press_lstm",
            Rule::KeysNeverRecur => "keys_never_recur",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of rules, as a bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
// u16 since the ninth reason; postcard writes it as a varint, so a set stored as a u8 (all
// below 128) reads back the same.
pub struct RuleSet(u16);

impl RuleSet {
    /// No rule.
    pub const EMPTY: RuleSet = RuleSet(0);

    /// Adds `rule`.
    pub fn insert(&mut self, rule: Rule) {
        self.0 |= rule.bit();
    }

    /// True when `rule` is in the set.
    pub fn contains(self, rule: Rule) -> bool {
        self.0 & rule.bit() != 0
    }

    /// True when no rule is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Both sets together.
    pub fn union(self, other: RuleSet) -> RuleSet {
        RuleSet(self.0 | other.0)
    }

    /// The rules in the set, in [`Rule::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Rule> {
        Rule::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    /// The names of the rules in the set.
    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Rule::name).collect()
    }

    /// The scorers behind the set's reasons, each once: `histogram`, `lstm`.
    pub fn scorers(self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for scorer in self.iter().map(Rule::scorer) {
            if !out.contains(&scorer) {
                out.push(scorer);
            }
        }
        out
    }
}

/// A window's timing verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimingScore {
    /// Largest sub-score, 0..1.
    pub score: f64,
    /// Rules whose sub-score reached 0.5.
    pub fired: RuleSet,
}

/// Scores `f` against the rules.
pub fn evaluate(f: &WindowFeatures, cfg: &RuleConfig) -> TimingScore {
    let mut out = TimingScore { score: 0.0, fired: RuleSet::EMPTY };
    // An explanation first (it needs no rhythm): alone it raises the score only when asked to.
    if f.virtual_device >= 1.0 {
        out.fired.insert(Rule::VirtualDevice);
        if cfg.virtual_device_alerts {
            out.score = 1.0;
        }
    }
    if f.rhythm_intervals < cfg.min_intervals as f64 {
        return out;
    }
    let mut consider = |rule: Rule, sub: f64| {
        if sub >= 0.5 {
            out.fired.insert(rule);
        }
        out.score = out.score.max(sub);
    };
    consider(Rule::IntervalHistogram, ramp_above(f.histogram_score, cfg.histogram_threshold, 0.2));
    if f.top_key_share < cfg.single_key_share {
        consider(Rule::IntervalRegular, ramp_below(f.interval_cv, cfg.interval_cv_threshold, 0.05));
    }
    let fine_clock =
        f.clock_resolution_ms <= cfg.hold_rules_max_clock_ms && f.hold_resolution_ms <= cfg.hold_rules_max_clock_ms;
    if fine_clock && f.known_holds >= cfg.min_intervals as f64 {
        consider(Rule::HoldConstant, ramp_above(f.hold_mode_share, cfg.hold_mode_threshold, 0.1));
        consider(Rule::HoldTiny, ramp_above(f.tiny_hold_share, cfg.tiny_hold_threshold, 0.2));
    }
    consider(Rule::SequenceLoop, ramp_above(f.key_period_share.min(f.timing_period_share), cfg.loop_threshold, 0.15));
    // Each recurrence is a verified run of ten or more presses: half the threshold is already
    // far from anything human, so the ramp reaches 1 at twice it.
    let replay = f.replay_recurrences / f64::from(cfg.replay_recurrences.max(1));
    consider(Rule::Replay, (0.5 * replay).min(1.0));
    if f.key_dependence_presses > 0.0 {
        // 0.5 at the threshold, 1 at no dependence at all.
        let keyless = 1.0 - 0.5 * f.key_dependence_chi2 / cfg.key_dependence_chi2.max(f64::MIN_POSITIVE);
        consider(Rule::KeylessTiming, keyless.clamp(0.0, 1.0));
    }
    if f.key_recurrence_share <= cfg.key_recurrence_floor {
        // 0.5 at the floor, 1 at no recurrence at all.
        let floor = cfg.key_recurrence_floor.max(f64::MIN_POSITIVE);
        consider(Rule::KeysNeverRecur, ramp_below(f.key_recurrence_share, floor, floor / 2.0));
    }
    out
}

/// 0.5 at `threshold`, rising to 1 at `threshold + width`.
fn ramp_above(x: f64, threshold: f64, width: f64) -> f64 {
    (0.5 + (x - threshold) / (2.0 * width)).clamp(0.0, 1.0)
}

/// 0.5 at `threshold`, rising to 1 at `threshold - width`.
fn ramp_below(x: f64, threshold: f64, width: f64) -> f64 {
    (0.5 + (threshold - x) / (2.0 * width)).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_set_stored_as_one_byte_reads_back_the_same() {
        let mut old = RuleSet::EMPTY;
        for r in [Rule::IntervalHistogram, Rule::HoldTiny, Rule::Lstm] {
            old.insert(r);
        }
        // Before the ninth reason the set was a u8, one raw byte in postcard.
        let bytes = [old.0 as u8];
        assert_eq!(postcard::from_bytes::<RuleSet>(&bytes).unwrap(), old);
        let mut all = RuleSet::EMPTY;
        Rule::ALL.iter().for_each(|r| all.insert(*r));
        assert_eq!(postcard::from_bytes::<RuleSet>(&postcard::to_stdvec(&all).unwrap()).unwrap(), all);
        assert_eq!(all.iter().count(), Rule::ALL.len());
    }

    fn human_like() -> WindowFeatures {
        WindowFeatures {
            histogram_score: 0.2,
            interval_cv: 0.45,
            hold_spread_ms: 18.0,
            hold_mode_share: 0.1,
            tiny_hold_share: 0.0,
            key_period_share: 0.2,
            key_recurrence_share: 0.6,
            top_key_share: 0.15,
            timing_period_share: 0.1,
            clock_resolution_ms: 1.0,
            rhythm_intervals: 45.0,
            known_holds: 48.0,
            ..WindowFeatures::default()
        }
    }

    #[test]
    fn every_feature_a_rule_reads_is_a_known_feature() {
        for rule in Rule::ALL {
            for name in rule.features() {
                assert!(WindowFeatures::NAMES.contains(name), "{rule:?} reads unknown feature {name}");
            }
        }
    }

    #[test]
    fn human_like_window_fires_nothing() {
        let s = evaluate(&human_like(), &RuleConfig::default());
        assert!(s.fired.is_empty());
        assert!(s.score < 0.5);
    }

    #[test]
    fn each_rule_fires_on_its_own_feature() {
        let cfg = RuleConfig::default();
        type Tweak = fn(&mut WindowFeatures);
        let cases: [(Rule, Tweak); 6] = [
            (Rule::IntervalHistogram, |f| f.histogram_score = 0.9),
            (Rule::IntervalRegular, |f| f.interval_cv = 0.02),
            (Rule::HoldConstant, |f| f.hold_mode_share = 1.0),
            (Rule::HoldTiny, |f| f.tiny_hold_share = 1.0),
            (Rule::SequenceLoop, |f| {
                f.key_period_share = 1.0;
                f.timing_period_share = 1.0;
            }),
            (Rule::KeysNeverRecur, |f| f.key_recurrence_share = 0.0),
        ];
        for (rule, tweak) in cases {
            let mut f = human_like();
            tweak(&mut f);
            let s = evaluate(&f, &cfg);
            assert_eq!(s.fired.iter().collect::<Vec<_>>(), vec![rule], "{rule:?}");
            assert!(s.score >= 0.5);
        }
    }

    #[test]
    fn threshold_is_exactly_the_firing_point() {
        let cfg = RuleConfig::default();
        let mut f = human_like();
        f.histogram_score = cfg.histogram_threshold;
        assert!(evaluate(&f, &cfg).fired.contains(Rule::IntervalHistogram));
        f.histogram_score = cfg.histogram_threshold - 1e-6;
        assert!(!evaluate(&f, &cfg).fired.contains(Rule::IntervalHistogram));
    }

    #[test]
    fn hold_rules_are_silent_on_coarse_clocks() {
        let mut f = human_like();
        f.hold_mode_share = 1.0;
        f.tiny_hold_share = 1.0;
        f.clock_resolution_ms = 47.0;
        assert!(evaluate(&f, &RuleConfig::default()).fired.is_empty());
        f.clock_resolution_ms = 0.0;
        f.hold_resolution_ms = 16.0;
        assert!(evaluate(&f, &RuleConfig::default()).fired.is_empty(), "coarse key-up clock");
    }

    #[test]
    fn regular_tapping_of_one_key_alone_does_not_fire() {
        let mut f = human_like();
        f.interval_cv = 0.05;
        f.top_key_share = 0.9;
        assert!(evaluate(&f, &RuleConfig::default()).fired.is_empty());
        f.hold_mode_share = 1.0;
        assert!(evaluate(&f, &RuleConfig::default()).fired.contains(Rule::HoldConstant));
    }

    #[test]
    fn too_few_intervals_fire_nothing() {
        let mut f = human_like();
        f.histogram_score = 1.0;
        f.rhythm_intervals = 5.0;
        assert_eq!(evaluate(&f, &RuleConfig::default()).score, 0.0);
    }
}
