//! `metronome alerts`: committed alerts from the alert topic as JSON lines.

use std::io::{self, Write};
use std::time::Duration;

use metronome::config::{Config, Overrides};
use metronome::stream;

use super::AppError;

/// `metronome alerts`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kafka bootstrap servers (else from the configuration).
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// Stop after this many seconds without a new alert.
    #[arg(long, default_value_t = 3600)]
    idle_exit_s: u64,
}

impl Args {
    /// The configuration keys these flags stand for.
    pub fn overrides(&self) -> Overrides {
        super::bootstrap(&self.bootstrap_servers)
    }

    /// Prints alerts until none arrives for `--idle-exit-s`.
    pub fn run(self, config: Config) -> Result<(), AppError> {
        let topic = config.stream.alerts_topic.clone();
        let mut out = io::stdout().lock();
        let idle = Duration::from_secs(self.idle_exit_s);
        let (alerts, bad) = stream::alerts::follow(&config.kafka, &topic, idle, |a| {
            let _ = writeln!(out, "{}", metronome_core::alert_json::alert_json(a));
            let _ = out.flush();
        })
        .map_err(|error| AppError::Kafka { what: format!("reading {topic}"), error })?;
        eprintln!("metronome: {alerts} alerts read from {topic} ({bad} undecodable)");
        Ok(())
    }
}
