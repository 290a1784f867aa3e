//! Fleet detection on real humans and generated fleets: the figures in `docs/detection.md`.
//!
//! ```text
//! cargo run --release --example fleets -- [--split train|validation|test] [--fleets N]
//!     [--presses P] [--seed S] [--config FILE] [HUMAN_KEYLOG ...]
//! ```
//! Every human of the split and every fleet account runs through the detector (its fingerprints
//! only), then all sightings go through the fleet stages' logic at once (`fleets_offline`).
//! Scripts are drawn from training-split recordings (validation's when the training split is evaluated). Humans are aligned to start together, the harshest case: everyone typing within the same
//! window. Each fleet is 5-10 accounts playing one script of a family from their own points with 1-5 ms of their own jitter,
//! starting within ten minutes of each other. A fleet account is caught when a fleet report
//! names it; a human is a false alarm when any report names them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use metronome::config::Config;
use metronome::dataset::{self, Split};
use metronome_core::detect::fleet::{fleets_offline, FingerprintSeen};
use metronome_core::detect::{Detector, Output};
use metronome_core::event::KeyEvent;
use metronome_core::macrogen::{self, FleetScript, MacroFamily, MacroSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Fleet detection figures.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Which humans to evaluate against.
    #[arg(long, value_enum, default_value = "test")]
    split: Split,
    /// Fleets per family.
    #[arg(long, default_value_t = 40)]
    fleets: usize,
    /// Presses each fleet account plays.
    #[arg(long, default_value_t = 600)]
    presses: usize,
    /// RNG seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Every account's jitter on every flight and hold, +- ms (default: 1-5 ms, drawn per
    /// account), for the sweep of a fleet built to pass the quanta.
    #[arg(long)]
    jitter_ms: Option<i64>,
    /// Detector configuration layered over the defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also list the accounts of every report that names more than one fleet (or a human).
    #[arg(long)]
    list_mixed: bool,
    /// Human keylogs (default: both Aalto files in ../shared/data).
    files: Vec<PathBuf>,
}

/// The fingerprints `events` produce for `user`, their times shifted by `shift_us`.
fn sightings(detector: &mut Detector, user: &str, events: &[KeyEvent], shift_us: i64) -> Vec<(u64, FingerprintSeen)> {
    let outputs = detector.score_recording(user, events, None).expect("no model, no model error");
    outputs
        .into_iter()
        .filter_map(|o| match o {
            Output::Fingerprint { fingerprint, at_us } => {
                Some((fingerprint, FingerprintSeen { user: user.to_owned(), at_us: at_us + shift_us }))
            }
            _ => None,
        })
        .collect()
}

const FAMILIES: [MacroFamily; 8] = MacroFamily::ALL;

/// Scripts with no timing of their own beyond an interval: the fleet stages leave them to the
/// timing rules (which catch each account), since two unrelated users of one interval setting
/// would share their fingerprints too.
const REGULAR: [MacroFamily; 2] = [MacroFamily::Fixed, MacroFamily::OsTick];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Args { split, fleets, presses, seed, jitter_ms, config, list_mixed, mut files } = clap::Parser::parse();
    if files.is_empty() {
        files = dataset::default_keylogs();
    }
    let cfg = Config::load(config.as_deref())?;
    let fleet_cfg = cfg.detector.fleet.clone();
    let mut detector = Detector::new(cfg.detector)?;
    // Scripts come from another split's recordings (the training split's, or validation's when
    // tuning on training), so no evaluated human is a script's source (a replay of someone's
    // recording shares their timing by construction).
    let mut by_split = dataset::humans_by_split(&files)?;
    let humans = by_split.remove(&split).unwrap_or_default();
    let source_split = if split == Split::Train { Split::Validation } else { Split::Train };
    let sources = by_split.remove(&source_split).unwrap_or_default();
    const START: i64 = 1_700_000_000_000_000;
    let mut all = Vec::new();
    let mut human_fingerprints = 0usize;
    for (user, events) in &humans {
        let first = events.iter().map(|e| e.time_us).min().unwrap_or(0);
        let mut s = sightings(&mut detector, &format!("human-{user}"), events, START - first);
        human_fingerprints += s.len();
        all.append(&mut s);
    }
    let humans_only = fleets_offline(&fleet_cfg, &mut all.clone());
    let human_named: BTreeSet<String> = humans_only.iter().flat_map(|r| r.accounts.iter().cloned()).collect();

    let recordings: Vec<&Vec<KeyEvent>> = sources.values().collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut accounts_of: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut fleet_sizes = Vec::new();
    for family in FAMILIES {
        for f in 0..fleets {
            let rec = macrogen::recorded_presses(recordings[rng.random_range(0..recordings.len())]);
            let spec = MacroSpec::random(family, &mut rng);
            let script = FleetScript::generate(&spec, &rec, rng.random_range(200..=1000), &mut rng);
            let size = rng.random_range(5..=10);
            fleet_sizes.push(size);
            let start = START + rng.random_range(0..3_600_000_000);
            let played = match jitter_ms {
                None => macrogen::fleet(&script, size, start, 600_000_000, presses, &mut rng),
                Some(ms) => (0..size)
                    .map(|_| {
                        let (at, phase) =
                            (start + rng.random_range(0..=600_000_000), rng.random_range(0..script.len()));
                        script.play(at, phase, presses, ms * 1000, &mut rng)
                    })
                    .collect(),
            };
            for (a, events) in played.iter().enumerate() {
                let user = format!("fleet-{}-{f}-{a}", family.name());
                all.append(&mut sightings(&mut detector, &user, events, 0));
                accounts_of.entry(family.name()).or_default().push(user);
            }
        }
    }
    let reports = fleets_offline(&fleet_cfg, &mut all);
    let named: BTreeSet<String> = reports.iter().flat_map(|r| r.accounts.iter().cloned()).collect();
    let humans_named_with_fleets = named.iter().filter(|u| u.starts_with("human-")).count();

    let jitter = jitter_ms.map_or("1-5 ms per account".to_owned(), |ms| format!("+-{ms} ms"));
    println!("Split `{}`, seed {seed}, {presses} presses per fleet account, jitter {jitter}.\n", split.name());
    println!(
        "Humans: {} users aligned to start together, {human_fingerprints} fingerprints; named in a fleet: {} alone, {humans_named_with_fleets} with the fleets mixed in.\n",
        humans.len(),
        human_named.len(),
    );
    println!("| fleet script family | fleets | accounts | accounts named | share |");
    println!("|---|---|---|---|---|");
    // Per family: (accounts, named, a regular script's); rows, then the two sums.
    let regular_names: Vec<&str> = REGULAR.iter().map(|f| f.name()).collect();
    let counts: Vec<(&str, usize, usize, bool)> = accounts_of
        .iter()
        .map(|(family, accounts)| {
            let n = accounts.iter().filter(|a| named.contains(*a)).count();
            (*family, accounts.len(), n, regular_names.contains(family))
        })
        .collect();
    for (family, accounts, n, _) in &counts {
        println!("| {family} | {fleets} | {accounts} | {n} | {:.1} % |", 100.0 * *n as f64 / (*accounts).max(1) as f64);
    }
    let sum =
        |keep: &dyn Fn(bool) -> bool| counts.iter().filter(|c| keep(c.3)).fold((0, 0), |(t, n), c| (t + c.1, n + c.2));
    for (label, (total, caught), families) in [
        ("all but fixed and os_tick", sum(&|regular| !regular), FAMILIES.len() - REGULAR.len()),
        ("all", sum(&|_| true), FAMILIES.len()),
    ] {
        println!(
            "| {label} | {} | {total} | {caught} | {:.1} % |",
            fleets * families,
            100.0 * caught as f64 / total.max(1) as f64
        );
    }
    let fleet_of = |account: &String| account.rsplit_once('-').map_or(account.clone(), |(p, _)| p.to_owned());
    let mixed: Vec<_> =
        reports.iter().filter(|r| r.accounts.iter().map(fleet_of).collect::<BTreeSet<_>>().len() > 1).collect();
    if list_mixed {
        for r in &mixed {
            println!("mixed report: {} (new: {})", r.accounts.join(" "), r.new_accounts.join(" "));
        }
    }
    let mixed = mixed.len();
    println!("\n{} fleet reports; {mixed} name accounts of more than one fleet (or a human).", reports.len());
    Ok(())
}
