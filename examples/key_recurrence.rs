//! How often keys recur within 16 presses (`key_recurrence_share`) on real humans and on
//! macro users: the figures behind `rules.key_recurrence_floor`.
//!
//! ```text
//! cargo run --release --example key_recurrence -- [--split train|validation|test]
//!     [--key-labels N] [--per-family N] [HUMAN_KEYLOG ...]
//! ```
//! Every user's recording goes through the detector as a stream from the agent would carry it
//! (with `--key-labels`, the agent's labels of that lifetime; 1 is the nearest the agent comes
//! to a fresh label for every press, which keeps a label only for a key pressed twice in a
//! row). A user's figure is the lowest share over their scored windows, which is what the rule
//! compares with its floor; the quantiles are over users.

use std::path::PathBuf;

use metronome::agent::labels::KeyLabeler;
use metronome::config::Config;
use metronome::dataset::{self, MacroUser, Split};
use metronome_core::detect::{Detector, Output};
use metronome_core::event::KeyEvent;
use metronome_core::macrogen::MacroFamily;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Key-recurrence figures.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Which humans to read (and to build macro users from).
    #[arg(long, value_enum, default_value = "train")]
    split: Split,
    /// Replace every key by the agent's labels of this lifetime (`agent::labels`; 0: one
    /// label per key per session).
    #[arg(long)]
    key_labels: Option<u32>,
    /// Macro users per family.
    #[arg(long, default_value_t = 200)]
    per_family: usize,
    /// RNG seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print the humans whose lowest share is at or below this.
    #[arg(long)]
    show_below: Option<f64>,
    /// Human keylogs (default: both Aalto files in ../shared/data).
    files: Vec<PathBuf>,
}

/// The lowest `key_recurrence_share` over a user's scored windows (None: no window scored).
fn lowest_share(detector: &mut Detector, events: &[KeyEvent]) -> Option<f64> {
    let outputs = detector.score_recording_reported("user", events, &[], None).expect("no model to fail");
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Window(w) => Some(w.features.key_recurrence_share),
            _ => None,
        })
        .min_by(f64::total_cmp)
}

/// Quantiles of `values` as one table row.
fn row(name: &str, mut values: Vec<f64>) -> String {
    values.sort_by(f64::total_cmp);
    let q = |p: f64| values.get(((values.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    format!(
        "| {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
        values.len(),
        q(0.0),
        q(0.001),
        q(0.01),
        q(0.5),
        q(1.0)
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Args { split, key_labels, per_family, seed, show_below, mut files } = clap::Parser::parse();
    if files.is_empty() {
        files = dataset::default_keylogs();
    }
    let mut detector = Detector::new(Config::load(None)?.detector)?;
    let mut labelled = 0u64;
    let mut label = |events: &[KeyEvent]| match key_labels {
        Some(lifetime) => {
            labelled += 1;
            KeyLabeler::seeded(labelled, lifetime).label_events(events)
        }
        None => events.to_vec(),
    };
    let humans = dataset::humans_by_split(&files)?.remove(&split).unwrap_or_default();
    let keys = key_labels.map_or("key codes".to_owned(), |n| format!("agent key labels of {n} presses"));
    println!("Split `{}`, {keys}: each user's lowest key_recurrence_share over their windows.\n", split.name());
    println!("| users | n | min | 0.1 % | 1 % | median | max |");
    println!("|---|---|---|---|---|---|---|");
    let mut human_lows = Vec::new();
    for (user, events) in &humans {
        if let Some(low) = lowest_share(&mut detector, &label(events)) {
            if show_below.is_some_and(|b| low <= b) {
                eprintln!("{user}: {low:.3}");
            }
            human_lows.push(low);
        }
    }
    println!("{}", row("humans", human_lows));
    let recordings: Vec<&Vec<KeyEvent>> = humans.values().collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for family in MacroFamily::ALL {
        let mut lows = Vec::new();
        for i in 0..per_family {
            let rec = recordings[rng.random_range(0..recordings.len())];
            let m = MacroUser::generate(family, rec, 1_600_000_000_000_000 + i as i64 * 1_000_000_000, 200, &mut rng);
            lows.extend(lowest_share(&mut detector, &label(&m.events)));
        }
        println!("{}", row(family.name(), lows));
    }
    Ok(())
}
