//! Signed records: each agent signs its `KeyEventBatch` with a key provisioned for it at
//! enrolment, and the processor checks who signed what.
//!
//! A key is a secret shared by one agent and the processor (HMAC-SHA256), bound to one user id
//! and optionally one device id. The agent puts the key's id in `KeyEventBatch.key_id` and the
//! MAC of the batch, encoded with `signature` empty, in `signature`. The processor re-encodes
//! the batch it decoded the same way (prost's encoding is deterministic for known fields) and
//! compares in constant time. What it refuses, to the dead-letter topic with the class:
//! - `unsigned`: no signature while `stream.require_signed = true` (without it, unsigned
//!   records pass and signed ones are still checked);
//! - `unknown_key`: a key id the processor was not given;
//! - `bad_signature`: a MAC that does not match (a changed byte, a field added);
//! - `signed_for_another_user`: a valid MAC from a key bound to another user or device: a
//!   player's own enrolment cannot speak for someone else.
//!
//! Keys live in a TOML file (`stream.device_keys_file`), read at start-up:
//!
//! ```toml
//! [[key]]
//! key_id = "alice-laptop-2026-12"
//! user_id = "alice"
//! device_id = ""          # optional: when set, only batches from this device
//! secret_hex = "5f0c…"    # 32 random bytes: openssl rand -hex 32
//! ```
//!
//! The processor checks the file for changes as often as it checks for a new model
//! (`model.reload_check_s`, [`ReloadingKeys`]): a file that does not load leaves the keys in
//! use as they are. Rotation: add the new key beside the old one, give the agent the new key
//! (`agent.signing_key_file`), and remove the old one once its agent has drained its spool; no
//! restart.
//!
//! # Layout
//! - [`SigningKey`]: the agent's key and [`SigningKey::sign`].
//! - [`DeviceKeys`]: the processor's keys and [`DeviceKeys::check`].
//! - [`ReloadingKeys`]: those keys, following their file.
//! - [`Refusal`]: why a batch is refused.

use std::collections::HashMap;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::Figment;
use hmac::{Hmac, KeyInit, Mac};
use prost::Message;
use serde::Deserialize;
use sha2::Sha256;

use crate::follow::Followed;
use crate::proto;

/// Put in front of the signed bytes, so a MAC over a batch is never one over anything else.
const DOMAIN: &[u8] = b"metronome.v1.KeyEventBatch\0";
/// Shortest secret accepted, bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file is missing or not the expected TOML (the message never quotes a secret).
    #[error("key file {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, in one line.
        reason: String,
    },
}

fn invalid(path: &Path, reason: impl Into<String>) -> KeyFileError {
    KeyFileError::Invalid { path: path.display().to_string(), reason: reason.into() }
}

/// Why a batch is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No signature, and signatures are required.
    Unsigned,
    /// Signed with a key id nobody gave the processor.
    UnknownKey,
    /// The MAC does not match the batch.
    BadSignature,
    /// A valid MAC from a key bound to another user or device.
    SignedForAnotherUser,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key_id: String,
    user_id: String,
    #[serde(default)]
    device_id: String,
    secret_hex: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

fn secret(path: &Path, key_id: &str, hex_secret: &str) -> Result<Vec<u8>, KeyFileError> {
    let secret =
        hex::decode(hex_secret.trim()).map_err(|_| invalid(path, format!("key {key_id:?}: secret_hex is not hex")))?;
    if secret.len() < MIN_SECRET_LEN {
        return Err(invalid(path, format!("key {key_id:?}: the secret has fewer than {MIN_SECRET_LEN} bytes")));
    }
    Ok(secret)
}

fn mac_of(secret: &[u8], batch: &proto::KeyEventBatch) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(DOMAIN);
    mac.update(&batch.encode_to_vec());
    mac
}

/// The agent's key.
pub struct SigningKey {
    key_id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A key from its id and secret.
    pub fn new(key_id: &str, secret: &[u8]) -> Self {
        Self { key_id: key_id.to_owned(), secret: secret.to_vec() }
    }

    /// Reads a file of one `key_id = "…"` and `secret_hex = "…"` (what enrolment hands the agent).
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct AgentKey {
            key_id: String,
            secret_hex: String,
        }
        if !path.is_file() {
            return Err(invalid(path, "not found"));
        }
        let key: AgentKey =
            Figment::from(Toml::file(path)).extract().map_err(|_| invalid(path, "expected key_id and secret_hex"))?;
        let secret = secret(path, &key.key_id, &key.secret_hex)?;
        Ok(Self { key_id: key.key_id, secret })
    }

    /// Signs `batch` in place: its key id, then the MAC of the rest.
    pub fn sign(&self, batch: &mut proto::KeyEventBatch) {
        batch.key_id.clone_from(&self.key_id);
        batch.signature.clear();
        batch.signature = mac_of(&self.secret, batch).finalize().into_bytes().to_vec();
    }
}

fn read_key_file(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    if !path.is_file() {
        return Err(invalid(path, "not found"));
    }
    std::fs::read(path).map_err(|e| invalid(path, format!("cannot be read: {}", e.kind())))
}

struct DeviceKey {
    user_id: String,
    device_id: String,
    secret: Vec<u8>,
}

/// The keys the processor checks signatures with.
#[derive(Default)]
pub struct DeviceKeys {
    by_id: HashMap<String, DeviceKey>,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeys").field("keys", &self.by_id.len()).finish()
    }
}

impl DeviceKeys {
    /// Reads `stream.device_keys_file`.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        Self::from_bytes(path, &read_key_file(path)?)
    }

    /// Parses the contents of a key file read from `path` (named in errors only).
    fn from_bytes(path: &Path, text: &[u8]) -> Result<Self, KeyFileError> {
        let text = std::str::from_utf8(text).map_err(|_| invalid(path, "not UTF-8 text"))?;
        let file: KeysFile = Figment::from(Toml::string(text)).extract().map_err(|e| {
            // figment's message names the field, never its value.
            invalid(path, e.to_string().lines().next().unwrap_or("not a key file").to_owned())
        })?;
        let mut keys = Self::default();
        for entry in file.key {
            if entry.key_id.is_empty() || entry.user_id.is_empty() {
                return Err(invalid(path, "every key needs key_id and user_id"));
            }
            let secret = secret(path, &entry.key_id, &entry.secret_hex)?;
            let key = DeviceKey { user_id: entry.user_id, device_id: entry.device_id, secret };
            if keys.by_id.insert(entry.key_id.clone(), key).is_some() {
                return Err(invalid(path, format!("key {:?} is given twice", entry.key_id)));
            }
        }
        Ok(keys)
    }

    /// Adds a key (tests, tools).
    pub fn insert(&mut self, key_id: &str, user_id: &str, device_id: &str, secret: &[u8]) {
        let key = DeviceKey { user_id: user_id.to_owned(), device_id: device_id.to_owned(), secret: secret.to_vec() };
        self.by_id.insert(key_id.to_owned(), key);
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Checks `batch`'s signature (`required`: refuse unsigned ones). The batch is left as it
    /// came.
    pub fn check(&self, batch: &mut proto::KeyEventBatch, required: bool) -> Result<(), Refusal> {
        if batch.key_id.is_empty() && batch.signature.is_empty() {
            return if required { Err(Refusal::Unsigned) } else { Ok(()) };
        }
        let key = self.by_id.get(&batch.key_id).ok_or(Refusal::UnknownKey)?;
        let signature = std::mem::take(&mut batch.signature);
        let verdict = mac_of(&key.secret, batch).verify_slice(&signature);
        batch.signature = signature;
        verdict.map_err(|_| Refusal::BadSignature)?;
        if key.user_id != batch.user_id || (!key.device_id.is_empty() && key.device_id != batch.device_id) {
            return Err(Refusal::SignedForAnotherUser);
        }
        Ok(())
    }
}

/// The processor's keys, following their file ([`crate::follow`]): a rotation (a key added,
/// an old one removed) is picked up at the next check without a restart, as a Kubernetes Secret
/// mounted as a directory is updated in place.
#[derive(Debug)]
pub struct ReloadingKeys(Followed<DeviceKeys, KeyFileError>);

/// What a key file check did.
#[derive(Debug, PartialEq, Eq)]
pub enum KeysReload {
    /// The file has not changed.
    Unchanged,
    /// The file changed and its keys replaced the previous ones (how many are held now).
    Loaded(usize),
}

impl ReloadingKeys {
    /// Loads the key file at `path`.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        Followed::load(path, read_key_file, DeviceKeys::from_bytes).map(Self)
    }

    /// The keys checked with now.
    pub fn current(&self) -> &DeviceKeys {
        self.0.current()
    }

    /// Loads the file again if it changed since the last load. On error the previous keys stay
    /// (a half-written or broken file never empties the key set) and the next check tries again.
    pub fn reload_if_changed(&mut self) -> Result<KeysReload, KeyFileError> {
        Ok(match self.0.reload_if_changed()? {
            None => KeysReload::Unchanged,
            Some(_) => KeysReload::Loaded(self.0.current().len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn batch(user: &str) -> proto::KeyEventBatch {
        crate::wire::batch_message(
            user,
            "kbd-1",
            "s1",
            &[crate::event::KeyEvent::new(1_700_000_000_000_000, 30, crate::event::KeyAction::Down)],
            Some(1),
        )
    }

    fn keys() -> DeviceKeys {
        let mut keys = DeviceKeys::default();
        keys.insert("alice-1", "alice", "", SECRET);
        keys.insert("bob-1", "bob", "kbd-9", b"fedcba9876543210fedcba9876543210");
        keys
    }

    #[test]
    fn a_signed_batch_passes_and_survives_the_wire() {
        let mut b = batch("alice");
        SigningKey::new("alice-1", SECRET).sign(&mut b);
        let mut decoded = proto::KeyEventBatch::decode(b.encode_to_vec().as_slice()).unwrap();
        assert_eq!(keys().check(&mut decoded, true), Ok(()));
        assert_eq!(decoded, b, "the batch is left as it came");
    }

    #[test]
    fn every_forgery_is_refused_with_its_class() {
        let keys = keys();
        let signer = SigningKey::new("alice-1", SECRET);
        // Unsigned: refused only when signatures are required.
        assert_eq!(keys.check(&mut batch("alice"), true), Err(Refusal::Unsigned));
        assert_eq!(keys.check(&mut batch("alice"), false), Ok(()));
        // A changed event after signing.
        let mut tampered = batch("alice");
        signer.sign(&mut tampered);
        tampered.events[0].event_time_us += 1;
        assert_eq!(keys.check(&mut tampered, false), Err(Refusal::BadSignature));
        // A key id nobody enrolled, and a signature without one.
        let mut unknown = batch("alice");
        SigningKey::new("mallory-1", SECRET).sign(&mut unknown);
        assert_eq!(keys.check(&mut unknown, false), Err(Refusal::UnknownKey));
        let mut stripped = batch("alice");
        signer.sign(&mut stripped);
        stripped.key_id.clear();
        assert_eq!(keys.check(&mut stripped, false), Err(Refusal::UnknownKey));
        // Alice's valid key, signing a batch of Bob's.
        let mut for_bob = batch("bob");
        signer.sign(&mut for_bob);
        assert_eq!(keys.check(&mut for_bob, true), Err(Refusal::SignedForAnotherUser));
        // Bob's key bound to his device, used from another.
        let mut other_device = batch("bob");
        SigningKey::new("bob-1", b"fedcba9876543210fedcba9876543210").sign(&mut other_device);
        assert_eq!(keys.check(&mut other_device, true), Err(Refusal::SignedForAnotherUser));
    }

    #[test]
    fn key_files_load_and_bad_ones_are_refused_without_their_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let secret = hex::encode(SECRET);
        std::fs::write(
            &path,
            format!("[[key]]\nkey_id = \"a\"\nuser_id = \"alice\"\nsecret_hex = \"{secret}\"\n\n[[key]]\nkey_id = \"b\"\nuser_id = \"bob\"\ndevice_id = \"kbd-9\"\nsecret_hex = \"{secret}\"\n"),
        )
        .unwrap();
        assert_eq!(DeviceKeys::load(&path).unwrap().len(), 2);
        for bad in [
            "[[key]]\nkey_id = \"a\"\nuser_id = \"alice\"\nsecret_hex = \"00ff\"\n".to_owned(),
            "[[key]]\nkey_id = \"a\"\nuser_id = \"alice\"\nsecret_hex = \"not hex, a password\"\n".to_owned(),
            format!("[[key]]\nkey_id = \"a\"\nuser_id = \"alice\"\nsecret_hex = \"{secret}\"\n[[key]]\nkey_id = \"a\"\nuser_id = \"x\"\nsecret_hex = \"{secret}\"\n"),
            format!("[[key]]\nkey_id = \"a\"\nsecret_hex = \"{secret}\"\n"),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let message = DeviceKeys::load(&path).unwrap_err().to_string();
            assert!(!message.contains("a password") && !message.contains(&secret), "{message}");
            assert_eq!(message.lines().count(), 1, "{message}");
        }
        assert!(DeviceKeys::load(&dir.path().join("missing.toml")).is_err());
        let agent = dir.path().join("agent.toml");
        std::fs::write(&agent, format!("key_id = \"a\"\nsecret_hex = \"{secret}\"\n")).unwrap();
        let key = SigningKey::load(&agent).unwrap();
        assert!(!format!("{key:?}").contains(&secret), "Debug shows no secret");
    }

    #[test]
    fn a_rotated_key_file_is_followed_and_a_broken_one_keeps_the_keys_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let entry = |id: &str, user: &str| {
            format!("[[key]]\nkey_id = \"{id}\"\nuser_id = \"{user}\"\nsecret_hex = \"{}\"\n", hex::encode(SECRET))
        };
        std::fs::write(&path, entry("alice-1", "alice")).unwrap();
        let mut keys = ReloadingKeys::load(&path).unwrap();
        let signed = |key_id: &str| {
            let mut b = batch("alice");
            SigningKey::new(key_id, SECRET).sign(&mut b);
            b
        };
        assert_eq!(keys.reload_if_changed().unwrap(), KeysReload::Unchanged);
        assert_eq!(keys.current().check(&mut signed("alice-2"), true), Err(Refusal::UnknownKey));
        // Rotation, step 1: the new key beside the old.
        std::fs::write(&path, entry("alice-1", "alice") + &entry("alice-2", "alice")).unwrap();
        assert_eq!(keys.reload_if_changed().unwrap(), KeysReload::Loaded(2));
        assert_eq!(keys.current().check(&mut signed("alice-2"), true), Ok(()));
        assert_eq!(keys.current().check(&mut signed("alice-1"), true), Ok(()));
        // A broken file (half written, a bad secret) is refused; the keys in use stay.
        std::fs::write(&path, "[[key]]\nkey_id = \"alice-3\"\n").unwrap();
        assert!(keys.reload_if_changed().is_err());
        std::fs::remove_file(&path).unwrap();
        assert!(keys.reload_if_changed().is_err());
        assert_eq!(keys.current().check(&mut signed("alice-2"), true), Ok(()));
        // Step 2: the old key removed.
        std::fs::write(&path, entry("alice-2", "alice")).unwrap();
        assert_eq!(keys.reload_if_changed().unwrap(), KeysReload::Loaded(1));
        assert_eq!(keys.current().check(&mut signed("alice-1"), true), Err(Refusal::UnknownKey));
        assert_eq!(keys.current().check(&mut signed("alice-2"), true), Ok(()));
    }
}
