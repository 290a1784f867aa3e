//! Following the alert topic as security staff would: committed alerts only, as JSON lines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use metronome_io::kafka::ClientBuilder;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use metronome_core::proto;
use tokio_util::sync::CancellationToken;

/// Reads committed alerts (read_committed whatever `properties` say) from every
/// partition of `topic`, from the beginning, and hands each to `on_alert`, until `idle` passes
/// without one. Partitions are assigned directly (no consumer group to join, so the idle clock
/// measures the stream, not a rebalance); a topic that does not exist yet is waited for, within
/// the same idle time. Undecodable records are counted, not shown. Returns `(alerts, undecodable)`.
pub fn follow(
    properties: &BTreeMap<String, String>,
    topic: &str,
    idle: Duration,
    on_alert: impl FnMut(&proto::Alert),
) -> Result<(u64, u64), KafkaError> {
    follow_until(properties, topic, idle, &CancellationToken::new(), on_alert)
}

/// [`follow`], stopping early when `stop` is cancelled.
pub fn follow_until(
    properties: &BTreeMap<String, String>,
    topic: &str,
    idle: Duration,
    stop: &CancellationToken,
    mut on_alert: impl FnMut(&proto::Alert),
) -> Result<(u64, u64), KafkaError> {
    let consumer: BaseConsumer = ClientBuilder::new(properties)
        .read_committed()
        .assigned_reader(format!("metronome-alerts-{}", std::process::id()))
        .create()?;
    let mut last = Instant::now();
    let partitions: Vec<i32> = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let ids: Vec<i32> =
            metadata.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
        if !ids.is_empty() {
            break ids;
        }
        if last.elapsed() >= idle || stop.is_cancelled() {
            return Ok((0, 0));
        }
        std::thread::sleep(Duration::from_millis(200)); // the topic is created by the processor
    };
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let (mut alerts, mut bad) = (0, 0);
    last = Instant::now();
    while last.elapsed() < idle && !stop.is_cancelled() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last = Instant::now();
                match m.payload().map(proto::Alert::decode) {
                    Some(Ok(alert)) => {
                        alerts += 1;
                        on_alert(&alert);
                    }
                    _ => bad += 1,
                }
            }
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    Ok((alerts, bad))
}
