//! `metronome agent`: one user's key events from an evdev keyboard (or a replayed keylog) to
//! the input topic, as the agent on a player's machine.

use std::path::PathBuf;

use metronome::agent::capture::DeviceChoice;
use metronome::agent::{self, Source};
use metronome::config::{Config, Overrides};
use metronome::service;
use tokio_util::sync::CancellationToken;

use super::values::non_negative;
use super::AppError;

/// `metronome agent`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Whose keys these are (else `agent.user_id`).
    #[arg(long)]
    user: Option<String>,
    /// The evdev device to read (default: the first keyboard under /dev/input).
    #[arg(long, value_name = "/dev/input/eventN", conflicts_with = "replay")]
    device: Option<PathBuf>,
    /// Replay a keylog CSV (plain or gzip) instead of reading a device.
    #[arg(long, value_name = "FILE")]
    replay: Option<PathBuf>,
    /// The keylog's user to replay (default: its first user).
    #[arg(long, requires = "replay")]
    replay_user: Option<String>,
    /// Replay pace: 1 as recorded, 2 twice as fast, 0 all at once.
    #[arg(long, default_value_t = 1.0, requires = "replay", value_parser = non_negative)]
    replay_speed: f64,
    /// Kafka bootstrap servers (else from the configuration).
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// Topic (else `agent.topic`, else `stream.input_topic`).
    #[arg(long)]
    topic: Option<String>,
    /// The spool file (else `agent.spool_path`).
    #[arg(long)]
    spool: Option<PathBuf>,
}

impl Args {
    /// The configuration keys these flags stand for.
    pub fn overrides(&self) -> Overrides {
        super::bootstrap(&self.bootstrap_servers)
            .set("agent", "user_id", self.user.as_ref())
            .set("agent", "spool_path", self.spool.as_ref())
            .set("agent", "topic", self.topic.as_ref())
    }

    /// Captures (or replays) until SIGTERM, Ctrl-C or the replay's end, then drains the spool.
    pub fn run(self, config: Config) -> Result<(), AppError> {
        let topic = Some(config.agent.topic.clone())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| config.stream.input_topic.clone());
        let source = match self.replay {
            Some(path) => Source::Replay { path, user: self.replay_user, speed: self.replay_speed },
            None => Source::Device(self.device.map_or(DeviceChoice::AutoDetect, DeviceChoice::Path)),
        };
        let stop = stop_on_signal()?;
        let s = agent::run(&config.agent, &config.kafka, &topic, source, stop)?;
        eprintln!(
            "metronome: agent captured {} events in {} records; {} delivered, {} left in the spool, {} refused by a full spool ({} events), {} refused by the broker, {} kernel overflows, {} device losses",
            s.events, s.records, s.delivered, s.left_in_spool, s.refused_records, s.refused_events, s.rejected, s.kernel_dropped, s.device_losses
        );
        Ok(())
    }
}

/// A token cancelled by SIGTERM or Ctrl-C, watched from a thread of its own (the agent's capture
/// runs without an async runtime).
fn stop_on_signal() -> Result<CancellationToken, AppError> {
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(service::wait_for_termination());
                tracing::info!("termination requested: stopping capture, sending what is spooled");
                on_signal.cancel();
            }
        })
        .map_err(|e| AppError::Service(format!("cannot watch for signals: {e}")))?;
    Ok(stop)
}
