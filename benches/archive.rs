//! The archive file format's cost per record, against bare gzip of the same bytes as a baseline.
//!
//! `cargo bench --bench archive`. One day's partition file is mostly compression, which the
//! format cannot avoid; these benchmarks show what it adds on top (framing, proto encoding, the
//! running sha256 and the file summary on write; varint framing and decoding on read). Every
//! benchmark handles the same records in one process, so the ratios hold on a noisy machine:
//! - `write/gzip_only`: the already-framed bytes through the same gzip encoder and level;
//! - `write/archive_writer`: `ArchiveWriter::append` per record, then `finish`;
//! - `read/gunzip_only`: the finished file decompressed to a buffer;
//! - `read/archive_reader`: `ArchiveReader` decoding every record of the finished file.
//!
//! The records are what agents send for typing-like traffic of 64 users: cut every 100 ms or 50
//! events (`RecordShape::agent`), encoded as `KeyEventBatch`es keyed by user.

use std::hint::black_box;
use std::io::{Read, Write};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flate2::read::GzDecoder;
use flate2::{Compression, GzBuilder};
use metronome::archive::format::{ArchiveReader, ArchiveWriter};
use metronome_core::cutting::{RecordCutter, RecordShape};
use metronome_core::event::{KeyAction, KeyEvent};
use metronome_core::proto::ArchivedRecord;
use metronome_core::wire::encode_batch;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};

const USERS: usize = 64;
const PRESSES_PER_USER: usize = 1_500;
/// The archive's default gzip level (`archive.compression_level`).
const LEVEL: u32 = 6;

/// Typing-like events of every user, merged in time order: log-normal intervals (median 180 ms)
/// and holds (median 90 ms).
fn events() -> Vec<(usize, KeyEvent)> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let interval = LogNormal::new((180_000f64).ln(), 0.5).unwrap();
    let hold = LogNormal::new((90_000f64).ln(), 0.3).unwrap();
    let mut all = Vec::with_capacity(USERS * PRESSES_PER_USER * 2);
    for user in 0..USERS {
        let mut t = rng.random_range(0..1_000_000i64);
        for _ in 0..PRESSES_PER_USER {
            t += interval.sample(&mut rng) as i64 + 20_000;
            let key = rng.random_range(16..50);
            all.push((user, KeyEvent::new(t, key, KeyAction::Down)));
            all.push((user, KeyEvent::new(t + hold.sample(&mut rng) as i64, key, KeyAction::Up)));
        }
    }
    all.sort_by_key(|(_, e)| e.time_us);
    all
}

/// The records a day's partition would hold, at consecutive offsets.
fn records() -> Vec<ArchivedRecord> {
    let mut cutter = RecordCutter::new(RecordShape::agent(50));
    let mut cut = Vec::new();
    for (user, event) in events() {
        cut.extend(cutter.push(&format!("user-{user:02}"), &format!("session-{user:02}"), event));
    }
    cut.extend(cutter.finish());
    cut.into_iter()
        .enumerate()
        .map(|(i, r)| ArchivedRecord {
            offset: i as i64,
            timestamp_ms: r.events[0].time_us.div_euclid(1000),
            key: Some(r.user_id.clone().into_bytes()),
            value: Some(encode_batch(&r.user_id, "device-1", &r.session_id, &r.events, Some(i as u64 * 2))),
        })
        .collect()
}

fn gzip_only(framed: &[u8]) -> Vec<u8> {
    let mut gz = GzBuilder::new().mtime(0).write(Vec::new(), Compression::new(LEVEL));
    gz.write_all(framed).unwrap();
    gz.finish().unwrap()
}

fn archive_writer(records: &[ArchivedRecord]) -> Vec<u8> {
    let mut writer = ArchiveWriter::new(Vec::new(), LEVEL);
    for r in records {
        writer.append(r).unwrap();
    }
    writer.finish().unwrap().0
}

fn gunzip_only(file: &[u8]) -> usize {
    let mut out = Vec::new();
    GzDecoder::new(file).read_to_end(&mut out).unwrap();
    out.len()
}

fn archive_reader(file: &[u8]) -> i64 {
    ArchiveReader::new(file).map(|r| r.unwrap().offset).sum()
}

fn bench(c: &mut Criterion) {
    let records = records();
    let framed: Vec<u8> = records.iter().flat_map(|r| r.encode_length_delimited_to_vec()).collect();
    let file = archive_writer(&records);
    // Same input bytes, same encoder: the two files are identical, so the reads compare fairly.
    assert_eq!(file, gzip_only(&framed));
    assert_eq!(ArchiveReader::new(file.as_slice()).count(), records.len());
    eprintln!(
        "archive bench: {} records, {} bytes framed, {} bytes gzip level {LEVEL}",
        records.len(),
        framed.len(),
        file.len()
    );

    let mut group = c.benchmark_group("archive");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.sample_size(20);
    group.bench_function("write/gzip_only", |b| b.iter(|| black_box(gzip_only(black_box(&framed)))));
    group.bench_function("write/archive_writer", |b| b.iter(|| black_box(archive_writer(black_box(&records)))));
    group.bench_function("read/gunzip_only", |b| b.iter(|| black_box(gunzip_only(black_box(&file)))));
    group.bench_function("read/archive_reader", |b| b.iter(|| black_box(archive_reader(black_box(&file)))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
