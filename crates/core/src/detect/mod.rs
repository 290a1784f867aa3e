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
//! - [`rules`]: features to a timing score and the rules that fired.
//! - [`sequence`]: the per-press encoding the LSTM reads, and the [`SequenceScorer`] seam.
//! - [`recurrence`]: the user's last thousands of presses, and the timing runs that recur in
//!   them (replays longer than a window).
//! - [`dependence`]: whether the user's timing depends on keys and on the presses before, as a
//!   person's does (samplers of a person's own timing do not).
//! - [`policy`]: k-of-n confirmation, incidents, cool-down.
//! - [`fleet`]: timing fingerprints, the users that share them, and the fleets they form.
//!
//! Per event: reorder -> window (press / release / repeat) -> when due: features -> rules,
//! and the window encoded into the poll's [`ScoringBatch`]. Per poll ([`Detector::finish`]): the
//! sequence model over every window of the batch at once -> combined score -> policy ->
//! [`Output`]s, in event order per user.

pub mod dependence;
pub mod features;
pub mod fleet;
pub mod histogram;
pub mod ordering;
pub mod policy;
pub mod recurrence;
pub mod rules;
pub mod sequence;
pub mod window;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::event::KeyEvent;
pub use dependence::DependenceConfig;
pub use features::{FeatureConfig, WindowFeatures};
pub use fleet::FleetConfig;
pub use ordering::Admission;
pub use policy::{Decision, EvidenceConfig, PolicyConfig, PolicyState};
pub use recurrence::{RecurrenceConfig, ReplayEvidence};
pub use rules::{Rule, RuleConfig, RuleSet};
pub use sequence::{PressPolicy, PressScorer, SequenceError, SequenceScorer};
use window::Press;
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
    /// The long-horizon memory behind the `replay` rule.
    pub recurrence: RecurrenceConfig,
    /// Fleet fingerprints and the fleet stages' decisions.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// The key-dependence test behind the `keyless_timing` rule.
    #[serde(default)]
    pub dependence: DependenceConfig,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            model_version: "timing-1".to_owned(),
            window: WindowConfig::default(),
            features: FeatureConfig::default(),
            rules: RuleConfig::default(),
            policy: PolicyConfig::default(),
            recurrence: RecurrenceConfig::default(),
            fleet: FleetConfig::default(),
            dependence: DependenceConfig::default(),
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
        self.recurrence.validate().map_err(InvalidConfig)?;
        self.fleet.validate(&self.recurrence).map_err(InvalidConfig)?;
        self.dependence.validate().map_err(InvalidConfig)?;
        let e = &p.evidence;
        if !(e.threshold > 0.0 && e.clamp > 0.0 && e.reference.is_finite() && e.threshold.is_finite()) {
            return fail("policy.evidence needs a finite reference and positive clamp and threshold");
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
    memory: recurrence::RecurrenceMemory,
    /// The agent's latest records came from a virtual input device.
    virtual_source: bool,
    /// The key-dependence test's sums and latest verdict.
    dependence: dependence::KeyDependence,
    /// The per-press model's carried state and evidence.
    press: PressState,
}

/// What the per-press model carries for one user from one press to the next: its LSTM state
/// and the CUSUM over its log-odds. Empty until the model first steps the user, and reset when
/// a model of another size takes over.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct PressState {
    h: Vec<f32>,
    c: Vec<f32>,
    evidence: f32,
}

impl PressState {
    fn fit(&mut self, hidden: usize) {
        if self.h.len() != hidden || self.c.len() != hidden {
            *self = PressState { h: vec![0.0; hidden], c: vec![0.0; hidden], evidence: 0.0 };
        }
    }
}

/// Old state formats, written back for the upgrade tests here and in the stream's store
/// (feature `test-support`, which only dev-dependencies enable).
#[cfg(any(test, feature = "test-support"))]
impl UserState {
    /// This state as formats 4 to 6 stored it, the key-dependence test without its key groups
    /// (tests of the upgrade).
    pub fn to_v6(&self) -> UserStateV6 {
        let sc = &self.scored;
        UserStateV6 {
            reorder: self.reorder.clone(),
            window: sc.window.clone(),
            policy: sc.policy.clone(),
            memory: sc.memory.clone(),
            virtual_source: sc.virtual_source,
            dependence: sc.dependence.to_v6(),
            press: sc.press.clone(),
        }
    }

    /// This state without the key-dependence test's key groups: what [`Self::to_v6`] upgrades
    /// back to.
    pub fn without_key_groups(&self) -> UserState {
        let mut state = self.clone();
        state.scored.dependence = self.scored.dependence.without_key_groups();
        state
    }
}

/// A [`UserState`] as stored in formats 4 to 6, before the key-dependence test's groups were
/// one key each: the same fields, in order; it upgrades as [`dependence::KeyDependenceV6`] says.
#[derive(Debug, Serialize, Deserialize)]
pub struct UserStateV6 {
    reorder: ordering::ReorderBuffer,
    window: window::KeyWindow,
    policy: PolicyState,
    memory: recurrence::RecurrenceMemory,
    virtual_source: bool,
    dependence: dependence::KeyDependenceV6,
    press: PressState,
}

impl From<UserStateV6> for UserState {
    fn from(v6: UserStateV6) -> Self {
        let scored = ScoredState {
            window: v6.window,
            policy: v6.policy,
            memory: v6.memory,
            virtual_source: v6.virtual_source,
            dependence: v6.dependence.into(),
            press: v6.press,
        };
        UserState { reorder: v6.reorder, scored }
    }
}

/// A [`UserState`] as stored before the per-press model existed (format 3): the same fields,
/// in order; it upgrades with the model starting from a zero state.
#[derive(Debug, Deserialize)]
pub struct UserStateV3 {
    reorder: ordering::ReorderBuffer,
    window: window::KeyWindow,
    policy: PolicyState,
    memory: recurrence::RecurrenceMemory,
    virtual_source: bool,
    dependence: dependence::KeyDependenceV6,
}

impl From<UserStateV3> for UserState {
    fn from(v3: UserStateV3) -> Self {
        let (reorder, window, policy, memory) = (v3.reorder, v3.window, v3.policy, v3.memory);
        let (virtual_source, dependence) = (v3.virtual_source, v3.dependence);
        let press = PressState::default();
        UserStateV6 { reorder, window, policy, memory, virtual_source, dependence, press }.into()
    }
}

/// A [`UserState`] as stored before the key-dependence test existed (format 2): the same
/// fields, in order; it upgrades with the test starting afresh.
#[derive(Debug, Deserialize)]
pub struct UserStateV2 {
    reorder: ordering::ReorderBuffer,
    window: window::KeyWindow,
    policy: PolicyState,
    memory: recurrence::RecurrenceMemory,
    virtual_source: bool,
}

impl From<UserStateV2> for UserState {
    fn from(v2: UserStateV2) -> Self {
        let (reorder, window, policy, memory) = (v2.reorder, v2.window, v2.policy, v2.memory);
        let (virtual_source, dependence) = (v2.virtual_source, dependence::KeyDependenceV6::default());
        let press = PressState::default();
        UserStateV6 { reorder, window, policy, memory, virtual_source, dependence, press }.into()
    }
}

/// A [`UserState`] as stored before the recurrence memory existed: the same fields, in order, so
/// a stored one still decodes; it upgrades with an empty memory.
#[derive(Debug, Deserialize)]
pub struct UserStateV1 {
    reorder: ordering::ReorderBuffer,
    window: window::KeyWindow,
    policy: PolicyState,
}

impl From<UserStateV1> for UserState {
    fn from(v1: UserStateV1) -> Self {
        let scored = ScoredState { window: v1.window, policy: v1.policy, virtual_source: false, ..Default::default() };
        UserState { reorder: v1.reorder, scored }
    }
}

impl UserState {
    /// Where the events that follow come from: a virtual input device (uinput), as the agent
    /// reports it, or not. Windows scored while it holds carry the `virtual_device` feature.
    pub fn set_virtual_source(&mut self, is_virtual: bool) {
        self.scored.virtual_source = is_virtual;
    }

    /// Events dropped as late.
    pub fn late_events(&self) -> u64 {
        self.reorder.late_events()
    }

    /// The policy state (open incident, alerts raised).
    pub fn policy(&self) -> &PolicyState {
        &self.scored.policy
    }

    /// Event time of the newest event this user sent (retention prunes users by it).
    pub fn last_event_us(&self) -> Option<i64> {
        self.reorder.newest_us()
    }

    /// Whether events are held or presses wait in the window: what an idle close would act on.
    pub fn has_open_window(&self) -> bool {
        self.reorder.pending_len() > 0 || !self.scored.window.is_empty()
    }

    /// Presses in the open window.
    pub fn window_presses(&self) -> usize {
        self.scored.window.len()
    }

    /// What an interactive query shows: sizes and event times, never keys or intervals.
    pub fn summary(&self) -> UserSummary {
        let (first, last) = self.scored.window.ends();
        let policy = &self.scored.policy;
        UserSummary {
            window_presses: self.scored.window.len(),
            window_first_us: first.map(|p| p.down_us),
            window_last_us: last.map(|p| p.down_us),
            held_events: self.reorder.pending_len(),
            late_events: self.late_events(),
            incident_opened_us: policy.incident().map(|i| i.opened_us),
            incident_last_suspicious_us: policy.incident().map(|i| i.last_suspicious_us),
            alerts_raised: policy.alerts_raised(),
        }
    }
}

/// A user's live state in numbers, for interactive queries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserSummary {
    /// Presses in the sliding window.
    pub window_presses: usize,
    /// Event time of the window's first press.
    pub window_first_us: Option<i64>,
    /// Event time of the window's last press.
    pub window_last_us: Option<i64>,
    /// Events waiting in the reordering buffer.
    pub held_events: usize,
    /// Events dropped as too late.
    pub late_events: u64,
    /// When the open incident began (event time), if one is open.
    pub incident_opened_us: Option<i64>,
    /// The open incident's latest suspicious window (event time).
    pub incident_last_suspicious_us: Option<i64>,
    /// Alerts raised for this user (one per incident).
    pub alerts_raised: u64,
}

/// A scored window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowReport {
    /// Down time of the window's first press.
    pub window_start_us: i64,
    /// Down time of the window's last press: the window's event time.
    pub window_end_us: i64,
    /// Combined score the policy acted on, 0..1: the larger of the timing and LSTM scores.
    pub score: f64,
    /// The timing rules' score, 0..1.
    pub timing_score: f64,
    /// The robust interval-histogram score, 0..1.
    pub histogram_score: f64,
    /// The sequence model's score, 0..1 (0.5 = its operating threshold); `None` without a model.
    pub lstm_score: Option<f64>,
    /// The feature vector.
    pub features: WindowFeatures,
    /// The window's rhythm intervals in bins of `features.bin_ms`, drawn for staff on alerts.
    pub interval_histogram: histogram::IntervalHistogram,
    /// Reasons that fired: timing rules, and [`Rule::Lstm`].
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
    /// Reasons that fired over the confirming windows ([`RuleSet::scorers`] names the scorers).
    pub reasons: RuleSet,
    /// The scoring logic's version: the timing rules' and, with a model, the model's.
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
    /// A run of the user's timing is a fleet fingerprint (for the fleet stages).
    Fingerprint {
        /// The fingerprint.
        fingerprint: u64,
        /// Event time of the press that ended the run.
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

/// A user as [`Detector::finish`] needs one: the id alerts carry and the state the policy runs
/// on. Callers keep the users a batch touched in a slice and refer to them by index ("slot").
pub trait UserSlot {
    /// The user id.
    fn user_id(&self) -> &str;
    /// The user's state.
    fn state(&mut self) -> &mut UserState;
}

impl UserSlot for (String, UserState) {
    fn user_id(&self) -> &str {
        &self.0
    }
    fn state(&mut self) -> &mut UserState {
        &mut self.1
    }
}

/// Work between [`Detector::on_event`] and [`Detector::finish`]: windows the timing rules have
/// scored, their encoded steps for the sequence model, and idle closes, in event order. One per
/// poll: the sequence model then runs once over every window of the poll, across users.
#[derive(Debug, Default)]
pub struct ScoringBatch {
    /// Steps per window the sequence model reads; `None`: timing rules only.
    steps: Option<usize>,
    pending: Vec<Pending>,
    inputs: Vec<f32>,
    /// Windows in `pending` (and encoded in `inputs` when `steps` is set); callers check it per
    /// event, so it is counted rather than recomputed.
    windows: usize,
    scores: Vec<f32>,
    /// Whether presses are queued for a per-press model.
    presses: bool,
    /// One step per `PendingAction::Press`, in order, for the per-press model.
    press_inputs: Vec<f32>,
    /// The per-press model's log-odds for them, once it ran.
    press_logits: Vec<f32>,
}

#[derive(Debug)]
struct Pending {
    slot: usize,
    action: PendingAction,
}

// Windows are the common case and the queue is reused across polls: boxing them would add an
// allocation per window to save space only on the rare idle markers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum PendingAction {
    Window(WindowReport),
    Idle {
        at_us: i64,
    },
    Fingerprint {
        fingerprint: u64,
        at_us: i64,
    },
    /// A press was followed: its step waits in `press_inputs`. Times are the newest press's and
    /// the window's first, for an alert the per-press evidence raises here.
    Press {
        at_us: i64,
        window_start_us: i64,
    },
    /// The window at the press where the replay evidence became conclusive: timing only, for
    /// the policy at once (`Scoring::queue_replay`).
    Replay(WindowReport),
}

impl ScoringBatch {
    /// A batch for a sequence model reading `steps` steps per window, or for the timing rules
    /// alone (`None`).
    pub fn new(steps: Option<usize>) -> Self {
        Self { steps, ..Self::default() }
    }

    /// A batch for `model` (`None`: the timing rules alone): its windows encoded for it, and
    /// presses queued only when a per-press model runs beside it.
    pub fn for_model(model: Option<&dyn SequenceScorer>) -> Self {
        let presses = model.is_some_and(|m| m.reads_presses());
        Self { steps: model.map(|m| m.steps()), presses, ..Self::default() }
    }

    /// Windows waiting for [`Detector::finish`].
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The encoded windows waiting, back to back (what the sequence model will read).
    pub fn encoded(&self) -> &[f32] {
        &self.inputs
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.inputs.clear();
        self.windows = 0;
        self.press_inputs.clear();
        self.press_logits.clear();
    }
}

/// Runs users' events through the core. One per thread or task; cheap to create or clone.
#[derive(Debug, Clone)]
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

    /// Feeds one event of the user in `slot`. A gap of `idle_timeout` in event time first closes
    /// the previous window. Windows that come due wait in `batch` for [`Detector::finish`].
    pub fn on_event(
        &mut self,
        slot: usize,
        state: &mut UserState,
        event: KeyEvent,
        batch: &mut ScoringBatch,
    ) -> Admission {
        let idle_us = i64::from(self.cfg.window.idle_timeout_ms) * 1000;
        if state.reorder.newest_us().is_some_and(|newest| event.time_us.saturating_sub(newest) >= idle_us) {
            self.close_window(slot, state, batch);
        }
        let grace_us = i64::from(self.cfg.window.grace_ms) * 1000;
        let mut scoring = Scoring { cfg: &self.cfg, scratch: &mut self.scratch, slot, batch };
        state.reorder.push(event, grace_us, |e| scoring.apply(&mut state.scored, e))
    }

    /// True when `state`'s newest event is at least the idle timeout older than `now_us` (the
    /// stream passes wall-clock time mapped into the user's event time).
    pub fn is_idle(&self, state: &UserState, now_us: i64) -> bool {
        let idle_us = i64::from(self.cfg.window.idle_timeout_ms) * 1000;
        state.reorder.newest_us().is_some_and(|newest| now_us.saturating_sub(newest) >= idle_us)
    }

    /// Closes the window of the user in `slot`: releases held events, scores the partial window
    /// if it has enough unscored presses, and starts afresh. Used on idle timeout and at end of
    /// input.
    pub fn close_window(&mut self, slot: usize, state: &mut UserState, batch: &mut ScoringBatch) {
        let mut scoring = Scoring { cfg: &self.cfg, scratch: &mut self.scratch, slot, batch };
        state.reorder.flush(|e| scoring.apply(&mut state.scored, e));
        let scored = &mut state.scored;
        let unsettled: Vec<Press> = scored.window.unsettled().copied().collect();
        for press in &unsettled {
            scoring.remember(scored, press);
        }
        if scored.window.unscored_presses() > 0 && scored.window.len() >= self.cfg.window.min_presses {
            scoring.score(scored, true);
        }
        scored.memory.break_run();
        scored.dependence.break_chain();
        let at_us = state.reorder.newest_us().unwrap_or(0);
        scoring.batch.pending.push(Pending { slot, action: PendingAction::Idle { at_us } });
        scored.window.reset();
    }

    /// Scores the batch's windows with `model` (one call for all of them), combines the scores,
    /// runs each user's alert policy in event order and appends `(slot, output)` pairs to `out`.
    /// The batch is empty afterwards. If the model fails, every window is still decided, on the
    /// timing rules alone, and the error is returned for the caller to report.
    pub fn finish<U: UserSlot>(
        &mut self,
        batch: &mut ScoringBatch,
        users: &mut [U],
        model: Option<&mut dyn SequenceScorer>,
        out: &mut Vec<(usize, Output)>,
    ) -> Result<(), SequenceError> {
        let mut model = model;
        let mut result = Ok(());
        let mut lstm_version = None;
        batch.scores.clear();
        if let Some(model) = model.as_mut() {
            if batch.windows > 0 {
                result = match batch.steps {
                    Some(steps) if steps == model.steps() => {
                        model.score(&batch.inputs, batch.windows, &mut batch.scores)
                    }
                    _ => Err(SequenceError("the batch was encoded for another step count".to_owned())),
                };
                if result.is_ok() && batch.scores.len() != batch.windows {
                    result = Err(SequenceError("the model returned the wrong number of scores".to_owned()));
                }
                if result.is_err() {
                    batch.scores.clear();
                }
            }
            if result.is_ok() {
                lstm_version = Some(model.version().to_owned());
            }
        }
        let mut press_policy = None;
        if let Some(press) = model.as_mut().and_then(|m| m.press_scorer()) {
            match run_press_model(batch, users, press) {
                Ok(()) => {
                    press_policy = Some(press.policy());
                    if let Some(v) = &mut lstm_version {
                        *v = format!("{v}+{}", press.version());
                    }
                }
                Err(e) => {
                    batch.press_logits.clear();
                    result = result.and(Err(e));
                }
            }
        }
        let model_version = match &lstm_version {
            Some(v) => format!("{}+{v}", self.cfg.model_version),
            None => self.cfg.model_version.clone(),
        };
        let policy_cfg = &self.cfg.policy;
        let mut next_score = batch.scores.iter().map(|s| f64::from(*s).clamp(0.0, 1.0));
        let mut next_logit = batch.press_logits.iter().copied();
        for Pending { slot, action } in batch.pending.drain(..) {
            let Some(user) = users.get_mut(slot) else {
                if matches!(action, PendingAction::Press { .. }) {
                    next_logit.next();
                }
                continue;
            };
            match action {
                PendingAction::Press { at_us, window_start_us } => {
                    let (Some(policy), Some(logit)) = (press_policy, next_logit.next()) else { continue };
                    let state = &mut user.state().scored;
                    state.press.evidence = policy.step(state.press.evidence, logit);
                    if state.press.evidence < policy.threshold {
                        continue;
                    }
                    let Some(decision) = state.policy.on_press_evidence(policy_cfg, at_us, press_reasons()) else {
                        // Held for a window's word; capped, so it drains soon once the model stops.
                        state.press.evidence = state.press.evidence.min(2.0 * policy.threshold);
                        continue;
                    };
                    // The evidence starts again: a later incident needs evidence of its own.
                    state.press.evidence = 0.0;
                    if let Decision::Alert(reasons) = decision {
                        let report = press_report(window_start_us, at_us, logit);
                        let id = alert_id(user.user_id(), window_start_us, at_us, &model_version);
                        let model_version = model_version.clone();
                        out.push((
                            slot,
                            Output::Alert(AlertReport { alert_id: id, window: report, reasons, model_version }),
                        ));
                    }
                }
                PendingAction::Fingerprint { fingerprint, at_us } => {
                    out.push((slot, Output::Fingerprint { fingerprint, at_us }));
                }
                PendingAction::Replay(mut report) => {
                    report.suspicious = true;
                    let end_us = report.window_end_us;
                    let policy = &mut user.state().scored.policy;
                    if let Decision::Alert(reasons) = policy.on_conclusive(end_us, report.fired) {
                        let id = alert_id(user.user_id(), report.window_start_us, end_us, &model_version);
                        let model_version = model_version.clone();
                        out.push((
                            slot,
                            Output::Alert(AlertReport { alert_id: id, window: report, reasons, model_version }),
                        ));
                    }
                }
                PendingAction::Idle { at_us } => {
                    if user.state().scored.policy.on_idle(policy_cfg, at_us) == Decision::IncidentClosed {
                        out.push((slot, Output::IncidentClosed { at_us }));
                    }
                }
                PendingAction::Window(mut report) => {
                    report.lstm_score = next_score.next();
                    if let Some(lstm) = report.lstm_score {
                        report.score = report.score.max(lstm);
                        if lstm >= 0.5 {
                            report.fired.insert(Rule::Lstm);
                        }
                    }
                    report.suspicious = report.score >= policy_cfg.threshold;
                    let end_us = report.window_end_us;
                    let state = &mut user.state().scored;
                    let mut decision =
                        state.policy.on_window(policy_cfg, end_us, report.score, report.fired, report.lstm_score);
                    // Per-press evidence held for a window's word asks again, this window now counted.
                    let held = press_policy.is_some_and(|p| state.press.evidence >= p.threshold);
                    if decision == Decision::Quiet && held {
                        if let Some(d) = state.policy.on_press_evidence(policy_cfg, end_us, press_reasons()) {
                            state.press.evidence = 0.0;
                            decision = d;
                        }
                    }
                    match decision {
                        Decision::Quiet => out.push((slot, Output::Window(report))),
                        Decision::IncidentClosed => {
                            out.push((slot, Output::Window(report)));
                            out.push((slot, Output::IncidentClosed { at_us: end_us }));
                        }
                        Decision::Alert(reasons) => {
                            let id = alert_id(user.user_id(), report.window_start_us, end_us, &model_version);
                            out.push((slot, Output::Window(report.clone())));
                            out.push((
                                slot,
                                Output::Alert(AlertReport {
                                    alert_id: id,
                                    window: report,
                                    reasons,
                                    model_version: model_version.clone(),
                                }),
                            ));
                        }
                    }
                }
            }
        }
        batch.clear();
        result
    }

    /// Key-dependence sums the agent computed over the real keys its short-lived labels hide,
    /// for `state`'s user (`dependence::KeyDependence::report`); false, and nothing kept, for
    /// sums no real typing gives.
    pub fn report_key_sums(&self, state: &mut UserState, sums: &dependence::KeySums) -> bool {
        state.scored.dependence.report(&self.cfg.dependence, sums)
    }

    /// Runs all of one user's `events` from a fresh state and closes the window at the end, as
    /// the offline scorer does at end of input. For evaluation and tests over whole recordings.
    pub fn score_recording(
        &mut self,
        user: &str,
        events: &[KeyEvent],
        model: Option<&mut dyn SequenceScorer>,
    ) -> Result<Vec<Output>, SequenceError> {
        self.score_recording_reported(user, events, &[], model)
    }

    /// [`Self::score_recording`], with key-dependence sums an agent reported: `(i, sums)`
    /// arrives before `events[i]` (measurements of what an agent with short-lived key labels
    /// sends).
    pub fn score_recording_reported(
        &mut self,
        user: &str,
        events: &[KeyEvent],
        reports: &[(usize, dependence::KeySums)],
        model: Option<&mut dyn SequenceScorer>,
    ) -> Result<Vec<Output>, SequenceError> {
        let mut users = [(user.to_owned(), UserState::default())];
        let mut batch = ScoringBatch::for_model(model.as_deref());
        let mut reports = reports.iter().peekable();
        for (i, e) in events.iter().enumerate() {
            while let Some((_, sums)) = reports.next_if(|(at, _)| *at <= i) {
                self.report_key_sums(&mut users[0].1, sums);
            }
            self.on_event(0, &mut users[0].1, *e, &mut batch);
        }
        self.close_window(0, &mut users[0].1, &mut batch);
        let mut out = Vec::new();
        self.finish(&mut batch, &mut users, model, &mut out)?;
        Ok(out.into_iter().map(|(_, o)| o).collect())
    }
}

/// Steps every user of the batch through the per-press model, in rounds: round `k` holds the
/// `k`-th queued press of every user, so each user's presses run in order from their carried
/// state and no call holds two presses of one user. Fills `batch.press_logits`, one per
/// queued press (NaN for a user no longer in `users`).
fn run_press_model<U: UserSlot>(
    batch: &mut ScoringBatch,
    users: &mut [U],
    model: &mut dyn PressScorer,
) -> Result<(), SequenceError> {
    let hidden = model.hidden();
    let slots: Vec<usize> =
        batch.pending.iter().filter(|p| matches!(p.action, PendingAction::Press { .. })).map(|p| p.slot).collect();
    batch.press_logits.clear();
    batch.press_logits.resize(slots.len(), f32::NAN);
    if batch.press_inputs.len() != slots.len() * sequence::STEP_WIDTH {
        return Err(SequenceError("press steps and queued presses disagree".to_owned()));
    }
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut presses_of: HashMap<usize, usize> = HashMap::new();
    for (i, slot) in slots.iter().enumerate().filter(|(_, s)| **s < users.len()) {
        let k = presses_of.entry(*slot).or_default();
        if rounds.len() <= *k {
            rounds.push(Vec::new());
        }
        rounds[*k].push(i);
        *k += 1;
    }
    let (mut steps, mut h, mut c, mut logits) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in &rounds {
        steps.clear();
        h.clear();
        c.clear();
        logits.clear();
        for &i in round {
            steps.extend_from_slice(&batch.press_inputs[i * sequence::STEP_WIDTH..(i + 1) * sequence::STEP_WIDTH]);
            let press = &mut users[slots[i]].state().scored.press;
            press.fit(hidden);
            h.extend_from_slice(&press.h);
            c.extend_from_slice(&press.c);
        }
        model.advance(&steps, &mut h, &mut c, &mut logits)?;
        if logits.len() != round.len() || h.len() != round.len() * hidden || c.len() != round.len() * hidden {
            return Err(SequenceError("the per-press model returned the wrong number of values".to_owned()));
        }
        for (k, &i) in round.iter().enumerate() {
            let press = &mut users[slots[i]].state().scored.press;
            press.h.copy_from_slice(&h[k * hidden..(k + 1) * hidden]);
            press.c.copy_from_slice(&c[k * hidden..(k + 1) * hidden]);
            batch.press_logits[i] = logits[k];
        }
    }
    Ok(())
}

/// The window an alert from the per-press evidence names: the window's presses up to the one
/// that tipped it. Its features are not computed (the window was not scored at that press), so
/// they are zeros and its histogram empty; `press_lstm` is its reason and the press's
/// probability its score.
fn press_report(window_start_us: i64, at_us: i64, logit: f32) -> WindowReport {
    let p = 1.0 / (1.0 + (-f64::from(logit)).exp());
    let fired = press_reasons();
    WindowReport {
        window_start_us,
        window_end_us: at_us,
        score: p,
        timing_score: 0.0,
        histogram_score: 0.0,
        lstm_score: Some(p),
        features: WindowFeatures::default(),
        interval_histogram: histogram::IntervalHistogram::default(),
        fired,
        suspicious: true,
        partial: false,
    }
}

/// The reasons of an alert the per-press model's evidence raises.
fn press_reasons() -> RuleSet {
    let mut fired = RuleSet::EMPTY;
    fired.insert(Rule::PressLstm);
    fired
}

/// What scoring borrows from the detector and the caller, for one user.
struct Scoring<'a> {
    cfg: &'a DetectorConfig,
    scratch: &'a mut features::Scratch,
    slot: usize,
    batch: &'a mut ScoringBatch,
}

impl Scoring<'_> {
    /// One released (time-ordered) event into the window; scores the window when it is due.
    fn apply(&mut self, state: &mut ScoredState, event: KeyEvent) {
        let applied = state.window.apply(&self.cfg.window, event);
        if matches!(applied, window::Applied::Press | window::Applied::PressDue) {
            if let Some(settled) = state.window.newly_settled().copied() {
                self.remember(state, &settled);
            }
            self.queue_followed_press(state);
        }
        if applied == window::Applied::PressDue {
            self.score(state, false);
        }
    }

    /// Queues the step of the press the newest one followed, for the per-press model (when one
    /// will run).
    fn queue_followed_press(&mut self, state: &mut ScoredState) {
        if !self.batch.presses {
            return;
        }
        let presses = state.window.presses();
        if !sequence::encode_followed(presses, &mut self.batch.press_inputs) {
            return;
        }
        let (Some(first), Some(last)) = (presses.first(), presses.last()) else { return };
        let action = PendingAction::Press { at_us: last.down_us, window_start_us: first.down_us };
        self.batch.pending.push(Pending { slot: self.slot, action });
    }

    /// Feeds a settled press to the recurrence memory, and queues the fingerprint of the run it
    /// ends if that run is one, and the window at once if the replay evidence just became
    /// conclusive.
    fn remember(&mut self, state: &mut ScoredState, press: &Press) {
        let before = state.memory.evidence(&self.cfg.recurrence).recurrences;
        state.memory.push(&self.cfg.recurrence, press);
        let after = state.memory.evidence(&self.cfg.recurrence).recurrences;
        let needed = self.cfg.rules.replay_recurrences.max(1);
        if before < needed && after >= needed {
            self.queue_replay(state);
        }
        if self.cfg.dependence.enabled {
            state.dependence.push(&self.cfg.dependence, press);
        }
        let fingerprint = fleet::fingerprint(&state.memory, &self.cfg.recurrence, &self.cfg.fleet);
        if let Some(fingerprint) = fingerprint {
            let action = PendingAction::Fingerprint { fingerprint, at_us: press.down_us };
            self.batch.pending.push(Pending { slot: self.slot, action });
        }
    }

    /// The memory's recurrences just reached the replay rule's count, at the newest press: the
    /// window up to it goes to the policy now, not at the next hop, and needs no confirming
    /// window (each recurrence is a verified run, and the count is already their accumulation).
    /// Its timing is scored as any window's; the window model does not score it.
    fn queue_replay(&mut self, state: &mut ScoredState) {
        let Some(report) = Self::timing_report(self.cfg, self.scratch, state, false) else { return };
        if report.fired.contains(Rule::Replay) {
            self.batch.pending.push(Pending { slot: self.slot, action: PendingAction::Replay(report) });
        }
    }

    /// Scores the window's timing now and queues it for the sequence model and the policy.
    fn score(&mut self, state: &mut ScoredState, partial: bool) {
        let Some(report) = Self::timing_report(self.cfg, self.scratch, state, partial) else { return };
        if let Some(steps) = self.batch.steps {
            sequence::encode_window(state.window.presses(), steps, &mut self.batch.inputs);
        }
        self.batch.windows += 1;
        state.window.mark_scored();
        self.batch.pending.push(Pending { slot: self.slot, action: PendingAction::Window(report) });
    }

    /// The window's features and timing verdict, from its presses and the user's memories.
    fn timing_report(
        cfg: &DetectorConfig,
        scratch: &mut features::Scratch,
        state: &mut ScoredState,
        partial: bool,
    ) -> Option<WindowReport> {
        let presses = state.window.presses();
        let (first, last) = (presses.first()?, presses.last()?);
        let (window_start_us, window_end_us) = (first.down_us, last.down_us);
        let mut features = features::extract(presses, &cfg.features, scratch);
        let replay = state.memory.evidence(&cfg.recurrence);
        features.replay_recurrences = f64::from(replay.recurrences);
        features.replay_period = f64::from(replay.period);
        features.replay_error_ms = replay.error_ms;
        features.virtual_device = f64::from(u8::from(state.virtual_source));
        if let Some(verdict) = state.dependence.verdict() {
            features.key_dependence_chi2 = f64::from(verdict.chi2());
            features.key_dependence_presses = f64::from(verdict.presses);
        }
        let interval_histogram = features::interval_histogram(scratch, cfg.features.bin_ms);
        let timing = rules::evaluate(&features, &cfg.rules);
        Some(WindowReport {
            window_start_us,
            window_end_us,
            score: timing.score,
            timing_score: timing.score,
            histogram_score: features.histogram_score,
            lstm_score: None,
            features,
            interval_histogram,
            fired: timing.fired,
            suspicious: false,
            partial,
        })
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
            loop_presses: 0,
        };
        macrogen::generate(&spec, &[], start_us, presses, &mut ChaCha8Rng::seed_from_u64(1))
    }

    /// Feeds `events` as one batch of user "u1" and finishes it without a model.
    fn run(detector: &mut Detector, state: &mut UserState, events: &[KeyEvent]) -> Vec<Output> {
        let mut users = [("u1".to_owned(), std::mem::take(state))];
        let mut batch = ScoringBatch::new(None);
        for e in events {
            detector.on_event(0, &mut users[0].1, *e, &mut batch);
        }
        let mut out = Vec::new();
        detector.finish(&mut batch, &mut users, None, &mut out).unwrap();
        *state = std::mem::take(&mut users[0].1);
        out.into_iter().map(|(_, o)| o).collect()
    }

    /// A sequence model that gives every window the same score and counts its calls.
    struct FixedModel {
        score: f32,
        steps: usize,
        calls: usize,
    }

    impl SequenceScorer for FixedModel {
        fn version(&self) -> &str {
            "fixed-1"
        }
        fn steps(&self) -> usize {
            self.steps
        }
        fn score(&mut self, inputs: &[f32], windows: usize, out: &mut Vec<f32>) -> Result<(), SequenceError> {
            self.calls += 1;
            assert_eq!(inputs.len(), windows * self.steps * sequence::STEP_WIDTH);
            if self.score < 0.0 {
                return Err(SequenceError("broken".to_owned()));
            }
            out.extend(std::iter::repeat_n(self.score, windows));
            Ok(())
        }
    }

    /// A window model (every window 0.001: never suspicious, no evidence) with a per-press twin beside it. The
    /// twin carries a press count in `h[0]` and sums flights in `c[0]`, and gives log-odds
    /// `10` once a user's count reaches `from_press`, else `-10`, so its evidence depends on the
    /// state carried from call to call.
    struct PressTwin {
        window: FixedModel,
        from_press: f32,
        calls: usize,
    }

    impl SequenceScorer for PressTwin {
        fn version(&self) -> &str {
            self.window.version()
        }
        fn steps(&self) -> usize {
            self.window.steps()
        }
        fn score(&mut self, inputs: &[f32], windows: usize, out: &mut Vec<f32>) -> Result<(), SequenceError> {
            self.window.score(inputs, windows, out)
        }
        fn reads_presses(&self) -> bool {
            true
        }
        fn press_scorer(&mut self) -> Option<&mut dyn PressScorer> {
            Some(self)
        }
    }

    impl PressScorer for PressTwin {
        fn version(&self) -> &str {
            "press-twin-1"
        }
        fn hidden(&self) -> usize {
            2
        }
        fn policy(&self) -> PressPolicy {
            PressPolicy { reference: 3.0, clamp: 2.0, threshold: 7.0 }
        }
        fn advance(
            &mut self,
            steps: &[f32],
            h: &mut [f32],
            c: &mut [f32],
            out: &mut Vec<f32>,
        ) -> Result<(), SequenceError> {
            self.calls += 1;
            for (i, step) in steps.chunks_exact(sequence::STEP_WIDTH).enumerate() {
                h[2 * i] += 1.0;
                c[2 * i] += step[1];
                out.push(if h[2 * i] >= self.from_press { 10.0 } else { -10.0 });
            }
            Ok(())
        }
    }

    fn press_twin(from_press: f32) -> PressTwin {
        PressTwin { window: FixedModel { score: 0.001, steps: 50, calls: 0 }, from_press, calls: 0 }
    }

    /// `events` through the detector with `model`, `finish`ing after every `per_batch` events
    /// (as polls would), from and into `state`.
    fn run_batched(
        d: &mut Detector,
        state: &mut UserState,
        events: &[KeyEvent],
        model: &mut dyn SequenceScorer,
        per_batch: usize,
    ) -> Vec<Output> {
        let mut users = [("u1".to_owned(), std::mem::take(state))];
        let mut out = Vec::new();
        for chunk in events.chunks(per_batch) {
            let mut batch = ScoringBatch::for_model(Some(&*model));
            for e in chunk {
                d.on_event(0, &mut users[0].1, *e, &mut batch);
            }
            d.finish(&mut batch, &mut users, Some(&mut *model), &mut out).unwrap();
        }
        *state = std::mem::take(&mut users[0].1);
        out.into_iter().map(|(_, o)| o).collect()
    }

    /// A detector whose per-press evidence is conclusive alone (`press_needs_window = false`).
    fn press_alone() -> Detector {
        let mut cfg = DetectorConfig::default();
        cfg.policy.press_needs_window = false;
        Detector::new(cfg).unwrap()
    }

    #[test]
    fn per_press_evidence_alone_does_not_alert_by_default() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut state = UserState::default();
        let out = run_batched(&mut d, &mut state, &human_like(300), &mut press_twin(40.0), 300);
        assert!(alerts(&out).is_empty(), "no window was suspicious, so the evidence never alerts");
        // It is held, capped at twice the threshold, so it drains soon once the model stops.
        assert_eq!(state.scored.press.evidence, 14.0);
    }

    #[test]
    fn per_press_evidence_with_a_suspicious_window_alerts_before_k_of_n_would() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut state = UserState::default();
        // Every window suspicious to the window model: k-of-n alone opens at the second window
        // (press 40); the press evidence, over its threshold from press 25, needs only the first.
        let mut model = press_twin(20.0);
        model.window.score = 0.9;
        let events = human_like(120);
        let out = run_batched(&mut d, &mut state, &events, &mut model, events.len());
        let a = alerts(&out);
        assert_eq!(a.len(), 1, "one incident");
        assert_eq!(a[0].reasons.names(), ["lstm", "press_lstm"], "the press evidence and the window it waited for");
        let downs: Vec<i64> = events.iter().filter(|e| e.action == KeyAction::Down).map(|e| e.time_us).collect();
        let first_window = out.iter().find_map(|o| match o {
            Output::Window(w) => Some(w.window_end_us),
            _ => None,
        });
        assert_eq!(first_window, Some(downs[29]));
        assert_eq!(a[0].window.window_end_us, downs[29], "at the first window, not k-of-n's second");
    }

    #[test]
    fn per_press_evidence_alerts_at_the_press_that_tips_it_without_a_confirming_window() {
        let mut d = press_alone();
        let mut state = UserState::default();
        let mut model = press_twin(40.0);
        let events = human_like(120);
        let out = run_batched(&mut d, &mut state, &events, &mut model, events.len());
        let a = alerts(&out);
        assert_eq!(a.len(), 1, "one incident");
        assert_eq!(a[0].reasons.names(), ["press_lstm"]);
        assert_eq!(a[0].reasons.scorers(), ["lstm"]);
        assert_eq!(a[0].model_version, "timing-1+fixed-1+press-twin-1");
        // Presses are stepped from the fourth on (the third is the first followed press), so
        // the 40th stepped press is the 42nd; it and the three after it add 2 each (clamp):
        // 8 >= 7 at the 4th, the press 45 came down at.
        let downs: Vec<i64> = events.iter().filter(|e| e.action == KeyAction::Down).map(|e| e.time_us).collect();
        assert_eq!(a[0].window.window_end_us, downs[45]);
        assert!(state.policy().incident().is_some());
        // Every window stayed under the threshold: no window raised it.
        assert!(out.iter().all(|o| !matches!(o, Output::Window(w) if w.suspicious)));
    }

    #[test]
    fn per_press_state_carries_across_polls_and_alerts_do_not_depend_on_them() {
        let events = human_like(300);
        let mut d = press_alone();
        let (mut whole, mut polled) = (UserState::default(), UserState::default());
        let (mut m1, mut m2) = (press_twin(150.0), press_twin(150.0));
        let a = run_batched(&mut d, &mut whole, &events, &mut m1, events.len());
        let b = run_batched(&mut d, &mut polled, &events, &mut m2, 7);
        assert_eq!(alerts(&a), alerts(&b));
        assert_eq!(alerts(&a).len(), 1);
        assert_eq!(whole.scored.press, polled.scored.press, "the same carried state");
        // Presses 4-299 were stepped: the newest is still held for reordering (no close here).
        assert_eq!(m1.calls, 296, "one call per press of the one user, however they were polled");
        assert_eq!(whole.scored.press.h[0], 296.0, "the twin counted every stepped press in h");
    }

    #[test]
    fn without_a_per_press_model_no_press_is_queued() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut users = [("u1".to_owned(), UserState::default())];
        let model = FixedModel { score: 0.001, steps: 50, calls: 0 };
        let mut batch = ScoringBatch::for_model(Some(&model));
        for e in human_like(120) {
            d.on_event(0, &mut users[0].1, e, &mut batch);
        }
        assert!(batch.windows() > 0);
        assert!(batch.press_inputs.is_empty());
        assert!(!batch.pending.iter().any(|p| matches!(p.action, PendingAction::Press { .. })));
        // With one beside it, every followed press is (a fresh user: the same events again).
        let mut users = [("u2".to_owned(), UserState::default())];
        let mut batch = ScoringBatch::for_model(Some(&press_twin(1.0)));
        for e in human_like(120) {
            d.on_event(0, &mut users[0].1, e, &mut batch);
        }
        assert!(batch.pending.iter().any(|p| matches!(p.action, PendingAction::Press { .. })));
    }

    #[test]
    fn a_state_stored_before_the_press_model_existed_still_decodes() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut state = UserState::default();
        run_batched(&mut d, &mut state, &human_like(120), &mut press_twin(1000.0), 1000);
        let sc = &state.scored;
        let v3 = postcard::to_stdvec(&(
            &state.reorder,
            &sc.window,
            &sc.policy,
            &sc.memory,
            sc.virtual_source,
            dependence::KeyDependenceV6::default(),
        ))
        .unwrap();
        let upgraded = UserState::from(postcard::from_bytes::<UserStateV3>(&v3).unwrap());
        assert_eq!(upgraded.scored.window, sc.window);
        assert_eq!(upgraded.scored.dependence, dependence::KeyDependence::default());
        assert_eq!(upgraded.scored.press, PressState::default());
        assert_ne!(sc.press, PressState::default());
    }

    fn human_like(presses: usize) -> Vec<KeyEvent> {
        // Irregular intervals and holds over many keys, a space every fourth press (people
        // come back to keys within a few presses): no timing rule fires.
        let mut t = 0;
        let mut events = Vec::new();
        for i in 0..presses as i64 {
            let key = if i % 4 == 3 { 57 } else { 16 + ((i * 7) % 26) as u32 };
            let hold = 60_000 + (i * 7_919) % 50_000;
            events.push(KeyEvent::new(t, key, KeyAction::Down));
            events.push(KeyEvent::new(t + hold, key, KeyAction::Up));
            t += 120_000 + (i * i * 104_729) % 230_000;
        }
        events.sort_by_key(|e| e.time_us);
        events
    }

    #[test]
    fn one_model_call_scores_every_window_of_a_batch_across_users() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut users = vec![("a".to_owned(), UserState::default()), ("b".to_owned(), UserState::default())];
        let mut batch = ScoringBatch::new(Some(50));
        let (a, b) = (human_like(120), human_like(90));
        for (slot, events) in [(0, &a), (1, &b)] {
            for e in events {
                d.on_event(slot, &mut users[slot].1, *e, &mut batch);
            }
            // Releases the events still inside the reordering grace.
            d.close_window(slot, &mut users[slot].1, &mut batch);
        }
        let windows = batch.windows();
        assert_eq!(windows, 10 + 7);
        assert_eq!(batch.encoded().len(), windows * 50 * sequence::STEP_WIDTH);
        let mut model = FixedModel { score: 0.9, steps: 50, calls: 0 };
        let mut out = Vec::new();
        d.finish(&mut batch, &mut users, Some(&mut model), &mut out).unwrap();
        assert_eq!(model.calls, 1);
        assert!(batch.is_empty());
        let alerts: Vec<(usize, &AlertReport)> =
            out.iter().filter_map(|(s, o)| if let Output::Alert(a) = o { Some((*s, a)) } else { None }).collect();
        assert_eq!(alerts.len(), 2, "each user confirmed by the model alone");
        for (slot, alert) in alerts {
            assert_eq!(alert.reasons.names(), ["lstm"]);
            assert_eq!(alert.reasons.scorers(), ["lstm"]);
            assert_eq!(alert.model_version, "timing-1+fixed-1");
            assert_eq!(alert.window.lstm_score, Some(0.9f32 as f64));
            assert!(alert.window.timing_score < 0.5);
            assert_eq!(alert.window.score, alert.window.lstm_score.unwrap());
            assert_eq!(
                alert.alert_id,
                alert_id(&users[slot].0, alert.window.window_start_us, alert.window.window_end_us, "timing-1+fixed-1")
            );
        }
    }

    #[test]
    fn a_low_model_score_never_lowers_the_timing_score() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        // Low enough that the sequential test, too, hears nothing (log-odds under its reference).
        let mut model = FixedModel { score: 0.001, steps: 50, calls: 0 };
        let out = d.score_recording("u", &fixed_macro(100, 0), Some(&mut model)).unwrap();
        let a = alerts(&out);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].window.score, 1.0);
        assert_eq!(a[0].reasons.scorers(), ["histogram"]);
        let human = d.score_recording("u", &human_like(200), Some(&mut model)).unwrap();
        assert!(alerts(&human).is_empty());
    }

    #[test]
    fn a_failing_model_still_decides_every_window_on_timing() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let events = fixed_macro(100, 0);
        let plain = d.score_recording("u", &events, None).unwrap();
        let mut broken = FixedModel { score: -1.0, steps: 50, calls: 0 };
        let mut users = [("u".to_owned(), UserState::default())];
        let mut batch = ScoringBatch::new(Some(50));
        for e in &events {
            d.on_event(0, &mut users[0].1, *e, &mut batch);
        }
        d.close_window(0, &mut users[0].1, &mut batch);
        let mut out = Vec::new();
        assert!(d.finish(&mut batch, &mut users, Some(&mut broken), &mut out).is_err());
        let outputs: Vec<Output> = out.into_iter().map(|(_, o)| o).collect();
        assert_eq!(outputs, plain, "same decisions, same ids as without a model");
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
            loop_presses: 0,
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
        let out = run(&mut d, &mut state, &fixed_macro(35, 0));
        let scored = |o: &[Output]| o.iter().filter(|o| matches!(o, Output::Window(_))).count();
        assert_eq!(scored(&out), 1);
        // The next event comes after the idle timeout: the partial window is scored first.
        let later = i64::from(cfg.window.idle_timeout_ms) * 1000 + 10_000_000;
        let out = run(&mut d, &mut state, &[KeyEvent::new(later, 9, KeyAction::Down)]);
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
        run(&mut d, &mut state, &[KeyEvent::new(1_000_000, 1, KeyAction::Down)]);
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
                let events: Vec<KeyEvent> = events.into_iter().map(|(t, key, a)| KeyEvent::new(t, key, action(a))).collect();
                let mut model = FixedModel { score: 0.7, steps: 50, calls: 0 };
                let out = d.score_recording("u", &events, Some(&mut model)).unwrap();
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
        let mut cfg = DetectorConfig::default();
        cfg.policy.evidence.threshold = -1.0;
        assert!(Detector::new(cfg).is_err(), "a negative threshold would make the evidence's cap panic");
    }

    /// A human-like recording: letter keys, flights 80-400 ms, holds 60-140 ms.
    /// Irregular typing whose holds and flights depend on the key, as a person's do.
    fn recording(presses: usize, seed: u64) -> Vec<KeyEvent> {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut events = Vec::new();
        let mut t = 0;
        for _ in 0..presses {
            let key: u32 = rng.random_range(16..26);
            t += rng.random_range(80_000..400_000) + i64::from(key % 3) * 40_000;
            events.push(KeyEvent::new(t, key, KeyAction::Down));
            let hold = 50_000 + i64::from(key - 16) * 8_000 + rng.random_range(0..60_000);
            events.push(KeyEvent::new(t + hold, key, KeyAction::Up));
        }
        events.sort_by_key(|e| e.time_us);
        events
    }

    /// A replay loop of `loop_presses` with `jitter_ms` of jitter, on `keys` (empty: recorded).
    fn replay_loop(jitter_ms: f64, keys: Vec<u32>, loop_presses: usize) -> MacroSpec {
        let (family, hold) = (MacroFamily::ReplayLoop, HoldModel::Recorded);
        MacroSpec { family, interval_ms: 0.0, jitter_ms, tick_ms: 10.0, hold, keys, loop_presses }
    }

    #[test]
    fn a_replay_loop_longer_than_the_window_raises_a_replay_alert_with_its_period() {
        let human = macrogen::recorded_presses(&recording(400, 11));
        let spec = replay_loop(3.0, Vec::new(), 300);
        let events = macrogen::generate(&spec, &human, 0, 700, &mut ChaCha8Rng::seed_from_u64(12));
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let out = run(&mut d, &mut UserState::default(), &events);
        let a = alerts(&out);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].reasons.names(), ["replay"]);
        let f = &a[0].window.features;
        assert_eq!(f.replay_period, 300.0);
        // Raised at the press the third recurrence was found, not at a later confirming window.
        assert!(f.replay_recurrences == 3.0 && f.replay_error_ms < 5.0, "{f:?}");
        // Nothing in the first loop: a replay cannot be told before it comes round.
        let first_loop_end = events.iter().filter(|e| e.action == KeyAction::Down).nth(300).unwrap().time_us;
        assert!(a[0].window.window_end_us > first_loop_end);
    }

    #[test]
    fn a_sampler_of_a_persons_own_timing_raises_keyless_timing_and_the_person_does_not() {
        let person = recording(1_200, 21);
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let out = run(&mut d, &mut UserState::default(), &person);
        assert!(alerts(&out).is_empty(), "the person");
        let spec = MacroSpec::random(MacroFamily::HumanIid, &mut ChaCha8Rng::seed_from_u64(22));
        let human = macrogen::recorded_presses(&person);
        let sampler = macrogen::generate(&spec, &human, 0, 900, &mut ChaCha8Rng::seed_from_u64(23));
        let out = run(&mut d, &mut UserState::default(), &sampler);
        let a = alerts(&out);
        assert_eq!(a.len(), 1, "the sampler");
        assert!(a[0].reasons.names().contains(&"keyless_timing"), "{:?}", a[0].reasons.names());
        let f = &a[0].window.features;
        assert!(f.key_dependence_chi2 < 26.0 && f.key_dependence_presses == 600.0, "{f:?}");
        // No verdict before two blocks: nothing can be told of the first 600 presses.
        let block_end = sampler.iter().filter(|e| e.action == KeyAction::Down).nth(599).unwrap().time_us;
        assert!(a[0].window.window_end_us >= block_end);
    }

    #[test]
    fn records_resent_after_a_restart_do_not_make_a_person_a_replay() {
        // An agent that restarts resends what it had not seen acknowledged: the same events, with
        // their own times, once the stream has moved on. They must not read as a replayed run.
        let person = recording(600, 16);
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut state = UserState::default();
        let first = run(&mut d, &mut state, &person[..800]);
        let resent = run(&mut d, &mut state, &person[400..]);
        assert!(alerts(&first).is_empty() && alerts(&resent).is_empty());
        let replay_seen =
            |out: &[Output]| out.iter().any(|o| matches!(o, Output::Window(w) if w.features.replay_recurrences > 0.0));
        assert!(!replay_seen(&first) && !replay_seen(&resent));
        // What protects the person: events behind the user's watermark are dropped as late.
        assert!(state.late_events() >= 300, "{}", state.late_events());
    }

    #[test]
    fn human_like_typing_that_never_repeats_raises_no_replay() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let out = run(&mut d, &mut UserState::default(), &recording(5_000, 13));
        assert!(alerts(&out).is_empty());
        assert!(out.iter().all(|o| !matches!(o, Output::Window(w) if w.features.replay_recurrences > 0.0)));
    }

    #[test]
    fn the_memory_outlives_an_idle_close() {
        // A loop of 200 with the user idle for a minute after its 100th press, played 300 presses:
        // the second round (presses 200-299) recurs against presses 0-99 only, all from before
        // the idle close, so only a memory that outlived it can raise the alert.
        let human = macrogen::recorded_presses(&recording(400, 14));
        let spec = replay_loop(2.0, vec![2, 3, 4], 200);
        let mut events = macrogen::generate(&spec, &human, 0, 300, &mut ChaCha8Rng::seed_from_u64(15));
        let gap_after = events.iter().filter(|e| e.action == KeyAction::Down).nth(100).unwrap().time_us;
        for e in events.iter_mut().filter(|e| e.time_us > gap_after) {
            e.time_us += 60_000_000;
        }
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let out = run(&mut d, &mut UserState::default(), &events);
        assert!(out.iter().any(|o| matches!(o, Output::Window(w) if w.partial)), "the idle gap closed the window");
        let a = alerts(&out);
        assert_eq!(a.len(), 1);
        assert!(a[0].reasons.contains(Rule::Replay));
        assert_eq!(a[0].window.features.replay_period, 200.0);
    }

    #[test]
    fn a_state_stored_before_the_memory_existed_still_decodes() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let mut state = UserState::default();
        run(&mut d, &mut state, &fixed_macro(120, 0));
        let v1 = postcard::to_stdvec(&(&state.reorder, &state.scored.window, &state.scored.policy)).unwrap();
        let upgraded = UserState::from(postcard::from_bytes::<UserStateV1>(&v1).unwrap());
        assert_eq!(upgraded.reorder, state.reorder);
        assert_eq!(upgraded.scored.window, state.scored.window);
        assert_eq!(upgraded.scored.policy, state.scored.policy);
        assert_eq!(upgraded.scored.memory, Default::default());
    }

    #[test]
    fn keys_from_a_virtual_device_explain_an_alert_and_alert_alone_only_when_asked() {
        let mut d = Detector::new(DetectorConfig::default()).unwrap();
        let run_virtual = |d: &mut Detector, events: &[KeyEvent]| {
            let mut state = UserState::default();
            state.set_virtual_source(true);
            run(d, &mut state, events)
        };
        let out = run_virtual(&mut d, &fixed_macro(100, 0));
        let a = alerts(&out);
        assert_eq!(a.len(), 1);
        assert!(a[0].reasons.contains(Rule::VirtualDevice) && a[0].reasons.contains(Rule::IntervalHistogram));
        assert_eq!(a[0].window.features.virtual_device, 1.0);
        // Human-like typing through uinput (a key remapper, say): explained, never alerted.
        let human = recording(300, 31);
        assert!(alerts(&run_virtual(&mut d, &human)).is_empty());
        // Unless the deployment asks for it.
        let mut cfg = DetectorConfig::default();
        cfg.rules.virtual_device_alerts = true;
        let mut strict = Detector::new(cfg).unwrap();
        let a = run_virtual(&mut strict, &human);
        assert_eq!(alerts(&a).len(), 1);
        assert_eq!(alerts(&a)[0].reasons.names(), ["virtual_device"]);
        // The same typing from a real keyboard stays quiet under either configuration.
        assert!(alerts(&run(&mut strict, &mut UserState::default(), &human)).is_empty());
    }
}
