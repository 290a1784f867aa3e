//! What the sink loop ([`super::service::Sink`]) writes to and reads from, as seams: the alert
//! store ([`AlertStore`], PostgreSQL in [`super::postgres`]) and the alert topic's group consumer
//! ([`AlertSource`], Kafka in [`super::kafka`]). In-memory twins of both (`sink::twin`, tests
//! only) run the loop's batching, retries, pauses and restarts without a database or a broker.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use super::store::{SinkRecord, WriteSummary};
use super::SinkError;
use tokio_util::sync::CancellationToken;

/// The next offset to write, by partition of the alert topic.
pub type Offsets = BTreeMap<i32, i64>;

/// An error a store's operation did not recover from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreFailure {
    /// Worth trying again (the store is down, restarting or unreachable): the sink waits with
    /// backoff, fetching paused.
    #[error("{stage}: {error}")]
    Retry {
        /// `connect`, `migrate` or `write`: a bounded metric label.
        stage: &'static str,
        /// The error as text, without secrets.
        error: String,
    },
    /// No retry can fix it (TLS roots, a bad URL): the sink stops with it.
    #[error(transparent)]
    Fatal(BoxError),
}

/// Where the sink writes: alerts, dead letters and the offsets after them, atomically.
pub trait AlertStore: Send {
    /// The next offset to write, by partition of `topic`, as stored for `consumer`.
    fn load_offsets(
        &mut self,
        consumer: &str,
        topic: &str,
    ) -> impl Future<Output = Result<Offsets, StoreFailure>> + Send;

    /// Writes `records` and the offsets after them for `consumer` in one transaction, skipping
    /// records below the stored offsets and alerts whose id is already stored. Returns what was
    /// written and the new next offsets.
    fn write_batch(
        &mut self,
        consumer: &str,
        topic: &str,
        records: &[SinkRecord],
    ) -> impl Future<Output = Result<(WriteSummary, Offsets), StoreFailure>> + Send;
}

/// The alert topic as the sink reads it: a consumer group whose assignments start where the
/// store says.
pub trait AlertSource: Send {
    /// Waits for the topic, then joins the group; each partition assigned from now on starts at
    /// its offset in `starts` (its beginning where absent, whatever the group committed).
    /// `Ok(false)`: `shutdown` was cancelled first.
    fn join(
        &mut self,
        starts: &Offsets,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<bool, SinkError>> + Send;

    /// The next record within `wait`, if any (consumer errors are the source's to log).
    fn recv(&mut self, wait: Duration) -> impl Future<Output = Option<SinkRecord>> + Send;

    /// Waits `wait` without reading (between attempts before the group is joined).
    fn idle(&mut self, wait: Duration) -> impl Future<Output = ()> + Send;

    /// The store holds every record before `next`: assignments from now on start there, and the
    /// group's offsets follow (for lag tools; the sink itself starts from the store's).
    fn written(&mut self, next: &Offsets);

    /// Pauses or resumes fetching of every assigned partition; called again while paused, so
    /// that partitions assigned meanwhile are paused too.
    fn set_paused(&mut self, paused: bool);

    /// Leaves the group.
    fn leave(&mut self) -> impl Future<Output = ()> + Send;
}
