//! Key events as the core sees them, independent of wire format and file format.

use serde::{Deserialize, Serialize};

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAction {
    /// The key went down: a new press.
    Down,
    /// The key went up.
    Up,
    /// Auto-repeat while the key is held (evdev value 2); not a new press.
    Repeat,
}

impl KeyAction {
    /// The keylog CSV spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAction::Down => "down",
            KeyAction::Up => "up",
            KeyAction::Repeat => "repeat",
        }
    }
}

/// One key event of one user, in agent event time.
///
/// `key` is whatever identity the source provides: an evdev key code in files, a per-session
/// pseudonym in the stream. The core only compares keys for equality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEvent {
    /// Microseconds since the Unix epoch, agent clock.
    pub time_us: i64,
    /// Key identity (code or pseudonym).
    pub key: u32,
    /// Down, up or repeat.
    pub action: KeyAction,
}

impl KeyEvent {
    /// Shorthand constructor.
    pub fn new(time_us: i64, key: u32, action: KeyAction) -> Self {
        Self { time_us, key, action }
    }
}
