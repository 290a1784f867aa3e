//! The LSTM scorer's cost: batched inference, the two state designs, and `metronome score` end
//! to end with and without the model.
//!
//! ```text
//! cargo bench --bench lstm
//! ```
//! - `lstm/window/{1,128}`: whole 50-step windows from a zero state (the shipped design), one
//!   `score` call per batch; throughput in windows. The model always runs chunks of
//!   `metronome_model::BATCH_WINDOWS` (128) windows, so `1` is a lone window padded to a full chunk (the
//!   worst case: an idle user closed alone) and `128` is one full chunk (a busy stream).
//! - `lstm/carried/64`: the same weights fed only the hop's 10 new steps from a carried hidden
//!   state (the alternative design); throughput in windows (each window = 10 events).
//! - `lstm/press/{1,64}`: the per-press model (`metronome_model::stream`) stepping 1 or 64 users by one
//!   press from their carried states; throughput in presses.
//! - `score/{timing,timing_lstm,timing_lstm_press}`: `score_records` over a 1,000,000-event keylog file (real
//!   human typing from ../shared/data, repeated as needed); throughput in events. The
//!   timing-only run is the baseline the model's cost is read against.
//!
//! `METRONOME_BENCH_MODEL=path/to/manifest.json` benchmarks another model (a smaller one, say)
//! instead of the shipped one.

use std::hint::black_box;
use std::io::{self, BufRead};
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use metronome::dataset::{self};
use metronome::score::{self, BadRows, OutputSelection};
use metronome_core::detect::sequence::STEP_WIDTH;
use metronome_core::detect::{Detector, DetectorConfig, SequenceScorer};
use metronome_core::keylog::KeylogReader;
use metronome_model::stream::StreamModel;
use metronome_model::{LstmModel, BATCH_WINDOWS};

const EVENTS: usize = 1_000_000;

fn shared_data(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data").join(name);
    assert!(path.is_file(), "{} missing: the benchmark replays real typing (see README, 'Data')", path.display());
    path
}

/// Real encoded windows: every window of the first users of subset A.
fn real_windows(count: usize) -> Vec<f32> {
    let reader = KeylogReader::open(&shared_data("aalto-a-train.csv.gz")).unwrap();
    let users = metronome_core::keylog::group_by_user(reader, |_| true, Some(60)).unwrap();
    let mut detector = Detector::new(DetectorConfig::default()).unwrap();
    let mut out = Vec::new();
    for (_, events) in users.iter().cycle() {
        for w in dataset::encoded_windows(&mut detector, events, 50) {
            out.extend_from_slice(&w.steps);
            if out.len() >= count * 50 * STEP_WIDTH {
                return out;
            }
        }
    }
    unreachable!("cycle never ends")
}

/// A 1,000,000-row keylog CSV of real typing (users repeated with new ids as needed).
fn million_event_file(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("million.csv");
    let mut out = io::BufWriter::new(std::fs::File::create(&path).unwrap());
    use std::io::Write;
    writeln!(out, "user_id,session_id,event_time_us,key_code,action").unwrap();
    let mut written = 0;
    for round in 0.. {
        let file = flate2::read::GzDecoder::new(std::fs::File::open(shared_data("aalto-a-train.csv.gz")).unwrap());
        for line in io::BufReader::new(file).lines().skip(1) {
            let line = line.unwrap();
            writeln!(out, "r{round}{line}").unwrap();
            written += 1;
            if written == EVENTS {
                return path;
            }
        }
    }
    unreachable!()
}

fn bench(c: &mut Criterion) {
    let mut model = match std::env::var_os("METRONOME_BENCH_MODEL") {
        Some(path) => LstmModel::load(std::path::Path::new(&path)).unwrap(),
        None => LstmModel::embedded().unwrap(),
    };
    eprintln!("benchmarking model {}", model.manifest().id());
    let windows = real_windows(BATCH_WINDOWS);
    let mut group = c.benchmark_group("lstm");
    for batch in [1, BATCH_WINDOWS] {
        let inputs = &windows[..batch * 50 * STEP_WIDTH];
        group.throughput(Throughput::Elements(batch as u64));
        let mut out = Vec::with_capacity(batch);
        group.bench_function(format!("window/{batch}"), |b| {
            b.iter(|| {
                out.clear();
                model.score(black_box(inputs), batch, &mut out).unwrap();
                black_box(out[0])
            })
        });
    }
    let hidden = model.manifest().input.hidden;
    let carried = model.carried(10, 64).unwrap();
    let hop_inputs = vec![0.1f32; 10 * 64 * STEP_WIDTH];
    let (mut h, mut c_state) = (vec![0.0f32; 64 * hidden], vec![0.0f32; 64 * hidden]);
    group.throughput(Throughput::Elements(64));
    group.bench_function("carried/64", |b| {
        b.iter(|| black_box(carried.advance(black_box(&hop_inputs), 64, &mut h, &mut c_state).unwrap()[0]))
    });
    // The per-press model: one press for each of 64 users (a full planned chunk), and for one
    // user alone (padded to the same chunk: the cost a lone user's press pays).
    let mut press = StreamModel::embedded().unwrap();
    let press_hidden = press.hidden();
    for users in [1usize, 64] {
        let steps = vec![0.1f32; users * STEP_WIDTH];
        let (mut h, mut c_state) = (vec![0.0f32; users * press_hidden], vec![0.0f32; users * press_hidden]);
        group.throughput(Throughput::Elements(users as u64));
        group.bench_function(format!("press/{users}"), |b| {
            b.iter(|| black_box(press.advance(black_box(&steps), &mut h, &mut c_state).unwrap()[0]))
        });
    }
    group.finish();

    let dir = tempfile::tempdir().unwrap();
    let file = million_event_file(dir.path());
    let mut group = c.benchmark_group("score");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    let mut with_press = model.clone().with_press_model(press.clone());
    for name in ["timing", "timing_lstm", "timing_lstm_press"] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut detector = Detector::new(DetectorConfig::default()).unwrap();
                let reader = KeylogReader::open(&file).unwrap();
                let m: Option<&mut dyn SequenceScorer> = match name {
                    "timing" => None,
                    "timing_lstm" => Some(&mut model),
                    _ => Some(&mut with_press),
                };
                let summary = score::score_records(
                    &mut detector,
                    m,
                    reader,
                    BadRows::Stop,
                    OutputSelection { windows: true },
                    &mut io::sink(),
                    |_| {},
                    |_| {},
                )
                .unwrap();
                black_box(summary.windows)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
