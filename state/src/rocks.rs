//! The RocksDB backend: one database directory per store (a stream task owns one per partition).
//!
//! Memory is bounded per process, not per store: every store opened with the same
//! [`RocksResources`] shares one block cache and one write-buffer budget, so a processor that is
//! assigned more partitions does not use proportionally more memory.
//!
//! Writes are atomic ([`rocksdb::WriteBatch`]) and go through the write-ahead log without an
//! fsync: a crash may lose the last batches, which the processor detects (the checkpoint written
//! in the same batch is then behind the committed offsets) and repairs from the changelog.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, DBCompressionType, Direction, IteratorMode, Options,
    WriteBufferManager, DB,
};
use serde::{Deserialize, Serialize};

use crate::{Entry, Store, StoreError, WriteBatch, WriteOp};

/// RocksDB tuning. Defaults suit a processor holding a few partitions of per-user windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RocksOptions {
    /// Size of one memtable before it is flushed to disk. Default 16 MiB.
    pub write_buffer_bytes: usize,
    /// Memtables per store (one active, the rest flushing). Default 2.
    pub max_write_buffers: i32,
    /// Block cache shared by every store of the process, for blocks: the cache is made this
    /// much larger than `total_write_buffer_bytes`, which is charged to it. Default 64 MiB.
    pub block_cache_bytes: usize,
    /// Cap on all memtables of all stores of the process; past it RocksDB flushes early.
    /// Default 64 MiB.
    pub total_write_buffer_bytes: usize,
    /// Open files per store; -1 keeps them all open. Default 256.
    pub max_open_files: i32,
    /// Compress blocks with LZ4. Default true (state values are small, repetitive structs).
    pub compression: bool,
}

impl Default for RocksOptions {
    fn default() -> Self {
        Self {
            write_buffer_bytes: 16 << 20,
            max_write_buffers: 2,
            block_cache_bytes: 64 << 20,
            total_write_buffer_bytes: 64 << 20,
            max_open_files: 256,
            compression: true,
        }
    }
}

/// Memory shared by every store of a process: the block cache and the write-buffer budget.
#[derive(Clone)]
pub struct RocksResources {
    options: RocksOptions,
    cache: Cache,
    write_buffers: Arc<WriteBufferManager>,
}

impl std::fmt::Debug for RocksResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksResources").field("options", &self.options).finish_non_exhaustive()
    }
}

impl RocksResources {
    /// Allocates the shared cache and write-buffer budget described by `options`.
    pub fn new(options: RocksOptions) -> Self {
        // Memtable memory is charged to the cache, so the two budgets add up to one bound; the
        // cache holds both, or full memtables would leave no room for blocks and every read
        // would fetch and decompress its index again.
        let cache = Cache::new_lru_cache(options.block_cache_bytes + options.total_write_buffer_bytes);
        let write_buffers = Arc::new(WriteBufferManager::new_write_buffer_manager_with_cache(
            options.total_write_buffer_bytes,
            false,
            cache.clone(),
        ));
        Self { options, cache, write_buffers }
    }

    /// The options these resources were built from.
    pub fn options(&self) -> &RocksOptions {
        &self.options
    }

    /// Bytes in the shared block cache (memtables included, as they are charged to it).
    pub fn cache_usage_bytes(&self) -> usize {
        self.cache.get_usage()
    }

    fn db_options(&self) -> Options {
        let o = &self.options;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_write_buffer_size(o.write_buffer_bytes);
        opts.set_max_write_buffer_number(o.max_write_buffers);
        opts.set_max_open_files(o.max_open_files);
        opts.set_write_buffer_manager(&self.write_buffers);
        opts.set_compression_type(if o.compression { DBCompressionType::Lz4 } else { DBCompressionType::None });
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&self.cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_bloom_filter(10.0, false);
        // Partitioned index and filters, their small top level pinned: a read needs one
        // partition of each in the cache, not a whole file's index (a flood of new ids makes
        // files of a million small states, whose index alone outgrows a share of the cache).
        table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_partition_filters(true);
        table.set_metadata_block_size(4096);
        table.set_pin_top_level_index_and_filter(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        opts.set_block_based_table_factory(&table);
        opts
    }
}

impl Default for RocksResources {
    fn default() -> Self {
        Self::new(RocksOptions::default())
    }
}

/// A [`Store`] in a RocksDB directory.
pub struct RocksStore {
    db: DB,
    path: PathBuf,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn backend(e: rocksdb::Error) -> StoreError {
    // RocksDB's messages name files and options, never keys or values.
    StoreError::Backend(e.into_string())
}

impl RocksStore {
    /// Opens (creating if missing) the store at `path`.
    pub fn open(path: impl AsRef<Path>, resources: &RocksResources) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path).map_err(|e| StoreError::Backend(format!("creating {}: {e}", path.display())))?;
        let db = DB::open(&resources.db_options(), &path).map_err(backend)?;
        Ok(Self { db, path })
    }

    /// Deletes the store at `path` and everything in it. Absent is fine.
    pub fn destroy(path: impl AsRef<Path>) -> Result<(), StoreError> {
        let path = path.as_ref();
        if !path.exists() {
            return Ok(());
        }
        DB::destroy(&Options::default(), path).map_err(backend)?;
        match std::fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Backend(format!("removing {}: {e}", path.display()))),
        }
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An integer RocksDB property (`rocksdb.estimate-live-data-size`, ...), for metrics.
    pub fn property(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.db.property_int_value(name).map_err(backend)
    }

    /// Flushes memtables to disk, so a clean close leaves nothing to replay from the log.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)
    }
}

impl Store for RocksStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(key).map_err(backend)
    }

    fn write(&mut self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut rb = rocksdb::WriteBatch::default();
        for op in batch.ops() {
            match op {
                WriteOp::Put { key, value } => rb.put(key, value),
                WriteOp::Delete { key } => rb.delete(key),
                WriteOp::DeleteRange { from, to } => {
                    // RocksDB would accept a reversed range as a no-op; the Store contract refuses it.
                    if from > to {
                        return Err(StoreError::InvalidRange("delete_range: start after end"));
                    }
                    rb.delete_range(from, to)
                }
            }
        }
        self.db.write(rb).map_err(backend)
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(prefix, Direction::Forward)) {
            let (key, value) = item.map_err(backend)?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.into_vec(), value.into_vec()));
        }
        Ok(out)
    }

    fn approximate_len(&self) -> Result<u64, StoreError> {
        Ok(self.property("rocksdb.estimate-num-keys")?.unwrap_or(0))
    }

    fn compact(&mut self) -> Result<(), StoreError> {
        // Memtables first, so the deletes are in the files the compaction rewrites.
        self.db.flush().map_err(backend)?;
        self.db.compact_range::<&[u8], &[u8]>(None, None);
        Ok(())
    }
}
