//! `metronome simulate`: synthetic traffic (replayed humans or the built-in typing model, plus
//! macro users) to Kafka or to a keylog CSV.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use metronome::config::{Config, Overrides};
use metronome::simulate::{self, SimulatedUser, SimulationPlan};
use metronome::stream::publish::{self, Pace, RecordShape};
use metronome_core::keylog::KeylogWriter;
use metronome_core::macrogen::MacroFamily;

use super::values::{load_humans, macro_family_parser, non_negative};
use super::AppError;

/// `metronome simulate`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keylog of real human typing to replay and to draw macros from, or `builtin` for the
    /// parametric typing model (the default when ../shared/data is not there).
    #[arg(long, value_name = "FILE|builtin")]
    humans: Option<String>,
    /// Write a keylog CSV here (`-` for stdout) instead of publishing.
    #[arg(long, conflicts_with_all = ["bootstrap_servers", "kafka"])]
    output: Option<PathBuf>,
    /// Publish to this Kafka broker.
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// Publish to the configuration's Kafka (`kafka."bootstrap.servers"`).
    #[arg(long)]
    kafka: bool,
    /// Topic to publish to (else `stream.input_topic`).
    #[arg(long)]
    topic: Option<String>,
    /// Target rate when publishing, events per second (0: as fast as possible).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative, conflicts_with = "realtime")]
    rate: f64,
    /// Publish in real time: users start typing now, each event sent when it happens.
    #[arg(long)]
    realtime: bool,
    /// Users in total.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    users: u32,
    /// Share of users that run a macro, 0..1.
    #[arg(long, default_value_t = 0.25)]
    macro_share: f64,
    /// Macro families, comma separated.
    #[arg(long, value_delimiter = ',', value_parser = macro_family_parser(),
          default_values_t = MacroFamily::ALL.to_vec())]
    families: Vec<MacroFamily>,
    /// Macro users type as humans first, then switch the macro on.
    #[arg(long)]
    mixed: bool,
    /// Macro key presses per macro user.
    #[arg(long, default_value_t = 200)]
    macro_presses: usize,
    /// Key presses per human of the built-in typing model.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(20..=1_000_000))]
    human_presses: u32,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl Args {
    /// The configuration keys these flags stand for.
    pub fn overrides(&self) -> Overrides {
        super::bootstrap(&self.bootstrap_servers)
    }

    /// Simulates the users, then writes or publishes their traffic.
    pub fn run(self, config: Config) -> Result<(), AppError> {
        let plan = SimulationPlan {
            users: self.users as usize,
            macro_share: self.macro_share,
            families: self.families.clone(),
            mixed: self.mixed,
            onset_presses: 60..150,
            macro_presses: self.macro_presses,
            seed: self.seed,
            start_us: if self.realtime {
                metronome::agent::capture::epoch_us(std::time::SystemTime::now())
            } else {
                1_700_000_000_000_000
            },
        };
        let recordings = load_humans(self.humans.as_deref(), plan.users)?;
        let humans = match &recordings {
            Some(r) => simulate::Humans::Recorded(r),
            None => simulate::Humans::Parametric { presses: self.human_presses as usize },
        };
        let simulated = simulate::simulate(&plan, humans)?;
        match &self.output {
            Some(output) => write_simulation(&plan, &simulated, output),
            None if self.bootstrap_servers.is_some() || self.kafka => {
                let topic = self.topic.clone().unwrap_or(config.stream.input_topic.clone());
                publish_simulation(&config, &topic, &plan, &simulated, self.pace(&simulated))
            }
            None => {
                Err(AppError::Usage("give --output FILE, or --bootstrap-servers HOST:PORT (or --kafka) to publish"))
            }
        }
    }

    /// In real time, at `--rate`, or as fast as possible.
    fn pace(&self, users: &[SimulatedUser]) -> Pace {
        if self.realtime {
            return Pace::Speed(1.0);
        }
        let events: usize = users.iter().map(|u| u.events.len()).sum();
        let first = users.iter().filter_map(|u| u.events.first()).map(|e| e.time_us).min();
        let last = users.iter().filter_map(|u| u.events.last()).map(|e| e.time_us).max();
        Pace::for_rate(self.rate, events, last.zip(first).map_or(0, |(l, f)| l - f))
    }
}

fn describe(plan: &SimulationPlan, users: &[SimulatedUser]) -> String {
    let macros = users.iter().filter(|u| matches!(u.truth, simulate::Truth::Macro { .. })).count();
    let families: Vec<String> = plan.families.iter().map(ToString::to_string).collect();
    format!(
        "{} users ({macros} macro users: {}{})",
        users.len(),
        families.join(","),
        if plan.mixed { ", mixed sessions" } else { "" }
    )
}

fn write_simulation(plan: &SimulationPlan, users: &[SimulatedUser], output: &Path) -> Result<(), AppError> {
    let path = output.display().to_string();
    let sink: Box<dyn Write> = if output.as_os_str() == "-" {
        Box::new(io::stdout().lock())
    } else {
        let file = File::create(output).map_err(|error| AppError::Output {
            what: "cannot create",
            path: path.clone(),
            error,
        })?;
        Box::new(file)
    };
    let write_err = |error: io::Error| AppError::Output { what: "writing", path: path.clone(), error };
    let mut writer = KeylogWriter::new(BufWriter::new(sink)).map_err(write_err)?;
    let mut events = 0usize;
    for user in users {
        for e in &user.events {
            writer.write(&user.user_id, "sim", e).map_err(write_err)?;
        }
        events += user.events.len();
    }
    writer.finish().map_err(write_err)?;
    eprintln!("metronome: wrote {events} events of {}", describe(plan, users));
    Ok(())
}

fn publish_simulation(
    config: &Config,
    topic: &str,
    plan: &SimulationPlan,
    users: &[SimulatedUser],
    pace: Pace,
) -> Result<(), AppError> {
    let producer = publish::producer(&config.kafka)
        .map_err(|error| AppError::Kafka { what: "kafka producer".to_owned(), error })?;
    let total: usize = users.iter().map(|u| u.events.len()).sum();
    // A bar for people at a terminal; nothing in pipes and logs.
    let bar = if io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let summary = publish::publish_simulation(&producer, topic, users, RecordShape::agent(50), pace, &stop, |sent| {
        bar.set_position(sent)
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "metronome: published {} events as {} records to {topic} in {secs:.2}s ({:.0} events/s): {}",
        summary.events,
        summary.records,
        summary.events as f64 / secs.max(1e-9),
        describe(plan, users)
    );
    Ok(())
}
