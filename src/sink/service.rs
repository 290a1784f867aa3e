//! The sink loop: alert topic (read_committed, a consumer group) -> PostgreSQL, a batch at a time,
//! each batch and the offsets after it in one database transaction.
//!
//! PostgreSQL's `sink_offsets` is the source of truth: on every assignment the consumer starts
//! each partition where PostgreSQL says, whatever the group committed in Kafka (that commit
//! follows the database's, for lag tools only). When PostgreSQL is unreachable the batch in hand
//! is kept, the assigned partitions are paused (the consumer keeps polling, so it stays in the
//! group), and the write is retried with exponential backoff until it lands or the sink is told
//! to stop; the lag gauge keeps being updated meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use metronome_io::kafka::ClientBuilder;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::Client;

use super::config::PostgresConfig;
use super::store::{self, SinkRecord, WriteError, WriteSummary};
use crate::metrics::events::{InternalEvent, SinkAttemptFailed, SinkBatchWritten, SinkConnected, SinkLagObserved};
use crate::stream::Shutdown;
use metronome_io::postgres::{migrate, ConnectError, PgTarget};

/// Why the sink stopped with an error (PostgreSQL being down is not one: it is waited for).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The URL or TLS settings are unusable.
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
    /// A test's injected failure.
    #[error("injected failure: {0}")]
    Injected(String),
}

/// A hook given the number of transactions committed so far; an error stands for a crash.
pub type FaultHook = Box<dyn FnMut(u64) -> Result<(), String> + Send + Sync>;

/// Failures a test can inject, to stand for a crash at the worst moments.
#[derive(Default)]
pub struct Faults {
    /// Called inside each write after the rows are in and before the commit; an error stops
    /// the sink there (the transaction rolls back with the connection).
    pub before_commit: Option<FaultHook>,
    /// Called after each commit to PostgreSQL and before the Kafka commit; an error stops the
    /// sink there.
    pub after_commit: Option<FaultHook>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("before_commit", &self.before_commit.is_some())
            .field("after_commit", &self.after_commit.is_some())
            .finish()
    }
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

/// The PostgreSQL sink of the alert topic.
pub struct PostgresSink {
    target: PgTarget,
    cfg: PostgresConfig,
    kafka: BTreeMap<String, String>,
    topic: String,
    group: String,
    faults: Faults,
}

/// Where assigned partitions start: PostgreSQL's offsets, loaded before the group is joined and
/// advanced by every commit, so they are never ahead of the database.
#[derive(Default)]
struct SinkContext {
    starts: Mutex<BTreeMap<i32, i64>>,
    assigned: Mutex<BTreeSet<i32>>,
}

impl ClientContext for SinkContext {}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for mut e in tpl.elements() {
                    // No row yet: nothing was written, so from the beginning, even if the group
                    // committed further in Kafka.
                    let start = starts.get(&e.partition()).map_or(Offset::Beginning, |&o| Offset::Offset(o));
                    if let Err(error) = e.set_offset(start) {
                        tracing::error!(%error, partition = e.partition(), "cannot set the start offset");
                    }
                    assigned.insert(e.partition());
                }
            }
            Rebalance::Revoke(tpl) => {
                let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for e in tpl.elements() {
                    assigned.remove(&e.partition());
                    SinkLagObserved { partition: e.partition(), lag: None }.emit();
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "postgres sink: rebalance failed"),
        }
    }
}

impl SinkContext {
    fn advance(&self, next: &BTreeMap<i32, i64>) {
        let mut starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        for (&p, &o) in next {
            let e = starts.entry(p).or_insert(o);
            *e = (*e).max(o);
        }
    }

    fn assigned(&self) -> Vec<i32> {
        self.assigned.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }
}

impl PostgresSink {
    /// A sink of `topic` into the database `cfg.url` names, with the `[kafka]` properties. Its
    /// consumer group is `<group_prefix>-sink-postgres`.
    pub fn new(
        cfg: PostgresConfig,
        kafka: BTreeMap<String, String>,
        topic: &str,
        group_prefix: &str,
    ) -> Result<Self, SinkError> {
        let target = PgTarget::parse(&cfg.url)?;
        Ok(Self {
            target,
            cfg,
            kafka,
            topic: topic.to_owned(),
            group: format!("{group_prefix}-sink-postgres"),
            faults: Faults::default(),
        })
    }

    /// Injects failures (tests).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// The consumer group, also the `consumer` column of `sink_offsets`.
    pub fn group(&self) -> &str {
        &self.group
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.cfg.retry_min_ms.max(1)))
            .with_max_delay(Duration::from_millis(self.cfg.retry_max_ms.max(self.cfg.retry_min_ms).max(1)))
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Runs until `shutdown` is raised (then the batch in hand is written if PostgreSQL is up).
    pub async fn run(mut self, shutdown: Shutdown) -> Result<SinkSummary, SinkError> {
        let mut summary = SinkSummary::default();
        tracing::info!(target = %self.target, topic = %self.topic, group = %self.group, "postgres sink starting");
        let Some(mut client) = self.connect_until_up(&shutdown, &mut summary).await? else {
            return Ok(summary);
        };
        let starts = loop {
            match store::load_offsets(&client, &self.group, &self.topic).await {
                Ok(s) => break s,
                Err(e) => {
                    self.note_failure(
                        "connect",
                        &e.to_string(),
                        Duration::from_millis(self.cfg.retry_min_ms),
                        &mut summary,
                    );
                    match self.connect_until_up(&shutdown, &mut summary).await? {
                        Some(c) => client = c,
                        None => return Ok(summary),
                    }
                }
            }
        };
        let consumer = Arc::new(self.consumer()?);
        consumer.context().advance(&starts);
        // The processor creates the alert topic; subscribing before it exists only logs errors.
        if !wait_for_topic(&consumer, &self.topic, &shutdown).await {
            return Ok(summary);
        }
        consumer
            .subscribe(&[&self.topic])
            .map_err(|error| SinkError::Kafka { what: "subscribing to the alert topic", error })?;

        let linger = Duration::from_millis(self.cfg.batch_linger_ms);
        let lag_every = Duration::from_millis(self.cfg.lag_interval_ms.max(100));
        // The lag gauge is refreshed beside the loop: its broker round trips must not hold up
        // writes.
        let lag_stop = StopOnDrop(Shutdown::new());
        let lag_task = tokio::spawn(report_lag_every(
            Arc::clone(&consumer),
            self.topic.clone(),
            lag_every,
            [shutdown.clone(), lag_stop.0.clone()],
        ));
        let mut carried: Vec<SinkRecord> = Vec::new();
        let mut client = Some(client);
        while !shutdown.is_triggered() {
            let mut batch = std::mem::take(&mut carried);
            // Linger counts from the first record in hand, so a quiet topic does not cut
            // batches of one.
            let mut first_at = (!batch.is_empty()).then(Instant::now);
            while batch.len() < self.cfg.batch_max_records && !shutdown.is_triggered() {
                let wait = match first_at {
                    None => Duration::from_millis(100),
                    Some(t) => {
                        let left = linger.saturating_sub(t.elapsed());
                        if left.is_zero() {
                            break;
                        }
                        left
                    }
                };
                if let Some(record) = receive(&consumer, wait).await {
                    batch.push(record);
                    first_at.get_or_insert_with(Instant::now);
                }
            }
            if batch.is_empty() {
                continue;
            }
            // Write, retrying until it lands; meanwhile stay in the group with fetching paused.
            let mut backoff = self.backoff();
            let mut paused = false;
            loop {
                let attempt = match client.as_mut() {
                    Some(c) => {
                        let batch_no = summary.batches;
                        let fault = &mut self.faults.before_commit;
                        let mut before_commit = move || match fault.as_mut() {
                            Some(f) => f(batch_no),
                            None => Ok(()),
                        };
                        let t = Instant::now();
                        match store::write_batch(c, &self.group, &self.topic, &batch, &mut before_commit).await {
                            Ok(r) => Ok((r, t.elapsed())),
                            Err(WriteError::Injected(reason)) => return Err(SinkError::Injected(reason)),
                            Err(WriteError::Postgres(e)) => Err(("write", e.to_string())),
                        }
                    }
                    None => match self.connect_once().await {
                        Ok(c) => {
                            client = Some(c);
                            continue;
                        }
                        Err(e @ (ConnectError::Tls(_) | ConnectError::Url(_))) => return Err(e.into()),
                        Err(e @ ConnectError::Migration(_)) => Err(("migrate", e.to_string())),
                        Err(e) => Err(("connect", e.to_string())),
                    },
                };
                match attempt {
                    Ok(((written, next), took)) => {
                        summary.batches += 1;
                        add(&mut summary.writes, written);
                        SinkBatchWritten {
                            written: written.written,
                            duplicates: written.duplicates,
                            dead_letters: written.dead_letters,
                            seconds: took.as_secs_f64(),
                        }
                        .emit();
                        consumer.context().advance(&next);
                        if let Some(f) = self.faults.after_commit.as_mut() {
                            f(summary.batches).map_err(SinkError::Injected)?;
                        }
                        commit_to_kafka(&consumer, &self.topic, &next);
                        if paused {
                            set_paused(&consumer, false);
                        }
                        break;
                    }
                    Err((stage, text)) => {
                        client = None;
                        if !paused {
                            set_paused(&consumer, true);
                            paused = true;
                        }
                        let delay = backoff.next().unwrap_or(Duration::from_secs(1));
                        self.note_failure(stage, &text, delay, &mut summary);
                        // Wait out the backoff polling the consumer (rebalances, group
                        // membership); records that still arrive join the next batch.
                        let until = Instant::now() + delay;
                        while Instant::now() < until && !shutdown.is_triggered() {
                            if let Some(r) = receive(&consumer, until.saturating_duration_since(Instant::now())).await {
                                carried.push(r);
                            }
                            // Partitions assigned meanwhile start paused too.
                            set_paused(&consumer, true);
                        }
                        if shutdown.is_triggered() {
                            tracing::warn!(
                                records = batch.len(),
                                "postgres sink stopping with an unwritten batch; it will be read again"
                            );
                            break;
                        }
                    }
                }
            }
        }
        drop(lag_stop);
        let _ = lag_task.await;
        consumer.unsubscribe();
        tracing::info!(
            batches = summary.batches,
            written = summary.writes.written,
            duplicates = summary.writes.duplicates,
            retries = summary.retries,
            "postgres sink stopped"
        );
        Ok(summary)
    }

    fn note_failure(&self, stage: &'static str, error: &str, delay: Duration, summary: &mut SinkSummary) {
        summary.retries += 1;
        SinkAttemptFailed { stage, error, retry_in_ms: delay.as_millis() as u64 }.emit();
    }

    async fn connect_once(&self) -> Result<Client, ConnectError> {
        let mut client = self.target.connect().await?;
        migrate(&mut client).await?;
        SinkConnected.emit();
        Ok(client)
    }

    /// Connects and migrates, retrying with backoff; `None` if told to stop first. Errors that
    /// no retry can fix (TLS roots) end the sink.
    async fn connect_until_up(
        &self,
        shutdown: &Shutdown,
        summary: &mut SinkSummary,
    ) -> Result<Option<Client>, SinkError> {
        let mut backoff = self.backoff();
        loop {
            match self.connect_once().await {
                Ok(c) => return Ok(Some(c)),
                Err(e @ (ConnectError::Tls(_) | ConnectError::Url(_))) => return Err(e.into()),
                Err(e) => {
                    let stage = if matches!(e, ConnectError::Migration(_)) { "migrate" } else { "connect" };
                    let delay = backoff.next().unwrap_or(Duration::from_secs(1));
                    self.note_failure(stage, &e.to_string(), delay, summary);
                    let until = Instant::now() + delay;
                    while Instant::now() < until {
                        if shutdown.is_triggered() {
                            return Ok(None);
                        }
                        tokio::time::sleep(
                            until.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)),
                        )
                        .await;
                    }
                }
            }
        }
    }

    fn consumer(&self) -> Result<StreamConsumer<SinkContext>, SinkError> {
        ClientBuilder::new(&self.kafka)
            .set("group.id", &self.group)
            .client_id(format!("{}-{}", self.group, std::process::id()))
            .read_committed()
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .create_with_context(SinkContext::default())
            .map_err(|error| SinkError::Kafka { what: "creating the consumer", error })
    }
}

type SinkConsumer = StreamConsumer<SinkContext>;

fn add(total: &mut WriteSummary, w: WriteSummary) {
    total.written += w.written;
    total.duplicates += w.duplicates;
    total.dead_letters += w.dead_letters;
    total.already_written += w.already_written;
}

/// The next record within `wait`, if any (consumer errors are logged and skipped: librdkafka
/// retries them itself).
async fn receive(consumer: &SinkConsumer, wait: Duration) -> Option<SinkRecord> {
    match tokio::time::timeout(wait, consumer.recv()).await {
        Ok(Ok(m)) => Some(SinkRecord::decode(m.partition(), m.offset(), m.payload())),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "postgres sink: consumer error");
            None
        }
        Err(_) => None,
    }
}

fn set_paused(consumer: &SinkConsumer, pause: bool) {
    let Ok(assignment) = consumer.assignment() else { return };
    if assignment.count() == 0 {
        return;
    }
    let result = if pause { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
    if let Err(e) = result {
        tracing::warn!(error = %e, pause, "postgres sink: pausing or resuming fetches failed");
    }
}

/// Commits in Kafka what PostgreSQL committed, for lag tools and autoscalers; the sink itself
/// starts from PostgreSQL's offsets.
fn commit_to_kafka(consumer: &SinkConsumer, topic: &str, next: &BTreeMap<i32, i64>) {
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in next {
        let _ = tpl.add_partition_offset(topic, p, Offset::Offset(o));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %e, "postgres sink: kafka offset commit failed (PostgreSQL holds the truth)");
    }
}

/// Waits until `topic` has partitions (`false` if told to stop first).
async fn wait_for_topic(consumer: &Arc<SinkConsumer>, topic: &str, shutdown: &Shutdown) -> bool {
    let mut logged = false;
    while !shutdown.is_triggered() {
        let (c, t) = (Arc::clone(consumer), topic.to_owned());
        let exists = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&t), Duration::from_secs(5))
                .map(|m| m.topics().iter().any(|x| x.name() == t && x.error().is_none() && !x.partitions().is_empty()))
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if exists {
            return true;
        }
        if !logged {
            tracing::info!(topic, "postgres sink: waiting for the alert topic to be created");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// Raises its signal when dropped: a helper task stops however the sink's loop ends.
struct StopOnDrop(Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

/// Refreshes the lag gauge every `every` until either signal is raised.
async fn report_lag_every(consumer: Arc<SinkConsumer>, topic: String, every: Duration, stop: [Shutdown; 2]) {
    let stopped = || stop.iter().any(Shutdown::is_triggered);
    while !stopped() {
        let next = Instant::now() + every;
        report_lag(&consumer, &topic).await;
        while Instant::now() < next && !stopped() {
            tokio::time::sleep(next.saturating_duration_since(Instant::now()).min(Duration::from_millis(100))).await;
        }
    }
}

/// Updates the lag gauge of every assigned partition: the partition's end minus the next offset
/// PostgreSQL lacks.
async fn report_lag(consumer: &Arc<SinkConsumer>, topic: &str) {
    let consumer = Arc::clone(consumer);
    let topic = topic.to_owned();
    let ends = tokio::task::spawn_blocking(move || {
        let context = consumer.context();
        let starts = context.starts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        context
            .assigned()
            .into_iter()
            .filter_map(|p| {
                let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(5)).ok()?;
                Some((p, high - starts.get(&p).copied().unwrap_or(low).max(low)))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (partition, lag) in ends {
        SinkLagObserved { partition, lag: Some(lag) }.emit();
    }
}
