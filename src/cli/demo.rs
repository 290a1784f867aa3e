//! `metronome demo`: the whole pipeline on this machine with nothing installed.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metronome::config::Config;

use super::values::{load_humans, share};
use super::AppError;

/// `metronome demo`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Simulated users.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    users: u32,
    /// Share of users that switch a macro on, 0..1.
    #[arg(long, default_value_t = 0.3, value_parser = share)]
    macro_share: f64,
    /// Keylog of real human typing to replay, or `builtin` for the parametric typing model
    /// (the default when ../shared/data is not there).
    #[arg(long, value_name = "FILE|builtin")]
    humans: Option<String>,
    /// Seconds each user types at most.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    typing_s: u64,
    /// Stop after this many seconds (default: once the traffic is sent and scored).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    duration_s: Option<u64>,
    /// Where the alert page and metrics are served (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A real Kafka broker instead of the embedded cluster (exactly once there).
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// Write the alerts to this PostgreSQL database too.
    #[arg(long, env = "METRONOME_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// RNG seed of the simulation.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

impl Args {
    /// Runs the demo until its traffic is scored (or `--duration-s`).
    pub fn run(self, config: Config) -> Result<(), AppError> {
        let opts = metronome::demo::DemoOptions {
            users: self.users as usize,
            macro_share: self.macro_share,
            recordings: load_humans(self.humans.as_deref(), self.users as usize)?,
            typing: Duration::from_secs(self.typing_s),
            duration: self.duration_s.map(Duration::from_secs),
            listen: free_or_any(self.listen),
            bootstrap_servers: self.bootstrap_servers,
            postgres_url: self.postgres_url,
            seed: self.seed,
        };
        let out: Arc<Mutex<dyn Write + Send>> = Arc::new(Mutex::new(io::stdout()));
        metronome::demo::run(config, opts, out)?;
        Ok(())
    }
}

/// `addr` when it can be bound now, else the same address with any free port (a second demo,
/// or something else on 8080).
fn free_or_any(addr: SocketAddr) -> SocketAddr {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => addr,
        Err(_) => SocketAddr::new(addr.ip(), 0),
    }
}
