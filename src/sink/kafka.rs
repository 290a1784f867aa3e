//! [`KafkaAlertSource`]: the alert topic's consumer group (read_committed, cooperative-sticky),
//! whose assignments start where the store says, with the lag gauge refreshed beside the loop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metronome_io::kafka::ClientBuilder;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::seams::{AlertSource, Offsets};
use super::store::SinkRecord;
use super::SinkError;
use crate::metrics::events::{InternalEvent, SinkLagObserved};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Where assigned partitions start: the store's offsets, set before the group is joined and
/// advanced by every write, so they are never ahead of the store.
#[derive(Default)]
struct SinkContext {
    starts: Mutex<Offsets>,
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
    fn advance(&self, next: &Offsets) {
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

type SinkConsumer = StreamConsumer<SinkContext>;

/// The sink's consumer of the alert topic, made when the group is joined (a stream consumer
/// needs the runtime it is polled on).
pub struct KafkaAlertSource {
    kafka: BTreeMap<String, String>,
    group: String,
    consumer: Option<Arc<SinkConsumer>>,
    topic: String,
    lag_every: Duration,
    /// Cancels the lag task when the source leaves or is dropped, however the loop ends.
    lag_stop: Option<DropGuard>,
    lag_task: Option<tokio::task::JoinHandle<()>>,
}

impl KafkaAlertSource {
    /// A member of `group` reading `topic` with the `[kafka]` properties; the lag gauge is
    /// refreshed every `lag_every` once joined.
    pub fn new(kafka: &BTreeMap<String, String>, topic: &str, group: &str, lag_every: Duration) -> Self {
        Self {
            kafka: kafka.clone(),
            group: group.to_owned(),
            consumer: None,
            topic: topic.to_owned(),
            lag_every,
            lag_stop: None,
            lag_task: None,
        }
    }

    fn create_consumer(&self) -> Result<SinkConsumer, SinkError> {
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

    fn pause_or_resume(&self, pause: bool) {
        let Some(consumer) = &self.consumer else { return };
        let Ok(assignment) = consumer.assignment() else { return };
        if assignment.count() == 0 {
            return;
        }
        let result = if pause { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
        if let Err(e) = result {
            tracing::warn!(error = %e, pause, "postgres sink: pausing or resuming fetches failed");
        }
    }
}

impl AlertSource for KafkaAlertSource {
    async fn join(&mut self, starts: &Offsets, shutdown: &CancellationToken) -> Result<bool, SinkError> {
        let consumer = Arc::new(self.create_consumer()?);
        consumer.context().advance(starts);
        self.consumer = Some(Arc::clone(&consumer));
        // The processor creates the alert topic; subscribing before it exists only logs errors.
        if !wait_for_topic(&consumer, &self.topic, shutdown).await {
            return Ok(false);
        }
        consumer
            .subscribe(&[&self.topic])
            .map_err(|error| SinkError::Kafka { what: "subscribing to the alert topic", error })?;
        // The lag gauge's broker round trips must not hold up writes: they run beside the loop.
        let lag = shutdown.child_token();
        self.lag_stop = Some(lag.clone().drop_guard());
        self.lag_task = Some(tokio::spawn(report_lag_every(consumer, self.topic.clone(), self.lag_every, lag)));
        Ok(true)
    }

    async fn recv(&mut self, wait: Duration) -> Option<SinkRecord> {
        let Some(consumer) = &self.consumer else {
            tokio::time::sleep(wait).await;
            return None;
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => Some(SinkRecord::decode(m.partition(), m.offset(), m.payload())),
            Ok(Err(e)) => {
                // librdkafka retries these itself.
                tracing::warn!(error = %e, "postgres sink: consumer error");
                None
            }
            Err(_) => None,
        }
    }

    async fn idle(&mut self, wait: Duration) {
        tokio::time::sleep(wait).await;
    }

    fn written(&mut self, next: &Offsets) {
        let Some(consumer) = &self.consumer else { return };
        consumer.context().advance(next);
        let mut tpl = TopicPartitionList::new();
        for (&p, &o) in next {
            let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(o));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "postgres sink: kafka offset commit failed (PostgreSQL holds the truth)");
        }
    }

    fn set_paused(&mut self, paused: bool) {
        self.pause_or_resume(paused);
    }

    async fn leave(&mut self) {
        drop(self.lag_stop.take());
        if let Some(task) = self.lag_task.take() {
            let _ = task.await;
        }
        if let Some(consumer) = &self.consumer {
            consumer.unsubscribe();
        }
    }
}

/// Waits until `topic` has partitions (`false` if told to stop first).
async fn wait_for_topic(consumer: &Arc<SinkConsumer>, topic: &str, shutdown: &CancellationToken) -> bool {
    let mut logged = false;
    while !shutdown.is_cancelled() {
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
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    false
}

/// Refreshes the lag gauge every `every` until `stop` is cancelled.
async fn report_lag_every(consumer: Arc<SinkConsumer>, topic: String, every: Duration, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let next = tokio::time::Instant::now() + every;
        report_lag(&consumer, &topic).await;
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Updates the lag gauge of every assigned partition: the partition's end minus the next offset
/// the store lacks.
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
