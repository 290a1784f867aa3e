//! Count-based sliding windows over a user's key presses.
//!
//! A window is the last `size` key-downs (presses) with their hold times. It is scored once it
//! holds `min_presses` presses and then every `hop` new presses. Auto-repeat is not a press:
//! evdev marks it (`Repeat`), files do not, so a down of the same key that follows the previous
//! down within `repeat_max_interval_ms` is treated as a repeat too, provided the run began the
//! way a held key begins: the key's second down came after a typematic delay (150 ms to 2 s).
//! Browsers report a held key as down/up pairs about 30 ms apart after that delay, and one
//! finger cannot re-press a key that fast (people need about 100 ms); a macro hammering one key
//! starts fast, without the delay, and stays presses. Held modifiers (Shift, Ctrl, ...) are the
//! exception: browsers repeat them from the first down, so for `modifier_keys` any same-key
//! down within the interval is a repeat. Same-key downs closer than `burst_max_interval_ms`
//! (faster than any typematic rate) are never presses either: they are software-injected bursts
//! (IMEs, paste helpers, the browser itself), seen in real human data. Marked sources (the agent, whose key ids are
//! short-lived labels) set `infer_repeats = false`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::event::{KeyAction, KeyEvent};

/// Shortest and longest auto-repeat start delay operating systems offer.
const TYPEMATIC_DELAY_MIN_US: i64 = 150_000;
const TYPEMATIC_DELAY_MAX_US: i64 = 2_000_000;

/// A key-up is matched to one of this many newest presses (keys roll over, a few at most): a
/// press this far back has its final hold.
pub const RELEASE_LOOKBACK: usize = 8;

/// Hold time marker for a press whose key-up has not been seen.
pub const HOLD_UNKNOWN: i32 = -1;

/// Window shape and cadence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Presses per window (W).
    pub size: usize,
    /// New presses between two scorings (H).
    pub hop: usize,
    /// Presses a window needs before its first scoring, and for an idle partial window to be
    /// scored at all.
    pub min_presses: usize,
    /// Event-time grace for reordering, milliseconds.
    pub grace_ms: u32,
    /// A user with no event for this long has their window closed, milliseconds.
    pub idle_timeout_ms: u32,
    /// Infer auto-repeat in sources that do not mark it (files).
    pub infer_repeats: bool,
    /// A same-key down at most this long after the previous down is a repeat, milliseconds.
    pub repeat_max_interval_ms: u32,
    /// A same-key down at most this long after the previous one is never a press, milliseconds.
    pub burst_max_interval_ms: u32,
    /// Key codes that repeat without a typematic delay in browser data (evdev modifiers).
    pub modifier_keys: Vec<u32>,
}

/// evdev codes of Ctrl, Shift, Alt and Meta, left and right.
pub const EVDEV_MODIFIERS: [u32; 8] = [29, 42, 54, 56, 97, 100, 125, 126];

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            size: 50,
            hop: 10,
            min_presses: 30,
            grace_ms: 200,
            idle_timeout_ms: 10_000,
            infer_repeats: true,
            repeat_max_interval_ms: 60,
            burst_max_interval_ms: 20,
            modifier_keys: EVDEV_MODIFIERS.to_vec(),
        }
    }
}

/// One key press inside a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Press {
    /// Key-down time, microseconds.
    pub down_us: i64,
    /// Key identity.
    pub key: u32,
    /// Hold time in microseconds, or [`HOLD_UNKNOWN`].
    pub hold_us: i32,
    /// Auto-repeats that followed this press (the key held down), saturating.
    pub repeats: u16,
}

impl Press {
    /// The hold time if the key-up has been seen.
    pub fn hold(&self) -> Option<i32> {
        (self.hold_us >= 0).then_some(self.hold_us)
    }
}

/// What [`KeyWindow::apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new press entered the window; the window is due for scoring.
    PressDue,
    /// A new press entered the window.
    Press,
    /// An auto-repeat (marked or inferred); not a press.
    Repeat,
    /// A key-up, matched to its press or not.
    Release,
}

/// A user's sliding window of presses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyWindow {
    presses: VecDeque<Press>,
    /// Presses since the last scoring.
    since_scored: u32,
    /// Whether this window has been scored since it was last reset.
    scored_once: bool,
    /// The most recent down (key, time) of any kind, for repeat inference.
    last_down: Option<(u32, i64)>,
    /// Whether the most recent down may continue an auto-repeat run.
    repeat_run: bool,
}

impl KeyWindow {
    /// Feeds one event in time order.
    pub fn apply(&mut self, cfg: &WindowConfig, event: KeyEvent) -> Applied {
        match event.action {
            KeyAction::Repeat => {
                self.count_repeat();
                Applied::Repeat
            }
            KeyAction::Up => {
                self.release(event);
                Applied::Release
            }
            KeyAction::Down => {
                let (repeat, run) = if cfg.infer_repeats { self.classify_same_key(cfg, event) } else { (false, false) };
                self.last_down = Some((event.key, event.time_us));
                self.repeat_run = run;
                if repeat {
                    self.count_repeat();
                    return Applied::Repeat;
                }
                if self.presses.len() == cfg.size {
                    self.presses.pop_front();
                }
                self.presses.push_back(Press {
                    down_us: event.time_us,
                    key: event.key,
                    hold_us: HOLD_UNKNOWN,
                    repeats: 0,
                });
                self.since_scored = self.since_scored.saturating_add(1);
                let warm = self.presses.len() >= cfg.min_presses;
                if warm && (!self.scored_once || self.since_scored as usize >= cfg.hop) {
                    Applied::PressDue
                } else {
                    Applied::Press
                }
            }
        }
    }

    /// Repeats belong to the press they follow, so they leave the window with it.
    fn count_repeat(&mut self) {
        if let Some(p) = self.presses.back_mut() {
            p.repeats = p.repeats.saturating_add(1);
        }
    }

    /// (is this down a repeat, may the next same-key down be one).
    fn classify_same_key(&self, cfg: &WindowConfig, event: KeyEvent) -> (bool, bool) {
        let Some((key, at)) = self.last_down else { return (false, false) };
        if key != event.key {
            return (false, false);
        }
        let gap = event.time_us.saturating_sub(at);
        if gap <= i64::from(cfg.repeat_max_interval_ms) * 1000 {
            let run = self.repeat_run
                || gap <= i64::from(cfg.burst_max_interval_ms) * 1000
                || cfg.modifier_keys.contains(&key);
            (run, run)
        } else {
            // A typematic delay: the key may now be auto-repeating.
            (false, (TYPEMATIC_DELAY_MIN_US..=TYPEMATIC_DELAY_MAX_US).contains(&gap))
        }
    }

    fn release(&mut self, event: KeyEvent) {
        // Keys roll over (the next down before this up), so look back a few presses.
        if let Some(p) = self
            .presses
            .iter_mut()
            .rev()
            .take(RELEASE_LOOKBACK)
            .find(|p| p.key == event.key && p.hold_us == HOLD_UNKNOWN)
        {
            p.hold_us = clamp_hold(event.time_us.saturating_sub(p.down_us));
        }
    }

    /// The press that has just become final (no key-up can change its hold any more): the one
    /// [`RELEASE_LOOKBACK`] presses behind the newest.
    pub fn newly_settled(&self) -> Option<&Press> {
        self.presses.len().checked_sub(RELEASE_LOOKBACK + 1).and_then(|i| self.presses.get(i))
    }

    /// The presses no later press has settled yet, oldest first (what a reset would lose).
    pub fn unsettled(&self) -> impl Iterator<Item = &Press> {
        self.presses.iter().skip(self.presses.len().saturating_sub(RELEASE_LOOKBACK))
    }

    /// Marks the window as scored now.
    pub fn mark_scored(&mut self) {
        self.since_scored = 0;
        self.scored_once = true;
    }

    /// Presses since the last scoring.
    pub fn unscored_presses(&self) -> usize {
        self.since_scored as usize
    }

    /// The presses, oldest first, as one slice.
    pub fn presses(&mut self) -> &[Press] {
        self.presses.make_contiguous()
    }

    /// Number of presses held.
    pub fn len(&self) -> usize {
        self.presses.len()
    }

    /// The oldest and the newest press.
    pub fn ends(&self) -> (Option<&Press>, Option<&Press>) {
        (self.presses.front(), self.presses.back())
    }

    /// True when the window holds no press.
    pub fn is_empty(&self) -> bool {
        self.presses.is_empty()
    }

    /// Auto-repeats that followed the presses now in the window.
    pub fn repeats(&self) -> u32 {
        repeats_after(self.presses.iter())
    }

    /// Forgets everything (idle close): the next press starts a fresh window.
    pub fn reset(&mut self) {
        self.presses.clear();
        self.since_scored = 0;
        self.scored_once = false;
        self.last_down = None;
        self.repeat_run = false;
    }
}

/// Auto-repeats that followed `presses`.
pub fn repeats_after<'a>(presses: impl IntoIterator<Item = &'a Press>) -> u32 {
    presses.into_iter().map(|p| u32::from(p.repeats)).sum()
}

fn clamp_hold(us: i64) -> i32 {
    us.clamp(0, i32::MAX as i64) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: usize, hop: usize, min: usize) -> WindowConfig {
        WindowConfig { size, hop, min_presses: min, ..WindowConfig::default() }
    }

    fn down(t_ms: i64, key: u32) -> KeyEvent {
        KeyEvent::new(t_ms * 1000, key, KeyAction::Down)
    }

    fn up(t_ms: i64, key: u32) -> KeyEvent {
        KeyEvent::new(t_ms * 1000, key, KeyAction::Up)
    }

    /// Presses `n` distinct keys 100 ms apart and returns the indices (1-based) that were due.
    fn due_points(c: &WindowConfig, n: usize) -> Vec<usize> {
        let mut w = KeyWindow::default();
        let mut due = Vec::new();
        for i in 0..n {
            if w.apply(c, down(i as i64 * 100, i as u32 % 7)) == Applied::PressDue {
                due.push(i + 1);
                w.mark_scored();
            }
        }
        due
    }

    #[test]
    fn first_scoring_at_min_presses_then_every_hop() {
        assert_eq!(due_points(&cfg(50, 10, 30), 75), vec![30, 40, 50, 60, 70]);
        assert_eq!(due_points(&cfg(50, 10, 50), 75), vec![50, 60, 70]);
        assert_eq!(due_points(&cfg(5, 1, 5), 8), vec![5, 6, 7, 8]);
    }

    #[test]
    fn window_keeps_only_the_last_size_presses() {
        let c = cfg(4, 1, 4);
        let mut w = KeyWindow::default();
        for i in 0..10 {
            w.apply(&c, down(i * 100, i as u32));
        }
        let keys: Vec<u32> = w.presses().iter().map(|p| p.key).collect();
        assert_eq!(keys, vec![6, 7, 8, 9]);
    }

    #[test]
    fn holds_match_rolled_over_keys() {
        let c = cfg(10, 1, 2);
        let mut w = KeyWindow::default();
        w.apply(&c, down(0, 1));
        w.apply(&c, down(50, 2));
        w.apply(&c, up(80, 1));
        w.apply(&c, up(120, 2));
        w.apply(&c, up(130, 9)); // never pressed: ignored
        let holds: Vec<Option<i32>> = w.presses().iter().map(Press::hold).collect();
        assert_eq!(holds, vec![Some(80_000), Some(70_000)]);
    }

    #[test]
    fn browser_style_auto_repeat_is_not_a_press() {
        let c = cfg(50, 10, 30);
        let mut w = KeyWindow::default();
        // Press, typematic delay, then a down/up pair every 30 ms.
        w.apply(&c, down(0, 14));
        w.apply(&c, up(1, 14));
        assert_eq!(w.apply(&c, down(500, 14)), Applied::Press, "the delay's end is a press");
        w.apply(&c, up(501, 14));
        for i in 1..20 {
            assert_eq!(w.apply(&c, down(500 + i * 30, 14)), Applied::Repeat, "repeat {i}");
            w.apply(&c, up(500 + i * 30 + 1, 14));
        }
        assert_eq!(w.len(), 2);
        assert_eq!(w.repeats(), 19);
        // Repeats reported with long holds (up just before the next down) are repeats too.
        for i in 0..4 {
            w.apply(&c, up(1099 + i * 30, 14));
            assert_eq!(w.apply(&c, down(1100 + i * 30, 14)), Applied::Repeat);
        }
        // A real second press of the same key at human speed is a press.
        w.apply(&c, up(1200, 14));
        assert_eq!(w.apply(&c, down(1320, 14)), Applied::Press);
    }

    #[test]
    fn hammering_one_key_without_a_typematic_delay_stays_presses() {
        let c = cfg(50, 10, 30);
        let mut w = KeyWindow::default();
        for i in 0..40 {
            let applied = w.apply(&c, down(i * 45, 57));
            assert!(matches!(applied, Applied::Press | Applied::PressDue), "press {i}");
            w.apply(&c, up(i * 45 + 2, 57));
        }
        assert_eq!(w.repeats(), 0);
    }

    #[test]
    fn repeats_leave_the_window_with_their_press() {
        let c = cfg(3, 1, 3);
        let mut w = KeyWindow::default();
        w.apply(&c, down(0, 14));
        w.apply(&c, KeyEvent::new(500_000, 14, KeyAction::Repeat));
        w.apply(&c, KeyEvent::new(530_000, 14, KeyAction::Repeat));
        w.apply(&c, up(540, 14));
        assert_eq!(w.repeats(), 2);
        for i in 1..=3 {
            w.apply(&c, down(1000 * i, 20 + i as u32));
        }
        assert_eq!(w.repeats(), 0, "the held press was evicted");
    }

    #[test]
    fn software_bursts_are_not_presses() {
        let c = cfg(50, 10, 30);
        let mut w = KeyWindow::default();
        w.apply(&c, down(0, 106));
        for i in 1..20 {
            w.apply(&c, up(i * 2 - 1, 106));
            assert_eq!(w.apply(&c, down(i * 2, 106)), Applied::Repeat);
        }
    }

    #[test]
    fn held_modifiers_repeat_without_a_delay() {
        let c = cfg(50, 10, 30);
        let mut w = KeyWindow::default();
        assert_eq!(w.apply(&c, down(0, 29)), Applied::Press);
        for i in 1..10 {
            w.apply(&c, up(i * 30 - 1, 29));
            assert_eq!(w.apply(&c, down(i * 30, 29)), Applied::Repeat);
        }
    }

    #[test]
    fn marked_repeats_are_not_presses_even_without_inference() {
        let c = WindowConfig { infer_repeats: false, ..cfg(50, 10, 30) };
        let mut w = KeyWindow::default();
        w.apply(&c, down(0, 14));
        assert_eq!(w.apply(&c, KeyEvent::new(500_000, 14, KeyAction::Repeat)), Applied::Repeat);
        w.apply(&c, up(501, 14));
        assert_eq!(w.apply(&c, down(530, 14)), Applied::Press, "no inference when disabled");
    }

    #[test]
    fn reset_empties_the_window() {
        let c = cfg(50, 10, 3);
        let mut w = KeyWindow::default();
        for i in 0..5 {
            w.apply(&c, down(i * 100, 1 + i as u32));
        }
        w.reset();
        assert!(w.is_empty());
        assert_eq!(w.unscored_presses(), 0);
    }
}
