//! Metronome's pure core: what every other layer shares, with no I/O runtime in it (no tokio,
//! rdkafka, RocksDB or PostgreSQL; `tests/layers.rs` in the workspace root checks the graph).
//!
//! ```text
//!  keylog CSV / evdev capture / wire records
//!          |                         ^
//!          v                         |  wire: KeyEventBatch in (validated, signatures
//!  event::KeyEvent --> intake ------>|        checked), alerts, dead letters,
//!          |     (dedup by seq,      |        changelog and fleet records out
//!          |      event budget)      |
//!          v                         |
//!  detect: ordering -> window -> histogram/features -> rules -+-> policy -> AlertReport
//!          press -> per-press scorer (seam) ------------------+   sequence scorer (seam)
//! ```
//!
//! The LSTM behind the detector's scorer seams is `metronome-model`; the state stores are
//! `metronome-state`; the services that move records (processor, sink, agent, archive, HTTP)
//! are the `metronome` crate.
//!
//! # Layout
//! - [`event`]: key events as the core sees them.
//! - [`proto`]: the Protobuf wire format (`proto/`), generated at build time.
//! - [`wire`]: what goes in and out of a task as plain data: input validation, dead letters,
//!   alert, changelog and fleet records.
//! - [`alert_json`]: alerts as JSON, with the Protobuf message's field names.
//! - [`clock`]: the clock as a seam (system time, or a manual clock in tests).
//! - [`signing`]: per-device record signatures (HMAC-SHA256): the agent signs, the task checks.
//! - [`timebound`]: bounds on event times against a clock the player does not own.
//! - [`intake`]: deduplication by the agent's sequence numbers and the per-user event budget.
//! - [`cutting`]: how key events are cut into records (agent, simulator, publish).
//! - [`keylog`]: the keylog CSV interchange format (reader and writer, plain or gzip).
//! - [`detect`]: detection: ordering, windows, histogram, features, rules, alert policy.
//! - [`follow`]: a value loaded from a file and reloaded when the file changes.
//! - [`macrogen`]: synthetic macro traffic, the positive class nobody publishes.
//! - [`humanmodel`]: a parametric model of human typing, when no recording is at hand.

pub mod alert_json;
pub mod clock;
pub mod cutting;
pub mod detect;
pub mod event;
pub mod follow;
pub mod humanmodel;
pub mod intake;
pub mod keylog;
pub mod macrogen;
pub mod proto;
pub mod signing;
pub mod timebound;
pub mod wire;
