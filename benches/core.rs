//! The detection core's cost per key event, against the original system's rule as a baseline.
//!
//! `cargo bench --bench core`. Both benchmarks walk the same interleaved stream of 64 users
//! (typing-like humans and macro users, about 200k events) in one process, so their ratio holds
//! on a noisy shared machine even when absolute rates move:
//! - `original_rule`: per user, the last 50 key-down times; every 10 downs, intervals rounded to
//!   10 ms bins and the fullest bin's share (what the nightly batch computed).
//! - `detector`: the full per-event path of the stream: reordering, repeat inference, window,
//!   hold matching, and per scoring the robust histogram, all timing features, the rules and the
//!   alert policy, and per press the long-horizon recurrence memory (`detect::recurrence`).
//! - `detector_without_fleet`: the same without the fleet fingerprints (a hash of ten flights at
//!   every settled press, one in four sent on), so `detector / detector_without_fleet` is
//!   what fleet detection costs the processor per event.
//! - `detector_without_recurrence`: the same with the memory (and so the fingerprints) switched
//!   off, so that `detector_without_fleet / detector_without_recurrence` is what the replay
//!   detection costs per event.
//! - `detector_without_dependence`: the full detector without the key-dependence test (sums of
//!   log hold and flight into three key groups and two lag products per press, five statistics
//!   per 300-press block), so `detector / detector_without_dependence` is what sampler
//!   detection costs per event.

use std::collections::VecDeque;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use metronome_core::detect::histogram::naive_bin_share;
use metronome_core::detect::{Detector, DetectorConfig, ScoringBatch, UserState};
use metronome_core::event::{KeyAction, KeyEvent};
use metronome_core::macrogen::{self, MacroFamily, MacroSpec, RecordedPress};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};

const USERS: usize = 64;
const PRESSES_PER_USER: usize = 1_600;

/// Typing-like presses: log-normal intervals (median 180 ms) and holds (median 90 ms).
fn typing(rng: &mut ChaCha8Rng, presses: usize) -> Vec<RecordedPress> {
    let interval = LogNormal::new((180_000f64).ln(), 0.5).unwrap();
    let hold = LogNormal::new((90_000f64).ln(), 0.3).unwrap();
    let mut t = 0i64;
    (0..presses)
        .map(|_| {
            t += interval.sample(rng) as i64 + 20_000;
            RecordedPress { down_us: t, key: rng.random_range(16..50), hold_us: hold.sample(rng) as i64 }
        })
        .collect()
}

/// (user index, event) in time order across users.
fn stream() -> Vec<(usize, KeyEvent)> {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut all = Vec::new();
    for user in 0..USERS {
        let human = typing(&mut rng, PRESSES_PER_USER);
        let events: Vec<KeyEvent> = if user % 8 == 0 {
            let family = MacroFamily::ALL[(user / 8) % MacroFamily::ALL.len()];
            let spec = MacroSpec::random(family, &mut rng);
            macrogen::generate(&spec, &human, 0, PRESSES_PER_USER, &mut rng)
        } else {
            let mut e: Vec<KeyEvent> = human
                .iter()
                .flat_map(|p| {
                    [
                        KeyEvent::new(p.down_us, p.key, KeyAction::Down),
                        KeyEvent::new(p.down_us + p.hold_us, p.key, KeyAction::Up),
                    ]
                })
                .collect();
            e.sort_by_key(|e| e.time_us);
            e
        };
        all.extend(events.into_iter().map(|e| (user, e)));
    }
    all.sort_by_key(|(_, e)| e.time_us);
    all
}

fn original_rule(events: &[(usize, KeyEvent)]) -> f64 {
    let mut downs: Vec<VecDeque<i64>> = vec![VecDeque::with_capacity(50); USERS];
    let mut since = vec![0usize; USERS];
    let mut intervals = Vec::with_capacity(50);
    let mut total = 0.0;
    for &(user, e) in events {
        if e.action != KeyAction::Down {
            continue;
        }
        let d = &mut downs[user];
        if d.len() == 50 {
            d.pop_front();
        }
        d.push_back(e.time_us);
        since[user] += 1;
        if d.len() == 50 && since[user] >= 10 {
            since[user] = 0;
            intervals.clear();
            intervals.extend(d.iter().zip(d.iter().skip(1)).map(|(a, b)| b - a));
            total += naive_bin_share(&intervals, 10_000);
        }
    }
    total
}

fn detector(events: &[(usize, KeyEvent)], cfg: &DetectorConfig) -> usize {
    let mut detector = Detector::new(cfg.clone()).unwrap();
    let mut users: Vec<(String, UserState)> = (0..USERS).map(|u| (format!("user-{u}"), UserState::default())).collect();
    let mut batch = ScoringBatch::new(None);
    let mut out = Vec::new();
    let mut outputs = 0;
    for &(user, e) in events {
        detector.on_event(user, &mut users[user].1, e, &mut batch);
        if batch.windows() >= 256 {
            detector.finish(&mut batch, &mut users, None, &mut out).unwrap();
            outputs += out.len();
            out.clear();
        }
    }
    detector.finish(&mut batch, &mut users, None, &mut out).unwrap();
    outputs + out.len()
}

fn bench(c: &mut Criterion) {
    let events = stream();
    let mut group = c.benchmark_group("core");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.sample_size(20);
    group.bench_function("original_rule", |b| b.iter(|| black_box(original_rule(black_box(&events)))));
    let full = DetectorConfig::default();
    let mut without_fleet = DetectorConfig::default();
    without_fleet.fleet.enabled = false;
    let mut without = without_fleet.clone();
    without.recurrence.enabled = false;
    group.bench_function("detector", |b| b.iter(|| black_box(detector(black_box(&events), &full))));
    group.bench_function("detector_without_fleet", |b| {
        b.iter(|| black_box(detector(black_box(&events), &without_fleet)))
    });
    group.bench_function("detector_without_recurrence", |b| {
        b.iter(|| black_box(detector(black_box(&events), &without)))
    });
    let mut without_dependence = DetectorConfig::default();
    without_dependence.dependence.enabled = false;
    group.bench_function("detector_without_dependence", |b| {
        b.iter(|| black_box(detector(black_box(&events), &without_dependence)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
