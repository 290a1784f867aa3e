//! The sequence model's view of a window: one small feature vector per press.
//!
//! The LSTM reads a window press by press. Key identity reaches the stream only as a random
//! label a key keeps for a few presses (`agent::labels`), so no step carries a key code: a step
//! says how long since the previous press, how long this key was held, and how this key
//! relates to the keys before it
//! (the same key again, how far back it last occurred, whether the timing echoes that
//! occurrence). Those are what separate a replayed loop or a short skill rotation from typed
//! text, whatever the labels.
//!
//! Windows shorter than the model's step count (the first scoring at `min_presses`, an idle
//! partial window) are left-padded with all-zero steps whose `present` flag is 0.
//!
//! The encoding is shared by training (the `export_windows` example writes it for the Python
//! pipeline) and inference, so both see the same numbers. Scaling is the model's business (its
//! manifest), not this module's.
//!
//! # Layout
//! - [`STEP_FEATURES`]: names, in order, as the manifest lists them.
//! - [`encode_window`]: presses to `steps x STEP_FEATURES.len()` floats.
//! - [`encode_followed`]: one press's step, for a per-press model.
//! - [`SequenceScorer`], [`PressScorer`]: the seams models implement; the core never sees the
//!   runtime.

use super::window::Press;

/// Per-step input names, in order.
pub const STEP_FEATURES: [&str; 8] = [
    "present",
    "log_flight_ms",
    "log_hold_ms",
    "hold_known",
    "same_key_as_previous",
    "key_recurrence",
    "flight_echo",
    "log_repeats",
];

/// Values per step.
pub const STEP_WIDTH: usize = STEP_FEATURES.len();

/// Longest flight time the encoding distinguishes, microseconds; longer gaps are pauses.
const MAX_FLIGHT_US: i64 = 10_000_000;

/// ln(1 + ms): compresses human-scale times so 5 ms and 50 ms differ as much as 50 and 500.
fn log_ms(us: i64) -> f32 {
    (us.clamp(0, MAX_FLIGHT_US) as f32 / 1000.0).ln_1p()
}

/// Appends the encoding of the last `steps` presses of `presses` to `out`
/// (`steps * STEP_WIDTH` values, oldest step first).
pub fn encode_window(presses: &[Press], steps: usize, out: &mut Vec<f32>) {
    let used = &presses[presses.len().saturating_sub(steps)..];
    out.resize(out.len() + (steps - used.len()) * STEP_WIDTH, 0.0);
    for i in 0..used.len() {
        out.extend_from_slice(&encode_step(used, i));
    }
}

/// Presses of context a per-press step is encoded with (the window model's step count).
pub const PRESS_CONTEXT: usize = 50;

/// Appends the step of the press the newest one has just followed (the second newest of
/// `presses`), encoded with the presses before it in the last [`PRESS_CONTEXT`], to `out`;
/// false, appending nothing, while fewer than four presses are there. This is the step a
/// window scored at this moment holds for that press, so the per-press model reads what
/// `examples/export_presses.rs` trained it on.
pub fn encode_followed(presses: &[Press], out: &mut Vec<f32>) -> bool {
    if presses.len() < 4 {
        return false;
    }
    let used = &presses[presses.len().saturating_sub(PRESS_CONTEXT)..];
    out.extend_from_slice(&encode_step(used, used.len() - 2));
    true
}

/// The step of `used[i]`, from it and the presses before it in `used`.
fn encode_step(used: &[Press], i: usize) -> [f32; STEP_WIDTH] {
    let p = &used[i];
    let flight = if i > 0 { log_ms(p.down_us.saturating_sub(used[i - 1].down_us)) } else { 0.0 };
    let (log_hold, hold_known) = match p.hold() {
        Some(h) => (log_ms(i64::from(h)), 1.0),
        None => (0.0, 0.0),
    };
    let same_as_previous = i > 0 && used[i - 1].key == p.key;
    // Steps back to this key's previous occurrence: short for a rotation or a loop.
    let previous = used[..i].iter().rposition(|q| q.key == p.key);
    let (recurrence, echo) = match previous {
        Some(j) if j > 0 && i > 0 => {
            let then = log_ms(used[j].down_us.saturating_sub(used[j - 1].down_us));
            (1.0 / (i - j) as f32, flight - then)
        }
        Some(j) => (1.0 / (i - j) as f32, 0.0),
        None => (0.0, 0.0),
    };
    [
        1.0,
        flight,
        log_hold,
        hold_known,
        f32::from(u8::from(same_as_previous)),
        recurrence,
        echo,
        f32::from(p.repeats).ln_1p(),
    ]
}

/// Why a sequence model could not score a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sequence model failed: {0}")]
pub struct SequenceError(pub String);

/// A model that scores encoded windows, many at a time.
pub trait SequenceScorer {
    /// Identifies the model in alerts and alert ids.
    fn version(&self) -> &str;
    /// Steps per window the model reads.
    fn steps(&self) -> usize;
    /// Scores `windows` windows laid out back to back in `inputs` (each
    /// `steps() * STEP_WIDTH` values from [`encode_window`]), appending one score in 0..1 per
    /// window to `out`. 0.5 is the model's operating threshold, and a score's log-odds are the
    /// model's log-odds over that threshold's (the policy adds them up across windows).
    fn score(&mut self, inputs: &[f32], windows: usize, out: &mut Vec<f32>) -> Result<(), SequenceError>;
    /// Whether a per-press model runs beside this window model (batches then queue presses).
    fn reads_presses(&self) -> bool {
        false
    }
    /// The per-press model that runs beside this window model, if there is one.
    fn press_scorer(&mut self) -> Option<&mut dyn PressScorer> {
        None
    }
}

/// A model that reads one press at a time from a state each user carries (`h` and `c`), giving
/// a log-odds per press; its policy is a CUSUM over them.
pub trait PressScorer {
    /// Identifies the model in alerts and alert ids.
    fn version(&self) -> &str;
    /// Floats in one user's `h` (and in their `c`).
    fn hidden(&self) -> usize;
    /// The CUSUM it was tuned with.
    fn policy(&self) -> PressPolicy;
    /// Advances `n` users by one press each: `steps` their steps back to back (from
    /// [`encode_followed`]), `h` and `c` their states (`n * hidden()` each, replaced by the new
    /// ones); appends each user's log-odds to `out`. A user's numbers may not depend on who
    /// else is in the call.
    fn advance(&mut self, steps: &[f32], h: &mut [f32], c: &mut [f32], out: &mut Vec<f32>)
        -> Result<(), SequenceError>;
}

/// A one-sided CUSUM over per-press log-odds: `S = max(0, S + clamp(x - reference))`, an
/// incident once `S >= threshold`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressPolicy {
    /// Log-odds a press must beat to add evidence.
    pub reference: f32,
    /// The most one press moves the evidence, either way.
    pub clamp: f32,
    /// Evidence that opens an incident.
    pub threshold: f32,
}

impl PressPolicy {
    /// The evidence after a press of log-odds `x`.
    pub fn step(&self, evidence: f32, x: f32) -> f32 {
        let x = if x.is_finite() { x } else { self.reference };
        (evidence + (x - self.reference).clamp(-self.clamp, self.clamp)).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(down_ms: i64, key: u32, hold_ms: i32) -> Press {
        Press { down_us: down_ms * 1000, key, hold_us: if hold_ms < 0 { -1 } else { hold_ms * 1000 }, repeats: 0 }
    }

    fn step(out: &[f32], i: usize) -> &[f32] {
        &out[i * STEP_WIDTH..(i + 1) * STEP_WIDTH]
    }

    #[test]
    fn short_windows_are_left_padded_with_absent_steps() {
        let presses = [press(0, 1, 50), press(100, 2, 60), press(250, 1, -1)];
        let mut out = Vec::new();
        encode_window(&presses, 5, &mut out);
        assert_eq!(out.len(), 5 * STEP_WIDTH);
        assert!(out[..2 * STEP_WIDTH].iter().all(|v| *v == 0.0));
        let first = step(&out, 2);
        assert_eq!(first[0], 1.0);
        assert_eq!(first[1], 0.0, "no flight before the first press");
        assert!((first[2] - 51f32.ln()).abs() < 1e-6);
        let last = step(&out, 4);
        assert!((last[1] - 151f32.ln()).abs() < 1e-6);
        assert_eq!((last[2], last[3]), (0.0, 0.0), "hold not yet known");
        assert_eq!(last[4], 0.0);
        assert_eq!(last[5], 0.5, "key 1 occurred two steps back");
        assert_eq!(last[6], 0.0, "its earlier occurrence had no flight to echo");
    }

    #[test]
    fn a_replayed_loop_echoes_its_own_timing() {
        // Keys 1,2,3 looped with the same intervals: every later step echoes exactly.
        let gaps = [120, 80, 200];
        let mut t = 0;
        let presses: Vec<Press> = (0..12)
            .map(|i| {
                let p = press(t, 1 + (i % 3) as u32, 40);
                t += gaps[i % 3];
                p
            })
            .collect();
        let mut out = Vec::new();
        encode_window(&presses, 12, &mut out);
        for i in 4..12 {
            let s = step(&out, i);
            assert!((s[5] - 1.0 / 3.0).abs() < 1e-6);
            assert_eq!(s[6], 0.0, "step {i}");
        }
    }

    #[test]
    fn only_the_last_steps_are_encoded() {
        let presses: Vec<Press> = (0..60).map(|i| press(i * 100, i as u32, 30)).collect();
        let mut a = Vec::new();
        encode_window(&presses, 50, &mut a);
        let mut b = Vec::new();
        encode_window(&presses[10..], 50, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn extreme_times_stay_finite() {
        let presses = [press(0, 1, 0), Press { down_us: i64::MAX, key: 1, hold_us: i32::MAX, repeats: u16::MAX }];
        let mut out = Vec::new();
        encode_window(&presses, 2, &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
    }
}
