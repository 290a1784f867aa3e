//! One task per assigned input partition: its state store, its checkpoint, and the exactly-once
//! batch cycle.
//!
//! A batch runs the detector over the records of one partition, then commits in this order:
//! 1. inside one Kafka transaction: dead letters, alerts, changelog records of every user the
//!    batch changed, and the input position;
//! 2. after the transaction commits: one atomic store write with the same user states and the
//!    [`Checkpoint`] they reflect.
//!
//! So the store is never ahead of Kafka. If the process dies between 1 and 2, the store is
//! behind; [`Task::open`]'s caller compares the checkpoint with the committed position and
//! replays the changelog (see `restore`). Nothing here knows about rdkafka: the transaction is the
//! [`TaskProducer`] seam, with an in-memory twin in the tests.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use metronome_state::{keys, Store, StoreError, WriteBatch};
use prost::Message;
use serde::{Deserialize, Serialize};

use super::open_windows::OpenWindows;
use super::query::{RecentScores, ScoreSample};
use crate::metrics::events::WindowScores;
use metronome_core::detect::{
    Detector, Output, ScoringBatch, SequenceError, SequenceScorer, UserState, UserStateV1, UserStateV2, UserStateV3,
    UserStateV6,
};
use metronome_core::intake::{RateLimit, UserIntake, UserIntakeV5};
use metronome_core::timebound::TimeBounds;
use metronome_core::wire::{self, DeadLetterClass, InputRecord, OutRecord, OutTopic};

/// Key namespace of local-only metadata (never in the changelog).
const NS_META: u8 = 0x00;
/// Key namespace of per-user detector state.
pub const NS_USER_STATE: u8 = 0x01;
/// Where the checkpoint lives.
const CHECKPOINT_KEY: &[u8] = &[NS_META, b'c', b'k', b'p', b't'];
/// Version byte in front of every stored user state: 2 added the recurrence memory, 3 the
/// key-dependence test, 4 the per-press model's carried state, 5 the stream's [`UserIntake`]
/// (sequence numbers delivered, the carried clock shift) after the detector's state, 6 the
/// intake's event budget.
const STATE_FORMAT: u8 = 7;
/// The formats before it, still read (a rolling upgrade restores them from the changelog).
const STATE_FORMAT_V6: u8 = 6;
const STATE_FORMAT_V5: u8 = 5;
const STATE_FORMAT_V4: u8 = 4;
const STATE_FORMAT_V3: u8 = 3;
const STATE_FORMAT_V2: u8 = 2;
const STATE_FORMAT_V1: u8 = 1;
/// Windows queued before the model runs over them at once.
const MODEL_BATCH_WINDOWS: usize = 256;

/// What a store reflects: the input position after the last batch it holds, and where in the
/// changelog a replay must start to bring it further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Next input offset to process; `None` before the first batch.
    pub input_offset: Option<i64>,
    /// Changelog offset from which records are newer than the store; 0 = from the start.
    pub changelog_offset: i64,
}

impl Checkpoint {
    /// A store that holds nothing.
    pub const EMPTY: Checkpoint = Checkpoint { input_offset: None, changelog_offset: 0 };

    fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a checkpoint always serializes")
    }

    fn decode(bytes: &[u8]) -> Result<Self, TaskError> {
        postcard::from_bytes(bytes).map_err(|_| TaskError::CorruptState("checkpoint"))
    }
}

/// Why a producer call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The transaction failed but the producer is usable: abort, rewind, retry.
    #[error("transaction aborted: {0}")]
    Abortable(String),
    /// The producer is fenced (another process owns the task now) or broken.
    #[error("producer unusable: {0}")]
    Fatal(String),
}

/// Why a task batch failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored bytes did not decode (never includes the bytes).
    #[error("state store holds an undecodable {0}")]
    CorruptState(&'static str),
    /// The Kafka transaction failed.
    #[error(transparent)]
    Producer(#[from] ProducerError),
}

/// The transactional producer of one task.
pub trait TaskProducer {
    /// Starts a transaction.
    fn begin(&mut self) -> Result<(), ProducerError>;
    /// Adds a record to the open transaction.
    fn send(&mut self, record: &OutRecord) -> Result<(), ProducerError>;
    /// Commits the transaction together with the input position `next_offset`. Returns the
    /// changelog offset after the last changelog record of the transaction, if it had any.
    fn commit(&mut self, next_offset: i64) -> Result<Option<i64>, ProducerError>;
    /// Aborts the open transaction.
    fn abort(&mut self) -> Result<(), ProducerError>;
}

/// What one batch did, for logs and metrics (counts only, never content).
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Input records consumed.
    pub records: u64,
    /// Key events fed to the detector.
    pub events: u64,
    /// Records sent to the dead-letter topic, by class.
    pub dead_letters: Vec<DeadLetterClass>,
    /// Records whose event times were shifted to their reference clock.
    pub rebased_records: u64,
    /// Events dropped as too far from their record's reference clock.
    pub out_of_bounds_events: u64,
    /// Events dropped because their session had delivered their sequence number before.
    pub duplicate_events: u64,
    /// Key-dependence sums an agent reported that no real typing gives (not kept).
    pub key_sums_refused: u64,
    /// Sequence numbers skipped when a later one arrived (events missing, for now).
    pub seq_gap_events: u64,
    /// Events that arrived after a later-numbered one of their session (filling a gap).
    pub late_fill_events: u64,
    /// Events dropped past their user's event budget (`stream.max_user_events_per_s`).
    pub rate_limited_events: u64,
    /// Users whose windows were closed early to keep the task's open users within its cap.
    pub evicted_users: u64,
    /// Windows scored.
    pub windows: u64,
    /// Alerts produced.
    pub alerts: u64,
    /// Users whose windows were closed by idleness.
    pub idle_closed: u64,
    /// Fleet fingerprints sent to the fleet stages.
    pub fingerprints: u64,
    /// Whether anything was committed.
    pub committed: bool,
    /// The sequence model's failure, if it failed (windows then decided on timing alone).
    pub model_error: Option<SequenceError>,
    /// Scores of the windows scored, for the score histograms.
    pub window_scores: Vec<WindowScores>,
    /// Per alert: the scorers behind it and its window's event time (end), for the alert
    /// counters and the end-to-end latency.
    pub alert_times: Vec<(Vec<&'static str>, i64)>,
}

/// What a retention pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneOutcome {
    /// Users whose state was deleted.
    pub users: u64,
    /// Users kept.
    pub kept: u64,
}

/// What a batch borrows from the processor.
pub struct BatchContext<'a> {
    /// The detection core.
    pub detector: &'a mut Detector,
    /// The sequence model, if any.
    pub model: Option<&'a mut dyn SequenceScorer>,
    /// What every task's batch of one round shares.
    pub settings: BatchSettings<'a>,
}

/// What every task's batch of one processing round shares.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings<'a> {
    /// Wall-clock idleness that closes a user's window.
    pub idle_timeout: Duration,
    /// Whether to close idle users' windows in this batch (the processor says so only when the
    /// task is consumed to its end: while it works through a backlog, silence is not idleness).
    pub close_idle: bool,
    /// Most events one record may carry.
    pub max_events_per_record: usize,
    /// Each user's event budget.
    pub rate_limit: RateLimit,
    /// What signatures records must carry.
    pub signatures: wire::Signatures<'a>,
    /// Most users with an open window in the task: past it the smallest, then longest quiet, are closed
    /// as if idle, so a flood of new user ids holds a bounded amount of memory.
    pub max_open_users: usize,
    /// Most idle windows one batch closes (the longest quiet first); the rest close in the
    /// next. Records are split by [`parts`] to the same bound.
    pub max_batch_users: usize,
    /// Bounds on event times against each record's reference clock.
    pub time_bounds: TimeBounds,
    /// The input topic, for dead-letter headers.
    pub input_topic: &'a str,
    /// Now, for idleness.
    pub now: Instant,
    /// Now as microseconds since the epoch, for `detected_at_us`.
    pub now_us: i64,
}

/// `records` in consecutive parts of at most `max_users` distinct keys each (a record's key is
/// its user id; one without a key counts once), so that each part, run as one batch, loads and
/// writes a bounded number of user states. No records make one empty part, so idle windows
/// still close.
pub fn parts(records: &[InputRecord], max_users: usize) -> Vec<&[InputRecord]> {
    let mut parts = Vec::new();
    let (mut start, mut keys) = (0, HashSet::new());
    for (i, record) in records.iter().enumerate() {
        if !keys.contains(&record.key.as_deref()) && keys.len() == max_users.max(1) {
            parts.push(&records[start..i]);
            (start, keys) = (i, HashSet::new());
        }
        keys.insert(record.key.as_deref());
    }
    parts.push(&records[start..]);
    parts
}

/// A partition's task.
#[derive(Debug)]
pub struct Task<S> {
    partition: i32,
    store: S,
    checkpoint: Checkpoint,
    /// Users whose window has presses, with when their last event arrived and how many
    /// presses their window holds.
    open_users: OpenWindows,
    /// Latest window scores of the users with an open window (not persisted: for queries).
    recent: HashMap<String, RecentScores>,
}

/// The store key of `user`'s state.
pub fn user_key(user: &str) -> Result<Vec<u8>, TaskError> {
    keys::user_prefix(NS_USER_STATE, user).map_err(|_| TaskError::CorruptState("user key"))
}

fn user_of_key(key: &[u8]) -> Option<&str> {
    let rest = key.strip_prefix(&[NS_USER_STATE])?;
    let (len, name) = rest.split_at_checked(2)?;
    (usize::from(u16::from_be_bytes([len[0], len[1]])) == name.len()).then(|| std::str::from_utf8(name).ok())?
}

/// Serializes a user's state for the store and the changelog.
pub fn encode_state(state: &UserState, intake: &UserIntake) -> Vec<u8> {
    wire::versioned(STATE_FORMAT, &(state, intake))
}

/// Reads a stored user's detector state.
pub fn decode_state(bytes: &[u8]) -> Result<UserState, TaskError> {
    decode_stored(bytes).map(|(state, _)| state)
}

/// Reads a stored user's detector state and intake (empty for formats before 5: a rolling
/// upgrade forgets which numbers were delivered once, no more).
pub fn decode_stored(bytes: &[u8]) -> Result<(UserState, UserIntake), TaskError> {
    let corrupt = |_| TaskError::CorruptState("user state");
    let detector_only = |state: Result<UserState, TaskError>| state.map(|s| (s, UserIntake::default()));
    match bytes.split_first() {
        Some((&STATE_FORMAT, body)) => postcard::from_bytes(body).map_err(corrupt),
        Some((&STATE_FORMAT_V6, body)) => postcard::from_bytes::<(UserStateV6, UserIntake)>(body)
            .map(|(state, intake)| (state.into(), intake))
            .map_err(corrupt),
        Some((&STATE_FORMAT_V5, body)) => postcard::from_bytes::<(UserStateV6, UserIntakeV5)>(body)
            .map(|(state, intake)| (state.into(), intake.into()))
            .map_err(corrupt),
        Some((&STATE_FORMAT_V4, body)) => {
            detector_only(postcard::from_bytes::<UserStateV6>(body).map(UserState::from).map_err(corrupt))
        }
        other => detector_only(decode_before_v4(other)),
    }
}

fn decode_before_v4(bytes: Option<(&u8, &[u8])>) -> Result<UserState, TaskError> {
    match bytes {
        Some((&STATE_FORMAT_V3, body)) => postcard::from_bytes::<UserStateV3>(body)
            .map(UserState::from)
            .map_err(|_| TaskError::CorruptState("user state")),
        Some((&STATE_FORMAT_V2, body)) => postcard::from_bytes::<UserStateV2>(body)
            .map(UserState::from)
            .map_err(|_| TaskError::CorruptState("user state")),
        Some((&STATE_FORMAT_V1, body)) => postcard::from_bytes::<UserStateV1>(body)
            .map(UserState::from)
            .map_err(|_| TaskError::CorruptState("user state")),
        _ => Err(TaskError::CorruptState("user state version")),
    }
}

/// Adds a changelog record to a restore batch: a value puts, a tombstone deletes.
pub fn apply_changelog_record(batch: &mut WriteBatch, key: &[u8], value: Option<&[u8]>) {
    match value {
        Some(v) => batch.put(key.to_vec(), v.to_vec()),
        None => batch.delete(key.to_vec()),
    };
}

/// Writes `checkpoint` into `batch` (restores finish with this).
pub fn put_checkpoint(batch: &mut WriteBatch, checkpoint: Checkpoint) {
    batch.put(CHECKPOINT_KEY.to_vec(), checkpoint.encode());
}

/// The checkpoint stored in `store`, or [`Checkpoint::EMPTY`].
pub fn read_checkpoint<S: Store>(store: &S) -> Result<Checkpoint, TaskError> {
    match store.get(CHECKPOINT_KEY)? {
        Some(bytes) => Checkpoint::decode(&bytes),
        None => Ok(Checkpoint::EMPTY),
    }
}

impl<S: Store> Task<S> {
    /// Opens the task over a store that is consistent with the committed input position (the
    /// caller restored it first). Users with open windows count as active from `now`, so they
    /// still close by idleness after a restart.
    pub fn open(partition: i32, store: S, now: Instant) -> Result<Self, TaskError> {
        let checkpoint = read_checkpoint(&store)?;
        let mut task =
            Self { partition, store, checkpoint, open_users: OpenWindows::default(), recent: HashMap::new() };
        task.reload_open_users(now)?;
        Ok(task)
    }

    fn reload_open_users(&mut self, now: Instant) -> Result<(), TaskError> {
        self.open_users.clear();
        for (key, value) in self.store.scan_prefix(&[NS_USER_STATE])? {
            let state = decode_state(&value)?;
            if state.has_open_window() {
                let user = user_of_key(&key).ok_or(TaskError::CorruptState("user key"))?;
                self.open_users.touch(user, now, state.window_presses());
            }
        }
        Ok(())
    }

    /// The input partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// What the store reflects.
    pub fn checkpoint(&self) -> Checkpoint {
        self.checkpoint
    }

    /// The store, for metrics and shutdown.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Gives the store back (on revocation or shutdown).
    pub fn into_store(self) -> S {
        self.store
    }

    /// Users with an open window.
    pub fn open_users(&self) -> usize {
        self.open_users.len()
    }

    /// Whether some user has been idle for `idle_timeout` at `now`.
    pub fn idle_due(&self, now: Instant, idle_timeout: Duration) -> bool {
        self.open_users.idle_due(now, idle_timeout)
    }

    /// The latest window scores of `user` this task scored, oldest first (empty once idle).
    pub fn recent_scores(&self, user: &str) -> Vec<ScoreSample> {
        self.recent.get(user).map(RecentScores::to_vec).unwrap_or_default()
    }

    /// The state of `user` as stored (for interactive queries and tests).
    pub fn user_state(&self, user: &str) -> Result<Option<UserState>, TaskError> {
        self.store.get(&user_key(user)?)?.map(|b| decode_state(&b)).transpose()
    }

    /// Processes `records` (consecutive, from this partition) and closes idle users' windows,
    /// then commits through `producer` and the store, in that order. On an error nothing was
    /// written to the store and the caller must rewind the partition to
    /// [`Task::checkpoint`]'s input offset; the task's memory is untouched until the commit.
    pub fn run_batch<P: TaskProducer>(
        &mut self,
        ctx: &mut BatchContext<'_>,
        records: &[InputRecord],
        producer: &mut P,
    ) -> Result<BatchOutcome, TaskError> {
        let mut work = BatchWork::new(records.len(), ctx);
        for record in records {
            self.feed_record(ctx, record, &mut work)?;
        }
        // Users fed events in this batch are not idle; a copy or a record of strays alone does
        // not count as typing.
        let fed: Vec<usize> = (0..work.users.slots.len()).filter(|&i| work.users.fed[i]).collect();
        let closing = self.users_to_close(ctx, &mut work, &fed);
        if records.is_empty() && closing.is_empty() {
            return Ok(work.outcome);
        }
        for user in &closing {
            let slot = work.users.slot(&self.store, user)?;
            ctx.detector.close_window(slot, &mut work.users.slots[slot].1, &mut work.scoring);
        }
        work.outcome.idle_closed = closing.len() as u64 - work.outcome.evicted_users;
        work.finish_scoring(ctx);
        let samples = work.emit_outputs(ctx.settings.now_us);
        let next_offset = records.last().map(|r| r.offset + 1).or(self.checkpoint.input_offset);
        self.commit_batch(producer, &mut work, next_offset)?;
        self.remember_committed(ctx.settings.now, &work.users, &fed, samples, &closing);
        work.outcome.committed = true;
        Ok(work.outcome)
    }

    /// One record into the batch: decoded and checked (a bad one becomes a dead letter), its
    /// events admitted by the user's intake and time bounds, then fed to the detector.
    fn feed_record(
        &self,
        ctx: &mut BatchContext<'_>,
        record: &InputRecord,
        work: &mut BatchWork,
    ) -> Result<(), TaskError> {
        let settings = ctx.settings;
        let mut batch = match wire::decode_signed_record(record, settings.max_events_per_record, settings.signatures) {
            Ok(batch) => batch,
            Err(class) => {
                work.outcome.dead_letters.push(class);
                work.out.push(wire::dead_letter(record, class, settings.input_topic, self.partition));
                return Ok(());
            }
        };
        let outcome = &mut work.outcome;
        let slot = work.users.slot(&self.store, &batch.user_id)?;
        let intake = &mut work.users.intakes[slot];
        let admitted = intake.ledger.admit(batch.session, &batch.seqs, &mut batch.events);
        outcome.duplicate_events += u64::from(admitted.duplicates);
        outcome.seq_gap_events += admitted.gap_events;
        outcome.late_fill_events += u64::from(admitted.late_fills);
        let fix = settings.time_bounds.apply(
            &mut batch.events,
            record.time,
            settings.now_us,
            &mut intake.shift_us,
            &mut work.times,
        );
        outcome.rebased_records += u64::from(fix.rebased);
        outcome.out_of_bounds_events += u64::from(fix.dropped);
        outcome.rate_limited_events += u64::from(intake.budget.spend(settings.rate_limit, &mut batch.events));
        if batch.events.is_empty() {
            return Ok(()); // a copy, or strays only: nothing of the user changes
        }
        work.users.fed[slot] = true;
        let state = &mut work.users.slots[slot].1;
        state.set_virtual_source(batch.virtual_device);
        if let Some(sums) = &batch.key_sums {
            outcome.key_sums_refused += u64::from(!ctx.detector.report_key_sums(state, sums));
        }
        for event in batch.events {
            ctx.detector.on_event(slot, state, event, &mut work.scoring);
            outcome.events += 1;
        }
        if work.scoring.windows() >= MODEL_BATCH_WINDOWS {
            work.finish_scoring(ctx);
        }
        Ok(())
    }

    /// The users whose windows this batch closes: the idle ones (when the processor says so,
    /// at most a batch's bound of them, the batch's own users excepted), then those over the
    /// cap of open windows.
    fn users_to_close(&self, ctx: &BatchContext<'_>, work: &mut BatchWork, fed: &[usize]) -> Vec<String> {
        let settings = ctx.settings;
        let users = &work.users;
        let mut closing: Vec<String> = if settings.close_idle {
            self.open_users
                .idle(settings.now, settings.idle_timeout)
                .filter(|u| !users.index.get(*u).is_some_and(|&i| users.fed[i]))
                .take(settings.max_batch_users)
                .map(str::to_owned)
                .collect()
        } else {
            Vec::new()
        };
        let evicted = self.over_the_cap(users, fed, &closing, settings.max_open_users);
        work.outcome.evicted_users = evicted.len() as u64;
        closing.extend(evicted);
        closing
    }

    /// The batch's records and every user it touched in one transaction with the input
    /// position, then the store (states and checkpoint) in one write.
    fn commit_batch<P: TaskProducer>(
        &mut self,
        producer: &mut P,
        work: &mut BatchWork,
        next_offset: Option<i64>,
    ) -> Result<(), TaskError> {
        let mut writes = WriteBatch::new();
        for ((user, state), intake) in work.users.slots.iter().zip(&work.users.intakes) {
            put_logged(&mut work.out, &mut writes, user_key(user)?, encode_state(state, intake));
        }
        let changelog_end = self.transact(producer, &work.out, next_offset)?;
        let checkpoint = Checkpoint {
            input_offset: next_offset,
            changelog_offset: changelog_end.unwrap_or(self.checkpoint.changelog_offset),
        };
        put_checkpoint(&mut writes, checkpoint);
        self.store.write(&writes)?;
        self.checkpoint = checkpoint;
        Ok(())
    }

    /// The task's memory after a commit: who is open and since when, the recent scores, and
    /// the closed users forgotten.
    fn remember_committed(
        &mut self,
        now: Instant,
        users: &Users,
        fed: &[usize],
        samples: Vec<(usize, ScoreSample)>,
        closed: &[String],
    ) {
        for &slot in fed {
            let (user, state) = &users.slots[slot];
            self.open_users.touch(user, now, state.window_presses());
        }
        for (slot, sample) in samples {
            let user = &users.slots[slot].0;
            // Most windows belong to users already there: no key copy for them.
            match self.recent.get_mut(user) {
                Some(recent) => recent.push(sample),
                None => self.recent.entry(user.clone()).or_default().push(sample),
            }
        }
        for user in closed {
            self.open_users.remove(user);
            self.recent.remove(user);
        }
    }

    /// The users to close so that at most `cap` windows stay open after the batch: those
    /// with the fewest presses first (a flood's one-press ids lose nothing by it; a typist's
    /// long window is the last to go), then the longest quiet, then by id. Users fed this
    /// batch count as just active and are closed only when the quiet ones do not suffice.
    fn over_the_cap(&self, users: &Users, fed: &[usize], idle: &[String], cap: usize) -> Vec<String> {
        let joining = fed.iter().filter(|&&slot| !self.open_users.contains(&users.slots[slot].0)).count();
        let excess = (self.open_users.len() - idle.len() + joining).saturating_sub(cap);
        if excess == 0 {
            return Vec::new();
        }
        let closing: HashSet<&str> = idle.iter().map(String::as_str).collect();
        let active: Vec<(usize, &str)> = fed
            .iter()
            .map(|&slot| {
                let (user, state) = &users.slots[slot];
                (state.window_presses(), user.as_str())
            })
            .collect();
        self.open_users.first_to_close(excess, &active, |user| closing.contains(user))
    }

    /// Retention: deletes the state of every user whose newest event is older than
    /// `cutoff_us`, first from the changelog (tombstones, in a transaction that commits the
    /// unchanged input position), then from the store, which is then compacted so the space
    /// comes back. On an error nothing was deleted from the store.
    pub fn prune<P: TaskProducer>(&mut self, producer: &mut P, cutoff_us: i64) -> Result<PruneOutcome, TaskError> {
        let mut outcome = PruneOutcome::default();
        let mut expired: Vec<(Vec<u8>, String)> = Vec::new();
        for (key, value) in self.store.scan_prefix(&[NS_USER_STATE])? {
            if decode_state(&value)?.last_event_us().is_none_or(|t| t < cutoff_us) {
                let user = user_of_key(&key).ok_or(TaskError::CorruptState("user key"))?.to_owned();
                expired.push((key, user));
            } else {
                outcome.kept += 1;
            }
        }
        // A store with users has processed input, so it has a position to commit.
        let Some(position) = self.checkpoint.input_offset.filter(|_| !expired.is_empty()) else {
            return Ok(outcome);
        };
        let tombstones: Vec<OutRecord> =
            expired.iter().map(|(key, _)| wire::changelog_record(key.clone(), None)).collect();
        let changelog_end = self.transact(producer, &tombstones, Some(position))?;
        let mut writes = WriteBatch::new();
        for (key, _) in &expired {
            writes.delete(key.clone());
        }
        let checkpoint = Checkpoint {
            input_offset: Some(position),
            changelog_offset: changelog_end.unwrap_or(self.checkpoint.changelog_offset),
        };
        put_checkpoint(&mut writes, checkpoint);
        self.store.write(&writes)?;
        self.checkpoint = checkpoint;
        for (_, user) in &expired {
            self.open_users.remove(user);
            self.recent.remove(user);
        }
        self.store.compact()?;
        outcome.users = expired.len() as u64;
        Ok(outcome)
    }

    fn transact<P: TaskProducer>(
        &self,
        producer: &mut P,
        out: &[OutRecord],
        next_offset: Option<i64>,
    ) -> Result<Option<i64>, TaskError> {
        // Nothing consumed yet and nothing to commit as a position: an idle-only batch of a task
        // that never saw a record cannot exist, but stay correct if it does.
        transact(producer, out, next_offset.unwrap_or(0))
    }
}

/// Puts `value` under `key` in both the store's batch and the changelog records.
pub fn put_logged(out: &mut Vec<OutRecord>, writes: &mut WriteBatch, key: Vec<u8>, value: Vec<u8>) {
    out.push(wire::changelog_record(key.clone(), Some(value.clone())));
    writes.put(key, value);
}

/// Deletes `key` from both the store's batch and the changelog (a tombstone).
pub fn delete_logged(out: &mut Vec<OutRecord>, writes: &mut WriteBatch, key: Vec<u8>) {
    out.push(wire::changelog_record(key.clone(), None));
    writes.delete(key);
}

/// Sends `out` in one transaction that commits the input position `next_offset`; aborts on
/// any failure. Returns the changelog end, as [`TaskProducer::commit`] does.
pub fn transact<P: TaskProducer>(
    producer: &mut P,
    out: &[OutRecord],
    next_offset: i64,
) -> Result<Option<i64>, TaskError> {
    let committed = producer
        .begin()
        .and_then(|()| out.iter().try_for_each(|r| producer.send(r)))
        .and_then(|()| producer.commit(next_offset));
    committed.map_err(|e| {
        // The transaction's fate is the error's. An abort that fails is resumed by the next
        // one: a begin refused because an abort is still in progress aborts again, so the
        // task cannot stay stuck behind it.
        if let Err(abort) = producer.abort() {
            tracing::warn!(error = %abort, "aborting the transaction failed; the next batch resumes the abort");
        }
        e.into()
    })
}

/// The users a batch touches: `(user, state)` slots the detector addresses by index, and each
/// one's intake beside them.
#[derive(Default)]
struct Users {
    slots: Vec<(String, UserState)>,
    intakes: Vec<UserIntake>,
    /// Whether the batch fed the slot's user any event.
    fed: Vec<bool>,
    index: HashMap<String, usize>,
}

impl Users {
    fn slot<S: Store>(&mut self, store: &S, user: &str) -> Result<usize, TaskError> {
        if let Some(&slot) = self.index.get(user) {
            return Ok(slot);
        }
        let (state, intake) = match store.get(&user_key(user)?)? {
            Some(bytes) => decode_stored(&bytes)?,
            None => Default::default(),
        };
        self.slots.push((user.to_owned(), state));
        self.intakes.push(intake);
        self.fed.push(false);
        self.index.insert(user.to_owned(), self.slots.len() - 1);
        Ok(self.slots.len() - 1)
    }
}

/// What one batch builds before it commits.
struct BatchWork {
    outcome: BatchOutcome,
    users: Users,
    /// The transaction's records so far.
    out: Vec<OutRecord>,
    scoring: ScoringBatch,
    /// The detector's outputs, by user slot.
    outputs: Vec<(usize, Output)>,
    /// Scratch space of the time bounds.
    times: Vec<i64>,
}

impl BatchWork {
    fn new(records: usize, ctx: &BatchContext<'_>) -> Self {
        Self {
            outcome: BatchOutcome { records: records as u64, ..BatchOutcome::default() },
            users: Users::default(),
            out: Vec::new(),
            scoring: ScoringBatch::for_model(ctx.model.as_deref()),
            outputs: Vec::new(),
            times: Vec::new(),
        }
    }

    /// Scores the windows waiting for the sequence model (timing alone if it fails).
    fn finish_scoring(&mut self, ctx: &mut BatchContext<'_>) {
        let model = ctx.model.as_mut().map(|m| &mut **m as &mut dyn SequenceScorer);
        if let Err(e) = ctx.detector.finish(&mut self.scoring, &mut self.users.slots, model, &mut self.outputs) {
            self.outcome.model_error = Some(e);
        }
    }

    /// The detector's outputs as the transaction's alert and fingerprint records and the
    /// outcome's counts; returns each scored window's sample for the user's recent scores.
    fn emit_outputs(&mut self, now_us: i64) -> Vec<(usize, ScoreSample)> {
        let mut samples = Vec::new();
        for (slot, output) in &self.outputs {
            let user = &self.users.slots[*slot].0;
            match output {
                Output::Window(w) => {
                    self.outcome.windows += 1;
                    samples.push((*slot, ScoreSample::of(w)));
                    self.outcome.window_scores.push(WindowScores {
                        combined: w.score,
                        timing: w.timing_score,
                        histogram: w.histogram_score,
                        lstm: w.lstm_score,
                    });
                }
                Output::Alert(alert) => {
                    self.outcome.alert_times.push((alert.reasons.scorers(), alert.window.window_end_us));
                    let message = wire::alert_message(user, alert, now_us);
                    self.out.push(OutRecord {
                        topic: OutTopic::Alerts,
                        key: Some(user.as_bytes().to_vec()),
                        value: Some(message.encode_to_vec()),
                        headers: Vec::new(),
                    });
                    self.outcome.alerts += 1;
                }
                Output::IncidentClosed { .. } => {}
                // Stamped with the processor's clock, not the event's: the agent's clock is the
                // user's, and accounts that forge theirs apart must still meet in the window.
                Output::Fingerprint { fingerprint, .. } => {
                    self.out.push(wire::fingerprint_record(*fingerprint, user, now_us));
                    self.outcome.fingerprints += 1;
                }
            }
        }
        samples
    }
}

/// The in-memory twin of the Kafka transaction, for the tasks' tests.
#[cfg(test)]
pub(crate) mod twin {
    use metronome_core::event::{KeyAction, KeyEvent};
    use metronome_core::wire::{self, InputRecord};

    use super::{OutRecord, OutTopic, ProducerError, TaskProducer};

    /// `events` as `user`'s records of 40 events each, from `first_offset` on.
    pub fn records_of(user: &str, events: &[KeyEvent], first_offset: i64) -> Vec<InputRecord> {
        wire::batches_for_user(user, "s", events, 40)
            .into_iter()
            .enumerate()
            .map(|(i, p)| InputRecord {
                offset: first_offset + i as i64,
                key: Some(user.as_bytes().to_vec()),
                payload: Some(p),
                time: wire::RecordTime::Unknown,
            })
            .collect()
    }

    /// `presses` presses of a fixed-interval macro (100 ms apart) as `user`'s records.
    pub fn macro_records(user: &str, first_offset: i64, presses: usize) -> Vec<InputRecord> {
        let mut events = Vec::new();
        for i in 0..presses as i64 {
            let t = 1_700_000_000_000_000 + i * 100_000;
            events.push(KeyEvent::new(t, 30 + (i % 4) as u32, KeyAction::Down));
            events.push(KeyEvent::new(t + 30_000, 30 + (i % 4) as u32, KeyAction::Up));
        }
        records_of(user, &events, first_offset)
    }

    /// The in-memory twin of a transactional producer: keeps committed records, drops aborted.
    #[derive(Default)]
    pub struct MemoryProducer {
        pub open: Option<Vec<OutRecord>>,
        pub committed: Vec<OutRecord>,
        pub positions: Vec<i64>,
        pub fail_next_commit: bool,
        /// Refuse the next begin, as librdkafka does while an earlier abort is in progress.
        pub fail_next_begin: bool,
        pub aborts: usize,
        pub changelog_len: i64,
    }

    impl TaskProducer for MemoryProducer {
        fn begin(&mut self) -> Result<(), ProducerError> {
            if std::mem::take(&mut self.fail_next_begin) {
                return Err(ProducerError::Abortable("an abort is in progress".into()));
            }
            assert!(self.open.is_none(), "begin inside an open transaction");
            self.open = Some(Vec::new());
            Ok(())
        }
        fn send(&mut self, record: &OutRecord) -> Result<(), ProducerError> {
            self.open.as_mut().expect("send outside a transaction").push(record.clone());
            Ok(())
        }
        fn commit(&mut self, next_offset: i64) -> Result<Option<i64>, ProducerError> {
            if std::mem::take(&mut self.fail_next_commit) {
                return Err(ProducerError::Abortable("injected".into()));
            }
            let records = self.open.take().expect("commit outside a transaction");
            let changelog = records.iter().filter(|r| r.topic == OutTopic::Changelog).count() as i64;
            self.changelog_len += changelog;
            self.committed.extend(records);
            self.positions.push(next_offset);
            Ok((changelog > 0).then_some(self.changelog_len))
        }
        fn abort(&mut self) -> Result<(), ProducerError> {
            self.open = None;
            self.aborts += 1;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metronome_core::detect::dependence::KeySums;
    use metronome_core::detect::window::Press;
    use metronome_core::detect::DetectorConfig;
    use metronome_core::event::{KeyAction, KeyEvent};
    use metronome_core::proto;
    use metronome_state::MemoryStore;

    use super::twin::{macro_records, records_of, MemoryProducer};

    fn ctx<'a>(detector: &'a mut Detector, now: Instant) -> BatchContext<'a> {
        BatchContext {
            detector,
            model: None,
            settings: BatchSettings {
                idle_timeout: Duration::from_secs(10),
                close_idle: true,
                max_events_per_record: 1000,
                rate_limit: RateLimit { events_per_s: 1000, burst: 20_000 },
                signatures: wire::Signatures::default(),
                max_open_users: 100_000,
                max_batch_users: 4_096,
                // Unbounded: these tests' records carry no append time, and now_us is 0.
                time_bounds: TimeBounds { lead_us: i64::MAX, lag_us: i64::MAX },
                input_topic: "keys.events",
                now,
                now_us: 0,
            },
        }
    }

    /// One script's presses (irregular flights, so it has fingerprints) as `user`'s records,
    /// its event clock starting at `start_us`.
    fn script_records(user: &str, start_us: i64, first_offset: i64) -> Vec<InputRecord> {
        let mut events = Vec::new();
        let mut t = start_us;
        for i in 0..300i64 {
            t += 80_000 + (i * 7_919 % 13) * 20_000;
            events.push(KeyEvent::new(t, 30 + (i % 5) as u32, KeyAction::Down));
            events.push(KeyEvent::new(t + 40_000, 30 + (i % 5) as u32, KeyAction::Up));
        }
        records_of(user, &events, first_offset)
    }

    #[test]
    fn fingerprints_carry_the_processors_clock_so_forged_event_clocks_still_meet() {
        let mut task = Task::open(0, MemoryStore::new(), Instant::now()).unwrap();
        let mut producer = MemoryProducer::default();
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let mut c = ctx(&mut detector, Instant::now());
        c.settings.now_us = 1_790_000_000_000_000;
        // Two accounts play the same script, one with its clock set 30 years ahead.
        let mut input = script_records("a", 1_700_000_000_000_000, 0);
        let next = input.len() as i64;
        input.extend(script_records("b", 2_650_000_000_000_000, next));
        let outcome = task.run_batch(&mut c, &input, &mut producer).unwrap();
        let seen: Vec<(u64, metronome_core::detect::fleet::FingerprintSeen)> = producer
            .committed
            .iter()
            .filter(|r| r.topic == OutTopic::Fingerprints)
            .map(|r| {
                let record = InputRecord { key: r.key.clone(), payload: r.value.clone(), ..InputRecord::default() };
                wire::decode_fingerprint(&record).unwrap()
            })
            .collect();
        assert_eq!(seen.len() as u64, outcome.fingerprints);
        assert!(seen.len() > 20, "{}", seen.len());
        assert!(seen.iter().all(|(_, s)| s.at_us == 1_790_000_000_000_000));
        let of = |user: &str| -> std::collections::BTreeSet<u64> {
            seen.iter().filter(|(_, s)| s.user == user).map(|(f, _)| *f).collect()
        };
        assert_eq!(of("a"), of("b"), "the same script, the same fingerprints");
    }

    fn alerts(p: &MemoryProducer) -> Vec<proto::Alert> {
        p.committed
            .iter()
            .filter(|r| r.topic == OutTopic::Alerts)
            .map(|r| proto::Alert::decode(r.value.as_deref().unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn a_macro_user_alerts_once_and_state_follows_the_commit() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let now = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), now).unwrap();
        let mut producer = MemoryProducer::default();
        let records = macro_records("m1", 0, 120);
        let outcome = task.run_batch(&mut ctx(&mut detector, now), &records, &mut producer).unwrap();
        assert!(outcome.committed);
        assert_eq!(alerts(&producer).len(), 1, "one incident, one alert");
        assert_eq!(alerts(&producer)[0].user_id, "m1");
        assert_eq!(producer.positions, vec![records.len() as i64]);
        assert_eq!(task.checkpoint().input_offset, Some(records.len() as i64));
        assert_eq!(task.checkpoint().changelog_offset, 1, "one user changed, one changelog record");
        let stored = task.user_state("m1").unwrap().expect("state stored after commit");
        assert_eq!(stored.policy().alerts_raised(), 1);
    }

    #[test]
    fn a_failed_commit_leaves_store_and_memory_as_before() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let now = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), now).unwrap();
        let mut producer = MemoryProducer { fail_next_commit: true, ..MemoryProducer::default() };
        let records = macro_records("m1", 0, 120);
        let err = task.run_batch(&mut ctx(&mut detector, now), &records, &mut producer).unwrap_err();
        assert!(matches!(err, TaskError::Producer(ProducerError::Abortable(_))));
        assert!(producer.committed.is_empty(), "aborted records are gone");
        assert_eq!(task.checkpoint(), Checkpoint::EMPTY);
        assert_eq!(task.user_state("m1").unwrap(), None, "the store never saw the aborted batch");
        assert_eq!(task.open_users(), 0);
        // The retry of the same records gives the same single alert.
        task.run_batch(&mut ctx(&mut detector, now), &records, &mut producer).unwrap();
        assert_eq!(alerts(&producer).len(), 1);
    }

    #[test]
    fn bad_records_become_dead_letters_and_the_rest_flows() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let now = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), now).unwrap();
        let mut producer = MemoryProducer::default();
        let mut records = macro_records("m1", 0, 120);
        let n = records.len() as i64;
        records.insert(
            2,
            InputRecord { key: Some(b"m1".to_vec()), payload: Some(vec![0xff; 9]), ..InputRecord::default() },
        );
        for (i, r) in records.iter_mut().enumerate() {
            r.offset = i as i64;
        }
        let outcome = task.run_batch(&mut ctx(&mut detector, now), &records, &mut producer).unwrap();
        assert_eq!(outcome.dead_letters, vec![DeadLetterClass::Decode]);
        let dlq: Vec<_> = producer.committed.iter().filter(|r| r.topic == OutTopic::DeadLetters).collect();
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].value.as_deref(), Some(&[0xff; 9][..]));
        assert_eq!(alerts(&producer).len(), 1);
        assert_eq!(producer.positions, vec![n + 1]);
    }

    #[test]
    fn idle_users_close_by_wall_clock_and_survive_reopening() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let start = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), start).unwrap();
        let mut producer = MemoryProducer::default();
        // 35 presses: scored once at 30 (min_presses), 5 left unscored for the idle close.
        let records = macro_records("m1", 0, 35);
        task.run_batch(&mut ctx(&mut detector, start), &records, &mut producer).unwrap();
        assert_eq!(task.open_users(), 1);
        let later = start + Duration::from_secs(11);
        assert!(task.idle_due(later, Duration::from_secs(10)));
        // Reopen over the same store (a restart): the open user is still tracked.
        let store = task.into_store();
        let mut task = Task::open(0, store, start).unwrap();
        assert_eq!(task.open_users(), 1, "open windows are found again after a restart");
        let outcome = task.run_batch(&mut ctx(&mut detector, later), &[], &mut producer).unwrap();
        assert_eq!(outcome.idle_closed, 1);
        assert_eq!(outcome.windows, 1, "the partial window was scored");
        assert_eq!(task.open_users(), 0);
        assert!(!task.user_state("m1").unwrap().unwrap().has_open_window());
        assert_eq!(producer.positions.last(), Some(&(records.len() as i64)), "position unchanged");
        // Nothing more to do: no transaction.
        let before = producer.positions.len();
        let outcome = task.run_batch(&mut ctx(&mut detector, later), &[], &mut producer).unwrap();
        assert!(!outcome.committed);
        assert_eq!(producer.positions.len(), before);
    }

    #[test]
    fn a_user_with_new_events_is_not_idle_and_closing_waits_for_the_processor() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let start = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), start).unwrap();
        let mut producer = MemoryProducer::default();
        let records = macro_records("m1", 0, 70);
        let (first, rest) = records.split_at(records.len() / 2);
        task.run_batch(&mut ctx(&mut detector, start), first, &mut producer).unwrap();
        let later = start + Duration::from_secs(11);
        let outcome = task.run_batch(&mut ctx(&mut detector, later), rest, &mut producer).unwrap();
        assert_eq!(outcome.idle_closed, 0, "records arriving now make the user active, not idle");
        assert_eq!(task.open_users(), 1);
        let mut no_close = ctx(&mut detector, later + Duration::from_secs(11));
        no_close.settings.close_idle = false;
        let outcome = task.run_batch(&mut no_close, &[], &mut producer).unwrap();
        assert!(!outcome.committed, "without the processor's word, silence closes nothing");
        assert_eq!(task.open_users(), 1);
    }

    #[test]
    fn retention_deletes_old_users_from_changelog_and_store_and_keeps_the_rest() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let now = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), now).unwrap();
        let mut producer = MemoryProducer::default();
        // m1 typed at 1_700_000_000 s; m2 a day later (its events shifted by 86_400 s).
        let mut records = macro_records("m1", 0, 40);
        let later: Vec<InputRecord> = macro_records("m2", records.len() as i64, 40)
            .into_iter()
            .map(|mut r| {
                let mut batch = proto::KeyEventBatch::decode(r.payload.as_deref().unwrap()).unwrap();
                for e in &mut batch.events {
                    e.event_time_us += 86_400_000_000;
                }
                r.payload = Some(batch.encode_to_vec());
                r
            })
            .collect();
        records.extend(later);
        task.run_batch(&mut ctx(&mut detector, now), &records, &mut producer).unwrap();
        let position = task.checkpoint().input_offset;
        let cutoff = 1_700_000_000_000_000 + 3_600_000_000;
        let outcome = task.prune(&mut producer, cutoff).unwrap();
        assert_eq!(outcome, PruneOutcome { users: 1, kept: 1 });
        assert_eq!(task.user_state("m1").unwrap(), None, "m1's state is gone from the store");
        assert!(task.user_state("m2").unwrap().is_some(), "m2 is newer than the cutoff");
        let tombstone = producer.committed.last().unwrap();
        assert_eq!(
            (tombstone.topic, &tombstone.key, &tombstone.value),
            (OutTopic::Changelog, &Some(user_key("m1").unwrap()), &None)
        );
        assert_eq!(producer.positions.last().copied(), position, "the input position is committed unchanged");
        assert_eq!(task.checkpoint().input_offset, position);
        assert_eq!(task.open_users(), 1);
        // Nothing more to prune: no transaction.
        let commits = producer.positions.len();
        assert_eq!(task.prune(&mut producer, cutoff).unwrap(), PruneOutcome { users: 0, kept: 1 });
        assert_eq!(producer.positions.len(), commits);
    }

    #[test]
    fn a_failed_retention_commit_deletes_nothing() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let now = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), now).unwrap();
        let mut producer = MemoryProducer::default();
        task.run_batch(&mut ctx(&mut detector, now), &macro_records("m1", 0, 40), &mut producer).unwrap();
        producer.fail_next_commit = true;
        assert!(task.prune(&mut producer, i64::MAX).is_err());
        assert!(task.user_state("m1").unwrap().is_some(), "the store keeps what the changelog keeps");
        assert_eq!(task.prune(&mut producer, i64::MAX).unwrap().users, 1, "the next pass does it");
    }

    /// `events` as an agent sends them: records of 40, numbered from 1 in one session.
    fn agent_records(user: &str, events: &[KeyEvent]) -> Vec<InputRecord> {
        events
            .chunks(40)
            .enumerate()
            .map(|(i, chunk)| InputRecord {
                offset: i as i64,
                key: Some(user.as_bytes().to_vec()),
                payload: Some(wire::encode_batch(user, "kbd-1", "run-1", chunk, Some(1 + 40 * i as u64))),
                time: wire::RecordTime::Unknown,
            })
            .collect()
    }

    fn macro_events(presses: usize) -> Vec<KeyEvent> {
        let mut events = Vec::new();
        for i in 0..presses as i64 {
            let t = 1_700_000_000_000_000 + i * 100_000;
            events.push(KeyEvent::new(t, 30 + (i % 4) as u32, KeyAction::Down));
            events.push(KeyEvent::new(t + 30_000, 30 + (i % 4) as u32, KeyAction::Up));
        }
        events
    }

    /// Runs `batches` (records renumbered by position) through a fresh task: the committed
    /// alerts, the user's stored state and intake, and the events the detector was fed.
    fn run_batches(batches: &[Vec<InputRecord>]) -> (Vec<proto::Alert>, (UserState, UserIntake), BatchOutcome) {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let now = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), now).unwrap();
        let mut producer = MemoryProducer::default();
        let mut total = BatchOutcome::default();
        let mut offset = 0;
        for batch in batches {
            let renumbered: Vec<InputRecord> = batch
                .iter()
                .map(|r| {
                    offset += 1;
                    InputRecord { offset, ..r.clone() }
                })
                .collect();
            let outcome = task.run_batch(&mut ctx(&mut detector, now), &renumbered, &mut producer).unwrap();
            total.events += outcome.events;
            total.duplicate_events += outcome.duplicate_events;
            total.seq_gap_events += outcome.seq_gap_events;
            total.key_sums_refused += outcome.key_sums_refused;
        }
        let stored = task.store.get(&user_key("m1").unwrap()).unwrap().unwrap();
        (alerts(&producer), decode_stored(&stored).unwrap(), total)
    }

    #[test]
    fn resent_and_replayed_records_change_nothing() {
        let records = agent_records("m1", &macro_events(160)); // 8 records of 40
        let n = records.len();
        let (alerts_once, state_once, once) = run_batches(std::slice::from_ref(&records));
        assert_eq!(alerts_once.len(), 1);
        // The same records over three batches, with what an agent restart resends (the last
        // batch's tail again at the start of the next), a record twice in one batch, and the
        // whole stream replayed at the end.
        let mut first = records[..3].to_vec();
        first.push(records[1].clone());
        let mut second = records[1..3].to_vec();
        second.extend_from_slice(&records[3..n / 2]);
        let mut third = records[n / 2 - 2..].to_vec();
        third.extend_from_slice(&records);
        let (alerts_copied, state_copied, copied) = run_batches(&[first, second, third]);
        let copies: usize = 1 + 2 + 2 + n;
        assert_eq!(copied.duplicate_events, (copies * 40) as u64, "every copy's events dropped");
        assert_eq!(copied.events, once.events, "the detector was fed each event once");
        assert_eq!(copied.seq_gap_events, 0);
        let ids = |a: &[proto::Alert]| a.iter().map(|a| (a.alert_id.clone(), a.window_end_us)).collect::<Vec<_>>();
        assert_eq!(ids(&alerts_copied), ids(&alerts_once), "the same alerts");
        assert_eq!(state_copied, state_once, "the same state, ledger included");
    }

    #[test]
    fn a_copy_does_not_keep_an_idle_user_open() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let start = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), start).unwrap();
        let mut producer = MemoryProducer::default();
        let records = agent_records("m1", &macro_events(35));
        task.run_batch(&mut ctx(&mut detector, start), &records, &mut producer).unwrap();
        assert_eq!(task.open_users(), 1);
        let later = start + Duration::from_secs(11);
        let copy = InputRecord { offset: records.len() as i64, ..records[0].clone() };
        let outcome = task.run_batch(&mut ctx(&mut detector, later), &[copy], &mut producer).unwrap();
        assert_eq!((outcome.duplicate_events, outcome.events), (40, 0));
        assert_eq!(outcome.idle_closed, 1, "a copy is not typing: the user closes as idle");
        assert_eq!(task.open_users(), 0);
    }

    #[test]
    fn a_flooding_user_s_state_stays_small() {
        // 200 records of 1,000 events stamped at one instant, every key a new one, numbered
        // with holes in many sessions: what a hostile agent can do to one user's state.
        let mut batch = Vec::new();
        for r in 0..200u64 {
            let events: Vec<KeyEvent> = (0..1000u32)
                .map(|i| KeyEvent::new(1_700_000_000_000_000, 0x8000_0000 | (r as u32 * 1000 + i), KeyAction::Down))
                .collect();
            let session = format!("s{}", r % 20);
            batch.push(InputRecord {
                offset: r as i64,
                key: Some(b"m1".to_vec()),
                payload: Some(wire::encode_batch("m1", "kbd", &session, &events, Some(1 + r * 3_000))),
                time: wire::RecordTime::Unknown,
            });
        }
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let now = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), now).unwrap();
        let mut producer = MemoryProducer::default();
        let outcome = task.run_batch(&mut ctx(&mut detector, now), &batch, &mut producer).unwrap();
        assert_eq!(outcome.rate_limited_events, 180_000, "past the burst of 20,000 at one instant, dropped");
        assert_eq!(outcome.events, 20_000);
        let stored = task.store.get(&user_key("m1").unwrap()).unwrap().unwrap();
        // The broker's message.max.bytes defaults to 1 MiB; a changelog record is one state.
        assert!(stored.len() < 64 << 10, "{} bytes", stored.len());
    }

    #[test]
    fn a_refused_begin_aborts_so_an_abort_in_progress_is_resumed() {
        let mut producer = MemoryProducer { fail_next_begin: true, ..MemoryProducer::default() };
        assert!(transact(&mut producer, &[], 7).is_err());
        assert_eq!(producer.aborts, 1);
        assert_eq!(transact(&mut producer, &[], 7).unwrap(), None);
        assert_eq!(producer.positions, vec![7]);
    }

    #[test]
    fn records_split_into_parts_of_a_bounded_number_of_users_in_order() {
        let records: Vec<InputRecord> = ["a", "b", "a", "c", "b", "d", "d"]
            .iter()
            .enumerate()
            .map(|(i, user)| InputRecord { offset: i as i64, ..agent_records(user, &macro_events(5))[0].clone() })
            .collect();
        let offsets = |max_users| -> Vec<Vec<i64>> {
            parts(&records, max_users).iter().map(|p| p.iter().map(|r| r.offset).collect()).collect()
        };
        assert_eq!(offsets(2), vec![vec![0, 1, 2], vec![3, 4], vec![5, 6]]);
        assert_eq!(offsets(3), vec![vec![0, 1, 2, 3, 4], vec![5, 6]]);
        assert_eq!(offsets(4), vec![vec![0, 1, 2, 3, 4, 5, 6]]);
        assert_eq!(parts(&[], 4), vec![&[] as &[InputRecord]], "one empty part: idle windows still close");
    }

    #[test]
    fn a_batch_closes_at_most_its_bound_of_idle_windows_the_longest_quiet_first() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let start = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), start).unwrap();
        let mut producer = MemoryProducer::default();
        for (i, user) in ["u0", "u1", "u2", "u3", "u4"].iter().enumerate() {
            let record = InputRecord { offset: i as i64, ..agent_records(user, &macro_events(5))[0].clone() };
            task.run_batch(&mut ctx(&mut detector, start + Duration::from_secs(i as u64)), &[record], &mut producer)
                .unwrap();
        }
        let later = start + Duration::from_secs(60);
        let mut closed = Vec::new();
        while task.idle_due(later, Duration::from_secs(10)) {
            let mut ctx = ctx(&mut detector, later);
            ctx.settings.max_batch_users = 2;
            closed.push(task.run_batch(&mut ctx, &[], &mut producer).unwrap().idle_closed);
            if closed.len() == 1 {
                let open = |u: &str| task.user_state(u).unwrap().unwrap().has_open_window();
                assert_eq!(["u0", "u1", "u2"].map(open), [false, false, true], "the longest quiet first");
            }
        }
        assert_eq!(closed, vec![2, 2, 1]);
        assert_eq!(task.open_users(), 0);
    }

    #[test]
    fn past_the_cap_the_longest_quiet_users_close_early_and_a_typing_one_stays() {
        let mut detector = Detector::new(DetectorConfig::default()).unwrap();
        let start = Instant::now();
        let mut task = Task::open(0, MemoryStore::new(), start).unwrap();
        let mut producer = MemoryProducer::default();
        let typist = agent_records("typist", &macro_events(120)); // 6 records
        let mut evicted = 0;
        for (i, typed) in typist.iter().enumerate() {
            let newcomer = &agent_records(&format!("u{i}"), &macro_events(5))[0];
            let batch = [
                InputRecord { offset: 2 * i as i64, ..typed.clone() },
                InputRecord { offset: 2 * i as i64 + 1, ..newcomer.clone() },
            ];
            let mut ctx = ctx(&mut detector, start + Duration::from_secs(i as u64));
            ctx.settings.max_open_users = 3;
            let outcome = task.run_batch(&mut ctx, &batch, &mut producer).unwrap();
            assert_eq!(outcome.idle_closed, 0, "nobody was quiet for the idle timeout");
            evicted += outcome.evicted_users;
            assert!(task.open_users() <= 3);
        }
        assert_eq!(evicted, 4, "u0 to u3 closed early, one a batch from the third on");
        assert!(["typist", "u4", "u5"].iter().all(|u| task.open_users.contains(u)));
        let closed = task.user_state("u0").unwrap().unwrap();
        assert!(!closed.has_open_window(), "an evicted user's window is closed in the store too");
    }

    #[test]
    fn an_agent_s_key_sums_are_kept_and_implausible_ones_counted_and_dropped() {
        let with_sums = |user: &str, sums: KeySums| {
            let mut records = agent_records(user, &macro_events(20));
            let mut batch = proto::KeyEventBatch::decode(records[0].payload.as_deref().unwrap()).unwrap();
            batch.key_sums = Some(wire::key_sums_to_proto(&sums));
            records[0].payload = Some(batch.encode_to_vec());
            records
        };
        let mut grouping = metronome_core::detect::dependence::KeyGrouping::default();
        let cfg = metronome_core::detect::dependence::DependenceConfig::default();
        let good = macro_events(700)
            .chunks(2)
            .filter_map(|e| {
                grouping.push(&cfg, &Press { down_us: e[0].time_us, key: e[0].key, hold_us: 30_000, repeats: 0 })
            })
            .next()
            .unwrap();
        let bad = KeySums { presses: 1, ..good };
        let (_, (kept, _), outcome) = run_batches(&[with_sums("m1", good)]);
        assert_eq!(outcome.key_sums_refused, 0);
        let (_, (dropped, _), outcome) = run_batches(&[with_sums("m1", bad)]);
        assert_eq!(outcome.key_sums_refused, 1, "more values than presses");
        assert_ne!(kept, dropped, "the good sums are in the user's state");
    }

    #[test]
    fn a_format_6_state_is_read_with_its_key_dependence_sums() {
        let (state, intake) = run_batches(&[agent_records("m1", &macro_events(35))]).1;
        let v6 = wire::versioned(STATE_FORMAT_V6, &(state.to_v6(), &intake));
        assert_eq!(decode_stored(&v6).unwrap(), (state.without_key_groups(), intake));
    }

    #[test]
    fn a_format_5_state_is_read_with_a_full_budget() {
        let (state, _) = run_batches(&[agent_records("m1", &macro_events(35))]).1;
        let v5 = wire::versioned(STATE_FORMAT_V5, &(state.to_v6(), UserIntakeV5::default()));
        assert_eq!(decode_stored(&v5).unwrap(), (state.without_key_groups(), UserIntake::default()));
    }

    #[test]
    fn a_format_4_state_is_read_with_an_empty_intake() {
        let (state, _) = run_batches(&[agent_records("m1", &macro_events(35))]).1;
        let v4 = wire::versioned(STATE_FORMAT_V4, &state.to_v6());
        assert_eq!(decode_stored(&v4).unwrap(), (state.without_key_groups(), UserIntake::default()));
    }

    #[test]
    fn states_and_checkpoints_round_trip_and_garbage_is_refused() {
        let state = UserState::default();
        let intake = UserIntake { shift_us: Some(-5), ..UserIntake::default() };
        assert_eq!(decode_stored(&encode_state(&state, &intake)).unwrap(), (state.clone(), intake.clone()));
        assert_eq!(decode_state(&encode_state(&state, &intake)).unwrap(), state);
        assert!(matches!(decode_state(&[9, 1, 2]), Err(TaskError::CorruptState(_))));
        assert!(matches!(decode_state(&[]), Err(TaskError::CorruptState(_))));
        let key = user_key("ü-1").unwrap();
        assert_eq!(user_of_key(&key), Some("ü-1"));
        assert_eq!(user_of_key(&key[..key.len() - 1]), None);
    }
}
