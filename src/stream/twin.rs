//! The in-memory broker twin of the processor's seams, for the engine's unit tests: an input
//! topic's partitions with the group's positions and committed offsets, a changelog per
//! partition, the committed output, transactions that commit or abort as a test scripts them,
//! and assignment changes scheduled by poll number. Time is a [`ManualClock`] that an empty
//! poll moves on by its timeout, as a real wait would.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metronome_core::clock::ManualClock;
use metronome_core::wire::{InputRecord, OutRecord, OutTopic};
use metronome_state::{MemoryStore, StoreError};

use super::kafka::RebalanceEvent;
use super::processor::ProcessError;
use super::recovery::{self, ChangelogRecord, ChangelogSource, RecoveryError, StoreFactory};
use super::seams::{Input, OpenedTask, Polled, TaskFactory};
use super::task::twin::MemoryProducer;
use super::task::{ProducerError, TaskProducer};

/// A changelog record: key and value (a tombstone has none).
pub type LoggedRecord = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Everything the twin holds, open to the tests.
#[derive(Default)]
pub struct BrokerState {
    /// The input topic, per partition (a record's offset is its index).
    pub input: BTreeMap<i32, Vec<InputRecord>>,
    /// This member's assigned partitions and its position in each.
    pub positions: BTreeMap<i32, i64>,
    /// Partitions whose end was reported since their last record.
    pub ends_reported: BTreeSet<i32>,
    /// The group's committed offsets.
    pub committed: BTreeMap<i32, i64>,
    /// Each partition's changelog.
    pub changelog: BTreeMap<i32, Vec<LoggedRecord>>,
    /// Committed records of every other topic, in commit order.
    pub output: Vec<OutRecord>,
    /// Committed transactions: partition and the input position committed.
    pub commits: Vec<(i32, i64)>,
    /// Commit attempts so far (the 1st is 1).
    pub commit_attempts: u32,
    /// Commit attempts that fail as abortable.
    pub abortable_commits: BTreeSet<u32>,
    /// Commit attempts that fail as fatal (a fenced producer).
    pub fatal_commits: BTreeSet<u32>,
    /// Transactions aborted.
    pub aborts: u32,
    /// Rewinds asked for: partition and position.
    pub rewinds: Vec<(i32, Option<i64>)>,
    /// Stores kept between a task's close and its next open (the local disk).
    pub stores: BTreeMap<i32, MemoryStore>,
    /// Partitions whose task was opened, in order.
    pub opened: Vec<i32>,
    /// Producer generation per partition: opening a task fences the earlier producer.
    pub epochs: BTreeMap<i32, u64>,
    /// Polls so far.
    pub polls: u64,
    /// Assignment changes that happen at a poll number.
    pub scheduled: BTreeMap<u64, Vec<RebalanceEvent>>,
    /// Changes happened, not yet read by the loop.
    pending_rebalances: Vec<RebalanceEvent>,
}

impl BrokerState {
    fn apply(&mut self, event: &RebalanceEvent) {
        match event {
            RebalanceEvent::Assigned(partitions) => {
                for &(_, p) in partitions {
                    let from = self.committed.get(&p).copied().unwrap_or(0);
                    self.positions.insert(p, from);
                    self.ends_reported.remove(&p);
                }
            }
            RebalanceEvent::Revoked(partitions) => {
                for (_, p) in partitions {
                    self.positions.remove(p);
                }
            }
        }
    }

    /// The next record of an assigned partition, taking partitions in turn; or an end not yet
    /// reported.
    fn next_delivery(&mut self) -> Option<Polled> {
        let assigned: Vec<i32> = self.positions.keys().copied().collect();
        let start = self.polls as usize % assigned.len().max(1);
        for &partition in assigned.iter().cycle().skip(start).take(assigned.len()) {
            let position = self.positions[&partition];
            if let Some(record) = self.input.get(&partition).and_then(|r| r.get(position as usize)) {
                let record = record.clone();
                self.positions.insert(partition, position + 1);
                self.ends_reported.remove(&partition);
                return Some(Polled::Record { partition, record });
            }
        }
        let unreported = assigned.into_iter().find(|p| !self.ends_reported.contains(p))?;
        self.ends_reported.insert(unreported);
        Some(Polled::End { partition: unreported })
    }
}

/// The twin: shared state and its clock. Clones share both.
#[derive(Clone)]
pub struct MemoryBroker {
    state: Arc<Mutex<BrokerState>>,
    /// The clock the engine under test reads.
    pub clock: Arc<ManualClock>,
}

/// The input topic's name in the twin's assignment events.
pub const TOPIC: &str = "keys.events";

impl MemoryBroker {
    /// An empty broker whose clock starts at `unix_us`.
    pub fn new(unix_us: i64) -> Self {
        Self { state: Arc::default(), clock: Arc::new(ManualClock::starting_at(unix_us)) }
    }

    /// The state, for a test to script or inspect.
    pub fn state(&self) -> MutexGuard<'_, BrokerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `records` to `partition` of the input (offsets renumbered to their place).
    pub fn produce(&self, partition: i32, records: Vec<InputRecord>) {
        let mut state = self.state();
        let log = state.input.entry(partition).or_default();
        for mut record in records {
            record.offset = log.len() as i64;
            log.push(record);
        }
    }

    /// Schedules an assignment change at poll number `poll`.
    pub fn at_poll(&self, poll: u64, event: RebalanceEvent) {
        self.state().scheduled.entry(poll).or_default().push(event);
    }

    /// The input seam.
    pub fn input(&self) -> MemoryInput {
        MemoryInput(self.clone())
    }

    /// The task factory seam.
    pub fn tasks(&self) -> MemoryTasks {
        MemoryTasks(self.clone())
    }

    /// Committed records of `topic`.
    pub fn committed_output(&self, topic: OutTopic) -> Vec<OutRecord> {
        self.state().output.iter().filter(|r| r.topic == topic).cloned().collect()
    }
}

/// An assignment of input partitions, as the group reports it.
pub fn assigned(partitions: &[i32]) -> RebalanceEvent {
    RebalanceEvent::Assigned(partitions.iter().map(|&p| (TOPIC.to_owned(), p)).collect())
}

/// A revocation of input partitions.
pub fn revoked(partitions: &[i32]) -> RebalanceEvent {
    RebalanceEvent::Revoked(partitions.iter().map(|&p| (TOPIC.to_owned(), p)).collect())
}

/// The twin as the loop's input.
pub struct MemoryInput(MemoryBroker);

impl Input for MemoryInput {
    fn poll(&mut self, timeout: Duration) -> Polled {
        let mut state = self.0.state();
        state.polls += 1;
        let polls = state.polls;
        for event in state.scheduled.remove(&polls).unwrap_or_default() {
            state.apply(&event);
            state.pending_rebalances.push(event);
        }
        match state.next_delivery() {
            Some(delivery) => delivery,
            None => {
                self.0.clock.advance(timeout);
                Polled::Nothing
            }
        }
    }

    fn rebalances(&mut self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut self.0.state().pending_rebalances)
    }

    fn rewind(&mut self, partition: i32, to: Option<i64>) -> Result<(), ProcessError> {
        let mut state = self.0.state();
        state.rewinds.push((partition, to));
        state.ends_reported.remove(&partition);
        if let Some(position) = state.positions.get_mut(&partition) {
            *position = to.unwrap_or(0);
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.0.state().positions.clear();
    }
}

/// The twin as the loop's task factory: stores in memory, restored from the twin's changelog.
pub struct MemoryTasks(MemoryBroker);

impl TaskFactory for MemoryTasks {
    type Store = MemoryStore;
    type Producer = MemoryTxProducer;

    fn open(
        &mut self,
        partition: i32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<OpenedTask<MemoryStore, MemoryTxProducer>, ProcessError> {
        let (committed, epoch) = {
            let mut state = self.0.state();
            state.opened.push(partition);
            let epoch = state.epochs.entry(partition).or_default();
            *epoch += 1;
            let epoch = *epoch;
            (state.committed.get(&partition).copied(), epoch)
        };
        let disk = DiskStore { broker: &self.0, partition };
        let mut changelog = TwinChangelog { broker: &self.0, partition };
        let restored =
            recovery::restore(&disk, &mut changelog, committed, progress).map_err(|e| e.for_partition(partition))?;
        let producer = MemoryTxProducer { broker: self.0.clone(), partition, epoch, open: MemoryProducer::default() };
        Ok(OpenedTask { store: restored.store, producer, replayed: restored.replayed })
    }

    fn prepare(&self, _: &mut MemoryTxProducer) {}

    fn close(&mut self, partition: i32, store: MemoryStore) {
        self.0.state().stores.insert(partition, store);
    }

    fn report_sizes(&self, _: &mut dyn Iterator<Item = &MemoryStore>) {}
}

/// A partition's store on the twin's "disk".
struct DiskStore<'a> {
    broker: &'a MemoryBroker,
    partition: i32,
}

impl StoreFactory for DiskStore<'_> {
    type Store = MemoryStore;

    fn open(&self) -> Result<MemoryStore, StoreError> {
        Ok(self.broker.state().stores.get(&self.partition).cloned().unwrap_or_default())
    }

    fn destroy(&self) -> Result<(), StoreError> {
        self.broker.state().stores.remove(&self.partition);
        Ok(())
    }
}

/// A partition's changelog in the twin (offsets are indices; no commit markers).
struct TwinChangelog<'a> {
    broker: &'a MemoryBroker,
    partition: i32,
}

impl ChangelogSource for TwinChangelog<'_> {
    fn watermarks(&mut self) -> Result<(i64, i64), RecoveryError> {
        Ok((0, self.broker.state().changelog.get(&self.partition).map_or(0, Vec::len) as i64))
    }

    fn replay(
        &mut self,
        from: i64,
        high: i64,
        apply: &mut dyn FnMut(ChangelogRecord<'_>) -> Result<(), RecoveryError>,
    ) -> Result<i64, RecoveryError> {
        let records: Vec<LoggedRecord> =
            self.broker.state().changelog.get(&self.partition).cloned().unwrap_or_default();
        for (key, value) in records.iter().take(high as usize).skip(from as usize) {
            apply(ChangelogRecord { key: key.as_deref(), value: value.as_deref() })?;
        }
        Ok(high)
    }
}

/// A task's transactional producer against the twin: a commit appends the transaction's
/// records to the changelog and the output and moves the committed offset, an abort drops them.
pub struct MemoryTxProducer {
    broker: MemoryBroker,
    partition: i32,
    epoch: u64,
    /// The open transaction (the task tests' producer twin, whose commit is not used here).
    open: MemoryProducer,
}

impl TaskProducer for MemoryTxProducer {
    fn begin(&mut self) -> Result<(), ProducerError> {
        self.open.begin()
    }

    fn send(&mut self, record: &OutRecord) -> Result<(), ProducerError> {
        self.open.send(record)
    }

    fn commit(&mut self, next_offset: i64) -> Result<Option<i64>, ProducerError> {
        let records = self.open.open.take().expect("commit outside a transaction");
        let mut state = self.broker.state();
        state.commit_attempts += 1;
        let attempt = state.commit_attempts;
        if state.epochs.get(&self.partition) != Some(&self.epoch) || state.fatal_commits.contains(&attempt) {
            return Err(ProducerError::Fatal("fenced by a newer producer".into()));
        }
        if state.abortable_commits.contains(&attempt) {
            return Err(ProducerError::Abortable("injected by the test".into()));
        }
        let mut wrote_changelog = false;
        for record in records {
            match record.topic {
                OutTopic::Changelog => {
                    wrote_changelog = true;
                    state.changelog.entry(self.partition).or_default().push((record.key, record.value));
                }
                _ => state.output.push(record),
            }
        }
        state.committed.insert(self.partition, next_offset);
        state.commits.push((self.partition, next_offset));
        let end = state.changelog.get(&self.partition).map_or(0, Vec::len) as i64;
        Ok(wrote_changelog.then_some(end))
    }

    fn abort(&mut self) -> Result<(), ProducerError> {
        self.broker.state().aborts += 1;
        self.open.abort()
    }
}
