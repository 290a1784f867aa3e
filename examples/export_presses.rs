//! Writes training data for a per-press (streaming) sequence model: every press of every
//! session, encoded by the detector exactly as a window step, with where the macro starts.
//!
//! ```text
//! cargo run --release --example export_presses -- --out models/data-presses [--per-family N]
//!     [--mixed M] [--seed S] [HUMAN_KEYLOG ...]
//! ```
//! For each split (`train`, `validation`, `test`; see `metronome::dataset`):
//! - `presses-<split>.f32`: little-endian f32, `STEP_WIDTH` values per press, sessions one
//!   after the other;
//! - `presses-<split>.csv`: one row per session: `kind,family,humanized,user,steps,onset`, where
//!   `onset` is the index of the session's first macro press (0 for a macro user, -1 for a
//!   human);
//! - `export.json`: the encoding and the settings, for the manifest.
//!
//! A press is encoded once it has settled (the next press came down), with the 48 presses
//! before it as context: the step a window scored at that moment holds for it, so a model
//! trained here reads what the stream's encoder gives it. Sessions are humans (all of them),
//! macro users of every window-visible family (a third with humanized holds) and mixed
//! sessions (60-150 human presses, then 200 of a macro).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use metronome::dataset::{self, MacroUser, Split};
use metronome_core::detect::sequence::{STEP_FEATURES, STEP_WIDTH};
use metronome_core::detect::{Detector, DetectorConfig};
use metronome_core::event::KeyEvent;
use metronome_core::macrogen::MacroFamily;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Steps of context each press is encoded with.
const STEPS: usize = 50;

/// Per-press training data for a streaming model.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Generated macro users per family per split.
    #[arg(long, default_value_t = 500)]
    per_family: usize,
    /// Mixed sessions per split.
    #[arg(long, default_value_t = 3000)]
    mixed: usize,
    /// RNG seed.
    #[arg(long, default_value_t = 11)]
    seed: u64,
    /// Human keylogs (default: both Aalto files in ../shared/data).
    files: Vec<PathBuf>,
}

struct SplitWriter {
    steps: BufWriter<File>,
    sessions: BufWriter<File>,
    counts: BTreeMap<String, usize>,
}

impl SplitWriter {
    fn create(dir: &std::path::Path, split: Split) -> std::io::Result<Self> {
        let steps = BufWriter::new(File::create(dir.join(format!("presses-{}.f32", split.name())))?);
        let mut sessions = BufWriter::new(File::create(dir.join(format!("presses-{}.csv", split.name())))?);
        writeln!(sessions, "kind,family,humanized,user,steps,onset")?;
        Ok(Self { steps, sessions, counts: BTreeMap::new() })
    }

    /// One session: its settled presses' steps, and the first macro press's index (or -1).
    fn write(
        &mut self,
        kind: &str,
        family: &str,
        humanized: bool,
        user: usize,
        session: &Session,
    ) -> std::io::Result<()> {
        for v in &session.steps {
            self.steps.write_all(&v.to_le_bytes())?;
        }
        let n = session.steps.len() / STEP_WIDTH;
        writeln!(self.sessions, "{kind},{family},{},{user},{n},{}", u8::from(humanized), session.onset)?;
        *self.counts.entry(format!("{kind}/{family}")).or_default() += n;
        Ok(())
    }
}

struct Session {
    steps: Vec<f32>,
    onset: i64,
}

/// Every settled press of `events` as a step. `detector` scores a window at every press (hop
/// 1), so each window's second-to-last step is the press the newest one settled.
fn session(detector: &mut Detector, events: &[KeyEvent], onset_us: Option<i64>) -> Session {
    let windows = dataset::encoded_windows(detector, events, STEPS);
    let mut steps = Vec::with_capacity(windows.len() * STEP_WIDTH);
    let mut onset = -1;
    let settled = (STEPS - 2) * STEP_WIDTH..(STEPS - 1) * STEP_WIDTH;
    for pair in windows.windows(2) {
        let (before, w) = (&pair[0], &pair[1]);
        // The settled press came down when the window before was scored.
        if onset < 0 && onset_us.is_some_and(|at| before.end_us >= at) {
            onset = (steps.len() / STEP_WIDTH) as i64;
        }
        steps.extend_from_slice(&w.steps[settled.clone()]);
    }
    Session { steps, onset }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Args = clap::Parser::parse();
    let files = if args.files.is_empty() { dataset::default_keylogs() } else { args.files.clone() };
    std::fs::create_dir_all(&args.out)?;
    let mut humans = dataset::humans_by_split(&files)?;
    let mut cfg = DetectorConfig::default();
    cfg.window.hop = 1;
    cfg.window.min_presses = 3;
    let mut detector = Detector::new(cfg)?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let families: Vec<MacroFamily> =
        MacroFamily::ALL.into_iter().filter(|f| f.window_visible() && *f != MacroFamily::HumanIid).collect();
    for split in Split::ALL {
        let mut writer = SplitWriter::create(&args.out, split)?;
        let split_humans = humans.remove(&split).unwrap_or_default();
        let recordings: Vec<&Vec<KeyEvent>> = split_humans.values().collect();
        let mut user = 0;
        for events in &recordings {
            writer.write("human", "human", false, user, &session(&mut detector, events, None))?;
            user += 1;
        }
        for &family in &families {
            for i in 0..args.per_family {
                let rec = recordings[rng.random_range(0..recordings.len())];
                let start = 1_600_000_000_000_000 + i as i64 * 1_000_000_000;
                let m = MacroUser::generate(family, rec, start, 200, &mut rng);
                let s = session(&mut detector, &m.events, Some(i64::MIN));
                writer.write("macro", family.name(), m.humanized_holds, user, &s)?;
                user += 1;
            }
        }
        for _ in 0..args.mixed {
            let rec = recordings[rng.random_range(0..recordings.len())];
            let family = families[rng.random_range(0..families.len())];
            let m = MacroUser::mixed(family, rec, rng.random_range(60..150), 200, &mut rng);
            let s = session(&mut detector, &m.events, Some(m.onset_us));
            writer.write("mixed", family.name(), m.humanized_holds, user, &s)?;
            user += 1;
        }
        writer.steps.flush()?;
        writer.sessions.flush()?;
        eprintln!("{}: {} human users; presses {:?}", split.name(), recordings.len(), writer.counts);
    }
    let spec = serde_json::json!({
        "context_steps": STEPS,
        "step_width": STEP_WIDTH,
        "step_features": STEP_FEATURES,
        "per_family": args.per_family,
        "mixed": args.mixed,
        "seed": args.seed,
        "files": files,
    });
    std::fs::write(args.out.join("export.json"), serde_json::to_string_pretty(&spec)?)?;
    Ok(())
}
