//! `metronome archive`: one day of the raw input topic into the object store.

use metronome::archive::{self, format::Day};
use metronome::config::{Config, Overrides};
use metronome::service::service_runtime;
use metronome_io::postgres::PgTarget;

use super::values::{archive_topic, parse_day};
use super::AppError;

/// `metronome archive`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The day, YYYY-MM-DD (UTC). Default: yesterday.
    #[arg(long, value_parser = parse_day)]
    day: Option<Day>,
    /// Kafka bootstrap servers (else from the configuration).
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// The archive location, a directory or s3://bucket/prefix (else `archive.url`).
    #[arg(long)]
    archive: Option<String>,
    /// The topic (else `archive.topic`, else `stream.input_topic`).
    #[arg(long)]
    topic: Option<String>,
    /// PostgreSQL for archive_runs (else `postgres.url`).
    #[arg(long)]
    postgres_url: Option<String>,
    /// Do not record the run in PostgreSQL.
    #[arg(long, conflicts_with = "postgres_url")]
    no_record: bool,
}

impl Args {
    /// The configuration keys these flags stand for.
    pub fn overrides(&self) -> Overrides {
        super::bootstrap(&self.bootstrap_servers)
            .set("archive", "url", self.archive.as_ref())
            .set("archive", "topic", self.topic.as_ref())
            .set("postgres", "url", self.postgres_url.as_ref())
    }

    /// Archives the day, then applies retention.
    pub fn run(self, config: Config) -> Result<(), AppError> {
        let topic = archive_topic(&config);
        let now_ms = metronome::agent::capture::epoch_us(std::time::SystemTime::now()) / 1000;
        let day = self.day.unwrap_or_else(|| Day::yesterday(now_ms));
        let runs = if self.no_record {
            None
        } else {
            Some(PgTarget::parse(&config.postgres.url).map_err(|e| AppError::Service(e.to_string()))?)
        };
        let runtime = service_runtime()?;
        let outcome = runtime
            .block_on(archive::archive_day(&config.archive, &config.kafka, &topic, day, now_ms, runs.as_ref()))
            .map_err(|error| AppError::Archive { topic: topic.clone(), day, error })?;
        let expired: Vec<String> = outcome.expired.iter().map(ToString::to_string).collect();
        eprintln!(
            "metronome: archived {topic} for {day}: {} records in {} partition files ({} read), manifest sha256 {}{}",
            outcome.records_written,
            outcome.manifest.partitions.len(),
            outcome.records_read,
            outcome.manifest_sha256,
            if expired.is_empty() { String::new() } else { format!("; deleted by retention: {}", expired.join(", ")) }
        );
        Ok(())
    }
}
