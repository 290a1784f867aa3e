//! `metronome sink-postgres`: the PostgreSQL sink alone, with `/metrics`, `/healthz` and
//! `/api/alerts`.

use metronome::config::{Config, Overrides};
use metronome::service::{service_runtime, shutdown_on_signal, Service};

use super::AppError;

/// `metronome sink-postgres`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kafka bootstrap servers (else from the configuration).
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// PostgreSQL URL (else `postgres.url`).
    #[arg(long)]
    postgres_url: Option<String>,
}

impl Args {
    /// The configuration keys these flags stand for.
    pub fn overrides(&self) -> Overrides {
        super::bootstrap(&self.bootstrap_servers).set("postgres", "url", self.postgres_url.as_ref())
    }

    /// Runs the sink until SIGTERM or Ctrl-C.
    pub fn run(self, config: Config) -> Result<(), AppError> {
        let runtime = service_runtime()?;
        let ran =
            runtime.block_on(async move { Service::sink_alone(config).run(shutdown_on_signal(), |_| {}).await })?;
        let summary = ran.sink.unwrap_or_default();
        eprintln!(
            "metronome: postgres sink wrote {} alerts in {} transactions ({} duplicates refused, {} dead letters, {} retries)",
            summary.writes.written, summary.batches, summary.writes.duplicates, summary.writes.dead_letters, summary.retries
        );
        Ok(())
    }
}
