//! `[postgres]`: where alerts are written and how the sink behaves.

use serde::{Deserialize, Serialize};

/// Settings of the PostgreSQL sink and of the alert API that reads what it wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database?sslmode=...` (libpq's sslmode values).
    pub url: String,
    /// Whether `metronome process` runs the sink beside the processor.
    pub sink_in_process: bool,
    /// Most alert records per database transaction.
    pub batch_max_records: usize,
    /// Longest wait for more records once one is in hand, milliseconds.
    pub batch_linger_ms: u64,
    /// First retry delay after a failure, milliseconds (doubling, with jitter).
    pub retry_min_ms: u64,
    /// Longest retry delay, milliseconds.
    pub retry_max_ms: u64,
    /// How often the lag gauge is refreshed, milliseconds.
    pub lag_interval_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgresql://metronome@localhost:5432/metronome?sslmode=prefer".to_owned(),
            sink_in_process: true,
            batch_max_records: 500,
            batch_linger_ms: 50,
            retry_min_ms: 200,
            retry_max_ms: 30_000,
            lag_interval_ms: 1_000,
        }
    }
}

impl PostgresConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_max_records == 0 {
            return Err("postgres.batch_max_records must be at least 1".into());
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            return Err("postgres.retry_min_ms must be at least 1 and at most retry_max_ms".into());
        }
        metronome_io::postgres::PgTarget::parse(&self.url).map(|_| ()).map_err(|e| e.to_string())
    }
}
