//! Detection quality on real humans and generated macros: the figures in `docs/detection.md`
//! and `models/EVAL.md`.
//!
//! ```text
//! cargo run --release --example evaluate -- [--split train|validation|test] [--per-family N]
//!     [--seed S] [--config FILE] [--model embedded|none|MANIFEST] [--key-labels N]
//!     [HUMAN_KEYLOG ...]
//! ```
//! The per-press model runs beside the window model as `model.press_manifest` says (set it to
//! `none` in `--config` to measure the window model alone).
//! ```text
//! ```
//! Users are split as `metronome::dataset::Split` says: figures are reported on `test`, users
//! no training or tuning saw. Every user runs twice, with the timing rules alone and with the
//! configured model combined, so the table shows what the LSTM adds. A human is flagged when any
//! alert is raised for them. Macro users are generated per family (200 presses), with synthetic
//! holds and again with holds drawn from a human recording ("humanized"); mixed sessions switch a
//! macro on after 60-150 human presses and count presses from onset to the first alert.
//! ROC-AUC is over users: each user's highest window score, humans against macro users.
//! `--windows-csv FILE` also writes every window's scores (`group,user,timing,lstm_log_odds`)
//! for tuning the policy's sequential test offline; it never reads the test split's labels back.

use std::path::PathBuf;

use metronome::agent::key_sums::KeySumsReporter;
use metronome::agent::labels::KeyLabeler;
use metronome::config::{Config, ModelSource};
use metronome::dataset::{self, MacroUser, Split};
use metronome_core::detect::dependence::KeySums;
use metronome_core::detect::histogram::naive_bin_share;
use metronome_core::detect::{Detector, Output, RuleSet, SequenceScorer};
use metronome_core::event::{KeyAction, KeyEvent};
use metronome_core::macrogen::MacroFamily;
use metronome_model::LstmModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What one run of one user gave.
#[derive(Default)]
struct Outcome {
    /// (event time, reasons) of each alert.
    alerts: Vec<(i64, RuleSet)>,
    max_score: f64,
    max_timing: f64,
    max_lstm: f64,
    windows: u64,
    /// (timing score, LSTM score) of every window, in order.
    scores: Vec<(f64, Option<f64>)>,
}

fn run_user(
    detector: &mut Detector,
    model: Option<&mut dyn SequenceScorer>,
    events: &[KeyEvent],
    reports: &[(usize, KeySums)],
) -> Outcome {
    let outputs = detector.score_recording_reported("user", events, reports, model).expect("model scores");
    let mut o = Outcome::default();
    for out in outputs {
        match out {
            Output::Window(w) => {
                o.windows += 1;
                o.max_score = o.max_score.max(w.score);
                o.max_timing = o.max_timing.max(w.timing_score);
                o.max_lstm = o.max_lstm.max(w.lstm_score.unwrap_or(0.0));
                o.scores.push((w.timing_score, w.lstm_score));
            }
            Output::Alert(a) => o.alerts.push((a.window.window_end_us, a.reasons)),
            Output::IncidentClosed { .. } | Output::Fingerprint { .. } => {}
        }
    }
    o
}

/// The original system's rule on the same windows (last 50 downs, every 10, from the 30th),
/// with the same threshold and 2-of-3 confirmation: fixed 10 ms bins, no repeat handling, no
/// clock handling. True when it would have flagged the user.
fn original_rule_flags(events: &[KeyEvent], threshold: f64) -> bool {
    let downs: Vec<i64> = events.iter().filter(|e| e.action == KeyAction::Down).map(|e| e.time_us).collect();
    let mut recent: Vec<bool> = Vec::new();
    for end in (30..=downs.len()).step_by(10) {
        let window = &downs[end.saturating_sub(50)..end];
        let intervals: Vec<i64> = window.windows(2).map(|w| w[1] - w[0]).collect();
        recent.push(naive_bin_share(&intervals, 10_000) >= threshold);
        let last3 = &recent[recent.len().saturating_sub(3)..];
        if last3.iter().filter(|s| **s).count() >= 2 {
            return true;
        }
    }
    false
}

/// ROC-AUC of `pos` against `neg` (Mann-Whitney, ties half).
fn roc_auc(neg: &[f64], pos: &[f64]) -> f64 {
    if neg.is_empty() || pos.is_empty() {
        return f64::NAN;
    }
    let mut all: Vec<(f64, bool)> = neg.iter().map(|s| (*s, false)).chain(pos.iter().map(|s| (*s, true))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += rank * all[i..=j].iter().filter(|x| x.1).count() as f64;
        i = j + 1;
    }
    let (p, n) = (pos.len() as f64, neg.len() as f64);
    (rank_sum - p * (p + 1.0) / 2.0) / (p * n)
}

fn median(mut v: Vec<usize>) -> String {
    v.sort_unstable();
    v.get(v.len() / 2).map_or("-".to_owned(), |d| d.to_string())
}

/// "first quartile-third quartile" of `v`.
fn quartiles(mut v: Vec<usize>) -> String {
    v.sort_unstable();
    match (v.get(v.len() / 4), v.get(3 * v.len() / 4)) {
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "-".to_owned(),
    }
}

fn pct(n: usize, of: usize) -> f64 {
    100.0 * n as f64 / of.max(1) as f64
}

/// Detection figures on real humans and generated macros.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Which users to evaluate.
    #[arg(long, value_enum, default_value = "test")]
    split: Split,
    /// Generated macro users per family.
    #[arg(long, default_value_t = 300)]
    per_family: usize,
    /// RNG seed for the macro users.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Detector configuration layered over the defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The LSTM: `embedded`, `none` or a manifest path (default: the configuration's).
    #[arg(long)]
    model: Option<String>,
    /// Also write every window's scores here, as CSV (humans and pure macro users).
    #[arg(long)]
    windows_csv: Option<PathBuf>,
    /// Score every user with their keys replaced by the agent's labels of this lifetime
    /// (`agent::labels`; 0: one label per key per session) and, for short-lived ones, the
    /// key-dependence sums the agent sends beside them (`agent::key_sums`), as a stream from
    /// `metronome agent` carries them; without it, the recordings' key codes.
    #[arg(long)]
    key_labels: Option<u32>,
    /// Human keylogs (default: both Aalto files in ../shared/data).
    files: Vec<PathBuf>,
}

/// Writes windows' scores for offline tuning: one row per window.
struct WindowsCsv(Option<std::io::BufWriter<std::fs::File>>);

impl WindowsCsv {
    fn create(path: Option<&std::path::Path>) -> std::io::Result<Self> {
        let Some(path) = path else { return Ok(Self(None)) };
        let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
        use std::io::Write;
        writeln!(w, "group,user,timing,lstm_log_odds")?;
        Ok(Self(Some(w)))
    }

    fn write(&mut self, group: &str, user: usize, o: &Outcome) -> std::io::Result<()> {
        use std::io::Write;
        let Some(w) = &mut self.0 else { return Ok(()) };
        for (timing, lstm) in &o.scores {
            let x = lstm.map_or(String::new(), |s| format!("{:.4}", metronome_core::detect::policy::log_odds(s)));
            writeln!(w, "{group},{user},{timing:.4},{x}")?;
        }
        Ok(())
    }
}

/// Per-user maxima for the ROC table: (combined, timing, lstm).
#[derive(Default)]
struct Maxima(Vec<f64>, Vec<f64>, Vec<f64>);

impl Maxima {
    fn push(&mut self, o: &Outcome) {
        self.0.push(o.max_score);
        self.1.push(o.max_timing);
        self.2.push(o.max_lstm);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Args { split, per_family, seed, config, model, windows_csv, key_labels, mut files } = clap::Parser::parse();
    let mut csv = WindowsCsv::create(windows_csv.as_deref())?;
    if files.is_empty() {
        files = dataset::default_keylogs();
    }
    let mut cfg = Config::load(config.as_deref())?;
    if let Some(m) = model {
        cfg.model.manifest = m;
    }
    let threshold = cfg.detector.rules.histogram_threshold;
    let mut lstm = match cfg.model.source() {
        ModelSource::Embedded => Some(LstmModel::embedded()?),
        ModelSource::Manifest(p) => Some(LstmModel::load(&p)?),
        ModelSource::None => None,
    };
    if let Some(window_model) = lstm.take() {
        lstm = Some(match metronome::service::load_press_model(&cfg)? {
            Some(press) => window_model.with_press_model(press),
            None => window_model,
        });
    }
    let model_name = lstm.as_ref().map_or("none".to_owned(), |m| match m.press_model() {
        Some(press) => format!("{} + {}", m.manifest().id(), press.id()),
        None => m.manifest().id(),
    });
    let mut detector = Detector::new(cfg.detector)?;
    let mut labelled_users = 0u64;
    let mut both = |detector: &mut Detector, events: &[KeyEvent]| {
        // What an agent with these labels sends: the labels, and with short-lived ones the key
        // sums over the real keys.
        let (labelled, reports) = match key_labels {
            Some(lifetime) => {
                labelled_users += 1;
                let reports = if lifetime > 0 { KeySumsReporter::reports_of(events) } else { Vec::new() };
                (Some(KeyLabeler::seeded(labelled_users, lifetime).label_events(events)), reports)
            }
            None => (None, Vec::new()),
        };
        let events = labelled.as_deref().unwrap_or(events);
        let timing = run_user(detector, None, events, &reports);
        let combined = run_user(detector, lstm.as_mut().map(|m| m as &mut dyn SequenceScorer), events, &reports);
        (timing, combined)
    };

    let humans = dataset::humans_by_split(&files)?.remove(&split).unwrap_or_default();
    let keys = key_labels.map_or("key codes".to_owned(), |n| format!("agent key labels of {n} presses"));
    println!("Split `{}`, model `{model_name}`, seed {seed}, {keys}.\n", split.name());

    // Humans.
    let (mut flagged, mut flagged_timing, mut original) = (Vec::new(), 0usize, 0usize);
    let (mut windows, mut presses) = (0u64, 0usize);
    let mut human_max = Maxima::default();
    for (n, (user, events)) in humans.iter().enumerate() {
        original += usize::from(original_rule_flags(events, threshold));
        presses += events.iter().filter(|e| e.action == KeyAction::Down).count();
        let (timing, combined) = both(&mut detector, events);
        csv.write("human", n, &combined)?;
        windows += combined.windows;
        human_max.push(&combined);
        flagged_timing += usize::from(!timing.alerts.is_empty());
        if !combined.alerts.is_empty() {
            let reasons = combined.alerts.iter().fold(RuleSet::EMPTY, |a, (_, r)| a.union(*r));
            flagged.push((format!("{user} (#{n})"), reasons.names()));
        }
    }
    println!("## Humans\n");
    println!("{} users, {presses} presses, {windows} windows.\n", humans.len());
    println!("| scorer | users flagged | share |");
    println!("|---|---|---|");
    println!("| timing rules alone | {flagged_timing} | {:.3} % |", pct(flagged_timing, humans.len()));
    println!("| timing + LSTM (shipped) | {} | {:.3} % |", flagged.len(), pct(flagged.len(), humans.len()));
    println!("| original rule (10 ms bins, at {threshold}) | {original} | {:.3} % |", pct(original, humans.len()));
    for (u, r) in flagged.iter().take(40) {
        eprintln!("flagged human {u}: {r:?}");
    }

    // Macro users.
    let recordings: Vec<&Vec<KeyEvent>> = humans.values().collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut macro_max = Maxima::default();
    let mut auc_rows = Vec::new();
    println!("\n## Macro users ({per_family} per family, 200 presses each, a replay loop two loops and 100 more; a third with humanized holds)\n");
    println!("| family | recall (timing + LSTM) | timing alone | original rule | humanized holds: recall | timing alone | median presses to alert | alerts by scorer (histogram / lstm / both) |");
    println!("|---|---|---|---|---|---|---|---|");
    for family in MacroFamily::ALL {
        let (mut caught, mut caught_timing, mut orig, mut total) = (0, 0, 0, 0);
        let (mut h_caught, mut h_timing, mut h_total) = (0, 0, 0);
        let mut delays = Vec::new();
        let mut by_scorer = [0usize; 3];
        let mut family_max = Maxima::default();
        for i in 0..per_family {
            let rec = recordings[rng.random_range(0..recordings.len())];
            let start = 1_600_000_000_000_000 + i as i64 * 1_000_000_000;
            let m = MacroUser::generate(family, rec, start, 200, &mut rng);
            let (timing, combined) = both(&mut detector, &m.events);
            csv.write(family.name(), i, &combined)?;
            family_max.push(&combined);
            macro_max.push(&combined);
            orig += usize::from(original_rule_flags(&m.events, threshold));
            total += 1;
            caught_timing += usize::from(!timing.alerts.is_empty());
            if m.humanized_holds {
                h_total += 1;
                h_timing += usize::from(!timing.alerts.is_empty());
            }
            if let Some((at, reasons)) = combined.alerts.first() {
                caught += 1;
                h_caught += usize::from(m.humanized_holds);
                delays.push(m.events.iter().filter(|e| e.action == KeyAction::Down && e.time_us <= *at).count());
                let scorers = reasons.scorers();
                by_scorer[match scorers.as_slice() {
                    ["histogram"] => 0,
                    ["lstm"] => 1,
                    _ => 2,
                }] += 1;
            }
        }
        println!(
            "| {} | {:.1} % | {:.1} % | {:.1} % | {:.1} % ({h_caught}/{h_total}) | {:.1} % | {} | {} / {} / {} |",
            family.name(),
            pct(caught, total),
            pct(caught_timing, total),
            pct(orig, total),
            pct(h_caught, h_total),
            pct(h_timing, h_total),
            median(delays),
            by_scorer[0],
            by_scorer[1],
            by_scorer[2],
        );
        auc_rows.push((
            family.name(),
            roc_auc(&human_max.0, &family_max.0),
            roc_auc(&human_max.1, &family_max.1),
            roc_auc(&human_max.2, &family_max.2),
        ));
    }

    println!("\n## ROC-AUC over users (each user's highest window score, humans against macro users)\n");
    println!("| macro users | combined | timing rules | LSTM |");
    println!("|---|---|---|---|");
    for (name, c, t, l) in &auc_rows {
        println!("| {name} | {c:.4} | {t:.4} | {l:.4} |");
    }
    println!(
        "| all families | {:.4} | {:.4} | {:.4} |",
        roc_auc(&human_max.0, &macro_max.0),
        roc_auc(&human_max.1, &macro_max.1),
        roc_auc(&human_max.2, &macro_max.2)
    );

    println!("\n## Mixed sessions (human, then a macro from a random family)\n");
    let (mut caught, mut caught_timing, mut before_onset, mut delays, mut delays_timing) =
        (0, 0, 0, Vec::new(), Vec::new());
    // Family -> (sessions, presses from onset to alert of those caught).
    let mut by_family: std::collections::BTreeMap<&str, (usize, Vec<usize>)> = Default::default();
    for _ in 0..per_family {
        let rec = recordings[rng.random_range(0..recordings.len())];
        let family = MacroFamily::ALL[rng.random_range(0..MacroFamily::ALL.len())];
        let onset = rng.random_range(60..150);
        let m = MacroUser::mixed(family, rec, onset, 200, &mut rng);
        let (timing, combined) = both(&mut detector, &m.events);
        let after = |o: &Outcome| o.alerts.iter().find(|(at, _)| *at >= m.onset_us).map(|(at, _)| *at);
        let presses_to = |at: i64| {
            m.events
                .iter()
                .filter(|e| e.action == KeyAction::Down && e.time_us >= m.onset_us && e.time_us <= at)
                .count()
        };
        before_onset += usize::from(combined.alerts.iter().any(|(at, _)| *at < m.onset_us));
        let family_row = by_family.entry(family.name()).or_default();
        family_row.0 += 1;
        if let Some(at) = after(&combined) {
            caught += 1;
            delays.push(presses_to(at));
            family_row.1.push(presses_to(at));
        }
        if let Some(at) = after(&timing) {
            caught_timing += 1;
            delays_timing.push(presses_to(at));
        }
    }
    println!("| scorer | caught after onset | alerts before onset | median presses from onset to alert |");
    println!("|---|---|---|---|");
    println!(
        "| timing + LSTM | {caught}/{per_family} ({:.1} %) | {before_onset} | {} (quartiles {}, within 20: {}) |",
        pct(caught, per_family),
        median(delays.clone()),
        quartiles(delays.clone()),
        delays.iter().filter(|&&d| d <= 20).count()
    );
    println!(
        "| timing rules alone | {caught_timing}/{per_family} ({:.1} %) | - | {} |",
        pct(caught_timing, per_family),
        median(delays_timing)
    );
    println!(
        "\n| macro family (timing + LSTM) | caught after onset | median presses from onset to alert | quartiles | within 20 |"
    );
    println!("|---|---|---|---|---|");
    for (family, (sessions, delays)) in by_family {
        let within = delays.iter().filter(|&&d| d <= 20).count();
        println!(
            "| {family} | {}/{sessions} | {} | {} | {within} |",
            delays.len(),
            median(delays.clone()),
            quartiles(delays)
        );
    }
    Ok(())
}
