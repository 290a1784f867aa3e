//! Publishing a keylog to the input topic as an agent would: `KeyEventBatch` records of one
//! user each, keyed by user id, in order, through an idempotent producer. Used by
//! `metronome publish`, the tests and the benchmarks.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::records::batches_for_user;
use crate::event::KeyEvent;
use crate::keylog::{KeylogError, KeylogRecord};

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
    let mut c = ClientConfig::new();
    for (k, v) in properties {
        c.set(k, v);
    }
    c.set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()
}

/// Produces one record to `topic`, waiting for room in the queue when it is full.
pub fn send(producer: &BaseProducer, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), KafkaError> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
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

/// Publishes every record of a keylog: each user's events in file order, `batch_events` per
/// record. Returns once every record is acknowledged.
pub fn publish_keylog(
    producer: &BaseProducer,
    topic: &str,
    input: impl Iterator<Item = Result<KeylogRecord, KeylogError>>,
    batch_events: usize,
) -> Result<PublishSummary, PublishError> {
    let batch_events = batch_events.max(1);
    let mut pending: HashMap<String, (String, Vec<KeyEvent>)> = HashMap::new();
    let mut summary = PublishSummary::default();
    let emit = |user: &str, session: &str, events: &[KeyEvent], summary: &mut PublishSummary| {
        for payload in batches_for_user(user, session, events, batch_events) {
            send(producer, topic, user.as_bytes(), &payload)?;
            summary.records += 1;
        }
        summary.events += events.len() as u64;
        Ok::<(), KafkaError>(())
    };
    for record in input {
        let record = record?;
        let entry = pending.entry(record.user_id.clone()).or_insert_with(|| {
            summary.users += 1;
            (record.session_id.clone(), Vec::new())
        });
        entry.1.push(record.event);
        if entry.1.len() >= batch_events {
            let (session, events) = std::mem::take(entry);
            emit(&record.user_id, &session, &events, &mut summary)?;
            entry.0 = session;
        }
    }
    let mut rest: Vec<_> = pending.into_iter().filter(|(_, (_, e))| !e.is_empty()).collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    for (user, (session, events)) in rest {
        emit(&user, &session, &events, &mut summary)?;
    }
    producer.flush(Duration::from_secs(60))?;
    match producer.in_flight_count() {
        0 => Ok(summary),
        n => Err(PublishError::Undelivered(n)),
    }
}
