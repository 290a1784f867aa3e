//! Offline scoring: a keylog file through the same detection core as the stream, JSON lines out.
//!
//! Output records (one JSON object per line, field names are a stable interface):
//! - `{"kind":"window","user_id","event_time_us","window_start_us","score","timing_score",
//!   "histogram_score","lstm_score","suspicious","partial","fired":[..],"features":{..}}` for
//!   every scored window (`lstm_score` is null without a model);
//! - `{"kind":"alert","user_id","event_time_us","alert_id","reasons":[..],"scorers":[..],
//!   "window_start_us","window_end_us","score","timing_score","histogram_score","lstm_score",
//!   "model_version","features":{..}}` for every alert (`scorers`: `histogram`, `lstm`);
//! - `{"kind":"incident_closed","user_id","event_time_us"}` when an incident ends.
//!
//! Progress and summaries are the caller's to print on stderr; this module writes records only.

use std::collections::HashMap;
use std::io::{self, Write};

use serde::Serialize;

use metronome_core::detect::{
    AlertReport, Detector, Output, ScoringBatch, SequenceError, SequenceScorer, UserState, WindowFeatures, WindowReport,
};
use metronome_core::keylog::{KeylogError, KeylogRecord};

/// What to do with an invalid row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRows {
    /// Stop at the first bad row with its error.
    Stop,
    /// Report it through the callback, count it, go on.
    Skip,
}

/// Which records to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputSelection {
    /// Write window records (alerts are always written).
    pub windows: bool,
}

/// Totals of one scoring run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScoreSummary {
    /// Valid rows read.
    pub rows: u64,
    /// Invalid rows skipped.
    pub bad_rows: u64,
    /// Distinct users.
    pub users: u64,
    /// Windows scored.
    pub windows: u64,
    /// Alerts raised.
    pub alerts: u64,
    /// Events dropped as late.
    pub late_events: u64,
    /// Batches the sequence model failed on (decided on the timing rules alone).
    pub model_failures: u64,
}

/// Windows collected before the sequence model runs over them at once.
pub const BATCH_WINDOWS: usize = 256;

/// Why scoring stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// The input was unreadable or a row was bad under [`BadRows::Stop`].
    #[error(transparent)]
    Input(#[from] KeylogError),
    /// Writing the output failed.
    #[error("writing output failed: {0}")]
    Output(#[from] io::Error),
}

/// Scores every record of `input`, writing JSON lines to `out`. `model` adds the sequence
/// model's score to every window; `on_bad_row` hears about each skipped row (line number and
/// problem only), `on_model_error` about each batch the model failed on.
#[allow(clippy::too_many_arguments)]
pub fn score_records(
    detector: &mut Detector,
    model: Option<&mut dyn SequenceScorer>,
    input: impl Iterator<Item = Result<KeylogRecord, KeylogError>>,
    bad_rows: BadRows,
    select: OutputSelection,
    out: &mut impl Write,
    mut on_bad_row: impl FnMut(&KeylogError),
    on_model_error: impl FnMut(&SequenceError),
) -> Result<ScoreSummary, ScoreError> {
    let mut run = Run {
        batch: ScoringBatch::for_model(model.as_deref()),
        detector,
        model,
        users: Vec::new(),
        outputs: Vec::new(),
        select,
        summary: ScoreSummary::default(),
        on_model_error,
    };
    // Users in order of first appearance, so closing them at the end is deterministic.
    let mut index: HashMap<String, usize> = HashMap::new();
    for record in input {
        let record = match record {
            Ok(r) => r,
            Err(e) if e.is_row_error() && bad_rows == BadRows::Skip => {
                run.summary.bad_rows += 1;
                on_bad_row(&e);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        run.summary.rows += 1;
        let slot = match index.get(&record.user_id) {
            Some(&i) => i,
            None => {
                index.insert(record.user_id.clone(), run.users.len());
                run.users.push((record.user_id, UserState::default()));
                run.users.len() - 1
            }
        };
        run.detector.on_event(slot, &mut run.users[slot].1, record.event, &mut run.batch);
        if run.batch.windows() >= BATCH_WINDOWS {
            run.finish(out)?;
        }
    }
    for slot in 0..run.users.len() {
        run.detector.close_window(slot, &mut run.users[slot].1, &mut run.batch);
        if run.batch.windows() >= BATCH_WINDOWS {
            run.finish(out)?;
        }
    }
    run.finish(out)?;
    run.summary.late_events = run.users.iter().map(|(_, s)| s.late_events()).sum();
    run.summary.users = run.users.len() as u64;
    out.flush()?;
    Ok(run.summary)
}

/// One scoring run's moving parts.
struct Run<'d, 'm, E> {
    detector: &'d mut Detector,
    model: Option<&'m mut dyn SequenceScorer>,
    batch: ScoringBatch,
    users: Vec<(String, UserState)>,
    outputs: Vec<(usize, Output)>,
    select: OutputSelection,
    summary: ScoreSummary,
    on_model_error: E,
}

impl<E: FnMut(&SequenceError)> Run<'_, '_, E> {
    /// Scores the batch with the model, runs the policies and writes what came out.
    fn finish(&mut self, out: &mut impl Write) -> io::Result<()> {
        // Reborrow with a shorter trait-object lifetime; `as_deref_mut` keeps the long one.
        #[allow(clippy::option_as_ref_deref)]
        let model = self.model.as_mut().map(|m| -> &mut dyn SequenceScorer { &mut **m });
        if let Err(e) = self.detector.finish(&mut self.batch, &mut self.users, model, &mut self.outputs) {
            self.summary.model_failures += 1;
            (self.on_model_error)(&e);
        }
        write_outputs(&self.users, &mut self.outputs, self.select, &mut self.summary, out)
    }
}

fn write_outputs(
    users: &[(String, UserState)],
    outputs: &mut Vec<(usize, Output)>,
    select: OutputSelection,
    summary: &mut ScoreSummary,
    out: &mut impl Write,
) -> io::Result<()> {
    for (slot, output) in outputs.drain(..) {
        let user = users[slot].0.as_str();
        match &output {
            Output::Window(w) => {
                summary.windows += 1;
                if select.windows {
                    write_line(out, &WindowLine::new(user, w))?;
                }
            }
            Output::Alert(a) => {
                summary.alerts += 1;
                write_line(out, &AlertLine::new(user, a))?;
            }
            Output::IncidentClosed { at_us } => {
                write_line(out, &ClosedLine { kind: "incident_closed", user_id: user, event_time_us: *at_us })?;
            }
            // Fleets are decided across users, by the fleet stages of the stream.
            Output::Fingerprint { .. } => {}
        }
    }
    Ok(())
}

fn write_line(out: &mut impl Write, record: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    out.write_all(b"\n")
}

/// A window record.
#[derive(Debug, Serialize)]
pub struct WindowLine<'a> {
    kind: &'static str,
    user_id: &'a str,
    event_time_us: i64,
    window_start_us: i64,
    score: f64,
    timing_score: f64,
    histogram_score: f64,
    lstm_score: Option<f64>,
    suspicious: bool,
    partial: bool,
    fired: Vec<&'static str>,
    features: &'a WindowFeatures,
}

impl<'a> WindowLine<'a> {
    fn new(user_id: &'a str, w: &'a WindowReport) -> Self {
        Self {
            kind: "window",
            user_id,
            event_time_us: w.window_end_us,
            window_start_us: w.window_start_us,
            score: w.score,
            timing_score: w.timing_score,
            histogram_score: w.histogram_score,
            lstm_score: w.lstm_score,
            suspicious: w.suspicious,
            partial: w.partial,
            fired: w.fired.names(),
            features: &w.features,
        }
    }
}

/// An alert record.
#[derive(Debug, Serialize)]
pub struct AlertLine<'a> {
    kind: &'static str,
    user_id: &'a str,
    event_time_us: i64,
    alert_id: String,
    reasons: Vec<&'static str>,
    scorers: Vec<&'static str>,
    window_start_us: i64,
    window_end_us: i64,
    score: f64,
    timing_score: f64,
    histogram_score: f64,
    lstm_score: Option<f64>,
    model_version: &'a str,
    features: &'a WindowFeatures,
}

impl<'a> AlertLine<'a> {
    fn new(user_id: &'a str, a: &'a AlertReport) -> Self {
        Self {
            kind: "alert",
            user_id,
            event_time_us: a.window.window_end_us,
            alert_id: a.alert_id.to_string(),
            reasons: a.reasons.names(),
            scorers: a.reasons.scorers(),
            window_start_us: a.window.window_start_us,
            window_end_us: a.window.window_end_us,
            score: a.window.score,
            timing_score: a.window.timing_score,
            histogram_score: a.window.histogram_score,
            lstm_score: a.window.lstm_score,
            model_version: &a.model_version,
            features: &a.window.features,
        }
    }
}

#[derive(Debug, Serialize)]
struct ClosedLine<'a> {
    kind: &'static str,
    user_id: &'a str,
    event_time_us: i64,
}
