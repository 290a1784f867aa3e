//! The command line: one module per command, each with its arguments (`Args`), the
//! configuration keys its flags stand for (`overrides`) and its `run`.
//!
//! ```text
//!  argv --clap--> Cli { config, command } --overrides--> Config (defaults < file < env < flags)
//!       --> command.run(config) --> the library's services and tools --> Result<(), AppError>
//! ```
//!
//! # Layout
//! - [`process`], [`sink_postgres`], [`alerts`]: the processor, the sink alone, the alert topic.
//! - [`demo`], [`agent`], [`publish`], [`simulate`]: traffic in, from a demo, a keyboard, a
//!   keylog or the simulator.
//! - [`score`], [`archive`]: offline scoring and backtests; the nightly archive.
//! - [`values`]: value parsers and inputs several commands share.
//! - [`error`]: [`AppError`], the one error a command returns.

pub mod agent;
pub mod alerts;
pub mod archive;
pub mod demo;
pub mod error;
pub mod process;
pub mod publish;
pub mod score;
pub mod simulate;
pub mod sink_postgres;
pub mod values;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use metronome::config::{Config, Overrides};

pub use error::AppError;

/// Catches users whose keyboards are driven by macros.
#[derive(Debug, Parser)]
#[command(name = "metronome", version, about)]
pub struct Cli {
    /// Configuration file (TOML) layered over the embedded defaults; METRONOME_* variables
    /// override both.
    #[arg(long, global = true, env = "METRONOME_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the stream processor: consume key events, keep per-user state in RocksDB, produce
    /// alerts exactly once. Stops cleanly on SIGTERM or Ctrl-C.
    Process(process::Args),
    /// Write committed alerts from the alert topic to PostgreSQL, exactly once (the sink
    /// `metronome process` runs by default, alone). Stops cleanly on SIGTERM or Ctrl-C.
    SinkPostgres(sink_postgres::Args),
    /// Print committed alerts from the alert topic as JSON lines, from the beginning, until none
    /// arrives for `--idle-exit-s` seconds.
    Alerts(alerts::Args),
    /// The whole pipeline on this machine with nothing installed: an embedded Kafka cluster,
    /// simulated users typing in real time (some switch a macro on), the processor with RocksDB
    /// state in a temporary directory, the alert page; alerts are printed as they are committed.
    Demo(demo::Args),
    /// Capture one user's key events from an evdev keyboard (or replay a keylog) and publish them
    /// as the agent on a player's machine: keys as per-session pseudonyms, a record every ~100
    /// ms, every record spooled to a bounded file until the broker has it. Stops on SIGTERM or
    /// Ctrl-C (and at the end of a replay), sending what is spooled for `agent.drain_timeout_s`.
    Agent(agent::Args),
    /// Publish a keylog CSV to the input topic as agents would (KeyEventBatch per user, keyed
    /// by user id, idempotent producer).
    Publish(publish::Args),
    /// Score a keylog CSV (plain or gzip, `-` for stdin) through the detection core; JSON lines
    /// on stdout, summary on stderr.
    Score(score::Args),
    /// Archive one day of the raw input topic: one compressed file per partition and a manifest
    /// (record counts, offsets, sha256) in the object store (`archive.url`), the run recorded in
    /// PostgreSQL's `archive_runs`; then delete archived days past `archive.retention_days`.
    /// Re-running a day rewrites the same files. Run nightly (k8s/: a CronJob).
    Archive(archive::Args),
    /// Produce synthetic traffic, to Kafka as the users' agents would send it, or to a keylog
    /// CSV: replayed real humans (or the built-in typing model) plus macro users.
    Simulate(simulate::Args),
}

impl Cli {
    /// Whether the command talks to people on stdout (its log then keeps to warnings).
    pub fn is_demo(&self) -> bool {
        matches!(self.command, Command::Demo(_))
    }

    /// Loads the configuration with the command's flags over it, and runs the command.
    pub fn run(self) -> Result<(), AppError> {
        let config = Config::load_with(self.config.as_deref(), self.command.overrides())?;
        match self.command {
            Command::Process(args) => args.run(config),
            Command::SinkPostgres(args) => args.run(config),
            Command::Alerts(args) => args.run(config),
            Command::Demo(args) => args.run(config),
            Command::Agent(args) => args.run(config),
            Command::Publish(args) => args.run(config),
            Command::Score(args) => args.run(config),
            Command::Archive(args) => args.run(config),
            Command::Simulate(args) => args.run(config),
        }
    }
}

impl Command {
    fn overrides(&self) -> Overrides {
        match self {
            Command::Process(args) => args.overrides(),
            Command::SinkPostgres(args) => args.overrides(),
            Command::Alerts(args) => args.overrides(),
            // The demo's broker and database are its own options, not the configuration's.
            Command::Demo(_) => Overrides::new(),
            Command::Agent(args) => args.overrides(),
            Command::Publish(args) => args.overrides(),
            Command::Score(args) => args.overrides(),
            Command::Archive(args) => args.overrides(),
            Command::Simulate(args) => args.overrides(),
        }
    }
}

/// `--bootstrap-servers` as the override of `kafka."bootstrap.servers"`.
fn bootstrap(servers: &Option<String>) -> Overrides {
    Overrides::new().set("kafka", "bootstrap.servers", servers.as_ref())
}
