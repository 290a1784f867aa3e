//! The processing loop over its seams: collect a batch of records from the [`Input`], run the
//! tasks' batches (side by side on `stream.task_threads` threads), handle their outcomes
//! (commit counted, or abort and rewind), then the housekeeping between rounds; tasks opened
//! and closed as the group assigns and revokes partitions. Time comes from a [`Clock`], so
//! the unit tests decide when idleness, commit intervals and retention come due.
//!
//! One [`Engine::round`] is one batch: the unit tests drive rounds one at a time over the
//! in-memory broker twin (`super::twin`); [`Engine::run`] repeats them until shutdown.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metronome_core::clock::Clock;
use metronome_core::detect::{Detector, SequenceScorer};
use metronome_core::signing::{KeysReload, ReloadingKeys};
use metronome_core::wire::{InputRecord, Signatures};
use metronome_model::{Reload, ReloadingModel};
use metronome_state::Store;

use super::config::{PruneSchedule, StreamConfig};
use super::kafka::RebalanceEvent;
use super::processor::{ProcessError, RunSummary};
use super::query::{self, Lookup, UserQueries, UserView};
use super::seams::{Input, Polled, TaskFactory};
use super::status::{Status, TaskPhase};
use super::task::{self, BatchContext, BatchOutcome, BatchSettings, ProducerError, Task, TaskError, TaskProducer};
use crate::metrics::events::{
    AlertCommitted, BatchCommitted, InternalEvent, OpenWindowsCounted, StatePruned, StateRestored, TransactionAborted,
};
use tokio_util::sync::CancellationToken;

/// How often the RocksDB size gauges are refreshed.
const STORE_SIZES_EVERY: Duration = Duration::from_secs(5);
/// How often idle users are looked for when no records arrive.
const IDLE_CHECK_EVERY: Duration = Duration::from_millis(500);
/// The longest single poll while a batch is collected (rebalances are served between polls).
const POLL_SLICE: Duration = Duration::from_millis(50);

/// What scores the windows, and the files it reloads.
pub struct Scoring {
    /// The detection core.
    pub detector: Detector,
    /// The hot-reloadable sequence model, if any.
    pub model: Option<ReloadingModel>,
    /// The enrolled agents' keys, when signatures are checked.
    pub device_keys: Option<ReloadingKeys>,
    /// Wall-clock idleness that closes a user's window.
    pub idle_timeout: Duration,
    /// How often the model and key files are checked for changes.
    pub reload_every: Duration,
}

impl Scoring {
    fn reload(&mut self) {
        if let Some(model) = self.model.as_mut() {
            match model.reload_if_changed() {
                Ok(Reload::Unchanged) => {}
                Ok(Reload::Loaded { from, to }) => tracing::info!(%from, %to, "sequence model reloaded"),
                Err(e) => tracing::warn!(error = %e, "new sequence model refused; keeping the current one"),
            }
        }
        if let Some(keys) = self.device_keys.as_mut() {
            match keys.reload_if_changed() {
                Ok(KeysReload::Unchanged) => {}
                Ok(KeysReload::Loaded(keys)) => tracing::info!(keys, "device keys reloaded"),
                Err(e) => tracing::warn!(error = %e, "device key file refused; keeping the keys in use"),
            }
        }
    }
}

/// What the loop shares with the rest of the process.
pub struct Wiring {
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Task phases, for readiness.
    pub status: Arc<Status>,
    /// The question box of interactive user queries.
    pub queries: Arc<UserQueries>,
    /// This instance's name, in query answers.
    pub instance: String,
    /// The input topic's partitions, to route queries.
    pub partitions: i32,
    /// Tells the other instances which partitions this one owns.
    pub announce: Announce,
}

/// Tells the other instances which partitions this one owns (the directory topic).
pub type Announce = Box<dyn FnMut(&[i32])>;

/// A due task of this round, by partition.
type Due<'a, S, P> = (i32, &'a mut Assigned<S, P>);

struct Assigned<S, P> {
    task: Task<S>,
    producer: P,
    pending: Vec<InputRecord>,
    /// The input reported the end of the partition and no record came since.
    at_end: bool,
}

/// When the periodic work between rounds comes due.
struct Timers {
    last_reload: Instant,
    last_idle_check: Instant,
    last_sizes: Instant,
    prune: PruneSchedule,
    next_prune_s: i64,
}

/// The processing loop of one instance, over an input and a task factory.
pub struct Engine<I, F: TaskFactory> {
    cfg: StreamConfig,
    scoring: Scoring,
    input: I,
    factory: F,
    wiring: Wiring,
    tasks: BTreeMap<i32, Assigned<F::Store, F::Producer>>,
    summary: RunSummary,
    timers: Timers,
    announced: Vec<i32>,
}

impl<I: Input, F: TaskFactory> Engine<I, F> {
    /// A loop that starts answering queries and reporting itself started at once.
    pub fn new(
        cfg: StreamConfig,
        scoring: Scoring,
        input: I,
        factory: F,
        wiring: Wiring,
    ) -> Result<Self, ProcessError> {
        let prune = cfg.prune_schedule().map_err(ProcessError::Config)?;
        let now = wiring.clock.now();
        let timers = Timers {
            last_reload: now,
            last_idle_check: now,
            last_sizes: now,
            prune,
            next_prune_s: prune.next_after(wiring.clock.unix_s()),
        };
        wiring.status.set_started(true);
        wiring.queries.set_answering(true);
        let summary = RunSummary::default();
        Ok(Self {
            cfg,
            scoring,
            input,
            factory,
            wiring,
            tasks: BTreeMap::new(),
            summary,
            timers,
            announced: Vec::new(),
        })
    }

    /// Rounds until `shutdown` is cancelled, then the batch in hand is finished and the group left.
    pub fn run(mut self, shutdown: &CancellationToken) -> Result<RunSummary, ProcessError> {
        let outcome = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            if let Err(e) = self.round(shutdown) {
                break Err(e);
            }
        };
        self.finish(outcome)
    }

    /// One batch: records collected, the tasks' batches run and their outcomes handled, then
    /// the housekeeping.
    pub fn round(&mut self, shutdown: &CancellationToken) -> Result<(), ProcessError> {
        self.collect_batch(shutdown)?;
        let check_idle = self.idle_check_due();
        self.run_batches(check_idle)?;
        self.housekeeping()
    }

    /// Finishes the batch in hand (unless the loop failed), closes every task and leaves the
    /// group.
    pub fn finish(mut self, outcome: Result<(), ProcessError>) -> Result<RunSummary, ProcessError> {
        let finished = outcome.and_then(|()| self.run_batches(false));
        for (partition, assigned) in std::mem::take(&mut self.tasks) {
            self.close_task(partition, assigned);
        }
        self.wiring.status.set_started(false);
        self.wiring.queries.set_answering(false);
        (self.wiring.announce)(&[]);
        self.input.leave();
        let s = &self.summary;
        tracing::info!(
            records = s.records,
            events = s.events,
            alerts = s.alerts,
            dead_letters = s.dead_letters,
            commits = s.commits,
            aborts = s.aborts,
            "processor stopped"
        );
        finished.map(|()| self.summary)
    }

    /// Polls until the batch is full or the commit interval has passed, applying assignment
    /// changes as they come.
    fn collect_batch(&mut self, shutdown: &CancellationToken) -> Result<(), ProcessError> {
        let started = self.wiring.clock.now();
        let interval = Duration::from_millis(self.cfg.commit_interval_ms);
        let (mut records, mut bytes) = (0usize, 0usize);
        while records < self.cfg.max_batch_records && bytes < self.cfg.max_batch_bytes && !shutdown.is_cancelled() {
            let left = interval.saturating_sub(self.wiring.clock.now().saturating_duration_since(started));
            if left.is_zero() {
                break;
            }
            let polled = self.input.poll(left.min(POLL_SLICE));
            self.apply_rebalances()?;
            match polled {
                Polled::Record { partition, record } => match self.tasks.get_mut(&partition) {
                    Some(assigned) => {
                        bytes += record.payload.as_ref().map_or(0, Vec::len);
                        records += 1;
                        assigned.pending.push(record);
                        assigned.at_end = false;
                    }
                    None => tracing::warn!(partition, "record for a partition without a task; it will be redelivered"),
                },
                Polled::End { partition } => {
                    if let Some(assigned) = self.tasks.get_mut(&partition) {
                        assigned.at_end = true;
                    }
                }
                Polled::Nothing => {}
            }
        }
        Ok(())
    }

    /// Whether this round looks for idle users. Silence reads as idleness only in a task
    /// consumed to its end (`run_lane`): while it catches up, a user's next records may still be
    /// in its backlog. A user's records are all on one partition, so another partition's
    /// backlog says nothing about them.
    fn idle_check_due(&mut self) -> bool {
        let now = self.wiring.clock.now();
        let due =
            !self.tasks.is_empty() && now.saturating_duration_since(self.timers.last_idle_check) >= IDLE_CHECK_EVERY;
        if due {
            self.timers.last_idle_check = now;
        }
        due
    }

    /// Gauges, retention, announcements, queries and reloads between rounds.
    fn housekeeping(&mut self) -> Result<(), ProcessError> {
        OpenWindowsCounted { users: self.tasks.values().map(|a| a.task.open_users()).sum() }.emit();
        let clock = Arc::clone(&self.wiring.clock);
        if clock.unix_s() >= self.timers.next_prune_s {
            self.timers.next_prune_s = self.timers.prune.next_after(clock.unix_s());
            self.prune_stores()?;
        }
        let owned: Vec<i32> = self.tasks.keys().copied().collect();
        if owned != self.announced {
            (self.wiring.announce)(&owned);
            self.announced = owned;
        }
        self.answer_queries();
        let now = clock.now();
        if now.saturating_duration_since(self.timers.last_sizes) >= STORE_SIZES_EVERY {
            self.timers.last_sizes = now;
            self.factory.report_sizes(&mut self.tasks.values().map(|a| a.task.store()));
        }
        if now.saturating_duration_since(self.timers.last_reload) >= self.scoring.reload_every {
            self.timers.last_reload = now;
            self.scoring.reload();
        }
        Ok(())
    }

    fn apply_rebalances(&mut self) -> Result<(), ProcessError> {
        for event in self.input.rebalances() {
            match event {
                RebalanceEvent::Revoked(partitions) => {
                    for (_, partition) in partitions {
                        if let Some(assigned) = self.tasks.remove(&partition) {
                            // Records collected but not committed are redelivered to the new owner.
                            self.close_task(partition, assigned);
                        }
                    }
                }
                RebalanceEvent::Assigned(partitions) => {
                    for (_, partition) in partitions {
                        if !self.tasks.contains_key(&partition) {
                            let assigned = self.open_task(partition)?;
                            self.tasks.insert(partition, assigned);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens the task for `partition` from the factory (earlier owners fenced, the store
    /// consistent with the committed input position).
    fn open_task(&mut self, partition: i32) -> Result<Assigned<F::Store, F::Producer>, ProcessError> {
        let status = Arc::clone(&self.wiring.status);
        status.set(partition, TaskPhase::Restoring { replayed: 0, total: 0 });
        let started = self.wiring.clock.now();
        let opened = self.factory.open(partition, &mut |replayed, total| {
            status.set(partition, TaskPhase::Restoring { replayed, total });
            tracing::info!(partition, replayed, total, "restoring state from the changelog");
        })?;
        self.summary.restored += opened.replayed;
        StateRestored { records: opened.replayed }.emit();
        let task = Task::open(partition, opened.store, self.wiring.clock.now())
            .map_err(|source| ProcessError::Task { partition, source })?;
        tracing::info!(
            partition,
            replayed = opened.replayed,
            restore_ms = self.wiring.clock.now().saturating_duration_since(started).as_millis() as u64,
            open_users = task.open_users(),
            "task ready"
        );
        status.set(partition, TaskPhase::Running);
        Ok(Assigned { task, producer: opened.producer, pending: Vec::new(), at_end: false })
    }

    fn close_task(&mut self, partition: i32, assigned: Assigned<F::Store, F::Producer>) {
        self.wiring.status.remove(partition);
        self.factory.close(partition, assigned.task.into_store());
        tracing::info!(partition, "task closed");
    }

    /// Runs the batch of every task with records in hand (or idle users to close), then
    /// handles the outcomes in partition order.
    fn run_batches(&mut self, check_idle: bool) -> Result<(), ProcessError> {
        let keys = self.scoring.device_keys.as_ref();
        let settings =
            batch_settings(&self.cfg, keys, self.scoring.idle_timeout, self.wiring.clock.as_ref(), check_idle);
        let idle_timeout = self.scoring.idle_timeout;
        let due: Vec<Due<'_, F::Store, F::Producer>> = self
            .tasks
            .iter_mut()
            .filter(|(_, a)| {
                !a.pending.is_empty() || (check_idle && a.at_end && a.task.idle_due(settings.now, idle_timeout))
            })
            .map(|(&partition, assigned)| {
                self.factory.prepare(&mut assigned.producer);
                (partition, assigned)
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let threads = self.cfg.task_threads().min(due.len());
        let mut results = run_due(&mut self.scoring.detector, self.scoring.model.as_mut(), due, threads, &settings);
        results.sort_by_key(|(partition, _)| *partition);
        for (partition, result) in results {
            self.handle_outcome(partition, result)?;
        }
        Ok(())
    }

    /// Counts a committed batch, or rewinds its task to its checkpoint after an abort (the
    /// aborted records come again); any other failure stops the loop.
    fn handle_outcome(&mut self, partition: i32, result: Result<BatchOutcome, TaskError>) -> Result<(), ProcessError> {
        match result {
            Ok(outcome) => {
                log_batch_refusals(partition, &outcome);
                if outcome.committed {
                    emit_committed(&outcome, self.wiring.clock.unix_us());
                }
                let s = &mut self.summary;
                s.records += outcome.records;
                s.events += outcome.events;
                s.alerts += outcome.alerts;
                s.dead_letters += outcome.dead_letters.len() as u64;
                s.commits += u64::from(outcome.committed);
                Ok(())
            }
            Err(TaskError::Producer(ProducerError::Abortable(reason))) => {
                self.summary.aborts += 1;
                TransactionAborted { partition, reason: &reason }.emit();
                let Some(assigned) = self.tasks.get_mut(&partition) else { return Ok(()) };
                assigned.at_end = false;
                self.input.rewind(partition, assigned.task.checkpoint().input_offset)
            }
            Err(source) => Err(ProcessError::Task { partition, source }),
        }
    }

    /// Retention: every task drops the users idle for longer than `stream.state_retention_days`
    /// (changelog tombstones in a transaction, then the store, then a compaction). A pass that
    /// fails for a retryable reason changes nothing and waits for the next one.
    fn prune_stores(&mut self) -> Result<(), ProcessError> {
        let days = self.cfg.state_retention_days;
        if days == 0 {
            return Ok(());
        }
        let clock = Arc::clone(&self.wiring.clock);
        let cutoff_us = clock.unix_us() - i64::from(days) * 86_400_000_000;
        for (&partition, assigned) in self.tasks.iter_mut() {
            let started = clock.now();
            self.factory.prepare(&mut assigned.producer);
            let result = assigned.task.prune(&mut assigned.producer, cutoff_us);
            let event = |succeeded, users| StatePruned {
                succeeded,
                users,
                seconds: clock.now().saturating_duration_since(started).as_secs_f64(),
                at_unix_s: clock.unix_s(),
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

    /// Answers the user queries asked since the last round, from the owning task's store.
    fn answer_queries(&self) {
        for (user, reply) in self.wiring.queries.take() {
            let partition = query::partition_for(user.as_bytes(), self.wiring.partitions);
            let answer = match self.tasks.get(&partition) {
                None => Lookup::Elsewhere { partition },
                Some(assigned) => match assigned.task.user_state(&user) {
                    Ok(state) => Lookup::Owned(Box::new(UserView {
                        known: state.is_some(),
                        state: state.map(|s| s.summary()),
                        recent_windows: assigned.task.recent_scores(&user),
                        partition,
                        instance: self.wiring.instance.clone(),
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
}

/// What every task's batch of this round shares.
fn batch_settings<'a>(
    cfg: &'a StreamConfig,
    device_keys: Option<&'a ReloadingKeys>,
    idle_timeout: Duration,
    clock: &dyn Clock,
    close_idle: bool,
) -> BatchSettings<'a> {
    BatchSettings {
        idle_timeout,
        close_idle,
        max_events_per_record: cfg.max_events_per_record,
        rate_limit: cfg.rate_limit(),
        signatures: Signatures { keys: device_keys.map(ReloadingKeys::current), required: cfg.require_signed },
        max_open_users: cfg.max_open_users_per_task,
        max_batch_users: cfg.max_batch_users,
        time_bounds: cfg.time_bounds(),
        input_topic: &cfg.input_topic,
        now: clock.now(),
        now_us: clock.unix_us(),
    }
}

/// The metrics of a committed batch: counts, window scores and each alert's latency.
fn emit_committed(outcome: &BatchOutcome, now_us: i64) {
    let classes: Vec<&'static str> = outcome.dead_letters.iter().map(|c| c.as_str()).collect();
    let alerts: Vec<AlertCommitted> = outcome
        .alert_times
        .iter()
        .map(|(scorers, end_us)| AlertCommitted { scorers: scorers.clone(), latency_s: (now_us - end_us) as f64 / 1e6 })
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

type LaneResults = Vec<(i32, Result<BatchOutcome, TaskError>)>;

/// Runs the due tasks' batches on up to `threads` threads: tasks share nothing but the
/// read-only model plan, so each thread works its own tasks with its own detector and model
/// copy.
fn run_due<S: Store, P: TaskProducer + Send>(
    detector: &mut Detector,
    model: Option<&mut ReloadingModel>,
    mut due: Vec<Due<'_, S, P>>,
    threads: usize,
    settings: &BatchSettings<'_>,
) -> LaneResults {
    if threads <= 1 {
        let model = model.map(|m| m as &mut dyn SequenceScorer);
        let mut due = due.into_iter();
        return run_lane(detector, model, || due.next(), settings);
    }
    // Largest batch first, each thread taking the next task when it is done with one:
    // partitions differ in size, and a fixed split leaves a thread idle at the end.
    due.sort_by_key(|(_, a)| std::cmp::Reverse(a.pending.len()));
    let queue = Mutex::new(due.into_iter());
    let next = || queue.lock().unwrap_or_else(|p| p.into_inner()).next();
    let (detector, model) = (&*detector, model.map(|m| m.current()));
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (mut detector, mut model) = (detector.clone(), model.cloned());
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
}

/// Runs the batches of the tasks `next` hands out, one after another, with one detector and
/// model.
fn run_lane<'a, S: Store + 'a, P: TaskProducer + 'a>(
    detector: &mut Detector,
    mut model: Option<&mut (dyn SequenceScorer + 'static)>,
    mut next: impl FnMut() -> Option<(i32, &'a mut Assigned<S, P>)>,
    settings: &BatchSettings<'_>,
) -> LaneResults {
    let mut results = Vec::new();
    while let Some((partition, assigned)) = next() {
        let model: Option<&mut dyn SequenceScorer> = match &mut model {
            Some(m) => Some(&mut **m),
            None => None,
        };
        // Idle close per task, once it is consumed to its end.
        let settings = BatchSettings { close_idle: settings.close_idle && assigned.at_end, ..*settings };
        let mut ctx = BatchContext { detector: &mut *detector, model, settings };
        run_task_parts(partition, assigned, &mut ctx, &mut results);
    }
    results
}

/// One task's records in parts of a bounded number of users, each its own transaction; after
/// the records, more empty parts while idle windows are left to close (each closes a bounded
/// number). Stops at the first failure: the rest of its records come again after the rewind.
fn run_task_parts<S: Store, P: TaskProducer>(
    partition: i32,
    assigned: &mut Assigned<S, P>,
    ctx: &mut BatchContext<'_>,
    results: &mut LaneResults,
) {
    let records = std::mem::take(&mut assigned.pending);
    let settings = ctx.settings;
    let mut parts = task::parts(&records, settings.max_batch_users).into_iter();
    loop {
        let more_records = parts.len() > 1;
        let part = parts.next().unwrap_or_default();
        let result = assigned.task.run_batch(ctx, part, &mut assigned.producer);
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

#[cfg(test)]
mod tests {
    use metronome_core::detect::DetectorConfig;
    use metronome_core::proto;
    use metronome_core::wire::OutTopic;
    use prost::Message as _;

    use super::*;
    use crate::stream::task::twin::macro_records;
    use crate::stream::twin::{assigned, revoked, BrokerState, MemoryBroker, MemoryInput, MemoryTasks};

    /// The twin's clock starts 20 s after the test records' first event.
    const START_US: i64 = 1_700_000_020_000_000;
    const IDLE: Duration = Duration::from_secs(10);

    type TwinEngine = Engine<MemoryInput, MemoryTasks>;

    fn settings(threads: usize, max_batch_records: usize) -> StreamConfig {
        StreamConfig { task_threads: threads, max_batch_records, state_retention_days: 0, ..StreamConfig::default() }
    }

    fn engine(broker: &MemoryBroker, cfg: StreamConfig) -> TwinEngine {
        let scoring = Scoring {
            detector: Detector::new(DetectorConfig::default()).unwrap(),
            model: None,
            device_keys: None,
            idle_timeout: IDLE,
            reload_every: Duration::from_secs(3_600),
        };
        let wiring = Wiring {
            clock: broker.clock.clone(),
            status: Arc::default(),
            queries: Arc::default(),
            instance: "twin".into(),
            partitions: 4,
            announce: Box::new(|_| {}),
        };
        Engine::new(cfg, scoring, broker.input(), broker.tasks(), wiring).unwrap()
    }

    /// Rounds until `done` holds of the broker; fails the test past 100 rounds.
    fn rounds_until(engine: &mut TwinEngine, broker: &MemoryBroker, done: impl Fn(&BrokerState) -> bool) -> usize {
        let shutdown = CancellationToken::new();
        for round in 1..=100 {
            engine.round(&shutdown).unwrap();
            if done(&broker.state()) {
                return round;
            }
        }
        panic!("not done after 100 rounds");
    }

    fn committed_all(broker: &MemoryBroker, partitions: &[i32]) -> impl Fn(&BrokerState) -> bool {
        let ends: Vec<(i32, i64)> =
            partitions.iter().map(|p| (*p, broker.state().input.get(p).map_or(0, Vec::len) as i64)).collect();
        move |s: &BrokerState| ends.iter().all(|(p, end)| s.committed.get(p) == Some(end))
    }

    /// The committed alerts' users, in commit order.
    fn alerted(broker: &MemoryBroker) -> Vec<String> {
        broker
            .committed_output(OutTopic::Alerts)
            .iter()
            .map(|r| proto::Alert::decode(r.value.as_deref().unwrap()).unwrap().user_id)
            .collect()
    }

    fn window_open(engine: &TwinEngine, partition: i32, user: &str) -> bool {
        engine.tasks[&partition].task.user_state(user).unwrap().is_some_and(|s| s.has_open_window())
    }

    #[test]
    fn every_partitions_records_are_committed_once_with_one_alert_per_macro_user_on_one_thread_or_two() {
        for threads in [1, 2] {
            let broker = MemoryBroker::new(START_US);
            for p in 0..4 {
                broker.produce(p, macro_records(&format!("m{p}"), 0, 120));
            }
            broker.at_poll(1, assigned(&[0, 1, 2, 3]));
            let mut engine = engine(&broker, settings(threads, 50_000));
            rounds_until(&mut engine, &broker, committed_all(&broker, &[0, 1, 2, 3]));
            let mut users = alerted(&broker);
            users.sort();
            assert_eq!(users, ["m0", "m1", "m2", "m3"], "{threads} threads");
            for p in 0..4 {
                let task = &engine.tasks[&p].task;
                let logged = broker.state().changelog[&p].len() as i64;
                assert_eq!(task.checkpoint().changelog_offset, logged, "the checkpoint follows the changelog");
                assert_eq!(task.checkpoint().input_offset, Some(6));
            }
            assert_eq!((engine.summary.records, engine.summary.alerts, engine.summary.aborts), (24, 4, 0));
        }
    }

    #[test]
    fn an_aborted_commit_rewinds_its_task_to_the_checkpoint_and_nothing_is_lost_or_counted_twice() {
        let broker = MemoryBroker::new(START_US);
        let records = macro_records("m1", 0, 120);
        let n = records.len() as i64;
        broker.produce(0, records);
        broker.at_poll(1, assigned(&[0]));
        // Batches of two records; the second commit fails.
        broker.state().abortable_commits.insert(2);
        let mut engine = engine(&broker, settings(1, 2));
        rounds_until(&mut engine, &broker, committed_all(&broker, &[0]));
        let state = broker.state();
        assert_eq!(state.rewinds, [(0, Some(2))], "back to the first commit's position");
        assert_eq!(state.aborts, 1);
        let positions: Vec<i64> = state.commits.iter().map(|(_, at)| *at).collect();
        assert_eq!(positions, [2, 4, 6], "each record committed in exactly one transaction");
        assert_eq!(state.changelog[&0].len(), 3, "the aborted batch's state never reached the changelog");
        drop(state);
        assert_eq!(alerted(&broker), ["m1"]);
        assert_eq!((engine.summary.records, engine.summary.aborts, engine.summary.alerts), (n as u64, 1, 1));
        let stored = engine.tasks[&0].task.user_state("m1").unwrap().unwrap();
        assert_eq!(stored.policy().alerts_raised(), 1);
    }

    #[test]
    fn an_abort_before_any_commit_rewinds_to_the_partitions_start() {
        let broker = MemoryBroker::new(START_US);
        broker.produce(0, macro_records("m1", 0, 120));
        broker.at_poll(1, assigned(&[0]));
        broker.state().abortable_commits.insert(1);
        let mut engine = engine(&broker, settings(1, 50_000));
        rounds_until(&mut engine, &broker, committed_all(&broker, &[0]));
        assert_eq!(broker.state().rewinds, [(0, None)]);
        assert_eq!(alerted(&broker), ["m1"]);
    }

    #[test]
    fn a_fatal_commit_stops_the_loop_with_its_partition() {
        let broker = MemoryBroker::new(START_US);
        broker.produce(1, macro_records("m1", 0, 40));
        broker.at_poll(1, assigned(&[1]));
        broker.state().fatal_commits.insert(1);
        let mut engine = engine(&broker, settings(1, 50_000));
        let err = engine.round(&CancellationToken::new()).unwrap_err();
        assert!(matches!(
            err,
            ProcessError::Task { partition: 1, source: TaskError::Producer(ProducerError::Fatal(_)) }
        ));
        assert!(broker.state().rewinds.is_empty(), "no rewind: nothing a retry can fix");
        assert!(engine.finish(Err(err)).is_err());
        assert!(broker.state().positions.is_empty(), "the group is left even after a failure");
    }

    #[test]
    fn idle_windows_close_only_once_the_task_has_read_its_partition_to_the_end() {
        let broker = MemoryBroker::new(START_US);
        // m1 types 35 presses (scored at 30, 5 left in the open window) and stops; m2's long
        // backlog follows on the same partition.
        let early = macro_records("m1", 0, 35);
        let backlog = macro_records("m2", 0, 200);
        let end = (early.len() + backlog.len()) as i64;
        broker.produce(0, early);
        broker.produce(0, backlog);
        broker.at_poll(1, assigned(&[0]));
        let mut engine = engine(&broker, settings(1, 1));
        let shutdown = CancellationToken::new();
        let mut rounds_at_end = 0;
        while rounds_at_end < 2 {
            // Each round, more than the idle timeout passes: m1 is quiet long enough.
            broker.clock.advance(IDLE + Duration::from_secs(1));
            engine.round(&shutdown).unwrap();
            let read = broker.state().positions[&0];
            if read < end || rounds_at_end == 0 {
                assert!(window_open(&engine, 0, "m1"), "silence while the backlog is read is not idleness");
            }
            if read == end {
                rounds_at_end += 1;
            }
        }
        assert!(!window_open(&engine, 0, "m1"), "closed once the partition was read to its end");
        assert!(!window_open(&engine, 0, "m2"));
        assert_eq!(engine.tasks[&0].task.open_users(), 0);
        assert_eq!(broker.state().committed[&0], end, "an idle close commits the same position");
    }

    #[test]
    fn a_partition_revoked_mid_batch_drops_its_uncommitted_records_and_its_next_owner_restores_and_gets_them() {
        let broker = MemoryBroker::new(START_US);
        let records = macro_records("m1", 0, 120);
        broker.produce(0, records);
        // Round 1 commits records 0-1 (polls 1-2); round 2 has record 2 in hand when the
        // partition is revoked (poll 4); it comes back at poll 7.
        broker.at_poll(1, assigned(&[0]));
        broker.at_poll(4, revoked(&[0]));
        broker.at_poll(7, assigned(&[0]));
        let mut engine = engine(&broker, settings(1, 2));
        let shutdown = CancellationToken::new();
        engine.round(&shutdown).unwrap();
        assert_eq!(broker.state().commits, [(0, 2)]);
        engine.round(&shutdown).unwrap();
        assert!(engine.tasks.is_empty(), "the revoked task is closed");
        assert_eq!(broker.state().commits, [(0, 2)], "the record in hand was not committed");
        // The partition's next owner has no local store: it restores from the changelog.
        broker.state().stores.clear();
        rounds_until(&mut engine, &broker, committed_all(&broker, &[0]));
        let state = broker.state();
        assert_eq!(state.opened, [0, 0]);
        assert_eq!(state.commits.first(), Some(&(0, 2)));
        assert_eq!(state.commits.get(1), Some(&(0, 4)), "the new owner starts at the committed position");
        drop(state);
        assert!(engine.summary.restored > 0, "the changelog was replayed");
        assert_eq!(alerted(&broker), ["m1"]);
        let stored = engine.tasks[&0].task.user_state("m1").unwrap().unwrap();
        assert_eq!(stored.policy().alerts_raised(), 1, "the restored state carried on, not restarted");
    }

    #[test]
    fn finishing_closes_every_task_keeps_its_store_and_leaves_the_group() {
        let broker = MemoryBroker::new(START_US);
        broker.produce(0, macro_records("m1", 0, 40));
        broker.produce(1, macro_records("m2", 0, 40));
        broker.at_poll(1, assigned(&[0, 1]));
        let mut engine = engine(&broker, settings(1, 50_000));
        let status = Arc::clone(&engine.wiring.status);
        rounds_until(&mut engine, &broker, committed_all(&broker, &[0, 1]));
        assert!(status.is_started());
        let summary = engine.finish(Ok(())).unwrap();
        assert_eq!(summary.records, 4);
        assert!(!status.is_started());
        assert!(status.tasks().is_empty());
        let state = broker.state();
        assert!(state.positions.is_empty(), "left the group");
        assert_eq!(state.stores.keys().copied().collect::<Vec<_>>(), [0, 1], "stores put away for the next open");
    }

    #[test]
    fn a_restart_over_the_kept_store_carries_on_where_the_first_instance_committed() {
        let broker = MemoryBroker::new(START_US);
        broker.produce(0, macro_records("m1", 0, 120));
        broker.at_poll(1, assigned(&[0]));
        // The first instance commits the first 40 presses (no alert yet: too few), then stops.
        let mut first = engine(&broker, settings(1, 2));
        rounds_until(&mut first, &broker, |s| s.committed.get(&0) == Some(&2));
        first.finish(Ok(())).unwrap();
        assert!(alerted(&broker).is_empty());
        // A second instance over the same disk.
        let polls = broker.state().polls;
        broker.at_poll(polls + 1, assigned(&[0]));
        let mut second = engine(&broker, settings(1, 2));
        rounds_until(&mut second, &broker, committed_all(&broker, &[0]));
        assert_eq!(second.summary.restored, 0, "the store was level with the changelog");
        let positions: Vec<i64> = broker.state().commits.iter().map(|(_, at)| *at).collect();
        assert_eq!(positions, [2, 4, 6]);
        assert_eq!(alerted(&broker), ["m1"]);
    }
}
