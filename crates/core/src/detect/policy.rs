//! The alert policy: from a stream of window verdicts to at most one alert per incident.
//!
//! A window is *suspicious* when its score reaches the threshold. An incident opens, and the one
//! alert for it is raised, when at least `confirm_k` of the user's last `confirm_n` windows were
//! suspicious and the user is not cooling down. The incident closes after `close_after_clean`
//! clean windows in a row (or on an idle close long after its last suspicious window); a
//! cool-down then keeps a flickering user from raising a storm of alerts.
//!
//! # Evidence that accumulates
//!
//! k-of-n only hears windows that cross the threshold on their own. A macro whose every window
//! scores just below it (flights and holds sampled from a human's own distributions, say) is
//! never confirmed, though its scores sit far above any human's. A one-sided CUSUM over the
//! sequence model's per-window log-odds hears it: with `x` a window's log-odds over the
//! operating threshold's (the score's logit, `SequenceScorer`),
//!
//! ```text
//! S = max(0, S + clamp(x - reference, -clamp, clamp))     alert when S >= threshold
//! ```
//!
//! `reference` sits between what humans' windows score and what such macros' windows score, so
//! a human's increments are negative on average and S keeps returning to 0, while a macro's
//! are positive and S climbs to the threshold in `threshold / clamp` windows at the fastest (the
//! clamp keeps one extreme window from alerting alone: that remains k-of-n's call).
//!
//! False alarms: for independent increments with negative mean, the expected number of windows
//! before a false alarm is at least `exp(theta * threshold)`, where `theta > 0` solves
//! `E[exp(theta * X)] = 1` for the human increment `X` (Wald's identity; Lorden 1971). Windows
//! overlap (a hop of 10 in 50 presses), so consecutive increments are correlated and the bound
//! is a guide, not a guarantee: `models/EVAL.md` gives theta as measured on human windows of the
//! validation split, and the largest S any held-out human reached.
//!
//! # Evidence that is conclusive on its own
//!
//! Two kinds of evidence accumulate before the policy sees them and so open an incident at the
//! press they cross, without a confirming window ([`PolicyState::on_conclusive`]): the
//! per-press model's CUSUM (`press_lstm`), and the recurrence memory's count of verified runs
//! that repeat at one period (`replay`, at `rules.replay_recurrences`). Waiting for a second
//! window would only add 10 to 20 presses to what they already counted.
//!
//! The per-press model's evidence is one model's word, though, and on people it never saw it
//! has a tail (about 1 in 1,000 reach its threshold, `models/out_of_fold.py`) that the window
//! scorers do not share. With `press_needs_window` (the default) it therefore opens an incident
//! only when one of the last `confirm_n` windows was suspicious on its own
//! ([`PolicyState::on_press_evidence`]): it stands for one of k-of-n's windows, so an alert
//! needs two scorers' agreement, and until such a window comes the evidence waits (the next
//! suspicious window then opens the incident at once).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::rules::{Rule, RuleSet};

/// Policy settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A window is suspicious at this score or above.
    pub threshold: f64,
    /// Suspicious windows needed ...
    pub confirm_k: usize,
    /// ... among this many most recent windows.
    pub confirm_n: usize,
    /// Clean windows in a row that close an open incident.
    pub close_after_clean: u32,
    /// After an incident closes, no new one opens for this long (event time), seconds.
    pub cooldown_s: u64,
    /// The sequential test over the sequence model's windows.
    pub evidence: EvidenceConfig,
    /// Whether the per-press model's evidence needs a suspicious window among the last
    /// `confirm_n` to open an incident: it then stands for one of k-of-n's windows, not for all
    /// of them, so one model's error alone never alerts (module docs).
    pub press_needs_window: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            confirm_k: 2,
            confirm_n: 3,
            close_after_clean: 6,
            cooldown_s: 600,
            evidence: EvidenceConfig::default(),
            press_needs_window: true,
        }
    }
}

/// The CUSUM over the sequence model's per-window log-odds (module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceConfig {
    /// Whether the test runs.
    pub enabled: bool,
    /// Log-odds over the operating threshold's that a window must beat to add evidence.
    pub reference: f64,
    /// Largest change one window makes, either way.
    pub clamp: f64,
    /// Evidence that opens an incident.
    pub threshold: f64,
}

impl Default for EvidenceConfig {
    fn default() -> Self {
        Self { enabled: true, reference: -4.0, clamp: 2.0, threshold: 8.0 }
    }
}

impl EvidenceConfig {
    /// The evidence after a window with log-odds `x` (over the operating threshold's).
    pub fn step(&self, evidence: f64, x: f64) -> f64 {
        let x = if x.is_nan() { f64::NEG_INFINITY } else { x };
        // Capped, so that after a long macro session the evidence drains in a few windows.
        (evidence + (x - self.reference).clamp(-self.clamp, self.clamp)).clamp(0.0, 2.0 * self.threshold)
    }
}

/// A score's log-odds: the model's log-odds over its operating threshold's.
pub fn log_odds(score: f64) -> f64 {
    (score / (1.0 - score)).ln()
}

/// What the policy decided for one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to report.
    Quiet,
    /// A new incident opened: raise one alert naming these rules.
    Alert(RuleSet),
    /// The open incident closed.
    IncidentClosed,
}

/// One open incident.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// Event time of the window that opened it.
    pub opened_us: i64,
    /// Event time of its latest suspicious window.
    pub last_suspicious_us: i64,
    clean_streak: u32,
}

/// A user's policy state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Rules fired by each recent window, newest last; empty set = clean window.
    recent: VecDeque<RuleSet>,
    incident: Option<Incident>,
    cooldown_until_us: Option<i64>,
    alerts_raised: u64,
    /// The CUSUM statistic over the sequence model's windows.
    evidence: f64,
}

impl PolicyState {
    /// Feeds the verdict for a window ending at `at_us`: its combined score, the reasons that
    /// fired, and the sequence model's score when a model scored it.
    pub fn on_window(
        &mut self,
        cfg: &PolicyConfig,
        at_us: i64,
        score: f64,
        fired: RuleSet,
        model_score: Option<f64>,
    ) -> Decision {
        let mut fired = fired;
        if let (true, Some(s)) = (cfg.evidence.enabled, model_score) {
            self.evidence = cfg.evidence.step(self.evidence, log_odds(s));
            if self.evidence >= cfg.evidence.threshold {
                fired.insert(Rule::Accumulated);
            }
        }
        let suspicious = score >= cfg.threshold || fired.contains(Rule::Accumulated);
        let fired = if suspicious { fired } else { RuleSet::EMPTY };
        if self.recent.len() == cfg.confirm_n.max(1) {
            self.recent.pop_front();
        }
        self.recent.push_back(fired);

        if let Some(incident) = &mut self.incident {
            if suspicious {
                incident.last_suspicious_us = at_us;
                incident.clean_streak = 0;
                return Decision::Quiet;
            }
            incident.clean_streak += 1;
            if incident.clean_streak >= cfg.close_after_clean {
                self.close(cfg, at_us);
                return Decision::IncidentClosed;
            }
            return Decision::Quiet;
        }

        if !suspicious || self.cooldown_until_us.is_some_and(|until| at_us < until) {
            return Decision::Quiet;
        }
        let confirming = self.recent.iter().filter(|r| !r.is_empty()).count();
        if confirming < cfg.confirm_k && !fired.contains(Rule::Accumulated) {
            return Decision::Quiet;
        }
        let reasons = self.recent.iter().fold(RuleSet::EMPTY, |acc, r| acc.union(*r));
        self.incident = Some(Incident { opened_us: at_us, last_suspicious_us: at_us, clean_streak: 0 });
        self.alerts_raised += 1;
        Decision::Alert(reasons)
    }

    /// Evidence that accumulated on its own crossed its threshold at `at_us`: the per-press
    /// model's CUSUM, or recurrences of a replayed run counted to the replay rule's number. It
    /// needs no confirming window: an incident opens, its alert giving `reasons`, unless one is
    /// open (which it keeps open) or the user is cooling down after one.
    pub fn on_conclusive(&mut self, at_us: i64, reasons: RuleSet) -> Decision {
        if let Some(incident) = &mut self.incident {
            incident.last_suspicious_us = at_us;
            incident.clean_streak = 0;
            return Decision::Quiet;
        }
        if self.cooldown_until_us.is_some_and(|until| at_us < until) {
            return Decision::Quiet;
        }
        self.incident = Some(Incident { opened_us: at_us, last_suspicious_us: at_us, clean_streak: 0 });
        self.alerts_raised += 1;
        Decision::Alert(reasons)
    }

    /// The per-press model's evidence crossed its threshold at `at_us`. With
    /// `press_needs_window`, it opens an incident only when one of the recent windows was
    /// suspicious, and the alert names that window's reasons too; `None` says the evidence
    /// waits for such a window (the caller keeps it).
    pub fn on_press_evidence(&mut self, cfg: &PolicyConfig, at_us: i64, reasons: RuleSet) -> Option<Decision> {
        let windows = self.recent.iter().fold(RuleSet::EMPTY, |acc, r| acc.union(*r));
        if cfg.press_needs_window && windows.is_empty() && self.incident.is_none() {
            return None;
        }
        Some(self.on_conclusive(at_us, reasons.union(windows)))
    }

    /// The user went idle at `now_us`: recent windows stop counting towards confirmation, and an
    /// incident whose last suspicious window is a cool-down old closes.
    pub fn on_idle(&mut self, cfg: &PolicyConfig, now_us: i64) -> Decision {
        self.recent.clear();
        let stale = self.incident.is_some_and(|i| now_us.saturating_sub(i.last_suspicious_us) >= cooldown_us(cfg));
        if stale {
            self.close(cfg, now_us);
            return Decision::IncidentClosed;
        }
        Decision::Quiet
    }

    fn close(&mut self, cfg: &PolicyConfig, at_us: i64) {
        self.incident = None;
        self.recent.clear();
        self.evidence = 0.0;
        self.cooldown_until_us = Some(at_us.saturating_add(cooldown_us(cfg)));
    }

    /// The open incident, if any.
    pub fn incident(&self) -> Option<&Incident> {
        self.incident.as_ref()
    }

    /// Alerts raised for this user so far.
    pub fn alerts_raised(&self) -> u64 {
        self.alerts_raised
    }

    /// The sequential test's statistic now.
    pub fn evidence(&self) -> f64 {
        self.evidence
    }
}

fn cooldown_us(cfg: &PolicyConfig) -> i64 {
    i64::try_from(cfg.cooldown_s.saturating_mul(1_000_000)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hist() -> RuleSet {
        let mut s = RuleSet::EMPTY;
        s.insert(Rule::IntervalHistogram);
        s
    }

    fn run(cfg: &PolicyConfig, state: &mut PolicyState, verdicts: &[bool]) -> Vec<Decision> {
        verdicts
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let (score, fired) = if s { (0.9, hist()) } else { (0.1, RuleSet::EMPTY) };
                state.on_window(cfg, i as i64 * 1_000_000, score, fired, None)
            })
            .collect()
    }

    fn press() -> RuleSet {
        let mut s = RuleSet::EMPTY;
        s.insert(Rule::PressLstm);
        s
    }

    #[test]
    fn press_evidence_stands_for_one_window_of_k_of_n_not_for_all() {
        let cfg = PolicyConfig::default();
        let mut st = PolicyState::default();
        run(&cfg, &mut st, &[false, false, false]);
        assert_eq!(st.on_press_evidence(&cfg, 3_500_000, press()), None, "no suspicious window: it waits");
        assert_eq!(run(&cfg, &mut st, &[true]), [Decision::Quiet], "one window alone is not enough either");
        let both = press().union(hist());
        assert_eq!(st.on_press_evidence(&cfg, 4_500_000, press()), Some(Decision::Alert(both)));
        // Once the window has left the last confirm_n, it waits again (after the incident).
        let mut st = PolicyState::default();
        run(&cfg, &mut st, &[true, false, false, false]);
        assert_eq!(st.on_press_evidence(&cfg, 4_500_000, press()), None);
        // Conclusive alone when so configured.
        let alone = PolicyConfig { press_needs_window: false, ..PolicyConfig::default() };
        assert_eq!(st.on_press_evidence(&alone, 4_500_000, press()), Some(Decision::Alert(press())));
    }

    #[test]
    fn one_suspicious_window_is_not_enough() {
        let cfg = PolicyConfig::default();
        let d = run(&cfg, &mut PolicyState::default(), &[true, false, false, true, false, false]);
        assert!(d.iter().all(|d| *d == Decision::Quiet));
    }

    #[test]
    fn k_of_n_opens_one_incident() {
        let cfg = PolicyConfig::default();
        let mut st = PolicyState::default();
        let d = run(&cfg, &mut st, &[true, false, true, true, true, true]);
        assert_eq!(d[2], Decision::Alert(hist()));
        assert_eq!(d.iter().filter(|d| matches!(d, Decision::Alert(_))).count(), 1);
        assert!(st.incident().is_some());
    }

    #[test]
    fn incident_closes_after_clean_streak_then_cools_down() {
        let cfg = PolicyConfig { close_after_clean: 2, cooldown_s: 10, ..PolicyConfig::default() };
        let mut st = PolicyState::default();
        // Alert at t=1 s, clean at 2 s and 3 s closes at 3 s; cool-down lasts until 13 s.
        let d = run(&cfg, &mut st, &[true, true, false, false, true, true, true]);
        assert_eq!(d[3], Decision::IncidentClosed);
        assert!(d[4..].iter().all(|d| *d == Decision::Quiet), "{d:?}");
        // After the cool-down a new incident may open.
        assert!(matches!(st.on_window(&cfg, 14_000_000, 0.9, hist(), None), Decision::Alert(_)));
        assert_eq!(st.alerts_raised(), 2);
    }

    #[test]
    fn idle_resets_confirmation_and_closes_stale_incidents() {
        let cfg = PolicyConfig { cooldown_s: 5, ..PolicyConfig::default() };
        let mut st = PolicyState::default();
        st.on_window(&cfg, 0, 0.9, hist(), None);
        assert_eq!(st.on_idle(&cfg, 1_000_000), Decision::Quiet);
        // The window before the idle gap no longer confirms.
        assert_eq!(st.on_window(&cfg, 2_000_000, 0.9, hist(), None), Decision::Quiet);
        assert!(matches!(st.on_window(&cfg, 3_000_000, 0.9, hist(), None), Decision::Alert(_)));
        assert_eq!(st.on_idle(&cfg, 4_000_000), Decision::Quiet, "incident still fresh");
        assert_eq!(st.on_idle(&cfg, 9_000_000), Decision::IncidentClosed);
    }

    /// A model score with log-odds `x` over the threshold's.
    fn model(x: f64) -> Option<f64> {
        Some(1.0 / (1.0 + (-x).exp()))
    }

    fn feed_model(cfg: &PolicyConfig, st: &mut PolicyState, xs: &[f64]) -> Vec<Decision> {
        let mut t = 0;
        xs.iter()
            .map(|&x| {
                t += 1_000_000;
                let s = model(x).unwrap();
                let fired = if s >= 0.5 { lstm() } else { RuleSet::EMPTY };
                st.on_window(cfg, t, s, fired, model(x))
            })
            .collect()
    }

    fn lstm() -> RuleSet {
        let mut s = RuleSet::EMPTY;
        s.insert(Rule::Lstm);
        s
    }

    #[test]
    fn weak_consistent_evidence_converges_to_one_alert() {
        let cfg = PolicyConfig::default();
        let mut st = PolicyState::default();
        // Every window below the threshold (log-odds -1), each 3 above the reference: the
        // clamp lets 2 through per window, so the fourth window reaches 8.
        let d = feed_model(&cfg, &mut st, &[-1.0; 10]);
        let alerts: Vec<usize> = (0..d.len()).filter(|&i| matches!(d[i], Decision::Alert(_))).collect();
        assert_eq!(alerts, vec![3]);
        let Decision::Alert(reasons) = d[3] else { unreachable!() };
        assert_eq!(reasons.names(), vec!["accumulated"]);
        // The incident stays open while the evidence stays up, and closes once it has drained.
        assert!(st.incident().is_some());
        let d = feed_model(&cfg, &mut st, &[-20.0; 15]);
        assert!(d.contains(&Decision::IncidentClosed), "{d:?}");
        assert_eq!(st.evidence(), 0.0);
    }

    #[test]
    fn a_human_s_odd_windows_do_not_accumulate() {
        let cfg = PolicyConfig::default();
        let mut st = PolicyState::default();
        // Mostly far below the reference, with an odd window near the threshold now and then.
        let mut xs = Vec::new();
        for i in 0..1000 {
            xs.push(if i % 7 == 0 { -0.5 } else { -9.0 });
        }
        let d = feed_model(&cfg, &mut st, &xs);
        assert!(d.iter().all(|d| *d == Decision::Quiet));
        assert!(st.evidence() <= cfg.evidence.clamp);
    }

    #[test]
    fn one_extreme_window_is_k_of_n_s_call_not_the_evidence_s() {
        let cfg = PolicyConfig::default();
        let mut st = PolicyState::default();
        let d = feed_model(&cfg, &mut st, &[30.0, -9.0, -9.0]);
        assert!(d.iter().all(|d| *d == Decision::Quiet));
        assert!(!cfg.evidence.step(0.0, 1e9).is_nan() && cfg.evidence.step(0.0, f64::NAN) == 0.0);
        // Without a model score the statistic never moves.
        st.on_window(&cfg, 9_000_000, 0.1, RuleSet::EMPTY, None);
        assert_eq!(st.evidence(), 0.0);
        let off = PolicyConfig { evidence: EvidenceConfig { enabled: false, ..EvidenceConfig::default() }, ..cfg };
        assert!(feed_model(&off, &mut PolicyState::default(), &[-1.0; 20]).iter().all(|d| *d == Decision::Quiet));
    }

    proptest! {
        /// Never two alerts without a close in between, and never an alert without k of the last
        /// n windows suspicious.
        #[test]
        fn at_most_one_alert_per_incident(verdicts in proptest::collection::vec(any::<bool>(), 0..200)) {
            let cfg = PolicyConfig { cooldown_s: 0, ..PolicyConfig::default() };
            let mut st = PolicyState::default();
            let decisions = run(&cfg, &mut st, &verdicts);
            let mut open = false;
            for (i, d) in decisions.iter().enumerate() {
                match d {
                    Decision::Alert(_) => {
                        prop_assert!(!open);
                        let from = (i + 1).saturating_sub(cfg.confirm_n);
                        let k = verdicts[from..=i].iter().filter(|v| **v).count();
                        prop_assert!(k >= cfg.confirm_k);
                        open = true;
                    }
                    Decision::IncidentClosed => { prop_assert!(open); open = false; }
                    Decision::Quiet => {}
                }
            }
        }
    }
}
