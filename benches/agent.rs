//! The agent's cost per key event on a player's machine, against cutting and encoding alone.
//!
//! `cargo bench --bench agent`. Every benchmark walks the same ~20,000 events of the built-in
//! typing model in one process, so their ratios hold on a noisy machine:
//! - `cut_encode`: records cut every 100 ms or 50 events and encoded as `KeyEventBatch`, raw keys
//!   (the baseline: what any publisher does);
//! - `label_cut_encode`: the same with every key replaced by its short-lived label
//!   (`agent::labels`);
//! - `agent_path`: that, plus each record framed and written to the spool file and removed from
//!   it once "acknowledged" (the agent's whole per-event work short of the network).
//!
//! And per record of 50 events (group `signatures`): `encode` against `sign_encode` (the agent
//! signing with HMAC-SHA256, `metronome_core::signing`), `decode` against `decode_check` (the processor
//! decoding and validating a record, then also checking its signature).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use metronome::agent::labels::{KeyLabeler, SHORT_LIFETIME};
use metronome::agent::ship::frame;
use metronome::agent::spool::Spool;
use metronome_core::cutting::{CutRecord, RecordCutter, RecordShape};
use metronome_core::event::KeyEvent;
use metronome_core::humanmodel::Typist;
use metronome_core::signing::{DeviceKeys, SigningKey};
use metronome_core::wire::{
    batch_message, decode_record, decode_signed_record, encode_batch, InputRecord, RecordTime, Signatures,
};
use prost::Message;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn typing() -> Vec<KeyEvent> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    Typist::random(&mut rng).type_text(1_700_000_000_000_000, 10_000, &mut rng)
}

/// Cuts and encodes `events`, keys mapped by `key`; hands each encoded record to `out`.
fn cut_encode(events: &[KeyEvent], mut key: impl FnMut(&KeyEvent) -> u32, mut out: impl FnMut(Vec<u8>)) -> u64 {
    let mut cutter = RecordCutter::new(RecordShape::agent(50));
    let mut seq = 1u64;
    let mut encode = |records: Vec<CutRecord>| {
        for r in records {
            out(encode_batch("user-1", "kbd-1", "session-1", &r.events, Some(seq)));
            seq += r.events.len() as u64;
        }
    };
    for e in events {
        encode(cutter.push("user-1", "", KeyEvent { key: key(e), ..*e }));
    }
    encode(cutter.finish());
    seq
}

fn bench(c: &mut Criterion) {
    let events = typing();
    let mut labels = KeyLabeler::new_session(SHORT_LIFETIME);
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(&dir.path().join("spool"), 64 << 20).unwrap();
    let mut group = c.benchmark_group("agent");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.sample_size(20);
    group
        .bench_function("cut_encode", |b| b.iter(|| black_box(cut_encode(&events, |e| e.key, |r| drop(black_box(r))))));
    group.bench_function("label_cut_encode", |b| {
        b.iter(|| black_box(cut_encode(&events, |e| labels.label(e.key, e.action), |r| drop(black_box(r)))))
    });
    group.bench_function("agent_path", |b| {
        b.iter(|| {
            black_box(cut_encode(
                &events,
                |e| labels.label(e.key, e.action),
                |r| {
                    spool.push(&frame(b"user-1", &r)).unwrap();
                    spool.pop(1).unwrap();
                },
            ))
        })
    });
    group.finish();
}

fn signatures(c: &mut Criterion) {
    let events = typing();
    let chunks: Vec<&[KeyEvent]> = events.chunks(50).collect();
    let secret = [7u8; 32];
    let signer = SigningKey::new("user-1-kbd", &secret);
    let mut keys = DeviceKeys::default();
    keys.insert("user-1-kbd", "user-1", "kbd-1", &secret);
    let record = |payload: Vec<u8>| InputRecord {
        offset: 0,
        key: Some(b"user-1".to_vec()),
        payload: Some(payload),
        time: RecordTime::Unknown,
    };
    let signed: Vec<InputRecord> = chunks
        .iter()
        .map(|chunk| {
            let mut batch = batch_message("user-1", "kbd-1", "session-1", chunk, Some(1));
            signer.sign(&mut batch);
            record(batch.encode_to_vec())
        })
        .collect();
    let mut group = c.benchmark_group("signatures");
    group.throughput(Throughput::Elements(chunks.len() as u64));
    group.sample_size(20);
    group.bench_function("encode", |b| {
        b.iter(|| {
            for chunk in &chunks {
                black_box(batch_message("user-1", "kbd-1", "session-1", chunk, Some(1)).encode_to_vec());
            }
        })
    });
    group.bench_function("sign_encode", |b| {
        b.iter(|| {
            for chunk in &chunks {
                let mut batch = batch_message("user-1", "kbd-1", "session-1", chunk, Some(1));
                signer.sign(&mut batch);
                black_box(batch.encode_to_vec());
            }
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            for r in &signed {
                black_box(decode_record(r, 10_000).unwrap());
            }
        })
    });
    let required = Signatures { keys: Some(&keys), required: true };
    group.bench_function("decode_check", |b| {
        b.iter(|| {
            for r in &signed {
                black_box(decode_signed_record(r, 10_000, required).unwrap());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench, signatures);
criterion_main!(benches);
