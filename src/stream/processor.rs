//! The processing loop: poll, route records to tasks, run the tasks' batches (side by side on
//! `stream.task_threads` threads), repeat; open and close tasks as the group assigns and revokes
//! partitions; stop cleanly when told.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metronome_state::{RocksResources, RocksStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::Offset;

use super::config::StreamConfig;
use super::directory::Announcer;
use super::kafka::{self, Clients, GroupContext, KafkaEdgeError, RebalanceEvent, RebalanceLog, TxProducer};
use super::query::{self, Lookup, UserQueries, UserView};
use super::recovery;
use super::status::{Status, TaskPhase};
use super::task::{self, BatchContext, BatchOutcome, BatchSettings, ProducerError, Task, TaskError};
use crate::metrics::events::{
    AlertCommitted, BatchCommitted, InternalEvent, OpenWindowsCounted, RocksDbSizes, StatePruned, StateRestored,
    TransactionAborted,
};
use metronome_core::detect::{Detector, SequenceScorer};
use metronome_core::signing::{KeysReload, ReloadingKeys};
use metronome_core::wire::{InputRecord, Signatures};
use metronome_model::{Reload, ReloadingModel};

/// How often the RocksDB size gauges are refreshed.
const STORE_SIZES_EVERY: Duration = Duration::from_secs(5);
/// How often idle users are looked for when no records arrive.
const IDLE_CHECK_EVERY: Duration = Duration::from_millis(500);

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

/// Asks a running processor to stop after its current batch. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    /// A signal nobody has raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises it.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// The flag itself, for loops that watch an `AtomicBool`.
    pub fn flag(&self) -> &AtomicBool {
        &self.0
    }

    /// Whether it was raised.
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
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

struct Assigned {
    task: Task<RocksStore>,
    producer: TxProducer,
    pending: Vec<InputRecord>,
    /// The consumer reported the end of the partition and no record came since.
    at_end: bool,
}

/// A stream processor instance.
pub struct Processor {
    clients: Clients,
    detector: Detector,
    model: Option<ReloadingModel>,
    reload_every: Duration,
    idle_timeout: Duration,
    resources: RocksResources,
    status: Arc<Status>,
    queries: Arc<UserQueries>,
    /// Where this instance's HTTP API is reachable, announced with its partitions.
    advertised_url: String,
    partitions: i32,
    /// The enrolled agents' keys (`stream.device_keys_file`), when signatures are checked;
    /// checked for changes with the model.
    device_keys: Option<ReloadingKeys>,
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
            detector,
            model,
            reload_every,
            idle_timeout,
            resources,
            status: Arc::new(Status::default()),
            queries: Arc::new(UserQueries::default()),
            advertised_url: String::new(),
            partitions: 0,
            device_keys,
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

    /// Consumes until `shutdown` is raised, then finishes the batch in hand, commits it and
    /// leaves the group.
    pub fn run(mut self, shutdown: &Shutdown) -> Result<RunSummary, ProcessError> {
        let cfg = self.clients.stream().clone();
        let partitions = self.clients.ensure_topics()?;
        self.partitions = partitions;
        let announcer = match Announcer::new(
            self.clients.properties(),
            &cfg.instances_topic(),
            self.clients.instance(),
            &self.advertised_url,
        ) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "no instance announcements: user queries cannot be redirected here");
                None
            }
        };
        let mut announced: Vec<i32> = Vec::new();
        tracing::info!(topic = %cfg.input_topic, partitions, group = %cfg.application_id, "processor starting");
        let log = Arc::new(RebalanceLog::default());
        let consumer = Arc::new(self.clients.consumer(Arc::clone(&log))?);
        consumer
            .subscribe(&[&cfg.input_topic])
            .map_err(|error| KafkaEdgeError::Broker { what: "subscribing to the input", error })?;
        self.status.set_started(true);
        self.queries.set_answering(true);

        let mut tasks: BTreeMap<i32, Assigned> = BTreeMap::new();
        let mut summary = RunSummary::default();
        let mut last_reload = Instant::now();
        let mut last_idle_check = Instant::now();
        let mut last_sizes = Instant::now();
        let commit_interval = Duration::from_millis(cfg.commit_interval_ms);
        let schedule = cfg.prune_schedule().map_err(ProcessError::Config)?;
        let mut next_prune_s = schedule.next_after(unix_now_s());
        let result = loop {
            if shutdown.is_triggered() {
                break Ok(());
            }
            // Collect one batch.
            let started = Instant::now();
            let (mut collected, mut collected_bytes) = (0usize, 0usize);
            let mut failed = None;
            while collected < cfg.max_batch_records && collected_bytes < cfg.max_batch_bytes && !shutdown.is_triggered()
            {
                let left = commit_interval.saturating_sub(started.elapsed());
                if left.is_zero() {
                    break;
                }
                let message = consumer.poll(left.min(Duration::from_millis(50)));
                let record = match message {
                    Some(Ok(m)) => Some((m.partition(), kafka::input_record(&m))),
                    Some(Err(KafkaError::PartitionEOF(partition))) => {
                        if let Some(a) = tasks.get_mut(&partition) {
                            a.at_end = true;
                        }
                        None
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        None
                    }
                    None => None,
                };
                if let Err(e) = self.apply_rebalance(&consumer, &log, &mut tasks, &mut summary) {
                    failed = Some(e);
                    break;
                }
                if let Some((partition, record)) = record {
                    match tasks.get_mut(&partition) {
                        Some(a) => {
                            collected_bytes += record.payload.as_ref().map_or(0, Vec::len);
                            a.pending.push(record);
                            a.at_end = false;
                            collected += 1;
                        }
                        None => {
                            tracing::warn!(partition, "record for a partition without a task; it will be redelivered")
                        }
                    }
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
            // Silence reads as idleness only in a task consumed to its end (`run_lane`): while it
            // catches up, a user's next records may still be in its backlog. A user's records are
            // all on one partition, so another partition's backlog says nothing about them.
            let now = Instant::now();
            let check_idle = !tasks.is_empty() && now.duration_since(last_idle_check) >= IDLE_CHECK_EVERY;
            if check_idle {
                last_idle_check = now;
            }
            if let Err(e) = self.run_batches(&consumer, &mut tasks, check_idle, &mut summary) {
                break Err(e);
            }
            OpenWindowsCounted { users: tasks.values().map(|a| a.task.open_users()).sum() }.emit();
            if unix_now_s() >= next_prune_s {
                next_prune_s = schedule.next_after(unix_now_s());
                if let Err(e) = self.prune_stores(&consumer, &mut tasks) {
                    break Err(e);
                }
            }
            let owned: Vec<i32> = tasks.keys().copied().collect();
            if owned != announced {
                if let Some(a) = &announcer {
                    a.announce(&owned);
                }
                announced = owned;
            }
            self.answer_queries(&tasks);
            if last_sizes.elapsed() >= STORE_SIZES_EVERY {
                last_sizes = Instant::now();
                self.report_store_sizes(&tasks);
            }
            if last_reload.elapsed() >= self.reload_every {
                last_reload = Instant::now();
                self.reload_model();
                self.reload_device_keys();
            }
        };
        // Finish the batch in hand (records already collected), then close.
        let finished = match result {
            Ok(()) => self.run_batches(&consumer, &mut tasks, false, &mut summary),
            Err(e) => Err(e),
        };
        for (partition, assigned) in std::mem::take(&mut tasks) {
            close_task(partition, assigned, &self.status);
        }
        self.status.set_started(false);
        self.queries.set_answering(false);
        if let Some(a) = &announcer {
            a.announce(&[]);
        }
        consumer.unsubscribe();
        // Serve the revocation the unsubscribe triggers, so the group rebalances right away.
        let _ = consumer.poll(Duration::from_millis(100));
        log.drain();
        tracing::info!(
            records = summary.records,
            events = summary.events,
            alerts = summary.alerts,
            dead_letters = summary.dead_letters,
            commits = summary.commits,
            aborts = summary.aborts,
            "processor stopped"
        );
        finished.map(|()| summary)
    }

    /// Answers the user queries asked since the last round, from the owning task's store.
    fn answer_queries(&self, tasks: &BTreeMap<i32, Assigned>) {
        for (user, reply) in self.queries.take() {
            let partition = query::partition_for(user.as_bytes(), self.partitions);
            let answer = match tasks.get(&partition) {
                None => Lookup::Elsewhere { partition },
                Some(assigned) => match assigned.task.user_state(&user) {
                    Ok(state) => Lookup::Owned(Box::new(UserView {
                        known: state.is_some(),
                        state: state.map(|s| s.summary()),
                        recent_windows: assigned.task.recent_scores(&user),
                        partition,
                        instance: self.clients.instance().to_owned(),
                        user_id: user,
                    })),
                    Err(e) => {
                        tracing::warn!(partition, error = %e, "user query: state unreadable");
                        Lookup::Unavailable
                    }
                },
            };
            let _ = reply.send(answer);
        }
    }

    fn report_store_sizes(&self, tasks: &BTreeMap<i32, Assigned>) {
        let mut sizes = RocksDbSizes { block_cache: self.resources.cache_usage_bytes() as u64, ..Default::default() };
        for assigned in tasks.values() {
            let store = assigned.task.store();
            let read = |name: &str| store.property(name).ok().flatten().unwrap_or(0);
            sizes.memtables += read("rocksdb.cur-size-all-mem-tables");
            sizes.table_readers += read("rocksdb.estimate-table-readers-mem");
            sizes.sst_files += read("rocksdb.total-sst-files-size");
            sizes.live_data += read("rocksdb.estimate-live-data-size");
        }
        sizes.emit();
    }

    /// Retention: every task drops the users idle for longer than `stream.state_retention_days`
    /// (changelog tombstones in a transaction, then the store, then a compaction). A pass that
    /// fails for a retryable reason changes nothing and waits for the next one.
    fn prune_stores(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        tasks: &mut BTreeMap<i32, Assigned>,
    ) -> Result<(), ProcessError> {
        let days = self.clients.stream().state_retention_days;
        if days == 0 {
            return Ok(());
        }
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let cutoff_us = now_us - i64::from(days) * 86_400_000_000;
        for (&partition, assigned) in tasks.iter_mut() {
            let started = Instant::now();
            assigned.producer.set_group(consumer.group_metadata());
            let result = assigned.task.prune(&mut assigned.producer, cutoff_us);
            let event = |succeeded, users| StatePruned {
                succeeded,
                users,
                seconds: started.elapsed().as_secs_f64(),
                at_unix_s: unix_now_s(),
            };
            match result {
                Ok(outcome) => {
                    event(true, outcome.users).emit();
                    tracing::info!(partition, pruned = outcome.users, kept = outcome.kept, "retention pass");
                }
                Err(TaskError::Producer(ProducerError::Abortable(reason))) => {
                    event(false, 0).emit();
                    tracing::warn!(partition, %reason, "retention pass aborted; the next one retries");
                }
                Err(source) => {
                    event(false, 0).emit();
                    return Err(ProcessError::Task { partition, source });
                }
            }
        }
        Ok(())
    }

    fn reload_model(&mut self) {
        if let Some(model) = self.model.as_mut() {
            match model.reload_if_changed() {
                Ok(Reload::Unchanged) => {}
                Ok(Reload::Loaded { from, to }) => tracing::info!(%from, %to, "sequence model reloaded"),
                Err(e) => tracing::warn!(error = %e, "new sequence model refused; keeping the current one"),
            }
        }
    }

    fn reload_device_keys(&mut self) {
        if let Some(keys) = self.device_keys.as_mut() {
            match keys.reload_if_changed() {
                Ok(KeysReload::Unchanged) => {}
                Ok(KeysReload::Loaded(keys)) => tracing::info!(keys, "device keys reloaded"),
                Err(e) => tracing::warn!(error = %e, "device key file refused; keeping the keys in use"),
            }
        }
    }

    fn apply_rebalance(
        &mut self,
        consumer: &Arc<BaseConsumer<GroupContext>>,
        log: &RebalanceLog,
        tasks: &mut BTreeMap<i32, Assigned>,
        summary: &mut RunSummary,
    ) -> Result<(), ProcessError> {
        for event in log.drain() {
            match event {
                RebalanceEvent::Revoked(partitions) => {
                    for (_, p) in partitions {
                        if let Some(assigned) = tasks.remove(&p) {
                            // Records collected but not committed are redelivered to the new owner.
                            close_task(p, assigned, &self.status);
                        }
                    }
                }
                RebalanceEvent::Assigned(partitions) => {
                    for (_, p) in partitions {
                        if tasks.contains_key(&p) {
                            continue;
                        }
                        let assigned = self.open_task(consumer, p, summary)?;
                        tasks.insert(p, assigned);
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens the task for `partition`: fence earlier owners, make the store consistent with the
    /// committed input position, and start from there.
    fn open_task(
        &mut self,
        consumer: &Arc<BaseConsumer<GroupContext>>,
        partition: i32,
        summary: &mut RunSummary,
    ) -> Result<Assigned, ProcessError> {
        let cfg = self.clients.stream();
        self.status.set(partition, TaskPhase::Restoring { replayed: 0, total: 0 });
        // First: this aborts whatever transaction a previous owner left open, so the committed
        // offsets and the changelog's committed end below cannot move under us.
        let producer = self.clients.task_producer(partition, consumer)?;
        let committed = self.clients.committed(consumer, &cfg.input_topic, partition)?;
        let status = Arc::clone(&self.status);
        let started = Instant::now();
        let changelog = cfg.changelog_topic(super::config::USER_STATE_STORE);
        let recovered = recovery::recover(
            &self.clients,
            &self.resources,
            &cfg.task_dir(partition),
            &changelog,
            partition,
            committed,
            |replayed, total| {
                status.set(partition, TaskPhase::Restoring { replayed, total });
                tracing::info!(partition, replayed, total, "restoring state from the changelog");
            },
        )?;
        let (store, replayed) = (recovered.store, recovered.replayed);
        summary.restored += replayed;
        StateRestored { records: replayed }.emit();
        let task_err = |source: TaskError| ProcessError::Task { partition, source };
        let task = Task::open(partition, store, Instant::now()).map_err(task_err)?;
        tracing::info!(
            partition,
            replayed,
            restore_ms = started.elapsed().as_millis() as u64,
            open_users = task.open_users(),
            "task ready"
        );
        self.status.set(partition, TaskPhase::Running);
        Ok(Assigned { task, producer, pending: Vec::new(), at_end: false })
    }

    /// Runs the batch of every task with records in hand (or idle users to close), on up to
    /// `task_threads` threads: tasks share nothing but the read-only model plan, so each thread
    /// works its own tasks with its own detector and model copy. Outcomes are then handled here,
    /// in partition order.
    fn run_batches(
        &mut self,
        consumer: &BaseConsumer<GroupContext>,
        tasks: &mut BTreeMap<i32, Assigned>,
        check_idle: bool,
        summary: &mut RunSummary,
    ) -> Result<(), ProcessError> {
        let cfg = self.clients.stream();
        let settings = BatchSettings {
            idle_timeout: self.idle_timeout,
            close_idle: check_idle,
            max_events_per_record: cfg.max_events_per_record,
            rate_limit: cfg.rate_limit(),
            signatures: Signatures {
                keys: self.device_keys.as_ref().map(ReloadingKeys::current),
                required: cfg.require_signed,
            },
            max_open_users: cfg.max_open_users_per_task,
            max_batch_users: cfg.max_batch_users,
            time_bounds: cfg.time_bounds(),
            input_topic: &cfg.input_topic,
            now: Instant::now(),
            now_us: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64),
        };
        let due: Vec<(i32, &mut Assigned)> = tasks
            .iter_mut()
            .filter(|(_, a)| {
                !a.pending.is_empty() || (check_idle && a.at_end && a.task.idle_due(settings.now, self.idle_timeout))
            })
            .map(|(&p, a)| {
                a.producer.set_group(consumer.group_metadata());
                (p, a)
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let threads = cfg.task_threads().min(due.len());
        let mut results = if threads <= 1 {
            let model = self.model.as_mut().map(|m| m as &mut dyn SequenceScorer);
            let mut due = due.into_iter();
            run_lane(&mut self.detector, model, || due.next(), &settings)
        } else {
            // Largest batch first, each thread taking the next task when it is done with one:
            // partitions differ in size, and a fixed split leaves a thread idle at the end.
            let mut due = due;
            due.sort_by_key(|(_, a)| std::cmp::Reverse(a.pending.len()));
            let queue = Mutex::new(due.into_iter());
            let next = || queue.lock().unwrap_or_else(|p| p.into_inner()).next();
            let (detector, model) = (&self.detector, self.model.as_ref().map(ReloadingModel::current));
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..threads)
                    .map(|_| {
                        let (mut detector, mut model, settings) = (detector.clone(), model.cloned(), &settings);
                        scope.spawn(move || {
                            let model = model.as_mut().map(|m| m as &mut dyn SequenceScorer);
                            run_lane(&mut detector, model, next, settings)
                        })
                    })
                    .collect();
                let mut results = Vec::new();
                for worker in workers {
                    match worker.join() {
                        Ok(lane) => results.extend(lane),
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                }
                results
            })
        };
        results.sort_by_key(|(partition, _)| *partition);
        for (partition, result) in results {
            match result {
                Ok(outcome) => {
                    log_batch_refusals(partition, &outcome);
                    if outcome.committed {
                        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
                        let classes: Vec<&'static str> = outcome.dead_letters.iter().map(|c| c.as_str()).collect();
                        let alerts: Vec<AlertCommitted> = outcome
                            .alert_times
                            .iter()
                            .map(|(scorers, end_us)| AlertCommitted {
                                scorers: scorers.clone(),
                                latency_s: (now_us - end_us) as f64 / 1e6,
                            })
                            .collect();
                        BatchCommitted {
                            records: outcome.records,
                            events: outcome.events,
                            dead_letters: &classes,
                            rebased_records: outcome.rebased_records,
                            out_of_bounds_events: outcome.out_of_bounds_events,
                            duplicate_events: outcome.duplicate_events,
                            key_sums_refused: outcome.key_sums_refused,
                            seq_gap_events: outcome.seq_gap_events,
                            late_fill_events: outcome.late_fill_events,
                            rate_limited_events: outcome.rate_limited_events,
                            evicted_users: outcome.evicted_users,
                            windows: &outcome.window_scores,
                            alerts: &alerts,
                        }
                        .emit();
                    }
                    summary.records += outcome.records;
                    summary.events += outcome.events;
                    summary.alerts += outcome.alerts;
                    summary.dead_letters += outcome.dead_letters.len() as u64;
                    summary.commits += u64::from(outcome.committed);
                }
                Err(TaskError::Producer(ProducerError::Abortable(reason))) => {
                    summary.aborts += 1;
                    TransactionAborted { partition, reason: &reason }.emit();
                    let Some(assigned) = tasks.get_mut(&partition) else { continue };
                    let offset = match assigned.task.checkpoint().input_offset {
                        Some(o) => Offset::Offset(o),
                        None => Offset::Beginning,
                    };
                    assigned.at_end = false;
                    consumer
                        .seek(&cfg.input_topic, partition, offset, kafka::BROKER_TIMEOUT)
                        .map_err(|error| KafkaEdgeError::Broker { what: "rewinding after an abort", error })?;
                }
                Err(source) => return Err(ProcessError::Task { partition, source }),
            }
        }
        Ok(())
    }
}

/// What a batch set aside or changed in its input, as log lines with counts only (never a key,
/// an interval or a payload).
fn log_batch_refusals(partition: i32, outcome: &BatchOutcome) {
    if let Some(e) = &outcome.model_error {
        tracing::warn!(partition, error = %e, "sequence model failed; windows decided on timing alone");
    }
    for class in &outcome.dead_letters {
        tracing::warn!(partition, class = class.as_str(), "record sent to the dead-letter topic");
    }
    if outcome.out_of_bounds_events > 0 || outcome.rebased_records > 0 {
        tracing::warn!(
            partition,
            dropped = outcome.out_of_bounds_events,
            rebased = outcome.rebased_records,
            "event times too far from the reference clock (stream.max_event_lead_s, max_event_lag_s)"
        );
    }
    let counted = [
        (outcome.rate_limited_events, "events past their user's budget dropped (stream.max_user_events_per_s)"),
        (outcome.evicted_users, "open windows closed early (stream.max_open_users_per_task)"),
    ];
    for (count, what) in counted.into_iter().filter(|(n, _)| *n > 0) {
        tracing::warn!(partition, count, "{what}");
    }
    if outcome.duplicate_events > 0 {
        tracing::info!(partition, events = outcome.duplicate_events, "copies of delivered events dropped");
    }
}

fn unix_now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Runs the batches of the tasks `next` hands out, one after another, with one detector and
/// model.
fn run_lane<'a>(
    detector: &mut Detector,
    mut model: Option<&mut (dyn SequenceScorer + 'static)>,
    mut next: impl FnMut() -> Option<(i32, &'a mut Assigned)>,
    settings: &BatchSettings<'_>,
) -> Vec<(i32, Result<BatchOutcome, TaskError>)> {
    let mut results = Vec::new();
    while let Some((partition, assigned)) = next() {
        let records = std::mem::take(&mut assigned.pending);
        let model: Option<&mut dyn SequenceScorer> = match &mut model {
            Some(m) => Some(&mut **m),
            None => None,
        };
        // Idle close per task, once it is consumed to its end.
        let settings = BatchSettings { close_idle: settings.close_idle && assigned.at_end, ..*settings };
        let mut ctx = BatchContext { detector: &mut *detector, model, settings };
        // In parts of a bounded number of users, each its own transaction; after the records,
        // more empty parts while idle windows are left to close (each closes a bounded number).
        let mut parts = task::parts(&records, settings.max_batch_users).into_iter();
        loop {
            let more_records = parts.len() > 1;
            let part = parts.next().unwrap_or_default();
            let result = assigned.task.run_batch(&mut ctx, part, &mut assigned.producer);
            let closed_some = result.as_ref().is_ok_and(|o| o.idle_closed > 0);
            let failed = result.is_err();
            results.push((partition, result));
            let idle_left =
                settings.close_idle && closed_some && assigned.task.idle_due(settings.now, settings.idle_timeout);
            if failed || !(more_records || idle_left) {
                break;
            }
        }
    }
    results
}

fn close_task(partition: i32, assigned: Assigned, status: &Status) {
    status.remove(partition);
    if let Err(e) = assigned.task.store().flush() {
        tracing::warn!(partition, error = %e, "flushing the task store failed; it will be replayed from the changelog");
    }
    tracing::info!(partition, "task closed");
}
