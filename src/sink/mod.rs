//! The PostgreSQL sink: alerts from the alert topic into PostgreSQL exactly once.
//!
//! ```text
//!  [keys.alerts] --group consumer (read_committed; starts where sink_offsets says)-->
//!      batch --one PostgreSQL transaction--> alerts (+ sink_dead_letters) + sink_offsets
//!            --then--> Kafka offset commit (for lag tools only)
//! ```
//!
//! A crash before the database commit loses the transaction and the records are read again
//! from the stored offsets; a crash after it finds them stored and skips them. PostgreSQL being
//! down is waited out with exponential backoff, fetching paused, the lag gauge growing.
//!
//! # Layout
//! - `config`: `[postgres]` settings.
//! - `service`: the loop ([`Sink`]): collect a batch, write it, retry, hand the offsets on.
//! - `seams`: what the loop writes to ([`AlertStore`]) and reads from ([`AlertSource`]).
//! - `postgres`: [`PgAlertStore`], the store in PostgreSQL (connect, migrate, reconnect).
//! - `kafka`: [`KafkaAlertSource`], the alert topic's consumer group and the lag gauge.
//! - [`store`]: the SQL: a batch and its offsets in one transaction, offsets, alert queries.
//! - `twin` (tests only): in-memory twins of both seams.
//!
//! The connection (URL, `sslmode`, TLS) and the migrations are `metronome_io::postgres`'s.

pub(crate) mod config;
pub(crate) mod kafka;
pub(crate) mod postgres;
pub(crate) mod seams;
pub(crate) mod service;
pub mod store;
#[cfg(test)]
mod twin;

pub use config::PostgresConfig;
pub use kafka::KafkaAlertSource;
pub use postgres::PgAlertStore;
pub use seams::{AlertSource, AlertStore, Offsets, StoreFailure};
pub use service::{PostgresSink, Sink, SinkError, SinkSummary};
