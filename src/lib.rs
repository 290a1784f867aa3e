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
//! # Crates
//! The workspace's dependency arrows point one way (`tests/layers.rs` checks them):
//!
//! ```text
//!  metronome-core  (crates/core)   events, wire format, signatures, intake, cutting, keylog,
//!        ^                         detection and policy; no tokio, rdkafka, RocksDB, PostgreSQL
//!        |--- metronome-model (crates/model)  the LSTM scorers (tract-onnx) behind core's seams
//!        |--- metronome-state (state)         the store traits and backends (RocksDB, memory)
//!        |
//!  metronome (this crate)          the services that move records, the tools, the binary
//! ```
//!
//! # Layout
//! - [`stream`]: `metronome process`, the Kafka processor: tasks, RocksDB state, changelogs,
//!   exactly-once transactions, dead letters, the fleet stages.
//! - [`sink`]: the PostgreSQL sink of the alert topic, exactly once (`metronome sink-postgres`,
//!   and inside `metronome process`).
//! - [`agent`]: `metronome agent`, capture (evdev or a replayed keylog), key labels, the
//!   bounded spool and the idempotent producer.
//! - [`archive`]: `metronome archive`, the nightly archive of the raw topic to an object store,
//!   its retention and `archive_runs` record, and the backtest of an archived day.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` and the alert API (warp).
//! - [`service`]: a processor with its HTTP server and sink, as `process` and `demo` run it.
//! - [`metrics`]: the Prometheus registry and the typed events that feed it.
//! - [`config`]: embedded defaults, overridden by a file and `METRONOME_*` variables.
//! - [`score`]: offline scoring of a keylog file, JSON lines out.
//! - [`simulate`]: replayed humans plus macro users, with ground truth.
//! - [`dataset`]: the human typing corpus, split by user for training, validation and test.
//! - [`demo`]: `metronome demo`, the whole pipeline on an embedded cluster with simulated users.

// Module docs link the private modules beside them (their Layouts): the crate's own readers
// build the docs with `--document-private-items`, where every such link resolves.
#![allow(rustdoc::private_intra_doc_links)]

pub mod agent;
pub mod archive;
pub mod config;
pub mod dataset;
pub mod demo;
pub mod http;
pub mod metrics;
pub mod score;
pub mod service;
pub mod simulate;
pub mod sink;
pub mod stream;
