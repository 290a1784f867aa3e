//! The sink loop: alert source -> alert store, a batch at a time, each batch and the offsets
//! after it in one store transaction.
//!
//! The store's offsets are the source of truth: the source's assignments start where the store
//! says, whatever the group committed in Kafka. When the store is unreachable the batch in hand
//! is kept, fetching is paused (the consumer keeps polling, so it stays in the group), and the
//! write is retried with exponential backoff until it lands or the sink is told to stop.
//!
//! The loop reads time from a [`Clock`] and does its I/O through the [`AlertStore`] and
//! [`AlertSource`] seams; [`PostgresSink`] is the production assembly (PostgreSQL and Kafka).

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use metronome_core::clock::{Clock, SystemClock};
use rdkafka::error::KafkaError;

use super::config::PostgresConfig;
use super::kafka::KafkaAlertSource;
use super::postgres::PgAlertStore;
use super::seams::{AlertSource, AlertStore, BoxError, Offsets, StoreFailure};
use super::store::{SinkRecord, WriteSummary};
use crate::metrics::events::{InternalEvent, SinkAttemptFailed, SinkBatchWritten};
use metronome_io::postgres::{ConnectError, PgTarget};
use tokio_util::sync::CancellationToken;

/// Why the sink stopped with an error (the store being down is not one: it is waited for).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The URL is unusable.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The Kafka consumer could not be created or subscribed.
    #[error("kafka {what}: {error}")]
    Kafka {
        /// What was being done.
        what: &'static str,
        /// The client's error.
        error: KafkaError,
    },
    /// The store failed in a way no retry fixes.
    #[error("alert store: {0}")]
    Store(BoxError),
}

/// Totals of one run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SinkSummary {
    /// Transactions committed.
    pub batches: u64,
    /// Alerts inserted, duplicates refused, dead letters kept, records skipped as written.
    pub writes: WriteSummary,
    /// Failed attempts (connect, migrate, write) that were retried.
    pub retries: u64,
}

/// The sink of an alert source into an alert store.
pub struct Sink<St, Src> {
    cfg: PostgresConfig,
    topic: String,
    group: String,
    store: St,
    source: Src,
    clock: Arc<dyn Clock>,
}

/// The production sink: the alert topic in Kafka into PostgreSQL.
pub type PostgresSink = Sink<PgAlertStore, KafkaAlertSource>;

impl PostgresSink {
    /// A sink of `topic` into the database `cfg.url` names, with the `[kafka]` properties. Its
    /// consumer group is `<group_prefix>-sink-postgres`.
    pub fn new(
        cfg: PostgresConfig,
        kafka: std::collections::BTreeMap<String, String>,
        topic: &str,
        group_prefix: &str,
    ) -> Result<Self, SinkError> {
        let store = PgAlertStore::new(PgTarget::parse(&cfg.url)?);
        let group = format!("{group_prefix}-sink-postgres");
        let lag_every = Duration::from_millis(cfg.lag_interval_ms.max(100));
        let source = KafkaAlertSource::new(&kafka, topic, &group, lag_every);
        Ok(Sink::assemble(cfg, topic, &group, store, source))
    }
}

impl<St: AlertStore, Src: AlertSource> Sink<St, Src> {
    /// A sink of `source` (the alert topic `topic`, read by consumer group `group`) into
    /// `store`, on the system clock.
    pub fn assemble(cfg: PostgresConfig, topic: &str, group: &str, store: St, source: Src) -> Self {
        Self { cfg, topic: topic.to_owned(), group: group.to_owned(), store, source, clock: Arc::new(SystemClock) }
    }

    /// The same sink reading time from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The same sink writing through what `wrap` makes of its store (a test's faults, say).
    pub fn map_store<T: AlertStore>(self, wrap: impl FnOnce(St) -> T) -> Sink<T, Src> {
        let Self { cfg, topic, group, store, source, clock } = self;
        Sink { cfg, topic, group, store: wrap(store), source, clock }
    }

    /// The consumer group, also the `consumer` of the stored offsets.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Runs until `shutdown` is cancelled (then the batch in hand is written if the store is up).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<SinkSummary, SinkError> {
        let mut summary = SinkSummary::default();
        tracing::info!(topic = %self.topic, group = %self.group, "postgres sink starting");
        let Some(starts) = self.offsets_when_up(&shutdown, &mut summary).await? else {
            return Ok(summary);
        };
        if !self.source.join(&starts, &shutdown).await? {
            return Ok(summary);
        }
        let mut carried = Vec::new();
        while !shutdown.is_cancelled() {
            let batch = self.collect_batch(std::mem::take(&mut carried), &shutdown).await;
            if !batch.is_empty() {
                self.write_until_landed(&batch, &mut carried, &shutdown, &mut summary).await?;
            }
        }
        self.source.leave().await;
        tracing::info!(
            batches = summary.batches,
            written = summary.writes.written,
            duplicates = summary.writes.duplicates,
            retries = summary.retries,
            "postgres sink stopped"
        );
        Ok(summary)
    }

    /// The stored offsets, retried with backoff while the store is down; `None` if told to stop
    /// first.
    async fn offsets_when_up(
        &mut self,
        shutdown: &CancellationToken,
        summary: &mut SinkSummary,
    ) -> Result<Option<Offsets>, SinkError> {
        let mut backoff = self.backoff();
        loop {
            match self.store.load_offsets(&self.group, &self.topic).await {
                Ok(offsets) => return Ok(Some(offsets)),
                Err(StoreFailure::Fatal(error)) => return Err(SinkError::Store(error)),
                Err(StoreFailure::Retry { stage, error }) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(1));
                    note_failure(stage, &error, delay, summary);
                    let until = self.clock.now() + delay;
                    while self.clock.now() < until {
                        if shutdown.is_cancelled() {
                            return Ok(None);
                        }
                        let left = until.saturating_duration_since(self.clock.now());
                        self.source.idle(left.min(Duration::from_millis(100))).await;
                    }
                }
            }
        }
    }

    /// `carried` and what arrives until the batch is full, the linger since its first record
    /// has passed, or the sink is told to stop. Linger counts from the first record in hand, so
    /// a quiet topic does not cut batches of one.
    async fn collect_batch(&mut self, carried: Vec<SinkRecord>, shutdown: &CancellationToken) -> Vec<SinkRecord> {
        let linger = Duration::from_millis(self.cfg.batch_linger_ms);
        let mut batch = carried;
        let mut first_at = (!batch.is_empty()).then(|| self.clock.now());
        while batch.len() < self.cfg.batch_max_records && !shutdown.is_cancelled() {
            let wait = match first_at {
                None => Duration::from_millis(100),
                Some(t) => {
                    let left = linger.saturating_sub(self.clock.now().saturating_duration_since(t));
                    if left.is_zero() {
                        break;
                    }
                    left
                }
            };
            if let Some(record) = self.source.recv(wait).await {
                batch.push(record);
                first_at.get_or_insert_with(|| self.clock.now());
            }
        }
        batch
    }

    /// Writes `batch`, retrying until it lands or the sink is told to stop; meanwhile the group
    /// is kept with fetching paused, and records that still arrive go to `carried`.
    async fn write_until_landed(
        &mut self,
        batch: &[SinkRecord],
        carried: &mut Vec<SinkRecord>,
        shutdown: &CancellationToken,
        summary: &mut SinkSummary,
    ) -> Result<(), SinkError> {
        let mut backoff = self.backoff();
        let mut paused = false;
        loop {
            let started = self.clock.now();
            match self.store.write_batch(&self.group, &self.topic, batch).await {
                Ok((written, next)) => {
                    let took = self.clock.now().saturating_duration_since(started);
                    self.landed(written, &next, took, summary);
                    if paused {
                        self.source.set_paused(false);
                    }
                    return Ok(());
                }
                Err(StoreFailure::Fatal(error)) => return Err(SinkError::Store(error)),
                Err(StoreFailure::Retry { stage, error }) => {
                    if !paused {
                        self.source.set_paused(true);
                        paused = true;
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(1));
                    note_failure(stage, &error, delay, summary);
                    self.wait_paused(delay, carried, shutdown).await;
                    if shutdown.is_cancelled() {
                        tracing::warn!(
                            records = batch.len(),
                            "postgres sink stopping with an unwritten batch; it will be read again"
                        );
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Waits out a backoff polling the source (rebalances, group membership); records that
    /// still arrive join the next batch, and partitions assigned meanwhile are paused too.
    async fn wait_paused(&mut self, delay: Duration, carried: &mut Vec<SinkRecord>, shutdown: &CancellationToken) {
        let until = self.clock.now() + delay;
        while self.clock.now() < until && !shutdown.is_cancelled() {
            if let Some(record) = self.source.recv(until.saturating_duration_since(self.clock.now())).await {
                carried.push(record);
            }
            self.source.set_paused(true);
        }
    }

    /// A batch is in the store: counted, reported, and its offsets handed to the source.
    fn landed(&mut self, written: WriteSummary, next: &Offsets, took: Duration, summary: &mut SinkSummary) {
        summary.batches += 1;
        add(&mut summary.writes, written);
        SinkBatchWritten {
            written: written.written,
            duplicates: written.duplicates,
            dead_letters: written.dead_letters,
            seconds: took.as_secs_f64(),
        }
        .emit();
        self.source.written(next);
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.cfg.retry_min_ms.max(1)))
            .with_max_delay(Duration::from_millis(self.cfg.retry_max_ms.max(self.cfg.retry_min_ms).max(1)))
            .with_jitter()
            .without_max_times()
            .build()
    }
}

fn note_failure(stage: &'static str, error: &str, delay: Duration, summary: &mut SinkSummary) {
    summary.retries += 1;
    SinkAttemptFailed { stage, error, retry_in_ms: delay.as_millis() as u64 }.emit();
}

fn add(total: &mut WriteSummary, w: WriteSummary) {
    total.written += w.written;
    total.duplicates += w.duplicates;
    total.dead_letters += w.dead_letters;
    total.already_written += w.already_written;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::twin::{alert_partitions, Attempt, MemoryAlertSource, MemoryAlertStore};
    use metronome_core::clock::ManualClock;

    const TOPIC: &str = "t.alerts";
    const GROUP: &str = "app-sink-postgres";

    fn config(batch: usize) -> PostgresConfig {
        PostgresConfig {
            batch_max_records: batch,
            batch_linger_ms: 20,
            retry_min_ms: 50,
            retry_max_ms: 400,
            ..PostgresConfig::default()
        }
    }

    /// `n` alerts over three partitions, then one record that is not an alert and one without a
    /// value.
    fn topic(n: usize, clock: &Arc<ManualClock>) -> MemoryAlertSource {
        let mut partitions = alert_partitions(n, 3);
        partitions[1].push(Some(vec![0xff, 0xfe, 0x01]));
        partitions[2].push(None);
        MemoryAlertSource::new(partitions, Arc::clone(clock))
    }

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::starting_at(1_800_000_000_000_000))
    }

    fn run(
        batch: usize,
        store: &MemoryAlertStore,
        source: &MemoryAlertSource,
        clock: &Arc<ManualClock>,
    ) -> Result<SinkSummary, SinkError> {
        let sink = Sink::assemble(config(batch), TOPIC, GROUP, store.clone(), source.clone())
            .with_clock(Arc::clone(clock) as Arc<dyn Clock>);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(sink.run(CancellationToken::new()))
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("alert-{i:04}")).collect()
    }

    fn stored_ids(store: &MemoryAlertStore) -> Vec<String> {
        store.state().alerts.keys().cloned().collect()
    }

    fn stored_offsets(store: &MemoryAlertStore) -> Offsets {
        store.state().offsets.get(&(GROUP.to_owned(), TOPIC.to_owned())).cloned().unwrap_or_default()
    }

    #[test]
    fn every_record_lands_once_in_batches_no_larger_than_the_limit() {
        let (clock, store) = (clock(), MemoryAlertStore::default());
        let source = topic(25, &clock);
        let summary = run(10, &store, &source, &clock).unwrap();
        assert_eq!(stored_ids(&store), ids(25));
        assert_eq!(store.state().dead_letters, [(1, 8), (2, 8)].into_iter().collect());
        assert_eq!(stored_offsets(&store), source.ends(), "every record accounted for");
        let committed = source.state().committed.clone();
        assert_eq!(committed, source.ends(), "the group's offsets follow the store's");
        let batches = store.state().batches.clone();
        assert!(batches.iter().all(|&b| (1..=10).contains(&b)), "{batches:?}");
        assert_eq!(batches.iter().sum::<usize>(), 27);
        assert_eq!(summary.batches as usize, batches.len());
        assert_eq!((summary.writes.written, summary.writes.dead_letters, summary.retries), (25, 2, 0));
        assert_eq!((summary.writes.duplicates, summary.writes.already_written), (0, 0));
        assert!(source.state().left, "the group was left");
    }

    #[test]
    fn a_store_outage_pauses_fetching_keeps_the_batch_and_loses_nothing() {
        let (clock, store) = (clock(), MemoryAlertStore::default());
        let source = topic(30, &clock);
        store.state().writes.extend([Attempt::Pass, Attempt::Down, Attempt::Down, Attempt::Down]);
        // Two records were fetched before the pause took effect: they join the next batch.
        source.state().in_flight_after_pause = 2;
        let start = clock.now();
        let summary = run(8, &store, &source, &clock).unwrap();
        assert_eq!(summary.retries, 3);
        assert_eq!(stored_ids(&store), ids(30));
        assert_eq!(stored_offsets(&store), source.ends());
        assert_eq!((summary.writes.duplicates, summary.writes.already_written), (0, 0));
        assert_eq!(source.state().pause_changes, [true, false], "paused once for the outage, resumed after");
        let batches = store.state().batches.clone();
        assert_eq!(&batches[..2], [8, 8], "the batch in hand was written whole once the store was back");
        assert_eq!(batches[2], 8, "the two in-flight records and six more");
        // The backoff doubles from 50 ms (jitter adds up to one delay more): at least 50 + 100 + 200.
        assert!(clock.now() - start >= Duration::from_millis(350), "{:?}", clock.now() - start);
    }

    #[test]
    fn the_first_offsets_are_waited_for_and_a_fatal_store_error_ends_the_run() {
        let (clock, store) = (clock(), MemoryAlertStore::default());
        let source = topic(5, &clock);
        store.state().loads.extend([Attempt::Down, Attempt::Down]);
        let summary = run(10, &store, &source, &clock).unwrap();
        assert_eq!(summary.retries, 2);
        assert_eq!(stored_ids(&store), ids(5));

        let (clock, store) = (self::clock(), MemoryAlertStore::default());
        let source = topic(5, &clock);
        store.state().loads.push_back(Attempt::Fatal);
        let failed = run(10, &store, &source, &clock);
        assert!(
            matches!(&failed, Err(SinkError::Store(e)) if e.to_string() == "certificate not trusted"),
            "{failed:?}"
        );
        assert!(!source.state().joined, "the group is not joined without the store's offsets");
    }

    #[test]
    fn a_crash_before_or_after_the_commit_repeats_nothing_on_restart() {
        for crash in [Attempt::Fatal, Attempt::FatalAfterCommit] {
            let (clock, store) = (clock(), MemoryAlertStore::default());
            let source = topic(40, &clock);
            store.state().writes.extend([Attempt::Pass, Attempt::Pass, crash]);
            let crashed = run(8, &store, &source, &clock);
            assert!(matches!(crashed, Err(SinkError::Store(_))), "{crashed:?}");
            let survived = store.state().alerts.len();
            assert_eq!(survived, if crash == Attempt::Fatal { 16 } else { 24 }, "{crash:?}");
            assert_eq!(source.state().committed.values().sum::<i64>(), 16, "the source heard of two writes only");

            // A new member over the same store and topic (its committed offsets behind the store's).
            let restarted = MemoryAlertSource::new(source.state().partitions.clone(), Arc::clone(&clock));
            let summary = run(8, &store, &restarted, &clock).unwrap();
            assert_eq!(stored_ids(&store), ids(40), "{crash:?}");
            assert_eq!(summary.writes.written as usize, 40 - survived, "only what was missing: {crash:?}");
            assert_eq!((summary.writes.duplicates, summary.writes.already_written), (0, 0), "{crash:?}");
            assert_eq!(stored_offsets(&store), restarted.ends());
        }
    }

    #[test]
    fn a_partition_assigned_again_starts_where_the_store_says() {
        let (clock, store) = (clock(), MemoryAlertStore::default());
        let source = topic(30, &clock);
        // Every partition revoked and assigned again twice, once with a batch in hand (receive
        // 13: 12 records read, 8 of them written) and once between batches (receive 25).
        source.state().reassign_at.extend([13, 25]);
        let summary = run(8, &store, &source, &clock).unwrap();
        assert_eq!(stored_ids(&store), ids(30));
        assert_eq!(stored_offsets(&store), source.ends());
        assert_eq!(summary.writes.duplicates, 0);
        // The four records in hand at the first reassignment were read again and skipped as
        // written; nothing written before it was read again.
        assert_eq!(summary.writes.already_written, 4);
    }

    #[test]
    fn stopping_during_an_outage_writes_nothing_and_the_next_run_writes_it_once() {
        let (clock, store) = (clock(), MemoryAlertStore::default());
        let source = topic(12, &clock);
        store.state().writes.push_back(Attempt::Pass);
        store.state().writes.extend([Attempt::Down; 50]);
        source.state().stop_at = Some(20);
        let summary = run(5, &store, &source, &clock).unwrap();
        assert_eq!((summary.batches, summary.writes.written), (1, 5));
        assert!(summary.retries >= 1);
        assert!(source.state().left);
        assert_eq!(source.state().committed.values().sum::<i64>(), 5);

        store.state().writes.clear();
        let restarted = MemoryAlertSource::new(source.state().partitions.clone(), Arc::clone(&clock));
        let summary = run(5, &store, &restarted, &clock).unwrap();
        assert_eq!(stored_ids(&store), ids(12));
        assert_eq!((summary.writes.written, summary.writes.already_written), (7, 0));
    }
}
