//! The per-press (streaming) LSTM: the same kind of ONNX model run one press at a time from a
//! state each user carries, giving a log-odds per press instead of a probability per window.
//!
//! A window model needs a third to half of its 50 presses from a macro before it stands out
//! (`docs/detection.md`, "How fast a window detector can be after an onset"); this one reads
//! every settled press as it comes and its policy (a CUSUM over the log-odds, parameters in the
//! manifest) alerts 15-20 presses after an onset (validation split, `docs/detection.md`, "Per
//! press"). Trained by `models/train_stream.py` on sessions `examples/export_presses.rs` writes.
//!
//! Like the window model, every call runs a plan for one fixed batch size ([`STREAM_BATCH`]),
//! padding the last chunk, so a user's log-odds do not depend on who else shared the call.
//!
//! # Layout
//! - [`StreamManifest`], [`StreamPolicy`]: what the training pipeline writes beside the model.
//! - [`StreamModel`]: a loaded, verified, planned model; [`StreamModel::advance`] steps users.
//! - [`StreamModel::embedded`]: the shipped model, compiled in.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use tract_onnx::prelude::*;

use super::{
    check_inputs, manifest_and_onnx, parse_embedded, plan, read_manifest, verify_checksum, InputSpec, ModelError, Plan,
    Scaling,
};
use metronome_core::detect::sequence::STEP_WIDTH;
use metronome_core::detect::{PressPolicy, PressScorer, SequenceError};

/// The shipped streaming model's manifest, compiled into the binary.
pub const EMBEDDED_STREAM_MANIFEST: &str = include_str!("../../../models/keystroke-stream-0.3.0.json");
/// The shipped streaming model's ONNX file, compiled into the binary.
pub const EMBEDDED_STREAM_ONNX: &[u8] = include_bytes!("../../../models/keystroke-stream-0.3.0.onnx");
/// Where the shipped streaming manifest lives in the repository.
pub const SHIPPED_STREAM_MANIFEST_PATH: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/keystroke-stream-0.3.0.json");

/// Users stepped per planned call (the last chunk padded with empty rows).
pub const STREAM_BATCH: usize = 64;

/// The streaming model's manifest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StreamManifest {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// The ONNX file, relative to the manifest.
    pub file: String,
    /// Hex sha256 of the ONNX file.
    pub sha256: String,
    /// Input specification (`steps` is 1: one press per step).
    pub input: InputSpec,
    /// Feature scaling (every step is real: no padding steps).
    pub scaling: Scaling,
    /// The alerting policy chosen on the validation split.
    pub policy: StreamPolicy,
    /// Validation figures, as the training script wrote them.
    #[serde(default)]
    pub validation: serde_json::Value,
}

/// A one-sided CUSUM over per-press log-odds: `S = max(0, S + clamp(x - reference))`, an alert
/// once `S >= threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct StreamPolicy {
    /// Log-odds a press must beat to add evidence.
    pub reference: f32,
    /// The most one press moves the evidence, either way.
    pub clamp: f32,
    /// Evidence that raises an alert.
    pub threshold: f32,
}

impl StreamManifest {
    /// `name-version`.
    pub fn id(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }

    fn check(&self) -> Result<(), ModelError> {
        check_inputs(&self.id(), &self.input, &self.scaling)?;
        let p = self.policy;
        let sane = p.reference.is_finite() && p.clamp.is_finite() && p.clamp > 0.0;
        if !(sane && p.threshold.is_finite() && p.threshold > 0.0) {
            let problem = "policy needs a finite reference and a positive clamp and threshold".to_owned();
            return Err(ModelError::Incompatible { model: self.id(), problem });
        }
        Ok(())
    }
}

/// A loaded, verified streaming model.
#[derive(Debug, Clone)]
pub struct StreamModel {
    manifest: Arc<StreamManifest>,
    id: String,
    plan: Arc<Plan>,
    /// Reused `[1, batch, features]` and state buffers.
    x: Vec<f32>,
    h: Vec<f32>,
    c: Vec<f32>,
}

impl StreamModel {
    /// Loads the manifest at `path` and the ONNX file it names.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = read_manifest(path)?;
        let (manifest, onnx, onnx_path) = manifest_and_onnx(path, &text, |m: &StreamManifest| &m.file)?;
        Self::from_parts(manifest, &onnx, &onnx_path)
    }

    /// The shipped streaming model compiled into the binary (verified like any other).
    pub fn embedded() -> Result<Self, ModelError> {
        let manifest = parse_embedded(EMBEDDED_STREAM_MANIFEST, SHIPPED_STREAM_MANIFEST_PATH)?;
        Self::from_parts(manifest, EMBEDDED_STREAM_ONNX, Path::new("<embedded streaming model>"))
    }

    fn from_parts(manifest: StreamManifest, onnx: &[u8], onnx_path: &Path) -> Result<Self, ModelError> {
        verify_checksum(onnx, &manifest.sha256, onnx_path)?;
        manifest.check()?;
        let id = manifest.id();
        let plan = plan(onnx, manifest.input.hidden, STREAM_BATCH, 1)
            .map_err(|e| ModelError::Runtime { model: id.clone(), message: format!("{e:#}") })?;
        Ok(Self { manifest: Arc::new(manifest), id, plan: Arc::new(plan), x: Vec::new(), h: Vec::new(), c: Vec::new() })
    }

    /// The manifest.
    pub fn manifest(&self) -> &StreamManifest {
        &self.manifest
    }

    /// `name-version`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Floats in one user's `h` (and in their `c`).
    pub fn hidden(&self) -> usize {
        self.manifest.input.hidden
    }

    /// Advances `n` users by one press each: `steps` holds their raw (unscaled) steps back to
    /// back (`n * STEP_WIDTH`), `h` and `c` their states (`n * hidden` each, zeros for a new
    /// user), replaced by the new ones. Returns each user's log-odds for that press.
    pub fn advance(&mut self, steps: &[f32], h: &mut [f32], c: &mut [f32]) -> TractResult<Vec<f32>> {
        let hidden = self.hidden();
        let n = steps.len() / STEP_WIDTH;
        anyhow::ensure!(steps.len() == n * STEP_WIDTH, "steps are not whole");
        anyhow::ensure!(h.len() == n * hidden && c.len() == n * hidden, "states do not match the users");
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(STREAM_BATCH) {
            let m = (n - start).min(STREAM_BATCH);
            let rows = start..start + m;
            let logits = self.run_chunk(
                &steps[rows.start * STEP_WIDTH..rows.end * STEP_WIDTH],
                &mut h[rows.start * hidden..rows.end * hidden],
                &mut c[rows.start * hidden..rows.end * hidden],
            )?;
            out.extend_from_slice(&logits[..m]);
        }
        Ok(out)
    }

    /// One planned call for up to [`STREAM_BATCH`] users, padded with empty rows.
    fn run_chunk(&mut self, steps: &[f32], h: &mut [f32], c: &mut [f32]) -> TractResult<Vec<f32>> {
        let hidden = self.hidden();
        let Scaling { mean, std } = &self.manifest.scaling;
        self.x.clear();
        self.x.resize(STREAM_BATCH * STEP_WIDTH, 0.0);
        for (row, step) in steps.chunks_exact(STEP_WIDTH).enumerate() {
            for (f, v) in step.iter().enumerate() {
                self.x[row * STEP_WIDTH + f] = (v - mean[f]) / std[f];
            }
        }
        for (buf, state) in [(&mut self.h, &*h), (&mut self.c, &*c)] {
            buf.clear();
            buf.extend_from_slice(state);
            buf.resize(STREAM_BATCH * hidden, 0.0);
        }
        let x = Tensor::from_shape(&[1, STREAM_BATCH, STEP_WIDTH], &self.x)?;
        let h0 = Tensor::from_shape(&[1, STREAM_BATCH, hidden], &self.h)?;
        let c0 = Tensor::from_shape(&[1, STREAM_BATCH, hidden], &self.c)?;
        let out = self.plan.run(tvec!(x.into_tvalue(), h0.into_tvalue(), c0.into_tvalue()))?;
        h.copy_from_slice(&out[1].as_slice::<f32>()?[..h.len()]);
        c.copy_from_slice(&out[2].as_slice::<f32>()?[..c.len()]);
        Ok(out[0].as_slice::<f32>()?.to_vec())
    }
}

impl PressScorer for StreamModel {
    fn version(&self) -> &str {
        &self.id
    }

    fn hidden(&self) -> usize {
        self.manifest.input.hidden
    }

    fn policy(&self) -> PressPolicy {
        let StreamPolicy { reference, clamp, threshold } = self.manifest.policy;
        PressPolicy { reference, clamp, threshold }
    }

    fn advance(
        &mut self,
        steps: &[f32],
        h: &mut [f32],
        c: &mut [f32],
        out: &mut Vec<f32>,
    ) -> Result<(), SequenceError> {
        let logits = StreamModel::advance(self, steps, h, c).map_err(|e| SequenceError(format!("{e:#}")))?;
        out.extend_from_slice(&logits);
        Ok(())
    }
}
