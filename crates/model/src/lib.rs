//! The LSTM window scorer: a shipped ONNX model run with tract, behind the core's
//! [`SequenceScorer`] seam.
//!
//! A model is a manifest (`models/<name>-<version>.json`) beside its ONNX file. Loading checks,
//! in order: the manifest parses; the ONNX file's sha256 matches the manifest (a mismatch is
//! refused: a half-copied or tampered model must never score anyone); the step features the
//! model was trained on are exactly the ones this build encodes; tract can plan the graph.
//!
//! Windows arrive batched (one call per poll, across users). Each is scaled as the manifest
//! says, laid out `[steps, batch, features]` for ONNX's LSTM, and run from a zero initial state;
//! the probability is mapped so the manifest's operating threshold lands on 0.5, the policy's
//! threshold.
//!
//! [`ReloadingModel`] watches the manifest file and swaps in a new version without a restart;
//! a new version that fails to load is reported and the old one keeps scoring.
//!
//! # Layout
//! - [`Manifest`]: what the training pipeline writes beside the model.
//! - [`LstmModel`]: a loaded, verified, planned model.
//! - [`ReloadingModel`]: a model that follows its manifest file.
//! - [`EMBEDDED_MANIFEST`] / [`LstmModel::embedded`]: the shipped model, compiled in.
//! - [`stream`]: the per-press model, carried from press to press.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod stream;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

use metronome_core::detect::sequence::{STEP_FEATURES, STEP_WIDTH};
use metronome_core::detect::{PressScorer, SequenceError, SequenceScorer};
use metronome_core::follow::Followed;

/// The shipped model's manifest, compiled into the binary.
pub const EMBEDDED_MANIFEST: &str = include_str!("../../../models/keystroke-lstm-1.1.0.json");
/// The shipped model's ONNX file, compiled into the binary.
pub const EMBEDDED_ONNX: &[u8] = include_bytes!("../../../models/keystroke-lstm-1.1.0.onnx");
/// Where the shipped manifest lives in the repository (for error messages and tests).
pub const SHIPPED_MANIFEST_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/keystroke-lstm-1.1.0.json");

/// Why a model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("invalid model manifest {path}: {source}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The ONNX file is not the one the manifest describes.
    #[error("model file {path} has sha256 {actual}, but its manifest says {expected}: refusing to load it")]
    ChecksumMismatch {
        /// The ONNX file.
        path: PathBuf,
        /// From the manifest.
        expected: String,
        /// Of the file.
        actual: String,
    },
    /// The model reads inputs this build does not produce.
    #[error("model {model} does not fit this build: {problem}")]
    Incompatible {
        /// Name and version.
        model: String,
        /// What differs.
        problem: String,
    },
    /// tract could not load or plan the graph.
    #[error("model {model} cannot be run: {message}")]
    Runtime {
        /// Name and version.
        model: String,
        /// tract's message.
        message: String,
    },
}

/// The model's manifest (the fields the scorer needs; training details are kept as written).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Manifest {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// The ONNX file, relative to the manifest.
    pub file: String,
    /// Hex sha256 of the ONNX file.
    pub sha256: String,
    /// Input specification.
    pub input: InputSpec,
    /// Feature scaling.
    pub scaling: Scaling,
    /// Probability at which a window counts as suspicious.
    pub threshold: f32,
    /// Validation figures, as the training script wrote them.
    #[serde(default)]
    pub validation: serde_json::Value,
}

/// What the model reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct InputSpec {
    /// Steps per window.
    pub steps: usize,
    /// Names of the per-step features, in order.
    pub step_features: Vec<String>,
    /// LSTM hidden size (shape of the state inputs).
    pub hidden: usize,
}

/// Per-feature standardisation of real steps.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Scaling {
    /// Subtracted.
    pub mean: Vec<f32>,
    /// Divided by.
    pub std: Vec<f32>,
}

impl Manifest {
    /// `name-version`, as alerts carry it.
    pub fn id(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }

    fn check(&self) -> Result<(), ModelError> {
        check_inputs(&self.id(), &self.input, &self.scaling)?;
        let fail = |problem: String| Err(ModelError::Incompatible { model: self.id(), problem });
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return fail("threshold must be within (0, 1)".to_owned());
        }
        if self.input.steps == 0 || self.input.steps > 1024 {
            return fail("steps out of range".to_owned());
        }
        Ok(())
    }
}

/// What every model this build runs must agree on: the step features it encodes, a scaling
/// value per feature, a sane hidden size.
fn check_inputs(model: &str, input: &InputSpec, scaling: &Scaling) -> Result<(), ModelError> {
    let fail = |problem: String| Err(ModelError::Incompatible { model: model.to_owned(), problem });
    if input.step_features != STEP_FEATURES {
        return fail(format!(
            "it reads step features {:?}, this build encodes {:?}",
            input.step_features, STEP_FEATURES
        ));
    }
    if scaling.mean.len() != STEP_WIDTH || scaling.std.len() != STEP_WIDTH {
        return fail(format!("scaling must have {STEP_WIDTH} values per list"));
    }
    if scaling.std.iter().any(|s| !s.is_finite() || *s <= 0.0) || scaling.mean.iter().any(|m| !m.is_finite()) {
        return fail("scaling values must be finite, std positive".to_owned());
    }
    if input.hidden == 0 || input.hidden > 4096 {
        return fail("hidden size out of range".to_owned());
    }
    Ok(())
}

/// Refuses an ONNX file whose sha256 is not the manifest's: a half-copied or tampered model
/// must never score anyone.
fn verify_checksum(onnx: &[u8], expected: &str, onnx_path: &Path) -> Result<(), ModelError> {
    let actual = hex::encode(Sha256::digest(onnx));
    if actual.eq_ignore_ascii_case(expected.trim()) {
        return Ok(());
    }
    Err(ModelError::ChecksumMismatch { path: onnx_path.to_owned(), expected: expected.to_owned(), actual })
}

type Plan = TypedRunnableModel<TypedModel>;

/// The one batch size the model is planned for: every call runs chunks of exactly this many
/// windows, the last padded with empty windows. tract runs a concrete batch size about 4.7x
/// faster than a symbolic one (`models/README.md`, "Speed"), and one size (not one per size
/// class) makes a window's score independent of how many windows share its call: within one
/// plan every row is computed alike (checked bit for bit), while plans for different sizes use
/// different kernels whose last bits differ, which the threshold mapping then magnifies about
/// 1,000x. The stream (batches as records arrive) and `metronome score` (batches of a file)
/// therefore give identical scores. 128 rather than fewer: larger chunks amortise tract's
/// per-step overhead (the processor ran 1.3-1.5x faster than with 32), while a lone window pays
/// for a whole chunk (about 3 ms).
pub const BATCH_WINDOWS: usize = 128;

/// A loaded, verified model, ready to score batches.
#[derive(Debug, Clone)]
pub struct LstmModel {
    manifest: Arc<Manifest>,
    id: String,
    onnx: Arc<[u8]>,
    /// The plan for [`BATCH_WINDOWS`] windows.
    plan: Arc<Plan>,
    /// Reused `[steps, batch, features]` input buffer.
    scratch: Vec<f32>,
    /// The per-press model that runs beside this one, if any ([`LstmModel::with_press_model`]).
    press: Option<stream::StreamModel>,
}

impl LstmModel {
    /// Loads the manifest at `path` and the ONNX file it names.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Self::from_manifest_bytes(path, &read_manifest(path)?)
    }

    /// Loads a model from manifest contents read from `path` (the ONNX file is beside it).
    fn from_manifest_bytes(path: &Path, text: &[u8]) -> Result<Self, ModelError> {
        let (manifest, onnx, onnx_path) = manifest_and_onnx(path, text, |m: &Manifest| &m.file)?;
        Self::from_parts(manifest, &onnx, &onnx_path)
    }

    /// The shipped model compiled into the binary (verified like any other).
    pub fn embedded() -> Result<Self, ModelError> {
        let manifest = parse_embedded(EMBEDDED_MANIFEST, SHIPPED_MANIFEST_PATH)?;
        Self::from_parts(manifest, EMBEDDED_ONNX, Path::new("<embedded model>"))
    }

    fn from_parts(manifest: Manifest, onnx: &[u8], onnx_path: &Path) -> Result<Self, ModelError> {
        verify_checksum(onnx, &manifest.sha256, onnx_path)?;
        manifest.check()?;
        let id = manifest.id();
        // Planned now, so a graph tract cannot run is refused at load.
        let plan = plan(onnx, manifest.input.hidden, BATCH_WINDOWS, manifest.input.steps)
            .map_err(|e| ModelError::Runtime { model: id.clone(), message: format!("{e:#}") })?;
        Ok(Self {
            manifest: Arc::new(manifest),
            id,
            onnx: onnx.into(),
            plan: Arc::new(plan),
            scratch: Vec::new(),
            press: None,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// This window model with a per-press model beside it: every press then steps the user's
    /// carried state, and its evidence can raise `press_lstm` alerts (`metronome_model::stream`).
    pub fn with_press_model(mut self, press: stream::StreamModel) -> Self {
        self.press = Some(press);
        self
    }

    /// The per-press model beside this one, if any.
    pub fn press_model(&self) -> Option<&stream::StreamModel> {
        self.press.as_ref()
    }

    /// Raw probabilities for `windows` encoded windows (before the threshold mapping).
    pub fn probabilities(&mut self, inputs: &[f32], windows: usize) -> TractResult<Vec<f32>> {
        let steps = self.manifest.input.steps;
        anyhow::ensure!(inputs.len() == windows * steps * STEP_WIDTH, "inputs do not match the window count");
        let mut probs = Vec::with_capacity(windows);
        for chunk in inputs.chunks(BATCH_WINDOWS * steps * STEP_WIDTH) {
            let n = chunk.len() / (steps * STEP_WIDTH);
            let out = self.run_chunk(chunk, n)?;
            probs.extend_from_slice(&out[..n]);
        }
        Ok(probs)
    }

    /// Runs `n` windows padded to a batch of [`BATCH_WINDOWS`] through the plan.
    fn run_chunk(&mut self, chunk: &[f32], n: usize) -> TractResult<Vec<f32>> {
        let steps = self.manifest.input.steps;
        let hidden = self.manifest.input.hidden;
        // [window][step][feature] -> [step][window][feature], scaled; padding stays zero.
        let Scaling { mean, std } = &self.manifest.scaling;
        self.scratch.clear();
        self.scratch.resize(steps * BATCH_WINDOWS * STEP_WIDTH, 0.0);
        for (w, window) in chunk.chunks_exact(steps * STEP_WIDTH).enumerate() {
            for (s, step) in window.chunks_exact(STEP_WIDTH).enumerate() {
                if step[0] <= 0.5 {
                    continue;
                }
                let at = (s * BATCH_WINDOWS + w) * STEP_WIDTH;
                for (f, v) in step.iter().enumerate() {
                    self.scratch[at + f] = (v - mean[f]) / std[f];
                }
            }
        }
        debug_assert!(n <= BATCH_WINDOWS);
        let x = Tensor::from_shape(&[steps, BATCH_WINDOWS, STEP_WIDTH], &self.scratch)?;
        let zeros = Tensor::zero::<f32>(&[1, BATCH_WINDOWS, hidden])?;
        let out = self.plan.run(tvec!(x.into_tvalue(), zeros.clone().into_tvalue(), zeros.into_tvalue()))?;
        Ok(out[0].as_slice::<f32>()?.to_vec())
    }

    /// Maps a probability to a score with the operating threshold at 0.5 whose log-odds are the
    /// model's log-odds over the threshold's: order is kept, and the policy's sequential test can
    /// add a window's log-odds to the user's evidence (`detect::policy`).
    pub fn calibrate(&self, p: f32) -> f32 {
        let t = f64::from(self.manifest.threshold);
        let p = if p.is_finite() { f64::from(p).clamp(0.0, 1.0) } else { 0.0 };
        // odds(score) = odds(p) / odds(t), written without dividing by 1 - p.
        (p * (1.0 - t) / (p * (1.0 - t) + t * (1.0 - p))) as f32
    }
}

/// The same weights run the other way: a few new steps at a time from a carried hidden state,
/// instead of the whole window from zeros. The stream would keep `h` and `c` per user in its
/// state store; one step per event instead of `steps` per hop. Built for the benchmark that
/// compares the two designs.
#[derive(Debug)]
pub struct CarriedStateLstm {
    plan: Plan,
    steps: usize,
    hidden: usize,
}

impl CarriedStateLstm {
    /// Runs `steps` already-scaled steps (`[steps, batch, features]`) for `batch` users from
    /// their states `h` and `c` (`[1, batch, hidden]` each), replacing the states with the new
    /// ones and returning the probabilities.
    pub fn advance(&self, inputs: &[f32], batch: usize, h: &mut Vec<f32>, c: &mut Vec<f32>) -> TractResult<Vec<f32>> {
        let x = Tensor::from_shape(&[self.steps, batch, STEP_WIDTH], inputs)?;
        let h0 = Tensor::from_shape(&[1, batch, self.hidden], h)?;
        let c0 = Tensor::from_shape(&[1, batch, self.hidden], c)?;
        let out = self.plan.run(tvec!(x.into_tvalue(), h0.into_tvalue(), c0.into_tvalue()))?;
        h.clear();
        h.extend_from_slice(out[1].as_slice::<f32>()?);
        c.clear();
        c.extend_from_slice(out[2].as_slice::<f32>()?);
        Ok(out[0].as_slice::<f32>()?.to_vec())
    }
}

impl LstmModel {
    /// The carried-state runner for `steps` new steps per call (the hop) and `batch` users.
    pub fn carried(&self, steps: usize, batch: usize) -> Result<CarriedStateLstm, ModelError> {
        let plan = plan(&self.onnx, self.manifest.input.hidden, batch, steps)
            .map_err(|e| ModelError::Runtime { model: self.id.clone(), message: format!("{e:#}") })?;
        Ok(CarriedStateLstm { plan, steps, hidden: self.manifest.input.hidden })
    }
}

/// A manifest parsed from `text` (read from `path`) and the ONNX file it names, beside it.
fn manifest_and_onnx<M: serde::de::DeserializeOwned>(
    path: &Path,
    text: &[u8],
    file_of: impl Fn(&M) -> &str,
) -> Result<(M, Vec<u8>, PathBuf), ModelError> {
    let manifest: M =
        serde_json::from_slice(text).map_err(|source| ModelError::Manifest { path: path.to_owned(), source })?;
    let onnx_path = path.parent().unwrap_or(Path::new(".")).join(file_of(&manifest));
    let onnx = std::fs::read(&onnx_path).map_err(|source| ModelError::Io { path: onnx_path.clone(), source })?;
    Ok((manifest, onnx, onnx_path))
}

/// A manifest compiled into the binary; errors name the repository file it came from.
fn parse_embedded<M: serde::de::DeserializeOwned>(text: &str, shipped_path: &str) -> Result<M, ModelError> {
    serde_json::from_str(text).map_err(|source| ModelError::Manifest { path: PathBuf::from(shipped_path), source })
}

fn read_manifest(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_owned(), source })
}

/// Plans the graph for `steps` steps and a batch of `batch` sequences of a model with `hidden`
/// units.
fn plan(onnx: &[u8], hidden: usize, batch: usize, steps: usize) -> TractResult<Plan> {
    let mut model = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_output_types(true)
        .model_for_read(&mut &onnx[..])?;
    let batch = TDim::from(batch);
    let f32_fact = |dims: [TDim; 3]| InferenceFact::dt_shape(f32::datum_type(), dims.to_vec());
    model.set_input_fact(0, f32_fact([steps.into(), batch.clone(), STEP_WIDTH.into()]))?;
    model.set_input_fact(1, f32_fact([1.into(), batch.clone(), hidden.into()]))?;
    model.set_input_fact(2, f32_fact([1.into(), batch, hidden.into()]))?;
    model.into_optimized()?.into_runnable()
}

impl SequenceScorer for LstmModel {
    fn version(&self) -> &str {
        &self.id
    }

    fn steps(&self) -> usize {
        self.manifest.input.steps
    }

    fn score(&mut self, inputs: &[f32], windows: usize, out: &mut Vec<f32>) -> Result<(), SequenceError> {
        let probs = self.probabilities(inputs, windows).map_err(|e| SequenceError(format!("{e:#}")))?;
        out.extend(probs.into_iter().map(|p| self.calibrate(p)));
        Ok(())
    }

    fn reads_presses(&self) -> bool {
        self.press.is_some()
    }

    fn press_scorer(&mut self) -> Option<&mut dyn PressScorer> {
        self.press.as_mut().map(|m| m as &mut dyn PressScorer)
    }
}

/// A model that follows its manifest file ([`metronome_core::follow`]):
/// [`ReloadingModel::reload_if_changed`] loads a new version when the manifest changes, and
/// keeps the old one when the new one fails to load.
#[derive(Debug)]
pub struct ReloadingModel(Followed<LstmModel, ModelError>);

/// What a reload check did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The manifest has not changed.
    Unchanged,
    /// A new version was loaded; the old one was `from`.
    Loaded {
        /// The version replaced.
        from: String,
        /// The version now scoring.
        to: String,
    },
}

impl ReloadingModel {
    /// Loads the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Followed::load(path, read_manifest, LstmModel::from_manifest_bytes).map(Self)
    }

    /// A model with no file behind it (the embedded one): reload checks never change it.
    pub fn fixed(model: LstmModel) -> Self {
        Self(Followed::fixed(model))
    }

    /// With a per-press model beside whichever version scores (kept across reloads).
    pub fn with_press_model(mut self, press: stream::StreamModel) -> Self {
        self.0.current_mut().press = Some(press);
        self
    }

    /// The model scoring now.
    pub fn current(&self) -> &LstmModel {
        self.0.current()
    }

    /// Loads the manifest again if it changed since the last load. On error the previous model
    /// stays in place and the next check tries again (deploy the ONNX file first, then its
    /// manifest; a manifest that arrives first is refused until its file is there).
    pub fn reload_if_changed(&mut self) -> Result<Reload, ModelError> {
        let Some(mut previous) = self.0.reload_if_changed()? else { return Ok(Reload::Unchanged) };
        // The per-press model is not part of the manifest followed: it stays.
        let current = self.0.current_mut();
        current.press = previous.press.take();
        Ok(Reload::Loaded { from: previous.id, to: current.id.clone() })
    }
}

impl SequenceScorer for ReloadingModel {
    fn version(&self) -> &str {
        self.0.current().version()
    }

    fn steps(&self) -> usize {
        self.0.current().steps()
    }

    fn score(&mut self, inputs: &[f32], windows: usize, out: &mut Vec<f32>) -> Result<(), SequenceError> {
        self.0.current_mut().score(inputs, windows, out)
    }

    fn reads_presses(&self) -> bool {
        self.0.current().reads_presses()
    }

    fn press_scorer(&mut self) -> Option<&mut dyn PressScorer> {
        self.0.current_mut().press_scorer()
    }
}
