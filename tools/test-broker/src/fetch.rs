//! A Fetch service that honours transactions.
//!
//! Kafka's contract for `read_committed` consumers has two halves: the broker serves records
//! only below the last stable offset (tansu's storage does this), and it lists the aborted
//! transactions that overlap the records it returns, so the client can drop their records
//! (tansu's own Fetch always lists none). [`scan`] finds them in the returned batches; a
//! transaction still open at the end of a response is followed forward to its marker.
//!
//! It also returns the batch holding the fetch offset when a consumer resumes mid-batch (Kafka
//! does; the client skips the records before its offset), and answers as soon as `min_bytes`
//! are there, polling storage until `max_wait_ms` otherwise.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use rama::{Context, Service};
use tansu_sans_io::{
    ControlBatch, ErrorCode, FetchRequest, FetchResponse, IsolationLevel,
    fetch_request::{FetchPartition, FetchTopic},
    fetch_response::{AbortedTransaction, FetchableTopicResponse, PartitionData},
    metadata_response::MetadataResponseTopic,
    record::{
        Record,
        deflated::{Batch, Frame},
    },
};
use tansu_storage::{Error, Result, Storage, TopicId, Topition};

/// Cap on one response, as tansu's own Fetch has.
const MAX_RESPONSE_BYTES: u32 = 5 * 1024 * 1024;
/// How often storage is polled while a fetch waits for data.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Bytes read per step when following open transactions past the end of a response.
const LOOKAHEAD_BYTES: u32 = 1024 * 1024;

#[derive(Clone, Copy, Debug, Default)]
pub struct TxnAwareFetch;

impl<G> Service<G, FetchRequest> for TxnAwareFetch
where
    G: Storage,
{
    type Response = FetchResponse;
    type Error = Error;

    async fn serve(&self, ctx: Context<G>, req: FetchRequest) -> Result<FetchResponse> {
        let isolation = isolation_of(req.isolation_level)?;
        let max_wait = Duration::from_millis(u64::try_from(req.max_wait_ms).unwrap_or(0));
        let min_bytes = usize::try_from(req.min_bytes).unwrap_or(0).max(1);
        let max_bytes = req
            .max_bytes
            .and_then(|bytes| u32::try_from(bytes).ok())
            .filter(|bytes| *bytes > 0)
            .map_or(MAX_RESPONSE_BYTES, |bytes| bytes.min(MAX_RESPONSE_BYTES));
        let topics = req.topics.unwrap_or_default();

        let deadline = Instant::now() + max_wait;
        loop {
            let mut budget = max_bytes;
            let mut responses = Vec::with_capacity(topics.len());
            for topic in &topics {
                responses.push(fetch_topic(ctx.state(), topic, isolation, &mut budget).await?);
            }
            let fetched = (max_bytes - budget) as usize;
            let now = Instant::now();
            if fetched >= min_bytes || now >= deadline {
                return Ok(FetchResponse::default()
                    .throttle_time_ms(Some(0))
                    .error_code(Some(ErrorCode::None.into()))
                    .session_id(Some(0))
                    .node_endpoints(Some(Vec::new()))
                    .responses(Some(responses)));
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }
}

/// A request's isolation level; absent (old request versions) means read_uncommitted.
pub fn isolation_of(level: Option<i8>) -> Result<IsolationLevel> {
    Ok(level.map_or(Ok(IsolationLevel::ReadUncommitted), IsolationLevel::try_from)?)
}

async fn fetch_topic<G: Storage>(
    storage: &G,
    fetch: &FetchTopic,
    isolation: IsolationLevel,
    budget: &mut u32,
) -> Result<FetchableTopicResponse> {
    let metadata = storage.metadata(Some(&[TopicId::from(fetch)])).await?;
    let Some(MetadataResponseTopic { topic_id, name: Some(name), .. }) = metadata.topics().first() else {
        return Ok(unknown_topic(fetch));
    };
    let mut partitions = Vec::new();
    for partition in fetch.partitions.as_deref().unwrap_or_default() {
        partitions.push(fetch_partition(storage, name, partition, isolation, budget).await?);
    }
    Ok(FetchableTopicResponse::default()
        .topic(fetch.topic.clone())
        .topic_id(topic_id.to_owned())
        .partitions(Some(partitions)))
}

async fn fetch_partition<G: Storage>(
    storage: &G,
    topic: &str,
    fetch: &FetchPartition,
    isolation: IsolationLevel,
    budget: &mut u32,
) -> Result<PartitionData> {
    let tp = Topition::new(topic, fetch.partition);
    let stage = storage.offset_stage(&tp).await?;
    let read_committed = isolation == IsolationLevel::ReadCommitted;
    let limit = if read_committed { stage.last_stable() } else { stage.high_watermark() };

    let partition_budget = u32::try_from(fetch.partition_max_bytes).unwrap_or(0);
    let mut remaining = (*budget).min(partition_budget);
    let mut batches = Vec::new();
    let mut offset = fetch.fetch_offset;
    if offset < limit && remaining > 0 {
        let mut fetched = storage.fetch(&tp, offset, 1, remaining, isolation).await?;
        // Storage starts at the first batch at or after the offset; when none starts exactly
        // there, the consumer resumes mid-batch and gets the batch holding it first, as from Kafka.
        if offset > 0
            && fetched.first().is_none_or(|batch| batch.base_offset != offset)
            && let Some(batch) = batch_holding(storage, &tp, offset, isolation).await?
        {
            offset = next_offset(&batch);
            remaining = remaining.saturating_sub(batch_bytes(&batch));
            batches.push(batch);
        }
        loop {
            let before = offset;
            for batch in fetched {
                if batch.base_offset < offset || batch.base_offset >= limit {
                    continue;
                }
                offset = next_offset(&batch);
                remaining = remaining.saturating_sub(batch_bytes(&batch));
                batches.push(batch);
            }
            if offset == before || remaining == 0 || offset >= limit {
                break;
            }
            fetched = storage.fetch(&tp, offset, 1, remaining, isolation).await?;
        }
    }
    let taken = (*budget).min(partition_budget) - remaining;
    *budget -= taken;

    let aborted = if read_committed {
        let mut scanned = scan(&batches)?;
        follow_open(storage, &tp, offset, limit, isolation, &mut scanned).await?;
        scanned.aborted
    } else {
        Vec::new()
    };

    Ok(PartitionData::default()
        .partition_index(fetch.partition)
        .error_code(ErrorCode::None.into())
        .high_watermark(stage.high_watermark())
        .last_stable_offset(Some(stage.last_stable()))
        .log_start_offset(Some(stage.log_start()))
        .diverging_epoch(None)
        .current_leader(None)
        .snapshot_id(None)
        .aborted_transactions(Some(
            aborted
                .into_iter()
                .map(|(producer_id, first_offset)| {
                    AbortedTransaction::default().producer_id(producer_id).first_offset(first_offset)
                })
                .collect(),
        ))
        .preferred_read_replica(Some(-1))
        .records((!batches.is_empty()).then_some(Frame { batches })))
}

/// The batch that holds `offset`, for an offset no batch starts at (a consumer resuming
/// mid-batch); `None` when nothing holds it (a gap).
async fn batch_holding<G: Storage>(
    storage: &G,
    tp: &Topition,
    offset: i64,
    isolation: IsolationLevel,
) -> Result<Option<Batch>> {
    // With one byte allowed, storage returns exactly the first batch at or after the offset.
    let first_at = |from: i64| async move {
        storage.fetch(tp, from, 1, 1, isolation).await.map(|batches| batches.into_iter().next())
    };
    let mut back = 1;
    loop {
        let from = (offset - back).max(0);
        if let Some(mut batch) = first_at(from).await?
            && batch.base_offset <= offset
        {
            while next_offset(&batch) <= offset {
                match first_at(next_offset(&batch)).await? {
                    Some(next) if next.base_offset <= offset => batch = next,
                    _ => return Ok(None),
                }
            }
            return Ok(Some(batch));
        }
        if from == 0 {
            return Ok(None);
        }
        back *= 2;
    }
}

/// Follows producers whose transaction is still open at the end of a response to their markers
/// (all below the last stable offset, so all written), recording the aborted ones.
async fn follow_open<G: Storage>(
    storage: &G,
    tp: &Topition,
    mut offset: i64,
    limit: i64,
    isolation: IsolationLevel,
    scanned: &mut Scan,
) -> Result<()> {
    while !scanned.open.is_empty() && offset < limit {
        let fetched = storage.fetch(tp, offset, 1, LOOKAHEAD_BYTES, isolation).await?;
        let before = offset;
        for batch in fetched.iter().filter(|batch| batch.base_offset >= before) {
            scanned.observe_marker(batch)?;
            offset = next_offset(batch);
        }
        if offset == before {
            break;
        }
    }
    Ok(())
}

/// What a run of batches says about transactions.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// `(producer id, first offset)` of each aborted transaction with records in the run.
    pub aborted: Vec<(i64, i64)>,
    /// Producers with transactional records in the run and no marker yet, with the offset of
    /// their first such record.
    pub open: BTreeMap<i64, i64>,
}

impl Scan {
    fn observe_marker(&mut self, batch: &Batch) -> Result<()> {
        if !(batch.is_transactional() && batch.is_control()) {
            return Ok(());
        }
        let Some(first_offset) = self.open.remove(&batch.producer_id) else {
            return Ok(());
        };
        if is_abort_marker(batch)? {
            self.aborted.push((batch.producer_id, first_offset));
        }
        Ok(())
    }
}

/// Scans returned batches in offset order for transactions aborted within them or still open
/// at their end.
pub fn scan(batches: &[Batch]) -> Result<Scan> {
    let mut scanned = Scan::default();
    for batch in batches.iter().filter(|batch| batch.is_transactional()) {
        if batch.is_control() {
            scanned.observe_marker(batch)?;
        } else {
            scanned.open.entry(batch.producer_id).or_insert(batch.base_offset);
        }
    }
    Ok(scanned)
}

fn is_abort_marker(batch: &Batch) -> Result<bool> {
    let records = Vec::<Record>::try_from(batch)?;
    let key = records.first().and_then(|record| record.key.clone()).ok_or(Error::Api(ErrorCode::CorruptMessage))?;
    Ok(ControlBatch::try_from(key)?.is_abort())
}

/// The offset after a batch's last record.
pub fn next_offset(batch: &Batch) -> i64 {
    batch.base_offset + i64::from(batch.last_offset_delta) + 1
}

fn batch_bytes(batch: &Batch) -> u32 {
    // batch_length counts the bytes after the base offset and the length field themselves.
    u32::try_from(batch.batch_length).unwrap_or(0).saturating_add(12)
}

fn unknown_topic(fetch: &FetchTopic) -> FetchableTopicResponse {
    FetchableTopicResponse::default().topic(fetch.topic.clone()).topic_id(fetch.topic_id).partitions(
        fetch.partitions.as_ref().map(|partitions| {
            partitions
                .iter()
                .map(|partition| {
                    PartitionData::default()
                        .partition_index(partition.partition)
                        .error_code(ErrorCode::UnknownTopicOrPartition.into())
                        .high_watermark(-1)
                        .last_stable_offset(Some(-1))
                        .log_start_offset(Some(-1))
                        .aborted_transactions(Some(Vec::new()))
                        .preferred_read_replica(Some(-1))
                        .records(None)
                })
                .collect()
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tansu_sans_io::{BatchAttribute, EndTransactionMarker, record::inflated};

    fn data(offset: i64, producer: i64, records: i32, transactional: bool) -> Batch {
        let mut builder = inflated::Batch::builder()
            .base_offset(offset)
            .last_offset_delta(records - 1)
            .attributes(BatchAttribute::default().transaction(transactional).into())
            .producer_id(producer)
            .producer_epoch(0)
            .base_sequence(0);
        for delta in 0..records {
            builder = builder.record(Record::builder().offset_delta(delta).value(Some(Bytes::from_static(b"v"))));
        }
        builder.build().and_then(Batch::try_from).expect("data batch")
    }

    fn marker(offset: i64, producer: i64, commit: bool) -> Batch {
        let control = if commit { ControlBatch::default().commit() } else { ControlBatch::default().abort() };
        let key: Bytes = control.try_into().expect("control key");
        let value: Bytes = EndTransactionMarker::default().try_into().expect("marker value");
        inflated::Batch::builder()
            .base_offset(offset)
            .attributes(BatchAttribute::default().transaction(true).control(true).into())
            .producer_id(producer)
            .producer_epoch(0)
            .base_sequence(-1)
            .record(Record::builder().key(Some(key)).value(Some(value)))
            .build()
            .and_then(Batch::try_from)
            .expect("marker batch")
    }

    #[test]
    fn an_aborted_transaction_is_listed_from_its_first_record() {
        let batches = [data(0, 7, 3, true), data(3, 7, 2, true), marker(5, 7, false)];
        let scanned = scan(&batches).unwrap();
        assert_eq!(scanned.aborted, vec![(7, 0)]);
        assert!(scanned.open.is_empty());
    }

    #[test]
    fn committed_and_plain_records_are_not_listed() {
        let batches =
            [data(0, 7, 2, true), data(2, -1, 4, false), marker(6, 7, true), data(7, 8, 1, true), marker(8, 8, false)];
        let scanned = scan(&batches).unwrap();
        assert_eq!(scanned.aborted, vec![(8, 7)]);
        assert!(scanned.open.is_empty());
    }

    #[test]
    fn interleaved_producers_are_told_apart() {
        let batches =
            [data(0, 1, 1, true), data(1, 2, 1, true), data(2, 1, 1, true), marker(3, 2, false), marker(4, 1, true)];
        assert_eq!(scan(&batches).unwrap().aborted, vec![(2, 1)]);
    }

    #[test]
    fn a_transaction_without_its_marker_stays_open() {
        let batches = [data(0, 3, 2, true), marker(2, 4, false), data(3, 5, 1, true)];
        let scanned = scan(&batches).unwrap();
        assert!(scanned.aborted.is_empty());
        assert_eq!(scanned.open, BTreeMap::from([(3, 0), (5, 3)]));
    }

    #[test]
    fn a_marker_closes_a_transaction_followed_past_the_response() {
        let mut scanned = scan(&[data(0, 3, 2, true)]).unwrap();
        scanned.observe_marker(&data(2, 9, 1, true)).unwrap();
        scanned.observe_marker(&marker(3, 3, false)).unwrap();
        assert_eq!(scanned.aborted, vec![(3, 0)]);
        assert!(scanned.open.is_empty());
    }

    #[test]
    fn offsets_and_sizes_follow_the_batch_header() {
        let batch = data(10, -1, 4, false);
        assert_eq!(next_offset(&batch), 14);
        assert_eq!(batch_bytes(&batch), batch.batch_length as u32 + 12);
    }
}
