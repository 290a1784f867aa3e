//! Key pseudonyms: the only form in which key identity leaves the agent.
//!
//! A pseudonym is a keyed hash (HMAC-SHA256) of the key code under a secret drawn from a
//! cryptographic generator when the agent session starts. The secret lives in this process
//! only: it is never logged, written or sent. Within a session the same key always gets the same
//! pseudonym, so repetition (key loops, rollover, auto-repeat) stays visible to the detector;
//! across sessions pseudonyms are unrelated, and without the secret no pseudonym can be mapped
//! back to a key, so typed text cannot be recovered from the stream.

use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Every pseudonym has this bit set, and no evdev key code (at most 0x2ff) has: a pseudonym can
/// never be mistaken for a raw code, and a raw code in a record is a bug a test can see.
pub const PSEUDONYM_MARK: u32 = 0x8000_0000;

/// Domain separation: a pseudonym is a hash of this label and the code, nothing else.
const LABEL: &[u8] = b"metronome.key-pseudonym.v1";

/// Maps key codes to pseudonyms under one session's secret.
pub struct KeyPseudonymizer {
    mac: Hmac<Sha256>,
}

impl KeyPseudonymizer {
    /// A new session: a fresh 256-bit secret.
    pub fn new_session() -> Self {
        let mut secret = [0u8; 32];
        // The thread generator is a CSPRNG (ChaCha12) seeded from the operating system.
        rand::rng().fill_bytes(&mut secret);
        let pseudonymizer = Self::with_secret(&secret);
        secret.fill(0);
        pseudonymizer
    }

    /// A pseudonymizer under a given secret (tests, and nothing else: a fixed secret makes
    /// pseudonyms linkable across sessions).
    pub fn with_secret(secret: &[u8]) -> Self {
        let mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        Self { mac }
    }

    /// The pseudonym of `code`.
    pub fn pseudonym(&self, code: u16) -> u32 {
        let mut mac = self.mac.clone();
        mac.update(LABEL);
        mac.update(&code.to_be_bytes());
        let digest = mac.finalize().into_bytes();
        u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) | PSEUDONYM_MARK
    }
}

/// The secret must not leak through a debug print.
impl std::fmt::Debug for KeyPseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyPseudonymizer { secret: <hidden> }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn stable_within_a_session_and_distinct_per_key() {
        let p = KeyPseudonymizer::new_session();
        let all: Vec<u32> = (0..=0x2ffu16).map(|c| p.pseudonym(c)).collect();
        assert_eq!(all, (0..=0x2ffu16).map(|c| p.pseudonym(c)).collect::<Vec<_>>());
        let distinct: HashSet<u32> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len(), "every evdev key keeps its own identity");
    }

    #[test]
    fn unrelated_across_sessions() {
        let (a, b) = (KeyPseudonymizer::new_session(), KeyPseudonymizer::new_session());
        let same = (0..=0x2ffu16).filter(|&c| a.pseudonym(c) == b.pseudonym(c)).count();
        assert_eq!(same, 0, "two sessions share no pseudonym");
    }

    #[test]
    fn never_a_raw_key_code() {
        let p = KeyPseudonymizer::new_session();
        for code in 0..=0x2ffu16 {
            let pseudonym = p.pseudonym(code);
            assert!(pseudonym & PSEUDONYM_MARK != 0);
            assert_ne!(pseudonym, u32::from(code));
        }
    }

    #[test]
    fn a_known_secret_gives_known_pseudonyms() {
        // The documented construction, computed independently (Python's hmac):
        // HMAC-SHA256(secret, label || code as u16 big-endian), first 4 bytes big-endian, top bit set.
        let p = KeyPseudonymizer::with_secret(&[7u8; 32]);
        assert_eq!(p.pseudonym(30), 0xefa5_cead);
        assert_ne!(p.pseudonym(30), KeyPseudonymizer::with_secret(&[8u8; 32]).pseudonym(30));
        assert_eq!(format!("{p:?}"), "KeyPseudonymizer { secret: <hidden> }");
    }
}
