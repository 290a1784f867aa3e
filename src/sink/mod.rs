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
//! - [`config`]: `[postgres]` settings.
//! - [`store`]: the SQL: a batch and its offsets in one transaction, offsets, alert queries.
//! - [`service`]: the loop: consume, batch, write, retry, report lag.
//!
//! The connection (URL, `sslmode`, TLS) and the migrations are `metronome_io::postgres`'s.

pub mod config;
pub mod service;
pub mod store;

pub use config::PostgresConfig;
pub use service::{Faults, PostgresSink, SinkError, SinkSummary};
