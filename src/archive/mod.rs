//! `metronome archive`: the nightly archive of the raw input topic, its retention, and the
//! backtest that re-scores an archived day.
//!
//! ```text
//!  [keys.events] --(offsets of the day, per partition)--> staged file per partition (scratch,
//!       |                                                  unlinked: a crash leaves nothing)
//!       |             re-read: records written == records read, sha256
//!       v
//!  object store: <topic>/day=YYYY-MM-DD/partition-NNNNN.pb.gz ... then manifest.json (last)
//!  PostgreSQL archive_runs: running -> succeeded | failed (one row per topic and day)
//!  retention: days older than archive.retention_days deleted, manifest first
//!  `metronome score --archive LOCATION --day D`: manifest -> checked files -> detection core
//! ```
//!
//! A day is the offsets `[first record at or after 00:00, first record at or after 24:00)` of
//! each partition, by record timestamp. Consecutive days therefore share no record and miss
//! none, even when a late agent's records carry older timestamps (they are archived with the
//! day they arrived in). Files are deterministic, so a re-run writes the same bytes.
//!
//! # Layout
//! - [`mod@format`]: days, object paths, the partition file format and the manifest (pure).
//! - [`locate`]: where a time falls in a partition, checked against the records (pure).
//! - [`source`]: reading the topic (rdkafka).
//!
//! The object store (a directory or S3) and the PostgreSQL connection are `metronome_io`'s.
//! - [`runs`]: the `archive_runs` table.
//! - [`backtest`]: re-scoring an archived day.

pub mod backtest;
pub mod format;
pub mod locate;
pub mod runs;
pub mod source;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use self::format::{ArchiveReader, ArchiveWriter, Day, FormatError, Manifest, PartitionEntry, FORMAT_VERSION};
use self::runs::RunLog;
use self::source::{PartitionRange, ReadError, SourceError, TopicReader};
use crate::metrics::events::{ArchiveRunFinished, InternalEvent};
use metronome_io::objects::{Objects, ObjectsError, S3Config};
use metronome_io::postgres::{ConnectError, PgTarget};

/// Test hook: abort the process (a crash, not an error) once this many records are staged.
pub const ABORT_AFTER_RECORDS_ENV: &str = "METRONOME_FAULT_ARCHIVE_ABORT_AFTER_RECORDS";

/// `[archive]`: where archives go and how long they stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// A directory, or `s3://bucket/prefix`.
    pub url: String,
    /// The topic archived; empty: `stream.input_topic`.
    pub topic: String,
    /// Archived days older than this many days are deleted by each run; 0 keeps them all.
    pub retention_days: u32,
    /// Where partition files are staged before upload; empty: the system's temporary directory.
    pub scratch_dir: String,
    /// gzip level, 0-9.
    pub compression_level: u32,
    /// S3-compatible store settings.
    pub s3: S3Config,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            url: "metronome-archive".to_owned(),
            topic: String::new(),
            retention_days: 90,
            scratch_dir: String::new(),
            compression_level: 6,
            s3: S3Config::default(),
        }
    }
}

impl ArchiveConfig {
    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.url.trim().is_empty() {
            return Err("archive.url is empty".to_owned());
        }
        if self.compression_level > 9 {
            return Err(format!("archive.compression_level {} is not 0-9", self.compression_level));
        }
        Ok(())
    }

    fn scratch(&self) -> PathBuf {
        if self.scratch_dir.is_empty() {
            std::env::temp_dir()
        } else {
            PathBuf::from(&self.scratch_dir)
        }
    }
}

/// Why an archive run failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The day has not ended yet.
    #[error("day {0} has not ended yet (UTC)")]
    DayNotOver(Day),
    /// Kafka failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The object store failed.
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    /// PostgreSQL failed.
    #[error(transparent)]
    Database(#[from] ConnectError),
    /// A staged or archived file did not read back.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The scratch directory failed.
    #[error("staging in {dir}: {error}")]
    Scratch {
        /// The scratch directory.
        dir: String,
        /// What failed.
        error: std::io::Error,
    },
    /// The staged file does not hold what was read: the consistency check failed.
    #[error("partition {partition}: {read} records read but {written} read back from the staged file")]
    Mismatch {
        /// The partition.
        partition: i32,
        /// Records consumed.
        read: u64,
        /// Records in the file.
        written: u64,
    },
    /// The uploaded object's checksum is not the staged file's.
    #[error("{path}: uploaded sha256 {uploaded} is not the staged file's {staged}")]
    Upload {
        /// The object.
        path: String,
        /// Of the staged file.
        staged: String,
        /// Of the object.
        uploaded: String,
    },
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct ArchiveOutcome {
    /// The manifest written.
    pub manifest: Manifest,
    /// Its sha256.
    pub manifest_sha256: String,
    /// Records consumed.
    pub records_read: u64,
    /// Records read back from the files.
    pub records_written: u64,
    /// Days deleted by retention.
    pub expired: Vec<Day>,
}

/// One partition's staged file.
struct Staged {
    range: PartitionRange,
    file: File,
    entry: PartitionEntry,
    read: u64,
}

/// Archives `day` of `topic`: stage every partition, check, upload, write the manifest, record
/// the run (when `runs` is given), apply retention. `now_ms` decides whether the day is over
/// and what retention keeps.
pub async fn archive_day(
    cfg: &ArchiveConfig,
    kafka: &BTreeMap<String, String>,
    topic: &str,
    day: Day,
    now_ms: i64,
    runs: Option<&PgTarget>,
) -> Result<ArchiveOutcome, ArchiveError> {
    let (start_ms, end_ms) = day.bounds_ms();
    if end_ms > now_ms {
        return Err(ArchiveError::DayNotOver(day));
    }
    let archive = Objects::open(&cfg.url, &cfg.s3)?;
    let log = match runs {
        Some(target) => Some(RunLog::connect(target).await?),
        None => None,
    };
    if let Some(log) = &log {
        log.started(topic, day, archive.location()).await?;
    }
    let started = std::time::Instant::now();
    let result = archive_staged(cfg, kafka, &archive, topic, day, (start_ms, end_ms), now_ms).await;
    let event = ArchiveRunFinished {
        succeeded: result.is_ok(),
        records: result.as_ref().map_or(0, |o| o.records_written),
        seconds: started.elapsed().as_secs_f64(),
    };
    event.emit();
    match (&result, &log) {
        (Ok(outcome), Some(log)) => {
            log.succeeded(&outcome.manifest, outcome.records_read, outcome.records_written, &outcome.manifest_sha256)
                .await?;
            log.expired(topic, &outcome.expired).await?;
        }
        (Err(e), Some(log)) => {
            // The run's own error is the one to report; a failure to record it is logged.
            if let Err(db) = log.failed(topic, day, &e.to_string()).await {
                tracing::warn!(error = %db, "could not record the failed archive run");
            }
        }
        _ => {}
    }
    result
}

async fn archive_staged(
    cfg: &ArchiveConfig,
    kafka: &BTreeMap<String, String>,
    archive: &Objects,
    topic: &str,
    day: Day,
    (start_ms, end_ms): (i64, i64),
    now_ms: i64,
) -> Result<ArchiveOutcome, ArchiveError> {
    // Reading blocks (rdkafka's BaseConsumer); it runs on this worker, which the runtime replaces
    // meanwhile.
    let staged = tokio::task::block_in_place(|| stage_day(cfg, kafka, topic, day, start_ms, end_ms))?;
    let interrupted = archive.remove_interrupted_uploads(&format::day_prefix(topic, day))?;
    if interrupted > 0 {
        tracing::info!(files = interrupted, "removed uploads an earlier run left unfinished");
    }
    let records_read: u64 = staged.iter().map(|s| s.read).sum();
    let records_written: u64 = staged.iter().map(|s| s.entry.file.records).sum();
    let mut entries = Vec::with_capacity(staged.len());
    for mut s in staged {
        archive.put_file(&s.entry.path, &mut s.file).await?;
        // Read back from the store: what a reader will get is what was staged.
        let stored = archive.sha256(&s.entry.path).await?;
        if stored != s.entry.file.sha256 {
            return Err(ArchiveError::Upload { path: s.entry.path, staged: s.entry.file.sha256, uploaded: stored });
        }
        tracing::info!(
            partition = s.range.partition,
            records = s.entry.file.records,
            bytes = s.entry.file.bytes,
            "partition archived"
        );
        entries.push(s.entry);
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        topic: topic.to_owned(),
        day: day.to_string(),
        start_ms,
        end_ms,
        records: records_written,
        partitions: entries,
    };
    let json = manifest.to_json();
    let manifest_sha256 = format::sha256_hex(&json);
    archive.put_bytes(&format::manifest_path(topic, day), json).await?;

    let today = Day::containing(now_ms);
    // The day just archived stays even when it is past retention: an operator asked for it
    // (archiving an old day from a topic that still holds it); the next run deletes it.
    let expired: Vec<Day> = format::expired(&archived_days(archive, topic).await?, today, cfg.retention_days)
        .into_iter()
        .filter(|d| *d != day)
        .collect();
    for old in &expired {
        archive.delete_prefix(&format::day_prefix(topic, *old), &format::manifest_path(topic, *old)).await?;
        tracing::info!(day = %old, "archived day deleted by retention");
    }
    Ok(ArchiveOutcome { manifest, manifest_sha256, records_read, records_written, expired })
}

/// Reads every partition's share of the day into unlinked scratch files, each checked by reading
/// it back.
fn stage_day(
    cfg: &ArchiveConfig,
    kafka: &BTreeMap<String, String>,
    topic: &str,
    day: Day,
    start_ms: i64,
    end_ms: i64,
) -> Result<Vec<Staged>, ArchiveError> {
    let scratch = cfg.scratch();
    let scratch_err = |error| ArchiveError::Scratch { dir: scratch.display().to_string(), error };
    std::fs::create_dir_all(&scratch).map_err(scratch_err)?;
    let abort_after: Option<u64> = std::env::var(ABORT_AFTER_RECORDS_ENV).ok().and_then(|v| v.parse().ok());
    let mut staged_records = 0u64;
    let mut reader = TopicReader::new(kafka, topic)?;
    let mut out = Vec::new();
    for partition in reader.partitions()? {
        let range = reader.range(partition, start_ms, end_ms)?;
        // Unlinked from the start: whatever stops this process, no partial file stays behind.
        let file = tempfile::tempfile_in(&scratch).map_err(scratch_err)?;
        let mut writer = ArchiveWriter::new(BufWriter::new(file), cfg.compression_level);
        let read = reader
            .read(range, |record| {
                writer.append(&record)?;
                staged_records += 1;
                if abort_after.is_some_and(|n| staged_records >= n) {
                    eprintln!("metronome: {ABORT_AFTER_RECORDS_ENV} reached: aborting");
                    std::process::abort();
                }
                Ok(())
            })
            .map_err(|e| match e {
                ReadError::Source(s) => ArchiveError::Source(s),
                ReadError::Sink(error) => scratch_err(error),
            })?;
        let (buffered, summary) = writer.finish().map_err(scratch_err)?;
        let mut file = buffered.into_inner().map_err(|e| scratch_err(e.into_error()))?;
        // The consistency check: the file holds every record read, and nothing else.
        file.seek(SeekFrom::Start(0)).map_err(scratch_err)?;
        let mut written = 0u64;
        for record in ArchiveReader::new(std::io::BufReader::new(&mut file)) {
            record?;
            written += 1;
        }
        if written != read || summary.records != read {
            return Err(ArchiveError::Mismatch { partition, read, written });
        }
        let entry = PartitionEntry {
            partition,
            path: format::partition_path(topic, day, partition),
            start_offset: range.start,
            end_offset: range.end,
            file: summary,
        };
        tracing::info!(partition, start = range.start, end = range.end, records = read, "partition staged");
        out.push(Staged { range, file, entry, read });
    }
    Ok(out)
}

/// The days archived for `topic` (complete or not).
async fn archived_days(archive: &Objects, topic: &str) -> Result<Vec<Day>, ObjectsError> {
    Ok(archive.folders(topic).await?.iter().filter_map(|f| format::day_of_segment(f)).collect())
}
