//! The alert policy: from a stream of window verdicts to at most one alert per incident.
//!
//! A window is *suspicious* when its score reaches the threshold. An incident opens, and the one
//! alert for it is raised, when at least `confirm_k` of the user's last `confirm_n` windows were
//! suspicious and the user is not cooling down. The incident closes after `close_after_clean`
//! clean windows in a row (or on an idle close long after its last suspicious window); a
//! cool-down then keeps a flickering user from raising a storm of alerts.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::rules::RuleSet;

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
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { threshold: 0.5, confirm_k: 2, confirm_n: 3, close_after_clean: 6, cooldown_s: 600 }
    }
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
}

impl PolicyState {
    /// Feeds the verdict for a window ending at `at_us`.
    pub fn on_window(&mut self, cfg: &PolicyConfig, at_us: i64, score: f64, fired: RuleSet) -> Decision {
        let suspicious = score >= cfg.threshold;
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
        if confirming < cfg.confirm_k {
            return Decision::Quiet;
        }
        let reasons = self.recent.iter().fold(RuleSet::EMPTY, |acc, r| acc.union(*r));
        self.incident = Some(Incident { opened_us: at_us, last_suspicious_us: at_us, clean_streak: 0 });
        self.alerts_raised += 1;
        Decision::Alert(reasons)
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
}

fn cooldown_us(cfg: &PolicyConfig) -> i64 {
    i64::try_from(cfg.cooldown_s.saturating_mul(1_000_000)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::rules::Rule;
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
                state.on_window(cfg, i as i64 * 1_000_000, score, fired)
            })
            .collect()
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
        assert!(matches!(st.on_window(&cfg, 14_000_000, 0.9, hist()), Decision::Alert(_)));
        assert_eq!(st.alerts_raised(), 2);
    }

    #[test]
    fn idle_resets_confirmation_and_closes_stale_incidents() {
        let cfg = PolicyConfig { cooldown_s: 5, ..PolicyConfig::default() };
        let mut st = PolicyState::default();
        st.on_window(&cfg, 0, 0.9, hist());
        assert_eq!(st.on_idle(&cfg, 1_000_000), Decision::Quiet);
        // The window before the idle gap no longer confirms.
        assert_eq!(st.on_window(&cfg, 2_000_000, 0.9, hist()), Decision::Quiet);
        assert!(matches!(st.on_window(&cfg, 3_000_000, 0.9, hist()), Decision::Alert(_)));
        assert_eq!(st.on_idle(&cfg, 4_000_000), Decision::Quiet, "incident still fresh");
        assert_eq!(st.on_idle(&cfg, 9_000_000), Decision::IncidentClosed);
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
