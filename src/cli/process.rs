//! `metronome process`: the stream processor with its HTTP server and, by default, its sink.

use std::path::PathBuf;

use metronome::config::{Config, Overrides};
use metronome::service::{service_runtime, shutdown_on_signal, Service};

use super::AppError;

/// `metronome process`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kafka bootstrap servers (else `kafka."bootstrap.servers"` from the configuration).
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// Where task state lives (else `stream.state_dir`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// This instance's name in the group (else `stream.instance_id`, else the host name).
    #[arg(long)]
    instance_id: Option<String>,
    /// PostgreSQL for the alert sink (else `postgres.url`; METRONOME_POSTGRES__URL).
    #[arg(long)]
    postgres_url: Option<String>,
    /// Do not run the PostgreSQL sink in this process (run `metronome sink-postgres`).
    #[arg(long)]
    no_sink: bool,
}

impl Args {
    /// The configuration keys these flags stand for.
    pub fn overrides(&self) -> Overrides {
        super::bootstrap(&self.bootstrap_servers)
            .set("stream", "state_dir", self.state_dir.as_ref())
            .set("stream", "instance_id", self.instance_id.as_ref())
            .set("postgres", "url", self.postgres_url.as_ref())
            .set("postgres", "sink_in_process", self.no_sink.then_some(false))
    }

    /// Runs the processor until SIGTERM or Ctrl-C.
    pub fn run(self, config: Config) -> Result<(), AppError> {
        let runtime = service_runtime()?;
        let ran =
            runtime.block_on(async move { Service::processor(config).run(shutdown_on_signal(), |_| {}).await })?;
        if let Some(sink) = ran.sink {
            eprintln!("metronome: postgres sink wrote {} alerts", sink.writes.written);
        }
        let summary = ran.processor.unwrap_or_default();
        eprintln!(
            "metronome: processed {} records ({} events): {} alerts, {} dead letters, {} commits, {} aborts",
            summary.records, summary.events, summary.alerts, summary.dead_letters, summary.commits, summary.aborts
        );
        Ok(())
    }
}
