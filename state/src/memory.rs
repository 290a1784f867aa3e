//! In-memory backend: a `BTreeMap`, so iteration order is byte order like on disk.

use std::collections::BTreeMap;

use crate::{Entry, Store, StoreError, WriteBatch, WriteOp};

/// A [`Store`] held in memory. Used by the offline scorer and as the reference backend in tests.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.get(key).cloned())
    }

    fn write(&mut self, batch: &WriteBatch) -> Result<(), StoreError> {
        // Validate first so a bad batch changes nothing (atomicity).
        for op in batch.ops() {
            if let WriteOp::DeleteRange { from, to } = op {
                if from > to {
                    return Err(StoreError::InvalidRange("delete_range: start after end"));
                }
            }
        }
        for op in batch.ops() {
            match op {
                WriteOp::Put { key, value } => {
                    self.map.insert(key.clone(), value.clone());
                }
                WriteOp::Delete { key } => {
                    self.map.remove(key);
                }
                WriteOp::DeleteRange { from, to } => {
                    let doomed: Vec<Vec<u8>> =
                        self.map.range(from.clone()..to.clone()).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        self.map.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn approximate_len(&self) -> Result<u64, StoreError> {
        Ok(self.map.len() as u64)
    }
}
