//! ListOffsets from the partition's offset stage and its record timestamps.
//!
//! tansu 0.6.0 answers "latest" with the base offset of the most recently written batch plus
//! one (short by the batch's other records), and under `read_committed` with 0 while any
//! transaction is open; "by timestamp" follows the time objects were stored. Clients use these
//! answers for watermarks, lag, `auto.offset.reset` and `offsets_for_times`, so this service
//! answers as Kafka does: latest is the high watermark (the last stable offset under
//! `read_committed`), earliest the log start, and a timestamp the first record at or after it.

use rama::{Context, Service};
use tansu_sans_io::{
    ErrorCode, IsolationLevel, ListOffsetsRequest, ListOffsetsResponse,
    list_offsets_response::{ListOffsetsPartitionResponse, ListOffsetsTopicResponse},
    record::Record,
};
use tansu_storage::{Error, Result, Storage, Topition};

use crate::fetch::{isolation_of, next_offset};

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
/// Bytes read per step when searching by timestamp.
const SCAN_BYTES: u32 = 1024 * 1024;

#[derive(Clone, Copy, Debug, Default)]
pub struct ListOffsetsService;

impl<G> Service<G, ListOffsetsRequest> for ListOffsetsService
where
    G: Storage,
{
    type Response = ListOffsetsResponse;
    type Error = Error;

    async fn serve(&self, ctx: Context<G>, req: ListOffsetsRequest) -> Result<ListOffsetsResponse> {
        let isolation = isolation_of(req.isolation_level)?;
        let mut topics = Vec::new();
        for topic in req.topics.unwrap_or_default() {
            let mut partitions = Vec::new();
            for partition in topic.partitions.unwrap_or_default() {
                let tp = Topition::new(topic.name.clone(), partition.partition_index);
                let (error, offset, timestamp) = match lookup(ctx.state(), &tp, partition.timestamp, isolation).await {
                    Ok((offset, timestamp)) => (ErrorCode::None, offset, timestamp),
                    Err(Error::Api(code)) => (code, -1, -1),
                    Err(other) => return Err(other),
                };
                partitions.push(
                    ListOffsetsPartitionResponse::default()
                        .partition_index(partition.partition_index)
                        .error_code(error.into())
                        .old_style_offsets(None)
                        .timestamp(Some(timestamp))
                        .offset(Some(offset))
                        .leader_epoch(Some(0)),
                );
            }
            topics.push(ListOffsetsTopicResponse::default().name(topic.name).partitions(Some(partitions)));
        }
        Ok(ListOffsetsResponse::default().throttle_time_ms(Some(0)).topics(Some(topics)))
    }
}

/// `(offset, timestamp)` for one partition; `(-1, -1)` when no record is that recent.
async fn lookup<G: Storage>(
    storage: &G,
    tp: &Topition,
    timestamp: i64,
    isolation: IsolationLevel,
) -> Result<(i64, i64)> {
    let stage = storage.offset_stage(tp).await.map_err(|_| Error::Api(ErrorCode::UnknownTopicOrPartition))?;
    let end = if isolation == IsolationLevel::ReadCommitted { stage.last_stable() } else { stage.high_watermark() };
    tracing::debug!(?tp, timestamp, ?stage, "list offsets");
    match timestamp {
        LATEST => Ok((end, -1)),
        EARLIEST => Ok((stage.log_start(), -1)),
        t if t >= 0 => first_at_or_after(storage, tp, t, stage.log_start(), end, isolation).await,
        _ => Err(Error::Api(ErrorCode::InvalidRequest)),
    }
}

async fn first_at_or_after<G: Storage>(
    storage: &G,
    tp: &Topition,
    timestamp: i64,
    mut offset: i64,
    end: i64,
    isolation: IsolationLevel,
) -> Result<(i64, i64)> {
    while offset < end {
        let batches = storage.fetch(tp, offset, 1, SCAN_BYTES, isolation).await?;
        let before = offset;
        for batch in batches.iter().filter(|batch| batch.base_offset >= before) {
            offset = next_offset(batch);
            if batch.is_control() || batch.max_timestamp < timestamp {
                continue;
            }
            for record in Vec::<Record>::try_from(batch)? {
                let at = batch.base_timestamp + record.timestamp_delta;
                if at >= timestamp {
                    return Ok((batch.base_offset + i64::from(record.offset_delta), at));
                }
            }
        }
        if offset == before {
            break;
        }
    }
    Ok((-1, -1))
}
