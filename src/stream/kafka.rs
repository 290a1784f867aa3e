//! rdkafka at the edge: client configuration, the group consumer's rebalance log, the per-task
//! transactional producer, topic set-up and changelog restoration.
//!
//! Every client gets the `[kafka]` properties unchanged first (`bootstrap.servers`,
//! `security.protocol`, `sasl.*`, `ssl.*`), then the few settings exactly-once needs, so the
//! processor runs against Apache Kafka, Confluent, MSK or Redpanda alike.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BlockingRetryable as _;
use metronome_io::kafka::ClientBuilder;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};

use super::config::{Guarantee, StreamConfig, FLEET_CANDIDATES, FLEET_FINGERPRINTS, USER_STATE_STORE};
use super::recovery::{ChangelogRecord, ChangelogSource, RecoveryError};
use super::task::{self, ProducerError, TaskError};
use crate::metrics::events::{ConsumerLagObserved, InternalEvent};
use metronome_core::wire::{InputRecord, OutRecord, OutTopic, RecordTime};

/// How long a single broker round trip may take before the processor gives up on it.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// The input consumer's pause before fetching again once its queue is full (`[kafka]` may set
/// `fetch.queue.backoff.ms` itself).
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// Why the Kafka edge failed. Messages carry client errors and names, never record content.
#[derive(Debug, thiserror::Error)]
pub enum KafkaEdgeError {
    /// A client could not be created or configured.
    #[error("kafka client configuration: {0}")]
    Config(String),
    /// A broker call failed.
    #[error("kafka {what}: {error}")]
    Broker {
        /// What was being done.
        what: &'static str,
        /// The client's error.
        error: KafkaError,
    },
    /// Topics exist but do not fit together.
    #[error("topic layout: {0}")]
    Topics(String),
    /// Restoring a store failed.
    #[error("restoring partition {partition}: {source}")]
    Restore {
        /// The partition being restored.
        partition: i32,
        /// What failed.
        source: TaskError,
    },
}

fn broker(what: &'static str) -> impl FnOnce(KafkaError) -> KafkaEdgeError {
    move |error| KafkaEdgeError::Broker { what, error }
}

/// Builds client configurations: passthrough properties first, then exactly-once settings.
#[derive(Debug, Clone)]
pub struct Clients {
    properties: BTreeMap<String, String>,
    cfg: StreamConfig,
    instance: String,
}

impl Clients {
    /// Clients for `cfg` with the `[kafka]` `properties`.
    pub fn new(cfg: StreamConfig, properties: BTreeMap<String, String>) -> Self {
        let instance = cfg.instance_name();
        Self { properties, cfg, instance }
    }

    /// The stream settings.
    pub fn stream(&self) -> &StreamConfig {
        &self.cfg
    }

    /// The `[kafka]` properties.
    pub fn properties(&self) -> &BTreeMap<String, String> {
        &self.properties
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn base(&self, role: &str) -> ClientBuilder {
        ClientBuilder::new(&self.properties).client_id(format!("{}-{role}", self.instance))
    }

    /// The group consumer of the input topic.
    pub fn consumer(&self, log: Arc<RebalanceLog>) -> Result<BaseConsumer<GroupContext>, KafkaEdgeError> {
        self.group_consumer("consumer", &self.cfg.application_id, &self.cfg.input_topic, log)
    }

    /// A group consumer in `group` (its lag gauge follows `lag_topic`), as the processor's
    /// stages consume: read_committed, offsets committed in transactions only.
    pub fn group_consumer(
        &self,
        role: &str,
        group: &str,
        lag_topic: &str,
        log: Arc<RebalanceLog>,
    ) -> Result<BaseConsumer<GroupContext>, KafkaEdgeError> {
        self.base(role)
            // The processor drains its fetch queue a batch at a time. Once the queue had filled,
            // librdkafka's default (1 s) kept it from fetching again while the batch was
            // processed, and the next batch then waited for records the broker had ready.
            .set_default("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
            .set("group.id", group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .read_committed()
            .set("auto.offset.reset", "earliest")
            // End-of-partition events tell the processor it has caught up (idle windows).
            .partition_eof()
            // Statistics feed the consumer-lag gauge.
            .set_default("statistics.interval.ms", "5000")
            .create_with_context(GroupContext { log, input_topic: lag_topic.to_owned() })
            .map_err(|e| KafkaEdgeError::Config(e.to_string()))
    }

    /// The producer of the task for `partition`. Under exactly-once it is transactional and
    /// initialised: any transaction an earlier owner of the task left open is aborted and that
    /// owner is fenced. Under at-least-once it commits offsets through `consumer`.
    pub fn task_producer(
        &self,
        partition: i32,
        consumer: &Arc<BaseConsumer<GroupContext>>,
    ) -> Result<TxProducer, KafkaEdgeError> {
        let topics = TaskTopics {
            input: self.cfg.input_topic.clone(),
            partition,
            changelog: self.cfg.changelog_topic(USER_STATE_STORE),
            transactional_id: self.cfg.transactional_id(partition),
        };
        self.producer_for(topics, consumer)
    }

    /// The producer of a task that consumes `topics.input`'s partition and keeps its store's
    /// changelog in `topics.changelog` (the fleet stages' tasks, the processor's own).
    pub fn producer_for(
        &self,
        topics: TaskTopics,
        consumer: &Arc<BaseConsumer<GroupContext>>,
    ) -> Result<TxProducer, KafkaEdgeError> {
        let TaskTopics { input, partition, changelog, transactional_id } = topics;
        let mut config = self
            .base(&format!("task-{partition}"))
            .idempotent()
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000");
        let mode = match self.cfg.guarantee {
            Guarantee::ExactlyOnce => {
                config = config
                    .set("transactional.id", transactional_id)
                    .set("transaction.timeout.ms", self.cfg.transaction_timeout_ms.to_string());
                Mode::Transactional
            }
            Guarantee::AtLeastOnce => Mode::AtLeastOnce(Arc::clone(consumer)),
        };
        let config = config.into_config();
        let producer = create_task_producer(&config, &changelog, &mode)?;
        Ok(TxProducer {
            mode,
            producer,
            config,
            partition,
            input_topic: input,
            alerts_topic: self.cfg.alerts_topic.clone(),
            dlq_topic: self.cfg.dlq_topic.clone(),
            changelog_topic: changelog,
            fingerprints_topic: self.cfg.repartition_topic(FLEET_FINGERPRINTS),
            candidates_topic: self.cfg.repartition_topic(FLEET_CANDIDATES),
            group: None,
        })
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, KafkaEdgeError> {
        self.base("admin").create().map_err(|e| KafkaEdgeError::Config(e.to_string()))
    }

    fn plain_consumer(&self, role: &str) -> Result<BaseConsumer, KafkaEdgeError> {
        self.base(role)
            .assigned_reader(format!("{}-{role}", self.cfg.application_id))
            .partition_eof()
            .read_committed()
            .create()
            .map_err(|e| KafkaEdgeError::Config(e.to_string()))
    }

    /// Partitions of `topic`, or `None` if it does not exist.
    pub fn partitions(&self, topic: &str) -> Result<Option<i32>, KafkaEdgeError> {
        let consumer = self.plain_consumer("metadata")?;
        let metadata =
            consumer.fetch_metadata(Some(topic), BROKER_TIMEOUT).map_err(broker("reading topic metadata"))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32))
    }

    /// Creates what is missing (if `create_topics`) and checks the changelog is co-partitioned
    /// with the input. Returns the input's partition count.
    pub fn ensure_topics(&self) -> Result<i32, KafkaEdgeError> {
        let cfg = &self.cfg;
        let changelog = cfg.changelog_topic(USER_STATE_STORE);
        if cfg.create_topics {
            let plain = [cfg.input_topic.as_str(), cfg.alerts_topic.as_str(), cfg.dlq_topic.as_str()];
            let missing: Vec<&str> = plain
                .into_iter()
                .filter_map(|t| match self.partitions(t) {
                    Ok(None) => Some(Ok(t)),
                    Ok(Some(_)) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()?;
            let kind = |t: &str| match t == cfg.input_topic && cfg.input_log_append_time {
                true => TopicKind::AppendTime,
                false => TopicKind::Plain,
            };
            self.create(missing.iter().map(|t| (*t, cfg.topic_partitions, kind(t))))?;
        }
        let input = self
            .partitions(&cfg.input_topic)?
            .ok_or_else(|| KafkaEdgeError::Topics(format!("input topic {} does not exist", cfg.input_topic)))?;
        match self.partitions(&changelog)? {
            Some(n) if n == input => {}
            Some(n) => {
                return Err(KafkaEdgeError::Topics(format!(
                    "{changelog} has {n} partitions but {} has {input}: they must be co-partitioned",
                    cfg.input_topic
                )))
            }
            None if cfg.create_topics => {
                self.create([(changelog.as_str(), input, TopicKind::Compacted)].into_iter())?
            }
            None => return Err(KafkaEdgeError::Topics(format!("changelog topic {changelog} does not exist"))),
        }
        let instances = cfg.instances_topic();
        if cfg.create_topics && self.partitions(&instances)?.is_none() {
            self.create([(instances.as_str(), 1, TopicKind::Compacted)].into_iter())?;
        }
        // The fleet stages: fingerprints repartitioned like the input, candidates onto one
        // partition (fleets are decided over all accounts), each stage's store co-partitioned
        // with the topic it consumes.
        for (name, partitions) in [(FLEET_FINGERPRINTS, input), (FLEET_CANDIDATES, 1)] {
            self.ensure_stage_topics(&cfg.repartition_topic(name), &cfg.changelog_topic(name), partitions)?;
        }
        Ok(input)
    }

    fn ensure_stage_topics(&self, repartition: &str, changelog: &str, partitions: i32) -> Result<(), KafkaEdgeError> {
        for (topic, kind) in [(repartition, TopicKind::Plain), (changelog, TopicKind::Compacted)] {
            match self.partitions(topic)? {
                Some(n) if n == partitions => {}
                Some(n) => {
                    return Err(KafkaEdgeError::Topics(format!(
                        "{topic} has {n} partitions, the stage needs {partitions}"
                    )))
                }
                None if self.cfg.create_topics => self.create([(topic, partitions, kind)].into_iter())?,
                None => return Err(KafkaEdgeError::Topics(format!("topic {topic} does not exist"))),
            }
        }
        Ok(())
    }

    fn create<'t>(&self, topics: impl Iterator<Item = (&'t str, i32, TopicKind)>) -> Result<(), KafkaEdgeError> {
        let replication = self.cfg.replication_factor;
        let new: Vec<NewTopic<'t>> = topics
            .map(|(name, partitions, kind)| {
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
                match kind {
                    TopicKind::Plain => topic,
                    TopicKind::Compacted => topic.set("cleanup.policy", "compact"),
                    TopicKind::AppendTime => topic.set("message.timestamp.type", "LogAppendTime"),
                }
            })
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let admin = self.admin()?;
        let results = futures::executor::block_on(admin.create_topics(&new, &AdminOptions::new()))
            .map_err(broker("creating topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(KafkaEdgeError::Topics(format!("creating {name}: {code}")));
                }
            }
        }
        self.wait_until_visible(new.iter().map(|t| t.name))
    }

    /// Waits until metadata shows every one of `topics`: the controller has created them, but a
    /// broker that answers the next metadata request may not know them yet, and the checks that
    /// follow would read "does not exist".
    fn wait_until_visible<'t>(&self, topics: impl Iterator<Item = &'t str>) -> Result<(), KafkaEdgeError> {
        let deadline = Instant::now() + BROKER_TIMEOUT;
        for topic in topics {
            while self.partitions(topic)?.is_none() {
                if Instant::now() >= deadline {
                    return Err(KafkaEdgeError::Topics(format!("{topic} was created but did not appear in metadata")));
                }
                std::thread::sleep(Duration::from_millis(50)); // polling interval of a condition
            }
        }
        Ok(())
    }

    /// The committed position of `consumer`'s group on `topic`'s `partition`, `None` if it never
    /// committed.
    pub fn committed(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, KafkaEdgeError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let committed = consumer.committed_offsets(tpl, BROKER_TIMEOUT).map_err(broker("reading committed offsets"))?;
        Ok(committed.find_partition(topic, partition).and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }))
    }

    /// The changelog partition `partition` of `topic`, read as a restore reads it.
    pub fn changelog(&self, topic: &str, partition: i32) -> Result<KafkaChangelog, KafkaEdgeError> {
        Ok(KafkaChangelog { consumer: self.plain_consumer("restore")?, topic: topic.to_owned(), partition })
    }
}

/// A changelog partition on the broker (read_committed), the production [`ChangelogSource`].
pub struct KafkaChangelog {
    consumer: BaseConsumer,
    topic: String,
    partition: i32,
}

impl ChangelogSource for KafkaChangelog {
    fn watermarks(&mut self) -> Result<(i64, i64), RecoveryError> {
        // A leader moving (a broker's death) fails the look-up for a moment: asked again every
        // 200 ms for as long as a stall would take.
        let retry_every = Duration::from_millis(200);
        let retries = (BROKER_TIMEOUT.as_millis() / retry_every.as_millis()) as usize;
        let partition = self.partition;
        let watermarks = (|| self.consumer.fetch_watermarks(&self.topic, partition, BROKER_TIMEOUT))
            .retry(backon::ConstantBuilder::default().with_delay(retry_every).with_max_times(retries))
            .sleep(std::thread::sleep)
            .notify(|e, _| tracing::warn!(partition, error = %e, "changelog watermarks unavailable; retrying"))
            .call()
            .map_err(broker("reading changelog watermarks"))?;
        Ok(watermarks)
    }

    fn replay(
        &mut self,
        from: i64,
        high: i64,
        apply: &mut dyn FnMut(ChangelogRecord<'_>) -> Result<(), RecoveryError>,
    ) -> Result<i64, RecoveryError> {
        if from >= high {
            return Ok(from);
        }
        let (topic, partition) = (self.topic.as_str(), self.partition);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from)).map_err(broker("assigning the changelog"))?;
        self.consumer.assign(&tpl).map_err(broker("assigning the changelog"))?;
        let mut position = from;
        let mut last_progress = Instant::now();
        loop {
            match self.consumer.poll(BROKER_TIMEOUT) {
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    apply(ChangelogRecord { key: m.key(), value: m.payload() })?;
                    position = m.offset() + 1;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                // librdkafka reports a broker going away, a leader moving and the like and
                // recovers by itself (a partition leader's death in a cluster): the restore goes
                // on unless nothing arrives for as long as a stall would take.
                Some(Err(e)) if last_progress.elapsed() < BROKER_TIMEOUT => {
                    tracing::warn!(partition, error = %e, "changelog read error; retrying");
                }
                Some(Err(e)) => return Err(broker("reading the changelog")(e).into()),
                None => {
                    let timed_out = KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut);
                    return Err(broker("reading the changelog")(timed_out).into());
                }
            }
        }
        // Past the end of the last record: control records (commit markers) may follow it.
        if let Ok(positions) = self.consumer.position() {
            if let Some(Offset::Offset(o)) = positions.find_partition(topic, partition).map(|e| e.offset()) {
                position = position.max(o);
            }
        }
        Ok(position)
    }
}

/// How a topic this process creates is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopicKind {
    /// Broker defaults.
    Plain,
    /// `cleanup.policy=compact` (changelogs, the instance directory).
    Compacted,
    /// `message.timestamp.type=LogAppendTime`: records carry the broker's clock (the input).
    AppendTime,
}

/// A consumed message as a task's input: its offset, key, payload and timestamp.
pub fn input_record<M: Message>(m: &M) -> InputRecord {
    let time = match m.timestamp() {
        rdkafka::Timestamp::LogAppendTime(ms) => RecordTime::LogAppend { ms },
        rdkafka::Timestamp::CreateTime(ms) => RecordTime::Create { ms },
        rdkafka::Timestamp::NotAvailable => RecordTime::Unknown,
    };
    InputRecord { offset: m.offset(), key: m.key().map(<[u8]>::to_vec), payload: m.payload().map(<[u8]>::to_vec), time }
}

/// A partition assignment change, as the consumer's callbacks report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// Partitions added to this process, with their topics.
    Assigned(Vec<(String, i32)>),
    /// Partitions taken away (before they go: their tasks must stop now).
    Revoked(Vec<(String, i32)>),
}

/// Rebalance events waiting for the processing loop.
#[derive(Debug, Default)]
pub struct RebalanceLog(Mutex<Vec<RebalanceEvent>>);

impl RebalanceLog {
    /// Takes the events recorded so far.
    pub fn drain(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn push(&self, event: RebalanceEvent) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}

/// The group consumer's context: records assignment changes for the loop.
pub struct GroupContext {
    log: Arc<RebalanceLog>,
    input_topic: String,
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect()
}

impl ClientContext for GroupContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // End of partition is how the processor learns it caught up, not a failure; librdkafka
        // reports it through the error path too.
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            return;
        }
        tracing::error!(%error, reason, "kafka client error");
    }

    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.input_topic) else { return };
        for p in topic.partitions.values().filter(|p| p.partition >= 0 && p.desired) {
            // Under read_committed the end is the last stable offset. The position is what the
            // loop was handed; the committed offset lives in transactions, not in this client.
            let end = if p.ls_offset >= 0 { p.ls_offset } else { p.hi_offset };
            let position = [p.app_offset, p.committed_offset, p.lo_offset].into_iter().find(|&o| o >= 0);
            if let (true, Some(position)) = (end >= 0, position) {
                ConsumerLagObserved { partition: p.partition, lag: end - position }.emit();
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.log.push(RebalanceEvent::Revoked(partitions_of(tpl)));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.log.push(RebalanceEvent::Assigned(partitions_of(tpl))),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }
}

/// Notes where changelog records land, so the checkpoint can say where a replay starts.
pub struct DeliveryTracker {
    changelog: String,
    max_offset: AtomicI64,
    failed: AtomicU64,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) if m.topic() == self.changelog => {
                self.max_offset.fetch_max(m.offset(), Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

enum Mode {
    Transactional,
    AtLeastOnce(Arc<BaseConsumer<GroupContext>>),
}

/// Where a task reads and keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskTopics {
    /// The topic the task consumes.
    pub input: String,
    /// Its partition (also the changelog partition).
    pub partition: i32,
    /// The changelog of the task's store.
    pub changelog: String,
    /// One per task, so a task that moves fences its old producer.
    pub transactional_id: String,
}

/// A task's producer: transactional under exactly-once.
pub struct TxProducer {
    mode: Mode,
    /// Shared with the thread of a transactional call in flight (see [`TxProducer::guarded`]).
    producer: Arc<BaseProducer<DeliveryTracker>>,
    /// What the producer was created from, to replace a wedged one.
    config: ClientConfig,
    partition: i32,
    input_topic: String,
    alerts_topic: String,
    dlq_topic: String,
    changelog_topic: String,
    fingerprints_topic: String,
    candidates_topic: String,
    /// Shared with the commit's thread; one round's parts commit under the same metadata.
    group: Option<Arc<ConsumerGroupMetadata>>,
}

/// Creates a task's producer (and, under exactly-once, initialises its transactions: this fences
/// any earlier producer of the same transactional id and aborts its open transaction).
fn create_task_producer(
    config: &ClientConfig,
    changelog: &str,
    mode: &Mode,
) -> Result<Arc<BaseProducer<DeliveryTracker>>, KafkaEdgeError> {
    let tracker =
        DeliveryTracker { changelog: changelog.to_owned(), max_offset: AtomicI64::new(-1), failed: AtomicU64::new(0) };
    let producer: BaseProducer<DeliveryTracker> =
        config.create_with_context(tracker).map_err(|e| KafkaEdgeError::Config(e.to_string()))?;
    if matches!(mode, Mode::Transactional) {
        producer.init_transactions(BROKER_TIMEOUT).map_err(broker("initialising the task's transactions"))?;
    }
    Ok(Arc::new(producer))
}

/// How long a transactional call may run past its own timeout before its producer counts as
/// wedged. librdkafka does not always honour the timeout: a group coordinator that died (and was
/// dropped from the metadata) leaves `send_offsets_to_transaction` waiting for ever
/// (librdkafka #5456 and #5511, open in 2.12), which stalled a partition's transactions until
/// the process was killed.
pub const WEDGED_AFTER: Duration = Duration::from_secs(BROKER_TIMEOUT.as_secs() + 10);

fn txn_error(e: KafkaError) -> ProducerError {
    match &e {
        KafkaError::Transaction(t) if t.is_fatal() => ProducerError::Fatal(e.to_string()),
        _ => ProducerError::Abortable(e.to_string()),
    }
}

impl TxProducer {
    /// Waits until every record sent so far is acknowledged. rdkafka's own `flush` (which
    /// `commit_transaction` calls first) serves delivery reports in polls that last their whole
    /// 100 ms slice however soon the reports arrive: every transaction waited 100 ms for nothing.
    /// This serves them in 1 ms slices, so the commit's own flush finds nothing left to wait for.
    fn flush_promptly(&self) -> Result<(), ProducerError> {
        let deadline = Instant::now() + BROKER_TIMEOUT;
        loop {
            // A zero-timeout flush also tells librdkafka to send what lingers, now.
            match self.producer.flush(Duration::ZERO) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) if Instant::now() < deadline => {
                    self.producer.poll(Duration::from_millis(1));
                }
                Err(e) => return Err(txn_error(e)),
            }
        }
    }

    /// Runs a blocking transactional call on a thread of its own and waits for it at most
    /// [`WEDGED_AFTER`]. A call that has not returned by then is left to its thread with the
    /// producer it holds, and a new producer with the same transactional id takes over: its
    /// initialisation fences the old one, whose open transaction the coordinator aborts, and the
    /// caller hears an abortable error, so the task rewinds to its checkpoint as after any abort.
    fn guarded(
        &mut self,
        what: &'static str,
        call: impl FnOnce(&BaseProducer<DeliveryTracker>) -> Result<(), KafkaError> + Send + 'static,
    ) -> Result<(), ProducerError> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let producer = Arc::clone(&self.producer);
        std::thread::Builder::new()
            .name("txn-call".into())
            .spawn(move || {
                let _ = done.send(call(&producer));
            })
            .map_err(|e| ProducerError::Abortable(format!("{what}: cannot start its thread: {e}")))?;
        match result.recv_timeout(WEDGED_AFTER) {
            Ok(outcome) => outcome.map_err(txn_error),
            Err(_) => {
                tracing::error!(
                    partition = self.partition,
                    what,
                    waited_s = WEDGED_AFTER.as_secs(),
                    "a transactional call outlived its timeout (librdkafka #5456); replacing the producer"
                );
                self.producer = create_task_producer(&self.config, &self.changelog_topic, &self.mode)
                    .map_err(|e| ProducerError::Fatal(format!("replacing a wedged producer: {e}")))?;
                Err(ProducerError::Abortable(format!("{what}: wedged past its timeout; producer replaced")))
            }
        }
    }

    /// Sets the group metadata offsets are committed under (refresh it before every batch: it
    /// carries the group generation that fences a stale member).
    pub fn set_group(&mut self, group: Option<ConsumerGroupMetadata>) {
        self.group = group.map(Arc::new);
    }
}

impl task::TaskProducer for TxProducer {
    fn begin(&mut self) -> Result<(), ProducerError> {
        let tracker = self.producer.context();
        tracker.max_offset.store(-1, Ordering::Relaxed);
        tracker.failed.store(0, Ordering::Relaxed);
        match self.mode {
            Mode::Transactional => self.producer.begin_transaction().map_err(txn_error),
            Mode::AtLeastOnce(_) => Ok(()),
        }
    }

    fn send(&mut self, record: &OutRecord) -> Result<(), ProducerError> {
        let topic = match record.topic {
            OutTopic::Alerts => &self.alerts_topic,
            OutTopic::DeadLetters => &self.dlq_topic,
            OutTopic::Changelog => &self.changelog_topic,
            OutTopic::Fingerprints => &self.fingerprints_topic,
            OutTopic::FleetCandidates => &self.candidates_topic,
        };
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header { key: name, value: Some(value) });
        }
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
        match record.topic {
            OutTopic::Changelog => r = r.partition(self.partition),
            OutTopic::FleetCandidates => r = r.partition(0),
            // Keyed topics: the partitioner's hash of the key, the same for every producer.
            OutTopic::Alerts | OutTopic::DeadLetters | OutTopic::Fingerprints => {}
        }
        if let Some(k) = &record.key {
            r = r.key(k.as_slice());
        }
        if let Some(v) = &record.value {
            r = r.payload(v.as_slice());
        }
        loop {
            match self.producer.send(r) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    r = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(txn_error(e)),
            }
        }
    }

    fn commit(&mut self, next_offset: i64) -> Result<Option<i64>, ProducerError> {
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&self.input_topic, self.partition, Offset::Offset(next_offset))
            .map_err(txn_error)?;
        match &self.mode {
            Mode::Transactional => {
                // Shared with the call's thread (set_group refreshes it before every round).
                let group = self
                    .group
                    .clone()
                    .ok_or_else(|| ProducerError::Abortable("no consumer group metadata yet".into()))?;
                self.flush_promptly()?;
                self.guarded("committing a transaction", move |p| {
                    p.send_offsets_to_transaction(&offsets, &group, BROKER_TIMEOUT)?;
                    p.commit_transaction(BROKER_TIMEOUT)
                })?;
                if self.producer.context().failed.load(Ordering::Relaxed) > 0 {
                    // The broker accepted the commit, so this cannot happen; refuse to guess.
                    return Err(ProducerError::Fatal("a record failed delivery in a committed transaction".into()));
                }
            }
            Mode::AtLeastOnce(consumer) => {
                // Everything acknowledged first, then the position: a crash between the two
                // repeats the batch, never skips it.
                self.flush_promptly()?;
                if self.producer.context().failed.load(Ordering::Relaxed) > 0 {
                    return Err(ProducerError::Abortable("records failed delivery; the batch is repeated".into()));
                }
                consumer.commit(&offsets, CommitMode::Sync).map_err(txn_error)?;
            }
        }
        let tracker = self.producer.context();
        let max = tracker.max_offset.load(Ordering::Relaxed);
        Ok((max >= 0).then_some(max + 1))
    }

    fn abort(&mut self) -> Result<(), ProducerError> {
        match self.mode {
            Mode::Transactional => self.guarded("aborting a transaction", |p| p.abort_transaction(BROKER_TIMEOUT)),
            // Sent records stay sent: the repeated batch sends them again (at least once).
            Mode::AtLeastOnce(_) => Ok(()),
        }
    }
}
