//! Recovery: a task's store made consistent with the committed input position before the task
//! runs, for the processor's tasks and the fleet stages' alike.
//!
//! The store is trusted only up to its checkpoint. A store that claims more input than the group
//! committed is deleted and rebuilt; otherwise the changelog is replayed from the checkpoint's
//! changelog offset to its committed end, and the checkpoint then names the committed position.

use std::path::Path;

use metronome_state::{RocksResources, RocksStore};

use super::kafka::{self, Clients};
use super::processor::ProcessError;
use super::task::{self, Checkpoint, TaskError};

/// What [`recover`] brought back.
pub struct Recovered {
    /// The consistent store.
    pub store: RocksStore,
    /// Changelog records replayed into it.
    pub replayed: u64,
}

/// Opens the store in `dir` for `partition` and brings it to the committed position
/// `committed` from `changelog`. `progress` hears `(replayed, approximate total)`.
pub fn recover(
    clients: &Clients,
    resources: &RocksResources,
    dir: &Path,
    changelog: &str,
    partition: i32,
    committed: Option<i64>,
    progress: impl FnMut(u64, u64),
) -> Result<Recovered, ProcessError> {
    let task_err = |source: TaskError| ProcessError::Task { partition, source };
    let mut store = RocksStore::open(dir, resources).map_err(|e| task_err(e.into()))?;
    let mut checkpoint = task::read_checkpoint(&store).map_err(task_err)?;
    let ahead = match (checkpoint.input_offset, committed) {
        (Some(local), Some(kafka)) => local > kafka,
        (Some(_), None) => true,
        _ => false,
    };
    if ahead {
        // The store claims input the group never committed: it cannot be trusted at all.
        tracing::warn!(partition, changelog, "local state is ahead of the committed position; rebuilding it");
        drop(store);
        RocksStore::destroy(dir).map_err(|e| task_err(e.into()))?;
        store = RocksStore::open(dir, resources).map_err(|e| task_err(e.into()))?;
        checkpoint = Checkpoint::EMPTY;
    }
    let (replayed, position) =
        clients.restore(changelog, partition, &mut store, checkpoint.changelog_offset, progress)?;
    let checkpoint = Checkpoint { input_offset: committed, changelog_offset: position };
    kafka::write_checkpoint(&mut store, checkpoint).map_err(task_err)?;
    Ok(Recovered { store, replayed })
}
