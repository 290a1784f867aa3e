//! Moving records from the spool to the broker, in order, removing each from the spool only once
//! the broker has it.
//!
//! [`Shipper`] is the decision logic over two seams: the [`Spool`] (what waits) and a
//! [`RecordSink`] (the transport: [`KafkaSink`], an idempotent rdkafka producer, or an in-memory
//! twin in the tests). At most `max_in_flight` records are handed to the transport at once; the
//! rest wait on disk, so an outage costs disk, not memory. The producer never gives up on a
//! record by itself (`message.timeout.ms = 0`): while the broker is away it keeps what it was
//! handed and the spool keeps the rest; idempotence makes its retries land once and in order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use metronome_io::kafka::ClientBuilder;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use super::spool::{Spool, SpoolError};

/// What became of a record handed to the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The broker acknowledged it.
    Delivered,
    /// Not written, and worth sending again (the topic did not exist yet, the send was purged).
    Retry,
    /// The broker refused it for good (too large, not authorised...). The class is a fixed name.
    Rejected(&'static str),
}

/// The transport seam.
pub trait RecordSink {
    /// Hands a record over; `id` comes back with its [`Outcome`]. `false`: no room now, try later.
    fn send(&mut self, id: u64, key: &[u8], payload: &[u8]) -> bool;
    /// Outcomes that arrived, waiting at most `wait` for the first.
    fn poll(&mut self, wait: Duration) -> Vec<(u64, Outcome)>;
}

/// Counts of a shipping run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShipStats {
    /// Records the broker acknowledged.
    pub delivered: u64,
    /// Records the broker refused for good (dropped from the spool, counted).
    pub rejected: u64,
    /// Times the shipper went back to the spool's front to send again.
    pub resends: u64,
}

/// Frames `(key, payload)` as one spool entry.
pub fn frame(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(key.len()).expect("keys are user ids of at most 256 bytes");
    let mut out = Vec::with_capacity(2 + key.len() + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(payload);
    out
}

/// Splits a spool entry into `(key, payload)`; `None` for an entry this code did not write.
pub fn unframe(entry: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_be_bytes([*entry.first()?, *entry.get(1)?]));
    let rest = entry.get(2..)?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Ships the spool's records through a sink, front first.
#[derive(Debug)]
pub struct Shipper {
    max_in_flight: usize,
    /// Id of the spool's front record (ids grow by one per record, for this run).
    front_id: u64,
    /// Records after the front already handed to the sink.
    handed: usize,
    outcomes: BTreeMap<u64, Outcome>,
    /// A handed record must be sent again: once nothing is in flight, start over at the front.
    rewind: bool,
    /// Records behind the front the broker had answered for good when the shipper started
    /// over, under the ids they get now: they are not sent again (the broker has them once).
    settled: BTreeMap<u64, Outcome>,
    stats: ShipStats,
}

impl Shipper {
    /// A shipper that keeps at most `max_in_flight` records in the transport.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            max_in_flight: max_in_flight.max(1),
            front_id: 0,
            handed: 0,
            outcomes: BTreeMap::new(),
            rewind: false,
            settled: BTreeMap::new(),
            stats: ShipStats::default(),
        }
    }

    /// Hands waiting records to the sink, collects outcomes (waiting at most `wait`), and
    /// removes the acknowledged front of the spool.
    pub fn pump(&mut self, spool: &mut Spool, sink: &mut impl RecordSink, wait: Duration) -> Result<(), SpoolError> {
        if !self.rewind && self.handed < spool.len() && self.handed < self.max_in_flight {
            let want = (spool.len() - self.handed).min(self.max_in_flight - self.handed);
            for entry in spool.read(self.handed, want) {
                let id = self.front_id + self.handed as u64;
                let sent = if let Some(outcome) = self.settled.remove(&id) {
                    self.outcomes.insert(id, outcome);
                    true
                } else {
                    match unframe(&entry) {
                        Some((key, payload)) => sink.send(id, key, payload),
                        None => {
                            // Not ours (a corrupt or foreign file): counted, never sent.
                            self.outcomes.insert(id, Outcome::Rejected("unreadable_spool_entry"));
                            true
                        }
                    }
                };
                if !sent {
                    break;
                }
                self.handed += 1;
            }
        }
        let wait = if self.handed == 0 { Duration::ZERO } else { wait };
        for (id, outcome) in sink.poll(wait) {
            if id >= self.front_id && id < self.front_id + self.handed as u64 {
                self.rewind |= outcome == Outcome::Retry;
                self.outcomes.insert(id, outcome);
            }
        }
        // The acknowledged front leaves the spool, in order.
        let mut done = 0;
        while let Some(outcome) = self.outcomes.get(&(self.front_id + done as u64)) {
            match outcome {
                Outcome::Delivered => self.stats.delivered += 1,
                Outcome::Rejected(class) => {
                    self.stats.rejected += 1;
                    tracing::warn!(class, "the broker refused an agent record: dropped from the spool");
                }
                Outcome::Retry => break,
            }
            self.outcomes.remove(&(self.front_id + done as u64));
            done += 1;
        }
        spool.pop(done)?;
        self.front_id += done as u64;
        self.handed -= done;
        if self.rewind && self.outcomes.len() == self.handed {
            // Everything handed has an answer: send what the broker does not have again from
            // the front, under fresh ids so that no late answer about an earlier send is taken
            // for the new one.
            let renumber = self.handed as u64;
            self.settled = std::mem::take(&mut self.outcomes)
                .into_iter()
                .filter(|(_, o)| *o != Outcome::Retry)
                .map(|(id, o)| (id + renumber, o))
                .collect();
            self.front_id += self.handed as u64;
            self.handed = 0;
            self.rewind = false;
            self.stats.resends += 1;
        }
        Ok(())
    }

    /// Records handed to the sink and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.handed - self.outcomes.len()
    }

    /// Counts so far.
    pub fn stats(&self) -> ShipStats {
        self.stats
    }
}

/// The agent producer's context: outcomes of deliveries, and whether the broker answers.
#[derive(Default)]
pub struct AgentContext {
    outcomes: Mutex<Vec<(u64, Outcome)>>,
    brokers_down: AtomicBool,
}

impl AgentContext {
    /// Whether librdkafka last said every broker is down.
    pub fn brokers_down(&self) -> bool {
        self.brokers_down.load(Ordering::Relaxed)
    }
}

impl ClientContext for AgentContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            if !self.brokers_down.swap(true, Ordering::Relaxed) {
                tracing::warn!("broker unreachable: records wait in the spool");
            }
            return;
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ProducerContext for AgentContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        let outcome = match result {
            Ok(_) => {
                if self.brokers_down.swap(false, Ordering::Relaxed) {
                    tracing::info!("broker reachable again: draining the spool");
                }
                Outcome::Delivered
            }
            Err((e, _)) => classify(e),
        };
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner()).push((id as u64, outcome));
    }
}

/// Delivery errors that mean "not written, send again" versus "refused for good".
fn classify(e: &KafkaError) -> Outcome {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::UnknownPartition
            | C::MessageTimedOut
            | C::PurgeQueue
            | C::PurgeInflight
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition,
        ) => Outcome::Retry,
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => Outcome::Rejected("message_too_large"),
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed) => Outcome::Rejected("not_authorized"),
        Some(C::InvalidMessage | C::InvalidRecord) => Outcome::Rejected("invalid_record"),
        _ => Outcome::Rejected("other"),
    }
}

/// An idempotent producer to one topic.
pub struct KafkaSink {
    producer: BaseProducer<AgentContext>,
    topic: String,
}

impl KafkaSink {
    /// A producer with the `[kafka]` `properties`, made idempotent and patient: it retries a
    /// record until the broker has it, however long that takes.
    pub fn new(properties: &BTreeMap<String, String>, topic: &str) -> Result<Self, KafkaError> {
        let producer = ClientBuilder::new(properties)
            .idempotent()
            .set("message.timeout.ms", "0")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            // Back within a second of the broker's return, not after librdkafka's 10 s ceiling.
            .set("reconnect.backoff.max.ms", "1000")
            .create_with_context(AgentContext::default())?;
        Ok(Self { producer, topic: topic.to_owned() })
    }

    /// The producer's context (broker state).
    pub fn context(&self) -> &AgentContext {
        self.producer.context()
    }
}

impl RecordSink for KafkaSink {
    fn send(&mut self, id: u64, key: &[u8], payload: &[u8]) -> bool {
        let record = BaseRecord::with_opaque_to(&self.topic, id as usize).key(key).payload(payload);
        match self.producer.send(record) {
            Ok(()) => true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => false,
            Err((e, _)) => {
                self.producer.context().outcomes.lock().unwrap_or_else(|p| p.into_inner()).push((id, classify(&e)));
                true
            }
        }
    }

    fn poll(&mut self, wait: Duration) -> Vec<(u64, Outcome)> {
        self.producer.poll(wait);
        std::mem::take(&mut *self.producer.context().outcomes.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// The transport twin: answers what the test scripts, remembers what it was sent.
    #[derive(Default)]
    struct TwinSink {
        capacity: usize,
        sent: Vec<(u64, Vec<u8>)>,
        pending: VecDeque<u64>,
        /// Outcome for each id when it is answered (default: delivered).
        script: BTreeMap<u64, Outcome>,
        /// While false, nothing is answered (the broker is away).
        up: bool,
    }

    impl RecordSink for TwinSink {
        fn send(&mut self, id: u64, _key: &[u8], payload: &[u8]) -> bool {
            if self.pending.len() >= self.capacity {
                return false;
            }
            self.sent.push((id, payload.to_vec()));
            self.pending.push_back(id);
            true
        }

        fn poll(&mut self, _wait: Duration) -> Vec<(u64, Outcome)> {
            if !self.up {
                return Vec::new();
            }
            self.pending.drain(..).map(|id| (id, self.script.remove(&id).unwrap_or(Outcome::Delivered))).collect()
        }
    }

    fn spool_with(dir: &tempfile::TempDir, n: u8) -> Spool {
        let mut spool = Spool::open(&dir.path().join("s"), 1 << 20).unwrap();
        for i in 0..n {
            spool.push(&frame(b"u1", &[i])).unwrap();
        }
        spool
    }

    fn payloads(sink: &TwinSink) -> Vec<u8> {
        sink.sent.iter().map(|(_, p)| p[0]).collect()
    }

    #[test]
    fn frames_round_trip_and_foreign_entries_are_refused() {
        assert_eq!(unframe(&frame(b"user", b"payload")), Some((&b"user"[..], &b"payload"[..])));
        assert_eq!(unframe(&[0, 9, 1]), None);
        assert_eq!(unframe(&[]), None);
    }

    #[test]
    fn an_outage_keeps_everything_in_the_spool_then_drains_it_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = spool_with(&dir, 20);
        let mut sink = TwinSink { capacity: 100, up: false, ..Default::default() };
        let mut shipper = Shipper::new(4);
        for _ in 0..5 {
            shipper.pump(&mut spool, &mut sink, Duration::ZERO).unwrap();
        }
        assert_eq!(spool.len(), 20, "nothing leaves the spool unacknowledged");
        assert_eq!(sink.sent.len(), 4, "at most max_in_flight in the transport");
        sink.up = true;
        while !spool.is_empty() {
            shipper.pump(&mut spool, &mut sink, Duration::ZERO).unwrap();
        }
        assert_eq!(payloads(&sink), (0..20).collect::<Vec<u8>>(), "each once, in order");
        assert_eq!(shipper.stats(), ShipStats { delivered: 20, rejected: 0, resends: 0 });
    }

    #[test]
    fn a_retry_sends_again_only_what_the_broker_does_not_have() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = spool_with(&dir, 7);
        let mut sink = TwinSink { capacity: 100, up: true, ..Default::default() };
        sink.script.insert(2, Outcome::Retry);
        sink.script.insert(4, Outcome::Retry);
        let mut shipper = Shipper::new(10);
        while !spool.is_empty() {
            shipper.pump(&mut spool, &mut sink, Duration::ZERO).unwrap();
        }
        // 3, 5 and 6 were delivered the first time: only 2 and 4 go again, in order.
        assert_eq!(payloads(&sink), vec![0, 1, 2, 3, 4, 5, 6, 2, 4]);
        assert_eq!(shipper.stats(), ShipStats { delivered: 7, rejected: 0, resends: 1 });
        assert_eq!(shipper.in_flight(), 0);
    }

    #[test]
    fn a_second_rewind_still_skips_what_the_first_send_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = spool_with(&dir, 5);
        let mut sink = TwinSink { capacity: 100, up: true, ..Default::default() };
        // First send: 0 retried, the rest delivered. Second send (ids from 5): 0 retried again.
        sink.script.insert(0, Outcome::Retry);
        sink.script.insert(5, Outcome::Retry);
        let mut shipper = Shipper::new(10);
        while !spool.is_empty() {
            shipper.pump(&mut spool, &mut sink, Duration::ZERO).unwrap();
        }
        assert_eq!(payloads(&sink), vec![0, 1, 2, 3, 4, 0, 0]);
        assert_eq!(shipper.stats(), ShipStats { delivered: 5, rejected: 0, resends: 2 });
    }

    #[test]
    fn a_refused_record_is_counted_and_does_not_block_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = spool_with(&dir, 4);
        spool.push(&[0xff]).unwrap(); // not a frame
        let mut sink = TwinSink { capacity: 100, up: true, ..Default::default() };
        sink.script.insert(1, Outcome::Rejected("message_too_large"));
        let mut shipper = Shipper::new(10);
        while !spool.is_empty() {
            shipper.pump(&mut spool, &mut sink, Duration::ZERO).unwrap();
        }
        assert_eq!(payloads(&sink), vec![0, 1, 2, 3]);
        assert_eq!(shipper.stats(), ShipStats { delivered: 3, rejected: 2, resends: 0 });
    }

    #[test]
    fn a_full_transport_queue_is_retried_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = spool_with(&dir, 10);
        let mut sink = TwinSink { capacity: 3, up: true, ..Default::default() };
        let mut shipper = Shipper::new(100);
        while !spool.is_empty() {
            shipper.pump(&mut spool, &mut sink, Duration::ZERO).unwrap();
        }
        assert_eq!(payloads(&sink), (0..10).collect::<Vec<u8>>());
        assert_eq!(shipper.in_flight(), 0);
    }
}
