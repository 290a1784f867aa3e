//! The SQL side of the sink and of the alert API: writing a batch of alerts with the offsets
//! after it in one transaction, reading the offsets back, and querying alerts.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Transaction};

use metronome_core::proto;

/// One record read from the alert topic.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkRecord {
    /// A decoded alert.
    Alert {
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// The alert.
        alert: Box<proto::Alert>,
    },
    /// Bytes that are not an alert: kept in `sink_dead_letters`.
    Undecodable {
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// The record's value, as it came.
        payload: Option<Vec<u8>>,
    },
}

impl SinkRecord {
    /// Decodes the record at `partition`/`offset`.
    pub fn decode(partition: i32, offset: i64, payload: Option<&[u8]>) -> Self {
        use prost::Message as _;
        match payload.map(proto::Alert::decode) {
            Some(Ok(alert)) if !alert.alert_id.is_empty() => {
                SinkRecord::Alert { partition, offset, alert: Box::new(alert) }
            }
            _ => SinkRecord::Undecodable { partition, offset, payload: payload.map(<[u8]>::to_vec) },
        }
    }

    /// The record's partition.
    pub fn partition(&self) -> i32 {
        match self {
            SinkRecord::Alert { partition, .. } | SinkRecord::Undecodable { partition, .. } => *partition,
        }
    }

    /// The record's offset.
    pub fn offset(&self) -> i64 {
        match self {
            SinkRecord::Alert { offset, .. } | SinkRecord::Undecodable { offset, .. } => *offset,
        }
    }
}

/// What one write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    /// Alerts inserted.
    pub written: u64,
    /// Alerts whose id was already there (an at-least-once replay upstream).
    pub duplicates: u64,
    /// Undecodable records kept.
    pub dead_letters: u64,
    /// Records below the stored offsets (already written by this or another sink): skipped.
    pub already_written: u64,
}

fn time_of(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

fn micros_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// The next offset to write, by partition of `topic`, as stored for `consumer`.
pub async fn load_offsets(
    client: &impl GenericClient,
    consumer: &str,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT partition, next_offset FROM sink_offsets WHERE consumer = $1 AND topic = $2",
            &[&consumer, &topic],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1))).collect())
}

/// Writes `records` (from `topic`) and the offsets after them for `consumer` in one
/// transaction: [`stage_batch`], then the commit. Returns the summary and the new next offsets.
pub async fn write_batch(
    client: &mut Client,
    consumer: &str,
    topic: &str,
    records: &[SinkRecord],
) -> Result<(WriteSummary, BTreeMap<i32, i64>), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let written = stage_batch(&tx, consumer, topic, records).await?;
    tx.commit().await?;
    Ok(written)
}

/// Writes `records` and the offsets after them for `consumer` inside `tx`, uncommitted.
/// Records below the stored offsets, read under a row lock, are skipped, so two sinks briefly
/// owning one partition, or a sink re-reading after a crash, write nothing twice.
pub async fn stage_batch(
    tx: &Transaction<'_>,
    consumer: &str,
    topic: &str,
    records: &[SinkRecord],
) -> Result<(WriteSummary, BTreeMap<i32, i64>), tokio_postgres::Error> {
    let mut summary = WriteSummary::default();
    let partitions: Vec<i32> = {
        let mut p: Vec<i32> = records.iter().map(SinkRecord::partition).collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    let rows = tx
        .query(
            "SELECT partition, next_offset FROM sink_offsets
             WHERE consumer = $1 AND topic = $2 AND partition = ANY($3) FOR UPDATE",
            &[&consumer, &topic, &partitions],
        )
        .await?;
    let next: BTreeMap<i32, i64> = rows.iter().map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1))).collect();
    let insert_alert = tx
        .prepare(
            "INSERT INTO alerts (alert_id, user_id, window_start, window_end, detected_at, score, timing_score,
                                 histogram_score, lstm_score, scorers, reasons, model_version, features,
                                 source_topic, source_partition, source_offset, interval_histogram, fleet)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
             ON CONFLICT (alert_id) DO NOTHING",
        )
        .await?;
    let insert_dead = tx
        .prepare(
            "INSERT INTO sink_dead_letters (topic, partition, \"offset\", error_class, payload)
             VALUES ($1, $2, $3, 'undecodable', $4) ON CONFLICT DO NOTHING",
        )
        .await?;
    let plan = plan_batch(records, next);
    summary.already_written = plan.already_written;
    for record in plan.records {
        let (partition, offset) = (record.partition(), record.offset());
        match record {
            SinkRecord::Alert { alert, .. } => {
                let features = metronome_core::alert_json::features_json(&alert.features);
                let histogram = alert.interval_histogram.as_ref().map(metronome_core::alert_json::histogram_json);
                let fleet = alert.fleet.as_ref().map(metronome_core::alert_json::fleet_json);
                let params: [&(dyn ToSql + Sync); 18] = [
                    &alert.alert_id,
                    &alert.user_id,
                    &time_of(alert.window_start_us),
                    &time_of(alert.window_end_us),
                    &time_of(alert.detected_at_us),
                    &alert.score,
                    &alert.timing_score,
                    &alert.histogram_score,
                    &alert.lstm_score,
                    &alert.scorers,
                    &alert.reasons,
                    &alert.model_version,
                    &features,
                    &topic,
                    &partition,
                    &offset,
                    &histogram,
                    &fleet,
                ];
                if tx.execute(&insert_alert, &params).await? == 1 {
                    summary.written += 1;
                } else {
                    summary.duplicates += 1;
                }
            }
            SinkRecord::Undecodable { payload, .. } => {
                tx.execute(&insert_dead, &[&topic, &partition, &offset, payload]).await?;
                summary.dead_letters += 1;
            }
        }
    }
    let next = plan.next;
    for (partition, offset) in &next {
        tx.execute(
            "INSERT INTO sink_offsets (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer, topic, partition)
             DO UPDATE SET next_offset = GREATEST(sink_offsets.next_offset, EXCLUDED.next_offset), updated_at = now()",
            &[&consumer, &topic, partition, offset],
        )
        .await?;
    }
    Ok((summary, next))
}

/// What of a batch is still to be written, given the next offsets stored.
#[derive(Debug, PartialEq)]
pub struct BatchPlan<'a> {
    /// The records at or past the stored offsets, in order; a record read twice within the
    /// batch (a partition assigned again meanwhile) once.
    pub records: Vec<&'a SinkRecord>,
    /// Records below the stored offsets (or read before within the batch): skipped.
    pub already_written: u64,
    /// The next offsets once the batch is in.
    pub next: BTreeMap<i32, i64>,
}

/// Plans writing `records` over the `stored` next offsets: so two sinks briefly owning one
/// partition, or a sink re-reading after a crash, write nothing twice.
pub fn plan_batch(records: &[SinkRecord], stored: BTreeMap<i32, i64>) -> BatchPlan<'_> {
    let mut plan = BatchPlan { records: Vec::with_capacity(records.len()), already_written: 0, next: stored };
    for record in records {
        let next = plan.next.entry(record.partition()).or_insert(0);
        if record.offset() < *next {
            plan.already_written += 1;
        } else {
            plan.records.push(record);
            *next = record.offset() + 1;
        }
    }
    plan
}

/// Which alerts `GET /api/alerts` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertQuery {
    /// Detected at or after, microseconds since the epoch.
    pub since_us: Option<i64>,
    /// One user's alerts only.
    pub user: Option<String>,
    /// Most rows.
    pub limit: i64,
}

/// Alerts matching `query`, newest first, as JSON objects (the alert topic's field names, plus
/// where each came from).
pub async fn query_alerts(
    client: &impl GenericClient,
    query: &AlertQuery,
) -> Result<Vec<serde_json::Value>, tokio_postgres::Error> {
    let since = query.since_us.map(time_of);
    let rows = client
        .query(
            "SELECT alert_id, user_id, window_start, window_end, detected_at, score, timing_score, histogram_score,
                    lstm_score, scorers, reasons, model_version, features, source_partition, source_offset,
                    interval_histogram, fleet
             FROM alerts
             WHERE ($1::timestamptz IS NULL OR detected_at >= $1) AND ($2::text IS NULL OR user_id = $2)
             ORDER BY detected_at DESC, alert_id
             LIMIT $3",
            &[&since, &query.user, &query.limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "alert_id": r.get::<_, String>(0),
                "user_id": r.get::<_, String>(1),
                "window_start_us": micros_of(r.get(2)),
                "window_end_us": micros_of(r.get(3)),
                "detected_at_us": micros_of(r.get(4)),
                "detected_at": humantime::format_rfc3339_micros(r.get::<_, SystemTime>(4)).to_string(),
                "score": r.get::<_, f64>(5),
                "timing_score": r.get::<_, f64>(6),
                "histogram_score": r.get::<_, f64>(7),
                "lstm_score": r.get::<_, Option<f64>>(8),
                "scorers": r.get::<_, Vec<String>>(9),
                "reasons": r.get::<_, Vec<String>>(10),
                "model_version": r.get::<_, String>(11),
                "features": r.get::<_, serde_json::Value>(12),
                "partition": r.get::<_, i32>(13),
                "offset": r.get::<_, i64>(14),
                "interval_histogram": r.get::<_, Option<serde_json::Value>>(15),
                "fleet": r.get::<_, Option<serde_json::Value>>(16),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn undecodable(partition: i32, offset: i64) -> SinkRecord {
        SinkRecord::Undecodable { partition, offset, payload: None }
    }

    #[test]
    fn a_plan_skips_what_is_stored_and_what_the_batch_already_holds() {
        let records = [undecodable(0, 3), undecodable(0, 4), undecodable(1, 0), undecodable(0, 4), undecodable(2, 9)];
        let plan = plan_batch(&records, BTreeMap::from([(0, 4), (3, 7)]));
        assert_eq!(plan.records, [&records[1], &records[2], &records[4]]);
        assert_eq!(plan.already_written, 2, "offset 3 is stored, offset 4 came twice");
        assert_eq!(plan.next, BTreeMap::from([(0, 5), (1, 1), (2, 10), (3, 7)]));
        let nothing = plan_batch(&[], BTreeMap::new());
        assert_eq!((nothing.records.len(), nothing.already_written, nothing.next.len()), (0, 0, 0));
    }

    #[test]
    fn times_round_trip_at_microseconds() {
        for us in [0, 1, 1_700_000_000_123_456, -5] {
            assert_eq!(micros_of(time_of(us)), us);
        }
    }

    #[test]
    fn only_alerts_with_an_id_decode_as_alerts() {
        use prost::Message as _;
        let alert = proto::Alert { alert_id: "a".into(), user_id: "u".into(), ..Default::default() };
        let bytes = alert.encode_to_vec();
        assert!(matches!(SinkRecord::decode(1, 7, Some(&bytes)), SinkRecord::Alert { partition: 1, offset: 7, .. }));
        assert!(matches!(SinkRecord::decode(0, 1, Some(&[0xff, 0xff])), SinkRecord::Undecodable { .. }));
        assert!(matches!(SinkRecord::decode(0, 1, None), SinkRecord::Undecodable { payload: None, .. }));
        // Valid Protobuf that is not an alert (no id) is kept as a dead letter too.
        assert!(matches!(SinkRecord::decode(0, 1, Some(&[])), SinkRecord::Undecodable { .. }));
    }
}
