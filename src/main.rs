//! The `metronome` binary: argument parsing and wiring only; the work lives in the library.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use metronome::config::Config;
use metronome::detect::Detector;
use metronome::keylog::KeylogReader;
use metronome::score::{self, BadRows, OutputSelection, ScoreError};

/// Catches users whose keyboards are driven by macros.
#[derive(Debug, Parser)]
#[command(name = "metronome", version, about)]
struct Cli {
    /// Configuration file (TOML) layered over the embedded defaults; METRONOME_* variables
    /// override both.
    #[arg(long, global = true, env = "METRONOME_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Score a keylog CSV (plain or gzip, `-` for stdin) through the detection core; JSON lines
    /// on stdout, summary on stderr.
    Score {
        /// The keylog file.
        #[arg(long)]
        input: PathBuf,
        /// Skip invalid rows (reported on stderr by line number) instead of stopping.
        #[arg(long)]
        skip_bad_rows: bool,
        /// Print alert records only, not every window.
        #[arg(long)]
        alerts_only: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metronome: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let config = Config::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
    match cli.command {
        Command::Score { input, skip_bad_rows, alerts_only } => {
            let mut detector = Detector::new(config.detector).map_err(|e| e.to_string())?;
            let reader = KeylogReader::open(&input).map_err(|e| e.to_string())?;
            let bad_rows = if skip_bad_rows { BadRows::Skip } else { BadRows::Stop };
            let select = OutputSelection { windows: !alerts_only };
            let stdout = io::stdout().lock();
            let mut out = BufWriter::with_capacity(1 << 16, stdout);
            let started = Instant::now();
            let mut reported = 0u32;
            let result = score::score_records(&mut detector, reader, bad_rows, select, &mut out, |e| {
                reported += 1;
                if reported <= 20 {
                    eprintln!("metronome: skipped {e}");
                }
            });
            let summary = match result {
                Ok(s) => s,
                // A closed pipe (`| head`) is the reader's choice, not a failure.
                Err(ScoreError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let _ = out.flush();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "metronome: scored {} rows of {} users in {:.2}s ({:.0} rows/s): {} windows, {} alerts, {} late events, {} bad rows",
                summary.rows,
                summary.users,
                secs,
                summary.rows as f64 / secs.max(1e-9),
                summary.windows,
                summary.alerts,
                summary.late_events,
                summary.bad_rows
            );
            Ok(())
        }
    }
}
