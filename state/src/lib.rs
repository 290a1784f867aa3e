//! State stores for Metronome's stream tasks.
//!
//! A processor task keeps per-user state (window, histogram, incident) in a key-value store that
//! is local to the task and mirrored to a compacted changelog topic. This crate holds what every
//! backend shares; backends implement [`Store`].
//!
//! # Layout
//! - [`keys`]: key encoding. Keys sort by (namespace, user, time) in byte order, so a prefix scan
//!   visits one user's entries oldest first and a range delete prunes by time.
//! - [`batch`]: [`WriteBatch`], the atomic unit of change. The same batch is what the processor
//!   turns into changelog records, so local state and changelog cannot drift apart.
//! - [`memory`]: [`MemoryStore`], an in-memory backend for tests and for the offline scorer.
//! - [`rocks`]: [`RocksStore`], the RocksDB backend the stream tasks use, with [`RocksOptions`]
//!   and the per-process memory budget [`RocksResources`].
//! - [`suite`]: the behaviour every backend must show, as functions any backend's tests call.
//!   Both backends run it unchanged.

pub mod batch;
pub mod keys;
pub mod memory;
pub mod rocks;
pub mod suite;

pub use batch::{WriteBatch, WriteOp};
pub use memory::MemoryStore;
pub use rocks::{RocksOptions, RocksResources, RocksStore};

/// Errors a store can report. Messages never carry keys or values: keys embed user ids and values
/// hold keystroke timings.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, corruption, closed handle).
    #[error("state store backend failed: {0}")]
    Backend(String),
    /// A range or prefix argument was malformed.
    #[error("invalid key range: {0}")]
    InvalidRange(&'static str),
}

/// A key-value pair as returned by scans.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A sorted key-value store with atomic batches.
///
/// Keys are compared as raw bytes. Implementations must apply a [`WriteBatch`] atomically: after
/// a crash either every operation of the batch is visible or none is.
pub trait Store: Send {
    /// The value stored under `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Applies every operation of `batch`, in order, atomically.
    fn write(&mut self, batch: &WriteBatch) -> Result<(), StoreError>;

    /// Entries whose key starts with `prefix`, in ascending key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;

    /// Number of entries, for metrics and tests. May be an estimate on disk-backed stores.
    fn approximate_len(&self) -> Result<u64, StoreError>;

    /// Rewrites the store so deleted entries stop taking space (RocksDB drops tombstones and the
    /// values they cover). A no-op where deletes free space at once.
    fn compact(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}
