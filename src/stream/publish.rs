//! Publishing a keylog to the input topic as an agent would: `KeyEventBatch` records of one
//! user each, keyed by user id, in order, through an idempotent producer. Used by
//! `metronome publish`, the tests and the benchmarks.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use metronome_io::kafka::ClientBuilder;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

pub use metronome_core::cutting::RecordShape;
use metronome_core::cutting::{CutRecord, RecordCutter};
use metronome_core::keylog::{KeylogError, KeylogRecord};
use metronome_core::wire::encode_batch;

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The keylog could not be read.
    #[error(transparent)]
    Input(#[from] KeylogError),
    /// The producer failed.
    #[error("kafka producer: {0}")]
    Kafka(#[from] KafkaError),
    /// Records were still undelivered when the flush timed out.
    #[error("{0} records were not delivered before the timeout")]
    Undelivered(i32),
}

/// Totals of a publish run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PublishSummary {
    /// Records produced.
    pub records: u64,
    /// Events in them.
    pub events: u64,
    /// Distinct users.
    pub users: u64,
}

/// An idempotent producer with the `[kafka]` `properties`.
pub fn producer(properties: &BTreeMap<String, String>) -> Result<BaseProducer, KafkaError> {
    ClientBuilder::new(properties)
        .idempotent()
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()
}

/// Produces one record to `topic`, waiting for room in the queue when it is full.
pub fn send(producer: &BaseProducer, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), KafkaError> {
    send_at(producer, topic, key, payload, None)
}

/// [`send`] with the record's timestamp (milliseconds) set, else the producer's clock.
pub fn send_at(
    producer: &BaseProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    timestamp_ms: Option<i64>,
) -> Result<(), KafkaError> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    if let Some(ms) = timestamp_ms {
        record = record.timestamp(ms);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Publishes every record of a keylog: each user's events in file order, cut into records as
/// `shape` says (users' last partial records at the end, by user). Returns once every record is acknowledged.
pub fn publish_keylog(
    producer: &BaseProducer,
    topic: &str,
    input: impl Iterator<Item = Result<KeylogRecord, KeylogError>>,
    shape: RecordShape,
    stamp: Timestamps,
) -> Result<PublishSummary, PublishError> {
    let mut summary = PublishSummary::default();
    let mut cutter = RecordCutter::new(shape);
    let mut numbering = Numbering::default();
    let mut send_cut = |records: Vec<CutRecord>| -> Result<(), PublishError> {
        for r in records {
            let timestamp_ms = match stamp {
                Timestamps::Now => None,
                Timestamps::EventTime => r.events.first().map(|e| e.time_us.div_euclid(1000)),
            };
            for payload in numbering.payloads(&r, shape.max_events) {
                send_at(producer, topic, r.user_id.as_bytes(), &payload, timestamp_ms)?;
                summary.records += 1;
            }
            summary.events += r.events.len() as u64;
        }
        Ok(())
    };
    for record in input {
        let record = record?;
        send_cut(cutter.push(&record.user_id, &record.session_id, record.event))?;
    }
    send_cut(cutter.finish())?;
    summary.users = cutter.users() as u64;
    producer.flush(Duration::from_secs(60))?;
    match producer.in_flight_count() {
        0 => Ok(summary),
        n => Err(PublishError::Undelivered(n)),
    }
}

/// Sequence numbers per user and session, from 1, as an agent numbers its events: a file or a
/// simulation published twice is counted once (the processor drops what a session delivered).
#[derive(Debug, Default)]
struct Numbering {
    next: HashMap<(String, String), u64>,
}

impl Numbering {
    /// `record` as encoded batches of at most `max_events`, numbered on from the last.
    fn payloads(&mut self, record: &CutRecord, max_events: usize) -> Vec<Vec<u8>> {
        let seq = self.next.entry((record.user_id.clone(), record.session_id.clone())).or_insert(1);
        record
            .events
            .chunks(max_events.max(1))
            .map(|chunk| {
                let payload = encode_batch(&record.user_id, "", &record.session_id, chunk, Some(*seq));
                *seq += chunk.len() as u64;
                payload
            })
            .collect()
    }
}

/// Which time a published record carries as its Kafka timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Timestamps {
    /// When it is sent (what a live agent's records carry).
    #[default]
    Now,
    /// Its first event's time: a replayed day lands on its own day for time-based readers
    /// (`metronome archive`). Beware a real broker's time-based retention with old recordings.
    EventTime,
}

/// How fast simulated traffic goes out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Every record as soon as it is cut.
    Unpaced,
    /// Event time runs this many times as fast as wall time: 1 is real time.
    Speed(f64),
}

impl Pace {
    /// The pace that sends `events` spanning `span_us` of event time at `rate` events a second.
    pub fn for_rate(rate: f64, events: usize, span_us: i64) -> Self {
        if rate <= 0.0 || events < 2 || span_us <= 0 {
            return Pace::Unpaced;
        }
        let natural = events as f64 / (span_us as f64 / 1e6);
        Pace::Speed(rate / natural)
    }
}

/// Publishes simulated users as their agents would: the users' events merged in time order, cut
/// into records per user (a quiet user's partial record leaves once its span has passed), sent
/// at `pace`. `progress` hears the events sent so far; `stop` ends the run early (what was cut
/// is still delivered).
pub fn publish_simulation(
    producer: &BaseProducer,
    topic: &str,
    users: &[crate::simulate::SimulatedUser],
    shape: RecordShape,
    pace: Pace,
    stop: &tokio_util::sync::CancellationToken,
    mut progress: impl FnMut(u64),
) -> Result<PublishSummary, PublishError> {
    use std::time::Instant;
    let mut summary = PublishSummary { users: users.len() as u64, ..PublishSummary::default() };
    let mut cutter = RecordCutter::new(shape);
    let mut numbering = Numbering::default();
    // A session of its own per run, as each agent start has: a simulation run again (new
    // times, the same users) is new typing, not a copy.
    let session = format!("sim-{}", uuid::Uuid::new_v4());
    let mut send_cut = |records: Vec<CutRecord>, summary: &mut PublishSummary| -> Result<(), PublishError> {
        for r in records {
            for payload in numbering.payloads(&r, r.events.len()) {
                send(producer, topic, r.user_id.as_bytes(), &payload)?;
            }
            summary.records += 1;
            summary.events += r.events.len() as u64;
        }
        Ok(())
    };
    let started = Instant::now();
    let first_us = users.iter().filter_map(|u| u.events.first()).map(|e| e.time_us).min().unwrap_or(0);
    for (u, event) in crate::simulate::merged(users) {
        if stop.is_cancelled() {
            break;
        }
        if let Pace::Speed(speed) = pace {
            let due = Duration::from_secs_f64((event.time_us - first_us).max(0) as f64 / 1e6 / speed);
            // Wait in short slices: quiet users' records leave on time meanwhile.
            while let Some(left) = due.checked_sub(started.elapsed()).filter(|l| !l.is_zero()) {
                if stop.is_cancelled() {
                    break;
                }
                let now_us = first_us + (started.elapsed().as_secs_f64() * speed * 1e6) as i64;
                send_cut(cutter.expire(now_us), &mut summary)?;
                producer.poll(Duration::ZERO);
                std::thread::sleep(left.min(Duration::from_millis(20))); // pacing, not synchronisation
            }
        }
        send_cut(cutter.push(&users[u].user_id, &session, event), &mut summary)?;
        progress(summary.events);
        producer.poll(Duration::ZERO);
    }
    send_cut(cutter.finish(), &mut summary)?;
    progress(summary.events);
    producer.flush(Duration::from_secs(60))?;
    match producer.in_flight_count() {
        0 => Ok(summary),
        n => Err(PublishError::Undelivered(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_sets_the_speed_of_event_time() {
        // 1,000 events over 100 s of typing is 10 events/s: 50 events/s is five times as fast.
        assert_eq!(Pace::for_rate(50.0, 1_000, 100_000_000), Pace::Speed(5.0));
        assert_eq!(Pace::for_rate(0.0, 1_000, 100_000_000), Pace::Unpaced);
        assert_eq!(Pace::for_rate(10.0, 1, 0), Pace::Unpaced);
    }
}
