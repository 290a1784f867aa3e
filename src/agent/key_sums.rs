//! The key-dependence test's key sums, computed where the keys are known.
//!
//! Short-lived key labels (`super::labels`) hide which presses, hundreds apart, were the same
//! key; the processor's key-dependence test needs exactly that to see a person's holds and
//! flights follow their keys (`detect::dependence`). So the agent settles its own presses from
//! the real key codes, as the processor's window does, groups them with the same code the
//! processor runs ([`KeyGrouping`]), and sends each block's sums beside the labels. The sums are
//! counts and sums of log times per group, folded over a block: no key, no order, no single
//! press's timing.
//!
//! They are the agent's word, as its labels are: a modified agent can send sums that look
//! human, as it can send labels chosen to. The processor refuses sums no real typing gives
//! (`KeySums::is_plausible`).

use metronome_core::detect::dependence::{DependenceConfig, KeyGrouping, KeySums};
use metronome_core::detect::window::{Applied, KeyWindow, WindowConfig};
use metronome_core::event::KeyEvent;

/// Settles raw presses and folds them into key sums, one [`KeySums`] per block.
#[derive(Debug, Clone)]
pub struct KeySumsReporter {
    window_cfg: WindowConfig,
    dependence_cfg: DependenceConfig,
    window: KeyWindow,
    grouping: KeyGrouping,
    ready: Option<KeySums>,
}

impl Default for KeySumsReporter {
    fn default() -> Self {
        // evdev marks auto-repeat, so none is inferred.
        let window_cfg = WindowConfig { infer_repeats: false, ..WindowConfig::default() };
        Self {
            window_cfg,
            dependence_cfg: DependenceConfig::default(),
            window: KeyWindow::default(),
            grouping: KeyGrouping::default(),
            ready: None,
        }
    }
}

impl KeySumsReporter {
    /// One captured event, with its real key code, in capture order.
    pub fn observe(&mut self, event: KeyEvent) {
        let applied = self.window.apply(&self.window_cfg, event);
        if !matches!(applied, Applied::Press | Applied::PressDue) {
            return;
        }
        let Some(settled) = self.window.newly_settled().copied() else { return };
        if let Some(sums) = self.grouping.push(&self.dependence_cfg, &settled) {
            self.ready = Some(self.ready.map_or(sums, |r| r.merge(sums)));
        }
    }

    /// The sums of the blocks completed since the last call, if any.
    pub fn take(&mut self) -> Option<KeySums> {
        self.ready.take()
    }

    /// The sums an agent would send for a recording of one session: `(i, sums)` once
    /// `events[i - 1]` completed a block (measurements on recordings).
    pub fn reports_of(events: &[KeyEvent]) -> Vec<(usize, KeySums)> {
        let mut reporter = Self::default();
        let mut out = Vec::new();
        for (i, e) in events.iter().enumerate() {
            reporter.observe(*e);
            out.extend(reporter.take().map(|s| (i + 1, s)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metronome_core::event::KeyAction;

    #[test]
    fn a_block_s_sums_come_once_its_presses_have_settled() {
        let mut reporter = KeySumsReporter::default();
        let mut reported = Vec::new();
        let mut t = 1_700_000_000_000_000;
        for i in 0..700u32 {
            let key = 16 + (i * 7) % 23;
            let hold = 60_000 + i64::from(key % 5) * 9_000;
            reporter.observe(KeyEvent::new(t, key, KeyAction::Down));
            reporter.observe(KeyEvent::new(t + 10_000, key, KeyAction::Repeat));
            reporter.observe(KeyEvent::new(t + hold, key, KeyAction::Up));
            if let Some(s) = reporter.take() {
                // Presses settle eight behind the newest: block one is out at press 308.
                reported.push((i + 1, s));
            }
            t += 150_000 + i64::from(i % 11) * 7_000;
        }
        let at: Vec<u32> = reported.iter().map(|(i, _)| *i).collect();
        assert_eq!(at, [308, 608]);
        for (_, s) in &reported {
            assert_eq!(s.presses, 300);
            assert!(s.is_plausible(), "{s:?}");
            assert_eq!(s.hold_by_key.values, 0, "an auto-repeated press has no hold that counts");
            assert_eq!(s.flight_by_key.groups, 23, "one group per key");
        }
    }
}
