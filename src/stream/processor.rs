//! The processor: the Kafka and RocksDB implementations of the loop's seams ([`Input`],
//! [`TaskFactory`]) wired to the [`Engine`] with the system clock; its error, shutdown signal
//! and run summary.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use metronome_core::clock::SystemClock;
use metronome_core::detect::Detector;
use metronome_core::signing::ReloadingKeys;
use metronome_model::ReloadingModel;
use metronome_state::{RocksResources, RocksStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;

use super::config::{StreamConfig, USER_STATE_STORE};
use super::directory::Announcer;
use super::engine::{Announce, Engine, Scoring, Wiring};
use super::kafka::{self, Clients, GroupContext, KafkaEdgeError, RebalanceEvent, RebalanceLog, TxProducer};
use super::query::UserQueries;
use super::recovery;
use super::seams::{Input, OpenedTask, Polled, TaskFactory};
use super::status::Status;
use super::task::TaskError;
use crate::metrics::events::{InternalEvent, RocksDbSizes};

/// Why the processor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Kafka set-up or a broker call failed.
    #[error(transparent)]
    Kafka(#[from] KafkaEdgeError),
    /// A task failed in a way a retry cannot fix (fenced producer, broken store).
    #[error("partition {partition}: {source}")]
    Task {
        /// The task's partition.
        partition: i32,
        /// What failed.
        source: TaskError,
    },
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

/// Totals of one run, for the exit summary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Input records processed and committed.
    pub records: u64,
    /// Key events fed to the detector.
    pub events: u64,
    /// Alerts produced.
    pub alerts: u64,
    /// Records sent to the dead-letter topic.
    pub dead_letters: u64,
    /// Transactions committed.
    pub commits: u64,
    /// Transactions aborted (their records are processed again).
    pub aborts: u64,
    /// Changelog records replayed into stores.
    pub restored: u64,
}

/// A stream processor instance: the Kafka and RocksDB sides of the loop's seams, wired to an
/// [`Engine`].
pub struct Processor {
    clients: Clients,
    scoring: Scoring,
    resources: RocksResources,
    status: Arc<Status>,
    queries: Arc<UserQueries>,
    /// Where this instance's HTTP API is reachable, announced with its partitions.
    advertised_url: String,
}

impl Processor {
    /// A processor with `detector`, the optional hot-reloadable `model` (checked for a new
    /// version every `reload_every`), and the Kafka `properties` passed to every client.
    pub fn new(
        cfg: StreamConfig,
        properties: BTreeMap<String, String>,
        detector: Detector,
        idle_timeout: Duration,
        model: Option<ReloadingModel>,
        reload_every: Duration,
    ) -> Result<Self, ProcessError> {
        cfg.validate().map_err(ProcessError::Config)?;
        let device_keys = match cfg.device_keys_file.as_os_str().is_empty() {
            true => None,
            false => Some(ReloadingKeys::load(&cfg.device_keys_file).map_err(|e| ProcessError::Config(e.to_string()))?),
        };
        let resources = RocksResources::new(cfg.rocksdb.clone());
        Ok(Self {
            clients: Clients::new(cfg, properties),
            scoring: Scoring { detector, model, device_keys, idle_timeout, reload_every },
            resources,
            status: Arc::new(Status::default()),
            queries: Arc::new(UserQueries::default()),
            advertised_url: String::new(),
        })
    }

    /// Announces `url` as this instance's HTTP address with its partitions, so other instances
    /// can send user queries here.
    pub fn with_advertised_url(mut self, url: &str) -> Self {
        self.advertised_url = url.to_owned();
        self
    }

    /// The question box for interactive user queries.
    pub fn queries(&self) -> Arc<UserQueries> {
        Arc::clone(&self.queries)
    }

    /// Live task phases (restoring, running) for readiness reporting.
    pub fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    /// Consumes until `shutdown` is cancelled, then finishes the batch in hand, commits it and
    /// leaves the group.
    pub fn run(self, shutdown: &CancellationToken) -> Result<RunSummary, ProcessError> {
        let cfg = self.clients.stream().clone();
        let partitions = self.clients.ensure_topics()?;
        tracing::info!(topic = %cfg.input_topic, partitions, group = %cfg.application_id, "processor starting");
        let announce = self.announcer();
        let log = Arc::new(RebalanceLog::default());
        let consumer = Arc::new(self.clients.consumer(Arc::clone(&log))?);
        consumer
            .subscribe(&[&cfg.input_topic])
            .map_err(|error| KafkaEdgeError::Broker { what: "subscribing to the input", error })?;
        let wiring = Wiring {
            clock: Arc::new(SystemClock),
            status: self.status,
            queries: self.queries,
            instance: self.clients.instance().to_owned(),
            partitions,
            announce,
        };
        let input = KafkaInput { consumer: Arc::clone(&consumer), log, topic: cfg.input_topic.clone() };
        let tasks = KafkaTasks { clients: self.clients, resources: self.resources, consumer };
        Engine::new(cfg, self.scoring, input, tasks, wiring)?.run(shutdown)
    }

    /// Announces the partitions this instance owns on the directory topic; without one, user
    /// queries cannot be redirected here, and the processor runs on.
    fn announcer(&self) -> Announce {
        let topic = self.clients.stream().instances_topic();
        match Announcer::new(self.clients.properties(), &topic, self.clients.instance(), &self.advertised_url) {
            Ok(announcer) => Box::new(move |owned: &[i32]| announcer.announce(owned)),
            Err(e) => {
                tracing::warn!(error = %e, "no instance announcements: user queries cannot be redirected here");
                Box::new(|_: &[i32]| {})
            }
        }
    }
}

/// The group consumer of the input topic as the loop's [`Input`].
struct KafkaInput {
    consumer: Arc<BaseConsumer<GroupContext>>,
    log: Arc<RebalanceLog>,
    topic: String,
}

impl Input for KafkaInput {
    fn poll(&mut self, timeout: Duration) -> Polled {
        match self.consumer.poll(timeout) {
            Some(Ok(m)) => Polled::Record { partition: m.partition(), record: kafka::input_record(&m) },
            Some(Err(KafkaError::PartitionEOF(partition))) => Polled::End { partition },
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                Polled::Nothing
            }
            None => Polled::Nothing,
        }
    }

    fn rebalances(&mut self) -> Vec<RebalanceEvent> {
        self.log.drain()
    }

    fn rewind(&mut self, partition: i32, to: Option<i64>) -> Result<(), ProcessError> {
        let offset = to.map_or(Offset::Beginning, Offset::Offset);
        self.consumer
            .seek(&self.topic, partition, offset, kafka::BROKER_TIMEOUT)
            .map_err(|error| KafkaEdgeError::Broker { what: "rewinding after an abort", error }.into())
    }

    fn leave(&mut self) {
        self.consumer.unsubscribe();
        // Serve the revocation the unsubscribe triggers, so the group rebalances right away.
        let _ = self.consumer.poll(Duration::from_millis(100));
        self.log.drain();
    }
}

/// Tasks over RocksDB stores restored from the changelog topic, with transactional producers.
struct KafkaTasks {
    clients: Clients,
    resources: RocksResources,
    consumer: Arc<BaseConsumer<GroupContext>>,
}

impl TaskFactory for KafkaTasks {
    type Store = RocksStore;
    type Producer = TxProducer;

    /// Fences earlier owners first, then makes the store consistent with the committed input
    /// position.
    fn open(
        &mut self,
        partition: i32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<OpenedTask<RocksStore, TxProducer>, ProcessError> {
        let cfg = self.clients.stream();
        // First: this aborts whatever transaction a previous owner left open, so the committed
        // offsets and the changelog's committed end below cannot move under us.
        let producer = self.clients.task_producer(partition, &self.consumer)?;
        let committed = self.clients.committed(&self.consumer, &cfg.input_topic, partition)?;
        let changelog = cfg.changelog_topic(USER_STATE_STORE);
        let dir = cfg.task_dir(partition);
        let recovered =
            recovery::recover(&self.clients, &self.resources, &dir, &changelog, partition, committed, progress)?;
        Ok(OpenedTask { store: recovered.store, producer, replayed: recovered.replayed })
    }

    fn prepare(&self, producer: &mut TxProducer) {
        producer.set_group(self.consumer.group_metadata());
    }

    fn close(&mut self, partition: i32, store: RocksStore) {
        if let Err(e) = store.flush() {
            tracing::warn!(partition, error = %e, "flushing the task store failed; it will be replayed from the changelog");
        }
    }

    fn report_sizes(&self, stores: &mut dyn Iterator<Item = &RocksStore>) {
        let mut sizes = RocksDbSizes { block_cache: self.resources.cache_usage_bytes() as u64, ..Default::default() };
        for store in stores {
            let read = |name: &str| store.property(name).ok().flatten().unwrap_or(0);
            sizes.memtables += read("rocksdb.cur-size-all-mem-tables");
            sizes.table_readers += read("rocksdb.estimate-table-readers-mem");
            sizes.sst_files += read("rocksdb.total-sst-files-size");
            sizes.live_data += read("rocksdb.estimate-live-data-size");
        }
        sizes.emit();
    }
}
