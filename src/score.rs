//! Offline scoring: a keylog file through the same detection core as the stream, JSON lines out.
//!
//! Output records (one JSON object per line, field names are a stable interface):
//! - `{"kind":"window","user_id","event_time_us","window_start_us","score","histogram_score",
//!   "suspicious","partial","fired":[..],"features":{..}}` for every scored window;
//! - `{"kind":"alert","user_id","event_time_us","alert_id","reasons":[..],"window_start_us",
//!   "window_end_us","score","histogram_score","model_version","features":{..}}` for every alert;
//! - `{"kind":"incident_closed","user_id","event_time_us"}` when an incident ends.
//!
//! Progress and summaries are the caller's to print on stderr; this module writes records only.

use std::collections::HashMap;
use std::io::{self, Write};

use serde::Serialize;

use crate::detect::{AlertReport, Detector, Output, UserState, WindowFeatures, WindowReport};
use crate::keylog::{KeylogError, KeylogRecord};

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
}

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

/// Scores every record of `input`, writing JSON lines to `out`. `on_bad_row` hears about each
/// skipped row (line number and problem only).
pub fn score_records(
    detector: &mut Detector,
    input: impl Iterator<Item = Result<KeylogRecord, KeylogError>>,
    bad_rows: BadRows,
    select: OutputSelection,
    out: &mut impl Write,
    mut on_bad_row: impl FnMut(&KeylogError),
) -> Result<ScoreSummary, ScoreError> {
    let mut summary = ScoreSummary::default();
    // Users in order of first appearance, so closing them at the end is deterministic.
    let mut users: Vec<(String, UserState)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut outputs = Vec::new();
    for record in input {
        let record = match record {
            Ok(r) => r,
            Err(e) if e.is_row_error() && bad_rows == BadRows::Skip => {
                summary.bad_rows += 1;
                on_bad_row(&e);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        summary.rows += 1;
        let slot = match index.get(&record.user_id) {
            Some(&i) => i,
            None => {
                index.insert(record.user_id.clone(), users.len());
                users.push((record.user_id, UserState::default()));
                users.len() - 1
            }
        };
        let (user, state) = &mut users[slot];
        detector.on_event(user, state, record.event, &mut outputs);
        write_outputs(user, &mut outputs, select, &mut summary, out)?;
    }
    for (user, state) in &mut users {
        detector.close_window(user, state, &mut outputs);
        write_outputs(user, &mut outputs, select, &mut summary, out)?;
        summary.late_events += state.late_events();
    }
    summary.users = users.len() as u64;
    out.flush()?;
    Ok(summary)
}

fn write_outputs(
    user: &str,
    outputs: &mut Vec<Output>,
    select: OutputSelection,
    summary: &mut ScoreSummary,
    out: &mut impl Write,
) -> io::Result<()> {
    for output in outputs.drain(..) {
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
    histogram_score: f64,
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
            histogram_score: w.histogram_score,
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
    window_start_us: i64,
    window_end_us: i64,
    score: f64,
    histogram_score: f64,
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
            window_start_us: a.window.window_start_us,
            window_end_us: a.window.window_end_us,
            score: a.window.score,
            histogram_score: a.window.histogram_score,
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
