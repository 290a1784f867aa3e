//! The detection core on real human typing (the negative class) and on generated macros.

mod common;

use metronome::dataset::{MacroUser, Split};
use metronome_core::detect::{Detector, DetectorConfig, Output, SequenceScorer};
use metronome_core::event::KeyEvent;
use metronome_core::keylog::{self, KeylogReader, UserEvents};
use metronome_core::macrogen::{self, MacroFamily, MacroSpec};
use metronome_model::LstmModel;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn load(name: &str, users: usize) -> Vec<UserEvents> {
    let reader = KeylogReader::open(&common::shared_data(name)).expect("open keylog");
    keylog::group_by_user(reader, |_| true, Some(users)).expect("clean keylog")
}

/// Alerts raised for one user's events, windows closed at the end as `score` does.
fn alerts_for(detector: &mut Detector, user: &str, events: &[KeyEvent]) -> usize {
    detector.score_recording(user, events, None).unwrap().iter().filter(|o| matches!(o, Output::Alert(_))).count()
}

#[test]
fn no_real_human_is_flagged() {
    let mut detector = Detector::new(DetectorConfig::default()).unwrap();
    // Both subsets: A is typical, B has the fast typists and the clock anomalies.
    let mut humans = load("aalto-a-train.csv.gz", 300);
    humans.extend(load("aalto-b-train.csv.gz", 300));
    assert_eq!(humans.len(), 600);
    let flagged: Vec<&str> = humans
        .iter()
        .filter(|(user, events)| alerts_for(&mut detector, user, events) > 0)
        .map(|(user, _)| user.as_str())
        .collect();
    assert!(flagged.is_empty(), "humans flagged: {flagged:?}");
}

#[test]
fn fixed_os_tick_and_jittered_macros_are_caught() {
    let mut detector = Detector::new(DetectorConfig::default()).unwrap();
    let recordings = load("aalto-a-train.csv.gz", 40);
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    for family in [MacroFamily::Fixed, MacroFamily::OsTick, MacroFamily::UniformJitter, MacroFamily::GaussianJitter] {
        let mut missed = 0;
        for (i, (_, human)) in recordings.iter().enumerate() {
            let spec = MacroSpec::random(family, &mut rng);
            let presses = macrogen::recorded_presses(human);
            let events = macrogen::generate(&spec, &presses, 1_700_000_000_000_000 + i as i64, 150, &mut rng);
            if alerts_for(&mut detector, "m", &events) != 1 {
                missed += 1;
            }
        }
        assert_eq!(missed, 0, "{family:?}: {missed} of {} macro users not alerted exactly once", recordings.len());
    }
}

#[test]
fn a_macro_switched_on_mid_session_is_caught_after_its_onset_only() {
    let mut detector = Detector::new(DetectorConfig::default()).unwrap();
    let recordings = load("aalto-a-train.csv.gz", 30);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (_, human) in &recordings {
        let spec = MacroSpec::random(MacroFamily::GaussianJitter, &mut rng);
        let (events, onset_us) = macrogen::human_then_macro(human, 80, &spec, 150, &mut rng);
        let out = detector.score_recording("mixed", &events, None).unwrap();
        let alert_times: Vec<i64> = out
            .iter()
            .filter_map(|o| if let Output::Alert(a) = o { Some(a.window.window_end_us) } else { None })
            .collect();
        assert_eq!(alert_times.len(), 1, "one alert");
        assert!(alert_times[0] >= onset_us, "no alert before the macro started");
    }
}

fn load_test_split(name: &str, users: usize) -> Vec<UserEvents> {
    let reader = KeylogReader::open(&common::shared_data(name)).expect("open keylog");
    keylog::group_by_user(reader, |u| Split::of(u) == Split::Test, Some(users)).expect("clean keylog")
}

fn alerts_with_model(detector: &mut Detector, model: &mut LstmModel, events: &[KeyEvent]) -> Vec<Vec<&'static str>> {
    detector
        .score_recording("u", events, Some(model as &mut dyn SequenceScorer))
        .unwrap()
        .into_iter()
        .filter_map(|o| if let Output::Alert(a) = o { Some(a.reasons.scorers()) } else { None })
        .collect()
}

/// The shipped LSTM on users it never saw (the test split): no human flagged, and the macros
/// the timing rules cannot see (humanized holds, intervals sampled from a human) are caught.
#[test]
fn with_the_shipped_model_humans_stay_clean_and_humanized_macros_are_caught() {
    let mut detector = Detector::new(DetectorConfig::default()).unwrap();
    let mut model = LstmModel::embedded().unwrap();
    let mut humans = load_test_split("aalto-a-train.csv.gz", 200);
    humans.extend(load_test_split("aalto-b-train.csv.gz", 200));
    assert_eq!(humans.len(), 400);
    let flagged: Vec<&str> = humans
        .iter()
        .filter(|(_, events)| !alerts_with_model(&mut detector, &mut model, events).is_empty())
        .map(|(user, _)| user.as_str())
        .collect();
    assert!(flagged.is_empty(), "humans flagged: {flagged:?}");

    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut lstm_alone = 0;
    for family in [MacroFamily::GaussianJitter, MacroFamily::HumanSampled] {
        for (i, (_, human)) in humans.iter().take(40).enumerate() {
            let m = MacroUser::generate(family, human, 1_700_000_000_000_000 + i as i64, 150, &mut rng);
            let alerts = alerts_with_model(&mut detector, &mut model, &m.events);
            assert_eq!(alerts.len(), 1, "{family:?} macro user {i} not alerted exactly once");
            lstm_alone += usize::from(alerts[0] == ["lstm"]);
        }
    }
    assert!(lstm_alone > 0, "some of these are beyond the timing rules: the model must be what caught them");
}

/// A careful cheater's replay: real typing (users of the test split) looped for 100-1,000
/// presses with a few ms of jitter on every flight and hold, keys recorded or rotated. Every
/// window looks human; the recurrence memory raises one `replay` alert per user, after the loop
/// came round, with the loop's length as its period.
#[test]
fn a_replayed_recording_longer_than_a_window_is_caught_by_its_recurrences() {
    // The recurrence memory alone: a loop on rotated keys ignores its keys, so the
    // key-dependence test may raise the user's alert (`keyless_timing`) before the loop has
    // come round twice.
    let mut cfg = DetectorConfig::default();
    cfg.dependence.enabled = false;
    let mut detector = Detector::new(cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    for (i, (_, human)) in load_test_split("aalto-a-train.csv.gz", 30).iter().enumerate() {
        let spec = MacroSpec::random(MacroFamily::ReplayLoop, &mut rng);
        let recorded = macrogen::recorded_presses(human);
        let presses = spec.presses_to_watch(200);
        let events = macrogen::generate(&spec, &recorded, 1_700_000_000_000_000 + i as i64, presses, &mut rng);
        let outputs = detector.score_recording("m", &events, None).unwrap();
        let alerts: Vec<_> =
            outputs.iter().filter_map(|o| if let Output::Alert(a) = o { Some(a) } else { None }).collect();
        assert_eq!(alerts.len(), 1, "replay user {i}: {} alerts", alerts.len());
        let f = &alerts[0].window.features;
        assert!(alerts[0].reasons.names().contains(&"replay"), "user {i}: {:?}", alerts[0].reasons.names());
        // The loop's length, less any of its presses the window counts as auto-repeats.
        let period = spec.loop_presses.clamp(20, recorded.len()) as f64;
        assert!(f.replay_period <= period && f.replay_period >= 0.9 * period, "user {i}: {f:?}, loop {period}");
        assert!(f.replay_error_ms <= 5.0, "user {i}: {f:?}");
    }
}
