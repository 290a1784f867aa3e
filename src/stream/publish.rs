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

/// How a publisher cuts a user's events into records. An agent sends a record every ~100 ms
/// or every `max_events`, whichever comes first: for human typing that is 1-2 events a record
/// (1.36 on average over the first 1.7 M rows of the Aalto data's subset A, cut into fixed 100 ms
/// slices per user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordShape {
    /// Most events per record.
    pub max_events: usize,
    /// A record spans at most this much event time (microseconds) from its first event; 0: cut
    /// by count alone.
    pub span_us: i64,
}

impl RecordShape {
    /// As the agent sends: every 100 ms of typing or `max_events` events.
    pub const fn agent(max_events: usize) -> Self {
        Self { max_events, span_us: 100_000 }
    }

    /// By count alone: `max_events` a record, however long they took to type.
    pub const fn by_count(max_events: usize) -> Self {
        Self { max_events, span_us: 0 }
    }
}

/// Publishes every record of a keylog: each user's events in file order, cut into records as
/// `shape` says. Returns once every record is acknowledged.
pub fn publish_keylog(
    producer: &BaseProducer,
    topic: &str,
    input: impl Iterator<Item = Result<KeylogRecord, KeylogError>>,
    shape: RecordShape,
) -> Result<PublishSummary, PublishError> {
    let mut summary = PublishSummary::default();
    let users = cut_records(input, shape, |user, session, events| {
        for payload in batches_for_user(user, session, events, shape.max_events) {
            send(producer, topic, user.as_bytes(), &payload)?;
            summary.records += 1;
        }
        summary.events += events.len() as u64;
        Ok(())
    })?;
    summary.users = users;
    producer.flush(Duration::from_secs(60))?;
    match producer.in_flight_count() {
        0 => Ok(summary),
        n => Err(PublishError::Undelivered(n)),
    }
}

/// Cuts each user's events (in input order) into records as `shape` says and hands each record
/// to `emit` as `(user, session, events)`; users' last partial records come at the end, by user.
/// Returns the number of distinct users.
fn cut_records(
    input: impl Iterator<Item = Result<KeylogRecord, KeylogError>>,
    shape: RecordShape,
    mut emit: impl FnMut(&str, &str, &[KeyEvent]) -> Result<(), PublishError>,
) -> Result<u64, PublishError> {
    let max_events = shape.max_events.max(1);
    let mut pending: HashMap<String, (String, Vec<KeyEvent>)> = HashMap::new();
    // Sends a user's pending events; the session carries over to the next record.
    let mut cut = |user: &str, entry: &mut (String, Vec<KeyEvent>)| {
        let (session, events) = std::mem::take(entry);
        emit(user, &session, &events)?;
        entry.0 = session;
        Ok::<(), PublishError>(())
    };
    for record in input {
        let record = record?;
        let entry = pending.entry(record.user_id.clone()).or_insert_with(|| (record.session_id.clone(), Vec::new()));
        let span_ends = shape.span_us > 0
            && entry.1.first().is_some_and(|first| record.event.time_us - first.time_us >= shape.span_us);
        if span_ends {
            cut(&record.user_id, entry)?;
        }
        entry.1.push(record.event);
        if entry.1.len() >= max_events {
            cut(&record.user_id, entry)?;
        }
    }
    let users = pending.len() as u64;
    let mut rest: Vec<_> = pending.into_iter().filter(|(_, (_, e))| !e.is_empty()).collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    for (user, mut entry) in rest {
        cut(&user, &mut entry)?;
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::KeyAction;

    fn record(user: &str, time_ms: i64) -> Result<KeylogRecord, KeylogError> {
        Ok(KeylogRecord {
            user_id: user.to_owned(),
            session_id: "s".to_owned(),
            event: KeyEvent::new(time_ms * 1_000, 30, KeyAction::Down),
        })
    }

    /// `(user, event times in ms)` of every record cut from `input`.
    fn cuts(input: Vec<Result<KeylogRecord, KeylogError>>, shape: RecordShape) -> Vec<(String, Vec<i64>)> {
        let mut out = Vec::new();
        let users = cut_records(input.into_iter(), shape, |user, _, events| {
            out.push((user.to_owned(), events.iter().map(|e| e.time_us / 1_000).collect()));
            Ok(())
        })
        .unwrap();
        assert_eq!(users as usize, out.iter().map(|(u, _)| u).collect::<std::collections::BTreeSet<_>>().len());
        out
    }

    #[test]
    fn agent_records_span_at_most_100_ms_of_one_users_typing() {
        let input = vec![
            record("a", 0),
            record("b", 10),
            record("a", 60),
            record("a", 100),
            record("a", 150),
            record("b", 400),
        ];
        assert_eq!(
            cuts(input, RecordShape::agent(50)),
            vec![
                ("a".to_owned(), vec![0, 60]),
                ("b".to_owned(), vec![10]),
                ("a".to_owned(), vec![100, 150]),
                ("b".to_owned(), vec![400]),
            ]
        );
    }

    #[test]
    fn a_record_is_cut_at_max_events_whatever_its_span() {
        let input = (0..5).map(|t| record("a", t)).collect();
        assert_eq!(
            cuts(input, RecordShape::agent(2)),
            vec![("a".to_owned(), vec![0, 1]), ("a".to_owned(), vec![2, 3]), ("a".to_owned(), vec![4])]
        );
        let input = (0..5).map(|t| record("a", t * 1_000)).collect();
        assert_eq!(
            cuts(input, RecordShape::by_count(3)),
            vec![("a".to_owned(), vec![0, 1_000, 2_000]), ("a".to_owned(), vec![3_000, 4_000])]
        );
    }

    #[test]
    fn a_bad_input_row_stops_the_cut_with_its_error() {
        let input = vec![record("a", 0), Err(KeylogError::Header)];
        let err = cut_records(input.into_iter(), RecordShape::agent(50), |_, _, _| Ok(())).unwrap_err();
        assert!(matches!(err, PublishError::Input(_)), "{err}");
    }
}
