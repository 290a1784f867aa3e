//! `metronome publish`: a keylog CSV into the input topic, as agents would send it.

use std::path::PathBuf;
use std::time::Instant;

use metronome::config::{Config, Overrides};
use metronome::stream::publish::{self, RecordShape, Timestamps};
use metronome_core::keylog::KeylogReader;

use super::AppError;

/// `metronome publish`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The keylog file (plain or gzip, `-` for stdin).
    #[arg(long)]
    input: PathBuf,
    /// Kafka bootstrap servers (else from the configuration).
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// Topic (else `stream.input_topic`).
    #[arg(long)]
    topic: Option<String>,
    /// Most events per record.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_events: u32,
    /// Most event time a record spans, milliseconds, as an agent sending every ~100 ms does
    /// (0: cut by --batch-events alone).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=3_600_000))]
    batch_ms: u32,
    /// Record timestamps: `now` (as live agents send), or `event-time` (each record's first
    /// event, so a replayed day is that day to `metronome archive`).
    #[arg(long, value_enum, default_value_t = Timestamps::Now)]
    timestamps: Timestamps,
}

impl Args {
    /// The configuration keys these flags stand for.
    pub fn overrides(&self) -> Overrides {
        super::bootstrap(&self.bootstrap_servers)
    }

    /// Publishes the keylog.
    pub fn run(self, config: Config) -> Result<(), AppError> {
        let topic = self.topic.unwrap_or(config.stream.input_topic.clone());
        let shape = RecordShape { max_events: self.batch_events as usize, span_us: i64::from(self.batch_ms) * 1_000 };
        let producer = publish::producer(&config.kafka)
            .map_err(|error| AppError::Kafka { what: "kafka producer".to_owned(), error })?;
        let reader = KeylogReader::open(&self.input)?;
        let started = Instant::now();
        let summary = publish::publish_keylog(&producer, &topic, reader, shape, self.timestamps)?;
        eprintln!(
            "metronome: published {} events of {} users as {} records to {topic} in {:.2}s",
            summary.events,
            summary.users,
            summary.records,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
