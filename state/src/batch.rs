//! Atomic write batches.

/// One change inside a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Store `value` under `key`, replacing what was there.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Remove `key`; absent keys are not an error.
    Delete { key: Vec<u8> },
    /// Remove every key in `[from, to)`.
    DeleteRange { from: Vec<u8>, to: Vec<u8> },
}

/// An ordered list of changes applied all at once.
///
/// The processor builds one batch per consumed record batch; after the Kafka transaction that
/// carries the matching changelog records commits, the batch is applied to the local store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a put.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(WriteOp::Put { key: key.into(), value: value.into() });
        self
    }

    /// Queues a delete.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(WriteOp::Delete { key: key.into() });
        self
    }

    /// Queues a delete of every key in `[from, to)`.
    pub fn delete_range(&mut self, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(WriteOp::DeleteRange { from: from.into(), to: to.into() });
        self
    }

    /// The queued operations, in order.
    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    /// Number of queued operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Drops every queued operation, keeping the allocation.
    pub fn clear(&mut self) {
        self.ops.clear();
    }
}
