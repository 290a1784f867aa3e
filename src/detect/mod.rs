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
    window: window::KeyWindow,
    policy: PolicyState,
    windows_scored: u64,
}

impl UserState {
    /// Events dropped as late.
    pub fn late_events(&self) -> u64 {
        self.reorder.late_events()
    }

    /// Windows scored so far.
    pub fn windows_scored(&self) -> u64 {
        self.windows_scored
    }

    /// Time of the newest event seen.
    pub fn newest_event_us(&self) -> Option<i64> {
        self.reorder.newest_us()
    }

    /// The policy state (open incident, alerts raised).
    pub fn policy(&self) -> &PolicyState {
        &self.policy
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

    /// The configuration in use.
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// Feeds one event of `user`. A gap of `idle_timeout` in event time first closes the previous
    /// window. Outputs are appended to `out`.
    pub fn on_event(&mut self, user: &str, state: &mut UserState, event: KeyEvent, out: &mut Vec<Output>) -> Admission {
        let idle_us = i64::from(self.cfg.window.idle_timeout_ms) * 1000;
        if state.reorder.newest_us().is_some_and(|newest| event.time_us.saturating_sub(newest) >= idle_us) {
            self.close_window(user, state, out);
        }
        let grace_us = i64::from(self.cfg.window.grace_ms) * 1000;
        let Self { cfg, scratch } = self;
        let UserState { reorder, window, policy, windows_scored } = state;
        reorder.push(event, grace_us, |e| {
            if window.apply(&cfg.window, e) == window::Applied::PressDue {
                score_window(cfg, scratch, user, window, policy, windows_scored, false, out);
            }
        })
    }

    /// True when `state`'s newest event is at least the idle timeout older than `now_us` (the
    /// stream passes wall-clock time mapped into the user's event time).
    pub fn is_idle(&self, state: &UserState, now_us: i64) -> bool {
        let idle_us = i64::from(self.cfg.window.idle_timeout_ms) * 1000;
        state.reorder.newest_us().is_some_and(|newest| now_us.saturating_sub(newest) >= idle_us)
    }

    /// Closes `user`'s window: releases held events, scores the partial window if it has enough
    /// unscored presses, and starts afresh. Used on idle timeout and at end of input.
    pub fn close_window(&mut self, user: &str, state: &mut UserState, out: &mut Vec<Output>) {
        let Self { cfg, scratch } = self;
        let UserState { reorder, window, policy, windows_scored } = state;
        reorder.flush(|e| {
            if window.apply(&cfg.window, e) == window::Applied::PressDue {
                score_window(cfg, scratch, user, window, policy, windows_scored, false, out);
            }
        });
        if window.unscored_presses() > 0 && window.len() >= cfg.window.min_presses {
            score_window(cfg, scratch, user, window, policy, windows_scored, true, out);
        }
        let now_us = reorder.newest_us().unwrap_or(0);
        if policy.on_idle(&cfg.policy, now_us) == Decision::IncidentClosed {
            out.push(Output::IncidentClosed { at_us: now_us });
        }
        window.reset();
    }
}

#[allow(clippy::too_many_arguments)]
fn score_window(
    cfg: &DetectorConfig,
    scratch: &mut features::Scratch,
    user: &str,
    window: &mut window::KeyWindow,
    policy: &mut PolicyState,
    windows_scored: &mut u64,
    partial: bool,
    out: &mut Vec<Output>,
) {
    let repeats = window.repeats();
    let presses = window.presses();
    let (Some(first), Some(last)) = (presses.first(), presses.last()) else { return };
    let (window_start_us, window_end_us) = (first.down_us, last.down_us);
    let features = features::extract(presses, repeats, &cfg.features, scratch);
    window.mark_scored();
    *windows_scored += 1;
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
