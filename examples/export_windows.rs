//! Writes the LSTM's training data: windows of real humans and generated macro users, encoded
//! by the detector exactly as the stream encodes them, per split.
//!
//! ```text
//! cargo run --release --example export_windows -- --out models/data [--per-family N]
//!     [--windows-per-user K] [--seed S] [--key-labels N [--labelled-share F]] [HUMAN_KEYLOG ...]
//! ```
//! For each split (`train`, `validation`, `test`; see `metronome::dataset`):
//! - `windows-<split>.f32`: little-endian f32, `steps * STEP_WIDTH` values per window;
//! - `windows-<split>.csv`: one row per window: `label,kind,family,humanized,user,timing_score,macro_share`.
//!
//! Humans give label 0. Macro users (every family one window can show,
//! `MacroFamily::window_visible`; a third with humanized holds) give label 1.
//! Mixed sessions (human, then a macro) give 0 before the onset and 1 once at least 30 % of a
//! window's presses are the macro's (`--mixed-macro-share`); windows in between are left out as ambiguous. Each user
//! contributes at most K windows, evenly spread, so heavy typists do not dominate; validation
//! humans keep every window, since the operating threshold is chosen above all of them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use metronome::agent::labels::KeyLabeler;
use metronome::dataset::{self, EncodedWindow, MacroUser, Split};
use metronome_core::detect::sequence::{STEP_FEATURES, STEP_WIDTH};
use metronome_core::detect::{Detector, DetectorConfig};
use metronome_core::event::KeyEvent;
use metronome_core::macrogen::MacroFamily;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Encoded training windows for the LSTM.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Generated macro users per family per split (the test split gets as many).
    #[arg(long, default_value_t = 1500)]
    per_family: usize,
    /// Mixed sessions per split.
    #[arg(long, default_value_t = 3000)]
    mixed: usize,
    /// Share of a mixed window's presses the macro must have made for the window to be labelled
    /// a macro's (windows above 0 and below it are left out as ambiguous).
    #[arg(long, default_value_t = 0.3)]
    mixed_macro_share: f64,
    /// Window-visible families to leave out of the export (repeatable), e.g. to measure what
    /// training on one costs the others.
    #[arg(long, value_parser = parse_family)]
    leave_out: Vec<MacroFamily>,
    /// Windows kept per human user at most (half as many per macro user).
    #[arg(long, default_value_t = 20)]
    windows_per_user: usize,
    /// Steps per window (the model's sequence length).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// RNG seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Encode every user's keys as the agent's labels of this lifetime (`agent::labels`; 0: one
    /// label per key per session), as a stream from `metronome agent` carries them; without it,
    /// the recordings' key codes.
    #[arg(long)]
    key_labels: Option<u32>,
    /// With `--key-labels`: the share of users (drawn at random) whose keys are labelled; the
    /// rest keep their key codes, so a model learns both encodings.
    #[arg(long, default_value_t = 1.0)]
    labelled_share: f64,
    /// Human keylogs (default: both Aalto files in ../shared/data).
    files: Vec<PathBuf>,
}

struct SplitWriter {
    steps: BufWriter<File>,
    meta: BufWriter<File>,
    counts: BTreeMap<String, usize>,
}

impl SplitWriter {
    fn create(dir: &std::path::Path, split: Split) -> std::io::Result<Self> {
        let steps = BufWriter::new(File::create(dir.join(format!("windows-{}.f32", split.name())))?);
        let mut meta = BufWriter::new(File::create(dir.join(format!("windows-{}.csv", split.name())))?);
        writeln!(meta, "label,kind,family,humanized,user,timing_score,macro_share")?;
        Ok(Self { steps, meta, counts: BTreeMap::new() })
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        w: &EncodedWindow,
        label: u8,
        kind: &str,
        family: &str,
        humanized: bool,
        user: usize,
        share: f64,
    ) -> std::io::Result<()> {
        for v in &w.steps {
            self.steps.write_all(&v.to_le_bytes())?;
        }
        writeln!(self.meta, "{label},{kind},{family},{},{user},{:.6},{share:.3}", u8::from(humanized), w.timing_score)?;
        *self.counts.entry(format!("{kind}/{family}/{label}")).or_default() += 1;
        Ok(())
    }
}

fn parse_family(name: &str) -> Result<MacroFamily, String> {
    name.parse()
}

/// At most `k` of `windows`, evenly spread.
fn spread<T>(windows: &[T], k: usize) -> impl Iterator<Item = &T> {
    let stride = windows.len().div_ceil(k.max(1)).max(1);
    windows.iter().step_by(stride)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Args = clap::Parser::parse();
    let files = if args.files.is_empty() { dataset::default_keylogs() } else { args.files.clone() };
    std::fs::create_dir_all(&args.out)?;
    let mut humans = dataset::humans_by_split(&files)?;
    let mut detector = Detector::new(DetectorConfig::default())?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let k = args.windows_per_user;
    let mut labelled = 0u64;
    // Its own generator, so the users drawn are the same whatever the share.
    let mut coin = ChaCha8Rng::seed_from_u64(args.seed ^ 0x1abe1);
    // The events as the stream would carry them (their keys labelled, when asked).
    let mut as_sent = |events: &[KeyEvent]| -> Vec<KeyEvent> {
        labelled += 1;
        match args.key_labels {
            Some(lifetime) if coin.random_bool(args.labelled_share) => {
                KeyLabeler::seeded(labelled, lifetime).label_events(events)
            }
            _ => events.to_vec(),
        }
    };
    for split in Split::ALL {
        let mut writer = SplitWriter::create(&args.out, split)?;
        let split_humans = humans.remove(&split).unwrap_or_default();
        let recordings: Vec<&Vec<KeyEvent>> = split_humans.values().collect();
        let mut user = 0;
        // Validation keeps every human window: the operating threshold is set above all of them,
        // and a sample would hide the highest.
        let human_k = if split == Split::Validation { usize::MAX } else { k };
        for events in &recordings {
            let windows = dataset::encoded_windows(&mut detector, &as_sent(events), args.steps);
            for w in spread(&windows, human_k) {
                writer.write(w, 0, "human", "human", false, user, 0.0)?;
            }
            user += 1;
        }
        let families: Vec<MacroFamily> =
            MacroFamily::ALL.into_iter().filter(|f| f.window_visible() && !args.leave_out.contains(f)).collect();
        for &family in &families {
            for i in 0..args.per_family {
                let rec = recordings[rng.random_range(0..recordings.len())];
                let start = 1_600_000_000_000_000 + i as i64 * 1_000_000_000;
                let m = MacroUser::generate(family, rec, start, 200, &mut rng);
                let windows = dataset::encoded_windows(&mut detector, &as_sent(&m.events), args.steps);
                for w in spread(&windows, k / 2) {
                    writer.write(w, 1, "macro", family.name(), m.humanized_holds, user, 1.0)?;
                }
                user += 1;
            }
        }
        for _ in 0..args.mixed {
            let rec = recordings[rng.random_range(0..recordings.len())];
            let family = families[rng.random_range(0..families.len())];
            let onset = rng.random_range(60..150);
            let m = MacroUser::mixed(family, rec, onset, 120, &mut rng);
            for w in dataset::encoded_windows(&mut detector, &as_sent(&m.events), args.steps) {
                let share = m.macro_share(w.start_us, w.end_us);
                let label = if share == 0.0 {
                    0
                } else if share >= args.mixed_macro_share {
                    1
                } else {
                    continue;
                };
                // Only the windows around the onset: the rest is plain human or plain macro.
                if w.end_us >= m.onset_us - 20_000_000 {
                    writer.write(&w, label, "mixed", family.name(), m.humanized_holds, user, share)?;
                }
            }
            user += 1;
        }
        writer.steps.flush()?;
        writer.meta.flush()?;
        eprintln!("{}: {} human users; windows {:?}", split.name(), recordings.len(), writer.counts);
    }
    let spec = serde_json::json!({
        "steps": args.steps,
        "step_width": STEP_WIDTH,
        "step_features": STEP_FEATURES,
        "per_family": args.per_family,
        "mixed": args.mixed,
        "mixed_macro_share": args.mixed_macro_share,
        "left_out": args.leave_out.iter().map(|f| f.name()).collect::<Vec<_>>(),
        "windows_per_user": k,
        "seed": args.seed,
        "key_labels": args.key_labels,
        "labelled_share": args.key_labels.map(|_| args.labelled_share),
        "files": files,
    });
    std::fs::write(args.out.join("export.json"), serde_json::to_string_pretty(&spec)?)?;
    Ok(())
}
