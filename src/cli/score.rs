//! `metronome score`: a keylog, or an archived day (a backtest), through the detection core.

use std::io::{self, BufWriter, IsTerminal};
use std::path::PathBuf;
use std::time::Instant;

use metronome::archive::{self, format::Day};
use metronome::config::{Config, Overrides};
use metronome::score::{self, BadRows, OutputSelection, ScoreError};
use metronome::service;
use metronome_core::detect::{Detector, SequenceScorer};
use metronome_core::keylog::{KeylogError, KeylogReader, KeylogRecord};

use super::values::{archive_topic, parse_day};
use super::AppError;

/// `metronome score`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The keylog file.
    #[arg(long, required_unless_present = "archive", conflicts_with = "archive")]
    input: Option<PathBuf>,
    /// Re-score an archived day instead (a backtest): the archive's location, a directory or
    /// s3://bucket/prefix (`archive.url` of the configuration: `--archive config`).
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX|config", requires = "day")]
    archive: Option<String>,
    /// The archived day to re-score, YYYY-MM-DD.
    #[arg(long, value_parser = parse_day, requires = "archive")]
    day: Option<Day>,
    /// The archived topic (else `archive.topic`, else `stream.input_topic`).
    #[arg(long, requires = "archive")]
    topic: Option<String>,
    /// Skip invalid rows (reported on stderr by line number) instead of stopping.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Print alert records only, not every window.
    #[arg(long)]
    alerts_only: bool,
    /// The LSTM scorer: `embedded`, `none` or a model manifest path (default: the
    /// configuration's `model.manifest`).
    #[arg(long, value_name = "embedded|none|MANIFEST")]
    model: Option<String>,
}

type Records = Box<dyn Iterator<Item = Result<KeylogRecord, KeylogError>>>;

impl Args {
    /// The configuration keys these flags stand for.
    pub fn overrides(&self) -> Overrides {
        let location = self.archive.as_ref().filter(|l| l.as_str() != "config");
        Overrides::new().set("model", "manifest", self.model.as_ref()).set("archive", "url", location).set(
            "archive",
            "topic",
            self.topic.as_ref(),
        )
    }

    /// Scores what the flags name: JSON lines on stdout, a summary on stderr.
    pub fn run(self, config: Config) -> Result<(), AppError> {
        let mut model = service::load_model(&config)?;
        let skipped_records = std::rc::Rc::new(std::cell::Cell::new(0u64));
        let records: Records = match (&self.input, &self.archive, self.day) {
            (Some(path), _, _) => Box::new(KeylogReader::open(path)?),
            (None, Some(_), Some(day)) => {
                let topic = archive_topic(&config);
                let archived =
                    archive::backtest::ArchivedDay::open(&config.archive.url, &config.archive.s3, &topic, day)?;
                eprintln!(
                    "metronome: backtest of {topic} for {day}: {} records in {} partitions, model {}",
                    archived.manifest().records,
                    archived.manifest().partitions.len(),
                    model.as_ref().map_or_else(|| "none (timing rules alone)".to_owned(), |m| m.version().to_string())
                );
                let max_events = config.stream.max_events_per_record;
                Box::new(archived.records(max_events, std::rc::Rc::clone(&skipped_records)))
            }
            _ => return Err(AppError::Usage("give --input FILE, or --archive LOCATION --day YYYY-MM-DD")),
        };
        let mut detector = Detector::new(config.detector).map_err(|e| AppError::Service(e.to_string()))?;
        let started = Instant::now();
        // Progress every million rows, for people watching a terminal; never into pipes or logs.
        let show_progress = io::stderr().is_terminal();
        let reader = records.enumerate().map(move |(i, row)| {
            if show_progress && i > 0 && i % (1 << 20) == 0 {
                eprintln!("metronome: {i} rows read ({:.0} rows/s)", i as f64 / started.elapsed().as_secs_f64());
            }
            row
        });
        let bad_rows = if self.skip_bad_rows { BadRows::Skip } else { BadRows::Stop };
        let select = OutputSelection { windows: !self.alerts_only };
        let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
        let mut reported = 0u32;
        let result = score::score_records(
            &mut detector,
            model.as_mut().map(|m| m as &mut dyn SequenceScorer),
            reader,
            bad_rows,
            select,
            &mut out,
            |e| {
                reported += 1;
                if reported <= 20 {
                    eprintln!("metronome: skipped {e}");
                }
            },
            |e| eprintln!("metronome: {e}; those windows were scored on timing alone"),
        );
        let summary = match result {
            Ok(s) => s,
            // A closed pipe (`| head`) is the reader's choice, not a failure.
            Err(ScoreError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "metronome: scored {} rows of {} users in {secs:.2}s ({:.0} rows/s): {} windows, {} alerts, {} late events, {} bad rows",
            summary.rows,
            summary.users,
            summary.rows as f64 / secs.max(1e-9),
            summary.windows,
            summary.alerts,
            summary.late_events,
            summary.bad_rows
        );
        if skipped_records.get() > 0 {
            eprintln!(
                "metronome: {} archived records skipped as the processor would dead-letter them",
                skipped_records.get()
            );
        }
        Ok(())
    }
}
