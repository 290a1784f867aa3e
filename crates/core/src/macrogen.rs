//! Synthetic macro traffic: the positive class, since nobody publishes real macro keystrokes.
//!
//! Eight families, from trivially regular to human-shaped:
//! - [`MacroFamily::Fixed`]: one interval, forever.
//! - [`MacroFamily::OsTick`]: a sleep rounded up to the OS timer tick (15.625 ms on Windows,
//!   10 ms or 4 ms on Linux), sometimes one tick late.
//! - [`MacroFamily::UniformJitter`] / [`MacroFamily::GaussianJitter`]: a base interval plus
//!   noise, the usual "humanizer" option of macro tools.
//! - [`MacroFamily::HumanReplay`]: a recorded human sequence (keys, intervals, holds) played
//!   back in a loop.
//! - [`MacroFamily::HumanSampled`]: intervals drawn independently from a human's own intervals.
//! - [`MacroFamily::ReplayLoop`]: what a careful cheater records: 100 to 1,000 presses of real
//!   typing looped with a few ms of jitter on every flight and hold, longer than any window;
//!   half of them loop the recording's keys, half a key rotation of another period.
//! - [`MacroFamily::HumanIid`]: flights *and* holds drawn independently from one human's own,
//!   on random letter keys: every marginal distribution is human.
//!
//!
//! [`fleet`] makes one script run by many accounts: a [`FleetScript`] (one generated user's
//! presses) played by each account from its own point, with its own start and jitter.
//!
//! Except for the replays and i.i.d. sampling, keys cycle through a short rotation (game skills) and holds are fixed or
//! tiny, as macro tools make them. Everything is driven by a caller-seeded RNG, so a seed
//! reproduces a data set exactly.

use rand::seq::IndexedRandom;
use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::event::{KeyAction, KeyEvent};

/// A macro family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MacroFamily {
    /// Constant interval.
    Fixed,
    /// Interval quantised to an OS timer tick.
    OsTick,
    /// Base interval plus uniform noise.
    UniformJitter,
    /// Base interval plus gaussian noise.
    GaussianJitter,
    /// A recorded human sequence played in a loop.
    HumanReplay,
    /// Intervals sampled from a human's interval distribution.
    HumanSampled,
    /// A long human recording looped with ms jitter on flights and holds.
    ReplayLoop,
    /// Flights and holds sampled independently from a human's, on random keys.
    HumanIid,
}

impl MacroFamily {
    /// Every family.
    pub const ALL: [MacroFamily; 8] = [
        MacroFamily::Fixed,
        MacroFamily::OsTick,
        MacroFamily::UniformJitter,
        MacroFamily::GaussianJitter,
        MacroFamily::HumanReplay,
        MacroFamily::HumanSampled,
        MacroFamily::ReplayLoop,
        MacroFamily::HumanIid,
    ];

    /// Snake-case name.
    pub fn name(self) -> &'static str {
        match self {
            MacroFamily::Fixed => "fixed",
            MacroFamily::OsTick => "os_tick",
            MacroFamily::UniformJitter => "uniform_jitter",
            MacroFamily::GaussianJitter => "gaussian_jitter",
            MacroFamily::HumanReplay => "human_replay",
            MacroFamily::HumanSampled => "human_sampled",
            MacroFamily::ReplayLoop => "replay_loop",
            MacroFamily::HumanIid => "human_iid",
        }
    }

    /// Whether one window can show the family, so that a window model may learn it: a replay
    /// loop is a stretch of real typing until it comes round (the recurrence memory's case,
    /// `detect::recurrence`), and labelling its windows as macros would teach a window model to
    /// flag human typing.
    pub fn window_visible(self) -> bool {
        self != MacroFamily::ReplayLoop
    }

    /// Whether the family needs a human recording.
    pub fn needs_human(self) -> bool {
        matches!(
            self,
            MacroFamily::HumanReplay | MacroFamily::HumanSampled | MacroFamily::ReplayLoop | MacroFamily::HumanIid
        )
    }
}

impl std::str::FromStr for MacroFamily {
    type Err = String;

    /// A family by its [`MacroFamily::name`].
    fn from_str(name: &str) -> Result<Self, String> {
        MacroFamily::ALL.into_iter().find(|f| f.name() == name).ok_or_else(|| {
            let names: Vec<&str> = MacroFamily::ALL.iter().map(|f| f.name()).collect();
            format!("no macro family `{name}` (one of {})", names.join(", "))
        })
    }
}

impl std::fmt::Display for MacroFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How long the macro holds each key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum HoldModel {
    /// Always this many milliseconds.
    Fixed(f64),
    /// Released almost at once: 0.2 to 3 ms.
    Tiny,
    /// Drawn from the human recording's holds: a "humanized" macro, the hard case for timing
    /// rules.
    Recorded,
}

/// One key press of a recording: down time, key, hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedPress {
    /// Down time, microseconds.
    pub down_us: i64,
    /// Key.
    pub key: u32,
    /// Hold, microseconds.
    pub hold_us: i64,
}

/// Pairs downs with their ups. Presses whose up never comes get a 60 ms hold; repeats are dropped.
pub fn recorded_presses(events: &[KeyEvent]) -> Vec<RecordedPress> {
    let mut out: Vec<RecordedPress> = Vec::new();
    let mut open: Vec<(u32, usize)> = Vec::new();
    for e in events {
        match e.action {
            KeyAction::Down => {
                open.push((e.key, out.len()));
                out.push(RecordedPress { down_us: e.time_us, key: e.key, hold_us: -1 });
            }
            KeyAction::Up => {
                if let Some(pos) = open.iter().rposition(|(k, _)| *k == e.key) {
                    let (_, idx) = open.remove(pos);
                    out[idx].hold_us = (e.time_us - out[idx].down_us).max(0);
                }
            }
            KeyAction::Repeat => {}
        }
    }
    for p in &mut out {
        if p.hold_us < 0 {
            p.hold_us = 60_000;
        }
    }
    out
}

/// A fully specified macro.
#[derive(Debug, Clone, PartialEq)]
pub struct MacroSpec {
    /// Family.
    pub family: MacroFamily,
    /// Base interval between presses, ms.
    pub interval_ms: f64,
    /// Uniform half-width or gaussian sigma, ms; for a replay loop, the uniform half-width
    /// added to each recorded flight and hold.
    pub jitter_ms: f64,
    /// OS timer tick, ms.
    pub tick_ms: f64,
    /// Hold model (ignored by replay, which keeps the recorded holds).
    pub hold: HoldModel,
    /// Key rotation (ignored by the short replay; a replay loop with an empty rotation plays the
    /// recording's keys).
    pub keys: Vec<u32>,
    /// Presses in a replay loop (capped at the recording's length); 0 for other families.
    pub loop_presses: usize,
}

/// Keys game macros typically bind: digits 1-6, Q, E, R, F, space, mouse-less skills.
const SKILL_KEYS: [u32; 11] = [2, 3, 4, 5, 6, 7, 16, 18, 19, 33, 57];

impl MacroSpec {
    /// Draws a spec of `family` with the parameter ranges real macro tools use.
    pub fn random(family: MacroFamily, rng: &mut impl Rng) -> Self {
        let interval_ms: f64 = rng.random_range(40.0..300.0);
        let rotation_len = rng.random_range(1..=6);
        let keys = SKILL_KEYS.choose_multiple(rng, rotation_len).copied().collect();
        let hold = if rng.random_bool(0.5) {
            HoldModel::Tiny
        } else {
            HoldModel::Fixed(rng.random_range(8.0..(interval_ms * 0.6).min(90.0)))
        };
        let jitter_ms = match family {
            MacroFamily::UniformJitter => interval_ms * rng.random_range(0.05..0.35),
            MacroFamily::GaussianJitter => interval_ms * rng.random_range(0.05..0.25),
            MacroFamily::ReplayLoop => rng.random_range(1.0..5.0),
            _ => 0.0,
        };
        let tick_ms = *[15.625, 10.0, 4.0].choose(rng).expect("non-empty");
        let (keys, loop_presses) = match family {
            // Half the loops replay the recorded keys, half a rotation of another period.
            MacroFamily::ReplayLoop if rng.random_bool(0.5) => (Vec::new(), rng.random_range(100..=1000)),
            MacroFamily::ReplayLoop => (keys, rng.random_range(100..=1000)),
            _ => (keys, 0),
        };
        let hold =
            if matches!(family, MacroFamily::ReplayLoop | MacroFamily::HumanIid) { HoldModel::Recorded } else { hold };
        Self { family, interval_ms, jitter_ms, tick_ms, hold, keys, loop_presses }
    }

    /// Presses a user of this macro should be watched for when `presses` is the usual number: a
    /// replay loop only repeats itself after a whole loop, so it gets two loops and a window more;
    /// an i.i.d. sampler shows nothing before the key-dependence test's first verdict (two blocks
    /// of 300 presses by default), so it gets that and 100 more.
    pub fn presses_to_watch(&self, presses: usize) -> usize {
        match self.family {
            MacroFamily::ReplayLoop => presses.max(2 * self.loop_presses + 100),
            MacroFamily::HumanIid => presses.max(700),
            _ => presses,
        }
    }
}

/// Letter keys (evdev Q..P, A..L, Z..M) and space: what i.i.d. sampling presses.
const LETTER_KEYS: [u32; 27] =
    [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 30, 31, 32, 33, 34, 35, 36, 37, 38, 44, 45, 46, 47, 48, 49, 50, 57];

/// Generates `presses` presses of `spec` starting at `start_us`. `human` is the recording replay
/// and sampling draw from; families that need one fall back to a fixed macro without it.
pub fn generate(
    spec: &MacroSpec,
    human: &[RecordedPress],
    start_us: i64,
    presses: usize,
    rng: &mut impl Rng,
) -> Vec<KeyEvent> {
    let mut events = Vec::with_capacity(presses * 2);
    if spec.family == MacroFamily::HumanReplay && human.len() >= 4 {
        replay(human, start_us, presses, rng, &mut events);
    } else if spec.family == MacroFamily::ReplayLoop && human.len() >= 20 {
        replay_loop(spec, human, start_us, presses, rng, &mut events);
    } else if spec.family == MacroFamily::HumanIid && human.len() >= 20 {
        human_iid(human, start_us, presses, rng, &mut events);
    } else {
        let human_holds = recorded_holds(human);
        let human_intervals = recorded_flights(human);
        let mut t = start_us;
        for i in 0..presses {
            let key = spec.keys[i % spec.keys.len().max(1)];
            let hold_us = match spec.hold {
                HoldModel::Fixed(ms) => (ms * 1000.0) as i64,
                HoldModel::Tiny => rng.random_range(200..3_000),
                HoldModel::Recorded => human_holds.choose(rng).copied().unwrap_or(80_000),
            };
            events.push(KeyEvent::new(t, key, KeyAction::Down));
            events.push(KeyEvent::new(t + hold_us, key, KeyAction::Up));
            let interval_us = next_interval_us(spec, &human_intervals, rng);
            // A key cannot go down again before it went up; other keys of the rotation may.
            let rotation = spec.keys.len().max(1) as i64;
            t += interval_us.max((hold_us + 1_000) / rotation);
        }
        events.sort_by_key(|e| e.time_us);
    }
    events
}

/// The recording's holds that samplers draw from (the plausible ones: under a second).
fn recorded_holds(human: &[RecordedPress]) -> Vec<i64> {
    human.iter().map(|p| p.hold_us).filter(|&h| h > 0 && h < 1_000_000).collect()
}

/// The recording's down-to-down flights that samplers draw from: rhythm, not pauses.
fn recorded_flights(human: &[RecordedPress]) -> Vec<i64> {
    human.windows(2).map(|w| w[1].down_us - w[0].down_us).filter(|&d| (20_000..1_500_000).contains(&d)).collect()
}

fn next_interval_us(spec: &MacroSpec, human_intervals: &[i64], rng: &mut impl Rng) -> i64 {
    let base = spec.interval_ms * 1000.0;
    let us = match spec.family {
        MacroFamily::Fixed | MacroFamily::HumanReplay | MacroFamily::ReplayLoop => base,
        MacroFamily::OsTick => {
            let tick = spec.tick_ms * 1000.0;
            let ticks = (base / tick).ceil() + if rng.random_bool(0.15) { 1.0 } else { 0.0 };
            ticks * tick
        }
        MacroFamily::UniformJitter => base + rng.random_range(-1.0..=1.0) * spec.jitter_ms * 1000.0,
        MacroFamily::GaussianJitter => {
            let normal = Normal::new(base, spec.jitter_ms * 1000.0).expect("finite sigma");
            normal.sample(rng)
        }
        MacroFamily::HumanSampled | MacroFamily::HumanIid => match human_intervals.choose(rng) {
            Some(&d) => d as f64,
            None => base,
        },
    };
    (us as i64).max(5_000)
}

/// Loops a recorded segment of 8 to 30 presses, keeping its keys, intervals and holds.
fn replay(human: &[RecordedPress], start_us: i64, presses: usize, rng: &mut impl Rng, out: &mut Vec<KeyEvent>) {
    let len = rng.random_range(8..=30).min(human.len());
    let from = rng.random_range(0..=human.len() - len);
    let segment = &human[from..from + len];
    // The loop restarts after the segment's own median interval, as a recorder's loop delay.
    let mut gaps: Vec<i64> = segment.windows(2).map(|w| (w[1].down_us - w[0].down_us).max(1_000)).collect();
    gaps.sort_unstable();
    let loop_gap = gaps.get(gaps.len() / 2).copied().unwrap_or(100_000).min(1_500_000);
    let mut t = start_us;
    for i in 0..presses {
        let p = segment[i % len];
        out.push(KeyEvent::new(t, p.key, KeyAction::Down));
        out.push(KeyEvent::new(t + p.hold_us, p.key, KeyAction::Up));
        let next = segment[(i + 1) % len];
        t += if (i + 1) % len == 0 { loop_gap } else { (next.down_us - p.down_us).clamp(1_000, 1_500_000) };
    }
    out.sort_by_key(|e| e.time_us);
}

/// Loops `spec.loop_presses` presses of the recording (a random stretch of it) with uniform
/// jitter of `spec.jitter_ms` on every flight and hold; keys from the recording, or from
/// `spec.keys` in a rotation of its own period.
fn replay_loop(
    spec: &MacroSpec,
    human: &[RecordedPress],
    start_us: i64,
    presses: usize,
    rng: &mut impl Rng,
    out: &mut Vec<KeyEvent>,
) {
    let len = spec.loop_presses.clamp(20, human.len());
    let from = rng.random_range(0..=human.len() - len);
    let segment = &human[from..from + len];
    let flights: Vec<i64> = (0..len)
        .map(|i| match segment.get(i + 1) {
            Some(next) => (next.down_us - segment[i].down_us).clamp(1_000, 1_500_000),
            None => 250_000, // the recorder's loop delay
        })
        .collect();
    let jitter_us = (spec.jitter_ms * 1000.0) as i64;
    let mut keys = KeyTracker::default();
    let mut t = start_us;
    for i in 0..presses {
        let p = segment[i % len];
        let key = if spec.keys.is_empty() { p.key } else { spec.keys[i % spec.keys.len()] };
        let hold_us = (p.hold_us + rng.random_range(-jitter_us..=jitter_us)).max(1_000);
        keys.press(out, t, key, hold_us);
        t += (flights[i % len] + rng.random_range(-jitter_us..=jitter_us)).max(1_000);
    }
    out.sort_by_key(|e| e.time_us);
}

/// Flights and holds drawn independently from the recording's, on random letter keys.
fn human_iid(human: &[RecordedPress], start_us: i64, presses: usize, rng: &mut impl Rng, out: &mut Vec<KeyEvent>) {
    let (holds, flights) = (recorded_holds(human), recorded_flights(human));
    let mut keys = KeyTracker::default();
    let mut t = start_us;
    for _ in 0..presses {
        let key = *LETTER_KEYS.choose(rng).expect("non-empty");
        keys.press(out, t, key, holds.choose(rng).copied().unwrap_or(90_000));
        t += flights.choose(rng).copied().unwrap_or(200_000);
    }
    out.sort_by_key(|e| e.time_us);
}

/// Emits presses so that a key never goes down while it is still down: a press of a held key
/// releases it first, 1 ms before, as a key switch must.
#[derive(Default)]
struct KeyTracker {
    /// Key -> index in the output of its latest key-up.
    last_up: std::collections::HashMap<u32, usize>,
}

impl KeyTracker {
    fn press(&mut self, out: &mut Vec<KeyEvent>, at_us: i64, key: u32, hold_us: i64) {
        if let Some(&up) = self.last_up.get(&key) {
            if out[up].time_us >= at_us {
                out[up].time_us = at_us - 1_000;
            }
        }
        out.push(KeyEvent::new(at_us, key, KeyAction::Down));
        self.last_up.insert(key, out.len());
        out.push(KeyEvent::new(at_us + hold_us, key, KeyAction::Up));
    }
}

/// One script that many accounts run: a fleet. The script is one generated macro user's presses
/// (its flights, holds and keys); each account plays it from its own point in it, with its own
/// start time and a few ms of its own jitter on every flight and hold, as copies of one tool
/// with a "humanize" setting would.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetScript {
    /// Flight before each press, microseconds (the first is the loop's wrap-around).
    flights: Vec<i64>,
    holds: Vec<i64>,
    keys: Vec<u32>,
}

impl FleetScript {
    /// The script of `script_presses` presses of `spec` (on `human`'s timing where the family
    /// draws on a recording).
    pub fn generate(spec: &MacroSpec, human: &[RecordedPress], script_presses: usize, rng: &mut impl Rng) -> Self {
        let presses = recorded_presses(&generate(spec, human, 0, script_presses.max(2), rng));
        let n = presses.len();
        let flights = (0..n)
            .map(|i| if i == 0 { 250_000 } else { (presses[i].down_us - presses[i - 1].down_us).max(1_000) })
            .collect();
        Self {
            flights,
            holds: presses.iter().map(|p| p.hold_us.max(1_000)).collect(),
            keys: presses.iter().map(|p| p.key).collect(),
        }
    }

    /// Presses in the script.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True for a script without presses (never, from [`FleetScript::generate`]).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// One account's run: `presses` presses from script press `phase` on, starting at
    /// `start_us`, with uniform jitter of up to `jitter_us` on every flight and hold.
    pub fn play(
        &self,
        start_us: i64,
        phase: usize,
        presses: usize,
        jitter_us: i64,
        rng: &mut impl Rng,
    ) -> Vec<KeyEvent> {
        let mut out = Vec::with_capacity(presses * 2);
        let mut keys = KeyTracker::default();
        let mut t = start_us;
        for i in 0..presses {
            let at = (phase + i) % self.len();
            let hold = (self.holds[at] + rng.random_range(-jitter_us..=jitter_us)).max(1_000);
            keys.press(&mut out, t, self.keys[at], hold);
            let next = (at + 1) % self.len();
            t += (self.flights[next] + rng.random_range(-jitter_us..=jitter_us)).max(1_000);
        }
        out.sort_by_key(|e| e.time_us);
        out
    }
}

/// A fleet of `accounts` accounts (5 to 10 in the evaluation) running one script: each starts
/// within `spread_us` of `start_us` at a random point of the script, with 1-5 ms of jitter of its
/// own. Returns each account's events.
pub fn fleet(
    script: &FleetScript,
    accounts: usize,
    start_us: i64,
    spread_us: i64,
    presses: usize,
    rng: &mut impl Rng,
) -> Vec<Vec<KeyEvent>> {
    (0..accounts)
        .map(|_| {
            let start = start_us + rng.random_range(0..=spread_us.max(0));
            let phase = rng.random_range(0..script.len().max(1));
            let jitter_us = rng.random_range(1_000..=5_000);
            script.play(start, phase, presses, jitter_us, rng)
        })
        .collect()
}

/// A human session with a macro switched on part-way: the human's events up to (not including)
/// press `onset_press`, then `macro_presses` presses of `spec`. Returns the events and the
/// macro's first down time.
pub fn human_then_macro(
    human_events: &[KeyEvent],
    onset_press: usize,
    spec: &MacroSpec,
    macro_presses: usize,
    rng: &mut impl Rng,
) -> (Vec<KeyEvent>, i64) {
    let mut downs = 0;
    let cut = human_events
        .iter()
        .position(|e| {
            if e.action == KeyAction::Down {
                downs += 1;
            }
            downs > onset_press
        })
        .unwrap_or(human_events.len());
    let mut events: Vec<KeyEvent> = human_events[..cut].to_vec();
    // Keys still down at the onset are released by the human, not dropped.
    let mut open: Vec<u32> = Vec::new();
    for e in &events {
        match e.action {
            KeyAction::Down => open.push(e.key),
            KeyAction::Up => open.retain(|k| *k != e.key),
            KeyAction::Repeat => {}
        }
    }
    for e in &human_events[cut..] {
        if e.action == KeyAction::Up && open.contains(&e.key) {
            open.retain(|k| *k != e.key);
            events.push(*e);
        }
    }
    let last = events.iter().map(|e| e.time_us).max().unwrap_or(0);
    let onset_us = last + 250_000;
    let recorded = recorded_presses(human_events);
    events.extend(generate(spec, &recorded, onset_us, macro_presses, rng));
    events.sort_by_key(|e| e.time_us);
    (events, onset_us)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn human() -> Vec<RecordedPress> {
        (0..60)
            .map(|i| RecordedPress {
                down_us: i * 170_000 + (i * i * 997) % 60_000,
                key: 16 + (i as u32 * 5) % 26,
                hold_us: 70_000 + (i * 3_001) % 40_000,
            })
            .collect()
    }

    #[test]
    fn every_family_generates_ordered_paired_events() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for family in MacroFamily::ALL {
            for _ in 0..20 {
                let spec = MacroSpec::random(family, &mut rng);
                let events = generate(&spec, &human(), 1_000_000, 100, &mut rng);
                assert_eq!(events.len(), 200, "{family:?}");
                assert!(events.windows(2).all(|w| w[0].time_us <= w[1].time_us), "{family:?}");
                let presses = recorded_presses(&events);
                assert_eq!(presses.len(), 100);
                assert!(presses.iter().all(|p| p.hold_us >= 0));
            }
        }
    }

    #[test]
    fn same_seed_same_traffic() {
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let spec = MacroSpec::random(MacroFamily::GaussianJitter, &mut rng);
            generate(&spec, &[], 0, 50, &mut rng)
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn fixed_macro_has_one_interval() {
        let spec = MacroSpec {
            family: MacroFamily::Fixed,
            interval_ms: 80.0,
            jitter_ms: 0.0,
            tick_ms: 10.0,
            hold: HoldModel::Fixed(20.0),
            keys: vec![2, 3],
            loop_presses: 0,
        };
        let events = generate(&spec, &[], 0, 10, &mut ChaCha8Rng::seed_from_u64(1));
        let downs: Vec<i64> = events.iter().filter(|e| e.action == KeyAction::Down).map(|e| e.time_us).collect();
        assert!(downs.windows(2).all(|w| w[1] - w[0] == 80_000));
    }

    #[test]
    fn os_tick_intervals_are_tick_multiples() {
        let spec = MacroSpec {
            family: MacroFamily::OsTick,
            interval_ms: 50.0,
            jitter_ms: 0.0,
            tick_ms: 15.625,
            hold: HoldModel::Tiny,
            keys: vec![2],
            loop_presses: 0,
        };
        let events = generate(&spec, &[], 0, 200, &mut ChaCha8Rng::seed_from_u64(2));
        let downs: Vec<i64> = events.iter().filter(|e| e.action == KeyAction::Down).map(|e| e.time_us).collect();
        for w in downs.windows(2) {
            let d = w[1] - w[0];
            assert!(d == 62_500 || d == 78_125, "{d}");
        }
    }

    #[test]
    fn replay_repeats_the_recorded_segment() {
        let spec = MacroSpec::random(MacroFamily::HumanReplay, &mut ChaCha8Rng::seed_from_u64(5));
        let events = generate(&spec, &human(), 0, 120, &mut ChaCha8Rng::seed_from_u64(5));
        let keys: Vec<u32> = recorded_presses(&events).iter().map(|p| p.key).collect();
        let period = (1..=30).find(|&p| (p..keys.len()).all(|i| keys[i] == keys[i - p])).expect("periodic");
        assert!((8..=30).contains(&period));
    }

    #[test]
    fn mixed_session_switches_at_the_onset() {
        let human_events: Vec<KeyEvent> = human()
            .iter()
            .flat_map(|p| {
                [
                    KeyEvent::new(p.down_us, p.key, KeyAction::Down),
                    KeyEvent::new(p.down_us + p.hold_us, p.key, KeyAction::Up),
                ]
            })
            .collect();
        let mut sorted = human_events.clone();
        sorted.sort_by_key(|e| e.time_us);
        let spec = MacroSpec::random(MacroFamily::Fixed, &mut ChaCha8Rng::seed_from_u64(9));
        let (events, onset) = human_then_macro(&sorted, 20, &spec, 40, &mut ChaCha8Rng::seed_from_u64(9));
        let downs_before = events.iter().filter(|e| e.action == KeyAction::Down && e.time_us < onset).count();
        let downs_after = events.iter().filter(|e| e.action == KeyAction::Down && e.time_us >= onset).count();
        assert_eq!((downs_before, downs_after), (20, 40));
    }

    #[test]
    fn a_replay_loop_repeats_its_timing_within_the_jitter() {
        let human: Vec<RecordedPress> = (0..400)
            .map(|i| RecordedPress {
                down_us: i * 200_000 + (i * i * 7_919) % 90_000,
                key: 30,
                hold_us: 60_000 + (i * 4_001) % 70_000,
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        for _ in 0..20 {
            let spec = MacroSpec::random(MacroFamily::ReplayLoop, &mut rng);
            assert!((100..=1000).contains(&spec.loop_presses) && spec.hold == HoldModel::Recorded);
            assert!(spec.jitter_ms >= 1.0 && spec.jitter_ms <= 5.0);
            let presses = spec.presses_to_watch(200);
            assert_eq!(presses, 2 * spec.loop_presses + 100);
            let events = generate(&spec, &human, 0, presses, &mut rng);
            let p = recorded_presses(&events);
            assert_eq!(p.len(), presses);
            let period = spec.loop_presses.min(human.len());
            let jitter = (spec.jitter_ms * 1000.0) as i64;
            for i in period + 1..presses {
                let (now, then) = (p[i].down_us - p[i - 1].down_us, p[i - period].down_us - p[i - period - 1].down_us);
                assert!((now - then).abs() <= 2 * jitter, "flight {i}");
            }
            if !spec.keys.is_empty() {
                assert!(p.iter().all(|x| spec.keys.contains(&x.key)));
            }
        }
    }

    #[test]
    fn human_iid_draws_flights_and_holds_from_the_recording_on_letter_keys() {
        let rec = human();
        let flights: Vec<i64> = rec.windows(2).map(|w| w[1].down_us - w[0].down_us).collect();
        let holds: Vec<i64> = rec.iter().map(|p| p.hold_us).collect();
        let spec = MacroSpec::random(MacroFamily::HumanIid, &mut ChaCha8Rng::seed_from_u64(22));
        let p = recorded_presses(&generate(&spec, &rec, 0, 300, &mut ChaCha8Rng::seed_from_u64(23)));
        assert_eq!(p.len(), 300);
        assert!(p.windows(2).all(|w| flights.contains(&(w[1].down_us - w[0].down_us))));
        // A hold is the recording's unless the same key came again before its release.
        let recorded = p.iter().filter(|x| holds.contains(&x.hold_us)).count();
        assert!(recorded > 280, "{recorded}");
        assert!(p.iter().all(|x| LETTER_KEYS.contains(&x.key)));
        let distinct: std::collections::HashSet<u32> = p.iter().map(|x| x.key).collect();
        assert!(distinct.len() > 20);
    }

    #[test]
    fn a_fleet_plays_one_script_from_different_points_within_its_jitter() {
        let mut rng = ChaCha8Rng::seed_from_u64(24);
        let spec = MacroSpec::random(MacroFamily::HumanIid, &mut rng);
        let script = FleetScript::generate(&spec, &human(), 300, &mut rng);
        assert_eq!(script.len(), 300);
        let accounts = fleet(&script, 6, 1_000_000, 60_000_000, 400, &mut rng);
        assert_eq!(accounts.len(), 6);
        let flights = |events: &[KeyEvent]| -> Vec<i64> {
            let p = recorded_presses(events);
            p.windows(2).map(|w| w[1].down_us - w[0].down_us).collect()
        };
        let runs: Vec<Vec<i64>> = accounts.iter().map(|a| flights(a)).collect();
        assert!(runs.iter().all(|r| r.len() == 399));
        // Each account's flights are the script's, shifted by its phase, each within 2 x 5 ms of
        // every other account's at the same script position (the script loops after 300).
        let script_flight = |at: usize| script.flights[at % script.len()];
        for (a, run) in runs.iter().enumerate() {
            let phase = (0..script.len())
                .find(|&ph| run.iter().enumerate().all(|(i, f)| (f - script_flight(ph + i + 1)).abs() <= 5_000))
                .unwrap_or_else(|| panic!("account {a} does not follow the script"));
            assert!(phase < script.len());
        }
        // Not the same events: each account has its own start and jitter.
        assert_ne!(accounts[0], accounts[1]);
    }
}
