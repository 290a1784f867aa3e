//! Long-horizon memory per user: timing runs that recur, the mark of a replayed recording.
//!
//! A human does not reproduce a run of ten flights and holds to within a few milliseconds each,
//! not even when typing the same word or password again (their timing varies by tens of ms). A
//! replay tool does, every time round its loop, however long the loop and whether or not it
//! loops its keys with the same period. The 50-press window cannot see a loop of 500 presses;
//! this memory holds the user's last `memory_presses` presses (flight and hold, 3 bytes each)
//! and finds such recurrences in constant work per press:
//!
//! - each press's flight (key-down to key-down) and hold are written to a ring; a pause (a flight
//!   longer than `pause_ms`) breaks runs;
//! - the last `hash_flights` flights, quantised to `quantum_ms`, hash to a key; one key in four
//!   is an *anchor* (content-defined, as in rsync or winnowing, so a recurring run is an anchor
//!   every time it recurs) and an index of `index_slots` slots maps anchor keys to the latest
//!   position that had them;
//! - a hit is verified against the ring, backwards from both positions: a *recurrence* is a run
//!   of at least `min_run` consecutive presses whose flights and holds each differ by at most
//!   `tolerance_ms` and on average by at most `mean_tolerance_ms`. Runs whose flights span less
//!   than `min_range_ms` are regular, not replayed: the timing rules judge those;
//! - recurrences are tallied by their period (distance in presses); the evidence is the best
//!   tally among periods that recurred within the last `recent_presses` presses, and the
//!   `replay` rule fires at `rules.replay_recurrences` of them.
//!
//! No key ids are kept here: the hash and the check read timing only, so a tool that shuffles
//! or rotates keys over a recorded rhythm is still found.

use serde::{Deserialize, Serialize};

use super::window::Press;

/// Recurrence detector settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecurrenceConfig {
    /// Whether the memory is kept at all.
    pub enabled: bool,
    /// Presses remembered per user (the ring's length).
    pub memory_presses: usize,
    /// Slots of the anchor index (a power of two).
    pub index_slots: usize,
    /// Flights hashed into an anchor key.
    pub hash_flights: usize,
    /// Quantum flights are rounded to before hashing, ms.
    pub quantum_ms: u16,
    /// Flights longer than this are pauses and break runs, ms.
    pub pause_ms: u16,
    /// Presses a recurring run needs.
    pub min_run: usize,
    /// Longest run verified (the error is averaged over it).
    pub max_run: usize,
    /// Largest difference of one flight or hold, ms.
    pub tolerance_ms: u16,
    /// Largest mean difference over the run, ms.
    pub mean_tolerance_ms: f64,
    /// Runs whose flights span less than this are regular, left to the timing rules, ms.
    pub min_range_ms: u16,
    /// A period counts while it recurred within this many presses.
    pub recent_presses: u32,
}

impl Default for RecurrenceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            memory_presses: 2048,
            index_slots: 1024,
            hash_flights: 6,
            quantum_ms: 20,
            pause_ms: 1500,
            min_run: 10,
            max_run: 24,
            tolerance_ms: 12,
            mean_tolerance_ms: 5.0,
            min_range_ms: 30,
            recent_presses: 100,
        }
    }
}

impl RecurrenceConfig {
    /// Checks the settings the memory's layout depends on.
    pub fn validate(&self) -> Result<(), String> {
        if !(64..=16_384).contains(&self.memory_presses) {
            return Err("recurrence.memory_presses must be between 64 and 16384".to_owned());
        }
        if !self.index_slots.is_power_of_two() || !(16..=65_536).contains(&self.index_slots) {
            return Err("recurrence.index_slots must be a power of two between 16 and 65536".to_owned());
        }
        if self.hash_flights < 2 || self.hash_flights > self.min_run || self.min_run > self.max_run {
            return Err("recurrence needs 2 <= hash_flights <= min_run <= max_run".to_owned());
        }
        if self.max_run >= self.memory_presses / 2 {
            return Err("recurrence.max_run must be under half of memory_presses".to_owned());
        }
        if self.quantum_ms == 0 || self.pause_ms == 0 || self.pause_ms >= CODE_BREAK {
            return Err("recurrence widths must be positive and pause_ms under 4095".to_owned());
        }
        Ok(())
    }
}

/// 12-bit codes: values are milliseconds, capped below these markers.
const CODE_BREAK: u16 = 0xFFF;
const CODE_UNKNOWN: u16 = 0xFFF;
const CODE_MAX: u16 = 0xFFE;
/// Periods tallied at once; the stalest is replaced.
const TALLIES: usize = 4;

/// What the memory has found, for the window being scored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReplayEvidence {
    /// Recurrences at the best period.
    pub recurrences: u16,
    /// That period, presses.
    pub period: u32,
    /// Mean difference of the recurring runs' flights and holds, ms.
    pub error_ms: f64,
}

/// Recurrences found at one period.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Tally {
    period: u32,
    recurrences: u16,
    /// Sum of the runs' mean errors, in hundredths of a ms (the mean of means is the error).
    error_centims: u32,
    /// Press number of the latest recurrence.
    last_at: u32,
}

/// A user's recurrence memory. Bounded: `3 * memory_presses + 2 * index_slots` bytes and a few
/// tallies, however long the user types; 3 bytes a press until the ring is full.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecurrenceMemory {
    /// Ring of presses, 3 bytes each: flight and hold as 12-bit milliseconds.
    #[serde(with = "serde_bytes")]
    ring: Vec<u8>,
    /// Anchor key slot -> low 16 bits of (press number + 1) of the latest press there; 0: empty.
    #[serde(with = "serde_bytes")]
    index: Vec<u8>,
    /// Presses fed so far; press `n` lives at ring slot `n % memory_presses`.
    fed: u32,
    /// Down time of the latest press, for the next flight.
    last_down_us: Option<i64>,
    tallies: Vec<Tally>,
}

impl RecurrenceMemory {
    /// Feeds one press whose hold is final (or will stay unknown).
    pub fn push(&mut self, cfg: &RecurrenceConfig, press: &Press) {
        if !cfg.enabled {
            return;
        }
        self.fit(cfg);
        let flight = self.last_down_us.map_or(CODE_BREAK, |prev| flight_code(press.down_us.saturating_sub(prev), cfg));
        let hold = press.hold().map_or(CODE_UNKNOWN, |h| ms(i64::from(h)).min(CODE_MAX));
        self.last_down_us = Some(press.down_us);
        let n = self.fed;
        self.write(cfg, n, flight, hold);
        self.fed = self.fed.wrapping_add(1);
        if let Some(key) = self.anchor_key(cfg, n) {
            let slot = (key >> 2) as usize & (cfg.index_slots - 1);
            let earlier = self.index_get(slot).and_then(|low| self.resolve(cfg, n, low));
            self.index_set(cfg, slot, n);
            if let Some(earlier) = earlier {
                self.check(cfg, n, earlier);
            }
        }
    }

    /// Forgets the gap before the next press (an idle close): the next flight is a break.
    pub fn break_run(&mut self) {
        self.last_down_us = None;
    }

    /// The best recent evidence at press number `fed`.
    pub fn evidence(&self, cfg: &RecurrenceConfig) -> ReplayEvidence {
        let recent = |t: &&Tally| self.fed.wrapping_sub(t.last_at) <= cfg.recent_presses;
        self.tallies
            .iter()
            .filter(recent)
            .max_by_key(|t| (t.recurrences, t.last_at))
            .map(|t| ReplayEvidence {
                recurrences: t.recurrences,
                period: t.period,
                error_ms: f64::from(t.error_centims) / 100.0 / f64::from(t.recurrences.max(1)),
            })
            .unwrap_or_default()
    }

    /// The flights (ms) before the latest `out.len()` presses, newest first, into `out`; false
    /// when fewer presses are remembered or a pause breaks them (the fleet fingerprint reads it).
    pub fn latest_flights(&self, cfg: &RecurrenceConfig, out: &mut [u16]) -> bool {
        let len = out.len();
        if !cfg.enabled || len == 0 || len > cfg.memory_presses || (self.fed as usize) < len {
            return false;
        }
        // One division for the run, then the slots backwards (this runs at every press).
        let mut at = self.fed.wrapping_sub(1) as usize % cfg.memory_presses;
        for slot in out.iter_mut() {
            let (flight, _) = self.read_slot(at);
            if flight == CODE_BREAK {
                return false;
            }
            *slot = flight;
            at = at.checked_sub(1).unwrap_or(cfg.memory_presses - 1);
        }
        true
    }

    /// Bytes the memory holds (what it adds to the user's state).
    pub fn bytes(&self) -> usize {
        self.ring.len() + self.index.len() + self.tallies.len() * std::mem::size_of::<Tally>()
    }

    /// Checks the memory against `cfg`'s layout; one whose presses do not fit it (kept under
    /// another layout) starts afresh. Ring and index grow as they are written (slots not yet
    /// written read as zeros), so a user of a few presses stores a few bytes, not the whole
    /// layout: a flood of one-press user ids costs the store little.
    fn fit(&mut self, cfg: &RecurrenceConfig) {
        let ring = self.ring.len();
        let ring_fits = ring % 3 == 0
            && (ring == cfg.memory_presses * 3 || (ring < cfg.memory_presses * 3 && ring / 3 == self.fed as usize));
        let index_fits = self.index.is_empty() || self.index.len() == cfg.index_slots * 2;
        if !ring_fits || !index_fits {
            *self = Self::default();
        }
    }

    fn write(&mut self, cfg: &RecurrenceConfig, n: u32, flight: u16, hold: u16) {
        let at = (n as usize % cfg.memory_presses) * 3;
        if self.ring.len() < at + 3 {
            self.ring.resize(at + 3, 0);
        }
        self.ring[at] = (flight >> 4) as u8;
        self.ring[at + 1] = ((flight & 0xF) << 4) as u8 | (hold >> 8) as u8;
        self.ring[at + 2] = (hold & 0xFF) as u8;
    }

    /// (flight, hold) codes of press number `n`, which must still be in the ring.
    fn read(&self, cfg: &RecurrenceConfig, n: u32) -> (u16, u16) {
        self.read_slot(n as usize % cfg.memory_presses)
    }

    /// (flight, hold) codes in ring slot `slot`.
    fn read_slot(&self, slot: usize) -> (u16, u16) {
        let at = slot * 3;
        let Some(&[a, b, c]) = self.ring.get(at..at + 3) else {
            return (0, 0); // not written yet
        };
        let (a, b, c) = (u16::from(a), u16::from(b), u16::from(c));
        ((a << 4) | (b >> 4), ((b & 0xF) << 8) | c)
    }

    /// The anchor key of the run of flights ending at press `n`, when that run is an anchor.
    fn anchor_key(&self, cfg: &RecurrenceConfig, n: u32) -> Option<u32> {
        let len = cfg.hash_flights as u32;
        if self.fed < len {
            return None;
        }
        // FNV-1a over the quantised flights: cheap, and spreads the low bits the anchor test reads.
        let mut h: u32 = 0x811c_9dc5;
        for back in 0..len {
            let (flight, _) = self.read(cfg, n - back);
            if flight == CODE_BREAK {
                return None;
            }
            let q = (flight + cfg.quantum_ms / 2) / cfg.quantum_ms;
            h = (h ^ u32::from(q)).wrapping_mul(0x0100_0193);
        }
        (h & 3 == 0).then_some(h)
    }

    fn index_get(&self, slot: usize) -> Option<u16> {
        let &[lo, hi] = self.index.get(slot * 2..slot * 2 + 2)? else {
            return None;
        };
        let v = u16::from_le_bytes([lo, hi]);
        (v != 0).then_some(v)
    }

    fn index_set(&mut self, cfg: &RecurrenceConfig, slot: usize, n: u32) {
        if self.index.is_empty() {
            self.index = vec![0; cfg.index_slots * 2];
        }
        let v = (n.wrapping_add(1) as u16).max(1);
        self.index[slot * 2..slot * 2 + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// The press number an index entry's low 16 bits stand for, if it is still in the ring with
    /// room for a whole run behind it.
    fn resolve(&self, cfg: &RecurrenceConfig, n: u32, low: u16) -> Option<u32> {
        let earlier = u32::from(low.wrapping_sub(1));
        let distance = (n & 0xFFFF).wrapping_sub(earlier) & 0xFFFF;
        let reach = (cfg.memory_presses - cfg.max_run) as u32;
        (distance >= 1 && distance <= reach).then(|| n - distance)
    }

    /// Verifies a hit between presses `n` and `earlier` and tallies a recurrence.
    fn check(&mut self, cfg: &RecurrenceConfig, n: u32, earlier: u32) {
        let (mut run, mut error_sum, mut compared) = (0usize, 0u32, 0u32);
        let (mut lo, mut hi) = (u16::MAX, 0u16);
        while run < cfg.max_run && run as u32 <= earlier {
            let (f1, h1) = self.read(cfg, n - run as u32);
            let (f0, h0) = self.read(cfg, earlier - run as u32);
            if f1 == CODE_BREAK || f0 == CODE_BREAK {
                break;
            }
            let holds_known = h1 != CODE_UNKNOWN && h0 != CODE_UNKNOWN;
            let df = f1.abs_diff(f0);
            let dh = if holds_known { h1.abs_diff(h0) } else { 0 };
            if df > cfg.tolerance_ms || dh > cfg.tolerance_ms {
                break;
            }
            error_sum += u32::from(df) + u32::from(dh);
            compared += if holds_known { 2 } else { 1 };
            lo = lo.min(f1);
            hi = hi.max(f1);
            run += 1;
        }
        if run < cfg.min_run || hi - lo < cfg.min_range_ms {
            return;
        }
        let mean = f64::from(error_sum) / f64::from(compared.max(1));
        if mean > cfg.mean_tolerance_ms {
            return;
        }
        self.tally(n - earlier, (mean * 100.0).round() as u32);
    }

    fn tally(&mut self, period: u32, error_centims: u32) {
        let at = self.fed.wrapping_sub(1);
        if let Some(t) = self.tallies.iter_mut().find(|t| t.period == period) {
            t.recurrences = t.recurrences.saturating_add(1);
            t.error_centims = t.error_centims.saturating_add(error_centims);
            t.last_at = at;
            return;
        }
        let fresh = Tally { period, recurrences: 1, error_centims, last_at: at };
        if self.tallies.len() < TALLIES {
            self.tallies.push(fresh);
        } else if let Some(stalest) = self.tallies.iter_mut().min_by_key(|t| t.last_at) {
            *stalest = fresh;
        }
    }
}

/// Microseconds as whole milliseconds (rounded), saturating at `u16::MAX`.
fn ms(us: i64) -> u16 {
    u16::try_from(us.max(0).saturating_add(500) / 1000).unwrap_or(u16::MAX)
}

/// A flight's code: its milliseconds, or a break when it is a pause.
fn flight_code(us: i64, cfg: &RecurrenceConfig) -> u16 {
    let ms = ms(us);
    if ms > cfg.pause_ms {
        CODE_BREAK
    } else {
        ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The `replay` rule's default threshold.
    const REPLAY: u16 = 3;

    /// A human-like recording: flights 80-400 ms, holds 60-140 ms.
    fn recording(len: usize, rng: &mut impl Rng) -> Vec<(i64, i64)> {
        (0..len).map(|_| (rng.random_range(80_000..400_000), rng.random_range(60_000..140_000))).collect()
    }

    /// Feeds (flight, hold) pairs as presses; returns the memory.
    fn feed(cfg: &RecurrenceConfig, timings: impl IntoIterator<Item = (i64, i64)>) -> RecurrenceMemory {
        let mut mem = RecurrenceMemory::default();
        let mut t = 0;
        for (flight, hold) in timings {
            t += flight;
            let press = Press { down_us: t, key: 30, hold_us: hold as i32, repeats: 0 };
            mem.push(cfg, &press);
        }
        mem
    }

    fn jittered(loop_: &[(i64, i64)], times: usize, jitter_us: i64, rng: &mut impl Rng) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        for _ in 0..times {
            for &(f, h) in loop_ {
                out.push((f + rng.random_range(-jitter_us..=jitter_us), h + rng.random_range(-jitter_us..=jitter_us)));
            }
        }
        out
    }

    #[test]
    fn a_long_loop_with_ms_jitter_recurs_at_its_period() {
        let cfg = RecurrenceConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for period in [100usize, 400, 1000] {
            let rec = recording(period, &mut rng);
            let mem = feed(&cfg, jittered(&rec, 2, 4_000, &mut rng));
            let ev = mem.evidence(&cfg);
            assert!(ev.recurrences >= REPLAY, "period {period}: {ev:?}");
            assert_eq!(ev.period, period as u32);
            assert!(ev.error_ms > 0.5 && ev.error_ms < 5.0, "{ev:?}");
        }
    }

    #[test]
    fn independent_timing_never_recurs() {
        let cfg = RecurrenceConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mem = feed(&cfg, recording(5_000, &mut rng));
        assert_eq!(mem.evidence(&cfg), ReplayEvidence::default());
        assert!(mem.tallies.is_empty());
    }

    #[test]
    fn a_word_retyped_with_human_variation_does_not_recur() {
        // The same 12-press word typed 200 times with human timing noise (sd 15 ms) around one
        // rhythm, separated by pauses of other text.
        let cfg = RecurrenceConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let word = recording(12, &mut rng);
        let normal = rand_distr::Normal::new(0.0, 15_000.0).unwrap();
        let mut timings = Vec::new();
        for _ in 0..200 {
            for &(f, h) in &word {
                use rand_distr::Distribution;
                timings.push((f + normal.sample(&mut rng) as i64, h + normal.sample(&mut rng) as i64 / 2));
            }
            timings.extend(recording(rng.random_range(5..30), &mut rng));
        }
        let mem = feed(&cfg, timings);
        assert!(mem.evidence(&cfg).recurrences < REPLAY, "{:?}", mem.evidence(&cfg));
    }

    #[test]
    fn regular_runs_are_left_to_the_timing_rules() {
        let cfg = RecurrenceConfig::default();
        let mem = feed(&cfg, std::iter::repeat_n((100_000, 30_000), 3_000));
        assert_eq!(mem.evidence(&cfg), ReplayEvidence::default());
    }

    #[test]
    fn pauses_break_runs_and_evidence_fades() {
        let cfg = RecurrenceConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let rec = recording(200, &mut rng);
        let mut timings = jittered(&rec, 2, 2_000, &mut rng);
        let mem = feed(&cfg, timings.clone());
        assert!(mem.evidence(&cfg).recurrences >= REPLAY);
        // Human typing after the loop: the period stops being recent.
        timings.extend(recording(cfg.recent_presses as usize + 1, &mut rng));
        let mem = feed(&cfg, timings);
        assert_eq!(mem.evidence(&cfg).recurrences, 0);
        // A loop whose every 5th flight is a pause never has a run long enough.
        let paused: Vec<(i64, i64)> =
            rec.iter().enumerate().map(|(i, &(f, h))| if i % 5 == 0 { (2_000_000, h) } else { (f, h) }).collect();
        let mem = feed(&cfg, jittered(&paused, 3, 1_000, &mut rng));
        assert_eq!(mem.evidence(&cfg).recurrences, 0);
    }

    #[test]
    fn memory_is_bounded_and_survives_wraparound() {
        let cfg = RecurrenceConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut timings = recording(70_000, &mut rng);
        let rec = recording(300, &mut rng);
        timings.extend(jittered(&rec, 2, 3_000, &mut rng));
        let mem = feed(&cfg, timings);
        assert_eq!(mem.bytes(), 3 * cfg.memory_presses + 2 * cfg.index_slots + mem.tallies.len() * 16);
        assert_eq!(mem.evidence(&cfg).period, 300);
    }

    #[test]
    fn a_user_of_a_few_presses_stores_a_few_bytes() {
        let cfg = RecurrenceConfig::default();
        let mut mem = RecurrenceMemory::default();
        mem.push(&cfg, &Press { down_us: 0, key: 1, hold_us: 50_000, repeats: 0 });
        assert_eq!(mem.bytes(), 3);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mem = feed(&cfg, recording(100, &mut rng));
        assert!(mem.bytes() <= 3 * 100 + 2 * cfg.index_slots, "{} bytes", mem.bytes());
    }

    #[test]
    fn codes_round_trip_through_the_ring() {
        let cfg = RecurrenceConfig { memory_presses: 64, ..RecurrenceConfig::default() };
        let mut mem = RecurrenceMemory::default();
        mem.fit(&cfg);
        for (n, (f, h)) in [(0u32, (0u16, 0u16)), (1, (4095, 4095)), (63, (1234, 87)), (64, (17, 4094))] {
            mem.write(&cfg, n, f, h);
            assert_eq!(mem.read(&cfg, n), (f, h));
        }
        assert_eq!(flight_code(1_499_600, &cfg), 1500);
        assert_eq!(flight_code(1_500_600, &cfg), CODE_BREAK);
        assert_eq!(flight_code(i64::MAX, &cfg), CODE_BREAK);
        assert_eq!(ms(9_000_000).min(CODE_MAX), CODE_MAX);
        assert_eq!(ms(-5), 0);
    }

    #[test]
    fn another_layout_starts_afresh() {
        let cfg = RecurrenceConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let mut mem = feed(&cfg, jittered(&recording(100, &mut rng), 3, 1_000, &mut rng));
        assert!(mem.evidence(&cfg).recurrences > 0);
        // More presses than the smaller ring holds: they do not fit it.
        let small = RecurrenceConfig { memory_presses: 64, ..cfg };
        mem.push(&small, &Press { down_us: 0, key: 1, hold_us: 50_000, repeats: 0 });
        assert_eq!(mem.bytes(), 3, "one press, in a fresh ring");
        assert_eq!(mem.evidence(&small).recurrences, 0);
    }

    proptest::proptest! {
        /// Whatever presses come (zero, huge or backward flights, unknown holds), the memory
        /// stays within its bytes and its evidence within what it was fed.
        #[test]
        fn any_presses_keep_the_memory_bounded_and_its_evidence_sane(
            presses in proptest::collection::vec((-10_000i64..3_000_000, -1i32..2_000_000), 0..2500),
            small in proptest::prelude::any::<bool>(),
        ) {
            let cfg = if small {
                RecurrenceConfig { memory_presses: 64, index_slots: 16, ..RecurrenceConfig::default() }
            } else {
                RecurrenceConfig::default()
            };
            proptest::prop_assert!(cfg.validate().is_ok());
            let mut mem = RecurrenceMemory::default();
            let mut t = 0i64;
            for &(flight, hold) in &presses {
                t = t.saturating_add(flight);
                mem.push(&cfg, &Press { down_us: t, key: 1, hold_us: hold, repeats: 0 });
            }
            proptest::prop_assert!(mem.bytes() <= 3 * cfg.memory_presses + 2 * cfg.index_slots + TALLIES * 16);
            let ev = mem.evidence(&cfg);
            proptest::prop_assert!(usize::from(ev.recurrences) <= presses.len());
            proptest::prop_assert!(ev.period as usize <= cfg.memory_presses);
            proptest::prop_assert!(ev.error_ms <= cfg.mean_tolerance_ms);
        }
    }
}
