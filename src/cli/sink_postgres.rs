//! `metronome sink-postgres`: the PostgreSQL sink alone, with `/metrics`, `/healthz` and
//! `/api/alerts`.

use metronome::config::{Config, Overrides};
use metronome::http::{AlertDb, ApiState, Readiness};
use metronome::service::{self, service_runtime, shutdown_on_signal, start_http};
use metronome_io::postgres::PgTarget;

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
        let sink = service::postgres_sink(&config)?;
        let http = config.http.clone();
        let state = ApiState {
            token: http.token(),
            readiness: Readiness::default(),
            alerts: PgTarget::parse(&config.postgres.url).ok().map(AlertDb::new),
            users: None,
        };
        let runtime = service_runtime()?;
        runtime.block_on(async move {
            let shutdown = shutdown_on_signal();
            let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
            let server = start_http(&http, state, http_stopped).await?;
            let result = sink.run(shutdown).await;
            let _ = stop_http.send(());
            if let Some((server, _)) = server {
                let _ = server.await;
            }
            let summary = result?;
            eprintln!(
                "metronome: postgres sink wrote {} alerts in {} transactions ({} duplicates refused, {} dead letters, {} retries)",
                summary.writes.written, summary.batches, summary.writes.duplicates, summary.writes.dead_letters, summary.retries
            );
            Ok(())
        })
    }
}
