//! In-memory twins of the sink's seams, for the loop's unit tests: a [`MemoryAlertStore`] with
//! the SQL's semantics (offsets under the batch, ids once) and scripted failures, and a
//! [`MemoryAlertSource`] with partitions, positions, pauses, reassignments by receive number,
//! and a [`ManualClock`] that a wait moves on instead of sleeping.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metronome_core::clock::ManualClock;
use metronome_core::proto;
use prost::Message as _;

use super::seams::{AlertSource, AlertStore, Offsets, StoreFailure};
use super::store::{plan_batch, SinkRecord, WriteSummary};
use super::SinkError;
use tokio_util::sync::CancellationToken;

/// What the store does with one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Works.
    Pass,
    /// Fails as an unreachable store does: retried.
    Down,
    /// Fails for good, before anything is written.
    Fatal,
    /// Writes and commits, then fails for good (a crash after the commit).
    FatalAfterCommit,
}

/// What the store holds, shared by every handle (a restarted sink sees it).
#[derive(Debug, Default)]
pub struct StoreState {
    /// Alerts by id.
    pub alerts: BTreeMap<String, proto::Alert>,
    /// Positions of records kept as dead letters.
    pub dead_letters: BTreeSet<(i32, i64)>,
    /// Next offsets by (consumer, topic).
    pub offsets: BTreeMap<(String, String), Offsets>,
    /// Records in each committed write, in order.
    pub batches: Vec<usize>,
    /// What the next offset loads do, in order (then: pass).
    pub loads: VecDeque<Attempt>,
    /// What the next writes do, in order (then: pass).
    pub writes: VecDeque<Attempt>,
}

/// An alert store in memory.
#[derive(Clone, Default)]
pub struct MemoryAlertStore(Arc<Mutex<StoreState>>);

impl MemoryAlertStore {
    /// What it holds.
    pub fn state(&self) -> MutexGuard<'_, StoreState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn failure(attempt: Attempt, stage: &'static str) -> Option<StoreFailure> {
    match attempt {
        Attempt::Pass | Attempt::FatalAfterCommit => None,
        Attempt::Down => Some(StoreFailure::Retry { stage, error: "connection refused".into() }),
        Attempt::Fatal => Some(StoreFailure::Fatal("certificate not trusted".into())),
    }
}

impl AlertStore for MemoryAlertStore {
    async fn load_offsets(&mut self, consumer: &str, topic: &str) -> Result<Offsets, StoreFailure> {
        let mut s = self.state();
        if let Some(f) = failure(s.loads.pop_front().unwrap_or(Attempt::Pass), "connect") {
            return Err(f);
        }
        Ok(s.offsets.get(&(consumer.to_owned(), topic.to_owned())).cloned().unwrap_or_default())
    }

    async fn write_batch(
        &mut self,
        consumer: &str,
        topic: &str,
        records: &[SinkRecord],
    ) -> Result<(WriteSummary, Offsets), StoreFailure> {
        let mut s = self.state();
        let attempt = s.writes.pop_front().unwrap_or(Attempt::Pass);
        if let Some(f) = failure(attempt, "write") {
            return Err(f);
        }
        let stored = s.offsets.get(&(consumer.to_owned(), topic.to_owned())).cloned().unwrap_or_default();
        let plan = plan_batch(records, stored);
        let mut summary = WriteSummary { already_written: plan.already_written, ..WriteSummary::default() };
        for record in plan.records {
            match record {
                SinkRecord::Alert { alert, .. } => {
                    if s.alerts.contains_key(&alert.alert_id) {
                        summary.duplicates += 1;
                    } else {
                        s.alerts.insert(alert.alert_id.clone(), (**alert).clone());
                        summary.written += 1;
                    }
                }
                SinkRecord::Undecodable { partition, offset, .. } => {
                    s.dead_letters.insert((*partition, *offset));
                    summary.dead_letters += 1;
                }
            }
        }
        s.offsets.insert((consumer.to_owned(), topic.to_owned()), plan.next.clone());
        s.batches.push(records.len());
        if attempt == Attempt::FatalAfterCommit {
            return Err(StoreFailure::Fatal("crash after the commit".into()));
        }
        Ok((summary, plan.next))
    }
}

/// The alert topic and the sink's member of its group.
#[derive(Debug)]
pub struct SourceState {
    /// Each partition's record values (`None`: a record without a value).
    pub partitions: Vec<Vec<Option<Vec<u8>>>>,
    /// Where the member reads next, by assigned partition.
    pub positions: BTreeMap<i32, i64>,
    /// Where assignments start (the sink's `starts`, advanced by `written`).
    pub starts: Offsets,
    /// The group's committed offsets (what lag tools see).
    pub committed: Offsets,
    /// Whether fetching is paused.
    pub paused: bool,
    /// Each pause and resume, in order.
    pub pause_changes: Vec<bool>,
    /// Records still delivered after a pause (standing for what was fetched before it).
    pub in_flight_after_pause: usize,
    /// Receive numbers at which every partition is revoked and assigned again.
    pub reassign_at: BTreeSet<u64>,
    /// Receives so far.
    pub receives: u64,
    /// Cancel `shutdown` at this receive (`None`: once everything is written).
    pub stop_at: Option<u64>,
    /// Whether the group was joined, and left.
    pub joined: bool,
    /// Whether the member left the group.
    pub left: bool,
    shutdown: Option<CancellationToken>,
}

/// The alert topic in memory, on a manual clock.
#[derive(Clone)]
pub struct MemoryAlertSource {
    state: Arc<Mutex<SourceState>>,
    clock: Arc<ManualClock>,
}

/// A receive that finds nothing this many times in a row stops the run (a test that would hang).
const GIVE_UP_AFTER: u64 = 100_000;

impl MemoryAlertSource {
    /// A topic holding `partitions`, read on `clock`.
    pub fn new(partitions: Vec<Vec<Option<Vec<u8>>>>, clock: Arc<ManualClock>) -> Self {
        let state = SourceState {
            partitions,
            positions: BTreeMap::new(),
            starts: Offsets::new(),
            committed: Offsets::new(),
            paused: false,
            pause_changes: Vec::new(),
            in_flight_after_pause: 0,
            reassign_at: BTreeSet::new(),
            receives: 0,
            stop_at: None,
            joined: false,
            left: false,
            shutdown: None,
        };
        Self { state: Arc::new(Mutex::new(state)), clock }
    }

    /// Its state.
    pub fn state(&self) -> MutexGuard<'_, SourceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topic's end offsets of non-empty partitions.
    pub fn ends(&self) -> Offsets {
        let s = self.state();
        s.partitions
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(p, r)| (p as i32, r.len() as i64))
            .collect()
    }
}

impl SourceState {
    fn assign_all(&mut self) {
        self.positions =
            (0..self.partitions.len() as i32).map(|p| (p, self.starts.get(&p).copied().unwrap_or(0))).collect();
    }

    fn next_record(&mut self) -> Option<SinkRecord> {
        if self.paused {
            if self.in_flight_after_pause == 0 {
                return None;
            }
            self.in_flight_after_pause -= 1;
        }
        let (partition, offset) = self
            .positions
            .iter()
            .map(|(&p, &o)| (p, o))
            .find(|&(p, o)| (o as usize) < self.partitions[p as usize].len())?;
        self.positions.insert(partition, offset + 1);
        let value = self.partitions[partition as usize][offset as usize].as_deref();
        Some(SinkRecord::decode(partition, offset, value))
    }

    fn all_written(&self) -> bool {
        self.partitions
            .iter()
            .enumerate()
            .all(|(p, r)| r.is_empty() || self.starts.get(&(p as i32)) == Some(&(r.len() as i64)))
    }
}

impl AlertSource for MemoryAlertSource {
    async fn join(&mut self, starts: &Offsets, shutdown: &CancellationToken) -> Result<bool, SinkError> {
        let mut s = self.state();
        s.starts = starts.clone();
        s.assign_all();
        s.joined = true;
        s.shutdown = Some(shutdown.clone());
        Ok(true)
    }

    async fn recv(&mut self, wait: Duration) -> Option<SinkRecord> {
        let mut s = self.state();
        s.receives += 1;
        let n = s.receives;
        if s.reassign_at.contains(&n) {
            s.assign_all();
        }
        let stop = match s.stop_at {
            Some(at) => n >= at,
            None => n >= GIVE_UP_AFTER,
        };
        if stop {
            s.shutdown.as_ref().expect("joined").cancel();
        }
        let record = s.next_record();
        if record.is_none() {
            if s.stop_at.is_none() && s.all_written() {
                s.shutdown.as_ref().expect("joined").cancel();
            }
            self.clock.advance(wait);
        }
        record
    }

    async fn idle(&mut self, wait: Duration) {
        self.clock.advance(wait);
    }

    fn written(&mut self, next: &Offsets) {
        let mut s = self.state();
        for (&p, &o) in next {
            let start = s.starts.entry(p).or_insert(o);
            *start = (*start).max(o);
            s.committed.insert(p, o);
        }
    }

    fn set_paused(&mut self, paused: bool) {
        let mut s = self.state();
        if s.paused != paused {
            s.paused = paused;
            s.pause_changes.push(paused);
        }
    }

    async fn leave(&mut self) {
        let mut s = self.state();
        s.positions.clear();
        s.left = true;
    }
}

/// `n` alert values with ids `alert-0000`..., spread over `partitions` partitions round-robin.
pub fn alert_partitions(n: usize, partitions: usize) -> Vec<Vec<Option<Vec<u8>>>> {
    let mut out = vec![Vec::new(); partitions];
    for i in 0..n {
        let alert = proto::Alert {
            alert_id: format!("alert-{i:04}"),
            user_id: format!("user-{}", i % 7),
            ..Default::default()
        };
        out[i % partitions].push(Some(alert.encode_to_vec()));
    }
    out
}
