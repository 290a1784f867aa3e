//! [`AppError`]: why a command failed, one line for the user (`metronome: <error>`, exit 1).

use metronome::agent::AgentError;
use metronome::archive::backtest::BacktestError;
use metronome::archive::format::Day;
use metronome::archive::ArchiveError;
use metronome::config::ConfigError;
use metronome::score::ScoreError;
use metronome::simulate::PlanError;
use metronome::sink::SinkError;
use metronome::stream::publish::PublishError;
use metronome_core::keylog::KeylogError;
use rdkafka::error::KafkaError;

/// The one error a command returns.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration (file, environment or flags) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The flags given do not make a complete request.
    #[error("{0}")]
    Usage(&'static str),
    /// A keylog could not be read.
    #[error(transparent)]
    Keylog(#[from] KeylogError),
    /// Scoring failed.
    #[error(transparent)]
    Score(#[from] ScoreError),
    /// An archived day could not be opened for a backtest.
    #[error(transparent)]
    Backtest(#[from] BacktestError),
    /// The simulation's plan is unusable.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Publishing failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The agent stopped with an error.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The PostgreSQL sink stopped with an error.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A Kafka client failed.
    #[error("{what}: {error}")]
    Kafka {
        /// What it was doing.
        what: String,
        /// The client's error.
        error: KafkaError,
    },
    /// Archiving a day failed.
    #[error("archiving {topic} for {day}: {error}")]
    Archive {
        /// The topic.
        topic: String,
        /// The day.
        day: Day,
        /// Why.
        error: ArchiveError,
    },
    /// Writing an output file failed.
    #[error("{what} {path}: {error}")]
    Output {
        /// `cannot create` or `writing`.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A service (processor, demo, HTTP, runtime) could not start or stopped with an error; the
    /// service layer reports these as text.
    #[error("{0}")]
    Service(String),
}

impl From<String> for AppError {
    fn from(text: String) -> Self {
        AppError::Service(text)
    }
}
