//! The key-dependence test (`detect::dependence`) on real humans and on i.i.d. samplers of
//! their own timing: the per-statistic z-scores behind `rules.key_dependence_z`.
//!
//! ```text
//! cargo run --release --example dependence -- [--split train|validation|test] [--presses P]
//!     [--block B] [HUMAN_KEYLOG ...]
//! ```
//! Humans are read whole; each sampler draws `--presses` presses from one human of the same
//! split (`human_iid`, other families that borrow human timing, and a sampler built to pass
//! this test: whole recorded presses drawn at random, each with its key's own hold and
//! flight). Beside the rule's chi-squared it prints two alternatives that were measured and
//! set aside: the sum without its two largest terms, and the drift statistics alone. A user's
//! figure is their session's weakest verdict: the lowest, over verdicts, of the larger of the
//! recent and the session-wide chi-squared, which is what `keyless_timing` compares with its
//! threshold.

use std::path::PathBuf;

use metronome::agent::labels::KeyLabeler;
use metronome::dataset::{self, Split};
use metronome_core::detect::dependence::{DependenceConfig, DependenceZ, KeyDependence, STATISTICS};
use metronome_core::detect::dependence::{KeyGrouping, KeySums};
use metronome_core::detect::window::Press;
use metronome_core::event::KeyAction;
use metronome_core::macrogen::{self, MacroFamily, MacroSpec, RecordedPress};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Key-dependence figures.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Which humans to read (and to build samplers from).
    #[arg(long, value_enum, default_value = "train")]
    split: Split,
    /// Presses each sampler plays.
    #[arg(long, default_value_t = 600)]
    presses: usize,
    /// Presses per block of the test.
    #[arg(long, default_value_t = 300)]
    block: u32,
    /// Keys (and key pairs) gathered at once.
    #[arg(long, default_value_t = 64)]
    open_groups: u16,
    /// Print the humans whose chi-squared stays below this.
    #[arg(long)]
    show_below: Option<f32>,
    /// RNG seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Replace every key by the agent's labels of this lifetime (`agent::labels`; 0: one label
    /// per key per session) and, for short-lived ones, report the key sums the agent sends
    /// beside them (`agent::key_sums`), as a stream from `metronome agent` carries them.
    #[arg(long)]
    key_labels: Option<u32>,
    /// Human keylogs (default: both Aalto files in ../shared/data).
    files: Vec<PathBuf>,
}

/// The sum of squares without the two largest: what a sampler forging one or two dependences
/// still lacks.
fn trimmed(z: &DependenceZ) -> f32 {
    trimmed_sum(z.all())
}

fn trimmed_sum(z: [f32; STATISTICS]) -> f32 {
    let mut sq = z.map(|x| x * x);
    sq.sort_by(f32::total_cmp);
    sq[..STATISTICS - 2].iter().sum()
}

/// A sampler that keeps the keys' own timing: each press is a random recorded press (its key,
/// its hold and the flight into it), so holds and flights follow their keys as the person's do.
fn key_conditioned(rec: &[RecordedPress], presses: usize, rng: &mut impl rand::Rng) -> Vec<RecordedPress> {
    let mut t = 1_700_000_000_000_000;
    (0..presses)
        .map(|_| {
            let j = rng.random_range(1..rec.len());
            t += (rec[j].down_us - rec[j - 1].down_us).clamp(1_000, 1_500_000);
            RecordedPress { down_us: t, key: rec[j].key, hold_us: rec[j].hold_us }
        })
        .collect()
}

fn press_of(p: &RecordedPress) -> Press {
    Press { down_us: p.down_us, key: p.key, hold_us: i32::try_from(p.hold_us).unwrap_or(i32::MAX), repeats: 0 }
}

/// What an agent with key labels of `lifetime` presses sends of `presses`: the labelled
/// presses, and with short-lived labels the key sums over the real keys, `(i, sums)` arriving
/// before press `i`. `None`: the key codes themselves.
fn as_sent(
    cfg: &DependenceConfig,
    lifetime: Option<u32>,
    seed: u64,
    presses: &[RecordedPress],
) -> (Vec<RecordedPress>, Vec<(usize, KeySums)>) {
    let Some(lifetime) = lifetime else { return (presses.to_vec(), Vec::new()) };
    let mut labels = KeyLabeler::seeded(seed, lifetime);
    let labelled = presses
        .iter()
        .map(|p| {
            let key = labels.label(p.key, KeyAction::Down);
            labels.label(p.key, KeyAction::Up);
            RecordedPress { key, ..*p }
        })
        .collect();
    let mut grouping = KeyGrouping::default();
    let reports = match lifetime {
        0 => Vec::new(),
        _ => presses
            .iter()
            .enumerate()
            .filter_map(|(i, p)| grouping.push(cfg, &press_of(p)).map(|s| (i + 1, s)))
            .collect(),
    };
    (labelled, reports)
}

/// The session's weakest verdict (its horizon with the larger chi-squared, as the rule reads
/// it), given what the agent sent.
fn weakest(
    cfg: &DependenceConfig,
    (presses, reports): &(Vec<RecordedPress>, Vec<(usize, KeySums)>),
) -> Option<DependenceZ> {
    let mut d = KeyDependence::default();
    let mut worst: Option<DependenceZ> = None;
    let mut seen = None;
    let mut reports = reports.iter().peekable();
    // A verdict comes at a block's end, or with the agent's sums for it.
    let mut consider = |d: &KeyDependence| {
        if let Some(v) = d.verdict().filter(|v| Some(*v) != seen) {
            seen = Some(v);
            let z = if v.z.chi2() >= v.session_z.chi2() { v.z } else { v.session_z };
            if worst.is_none_or(|w| z.chi2() < w.chi2()) {
                worst = Some(z);
            }
        }
    };
    for (i, p) in presses.iter().enumerate() {
        while let Some((_, sums)) = reports.next_if(|(at, _)| *at <= i) {
            d.report(cfg, sums);
            consider(&d);
        }
        d.push(cfg, &press_of(p));
        consider(&d);
    }
    for (_, sums) in reports {
        d.report(cfg, sums);
        consider(&d);
    }
    worst
}

fn quantiles(label: &str, mut xs: Vec<f32>) {
    if xs.is_empty() {
        println!("| {label} | 0 | - | - | - | - | - |");
        return;
    }
    xs.sort_by(f32::total_cmp);
    let q = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize];
    println!(
        "| {label} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        xs.len(),
        xs[0],
        q(0.001),
        q(0.01),
        q(0.5),
        q(0.99)
    );
}

fn report(name: &str, zs: &[DependenceZ]) {
    println!("\n{name}: lowest verdict per user\n");
    println!("| statistic | users | min | p0.1 | p1 | median | p99 |");
    println!("|---|---|---|---|---|---|---|");
    quantiles("hold by key", zs.iter().map(|z| z.hold_by_key).collect());
    quantiles("flight by key", zs.iter().map(|z| z.flight_by_key).collect());
    quantiles("flight by key pair", zs.iter().map(|z| z.flight_by_pair).collect());
    quantiles("flight drift", zs.iter().map(|z| z.flight_drift).collect());
    quantiles("hold drift", zs.iter().map(|z| z.hold_drift).collect());
    quantiles("flight pace", zs.iter().map(|z| z.flight_pace).collect());
    quantiles("hold pace", zs.iter().map(|z| z.hold_pace).collect());
    quantiles("hold then flight", zs.iter().map(|z| z.hold_flight).collect());
    quantiles("chi2 (8 df)", zs.iter().map(DependenceZ::chi2).collect());
    let five = |z: &DependenceZ| z.all()[..5].iter().map(|x| x * x).sum::<f32>();
    quantiles("chi2 of the first five", zs.iter().map(five).collect());
    println!("\nusers whose first-five chi2 stays below 20: {}", zs.iter().filter(|z| five(z) < 20.0).count());
    let below: Vec<String> = [20.09f32, 24.0, 26.12, 30.0, 35.0]
        .iter()
        .map(|t| format!("{t}: {}", zs.iter().filter(|z| z.chi2() < *t).count()))
        .collect();
    println!("\nusers whose chi2 stays below t: {}", below.join(", "));
    let drifts = |z: &DependenceZ| z.all()[3..].iter().map(|x| x * x).sum::<f32>();
    quantiles("chi2 of the five drifts", zs.iter().map(drifts).collect());
    println!(
        "users whose five-drift chi2 stays below 20.5 (its 99.9 % point): {}",
        zs.iter().filter(|z| drifts(z) < 20.5).count()
    );
    quantiles("chi2 without the two largest", zs.iter().map(trimmed).collect());
    let below: Vec<String> = [8.0f32, 10.0, 12.0, 15.0]
        .iter()
        .map(|t| format!("{t}: {}", zs.iter().filter(|z| trimmed(z) < *t).count()))
        .collect();
    println!("users whose trimmed chi2 stays below t: {}", below.join(", "));
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Args { split, presses, block, open_groups, show_below, seed, key_labels, mut files } = clap::Parser::parse();
    if files.is_empty() {
        files = dataset::default_keylogs();
    }
    let cfg = DependenceConfig { block_presses: block, open_groups, ..DependenceConfig::default() };
    let humans = dataset::humans_by_split(&files)?.remove(&split).unwrap_or_default();
    let recordings: Vec<Vec<RecordedPress>> = humans.values().map(|e| macrogen::recorded_presses(e)).collect();
    // What an agent would have sent, per user and per sampler below.
    let mut sent = 0u64;
    let mut sent_of = |presses: &[RecordedPress]| {
        sent += 1;
        as_sent(&cfg, key_labels, sent, presses)
    };
    let human_z: Vec<DependenceZ> = recordings.iter().filter_map(|r| weakest(&cfg, &sent_of(r))).collect();
    println!(
        "Split `{}`, block {block} presses (verdicts over {}), samplers of {presses} presses, seed {seed}, {}.",
        split.name(),
        2 * block,
        key_labels.map_or("key codes".to_owned(), |n| format!("agent key labels of {n} presses"))
    );
    println!("Humans: {} users, {} with a verdict.", recordings.len(), human_z.len());
    report("Humans", &human_z);
    if let Some(t) = show_below {
        for r in &recordings {
            let Some(z) = weakest(&cfg, &as_sent(&cfg, key_labels, 0, r)) else { continue };
            if z.chi2() < t {
                let keys: std::collections::BTreeSet<u32> = r.iter().map(|p| p.key).collect();
                let mut holds: Vec<i64> = r.iter().map(|p| p.hold_us / 1000).collect();
                holds.sort_unstable();
                let mut flights: Vec<i64> = r.windows(2).map(|w| (w[1].down_us - w[0].down_us) / 1000).collect();
                flights.sort_unstable();
                println!(
                    "weak human: {} presses, {} keys, hold median {} ms (p10 {}, p90 {}), flight median {} ms; {z:?}",
                    r.len(),
                    keys.len(),
                    holds[holds.len() / 2],
                    holds[holds.len() / 10],
                    holds[holds.len() * 9 / 10],
                    flights[flights.len() / 2]
                );
            }
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for family in
        [MacroFamily::HumanIid, MacroFamily::HumanReplay, MacroFamily::HumanSampled, MacroFamily::GaussianJitter]
    {
        let zs: Vec<DependenceZ> = recordings
            .iter()
            .filter(|r| r.len() >= 100)
            .take(2_000)
            .filter_map(|rec| {
                let spec = MacroSpec::random(family, &mut rng);
                let events = macrogen::generate(&spec, rec, 1_700_000_000_000_000, presses, &mut rng);
                weakest(&cfg, &sent_of(&macrogen::recorded_presses(&events)))
            })
            .collect();
        report(family.name(), &zs);
    }
    let zs: Vec<DependenceZ> = recordings
        .iter()
        .filter(|r| r.len() >= 100)
        .take(2_000)
        .filter_map(|rec| weakest(&cfg, &sent_of(&key_conditioned(rec, presses, &mut rng))))
        .collect();
    report("key-conditioned sampler", &zs);
    // The trimmed sum's null: eight independent standard normals.
    let mut null: Vec<f32> = (0..200_000)
        .map(|_| trimmed_sum(std::array::from_fn(|_| rand_distr::Distribution::sample(&StandardNormal, &mut rng))))
        .collect();
    null.sort_by(f32::total_cmp);
    println!("\ntrimmed sum under the null: 99 % point {:.2}, 99.9 % point {:.2}", null[198_000], null[199_800]);
    Ok(())
}
