//! Reading a day of the raw input topic from Kafka: partitions, watermarks, where the day starts
//! and ends in each partition, and the records in between.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use metronome_io::kafka::ClientBuilder;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::locate::{first_position_at, OffsetProbe};
use metronome_core::proto;

/// How long one broker call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a partition may deliver nothing before its end while it is read.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why reading the topic failed. Carries broker errors and positions, never record contents.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A client call failed.
    #[error("kafka: {what}: {error}")]
    Kafka {
        /// What was being done.
        what: &'static str,
        /// The client's error.
        error: KafkaError,
    },
    /// The topic is not there.
    #[error("topic {0} does not exist")]
    NoTopic(String),
    /// The partition stopped delivering before the range's end (an open transaction holds its
    /// stable offset back, or the broker is gone).
    #[error(
        "partition {partition} delivered nothing for {STALL_TIMEOUT:?} at position {position}, before offset {end}"
    )]
    Stalled {
        /// The partition.
        partition: i32,
        /// Where it stopped.
        position: i64,
        /// Where the range ends.
        end: i64,
    },
}

fn kafka(what: &'static str) -> impl FnOnce(KafkaError) -> SourceError {
    move |error| SourceError::Kafka { what, error }
}

/// One partition's share of a day: `[start, end)` in offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    /// The partition.
    pub partition: i32,
    /// First position of the day.
    pub start: i64,
    /// First position after the day.
    pub end: i64,
}

/// A consumer that reads by assignment (no group membership, nothing committed).
pub struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
}

impl TopicReader {
    /// A reader of `topic` with the Kafka `properties` every client gets.
    pub fn new(properties: &BTreeMap<String, String>, topic: &str) -> Result<Self, SourceError> {
        let consumer: BaseConsumer = ClientBuilder::new(properties)
            .assigned_reader("metronome-archive")
            .read_committed()
            .partition_eof()
            .create()
            .map_err(kafka("creating the archive consumer"))?;
        Ok(Self { consumer, topic: topic.to_owned() })
    }

    /// The topic's partitions, in order.
    pub fn partitions(&self) -> Result<Vec<i32>, SourceError> {
        let metadata =
            self.consumer.fetch_metadata(Some(&self.topic), CALL_TIMEOUT).map_err(kafka("reading metadata"))?;
        let mut ids: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if ids.is_empty() {
            return Err(SourceError::NoTopic(self.topic.clone()));
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Where `[start_ms, end_ms)` lies in `partition`.
    pub fn range(&mut self, partition: i32, start_ms: i64, end_ms: i64) -> Result<PartitionRange, SourceError> {
        let (low, reported_high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, CALL_TIMEOUT)
            .map_err(kafka("reading watermarks"))?;
        let high = self.end_of(partition, low, reported_high)?;
        let hint_start = self.broker_hint(partition, start_ms);
        let hint_end = self.broker_hint(partition, end_ms);
        let mut probe = Probe { reader: self, partition };
        let start = first_position_at(&mut probe, low, high, start_ms, hint_start)?;
        let end = first_position_at(&mut probe, start, high, end_ms, hint_end)?;
        Ok(PartitionRange { partition, start, end })
    }

    /// The partition's end as read, not only as reported: the records from just before the
    /// reported high watermark up to the end of the partition are read, so a broker that reports
    /// a batch's first offset as the end (some Kafka-compatible brokers do) does not cut the last batch
    /// off.
    fn end_of(&self, partition: i32, low: i64, reported_high: i64) -> Result<i64, SourceError> {
        let from = (reported_high - 1).max(low).max(0);
        self.assign_at(partition, from)?;
        let mut end = reported_high;
        let deadline = Instant::now() + CALL_TIMEOUT;
        while Instant::now() < deadline {
            match self.poll_partition(partition)? {
                Polled::Record(r) => end = end.max(r.offset + 1),
                Polled::End => return Ok(end.max(self.position(partition)?)),
                Polled::Nothing => {}
            }
        }
        Err(SourceError::Stalled { partition, position: from, end: reported_high })
    }

    /// One poll of the consumer, which has only `partition` assigned.
    fn poll_partition(&self, partition: i32) -> Result<Polled, SourceError> {
        Ok(match self.consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) if m.partition() == partition => Polled::Record(proto::ArchivedRecord {
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
            }),
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => Polled::End,
            Some(Ok(_) | Err(KafkaError::PartitionEOF(_))) | None => Polled::Nothing,
            Some(Err(error)) => return Err(SourceError::Kafka { what: "reading records", error }),
        })
    }

    /// The broker's time-index answer, if it gives one.
    fn broker_hint(&self, partition: i32, time_ms: i64) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(time_ms)).ok()?;
        let answer = self.consumer.offsets_for_times(tpl, CALL_TIMEOUT).ok()?;
        let found = answer.find_partition(&self.topic, partition)?;
        match found.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }

    fn assign_at(&self, partition: i32, position: i64) -> Result<(), SourceError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(position))
            .map_err(kafka("building an assignment"))?;
        self.consumer.assign(&tpl).map_err(kafka("assigning a partition"))
    }

    /// Reads every record of `range` in offset order into `on_record`; returns how many.
    pub fn read(
        &mut self,
        range: PartitionRange,
        mut on_record: impl FnMut(proto::ArchivedRecord) -> std::io::Result<()>,
    ) -> Result<u64, ReadError> {
        if range.start >= range.end {
            return Ok(0);
        }
        self.assign_at(range.partition, range.start)?;
        let mut read = 0u64;
        let mut last_progress = Instant::now();
        loop {
            match self.poll_partition(range.partition)? {
                Polled::Record(record) => {
                    last_progress = Instant::now();
                    if record.offset >= range.end {
                        break;
                    }
                    let last = record.offset + 1 >= range.end;
                    on_record(record).map_err(ReadError::Sink)?;
                    read += 1;
                    if last {
                        break;
                    }
                }
                // The end of what is readable: done if the range is behind it (the rest were
                // transaction markers), else an open transaction holds it back.
                Polled::End if self.position(range.partition)? >= range.end => break,
                Polled::End | Polled::Nothing => {}
            }
            if last_progress.elapsed() >= STALL_TIMEOUT {
                let position = self.position(range.partition)?;
                return Err(SourceError::Stalled { partition: range.partition, position, end: range.end }.into());
            }
        }
        Ok(read)
    }

    fn position(&self, partition: i32) -> Result<i64, SourceError> {
        let positions = self.consumer.position().map_err(kafka("reading the position"))?;
        Ok(match positions.find_partition(&self.topic, partition).map(|p| p.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
    }
}

/// Why [`TopicReader::read`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Kafka failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Writing a record where it goes failed.
    #[error("staging the archive file: {0}")]
    Sink(std::io::Error),
}

/// What one poll of a single assigned partition gave.
enum Polled {
    /// A record of the partition.
    Record(proto::ArchivedRecord),
    /// The end of the partition (as far as it is readable).
    End,
    /// Nothing yet.
    Nothing,
}

/// Reads single records' timestamps for [`first_position_at`].
struct Probe<'a> {
    reader: &'a TopicReader,
    partition: i32,
}

impl OffsetProbe for Probe<'_> {
    type Error = SourceError;

    fn first_at_or_after(&mut self, position: i64) -> Result<Option<(i64, i64)>, SourceError> {
        self.reader.assign_at(self.partition, position)?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        while Instant::now() < deadline {
            match self.reader.poll_partition(self.partition)? {
                Polled::Record(r) if r.offset >= position => return Ok(Some((r.offset, r.timestamp_ms))),
                Polled::End => return Ok(None),
                Polled::Record(_) | Polled::Nothing => {}
            }
        }
        Err(SourceError::Stalled { partition: self.partition, position, end: position + 1 })
    }
}
