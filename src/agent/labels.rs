//! Key labels: the only form in which key identity leaves the agent.
//!
//! A stable per-session pseudonym (one code per key for the whole session) is a simple
//! substitution: a long session's text falls to frequency and digraph analysis. What the
//! detector reads from key identity is short-range: the same key again, how many presses back
//! it last occurred, a key-up matched to its key-down. So a label lives only as long as that:
//!
//! - a key-down reuses its key's label when the key was pressed within the last
//!   `lifetime` presses and the label is younger than `lifetime` presses, and always for the
//!   press right after the key's own (a key mashed or held by a script keeps one label);
//!   otherwise it gets a fresh random label;
//! - a key-up and an auto-repeat carry the label of the key-down they belong to.
//!
//! Labels are drawn from a cryptographic generator seeded by the operating system and are
//! unrelated to the key, to each other and to any earlier label: two labels of one key are as
//! unrelated as two labels of different keys. Within a label's life the stream shows a short
//! substitution (at most `lifetime` presses), which is below what frequency analysis needs: a
//! frequency-and-digraph attack knowing the text's own statistics recovers about as many
//! letters from these labels as from labels drawn fresh for every press (tests/agent.rs). What
//! the detector loses is key identity beyond `lifetime` presses (docs/agent.md, "Key labels").
//!
//! `lifetime` 0 keeps one label per key for the whole session, as the stable per-session
//! pseudonym did: a simple substitution that a long session's text falls to.

use std::collections::HashMap;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;

use metronome_core::event::{KeyAction, KeyEvent};

/// Every label has this bit set, and no evdev key code (at most 0x2ff) has: a label can never be
/// mistaken for a raw code, and a raw code in a record is a bug a test can see.
pub const LABEL_MARK: u32 = 0x8000_0000;

/// The short lifetime, presses, and the agent's default: short enough that frequency analysis
/// recovers hardly more than it would from fresh labels (tests/agent.rs), and the shortest the
/// agent accepts, since the detector's `keys_never_recur` rule reads recurrences within 16
/// presses (`detect::features::RECURRENCE_SPAN`).
pub const SHORT_LIFETIME: u32 = metronome_core::detect::features::RECURRENCE_SPAN as u32;

/// Keys remembered before the expired ones are forgotten (evdev has fewer than 0x300 codes).
const REMEMBERED_KEYS: usize = 1024;

/// One key's current label.
#[derive(Debug, Clone, Copy)]
struct KeyLabel {
    label: u32,
    /// Press number (from 1) at which the label was drawn, and of the key's latest press.
    born: u64,
    last_press: u64,
    /// Whether the key is down (its up and repeats carry this label).
    held: bool,
}

/// Replaces key codes by short-lived random labels for one session.
pub struct KeyLabeler {
    rng: ChaCha12Rng,
    lifetime: u32,
    presses: u64,
    keys: HashMap<u32, KeyLabel>,
}

impl KeyLabeler {
    /// A new session: a generator seeded from the operating system.
    pub fn new_session(lifetime: u32) -> Self {
        Self::with_rng(ChaCha12Rng::from_os_rng(), lifetime)
    }

    /// A labeler with a fixed seed: repeatable labels for measurements on recordings (never for
    /// an agent: a known seed makes its labels predictable).
    pub fn seeded(seed: u64, lifetime: u32) -> Self {
        Self::with_rng(ChaCha12Rng::seed_from_u64(seed), lifetime)
    }

    fn with_rng(rng: ChaCha12Rng, lifetime: u32) -> Self {
        Self { rng, lifetime, presses: 0, keys: HashMap::new() }
    }

    /// The label of this event of key `code`.
    pub fn label(&mut self, code: u32, action: KeyAction) -> u32 {
        match action {
            KeyAction::Down => self.press(code),
            KeyAction::Repeat => self.held_label(code, true),
            KeyAction::Up => self.held_label(code, false),
        }
    }

    /// `events` of one session with every key replaced by its label (measurements on
    /// recordings: the stream an agent would have sent of them).
    pub fn label_events(&mut self, events: &[KeyEvent]) -> Vec<KeyEvent> {
        events.iter().map(|e| KeyEvent { key: self.label(e.key, e.action), ..*e }).collect()
    }

    fn press(&mut self, code: u32) -> u32 {
        if self.keys.get(&code).is_some_and(|k| k.held) {
            // A second down without an up (a lost event): the same press as far as labels go.
            return self.keys[&code].label;
        }
        self.presses += 1;
        let n = self.presses;
        let keep = self.keys.get(&code).is_some_and(|k| self.lives_on(k, n));
        if !keep {
            self.forget_expired();
            let label = self.fresh();
            self.keys.insert(code, KeyLabel { label, born: n, last_press: n, held: true });
            return label;
        }
        let key = self.keys.get_mut(&code).expect("checked above");
        key.last_press = n;
        key.held = true;
        key.label
    }

    /// Whether `key`'s label carries over to press `n`.
    fn lives_on(&self, key: &KeyLabel, n: u64) -> bool {
        let lifetime = u64::from(self.lifetime);
        lifetime == 0 || n - key.last_press == 1 || (n - key.last_press <= lifetime && n - key.born < lifetime)
    }

    /// An up or a repeat: the label of the press it belongs to. One with no press seen (the key
    /// was down before capture began) gets the key's current label, or a fresh one.
    fn held_label(&mut self, code: u32, still_held: bool) -> u32 {
        if let Some(key) = self.keys.get_mut(&code) {
            key.held = still_held;
            return key.label;
        }
        self.fresh()
    }

    fn fresh(&mut self) -> u32 {
        self.rng.next_u32() | LABEL_MARK
    }

    fn forget_expired(&mut self) {
        if self.keys.len() < REMEMBERED_KEYS {
            return;
        }
        let (n, lifetime) = (self.presses, u64::from(self.lifetime.max(1)));
        self.keys.retain(|_, k| k.held || n - k.last_press <= lifetime);
    }
}

/// The generator's state must not leak through a debug print.
impl std::fmt::Debug for KeyLabeler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyLabeler {{ lifetime: {}, state: <hidden> }}", self.lifetime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use KeyAction::{Down, Repeat, Up};

    /// Labels of the downs of `codes` typed one after another (each released before the next).
    fn typed(labeler: &mut KeyLabeler, codes: &[u32]) -> Vec<u32> {
        codes
            .iter()
            .map(|&c| {
                let label = labeler.label(c, Down);
                assert_eq!(labeler.label(c, Up), label, "an up carries its down's label");
                label
            })
            .collect()
    }

    #[test]
    fn a_press_its_repeats_and_its_release_share_a_label() {
        let mut l = KeyLabeler::seeded(1, 16);
        let down = l.label(30, Down);
        let other = l.label(31, Down);
        assert_eq!(l.label(30, Repeat), down);
        assert_eq!(l.label(31, Up), other);
        assert_eq!(l.label(30, Up), down, "rollover: released after another key went down");
        assert_ne!(down, other);
    }

    #[test]
    fn a_key_pressed_again_within_the_lifetime_keeps_its_label() {
        let mut l = KeyLabeler::seeded(2, 16);
        // a b c a: "a" recurs three presses later.
        let labels = typed(&mut l, &[30, 48, 46, 30]);
        assert_eq!(labels[0], labels[3]);
        assert_ne!(labels[0], labels[1]);
    }

    #[test]
    fn a_key_unpressed_for_longer_than_the_lifetime_gets_a_fresh_label() {
        let mut l = KeyLabeler::seeded(3, 4);
        // "a", four other keys, "a": five presses back is beyond a lifetime of 4.
        let labels = typed(&mut l, &[30, 2, 3, 4, 5, 30]);
        assert_ne!(labels[0], labels[5]);
    }

    #[test]
    fn a_label_renews_after_its_lifetime_even_when_the_key_keeps_recurring() {
        let mut l = KeyLabeler::seeded(4, 8);
        // "a" every other press: reused while the label is younger than 8 presses.
        let codes: Vec<u32> = (0..20).map(|i| if i % 2 == 0 { 30 } else { 40 + i }).collect();
        let labels = typed(&mut l, &codes);
        let a: Vec<u32> = labels.iter().step_by(2).copied().collect();
        assert!(a[..4].iter().all(|&x| x == a[0]), "presses 1, 3, 5, 7 share the label born at 1");
        assert_ne!(a[4], a[0], "press 9 is 8 presses after the label was born");
        assert!(a[4..8].iter().all(|&x| x == a[4]));
    }

    #[test]
    fn a_key_pressed_over_and_over_keeps_one_label() {
        let mut l = KeyLabeler::seeded(5, 4);
        let labels = typed(&mut l, &[30; 50]);
        assert!(labels.iter().all(|&x| x == labels[0]), "the same key again is always visible");
    }

    #[test]
    fn lifetime_zero_is_one_label_per_key_for_the_session() {
        let mut l = KeyLabeler::seeded(6, 0);
        let codes: Vec<u32> = (0..500).map(|i| 2 + (i * 7) % 40).collect();
        let labels = typed(&mut l, &codes);
        let mut by_key = HashMap::new();
        for (c, x) in codes.iter().zip(&labels) {
            assert_eq!(*by_key.entry(*c).or_insert(*x), *x);
        }
    }

    #[test]
    fn labels_are_never_raw_codes_and_sessions_are_unrelated() {
        let codes: Vec<u32> = (0..=0x2ff).collect();
        let (mut a, mut b) = (KeyLabeler::new_session(16), KeyLabeler::new_session(16));
        let (la, lb) = (typed(&mut a, &codes), typed(&mut b, &codes));
        assert!(la.iter().all(|x| x & LABEL_MARK != 0));
        assert_eq!(la.iter().zip(&lb).filter(|(x, y)| x == y).count(), 0, "two sessions share no label");
        assert_eq!(format!("{a:?}"), "KeyLabeler { lifetime: 16, state: <hidden> }");
    }

    #[test]
    fn memory_stays_bounded_over_a_long_session() {
        let mut l = KeyLabeler::seeded(7, 16);
        for i in 0..100_000u32 {
            let code = i % 5000;
            l.label(code, Down);
            l.label(code, Up);
        }
        assert!(l.keys.len() <= REMEMBERED_KEYS, "{} keys remembered", l.keys.len());
    }
}
