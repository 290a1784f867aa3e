//! The `metronome` binary: argument parsing and wiring only; the work lives in the library.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use metronome::config::{Config, ModelSource};
use metronome::detect::{Detector, SequenceScorer};
use metronome::keylog::{self, KeylogReader, KeylogWriter};
use metronome::lstm::LstmModel;
use metronome::macrogen::MacroFamily;
use metronome::score::{self, BadRows, OutputSelection, ScoreError};
use metronome::simulate::{self, SimulationPlan};

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
        /// The LSTM scorer: `embedded`, `none` or a model manifest path (default: the
        /// configuration's `model.manifest`).
        #[arg(long, value_name = "embedded|none|MANIFEST")]
        model: Option<String>,
    },
    /// Write synthetic traffic as a keylog CSV: replayed real humans plus macro users.
    Simulate {
        /// Keylog of real human typing to replay and to draw macros from.
        #[arg(long, default_value = "../shared/data/aalto-a-train.csv.gz")]
        humans: PathBuf,
        /// Output file (`-` for stdout).
        #[arg(long)]
        output: PathBuf,
        /// Users in total.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        users: u32,
        /// Share of users that run a macro, 0..1.
        #[arg(long, default_value_t = 0.25)]
        macro_share: f64,
        /// Macro families, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = MacroFamily::ALL.to_vec())]
        families: Vec<MacroFamily>,
        /// Macro users type as humans first, then switch the macro on.
        #[arg(long)]
        mixed: bool,
        /// Macro key presses per macro user.
        #[arg(long, default_value_t = 200)]
        macro_presses: usize,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's message without the usage block.
            let text = e.to_string();
            let message = text.split("\n\n").next().unwrap_or("invalid arguments");
            let message: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            eprintln!("metronome: {} (see --help)", message.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
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
        Command::Score { input, skip_bad_rows, alerts_only, model } => {
            let mut config = config;
            if let Some(m) = model {
                config.model.manifest = m;
            }
            run_score(config, &input, skip_bad_rows, alerts_only)
        }
        Command::Simulate { humans, output, users, macro_share, families, mixed, macro_presses, seed } => {
            let plan = SimulationPlan {
                users: users as usize,
                macro_share,
                families,
                mixed,
                macro_presses,
                seed,
                start_us: 1_700_000_000_000_000,
            };
            run_simulate(&plan, &humans, &output)
        }
    }
}

fn run_score(config: Config, input: &Path, skip_bad_rows: bool, alerts_only: bool) -> Result<(), String> {
    let mut detector = Detector::new(config.detector).map_err(|e| e.to_string())?;
    let mut model = match config.model.source() {
        ModelSource::Embedded => Some(LstmModel::embedded().map_err(|e| e.to_string())?),
        ModelSource::Manifest(path) => Some(LstmModel::load(&path).map_err(|e| e.to_string())?),
        ModelSource::None => None,
    };
    let started = Instant::now();
    // Progress every million rows, for people watching a terminal; never into pipes or logs.
    let show_progress = io::stderr().is_terminal();
    let reader = KeylogReader::open(input).map_err(|e| e.to_string())?.enumerate().map(move |(i, row)| {
        if show_progress && i > 0 && i % (1 << 20) == 0 {
            eprintln!("metronome: {i} rows read ({:.0} rows/s)", i as f64 / started.elapsed().as_secs_f64());
        }
        row
    });
    let bad_rows = if skip_bad_rows { BadRows::Skip } else { BadRows::Stop };
    let select = OutputSelection { windows: !alerts_only };
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
        Err(e) => return Err(e.to_string()),
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
    Ok(())
}

fn run_simulate(plan: &SimulationPlan, humans: &Path, output: &Path) -> Result<(), String> {
    // Each recorded user is replayed at most once per simulated human, so read what is needed.
    let wanted = plan.users.max(1);
    let reader = KeylogReader::open(humans).map_err(|e| e.to_string())?;
    let recordings: Vec<_> = keylog::group_by_user(reader, |_| true, Some(wanted))
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(_, events)| events)
        .collect();
    let users = simulate::simulate(plan, &recordings).map_err(|e| e.to_string())?;
    let sink: Box<dyn Write> = if output.as_os_str() == "-" {
        Box::new(io::stdout().lock())
    } else {
        Box::new(File::create(output).map_err(|e| format!("cannot create {}: {e}", output.display()))?)
    };
    let write_err = |e: io::Error| format!("writing {} failed: {e}", output.display());
    let mut writer = KeylogWriter::new(BufWriter::new(sink)).map_err(write_err)?;
    let mut events = 0usize;
    for user in &users {
        for e in &user.events {
            writer.write(&user.user_id, "sim", e).map_err(write_err)?;
        }
        events += user.events.len();
    }
    writer.finish().map_err(write_err)?;
    let macros = users.iter().filter(|u| matches!(u.truth, simulate::Truth::Macro { .. })).count();
    let families: Vec<String> = plan.families.iter().map(ToString::to_string).collect();
    eprintln!(
        "metronome: wrote {events} events of {} users ({macros} macro users: {}{})",
        users.len(),
        families.join(","),
        if plan.mixed { ", mixed sessions" } else { "" }
    );
    Ok(())
}
