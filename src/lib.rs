//! Metronome: catches users whose keyboards are driven by macros, seconds after the macro starts.
//!
//! ```text
//!  agent (evdev) --KeyEventBatch--> [keys.events] --> stream: task per partition
//!                                                      | per-user state in RocksDB
//!                                                      | detect: window -> features -> rules
//!                                                      |         -> LSTM -> policy
//!                                                      |         press -> per-press LSTM -> CUSUM
//!                                                      +--> [keys.alerts]   (one transaction
//!                                                      +--> [keys.dlq]       per task per batch
//!                                                      +--> [<app>-user-state-changelog] + offsets)
//!                                                      +--> [<app>-fleet-fingerprints-repartition]
//!  fleet stages: users per fingerprint --> [<app>-fleet-candidates-repartition]
//!                --> links and fleets --> [keys.alerts] (`fleet` alerts naming every account)
//!  [keys.alerts] --> sink: one PostgreSQL transaction per batch (alerts + offsets) --> alerts
//!  keylog CSV --> `metronome score` ----------- the same detect core ----> JSON lines
//!  [keys.events] --> `metronome archive` (nightly) --> object store: files + manifest
//!                                                  --> PostgreSQL archive_runs
//!  archived day --> `metronome score --archive` -- the same detect core --> JSON lines
//! ```
//!
//! # Layout
//! - [`archive`]: `metronome archive`, the nightly archive of the raw topic to an object store,
//!   its retention and `archive_runs` record, and the backtest of an archived day.
//! - [`agent`]: `metronome agent`, capture (evdev or a replayed keylog), key pseudonyms, the
//!   bounded spool and the idempotent producer.
//! - [`cutting`]: how key events are cut into records (agent, simulator, publish).
//! - [`event`]: key events as the core sees them.
//! - [`detect`]: the pure detection core (no I/O): ordering, windows, histogram, features,
//!   rules, alert policy. Both the offline scorer and the stream processor drive it.
//! - [`keylog`]: the keylog CSV interchange format (reader and writer, plain or gzip).
//! - [`humanmodel`]: a parametric model of human typing, when no recording is at hand.
//! - [`macrogen`]: synthetic macro traffic, the positive class nobody publishes.
//! - [`config`]: embedded defaults, overridden by a file and `METRONOME_*` variables.
//! - [`score`]: offline scoring of a keylog file, JSON lines out.
//! - [`simulate`]: replayed humans plus macro users, with ground truth.
//! - [`proto`]: the Protobuf wire format (`proto/`).
//! - [`lstm`]: the LSTM window scorer (tract-onnx), its manifest and hot reload; `lstm::stream`
//!   the per-press model with its carried state.
//! - [`stream`]: `metronome process`, the Kafka processor: tasks, RocksDB state, changelogs,
//!   exactly-once transactions, dead letters.
//! - [`sink`]: the PostgreSQL sink of the alert topic, exactly once (`metronome sink-postgres`,
//!   and inside `metronome process`).
//! - [`metrics`]: the Prometheus registry and the typed events that feed it.
//! - [`demo`]: `metronome demo`, the whole pipeline on an embedded cluster with simulated users.
//! - [`service`]: a processor with its HTTP server and sink, as `process` and `demo` run it.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` and the alert API (warp).

pub mod agent;
pub mod archive;
pub mod config;
pub mod cutting;
pub mod dataset;
pub mod demo;
pub mod detect;
pub mod event;
pub mod http;
pub mod humanmodel;
pub mod keylog;
pub mod lstm;
pub mod macrogen;
pub mod metrics;
pub mod proto;
pub mod score;
pub mod service;
pub mod simulate;
pub mod sink;
pub mod stream;
