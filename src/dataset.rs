//! Labelled data for training and evaluating the scorers: user splits, human recordings and
//! generated macro users, and their windows as the detector encodes them.
//!
//! Users are split by a stable hash of their id, so a user never lands in two splits and every
//! tool (the training export, the evaluation) agrees on who is where: half the users are the
//! test split, which no threshold and no training ever sees; the other half (the half the
//! timing rules were tuned on) is split 4:1 into train and validation.
//!
//! # Layout
//! - [`Split`] / [`Split::of`]: the user splits; [`humans_by_split`] reads recordings into them.
//! - [`MacroUser`]: one generated macro user (or mixed session) with its ground truth.
//! - [`encoded_windows`]: a recording through the detector, every window encoded as the LSTM
//!   reads it, with its timing score and time span.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::Rng;

use metronome_core::detect::{Detector, Output, ScoringBatch, UserState};
use metronome_core::event::{KeyAction, KeyEvent};
use metronome_core::keylog::{KeylogError, KeylogReader};
use metronome_core::macrogen::{self, HoldModel, MacroFamily, MacroSpec};

/// Which part of the data a user belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Fits the model.
    Train,
    /// Chooses epochs, thresholds and the score combination.
    Validation,
    /// Reported figures only: users no training or tuning saw.
    Test,
}

impl Split {
    /// Every split.
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    /// The split `user` belongs to.
    pub fn of(user: &str) -> Split {
        // FNV-1a: stable across runs and platforms, unlike std's hasher.
        let h = user.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        match (h % 2, (h / 2) % 5) {
            (1, _) => Split::Test,
            (_, 0) => Split::Validation,
            _ => Split::Train,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

/// The recordings the evaluation tools read when given none: both Aalto files in
/// `../shared/data` (never committed; see its README).
pub fn default_keylogs() -> Vec<PathBuf> {
    ["aalto-a-train.csv.gz", "aalto-b-train.csv.gz"].iter().map(|f| PathBuf::from("../shared/data").join(f)).collect()
}

/// Every user of `files`, by split and then by id, each user's events in file order (a user in
/// several files keeps them all).
pub fn humans_by_split(files: &[PathBuf]) -> Result<BTreeMap<Split, BTreeMap<String, Vec<KeyEvent>>>, KeylogError> {
    let mut humans: BTreeMap<Split, BTreeMap<String, Vec<KeyEvent>>> = BTreeMap::new();
    for f in files {
        for r in KeylogReader::open(f)? {
            let r = r?;
            humans.entry(Split::of(&r.user_id)).or_default().entry(r.user_id).or_default().push(r.event);
        }
    }
    Ok(humans)
}

/// A generated macro user and the truth about it.
#[derive(Debug, Clone)]
pub struct MacroUser {
    /// The macro's family.
    pub family: MacroFamily,
    /// Whether the holds were drawn from the human recording (a "humanized" macro).
    pub humanized_holds: bool,
    /// Down time of the macro's first press; for a pure macro user, its first event.
    pub onset_us: i64,
    /// Human presses before the onset (0 for a pure macro user).
    pub human_presses: usize,
    /// All events in time order.
    pub events: Vec<KeyEvent>,
}

impl MacroUser {
    /// A pure macro user of `family` with `presses` presses. A third of the families that use
    /// synthetic holds get humanized (recorded) holds instead.
    pub fn generate(
        family: MacroFamily,
        recording: &[KeyEvent],
        start_us: i64,
        presses: usize,
        rng: &mut impl Rng,
    ) -> Self {
        let spec = Self::spec(family, rng);
        let presses = spec.presses_to_watch(presses);
        let events = macrogen::generate(&spec, &macrogen::recorded_presses(recording), start_us, presses, rng);
        let humanized_holds = Self::humanized(&spec);
        Self { family, humanized_holds, onset_us: start_us, human_presses: 0, events }
    }

    /// A human session from `recording` with a macro of `family` switched on after
    /// `human_presses` presses.
    pub fn mixed(
        family: MacroFamily,
        recording: &[KeyEvent],
        human_presses: usize,
        macro_presses: usize,
        rng: &mut impl Rng,
    ) -> Self {
        let spec = Self::spec(family, rng);
        let macro_presses = spec.presses_to_watch(macro_presses);
        let (events, onset_us) = macrogen::human_then_macro(recording, human_presses, &spec, macro_presses, rng);
        let humanized_holds = Self::humanized(&spec);
        Self { family, humanized_holds, onset_us, human_presses, events }
    }

    fn spec(family: MacroFamily, rng: &mut impl Rng) -> MacroSpec {
        let mut spec = MacroSpec::random(family, rng);
        if rng.random_bool(1.0 / 3.0) {
            spec.hold = HoldModel::Recorded;
        }
        spec
    }

    fn humanized(spec: &MacroSpec) -> bool {
        matches!(spec.family, MacroFamily::HumanReplay | MacroFamily::ReplayLoop) || spec.hold == HoldModel::Recorded
    }

    /// Share of the presses in `[start_us, end_us]` that the macro made.
    pub fn macro_share(&self, start_us: i64, end_us: i64) -> f64 {
        let (mut all, mut by_macro) = (0u32, 0u32);
        for e in &self.events {
            if e.action == KeyAction::Down && (start_us..=end_us).contains(&e.time_us) {
                all += 1;
                by_macro += u32::from(e.time_us >= self.onset_us);
            }
        }
        if all == 0 {
            0.0
        } else {
            f64::from(by_macro) / f64::from(all)
        }
    }
}

/// One window of a recording, as the sequence model reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedWindow {
    /// Down time of the first press.
    pub start_us: i64,
    /// Down time of the last press.
    pub end_us: i64,
    /// The timing rules' score.
    pub timing_score: f64,
    /// `steps * STEP_WIDTH` values from [`metronome_core::detect::sequence::encode_window`].
    pub steps: Vec<f32>,
}

/// Every window the detector scores over `events` (closing at the end, as `score` does), each
/// encoded with `steps` steps.
pub fn encoded_windows(detector: &mut Detector, events: &[KeyEvent], steps: usize) -> Vec<EncodedWindow> {
    let mut users = [(String::from("u"), UserState::default())];
    let mut batch = ScoringBatch::new(Some(steps));
    for e in events {
        detector.on_event(0, &mut users[0].1, *e, &mut batch);
    }
    detector.close_window(0, &mut users[0].1, &mut batch);
    let encoded = batch.encoded().to_vec();
    let mut out = Vec::new();
    // Without a model the batch decides on timing alone; windows come out in encoding order.
    detector.finish(&mut batch, &mut users, None, &mut out).expect("no model, no model failure");
    let width = steps * metronome_core::detect::sequence::STEP_WIDTH;
    out.into_iter()
        .filter_map(|(_, o)| if let Output::Window(w) = o { Some(w) } else { None })
        .zip(encoded.chunks_exact(width))
        .map(|(w, s)| EncodedWindow {
            start_us: w.window_start_us,
            end_us: w.window_end_us,
            timing_score: w.timing_score,
            steps: s.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metronome_core::detect::DetectorConfig;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn splits_are_stable_and_roughly_sized() {
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            let split = Split::of(&format!("u{i}"));
            assert_eq!(split, Split::of(&format!("u{i}")));
            counts[split as usize] += 1;
        }
        // 40 % train, 10 % validation, 50 % test, within sampling noise.
        assert!((3_700..4_300).contains(&counts[0]), "{counts:?}");
        assert!((800..1_200).contains(&counts[1]), "{counts:?}");
        assert!((4_700..5_300).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn every_window_is_encoded_in_order() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let user = MacroUser::generate(MacroFamily::Fixed, &[], 0, 200, &mut rng);
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let windows = encoded_windows(&mut detector, &user.events, 50);
        // First at 30 presses, then every 10: 30, 40, ..., 200.
        assert_eq!(windows.len(), 18);
        assert!(windows.windows(2).all(|w| w[0].end_us < w[1].end_us));
        assert!(windows.iter().all(|w| w.steps.len() == 50 * metronome_core::detect::sequence::STEP_WIDTH));
        assert_eq!(user.macro_share(windows[0].start_us, windows[0].end_us), 1.0);
    }
}
