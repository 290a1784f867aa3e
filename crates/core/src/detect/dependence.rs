//! Timing that ignores the keys: the mark of a sampler.
//!
//! A person's holds depend on the key (a little finger holds longer than an index finger), their
//! flights on the key they lead to and on the pair of keys (a roll across hands is faster than
//! one finger's jump), and their speed drifts or alternates (consecutive flights and holds
//! correlate). A sampler that draws each flight and hold independently from a human's own
//! recordings keeps every marginal distribution, so no window looks wrong; what it cannot keep
//! is any of those dependences. This detector tests exactly that null hypothesis, "timing
//! independent of keys and of the previous press":
//!
//! - hold by key: one-way analysis of variance of log holds across groups of one key each;
//! - flight by key, flight by key pair: the same for log flights, grouped by the key they lead
//!   to and by (previous key, key);
//! - drift: the lag-1 correlations of consecutive log flights and of consecutive log holds, and
//!   of each flight and hold with the recent pace (moving averages of the ones before);
//! - a hold against the flight that follows it (rollover: a key held long is overtaken).
//!
//! Under the null each statistic converts to a z-score that is standard normal whatever the
//! human's distributions were (Paulson's approximation of F, Fisher's of the correlation), so
//! their sum of squares is chi-squared with eight degrees of freedom. People show dependence far
//! above chance; the `keyless_timing` rule fires when the sum stays below
//! `rules.key_dependence_chi2` (26, the 99.9 % point: a sampler stays below it with
//! probability 0.999 in theory, 0.9965 measured on samplers of real people). The
//! recall on samplers is a property of the test, not of tuning; only the false-alarm rate on
//! people is measured (`examples/dependence.rs`, `docs/detection.md`).
//!
//! Two horizons, both of which must look keyless: the last two blocks (`2 * block_presses`
//! presses, a verdict at every block's end) and the whole session so far (halved past
//! `session_presses`, so it keeps weighing the recent past). A person's session-wide evidence
//! grows with every block they type, so a long session does not give a weak stretch more
//! chances to raise an alert; the price is that a sampler switched on after a long stretch of
//! the account's own typing is found only once it dominates the session.
//!
//! A group is one key's values while that key stays among the `open_groups` most recently
//! pressed (pairs likewise); the least recently pressed closes when another opens, and every
//! group closes at its block's end. Closed groups add to the block's sums. So a group never
//! mixes keys (a hash into a few buckets did, which dilutes a person's key effects), and the
//! test holds whatever ids the stream gives keys: the agent's key labels live a few presses
//! (`agent::labels`), and each label is then a group of its own. Under the null, which groups
//! form depends on the ids alone, never on the timing, so each z stays standard normal.
//!
//! State: three blocks of sums per user (previous, filling, session) and the open groups (at
//! most `open_groups` key ids and pair ids with their sums, as the window keeps its presses'
//! ids), whatever the user types.

use serde::{Deserialize, Serialize};

use super::window::Press;

/// Key-dependence test settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependenceConfig {
    /// Whether the test runs at all.
    pub enabled: bool,
    /// Presses per block; each verdict covers the last two blocks, and one comes per block.
    pub block_presses: u32,
    /// Keys (and key pairs) whose values are gathered at once; the least recently pressed
    /// closes its group when another opens (2 to 1024).
    pub open_groups: u16,
    /// The session-wide sums are halved when they pass this many presses.
    pub session_presses: u32,
    /// Flights longer than this are pauses: no flight, and the drift chain breaks, ms.
    pub pause_ms: u32,
}

impl Default for DependenceConfig {
    fn default() -> Self {
        Self { enabled: true, block_presses: 300, open_groups: 64, session_presses: 12_000, pause_ms: 1500 }
    }
}

impl DependenceConfig {
    /// Checks the settings the state's layout depends on.
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=1024).contains(&self.open_groups) {
            return Err("dependence.open_groups must be between 2 and 1024".to_owned());
        }
        if !(50..=10_000).contains(&self.block_presses) {
            return Err("dependence.block_presses must be between 50 and 10000".to_owned());
        }
        if self.session_presses < 2 * self.block_presses {
            return Err("dependence.session_presses must be at least two blocks".to_owned());
        }
        if self.pause_ms == 0 {
            return Err("dependence.pause_ms must be positive".to_owned());
        }
        Ok(())
    }
}

/// Logs are taken of milliseconds centred here, so that f32 sums keep their precision.
const LN_CENTRE: f32 = 4.6; // ln(100 ms)

fn log_ms(us: i64) -> f32 {
    ((us as f32 / 1000.0).clamp(1.0, 5_000.0)).ln() - LN_CENTRE
}

/// Count, sum and sum of squares of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Moments {
    n: u32,
    sum: f32,
    sumsq: f32,
}

impl Moments {
    fn add(&mut self, x: f32) {
        self.n += 1;
        self.sum += x;
        self.sumsq += x * x;
    }
}

/// The sums a one-way analysis of variance needs, over groups that have closed (each with two
/// values or more; a lone value says nothing about its group and is dropped). Values are log
/// milliseconds, centred.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupSums {
    /// Groups closed.
    pub groups: u32,
    /// Values in them.
    pub values: u32,
    /// Their sum.
    pub sum: f32,
    /// Sum over groups of (group sum)^2 / (group count): the between-groups part.
    pub sum_sq_over_n: f32,
    /// Sum of squared deviations from each group's own mean.
    pub within: f32,
}

impl GroupSums {
    fn close(&mut self, g: Moments) {
        if g.n < 2 {
            return;
        }
        let n = g.n as f32;
        self.groups += 1;
        self.values += g.n;
        self.sum += g.sum;
        self.sum_sq_over_n += g.sum * g.sum / n;
        self.within += (g.sumsq - g.sum * g.sum / n).max(0.0);
    }

    fn merge(self, o: GroupSums) -> GroupSums {
        GroupSums {
            groups: self.groups + o.groups,
            values: self.values + o.values,
            sum: self.sum + o.sum,
            sum_sq_over_n: self.sum_sq_over_n + o.sum_sq_over_n,
            within: self.within + o.within,
        }
    }

    /// Half the weight: half the groups and values, the same means and spreads.
    fn halve(&mut self) {
        let r = if self.values == 0 { 0.0 } else { (self.values / 2) as f32 / self.values as f32 };
        *self = GroupSums {
            groups: self.groups / 2,
            values: self.values / 2,
            sum: self.sum * r,
            sum_sq_over_n: self.sum_sq_over_n * r,
            within: self.within * r,
        };
    }

    /// The F test of "the groups' means do not differ" as a z-score (Paulson's normal
    /// approximation of F): standard normal under that hypothesis.
    fn z(&self) -> f64 {
        let (k, n) = (self.groups, self.values);
        if k < 2 || n <= k + 1 {
            return 0.0;
        }
        let within = f64::from(self.within);
        if within <= 1e-9 * f64::from(n) {
            // No spread inside the groups (constant holds): nothing to compare, and the timing
            // rules judge constancy.
            return 0.0;
        }
        let sum = f64::from(self.sum);
        let between = (f64::from(self.sum_sq_over_n) - sum * sum / f64::from(n)).max(0.0);
        let (d1, d2) = (f64::from(k - 1), f64::from(n - k));
        paulson_z((between / d1) / (within / d2), d1, d2)
    }
}

impl GroupSums {
    /// Whether these could be sums of real values: finite, no negative spread, every group of
    /// two values or more, and the between part no smaller than the grand mean's (Cauchy-Schwarz).
    fn is_plausible(&self) -> bool {
        let finite = self.sum.is_finite() && self.sum_sq_over_n.is_finite() && self.within.is_finite();
        let between_ok =
            self.values == 0 || self.sum_sq_over_n >= self.sum * self.sum / self.values as f32 * (1.0 - 1e-4) - 1e-3;
        finite && self.within >= 0.0 && self.values >= 2 * self.groups && between_ok
    }
}

/// The key-grouped sums of a stretch of presses: what the three key statistics read. The agent,
/// which knows the keys its short-lived labels hide, sends them per block of its own presses
/// (`agent::key_sums`); the processor then reads them instead of grouping the labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct KeySums {
    /// Presses the sums cover.
    pub presses: u32,
    /// Log holds by key.
    pub hold_by_key: GroupSums,
    /// Log flights by the key they lead to.
    pub flight_by_key: GroupSums,
    /// Log flights by key pair.
    pub flight_by_pair: GroupSums,
}

impl KeySums {
    /// The sums of both stretches.
    pub fn merge(self, o: KeySums) -> KeySums {
        KeySums {
            presses: self.presses + o.presses,
            hold_by_key: self.hold_by_key.merge(o.hold_by_key),
            flight_by_key: self.flight_by_key.merge(o.flight_by_key),
            flight_by_pair: self.flight_by_pair.merge(o.flight_by_pair),
        }
    }

    fn halve(&mut self) {
        self.presses /= 2;
        for g in [&mut self.hold_by_key, &mut self.flight_by_key, &mut self.flight_by_pair] {
            g.halve();
        }
    }

    /// Whether another party's sums could be real: each statistic plausible, and no more values
    /// than presses (one hold and one flight each).
    pub fn is_plausible(&self) -> bool {
        let groups = [self.hold_by_key, self.flight_by_key, self.flight_by_pair];
        self.presses > 0 && groups.iter().all(|g| g.is_plausible() && g.values <= self.presses)
    }
}

/// The key sums an agent reported: its last two blocks (the recent horizon) and its session
/// (halved as the test's own session sums are).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Reports {
    last: KeySums,
    before: KeySums,
    session: KeySums,
    /// Sums came since the last verdict.
    fresh: bool,
}

impl Reports {
    /// Whether a verdict can read them now: two blocks of the agent's in, one of them new.
    fn ready(&self) -> bool {
        self.fresh && self.before.presses > 0
    }
}

/// One key's holds and the flights into it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct KeyMoments {
    hold: Moments,
    flight: Moments,
}

impl KeyMoments {
    fn close_into(self, keys: &mut KeySums) {
        keys.hold_by_key.close(self.hold);
        keys.flight_by_key.close(self.flight);
    }
}

/// The groups still gathering values: the most recently pressed keys (by the id the stream
/// gives them) and key pairs, least recently pressed first. A group holds one key's values for
/// as long as it stays among the open ones, so it never mixes keys, whatever the ids are (an
/// agent's key labels change every few presses: each label is a group of its own).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct OpenGroups {
    /// (key, its holds and the flights into it).
    keys: Vec<(u32, KeyMoments)>,
    /// (pair id, the flights of the pair).
    pairs: Vec<(u32, Moments)>,
}

impl OpenGroups {
    /// The open group of `id` in `groups`, opened (closing the least recently used into
    /// `close` when `cap` are open) if there is none; it becomes the most recently used.
    fn touch<T: Copy>(groups: &mut Vec<(u32, T)>, id: u32, empty: T, cap: usize, mut close: impl FnMut(T)) -> &mut T {
        match groups.iter().position(|g| g.0 == id) {
            Some(i) => {
                let g = groups.remove(i);
                groups.push(g);
            }
            None => {
                if groups.len() >= cap {
                    close(groups.remove(0).1);
                }
                groups.push((id, empty));
            }
        }
        &mut groups.last_mut().expect("just pushed").1
    }

    /// Closes every open group into `keys`.
    fn close_all(&mut self, keys: &mut KeySums) {
        for (_, key) in self.keys.drain(..) {
            key.close_into(keys);
        }
        for (_, flight) in self.pairs.drain(..) {
            keys.flight_by_pair.close(flight);
        }
    }

    /// Adds a press of `key` (its log hold, and the log flight into it from `prev`'s press),
    /// closing groups into `keys` as others open.
    fn add(&mut self, keys: &mut KeySums, cap: usize, key: u32, hold: Option<f32>, flight: Option<(u32, f32)>) {
        let group = Self::touch(&mut self.keys, key, KeyMoments::default(), cap, |k| k.close_into(keys));
        if let Some(h) = hold {
            group.hold.add(h);
        }
        if let Some((prev, f)) = flight {
            group.flight.add(f);
            let pair = Self::touch(&mut self.pairs, pair_id(prev, key), Moments::default(), cap, |g| {
                keys.flight_by_pair.close(g)
            });
            pair.add(f);
        }
    }
}

/// Sums for the correlation of consecutive values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Lagged {
    n: u32,
    sa: f32,
    sb: f32,
    saa: f32,
    sbb: f32,
    sab: f32,
}

impl Lagged {
    fn add(&mut self, a: f32, b: f32) {
        self.n += 1;
        self.sa += a;
        self.sb += b;
        self.saa += a * a;
        self.sbb += b * b;
        self.sab += a * b;
    }

    fn merge(self, o: Lagged) -> Lagged {
        Lagged {
            n: self.n + o.n,
            sa: self.sa + o.sa,
            sb: self.sb + o.sb,
            saa: self.saa + o.saa,
            sbb: self.sbb + o.sbb,
            sab: self.sab + o.sab,
        }
    }

    fn halve(&mut self) {
        let keep = self.n / 2;
        let r = if self.n == 0 { 0.0 } else { keep as f32 / self.n as f32 };
        *self = Lagged {
            n: keep,
            sa: self.sa * r,
            sb: self.sb * r,
            saa: self.saa * r,
            sbb: self.sbb * r,
            sab: self.sab * r,
        };
    }

    /// Fisher's z of the correlation: standard normal under independence.
    fn z(&self) -> f64 {
        if self.n < 10 {
            return 0.0;
        }
        let n = f64::from(self.n);
        let (sa, sb) = (f64::from(self.sa), f64::from(self.sb));
        let cov = n * f64::from(self.sab) - sa * sb;
        let va = n * f64::from(self.saa) - sa * sa;
        let vb = n * f64::from(self.sbb) - sb * sb;
        if va <= 1e-9 * n * n || vb <= 1e-9 * n * n {
            return 0.0;
        }
        let r = (cov / (va * vb).sqrt()).clamp(-0.999_999, 0.999_999);
        r.atanh() * (n - 3.0).sqrt()
    }
}

/// The sums of one block of presses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Block {
    presses: u32,
    /// The key statistics' sums from this processor's own grouping of the ids.
    keys: KeySums,
    flight_drift: Lagged,
    hold_drift: Lagged,
    flight_pace: Lagged,
    hold_pace: Lagged,
    hold_flight: Lagged,
}

impl Block {
    fn merge(&self, o: &Block) -> Block {
        Block {
            presses: self.presses + o.presses,
            keys: self.keys.merge(o.keys),
            flight_drift: self.flight_drift.merge(o.flight_drift),
            hold_drift: self.hold_drift.merge(o.hold_drift),
            flight_pace: self.flight_pace.merge(o.flight_pace),
            hold_pace: self.hold_pace.merge(o.hold_pace),
            hold_flight: self.hold_flight.merge(o.hold_flight),
        }
    }

    fn halve(&mut self) {
        self.presses /= 2;
        self.keys.halve();
        for l in [
            &mut self.flight_drift,
            &mut self.hold_drift,
            &mut self.flight_pace,
            &mut self.hold_pace,
            &mut self.hold_flight,
        ] {
            l.halve();
        }
    }
}

/// The z-scores of one verdict: each standard normal if timing ignores the keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DependenceZ {
    /// Holds by key group.
    pub hold_by_key: f32,
    /// Flights by the group of the key they lead to.
    pub flight_by_key: f32,
    /// Flights by key-pair group.
    pub flight_by_pair: f32,
    /// Consecutive flights.
    pub flight_drift: f32,
    /// Consecutive holds.
    pub hold_drift: f32,
    /// Flights against the recent pace (a moving average of the flights before).
    pub flight_pace: f32,
    /// Holds against the recent holds.
    pub hold_pace: f32,
    /// A hold against the flight that follows it.
    pub hold_flight: f32,
}

impl DependenceZ {
    /// The key statistics read from `keys`.
    fn set_keys(&mut self, keys: &KeySums) {
        self.hold_by_key = keys.hold_by_key.z() as f32;
        self.flight_by_key = keys.flight_by_key.z() as f32;
        self.flight_by_pair = keys.flight_by_pair.z() as f32;
    }

    /// The sum of squares: chi-squared with [`STATISTICS`] degrees of freedom under the null, large for
    /// a person.
    pub fn chi2(&self) -> f32 {
        self.all().iter().map(|z| z * z).sum()
    }

    /// The statistics, in field order.
    pub fn all(&self) -> [f32; STATISTICS] {
        [
            self.hold_by_key,
            self.flight_by_key,
            self.flight_by_pair,
            self.flight_drift,
            self.hold_drift,
            self.flight_pace,
            self.hold_pace,
            self.hold_flight,
        ]
    }
}

/// What the test last concluded, for the windows scored until the next one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DependenceVerdict {
    /// Presses the recent verdict covered (two blocks).
    pub presses: u32,
    /// The recent statistics.
    pub z: DependenceZ,
    /// Presses the session-wide sums weigh.
    pub session_presses: u32,
    /// The session-wide statistics.
    pub session_z: DependenceZ,
}

impl DependenceVerdict {
    /// The weaker evidence of the two horizons: keyless only if both are.
    pub fn chi2(&self) -> f32 {
        self.z.chi2().max(self.session_z.chi2())
    }
}

/// One user's key-dependence test.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyDependence {
    previous: Block,
    current: Block,
    session: Block,
    /// The current block's groups still gathering values.
    open: OpenGroups,
    /// The key sums the agent reported, if it sends them.
    reports: Reports,
    /// The last two blocks, ended before the agent's sums for the latest of them came: the
    /// verdict over them waits for those sums.
    awaiting_report: Option<Block>,
    /// The last press: its key, down time and log hold (none after a pause or an auto-repeat).
    last: Option<(u32, i64, Option<f32>)>,
    /// The log flight into the last press, if it had one.
    last_flight: Option<f32>,
    /// Moving averages of log flights and log holds: the recent pace.
    pace: Option<(f32, f32)>,
    verdict: Option<DependenceVerdict>,
}

/// How many statistics a verdict has: the degrees of freedom of its chi-squared.
pub const STATISTICS: usize = 8;
/// The weight of the newest value in the recent pace (about the last ten presses).
const PACE_WEIGHT: f32 = 0.2;

/// A press's log hold, if it has one: an auto-repeated press says nothing about the hand's
/// timing.
fn hold_of(press: &Press) -> Option<f32> {
    press.hold().filter(|_| press.repeats == 0).map(|h| log_ms(i64::from(h)))
}

/// The log flight into `press` from a press that went down at `last_down`; none after a pause.
fn flight_of(cfg: &DependenceConfig, last_down: Option<i64>, press: &Press) -> Option<f32> {
    last_down
        .map(|down| press.down_us.saturating_sub(down))
        .filter(|gap| *gap > 0 && *gap <= i64::from(cfg.pause_ms) * 1000)
        .map(log_ms)
}

/// The key statistics' sums alone, per block of presses: what the agent computes over the real
/// keys and sends beside its short-lived labels ([`KeyDependence::report`] reads them).
#[derive(Debug, Clone, Default)]
pub struct KeyGrouping {
    open: OpenGroups,
    keys: KeySums,
    /// The last press's key and down time.
    last: Option<(u32, i64)>,
}

impl KeyGrouping {
    /// Feeds one settled press; at the end of each block of `cfg.block_presses`, that block's
    /// sums.
    pub fn push(&mut self, cfg: &DependenceConfig, press: &Press) -> Option<KeySums> {
        let flight = flight_of(cfg, self.last.map(|(_, down)| down), press);
        let from = self.last.map(|(key, _)| key);
        self.open.add(&mut self.keys, usize::from(cfg.open_groups), press.key, hold_of(press), from.zip(flight));
        self.last = Some((press.key, press.down_us));
        self.keys.presses += 1;
        if self.keys.presses < cfg.block_presses {
            return None;
        }
        self.open.close_all(&mut self.keys);
        Some(std::mem::take(&mut self.keys))
    }

    /// Forgets the last press (a pause the agent saw: the next flight is none).
    pub fn break_chain(&mut self) {
        self.last = None;
    }
}

/// An id for the pair (previous key, key): a mix of both, so pairs of ids collide no more
/// often than chance over 32 bits.
fn pair_id(prev: u32, key: u32) -> u32 {
    (prev.wrapping_mul(0x85EB_CA6B) ^ key.rotate_left(16) ^ 0x27D4_EB2F).wrapping_mul(0x9E37_79B1)
}

impl KeyDependence {
    /// The latest verdict, if a block has completed since enough presses were seen.
    pub fn verdict(&self) -> Option<DependenceVerdict> {
        self.verdict
    }

    /// Adds the key-grouped sums the agent reported for its latest block of presses (it knows
    /// the keys behind short-lived labels): from then on the key statistics read the agent's
    /// last two blocks and its session instead of this test's own grouping of the ids. A
    /// block's sums come once its presses have settled, a little after this test's block
    /// ends, so the latest verdict's key statistics are brought up to date with them. False,
    /// and nothing kept, for sums no real typing gives.
    pub fn report(&mut self, cfg: &DependenceConfig, sums: &KeySums) -> bool {
        if !sums.is_plausible() {
            return false;
        }
        let r = &mut self.reports;
        r.before = std::mem::replace(&mut r.last, *sums);
        r.session = r.session.merge(*sums);
        if r.session.presses > cfg.session_presses {
            r.session.halve();
        }
        r.fresh = true;
        match self.awaiting_report.take() {
            Some(recent) if self.reports.ready() => self.conclude(&recent),
            waiting => {
                self.awaiting_report = waiting;
                if let Some(v) = &mut self.verdict {
                    v.z.set_keys(&self.reports.last.merge(self.reports.before));
                    v.session_z.set_keys(&self.reports.session);
                }
            }
        }
        true
    }

    /// The verdict over `recent` (the last two blocks) and the session.
    fn conclude(&mut self, recent: &Block) {
        self.reports.fresh = false;
        let reports = &self.reports;
        self.verdict = Some(DependenceVerdict {
            presses: recent.presses,
            z: evaluate(recent, &reports.last.merge(reports.before)),
            session_presses: self.session.presses,
            session_z: evaluate(&self.session, &reports.session),
        });
    }

    /// Feeds one settled press.
    pub fn push(&mut self, cfg: &DependenceConfig, press: &Press) {
        let block = &mut self.current;
        let hold = hold_of(press);
        let flight = flight_of(cfg, self.last.map(|(_, down, _)| down), press);
        let (flight_pace, hold_pace) = self.pace.unwrap_or((0.0, 0.0));
        let paced = self.pace.is_some();
        let from = self.last.map(|(prev_key, _, _)| prev_key);
        self.open.add(&mut block.keys, usize::from(cfg.open_groups), press.key, hold, from.zip(flight));
        if let Some(h) = hold {
            if let Some((_, _, Some(prev_h))) = self.last.filter(|_| flight.is_some()) {
                block.hold_drift.add(prev_h, h);
            }
            if paced {
                block.hold_pace.add(hold_pace, h);
            }
        }
        if let (Some(f), Some((_, _, prev_hold))) = (flight, self.last) {
            if let Some(prev_f) = self.last_flight {
                block.flight_drift.add(prev_f, f);
            }
            if let Some(prev_h) = prev_hold {
                block.hold_flight.add(prev_h, f);
            }
            if paced {
                block.flight_pace.add(flight_pace, f);
            }
        }
        // The pace moves after it was compared with: a value is never compared with itself.
        let ema = |avg: f32, x: Option<f32>| x.map_or(avg, |x| if paced { avg + PACE_WEIGHT * (x - avg) } else { x });
        if paced || (flight.is_some() && hold.is_some()) {
            self.pace = Some((ema(flight_pace, flight), ema(hold_pace, hold)));
        }
        block.presses += 1;
        self.last = Some((press.key, press.down_us, hold));
        self.last_flight = flight;
        if self.current.presses >= cfg.block_presses {
            self.open.close_all(&mut self.current.keys);
            let done = std::mem::take(&mut self.current);
            self.session = self.session.merge(&done);
            if self.session.presses > cfg.session_presses {
                self.session.halve();
            }
            if self.previous.presses > 0 {
                let recent = self.previous.merge(&done);
                // With an agent's sums, the verdict waits for new ones covering two of its
                // blocks (a block's sums come once its presses settle, before or after this
                // test's block ends); a whole block without any goes ahead on what there is.
                let reporting = self.reports.last.presses > 0;
                match self.awaiting_report.take() {
                    _ if !reporting || self.reports.ready() => self.conclude(&recent),
                    Some(stale) => {
                        self.conclude(&stale);
                        self.awaiting_report = Some(recent);
                    }
                    None => self.awaiting_report = Some(recent),
                }
            }
            self.previous = done;
        }
    }

    /// Forgets the chains (an idle close: the next press starts afresh), keeping the sums.
    pub fn break_chain(&mut self) {
        self.last = None;
        self.last_flight = None;
    }
}

/// A [`KeyDependence`] as stored up to state format 6, when a key's group was a hash of its id
/// into one of a few buckets. It upgrades keeping its sums and verdict: each bucket becomes one
/// closed group (a mix of keys, but formed by ids alone, so the test stays exact).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct KeyDependenceV6 {
    previous: BlockV6,
    current: BlockV6,
    session: BlockV6,
    last: Option<(u32, i64, Option<f32>)>,
    last_flight: Option<f32>,
    pace: Option<(f32, f32)>,
    verdict: Option<DependenceVerdict>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct BlockV6 {
    presses: u32,
    hold_by_key: Vec<Moments>,
    flight_by_key: Vec<Moments>,
    flight_by_pair: Vec<Moments>,
    flight_drift: Lagged,
    hold_drift: Lagged,
    flight_pace: Lagged,
    hold_pace: Lagged,
    hold_flight: Lagged,
}

impl From<BlockV6> for Block {
    fn from(b: BlockV6) -> Self {
        let pooled = |groups: Vec<Moments>| {
            let mut p = GroupSums::default();
            groups.into_iter().for_each(|g| p.close(g));
            p
        };
        let keys = KeySums {
            presses: 0,
            hold_by_key: pooled(b.hold_by_key),
            flight_by_key: pooled(b.flight_by_key),
            flight_by_pair: pooled(b.flight_by_pair),
        };
        Block {
            presses: b.presses,
            keys,

            flight_drift: b.flight_drift,
            hold_drift: b.hold_drift,
            flight_pace: b.flight_pace,
            hold_pace: b.hold_pace,
            hold_flight: b.hold_flight,
        }
    }
}

impl From<KeyDependenceV6> for KeyDependence {
    fn from(v6: KeyDependenceV6) -> Self {
        KeyDependence {
            previous: v6.previous.into(),
            current: v6.current.into(),
            session: v6.session.into(),
            open: OpenGroups::default(),
            reports: Reports::default(),
            awaiting_report: None,
            last: v6.last,
            last_flight: v6.last_flight,
            pace: v6.pace,
            verdict: v6.verdict,
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
impl KeyDependence {
    /// This state as format 6 stored it, without its key groups (tests of the upgrade).
    pub fn to_v6(&self) -> KeyDependenceV6 {
        let block = |b: &Block| BlockV6 {
            presses: b.presses,
            flight_drift: b.flight_drift,
            hold_drift: b.hold_drift,
            flight_pace: b.flight_pace,
            hold_pace: b.hold_pace,
            hold_flight: b.hold_flight,
            ..BlockV6::default()
        };
        KeyDependenceV6 {
            previous: block(&self.previous),
            current: block(&self.current),
            session: block(&self.session),
            last: self.last,
            last_flight: self.last_flight,
            pace: self.pace,
            verdict: self.verdict,
        }
    }

    /// This state without its key groups: what [`Self::to_v6`] upgrades back to.
    pub fn without_key_groups(&self) -> KeyDependence {
        let block = |b: &Block| Block { keys: KeySums::default(), ..b.clone() };
        KeyDependence {
            previous: block(&self.previous),
            current: block(&self.current),
            session: block(&self.session),
            open: OpenGroups::default(),
            ..self.clone()
        }
    }
}

/// The verdict's statistics over `b`, the key ones from `reported` when the agent sent some.
fn evaluate(b: &Block, reported: &KeySums) -> DependenceZ {
    let keys = if reported.presses > 0 { reported } else { &b.keys };
    let mut z = DependenceZ {
        hold_by_key: 0.0,
        flight_by_key: 0.0,
        flight_by_pair: 0.0,
        flight_drift: b.flight_drift.z() as f32,
        hold_drift: b.hold_drift.z() as f32,
        flight_pace: b.flight_pace.z() as f32,
        hold_pace: b.hold_pace.z() as f32,
        hold_flight: b.hold_flight.z() as f32,
    };
    z.set_keys(keys);
    z
}

/// Paulson's approximation: z for an F(d1, d2) value.
fn paulson_z(f: f64, d1: f64, d2: f64) -> f64 {
    let (a, b) = (2.0 / (9.0 * d1), 2.0 / (9.0 * d2));
    let c = f.cbrt();
    ((1.0 - b) * c - (1.0 - a)) / (a + c * c * b).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn press(down_us: i64, key: u32, hold_us: i32) -> Press {
        Press { down_us, key, hold_us, repeats: 0 }
    }

    /// Presses whose holds and flights are drawn i.i.d. from skewed, bimodal distributions.
    fn sampler(rng: &mut impl Rng, n: usize) -> Vec<Press> {
        let mut t = 0i64;
        (0..n)
            .map(|_| {
                let key = rng.random_range(16..50);
                let hold = if rng.random_bool(0.3) {
                    rng.random_range(40_000..60_000)
                } else {
                    rng.random_range(80_000..200_000)
                };
                t += if rng.random_bool(0.1) {
                    rng.random_range(400_000..1_200_000)
                } else {
                    rng.random_range(60_000..250_000)
                };
                press(t, key, hold)
            })
            .collect()
    }

    fn verdict_of(presses: &[Press]) -> DependenceVerdict {
        let cfg = DependenceConfig::default();
        let mut d = KeyDependence::default();
        for p in presses {
            d.push(&cfg, p);
        }
        d.verdict().expect("two blocks seen")
    }

    #[test]
    fn a_sampler_scores_like_chance_on_every_statistic() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let runs = 400;
        let mut below = 0;
        let mut zs = Vec::new();
        for _ in 0..runs {
            let v = verdict_of(&sampler(&mut rng, 600));
            assert_eq!((v.presses, v.session_presses), (600, 600));
            assert_eq!(v.z, v.session_z, "one session, one window");
            zs.push(v.z.hold_by_key);
            below += usize::from(v.chi2() < 26.0);
        }
        let mean = zs.iter().sum::<f32>() / runs as f32;
        let var = zs.iter().map(|z| (z - mean).powi(2)).sum::<f32>() / runs as f32;
        assert!(mean.abs() < 0.2 && (0.7..1.3).contains(&var), "hold-by-key z: mean {mean}, variance {var}");
        // Chi-squared with 8 df stays below 26 with probability 0.999.
        assert!(below >= runs * 99 / 100, "{below} of {runs}");
    }

    /// 600 presses of random keys from `keys`, each held for its own time plus noise twice as
    /// wide as the spread between keys.
    fn holds_by_key(rng: &mut impl Rng, keys: std::ops::Range<u32>) -> Vec<Press> {
        let mut t = 0;
        (0..600)
            .map(|_| {
                let key = rng.random_range(keys.clone());
                let hold = 80_000 + (key as i32 % 7) * 6_000 + rng.random_range(-40_000..40_000);
                t += rng.random_range(60_000..250_000);
                press(t, key, hold)
            })
            .collect()
    }

    #[test]
    fn holds_that_follow_the_key_are_found() {
        let presses = holds_by_key(&mut ChaCha8Rng::seed_from_u64(8), 16..50);
        let v = verdict_of(&presses);
        assert!(v.z.hold_by_key > 5.0, "{v:?}");
        assert!(v.z.flight_drift.abs() < 4.0, "{v:?}");
        assert!(v.chi2() > 25.0);
    }

    #[test]
    fn flights_that_follow_the_key_and_drifting_speed_are_found() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut t = 0;
        let presses: Vec<Press> = (0..600)
            .map(|i| {
                let key = rng.random_range(16..50u32);
                // Slow and fast stretches of 50 presses; some keys are reached later.
                let pace = if (i / 50) % 2 == 0 { 120_000 } else { 220_000 };
                t += pace + i64::from(key % 3) * 20_000 + rng.random_range(-40_000..40_000);
                press(t, key, 100_000 + rng.random_range(-20_000..20_000))
            })
            .collect();
        let v = verdict_of(&presses);
        assert!(v.z.flight_drift > 5.0 && v.z.flight_by_key > 3.0, "{v:?}");
    }

    #[test]
    fn no_verdict_before_two_blocks_and_one_per_block_after() {
        let cfg = DependenceConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let presses = sampler(&mut rng, 1200);
        let mut d = KeyDependence::default();
        let mut verdicts = 0;
        for (i, p) in presses.iter().enumerate() {
            let before = d.verdict();
            d.push(&cfg, p);
            if d.verdict() != before {
                verdicts += 1;
                assert_eq!((i + 1) % 300, 0, "verdicts come at block ends");
            }
            if i < 599 {
                assert!(d.verdict().is_none());
            }
        }
        assert_eq!(verdicts, 3);
        assert_eq!(d.verdict().map(|v| (v.presses, v.session_presses)), Some((600, 1200)));
    }

    #[test]
    fn a_persons_session_keeps_a_sampler_stretch_from_alerting_until_it_dominates() {
        let cfg = DependenceConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut d = KeyDependence::default();
        let mut t = 0;
        // 1,200 presses whose holds follow the key, then a sampler.
        for _ in 0..1200 {
            let key = rng.random_range(16..50u32);
            t += rng.random_range(60_000..250_000);
            d.push(&cfg, &press(t, key, 60_000 + (key as i32 % 5) * 15_000 + rng.random_range(-20_000..20_000)));
        }
        for p in sampler(&mut rng, 600) {
            d.push(&cfg, &press(t + p.down_us, p.key, p.hold_us));
        }
        let v = d.verdict().unwrap();
        assert!(v.z.chi2() < 26.0, "the recent window is the sampler's: {v:?}");
        assert!(v.session_z.chi2() > 26.0, "the session still shows the person: {v:?}");
    }

    #[test]
    fn constant_holds_and_pauses_give_no_false_evidence() {
        let mut t = 0;
        let presses: Vec<Press> = (0..600)
            .map(|i| {
                t += if i % 20 == 0 { 3_000_000 } else { 100_000 };
                press(t, 16 + i as u32 % 5, 30_000)
            })
            .collect();
        let v = verdict_of(&presses);
        assert_eq!(v.z.hold_by_key, 0.0);
        assert!(v.chi2().is_finite());
    }

    /// `presses` with each key's id renewed every `lifetime` presses, as the agent's key labels
    /// are (each key on its own phase).
    fn relabelled(presses: &[Press], lifetime: u32) -> Vec<Press> {
        presses
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let epoch = (i as u32 + p.key * 7) / lifetime;
                Press { key: p.key ^ (epoch.wrapping_mul(0x9E37_79B9) | 0x8000_0000), ..*p }
            })
            .collect()
    }

    #[test]
    fn keys_under_short_lived_labels_still_show_their_holds_and_samplers_still_look_like_chance() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        // Eight keys, so most recur within a label's life, as a person's common letters do.
        let person = holds_by_key(&mut rng, 16..24);
        let v = verdict_of(&relabelled(&person, 16));
        assert!(v.z.hold_by_key > 3.0, "each label is a group of one key: {v:?}");
        let (mut zs, runs) = (Vec::new(), 300);
        for _ in 0..runs {
            zs.push(verdict_of(&relabelled(&sampler(&mut rng, 600), 16)).z.hold_by_key);
        }
        let mean = zs.iter().sum::<f32>() / runs as f32;
        let var = zs.iter().map(|z| (z - mean).powi(2)).sum::<f32>() / runs as f32;
        assert!(mean.abs() < 0.2 && (0.7..1.3).contains(&var), "hold-by-key z: mean {mean}, variance {var}");
    }

    #[test]
    fn sums_reported_from_the_real_keys_stand_in_for_labels_that_hide_them() {
        let cfg = DependenceConfig::default();
        let person = holds_by_key(&mut ChaCha8Rng::seed_from_u64(14), 16..50);
        let raw = verdict_of(&person);
        let labelled = relabelled(&person, 16);
        let mut grouping = KeyGrouping::default();
        let mut d = KeyDependence::default();
        for (p, l) in person.iter().zip(&labelled) {
            d.push(&cfg, l);
            // A block's sums arrive once its presses are in (in the stream, a little later).
            if let Some(sums) = grouping.push(&cfg, p) {
                assert!(d.report(&cfg, &sums));
            }
        }
        let v = d.verdict().unwrap();
        assert!(raw.z.hold_by_key > 5.0, "{raw:?}");
        assert!(verdict_of(&labelled).z.hold_by_key < 3.0, "labels alone hide 34 keys' holds");
        assert_eq!(v.z.hold_by_key, raw.z.hold_by_key, "the reported sums are the keys' own");
        assert_eq!(v.z.flight_drift, raw.z.flight_drift, "the rest is the processor's, as before");
    }

    #[test]
    fn sums_no_typing_gives_are_refused() {
        let mut grouping = KeyGrouping::default();
        let cfg = DependenceConfig::default();
        let sums =
            sampler(&mut ChaCha8Rng::seed_from_u64(15), 300).iter().find_map(|p| grouping.push(&cfg, p)).unwrap();
        assert!(sums.is_plausible());
        let mut bad = [sums; 4];
        bad[0].hold_by_key.within = -1.0;
        bad[1].flight_by_key.sum = f32::NAN;
        bad[2].flight_by_pair.values = 10_000;
        bad[3].hold_by_key.groups = sums.hold_by_key.values;
        let mut d = KeyDependence::default();
        for b in &bad {
            assert!(!d.report(&cfg, b), "{b:?}");
        }
        assert_eq!(d.reports, Reports::default());
        assert!(d.report(&cfg, &sums));
    }

    #[test]
    fn a_group_holds_one_key_and_the_least_recently_pressed_closes_first() {
        let mut groups: Vec<(u32, Moments)> = Vec::new();
        let mut closed = Vec::new();
        for (id, x) in [(1, 1.0), (2, 2.0), (1, 3.0), (3, 4.0), (1, 5.0)] {
            OpenGroups::touch(&mut groups, id, Moments::default(), 2, |g| closed.push(g)).add(x);
        }
        // 3 opened with 1 and 2 open: 2 (pressed least recently) closed, alone.
        assert_eq!(closed, [Moments { n: 1, sum: 2.0, sumsq: 4.0 }]);
        assert_eq!(groups.iter().map(|g| (g.0, g.1.n)).collect::<Vec<_>>(), [(3, 1), (1, 3)]);
        let mut pooled = GroupSums::default();
        closed.into_iter().for_each(|g| pooled.close(g));
        assert_eq!(pooled, GroupSums::default(), "a lone value says nothing about its group");
    }

    #[test]
    fn a_format_6_state_upgrades_with_its_buckets_as_groups() {
        let mut old = KeyDependenceV6::default();
        old.previous.presses = 300;
        old.previous.hold_by_key =
            vec![Moments { n: 3, sum: 3.0, sumsq: 5.0 }, Moments { n: 2, sum: -2.0, sumsq: 2.0 }];
        old.previous.flight_drift.add(1.0, 2.0);
        let bytes = postcard::to_allocvec(&old).unwrap();
        let new = KeyDependence::from(postcard::from_bytes::<KeyDependenceV6>(&bytes).unwrap());
        assert_eq!(new.previous.presses, 300);
        assert_eq!((new.previous.keys.hold_by_key.groups, new.previous.keys.hold_by_key.values), (2, 5));
        assert_eq!(new.previous.flight_drift.n, 1);
    }

    #[test]
    fn the_session_sums_are_halved_so_state_stays_small_and_bounded() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let cfg = DependenceConfig::default();
        let mut d = KeyDependence::default();
        for p in sampler(&mut rng, 30_150) {
            d.push(&cfg, &p);
        }
        let v = d.verdict().unwrap();
        assert!(v.session_presses <= cfg.session_presses && v.session_presses > cfg.session_presses / 2, "{v:?}");
        let bytes = postcard::to_allocvec(&d).unwrap().len();
        assert!(bytes < 4_000, "{bytes} bytes");
    }
}
