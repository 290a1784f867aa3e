//! `metronome process`: the Kafka Streams-style processor.
//!
//! ```text
//!  [keys.events] p0..pN --group consumer (cooperative-sticky, read_committed)--+
//!                                                                              |
//!      per partition: Task { RocksDB store, checkpoint, open users }  <--------+
//!        records -> decode/validate --bad--> dead letter ----------------+
//!                -> event times bounded against the broker's append time
//!                -> detect::Detector (+ LSTM) -> alerts -----------------+  one Kafka transaction
//!                -> changed user states -> changelog (same partition) ---+  per task per batch,
//!                -> input position --------------------------------------+  with the offsets
//!        after commit: one RocksDB write batch (states + checkpoint)
//! ```
//!
//! # Layout
//! The pure parts a task applies to records (`metronome_core::wire`, `timebound`, `intake`,
//! `signing`) live in the core crate; this module holds what talks to Kafka and the store.
//!
//! - [`alerts`]: following the alert topic (committed alerts as JSON).
//! - [`config`]: `[stream]` settings and the `[kafka]` passthrough.
//! - [`task`]: one partition's state and its exactly-once batch cycle, over the
//!   [`task::TaskProducer`] seam (an in-memory twin tests it).
//! - [`kafka`]: rdkafka clients: consumer, transactional producers, topic set-up, the changelog
//!   as a restore reads it.
//! - [`open_windows`]: pure index of a task's open windows: idle ones, and whom to close first
//!   over the cap.
//! - [`seams`]: what the loop reads and opens ([`seams::Input`], [`seams::TaskFactory`]).
//! - [`engine`]: the loop over those seams: batch collection, the tasks' batches on threads,
//!   outcomes (commit counted, or abort and rewind), rebalances, housekeeping; one round at a
//!   time in the unit tests, over an in-memory broker twin.
//! - [`processor`]: the Kafka and RocksDB sides of the seams wired to the engine; shutdown.
//! - [`publish`]: a keylog into the input topic, as agents would send it.
//! - [`status`]: task phases for readiness.
//! - [`query`]: interactive user queries, answered by the loop from the owning task.
//! - [`directory`]: which instance owns which partition, announced on a compacted topic.
//! - [`recovery`]: a task's store made consistent with the committed position: the pure plan
//!   (replay, or rebuild when the store is ahead or its changelog was truncated or recreated)
//!   and the restore over a store factory and a changelog source.
//! - [`fleet`]: the fleet stages' tasks (users per fingerprint; links and fleets).
//! - [`stages`]: the fleet stages' loop, beside the processor in `metronome process`.
//!
//! # Consistency
//! A task's store is written only after its transaction commits, in one atomic batch with a
//! [`task::Checkpoint`]. On assignment the task's producer is initialised first (fencing any
//! earlier owner and aborting its open transaction), then the changelog is replayed from the
//! checkpoint to its committed end. A store that claims more input than the group committed is
//! deleted and rebuilt. So after any exit, clean or not, the store equals the committed changelog.

pub mod alerts;
pub mod config;
pub(crate) mod directory;
pub(crate) mod engine;
pub(crate) mod fleet;
pub mod kafka;
pub(crate) mod open_windows;
pub mod processor;
pub mod publish;
pub mod query;
pub(crate) mod recovery;
pub(crate) mod seams;
pub(crate) mod stages;
pub mod status;
pub mod task;
#[cfg(test)]
pub(crate) mod twin;

pub use config::StreamConfig;
pub use processor::{ProcessError, Processor, RunSummary};
