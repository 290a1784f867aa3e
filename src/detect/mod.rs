//! The detection core: per-user windows, timing features, rules and the alert policy.
//!
//! Pure logic: no I/O, no clocks, no async. The offline scorer and the stream processor both
//! drive a [`Detector`] with the events of one user at a time and that user's [`UserState`];
//! where the state lives (a map, a RocksDB store) is the caller's business.
//!
//! # Layout
//! - [`ordering`]: event-time reordering with a grace period; late events are counted.
//! - [`window`]: the sliding window of the last W presses, scoring cadence, auto-repeat.
//! - [`histogram`]: the interval histogram, robust to bin edges and coarse clocks.
//! - [`features`]: the timing feature vector of a window.
//! - [`rules`]: features to a combined score and the rules that fired.
//! - [`policy`]: k-of-n confirmation, incidents, cool-down.
//!
//! Per event: reorder -> window (press / release / repeat) -> when due: features -> rules ->
//! policy -> [`Output`]s.

pub mod features;
pub mod histogram;
pub mod ordering;
pub mod policy;
pub mod rules;
pub mod window;

use serde::{Deserialize, Serialize};

use crate::event::KeyEvent;
pub use features::{FeatureConfig, WindowFeatures};
pub use ordering::Admission;
pub use policy::{Decision, PolicyConfig, PolicyState};
pub use rules::{Rule, RuleConfig, RuleSet};
pub use window::WindowConfig;

/// Everything the detector is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorConfig {
    /// Identifies the scoring logic in alerts and alert ids.
    pub model_version: String,
    /// Window shape and cadence.
    pub window: WindowConfig,
    /// Feature extraction.
    pub features: FeatureConfig,
    /// Timing rules.
    pub rules: RuleConfig,
    /// Alert policy.
    pub policy: PolicyConfig,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            model_version: "timing-1".to_owned(),
            window: WindowConfig::default(),
            features: FeatureConfig::default(),
            rules: RuleConfig::default(),
            policy: PolicyConfig::default(),
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid detector configuration: {0}")]
pub struct InvalidConfig(pub String);

impl DetectorConfig {
    /// Checks the cross-field constraints serde cannot express.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let w = &self.window;
        let p = &self.policy;
        let fail = |m: &str| Err(InvalidConfig(m.to_owned()));
        if w.size < 3 || w.size > 1024 {
            return fail("window.size must be between 3 and 1024");
        }
        if w.hop == 0 || w.hop > w.size {
            return fail("window.hop must be between 1 and window.size");
        }
        if w.min_presses < 3 || w.min_presses > w.size {
            return fail("window.min_presses must be between 3 and window.size");
        }
        if p.confirm_k == 0 || p.confirm_k > p.confirm_n || p.confirm_n > 64 {
            return fail("policy needs 1 <= confirm_k <= confirm_n <= 64");
        }
        if !(0.0..=1.0).contains(&p.threshold) {
            return fail("policy.threshold must be within 0..1");
        }
        if self.model_version.is_empty() {
            return fail("model_version must not be empty");
        }
        let f = &self.features;
        if !(f.bin_ms > 0.0 && f.pause_ms > 0.0 && f.tiny_hold_ms >= 0.0 && f.period_tolerance_ms >= 0.0) {
            return fail("feature widths must be positive");
        }
        Ok(())
    }
}

/// All the detector remembers about one user. Serializable: the stream keeps it in RocksDB.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    reorder: ordering::ReorderBuffer,
    /// Everything downstream of ordering, apart so the reorder buffer can feed it.
    scored: ScoredState,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ScoredState {
    window: window::KeyWindow,
    policy: PolicyState,
}

impl UserState {
    /// Events dropped as late.
    pub fn late_events(&self) -> u64 {
        self.reorder.late_events()
    }

    /// The policy state (open incident, alerts raised).
    pub fn policy(&self) -> &PolicyState {
        &self.scored.policy
    }
}

/// A scored window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowReport {
    /// Down time of the window's first press.
    pub window_start_us: i64,
    /// Down time of the window's last press: the window's event time.
    pub window_end_us: i64,
    /// Combined score the policy acted on, 0..1.
    pub score: f64,
    /// The robust interval-histogram score, 0..1.
    pub histogram_score: f64,
    /// The feature vector.
    pub features: WindowFeatures,
    /// Rules that fired.
    pub fired: RuleSet,
    /// Whether the window counted as suspicious.
    pub suspicious: bool,
    /// Whether an idle close (rather than the hop) triggered it.
    pub partial: bool,
}

/// An alert: the one raised when a user's incident opens.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertReport {
    /// Deterministic id: same user, window and model version give the same id.
    pub alert_id: uuid::Uuid,
    /// The window that confirmed the incident.
    pub window: WindowReport,
    /// Rules that fired over the confirming windows.
    pub reasons: RuleSet,
    /// The scoring logic's version.
    pub model_version: String,
}

/// What the detector reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A window was scored.
    Window(WindowReport),
    /// An incident opened.
    Alert(AlertReport),
    /// An incident closed at this event time.
    IncidentClosed {
        /// When the incident closed.
        at_us: i64,
    },
}

/// Namespace for alert ids (UUID v5), fixed forever so replays reproduce ids.
const ALERT_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d65_7472_6f6e_6f6d_6531_616c_6572_7473);

/// The deterministic alert id for `user`'s window `[start, end]` under `model_version`.
pub fn alert_id(user: &str, window_start_us: i64, window_end_us: i64, model_version: &str) -> uuid::Uuid {
    let name = format!("{user}\u{1f}{window_start_us}\u{1f}{window_end_us}\u{1f}{model_version}");
    uuid::Uuid::new_v5(&ALERT_ID_NAMESPACE, name.as_bytes())
}

/// Runs users' events through the core. One per thread or task; cheap to create.
#[derive(Debug)]
pub struct Detector {
    cfg: DetectorConfig,
    scratch: features::Scratch,
}

impl Detector {
    /// A detector with a validated configuration.
    pub fn new(cfg: DetectorConfig) -> Result<Self, InvalidConfig> {
        cfg.validate()?;
        Ok(Self { cfg, scratch: features::Scratch::default() })
    }

    /// Feeds one event of `user`. A gap of `idle_timeout` in event time first closes the previous
    /// window. Outputs are appended to `out`.
    pub fn on_event(&mut self, user: &str, state: &mut UserState, event: KeyEvent, out: &mut Vec<Output>) -> Admission {
        let idle_us = i64::from(self.cfg.window.idle_timeout_ms) * 1000;
        if state.reorder.newest_us().is_some_and(|newest| event.time_us.saturating_sub(newest) >= idle_us) {
            self.close_window(user, state, out);
        }
        let grace_us = i64::from(self.cfg.window.grace_ms) * 1000;
        let mut scoring = Scoring { cfg: &self.cfg, scratch: &mut self.scratch, user, out };
        state.reorder.push(event, grace_us, |e| scoring.apply(&mut state.scored, e))
    }

    /// True when `state`'s newest event is at least the idle timeout older than `now_us` (the
    /// stream passes wall-clock time mapped into the user's event time).
    pub fn is_idle(&self, state: &UserState, now_us: i64) -> bool {
        let idle_us = i64::from(self.cfg.window.idle_timeout_ms) * 1000;
        state.reorder.newest_us().is_some_and(|newest| now_us.saturating_sub(newest) >= idle_us)
    }

    /// Runs all of one user's `events` from a fresh state and closes the window at the end, as
    /// the offline scorer does at end of input. For evaluation and tests over whole recordings.
    pub fn score_recording(&mut self, user: &str, events: &[KeyEvent]) -> Vec<Output> {
        let mut state = UserState::default();
        let mut out = Vec::new();
        for e in events {
            self.on_event(user, &mut state, *e, &mut out);
        }
        self.close_window(user, &mut state, &mut out);
        out
    }

    /// Closes `user`'s window: releases held events, scores the partial window if it has enough
    /// unscored presses, and starts afresh. Used on idle timeout and at end of input.
    pub fn close_window(&mut self, user: &str, state: &mut UserState, out: &mut Vec<Output>) {
        let mut scoring = Scoring { cfg: &self.cfg, scratch: &mut self.scratch, user, out };
        state.reorder.flush(|e| scoring.apply(&mut state.scored, e));
        let scored = &mut state.scored;
        if scored.window.unscored_presses() > 0 && scored.window.len() >= self.cfg.window.min_presses {
            scoring.score(scored, true);
        }
        let now_us = state.reorder.newest_us().unwrap_or(0);
        if scored.policy.on_idle(&self.cfg.policy, now_us) == Decision::IncidentClosed {
            scoring.out.push(Output::IncidentClosed { at_us: now_us });
        }
        scored.window.reset();
    }
}

/// What scoring borrows from the detector and the caller, for one user.
struct Scoring<'a> {
    cfg: &'a DetectorConfig,
    scratch: &'a mut features::Scratch,
    user: &'a str,
    out: &'a mut Vec<Output>,
}

impl Scoring<'_> {
    /// One released (time-ordered) event into the window; scores the window when it is due.
    fn apply(&mut self, state: &mut ScoredState, event: KeyEvent) {
        if state.window.apply(&self.cfg.window, event) == window::Applied::PressDue {
            self.score(state, false);
        }
    }

    /// Scores the window now: features, rules, policy, outputs.
    fn score(&mut self, state: &mut ScoredState, partial: bool) {
        let Self { cfg, scratch, user, out } = self;
        let ScoredState { window, policy } = state;
        let presses = window.presses();
        let (Some(first), Some(last)) = (presses.first(), presses.last()) else { return };
        let (window_start_us, window_end_us) = (first.down_us, last.down_us);
        let features = features::extract(presses, &cfg.features, scratch);
        window.mark_scored();
        let timing = rules::evaluate(&features, &cfg.rules);
        let report = WindowReport {
            window_start_us,
            window_end_us,
            score: timing.score,
            histogram_score: features.histogram_score,
            features,
            fired: timing.fired,
            suspicious: timing.score >= cfg.policy.threshold,
            partial,
        };
        let decision = policy.on_window(&cfg.policy, window_end_us, timing.score, timing.fired);
        match decision {
            Decision::Quiet => out.push(Output::Window(report)),
            Decision::IncidentClosed => {
                out.push(Output::Window(report));
                out.push(Output::IncidentClosed { at_us: window_end_us });
            }
            Decision::Alert(reasons) => {
                out.push(Output::Window(report.clone()));
                out.push(Output::Alert(AlertReport {
                    alert_id: alert_id(user, window_start_us, window_end_us, &cfg.model_version),
                    window: report,
                    reasons,
                    model_version: cfg.model_version.clone(),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::KeyAction;
    use crate::macrogen::{self, HoldModel, MacroFamily, MacroSpec};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn fixed_macro(presses: usize, start_us: i64) -> Vec<KeyEvent> {
        let spec = MacroSpec {
            family: MacroFamily::Fixed,
            interval_ms: 100.0,
            jitter_ms: 0.0,
            tick_ms: 10.0,
            hold: HoldModel::Fixed(30.0),
            keys: vec![2, 3, 4],
        };
        macrogen::generate(&spec, &[], start_us, presses, &mut ChaCha8Rng::seed_from_u64(1))
    }

    fn run(detector: &mut Detector, state: &mut UserState, events: &[KeyEvent]) -> Vec<Output> {
        let mut out = Vec::new();
        for e in events {
            detector.on_event("u1", state, *e, &mut out);
        }
        out
    }

    fn alerts(out: &[Output]) -> Vec<&AlertReport> {
        out.iter().filter_map(|o| if let Output::Alert(a) = o { Some(a) } else { None }).collect()
    }

    #[test]
    fn fixed_macro_raises_exactly_one_alert_with_reasons() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut state = UserState::default();
        let out = run(&mut d, &mut state, &fixed_macro(200, 0));
        let a = alerts(&out);
        assert_eq!(a.len(), 1);
        assert!(state.policy().incident().is_some(), "the incident stays open while the macro runs");
        assert!(a[0].reasons.contains(Rule::IntervalHistogram));
        assert_eq!(a[0].window.score, 1.0);
    }

    #[test]
    fn jittered_macro_with_a_fixed_hold_is_caught_by_its_holds() {
        let spec = MacroSpec {
            family: MacroFamily::UniformJitter,
            interval_ms: 150.0,
            jitter_ms: 45.0,
            tick_ms: 10.0,
            hold: HoldModel::Fixed(42.0),
            keys: vec![2, 3, 4, 5],
        };
        let events = macrogen::generate(&spec, &[], 0, 200, &mut ChaCha8Rng::seed_from_u64(3));
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let out = run(&mut d, &mut UserState::default(), &events);
        let a = alerts(&out);
        assert_eq!(a.len(), 1);
        assert!(a[0].reasons.contains(Rule::HoldConstant), "{:?}", a[0].reasons.names());
        assert!(!a[0].reasons.contains(Rule::IntervalHistogram), "too jittered for the histogram");
    }

    #[test]
    fn alert_ids_are_deterministic_and_depend_on_user_window_and_version() {
        let id = alert_id("u1", 1, 2, "v1");
        assert_eq!(id, alert_id("u1", 1, 2, "v1"));
        assert_ne!(id, alert_id("u2", 1, 2, "v1"));
        assert_ne!(id, alert_id("u1", 1, 3, "v1"));
        assert_ne!(id, alert_id("u1", 1, 2, "v2"));
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let first = run(&mut d, &mut UserState::default(), &fixed_macro(120, 0));
        let again = run(&mut d, &mut UserState::default(), &fixed_macro(120, 0));
        assert_eq!(alerts(&first)[0].alert_id, alerts(&again)[0].alert_id);
    }

    /// The stream keeps `UserState` in a store between batches: stopping anywhere, serializing
    /// and resuming must give exactly the outputs of an uninterrupted run.
    #[test]
    fn state_round_trips_mid_stream_without_changing_outputs() {
        let events = fixed_macro(150, 0);
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let straight = run(&mut d, &mut UserState::default(), &events);
        for cut in [1, 37, 101, 299] {
            let mut state = UserState::default();
            let mut resumed = run(&mut d, &mut state, &events[..cut]);
            let bytes = serde_json::to_vec(&state).unwrap();
            let mut restored: UserState = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(restored, state);
            resumed.extend(run(&mut d, &mut restored, &events[cut..]));
            assert_eq!(resumed, straight, "cut at {cut}");
        }
    }

    #[test]
    fn idle_gap_scores_the_partial_window_and_starts_afresh() {
        let cfg = DetectorConfig::default();
        let mut d = Detector::new(cfg.clone()).unwrap();
        let mut state = UserState::default();
        // 35 presses: one hop-scored window at 30, five unscored presses left.
        let mut out = run(&mut d, &mut state, &fixed_macro(35, 0));
        let scored = |o: &[Output]| o.iter().filter(|o| matches!(o, Output::Window(_))).count();
        assert_eq!(scored(&out), 1);
        // The next event comes after the idle timeout: the partial window is scored first.
        let later = i64::from(cfg.window.idle_timeout_ms) * 1000 + 10_000_000;
        out.clear();
        d.on_event("u1", &mut state, KeyEvent::new(later, 9, KeyAction::Down), &mut out);
        let partial: Vec<&WindowReport> =
            out.iter().filter_map(|o| if let Output::Window(w) = o { Some(w) } else { None }).collect();
        assert_eq!(partial.len(), 1);
        assert!(partial[0].partial);
        assert_eq!(partial[0].features.presses, 35.0);
    }

    #[test]
    fn wall_clock_idle_check_uses_the_newest_event() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut state = UserState::default();
        assert!(!d.is_idle(&state, 0), "a user never seen is not idle");
        d.on_event("u1", &mut state, KeyEvent::new(1_000_000, 1, KeyAction::Down), &mut Vec::new());
        assert!(!d.is_idle(&state, 5_000_000));
        assert!(d.is_idle(&state, 11_000_000));
    }

    #[test]
    fn late_events_are_counted_not_scored() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut state = UserState::default();
        let mut events = fixed_macro(20, 10_000_000);
        events.push(KeyEvent::new(1_000_000, 5, KeyAction::Down));
        run(&mut d, &mut state, &events);
        assert_eq!(state.late_events(), 1);
    }

    proptest::proptest! {
        /// Nothing the stream can deliver makes the core panic: any times (including the
        /// extremes), keys, actions and orders, under a small window so scoring runs often.
        #[test]
        fn arbitrary_events_never_panic(
            raw in proptest::collection::vec((proptest::prelude::any::<i64>(), 0u32..6, 0u8..3), 0..300),
            near in proptest::collection::vec((0i64..5_000_000, 0u32..6, 0u8..3), 0..300),
        ) {
            let mut cfg = DetectorConfig::default();
            cfg.window.min_presses = 3;
            cfg.window.hop = 1;
            cfg.rules.min_intervals = 1;
            let mut d = Detector::new(cfg).unwrap();
            let action = |a: u8| [KeyAction::Down, KeyAction::Up, KeyAction::Repeat][a as usize];
            for events in [raw, near] {
                let mut state = UserState::default();
                let mut out = Vec::new();
                for (t, key, a) in events {
                    d.on_event("u", &mut state, KeyEvent::new(t, key, action(a)), &mut out);
                }
                d.close_window("u", &mut state, &mut out);
                for o in &out {
                    if let Output::Window(w) = o {
                        proptest::prop_assert!((0.0..=1.0).contains(&w.score));
                    }
                }
            }
        }
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let mut cfg = DetectorConfig::default();
        cfg.window.hop = 0;
        assert!(Detector::new(cfg).is_err());
        let mut cfg = DetectorConfig::default();
        cfg.policy.confirm_k = 5;
        assert!(Detector::new(cfg).is_err());
        let mut cfg = DetectorConfig::default();
        cfg.window.min_presses = 80;
        assert!(Detector::new(cfg).is_err());
    }
}
