//! The shipped LSTM model through tract: loading, checksum refusal, agreement with the Python
//! training pipeline on fixed vectors, and hot reload.

use std::path::{Path, PathBuf};

use metronome_core::detect::sequence::STEP_WIDTH;
use metronome_core::detect::SequenceScorer;
use metronome_model::stream::StreamModel;
use metronome_model::{LstmModel, ModelError, Reload, ReloadingModel, SHIPPED_MANIFEST_PATH};
use serde::Deserialize;

const HOLDOUT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lstm-holdout");

#[derive(Deserialize)]
struct Vectors {
    model: String,
    steps: usize,
    step_width: usize,
    windows: Vec<VectorWindow>,
    /// The manifest's operating threshold (read from the manifest, not the vectors file).
    #[serde(skip)]
    threshold: f32,
}

#[derive(Deserialize)]
struct VectorWindow {
    kind: String,
    family: String,
    steps: Vec<f32>,
    probability: f32,
    score: f32,
}

/// The first file in `dir` whose name ends with `suffix`.
fn find(dir: &Path, suffix: &str) -> PathBuf {
    let mut hits: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    hits.sort();
    assert!(!hits.is_empty(), "no *{suffix} in {}", dir.display());
    hits.remove(0)
}

fn vectors_for(manifest: &Path) -> Vectors {
    let path = manifest.to_string_lossy().replace(".json", ".vectors.json");
    let mut v: Vectors = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let m: metronome_model::Manifest = serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    v.threshold = m.threshold;
    v
}

fn holdout_manifest() -> PathBuf {
    let vectors = find(Path::new(HOLDOUT_DIR), ".vectors.json");
    PathBuf::from(vectors.to_string_lossy().replace(".vectors.json", ".json"))
}

/// Copies a manifest and its ONNX file into `dir` under `name.json` / the manifest's file name.
fn install(manifest: &Path, dir: &Path, name: &str) -> PathBuf {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    let file = m["file"].as_str().unwrap();
    std::fs::copy(manifest.parent().unwrap().join(file), dir.join(file)).unwrap();
    let target = dir.join(name);
    std::fs::copy(manifest, &target).unwrap();
    target
}

fn assert_agrees(model: &mut dyn SequenceScorer, v: &Vectors) {
    assert_eq!(model.steps(), v.steps);
    assert_eq!(v.step_width, STEP_WIDTH);
    // Probabilities agree to 1e-4. The score maps them to odds over the threshold's (threshold
    // -> 0.5), so the Rust score is mapped back to a probability to compare.
    let t = f64::from(v.threshold);
    let probability = |score: f32| {
        let s = f64::from(score);
        s * t / (s * t + (1.0 - s) * (1.0 - t))
    };
    // One window at a time and all windows in one batch must both agree with Python.
    let all: Vec<f32> = v.windows.iter().flat_map(|w| w.steps.iter().copied()).collect();
    let mut batched = Vec::new();
    model.score(&all, v.windows.len(), &mut batched).unwrap();
    for (w, got_batched) in v.windows.iter().zip(&batched) {
        let mut single = Vec::new();
        model.score(&w.steps, 1, &mut single).unwrap();
        assert_eq!(single[0].to_bits(), got_batched.to_bits(), "a window scores the same alone or batched");
        let got = probability(single[0]);
        assert!(
            (got - f64::from(w.probability)).abs() <= 1e-4,
            "{} {}/{}: Rust {got}, Python {}",
            v.model,
            w.kind,
            w.family,
            w.probability
        );
        // The score the pipeline recorded follows the same map.
        assert!((probability(w.score) - f64::from(w.probability)).abs() <= 1e-4, "{} {}", w.score, w.probability);
    }
}

#[test]
fn the_shipped_model_agrees_with_python_to_1e4() {
    let manifest = PathBuf::from(SHIPPED_MANIFEST_PATH);
    let mut model = LstmModel::load(&manifest).unwrap();
    let v = vectors_for(&manifest);
    assert_eq!(model.version(), v.model);
    assert_agrees(&mut model, &v);
    // Raw probabilities too, before the threshold mapping.
    for w in &v.windows {
        let p = model.probabilities(&w.steps, 1).unwrap()[0];
        assert!((p - w.probability).abs() <= 1e-4, "{p} vs {}", w.probability);
    }
    // The vectors include humans and every macro family: the model separates some of them.
    assert!(v.windows.iter().any(|w| w.kind == "human" && w.score < 0.5));
    assert!(v.windows.iter().any(|w| w.kind == "macro" && w.score >= 0.5));
}

#[test]
fn a_window_scores_the_same_bits_whatever_else_shares_its_call() {
    // The stream scores windows as records arrive and `metronome score` in batches of a file:
    // a window's score must not depend on its company, or the two paths could disagree (the
    // threshold mapping magnifies differences in the last bits about 1,000x).
    let manifest = PathBuf::from(SHIPPED_MANIFEST_PATH);
    let mut model = LstmModel::load(&manifest).unwrap();
    let v = vectors_for(&manifest);
    // More windows than one call holds, so chunking is crossed too.
    let windows: Vec<&[f32]> =
        v.windows.iter().map(|w| w.steps.as_slice()).cycle().take(metronome_model::BATCH_WINDOWS * 2 + 5).collect();
    let all: Vec<f32> = windows.concat();
    let together = model.probabilities(&all, windows.len()).unwrap();
    for group in [1usize, 2, 3, 7, 40] {
        for (start, chunk) in windows.chunks(group).enumerate().map(|(i, c)| (i * group, c)) {
            let got = model.probabilities(&chunk.concat(), chunk.len()).unwrap();
            for (i, p) in got.iter().enumerate() {
                assert_eq!(p.to_bits(), together[start + i].to_bits(), "window {} in groups of {group}", start + i);
            }
        }
    }
}

#[test]
fn the_embedded_model_is_the_shipped_one() {
    let mut embedded = LstmModel::embedded().unwrap();
    let shipped = LstmModel::load(Path::new(SHIPPED_MANIFEST_PATH)).unwrap();
    assert_eq!(embedded.manifest(), shipped.manifest());
    assert_agrees(&mut embedded, &vectors_for(Path::new(SHIPPED_MANIFEST_PATH)));
}

#[test]
fn a_model_whose_checksum_does_not_match_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = install(Path::new(SHIPPED_MANIFEST_PATH), dir.path(), "model.json");
    LstmModel::load(&manifest).expect("an intact copy loads");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let onnx = dir.path().join(m["file"].as_str().unwrap());
    let mut bytes = std::fs::read(&onnx).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&onnx, &bytes).unwrap();
    let err = LstmModel::load(&manifest).unwrap_err();
    assert!(matches!(err, ModelError::ChecksumMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("refusing") && text.contains(m["sha256"].as_str().unwrap()), "{text}");
    assert!(!text.contains('\n'));
}

#[test]
fn a_model_for_other_step_features_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = install(Path::new(SHIPPED_MANIFEST_PATH), dir.path(), "model.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["input"]["step_features"][2] = "key_code".into();
    std::fs::write(&manifest, serde_json::to_string(&m).unwrap()).unwrap();
    let err = LstmModel::load(&manifest).unwrap_err();
    assert!(matches!(err, ModelError::Incompatible { .. }), "{err}");
    std::fs::write(&manifest, "{ not json").unwrap();
    assert!(matches!(LstmModel::load(&manifest).unwrap_err(), ModelError::Manifest { .. }));
    std::fs::remove_file(&manifest).unwrap();
    assert!(matches!(LstmModel::load(&manifest).unwrap_err(), ModelError::Io { .. }));
}

#[test]
fn a_new_model_version_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(SHIPPED_MANIFEST_PATH);
    let watched = install(shipped, dir.path(), "current.json");
    let mut model = ReloadingModel::load(&watched).unwrap();
    let before = model.version().to_owned();
    assert_agrees(&mut model, &vectors_for(shipped));
    assert_eq!(model.reload_if_changed().unwrap(), Reload::Unchanged);

    // Deploy the other model: its ONNX file first, then its manifest over the watched one.
    let holdout = holdout_manifest();
    install(&holdout, dir.path(), "current.json");
    let reload = model.reload_if_changed().unwrap();
    let after = model.version().to_owned();
    assert_ne!(before, after);
    assert_eq!(reload, Reload::Loaded { from: before.clone(), to: after });
    assert_agrees(&mut model, &vectors_for(&holdout));
    assert_eq!(model.reload_if_changed().unwrap(), Reload::Unchanged);

    // A broken deployment is refused and the running model keeps scoring.
    let m = std::fs::read_to_string(&watched).unwrap();
    let broken = m.replace("\"sha256\": \"", "\"sha256\": \"00");
    std::fs::write(&watched, broken).unwrap();
    assert!(matches!(model.reload_if_changed().unwrap_err(), ModelError::ChecksumMismatch { .. }));
    assert_agrees(&mut model, &vectors_for(&holdout));
    // Putting the shipped model back is picked up again.
    let holdout_version = model.version().to_owned();
    install(shipped, dir.path(), "current.json");
    assert_eq!(model.reload_if_changed().unwrap(), Reload::Loaded { from: holdout_version, to: before });
}

#[test]
fn empty_and_mismatched_batches_are_errors_not_panics() {
    let mut model = LstmModel::embedded().unwrap();
    let mut out = Vec::new();
    model.score(&[], 0, &mut out).unwrap();
    assert!(out.is_empty());
    assert!(model.score(&[0.0; 7], 1, &mut out).is_err());
    // Non-finite inputs give finite scores in 0..1 or an error, never a panic.
    let steps = model.steps();
    let weird = vec![f32::NAN; steps * STEP_WIDTH];
    if model.score(&weird, 1, &mut out).is_ok() {
        assert!(out.iter().all(|s| (0.0..=1.0).contains(s)));
    }
}

#[derive(Deserialize)]
struct StreamVectors {
    model: String,
    step_width: usize,
    sequences: Vec<StreamSequence>,
}

#[derive(Deserialize)]
struct StreamSequence {
    kind: String,
    steps: Vec<f32>,
    log_odds: Vec<f32>,
}

fn stream_vectors() -> StreamVectors {
    let path = metronome_model::stream::SHIPPED_STREAM_MANIFEST_PATH.replace(".json", ".vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Steps `sequences` press by press, all of them in each call, from zero states.
fn stream_log_odds(model: &mut StreamModel, sequences: &[&StreamSequence]) -> Vec<Vec<f32>> {
    let hidden = model.hidden();
    let (mut h, mut c) = (vec![0.0; sequences.len() * hidden], vec![0.0; sequences.len() * hidden]);
    let presses = sequences[0].log_odds.len();
    let mut out = vec![Vec::new(); sequences.len()];
    for t in 0..presses {
        let steps: Vec<f32> =
            sequences.iter().flat_map(|s| s.steps[t * STEP_WIDTH..(t + 1) * STEP_WIDTH].iter().copied()).collect();
        for (k, v) in model.advance(&steps, &mut h, &mut c).unwrap().into_iter().enumerate() {
            out[k].push(v);
        }
    }
    out
}

#[test]
fn the_streaming_model_agrees_with_pytorch_press_by_press_whoever_shares_the_call() {
    let mut model = StreamModel::embedded().unwrap();
    let vectors = stream_vectors();
    assert_eq!(vectors.model, model.id());
    assert_eq!(vectors.step_width, STEP_WIDTH);
    let all: Vec<&StreamSequence> = vectors.sequences.iter().collect();
    assert!(all.iter().any(|s| s.kind == "human") && all.iter().any(|s| s.kind == "mixed"));
    let together = stream_log_odds(&mut model, &all);
    for (k, seq) in all.iter().enumerate() {
        let worst = together[k].iter().zip(&seq.log_odds).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{} sequence: tract and PyTorch differ by {worst}", seq.kind);
        // The same bits alone as in company: a user's evidence cannot depend on who shared a poll.
        assert_eq!(stream_log_odds(&mut model, &[seq])[0], together[k], "{} sequence alone", seq.kind);
    }
}

#[test]
fn a_streaming_model_whose_file_was_changed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(metronome_model::stream::SHIPPED_STREAM_MANIFEST_PATH);
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(shipped).unwrap()).unwrap();
    let file = manifest["file"].as_str().unwrap();
    let mut onnx = std::fs::read(shipped.parent().unwrap().join(file)).unwrap();
    let last = onnx.len() - 1;
    onnx[last] ^= 1;
    std::fs::write(dir.path().join(file), onnx).unwrap();
    std::fs::write(dir.path().join("m.json"), manifest.to_string()).unwrap();
    match StreamModel::load(&dir.path().join("m.json")) {
        Err(ModelError::ChecksumMismatch { .. }) => {}
        other => panic!("a changed model file must be refused, got {other:?}"),
    }
}
