//! Recovery: a task's store made consistent with the committed input position before the task
//! runs, for the processor's tasks and the fleet stages' alike.
//!
//! The store is trusted only up to its checkpoint, and only while the changelog still holds
//! what comes after it. [`plan`] decides, from the checkpoint, the group's committed position and
//! the changelog's watermarks alone, whether the store is replayed onwards or rebuilt:
//!
//! | the store | plan |
//! |---|---|
//! | behind or level with the committed position | replay from its checkpoint's changelog offset |
//! | ahead of it (input the group never committed) | rebuild from the changelog's start |
//! | its changelog offset past the changelog's end (the topic recreated) | rebuild |
//! | its changelog offset before the changelog's start (records deleted under it) | rebuild |
//!
//! A rebuild gives the state any other instance restoring the partition would get, as Kafka
//! Streams does on an out-of-range changelog offset. Replaying records the store already holds
//! is harmless: each record is a user's whole state, so the last one wins. A record without a
//! key cannot be placed in the store and fails the restore ([`RecoveryError::Corrupt`]).
//!
//! [`restore`] runs a plan over two seams, a [`StoreFactory`] and a [`ChangelogSource`]: RocksDB
//! and the changelog topic in production ([`recover`]), memory in the unit tests.

use std::path::Path;

use metronome_state::{RocksResources, RocksStore, Store, StoreError, WriteBatch};

use super::kafka::{Clients, KafkaEdgeError};
use super::processor::ProcessError;
use super::task::{self, Checkpoint, TaskError};

/// Changelog records written to the store at a time (and between progress reports).
const RESTORE_BATCH: usize = 1_000;

/// Why a store's contents cannot be carried on from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildReason {
    /// The store holds input the group never committed.
    StoreAhead,
    /// The store's changelog offset lies past the changelog's end: the topic was recreated.
    ChangelogRecreated,
    /// The store's changelog offset lies before the changelog's start: records it needed are gone.
    ChangelogTruncated,
}

/// What a restore does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Keep the store and replay the changelog from `from`.
    Replay {
        /// First changelog offset to replay.
        from: i64,
    },
    /// Delete the store and replay the changelog from `from`, its start.
    Rebuild {
        /// Why the store is not kept.
        reason: RebuildReason,
        /// First changelog offset to replay.
        from: i64,
    },
}

/// Decides how a store with `checkpoint` is brought to the group's `committed` input position
/// from a changelog holding offsets `[low, high)`.
pub fn plan(checkpoint: Checkpoint, committed: Option<i64>, (low, high): (i64, i64)) -> Plan {
    let ahead = match (checkpoint.input_offset, committed) {
        (Some(local), Some(group)) => local > group,
        (Some(_), None) => true,
        (None, _) => false,
    };
    let rebuild = |reason| Plan::Rebuild { reason, from: low };
    if ahead {
        return rebuild(RebuildReason::StoreAhead);
    }
    if checkpoint.changelog_offset > high {
        return rebuild(RebuildReason::ChangelogRecreated);
    }
    // Offset 0 is where every store starts, not a position it was brought to.
    if checkpoint.changelog_offset > 0 && checkpoint.changelog_offset < low {
        return rebuild(RebuildReason::ChangelogTruncated);
    }
    Plan::Replay { from: checkpoint.changelog_offset.max(low) }
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The store could not be opened, read, written or deleted.
    #[error(transparent)]
    Store(#[from] TaskError),
    /// The changelog could not be read.
    #[error(transparent)]
    Changelog(#[from] KafkaEdgeError),
    /// A changelog record cannot be applied.
    #[error("corrupt changelog: {0}")]
    Corrupt(&'static str),
}

impl RecoveryError {
    /// The processor's error for a failed restore of `partition`.
    pub fn for_partition(self, partition: i32) -> ProcessError {
        match self {
            Self::Store(source) => ProcessError::Task { partition, source },
            Self::Changelog(e) => ProcessError::Kafka(e),
            Self::Corrupt(what) => {
                ProcessError::Kafka(KafkaEdgeError::Restore { partition, source: TaskError::CorruptState(what) })
            }
        }
    }
}

impl From<StoreError> for RecoveryError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.into())
    }
}

/// Where a task's store comes from and how it is thrown away.
pub trait StoreFactory {
    /// The store it opens.
    type Store: Store;
    /// Opens the store (created empty if there is none).
    fn open(&self) -> Result<Self::Store, StoreError>;
    /// Deletes the store; the caller has dropped every handle on it.
    fn destroy(&self) -> Result<(), StoreError>;
}

/// A RocksDB store in its task directory.
pub struct RocksDir<'a> {
    /// The task's directory.
    pub dir: &'a Path,
    /// The process's shared cache and write-buffer budget.
    pub resources: &'a RocksResources,
}

impl StoreFactory for RocksDir<'_> {
    type Store = RocksStore;

    fn open(&self) -> Result<RocksStore, StoreError> {
        RocksStore::open(self.dir, self.resources)
    }

    fn destroy(&self) -> Result<(), StoreError> {
        RocksStore::destroy(self.dir)
    }
}

/// One changelog record as a restore applies it.
#[derive(Debug, Clone, Copy)]
pub struct ChangelogRecord<'a> {
    /// The store key.
    pub key: Option<&'a [u8]>,
    /// The value; `None` is a tombstone.
    pub value: Option<&'a [u8]>,
}

/// A task's changelog partition as a restore reads it.
pub trait ChangelogSource {
    /// The offsets the changelog holds, `[low, high)`, high being its committed end.
    fn watermarks(&mut self) -> Result<(i64, i64), RecoveryError>;

    /// Hands every record from `from` to the committed end `high` (from [`watermarks`](Self::watermarks))
    /// to `apply`, in order, and returns the position past the end (past any commit markers that
    /// follow the last record).
    fn replay(
        &mut self,
        from: i64,
        high: i64,
        apply: &mut dyn FnMut(ChangelogRecord<'_>) -> Result<(), RecoveryError>,
    ) -> Result<i64, RecoveryError>;
}

/// What a restore brought back.
pub struct Restored<S> {
    /// The consistent store; its checkpoint names the committed position.
    pub store: S,
    /// Changelog records replayed into it.
    pub replayed: u64,
    /// What was done.
    pub plan: Plan,
}

/// Opens the task's store and brings it to the committed input position `committed` from its
/// changelog, following [`plan`]. `progress` hears `(replayed, approximate total)`.
pub fn restore<F: StoreFactory, C: ChangelogSource>(
    stores: &F,
    changelog: &mut C,
    committed: Option<i64>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Restored<F::Store>, RecoveryError> {
    let mut store = stores.open()?;
    let checkpoint = task::read_checkpoint(&store)?;
    let (low, high) = changelog.watermarks()?;
    let plan = plan(checkpoint, committed, (low, high));
    let from = match plan {
        Plan::Replay { from } => from,
        Plan::Rebuild { from, .. } => {
            drop(store);
            stores.destroy()?;
            store = stores.open()?;
            from
        }
    };
    let total = (high - from).max(0) as u64;
    let mut batch = WriteBatch::new();
    let mut replayed = 0u64;
    let position = changelog.replay(from, high, &mut |record| {
        let key = record.key.ok_or(RecoveryError::Corrupt("a record without a key"))?;
        task::apply_changelog_record(&mut batch, key, record.value);
        replayed += 1;
        if batch.len() >= RESTORE_BATCH {
            store.write(&batch)?;
            batch.clear();
            progress(replayed, total);
        }
        Ok(())
    })?;
    task::put_checkpoint(&mut batch, Checkpoint { input_offset: committed, changelog_offset: position.max(from) });
    store.write(&batch)?;
    progress(replayed, total);
    Ok(Restored { store, replayed, plan })
}

/// [`restore`] of the RocksDB store in `dir` for `partition` from the topic `changelog`.
pub fn recover(
    clients: &Clients,
    resources: &RocksResources,
    dir: &Path,
    changelog: &str,
    partition: i32,
    committed: Option<i64>,
    progress: impl FnMut(u64, u64),
) -> Result<Restored<RocksStore>, ProcessError> {
    let mut source = clients.changelog(changelog, partition)?;
    let restored = restore(&RocksDir { dir, resources }, &mut source, committed, progress)
        .map_err(|e| e.for_partition(partition))?;
    if let Plan::Rebuild { reason, .. } = restored.plan {
        tracing::warn!(
            partition,
            changelog,
            ?reason,
            "the local state could not be carried on from; rebuilt it from the changelog"
        );
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use metronome_state::MemoryStore;

    use super::*;

    /// A store kept in memory across opens; `destroy` empties it.
    #[derive(Default)]
    struct MemoryStores {
        kept: RefCell<MemoryStore>,
        destroyed: RefCell<u32>,
    }

    impl MemoryStores {
        fn holding(entries: &[(&[u8], &[u8])], checkpoint: Checkpoint) -> Self {
            let mut batch = WriteBatch::new();
            for (k, v) in entries {
                batch.put(k.to_vec(), v.to_vec());
            }
            task::put_checkpoint(&mut batch, checkpoint);
            let mut store = MemoryStore::new();
            store.write(&batch).unwrap();
            Self { kept: RefCell::new(store), destroyed: RefCell::new(0) }
        }
    }

    impl StoreFactory for MemoryStores {
        type Store = MemoryStore;

        fn open(&self) -> Result<MemoryStore, StoreError> {
            Ok(self.kept.borrow().clone())
        }

        fn destroy(&self) -> Result<(), StoreError> {
            *self.kept.borrow_mut() = MemoryStore::new();
            *self.destroyed.borrow_mut() += 1;
            Ok(())
        }
    }

    /// A changelog record in memory: its key and value, either missing.
    type OwnedRecord = (Option<Vec<u8>>, Option<Vec<u8>>);

    /// A changelog partition in memory: records at offsets `low..`, and a commit marker after
    /// the last one.
    struct MemoryChangelog {
        low: i64,
        records: Vec<OwnedRecord>,
        replayed_from: Option<i64>,
    }

    impl MemoryChangelog {
        fn new(low: i64, records: &[(&[u8], Option<&[u8]>)]) -> Self {
            let records = records.iter().map(|(k, v)| (Some(k.to_vec()), v.map(<[u8]>::to_vec))).collect();
            Self { low, records, replayed_from: None }
        }

        fn high(&self) -> i64 {
            // The marker of the transaction that wrote the records takes one offset.
            self.low + self.records.len() as i64 + i64::from(!self.records.is_empty())
        }
    }

    impl ChangelogSource for MemoryChangelog {
        fn watermarks(&mut self) -> Result<(i64, i64), RecoveryError> {
            Ok((self.low, self.high()))
        }

        fn replay(
            &mut self,
            from: i64,
            high: i64,
            apply: &mut dyn FnMut(ChangelogRecord<'_>) -> Result<(), RecoveryError>,
        ) -> Result<i64, RecoveryError> {
            assert_eq!(high, self.high(), "the end the watermarks gave");
            self.replayed_from = Some(from);
            let skip = (from - self.low).max(0) as usize;
            for (key, value) in self.records.iter().skip(skip) {
                apply(ChangelogRecord { key: key.as_deref(), value: value.as_deref() })?;
            }
            Ok(self.high().max(from))
        }
    }

    fn checkpoint(input_offset: Option<i64>, changelog_offset: i64) -> Checkpoint {
        Checkpoint { input_offset, changelog_offset }
    }

    fn run(stores: &MemoryStores, log: &mut MemoryChangelog, committed: Option<i64>) -> Restored<MemoryStore> {
        restore(stores, log, committed, |_, _| {}).unwrap()
    }

    #[test]
    fn the_plan_follows_the_checkpoint_the_commit_and_the_watermarks() {
        let level = checkpoint(Some(10), 4);
        assert_eq!(plan(level, Some(10), (0, 6)), Plan::Replay { from: 4 });
        assert_eq!(plan(checkpoint(Some(8), 4), Some(10), (0, 6)), Plan::Replay { from: 4 }, "behind");
        assert_eq!(plan(Checkpoint::EMPTY, Some(10), (3, 6)), Plan::Replay { from: 3 }, "a fresh store");
        assert_eq!(plan(Checkpoint::EMPTY, None, (0, 0)), Plan::Replay { from: 0 });
        let rebuild = |reason, from| Plan::Rebuild { reason, from };
        assert_eq!(plan(checkpoint(Some(12), 4), Some(10), (0, 6)), rebuild(RebuildReason::StoreAhead, 0));
        assert_eq!(
            plan(checkpoint(Some(1), 0), None, (0, 6)),
            rebuild(RebuildReason::StoreAhead, 0),
            "never committed"
        );
        assert_eq!(plan(level, Some(10), (0, 2)), rebuild(RebuildReason::ChangelogRecreated, 0));
        assert_eq!(plan(level, Some(10), (5, 9)), rebuild(RebuildReason::ChangelogTruncated, 5));
    }

    #[test]
    fn a_store_behind_is_kept_and_replayed_from_its_checkpoint() {
        let stores = MemoryStores::holding(&[(b"u1", b"old"), (b"u2", b"kept")], checkpoint(Some(5), 2));
        let mut log = MemoryChangelog::new(0, &[(b"u1", Some(b"old")), (b"u2", Some(b"kept")), (b"u1", Some(b"new"))]);
        let restored = run(&stores, &mut log, Some(9));
        assert_eq!(restored.plan, Plan::Replay { from: 2 });
        assert_eq!((restored.replayed, log.replayed_from), (1, Some(2)));
        assert_eq!(restored.store.get(b"u1").unwrap().as_deref(), Some(&b"new"[..]));
        assert_eq!(restored.store.get(b"u2").unwrap().as_deref(), Some(&b"kept"[..]));
        assert_eq!(task::read_checkpoint(&restored.store).unwrap(), checkpoint(Some(9), 4), "past the marker");
        assert_eq!(*stores.destroyed.borrow(), 0);
    }

    #[test]
    fn a_store_ahead_of_the_commit_is_rebuilt_from_the_changelog() {
        // The store holds a batch whose transaction never committed.
        let stores =
            MemoryStores::holding(&[(b"u1", b"uncommitted"), (b"u9", b"uncommitted")], checkpoint(Some(20), 3));
        let mut log = MemoryChangelog::new(0, &[(b"u1", Some(b"committed"))]);
        let restored = run(&stores, &mut log, Some(10));
        assert_eq!(restored.plan, Plan::Rebuild { reason: RebuildReason::StoreAhead, from: 0 });
        assert_eq!(*stores.destroyed.borrow(), 1);
        assert_eq!(restored.store.get(b"u1").unwrap().as_deref(), Some(&b"committed"[..]));
        assert_eq!(restored.store.get(b"u9").unwrap(), None);
        assert_eq!(task::read_checkpoint(&restored.store).unwrap(), checkpoint(Some(10), 2));
    }

    #[test]
    fn a_recreated_changelog_rebuilds_the_store_to_what_it_holds() {
        let stores = MemoryStores::holding(&[(b"u1", b"from the old topic")], checkpoint(Some(10), 40));
        let mut log = MemoryChangelog::new(0, &[(b"u2", Some(b"new topic"))]);
        let restored = run(&stores, &mut log, Some(10));
        assert_eq!(restored.plan, Plan::Rebuild { reason: RebuildReason::ChangelogRecreated, from: 0 });
        assert_eq!(restored.store.get(b"u1").unwrap(), None);
        assert_eq!(restored.store.get(b"u2").unwrap().as_deref(), Some(&b"new topic"[..]));
        // The checkpoint names the new topic's end, so its next records are not skipped.
        assert_eq!(task::read_checkpoint(&restored.store).unwrap(), checkpoint(Some(10), 2));
    }

    #[test]
    fn a_truncated_changelog_rebuilds_the_store_from_its_new_start() {
        let stores = MemoryStores::holding(&[(b"u1", b"stale")], checkpoint(Some(10), 2));
        let mut log = MemoryChangelog::new(5, &[(b"u2", Some(b"after the gap")), (b"u3", None)]);
        let restored = run(&stores, &mut log, Some(12));
        assert_eq!(restored.plan, Plan::Rebuild { reason: RebuildReason::ChangelogTruncated, from: 5 });
        assert_eq!(restored.store.get(b"u1").unwrap(), None, "a user updated in the gap is not kept stale");
        assert_eq!(restored.store.get(b"u2").unwrap().as_deref(), Some(&b"after the gap"[..]));
        assert_eq!((restored.replayed, log.replayed_from), (2, Some(5)));
        assert_eq!(task::read_checkpoint(&restored.store).unwrap(), checkpoint(Some(12), 8));
    }

    #[test]
    fn tombstones_delete_and_an_empty_changelog_leaves_an_empty_store() {
        let stores = MemoryStores::default();
        let mut log = MemoryChangelog::new(0, &[(b"u1", Some(b"v")), (b"u2", Some(b"v")), (b"u1", None)]);
        let restored = run(&stores, &mut log, Some(3));
        assert_eq!(restored.store.get(b"u1").unwrap(), None);
        assert_eq!(restored.store.get(b"u2").unwrap().as_deref(), Some(&b"v"[..]));

        let restored = run(&MemoryStores::default(), &mut MemoryChangelog::new(0, &[]), None);
        assert_eq!((restored.replayed, restored.plan), (0, Plan::Replay { from: 0 }));
        assert_eq!(task::read_checkpoint(&restored.store).unwrap(), Checkpoint::EMPTY);
    }

    #[test]
    fn a_record_without_a_key_fails_the_restore() {
        let stores = MemoryStores::holding(&[], checkpoint(Some(1), 0));
        let mut log = MemoryChangelog::new(0, &[(b"u1", Some(b"v"))]);
        log.records.push((None, Some(b"no key".to_vec())));
        let err = restore(&stores, &mut log, Some(1), |_, _| {}).err().expect("a keyless record fails");
        assert!(matches!(err, RecoveryError::Corrupt(_)), "{err}");
    }

    #[test]
    fn progress_is_reported_per_batch_and_at_the_end() {
        let records: Vec<(Vec<u8>, Vec<u8>)> =
            (0..2_500).map(|i| (format!("u{i}").into_bytes(), b"v".to_vec())).collect();
        let borrowed: Vec<(&[u8], Option<&[u8]>)> =
            records.iter().map(|(k, v)| (k.as_slice(), Some(v.as_slice()))).collect();
        let mut log = MemoryChangelog::new(0, &borrowed);
        let mut heard = Vec::new();
        let restored = restore(&MemoryStores::default(), &mut log, Some(7), |n, total| heard.push((n, total))).unwrap();
        assert_eq!(heard, [(1_000, 2_501), (2_000, 2_501), (2_500, 2_501)]);
        assert_eq!(restored.store.approximate_len().unwrap(), 2_501, "every user and the checkpoint");
    }
}
