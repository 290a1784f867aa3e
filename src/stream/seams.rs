//! What the processing loop ([`super::engine::Engine`]) reads and opens, as seams: the group
//! consumer's deliveries ([`Input`]) and the making of a partition's task ([`TaskFactory`]).
//! Kafka and RocksDB implement them in [`super::processor`]; an in-memory broker twin
//! implements them in the unit tests, so the loop's rounds, aborts, idleness and rebalances are
//! tested without a broker.

use std::time::Duration;

use metronome_core::wire::InputRecord;
use metronome_state::Store;

use super::kafka::RebalanceEvent;
use super::processor::ProcessError;
use super::task::TaskProducer;

/// What one poll of the input handed over.
#[derive(Debug)]
pub enum Polled {
    /// A record of an assigned partition.
    Record {
        /// Its partition.
        partition: i32,
        /// The record.
        record: InputRecord,
    },
    /// The partition was read to its end (reported once each time the end is reached).
    End {
        /// The partition.
        partition: i32,
    },
    /// Nothing within the timeout (consumer errors are logged by the input and read as this).
    Nothing,
}

/// The group consumer of the input topic, as the loop uses it.
pub trait Input {
    /// Waits at most `timeout` for the next delivery; also serves the group's callbacks, whose
    /// assignment changes [`Input::rebalances`] then returns.
    fn poll(&mut self, timeout: Duration) -> Polled;
    /// The assignment changes since the last call, in order.
    fn rebalances(&mut self) -> Vec<RebalanceEvent>;
    /// Moves `partition`'s position back to `to` (`None`: the partition's start), so that
    /// records of an aborted transaction are delivered again.
    fn rewind(&mut self, partition: i32, to: Option<i64>) -> Result<(), ProcessError>;
    /// Leaves the group, serving the revocation that follows.
    fn leave(&mut self);
}

/// A partition's task as the factory hands it over: its store made consistent with the
/// committed input position, and a producer that fenced any earlier owner.
pub struct OpenedTask<S, P> {
    /// The restored store.
    pub store: S,
    /// The task's producer.
    pub producer: P,
    /// Changelog records replayed into the store.
    pub replayed: u64,
}

/// Makes, prepares and closes the tasks of assigned partitions.
pub trait TaskFactory {
    /// The tasks' store.
    type Store: Store;
    /// The tasks' producer.
    type Producer: TaskProducer + Send;
    /// Opens `partition`'s task, reporting restore progress as (replayed, total).
    fn open(
        &mut self,
        partition: i32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<OpenedTask<Self::Store, Self::Producer>, ProcessError>;
    /// Readies `producer` for the round about to commit (the group generation that fences a
    /// stale member).
    fn prepare(&self, producer: &mut Self::Producer);
    /// Puts away the store of a task that closed (revoked, or the processor stopping).
    fn close(&mut self, partition: i32, store: Self::Store);
    /// Reports the stores' sizes (metrics).
    fn report_sizes(&self, stores: &mut dyn Iterator<Item = &Self::Store>);
}
