//! The fleet stages' loop: one consumer group (`<application-id>-fleet`) over both fleet
//! repartition topics, a [`StageTask`] per assigned partition, the same exactly-once cycle and
//! recovery as the processor's tasks. It runs beside the processor in `metronome process`.
//!
//! Fleets settle in processing time, so the decision task is also run without records every
//! [`DECIDE_EVERY`]; the fingerprint tasks expire old fingerprints every [`EXPIRE_EVERY`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metronome_state::{RocksResources, RocksStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::Offset;

use super::config::{StreamConfig, FLEET_CANDIDATES, FLEET_FINGERPRINTS};
use super::fleet::{Stage, StageContext, StageOutcome, StageTask};
use super::kafka::{self, Clients, GroupContext, KafkaEdgeError, RebalanceEvent, RebalanceLog, TaskTopics, TxProducer};
use super::processor::ProcessError;
use super::recovery;
use super::task::{ProducerError, TaskError};
use crate::metrics::events::{FleetStageCommitted, InternalEvent};
use metronome_core::detect::FleetConfig;
use metronome_core::wire::InputRecord;
use tokio_util::sync::CancellationToken;

/// How often fleets are decided when no candidate arrives.
pub const DECIDE_EVERY: Duration = Duration::from_secs(1);
/// How often fingerprints nobody produced within the window are deleted.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// Totals of one run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StagesSummary {
    /// Records consumed from both repartition topics.
    pub records: u64,
    /// Candidates sent to the decision stage.
    pub candidates: u64,
    /// Fleet alerts committed.
    pub alerts: u64,
    /// Records set aside.
    pub dead_letters: u64,
    /// Aborted transactions (their records are processed again).
    pub aborts: u64,
}

struct Assigned {
    task: StageTask<RocksStore>,
    producer: TxProducer,
    pending: Vec<InputRecord>,
}

/// The fleet stages of one instance.
pub struct FleetStages {
    clients: Clients,
    /// The repartition topics the two stages consume, in [`Stage`] order.
    topics: [String; 2],
    fleet: FleetConfig,
    model_version: String,
    resources: RocksResources,
}

impl FleetStages {
    /// Stages with the stream settings, `[kafka]` properties and the detector's fleet settings.
    pub fn new(
        cfg: StreamConfig,
        properties: BTreeMap<String, String>,
        fleet: FleetConfig,
        model_version: &str,
    ) -> Result<Self, ProcessError> {
        cfg.validate().map_err(ProcessError::Config)?;
        let resources = RocksResources::new(cfg.rocksdb.clone());
        let topics = [cfg.repartition_topic(FLEET_FINGERPRINTS), cfg.repartition_topic(FLEET_CANDIDATES)];
        Ok(Self {
            clients: Clients::new(cfg, properties),
            topics,
            fleet,
            model_version: model_version.to_owned(),
            resources,
        })
    }

    fn topic_of(&self, stage: Stage) -> &str {
        match stage {
            Stage::Fingerprints => &self.topics[0],
            Stage::Fleets => &self.topics[1],
        }
    }

    fn stage_of(&self, topic: &str) -> Option<Stage> {
        [Stage::Fingerprints, Stage::Fleets].into_iter().find(|s| self.topic_of(*s) == topic)
    }

    /// Consumes until `shutdown` is cancelled, then commits the batch in hand and leaves the group.
    pub fn run(self, shutdown: &CancellationToken) -> Result<StagesSummary, ProcessError> {
        let cfg = self.clients.stream().clone();
        // The processor creates them too; whichever thread comes first does.
        self.clients.ensure_topics()?;
        let [fingerprints, candidates] = &self.topics;
        let log = Arc::new(RebalanceLog::default());
        let consumer = Arc::new(self.clients.group_consumer(
            "fleet-consumer",
            &cfg.fleet_group(),
            fingerprints,
            Arc::clone(&log),
        )?);
        consumer
            .subscribe(&[fingerprints.as_str(), candidates.as_str()])
            .map_err(|error| KafkaEdgeError::Broker { what: "subscribing to the fleet stages", error })?;
        tracing::info!(group = %cfg.fleet_group(), "fleet stages starting");
        let mut tasks: BTreeMap<(Stage, i32), Assigned> = BTreeMap::new();
        let mut summary = StagesSummary::default();
        let (mut last_decide, mut last_expire) = (Instant::now(), Instant::now());
        let commit_interval = Duration::from_millis(cfg.commit_interval_ms);
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            if let Err(e) = self.collect(&consumer, &log, &mut tasks, commit_interval, shutdown) {
                break Err(e);
            }
            let decide = last_decide.elapsed() >= DECIDE_EVERY;
            if decide {
                last_decide = Instant::now();
            }
            if let Err(e) = self.run_batches(&consumer, &mut tasks, decide, &mut summary) {
                break Err(e);
            }
            if last_expire.elapsed() >= EXPIRE_EVERY {
                last_expire = Instant::now();
                if let Err(e) = self.expire(&consumer, &mut tasks) {
                    break Err(e);
                }
            }
        };
        let finished = result.and_then(|()| self.run_batches(&consumer, &mut tasks, false, &mut summary));
        for (_, assigned) in std::mem::take(&mut tasks) {
            close(assigned);
        }
        consumer.unsubscribe();
        let _ = consumer.poll(Duration::from_millis(100));
        log.drain();
        tracing::info!(
            records = summary.records,
            candidates = summary.candidates,
            alerts = summary.alerts,
            aborts = summary.aborts,
            "fleet stages stopped"
        );
        finished.map(|()| summary)
    }

    /// Polls one batch's worth of records into the tasks' pending lists, applying rebalances.
    fn collect(
        &self,
        consumer: &Arc<BaseConsumer<GroupContext>>,
        log: &RebalanceLog,
        tasks: &mut BTreeMap<(Stage, i32), Assigned>,
        commit_interval: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(), ProcessError> {
        let cfg = self.clients.stream();
        let started = Instant::now();
        let mut collected = 0usize;
        while collected < cfg.max_batch_records && !shutdown.is_cancelled() {
            let left = commit_interval.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let polled = consumer.poll(left.min(Duration::from_millis(50)));
            self.apply_rebalance(consumer, log, tasks)?;
            let m = match polled {
                Some(Ok(m)) => m,
                Some(Err(KafkaError::PartitionEOF(_))) | None => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "fleet consumer error");
                    continue;
                }
            };
            let Some(stage) = self.stage_of(m.topic()) else { continue };
            let record = kafka::input_record(&m);
            match tasks.get_mut(&(stage, m.partition())) {
                Some(a) => {
                    a.pending.push(record);
                    collected += 1;
                }
                None => {
                    tracing::warn!(partition = m.partition(), "fleet record without a task; it will be redelivered")
                }
            }
        }
        Ok(())
    }

    fn apply_rebalance(
        &self,
        consumer: &Arc<BaseConsumer<GroupContext>>,
        log: &RebalanceLog,
        tasks: &mut BTreeMap<(Stage, i32), Assigned>,
    ) -> Result<(), ProcessError> {
        for event in log.drain() {
            match event {
                RebalanceEvent::Revoked(partitions) => {
                    for (topic, p) in partitions {
                        let Some(stage) = self.stage_of(&topic) else { continue };
                        if let Some(assigned) = tasks.remove(&(stage, p)) {
                            close(assigned);
                        }
                    }
                }
                RebalanceEvent::Assigned(partitions) => {
                    for (topic, p) in partitions {
                        let Some(stage) = self.stage_of(&topic) else { continue };
                        if let std::collections::btree_map::Entry::Vacant(slot) = tasks.entry((stage, p)) {
                            slot.insert(self.open_task(consumer, stage, &topic, p)?);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Fences earlier owners, restores the stage's store from its changelog, opens the task.
    fn open_task(
        &self,
        consumer: &Arc<BaseConsumer<GroupContext>>,
        stage: Stage,
        topic: &str,
        partition: i32,
    ) -> Result<Assigned, ProcessError> {
        let cfg = self.clients.stream();
        let store_name = match stage {
            Stage::Fingerprints => FLEET_FINGERPRINTS,
            Stage::Fleets => FLEET_CANDIDATES,
        };
        let changelog = cfg.changelog_topic(store_name);
        let topics = TaskTopics {
            input: topic.to_owned(),
            partition,
            changelog: changelog.clone(),
            transactional_id: cfg.stage_transactional_id(topic, partition),
        };
        let producer = self.clients.producer_for(topics, consumer)?;
        let committed = self.clients.committed(consumer, topic, partition)?;
        let dir = cfg.stage_dir(topic, partition);
        let recovered = recovery::recover(
            &self.clients,
            &self.resources,
            &dir,
            &changelog,
            partition,
            committed,
            |replayed, total| {
                tracing::info!(partition, replayed, total, "restoring a fleet stage from its changelog");
            },
        )?;
        let task = StageTask::open(stage, partition, recovered.store)
            .map_err(|source| ProcessError::Task { partition, source })?;
        tracing::info!(partition, ?stage, replayed = recovered.replayed, "fleet stage opened");
        Ok(Assigned { task, producer, pending: Vec::new() })
    }

    fn context<'a>(&'a self, source_topic: &'a str) -> StageContext<'a> {
        StageContext { cfg: &self.fleet, now_us: unix_now_us(), source_topic, model_version: &self.model_version }
    }

    /// Runs every task with records in hand, and the decision task when `decide` says so.
    fn run_batches(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        tasks: &mut BTreeMap<(Stage, i32), Assigned>,
        decide: bool,
        summary: &mut StagesSummary,
    ) -> Result<(), ProcessError> {
        for (&(stage, partition), assigned) in tasks.iter_mut() {
            if assigned.pending.is_empty() && !(decide && stage == Stage::Fleets) {
                continue;
            }
            let records = std::mem::take(&mut assigned.pending);
            let topic = self.topic_of(stage);
            let ctx = self.context(topic);
            assigned.producer.set_group(consumer.group_metadata());
            match assigned.task.run_batch(&ctx, &records, &mut assigned.producer) {
                Ok(outcome) => record_outcome(partition, &outcome, summary),
                Err(TaskError::Producer(ProducerError::Abortable(reason))) => {
                    summary.aborts += 1;
                    tracing::warn!(partition, ?stage, %reason, "fleet stage transaction aborted; rewinding");
                    let offset = assigned.task.checkpoint().input_offset.map_or(Offset::Beginning, Offset::Offset);
                    consumer
                        .seek(topic, partition, offset, kafka::BROKER_TIMEOUT)
                        .map_err(|error| KafkaEdgeError::Broker { what: "rewinding a fleet stage", error })?;
                }
                Err(source) => return Err(ProcessError::Task { partition, source }),
            }
        }
        Ok(())
    }

    fn expire(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        tasks: &mut BTreeMap<(Stage, i32), Assigned>,
    ) -> Result<(), ProcessError> {
        for (&(stage, partition), assigned) in tasks.iter_mut().filter(|((s, _), _)| *s == Stage::Fingerprints) {
            let ctx = self.context(self.topic_of(stage));
            assigned.producer.set_group(consumer.group_metadata());
            match assigned.task.expire(&ctx, &mut assigned.producer) {
                Ok(n) if n > 0 => tracing::info!(partition, expired = n, "fleet fingerprints expired"),
                Ok(_) => {}
                Err(TaskError::Producer(ProducerError::Abortable(reason))) => {
                    tracing::warn!(partition, %reason, "fleet expiry aborted; the next one retries");
                }
                Err(source) => return Err(ProcessError::Task { partition, source }),
            }
        }
        Ok(())
    }
}

fn record_outcome(partition: i32, outcome: &StageOutcome, summary: &mut StagesSummary) {
    for class in &outcome.dead_letters {
        tracing::warn!(partition, class = class.as_str(), "fleet record sent to the dead-letter topic");
    }
    if outcome.alerts > 0 {
        tracing::info!(partition, alerts = outcome.alerts, "fleet alerts committed");
    }
    if outcome.committed {
        let classes: Vec<&'static str> = outcome.dead_letters.iter().map(|c| c.as_str()).collect();
        FleetStageCommitted { alerts: outcome.alerts, dead_letters: &classes }.emit();
    }
    summary.records += outcome.records;
    summary.candidates += outcome.candidates;
    summary.alerts += outcome.alerts;
    summary.dead_letters += outcome.dead_letters.len() as u64;
}

fn close(assigned: Assigned) {
    if let Err(e) = assigned.task.store().flush() {
        tracing::warn!(error = %e, "flushing a fleet stage store failed; it will be replayed from the changelog");
    }
}

fn unix_now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}
