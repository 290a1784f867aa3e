//! What an archived day is, as plain data: the day and its bounds, where its objects live, the
//! partition file format (gzip of length-delimited [`proto::ArchivedRecord`]s) and the manifest.
//!
//! Pure: no Kafka, no object store. Files are written deterministically (gzip header without a
//! time or name, fixed level), so archiving the same records twice gives the same bytes and the
//! same sha256: a re-run of a day is idempotent down to the checksum.

use std::io::{self, Read, Write};

use chrono::{Duration as Days, NaiveDate, NaiveTime, Utc};
use flate2::read::GzDecoder;
use flate2::{Compression, GzBuilder};
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use metronome_core::proto;

/// Version of the file format and manifest layout; readers refuse others.
pub const FORMAT_VERSION: u32 = 1;

/// Largest record a reader accepts (a corrupt length must not allocate gigabytes).
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// One UTC calendar day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(NaiveDate);

/// Why a day did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a day (YYYY-MM-DD)")]
pub struct BadDay(pub String);

impl Day {
    /// Parses `YYYY-MM-DD`.
    pub fn parse(text: &str) -> Result<Self, BadDay> {
        NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").map(Day).map_err(|_| BadDay(text.to_owned()))
    }

    /// The day before the UTC day of `now_ms`.
    pub fn yesterday(now_ms: i64) -> Self {
        Self::containing(now_ms).minus(1)
    }

    /// The UTC day that contains `time_ms`.
    pub fn containing(time_ms: i64) -> Self {
        let at = chrono::DateTime::<Utc>::from_timestamp_millis(time_ms).unwrap_or_default();
        Day(at.date_naive())
    }

    /// `n` days earlier.
    pub fn minus(self, n: i64) -> Self {
        Day(self.0.checked_sub_signed(Days::days(n)).unwrap_or(NaiveDate::MIN))
    }

    /// `[start, end)` of the day, milliseconds since the epoch.
    pub fn bounds_ms(self) -> (i64, i64) {
        let start = self.0.and_time(NaiveTime::MIN).and_utc().timestamp_millis();
        (start, start + 86_400_000)
    }
}

impl std::fmt::Display for Day {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}

/// Where a day's objects live, relative to the archive root: `<topic>/day=<day>/`.
pub fn day_prefix(topic: &str, day: Day) -> String {
    format!("{topic}/day={day}")
}

/// The object of one partition's records.
pub fn partition_path(topic: &str, day: Day, partition: i32) -> String {
    format!("{}/partition-{partition:05}.pb.gz", day_prefix(topic, day))
}

/// The day's manifest: written last, so its presence means the day is complete.
pub fn manifest_path(topic: &str, day: Day) -> String {
    format!("{}/manifest.json", day_prefix(topic, day))
}

/// The day a `day=YYYY-MM-DD` path segment names.
pub fn day_of_segment(segment: &str) -> Option<Day> {
    Day::parse(segment.strip_prefix("day=")?).ok()
}

/// The archived days older than `retention_days` before `today` (0 keeps everything).
pub fn expired(days: &[Day], today: Day, retention_days: u32) -> Vec<Day> {
    if retention_days == 0 {
        return Vec::new();
    }
    let oldest_kept = today.minus(i64::from(retention_days));
    let mut out: Vec<Day> = days.iter().copied().filter(|d| *d < oldest_kept).collect();
    out.sort();
    out.dedup();
    out
}

/// What the manifest says of one partition's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// The input partition.
    pub partition: i32,
    /// The object, relative to the archive root.
    pub path: String,
    /// The offset range archived: `[start_offset, end_offset)`.
    pub start_offset: i64,
    /// See `start_offset`.
    pub end_offset: i64,
    /// What the file holds (its fields sit beside the ones above in the JSON).
    #[serde(flatten)]
    pub file: FileSummary,
}

/// A day's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// The archived topic.
    pub topic: String,
    /// The day, `YYYY-MM-DD`.
    pub day: String,
    /// `[start, end)` of the day, milliseconds.
    pub start_ms: i64,
    /// See `start_ms`.
    pub end_ms: i64,
    /// Records in all files.
    pub records: u64,
    /// One entry per partition of the topic, in partition order.
    pub partitions: Vec<PartitionEntry>,
}

/// Why a manifest or file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The manifest is not JSON of the expected shape.
    #[error("manifest does not parse: {0}")]
    Manifest(String),
    /// Written by a newer or older layout.
    #[error("archive format {0} is not supported (this build reads {FORMAT_VERSION})")]
    Version(u32),
    /// The file's checksum is not the manifest's.
    #[error("{path}: sha256 {actual} does not match the manifest's {expected}")]
    Checksum {
        /// The object.
        path: String,
        /// What the manifest says.
        expected: String,
        /// What the file hashes to.
        actual: String,
    },
    /// The file is not a gzip stream of length-delimited records.
    #[error("archive file is corrupt: {0}")]
    Corrupt(&'static str),
    /// Reading failed.
    #[error("reading archive file: {0}")]
    Io(#[from] io::Error),
}

impl Manifest {
    /// Deterministic JSON (field order fixed, no run time in it): the same day gives the same
    /// bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        out.push(b'\n');
        out
    }

    /// Parses and checks the version.
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| FormatError::Manifest(e.to_string()))?;
        if m.format != FORMAT_VERSION {
            return Err(FormatError::Version(m.format));
        }
        Ok(m)
    }
}

/// sha256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Counts and hashes what passes through to the inner writer.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a finished file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    /// Records written.
    pub records: u64,
    /// First and last record offset.
    pub first_offset: Option<i64>,
    /// See `first_offset`.
    pub last_offset: Option<i64>,
    /// Smallest and largest record timestamp.
    pub min_timestamp_ms: Option<i64>,
    /// See `min_timestamp_ms`.
    pub max_timestamp_ms: Option<i64>,
    /// Compressed size.
    pub bytes: u64,
    /// sha256 of the compressed bytes, hex.
    pub sha256: String,
}

/// Encoded records gathered before they go to the compressor.
const WRITE_BLOCK_BYTES: usize = 64 * 1024;

/// Writes one partition file.
pub struct ArchiveWriter<W: Write> {
    gz: flate2::write::GzEncoder<Hashing<W>>,
    summary: FileSummary,
    /// Encoded records not yet handed to the compressor.
    pending: Vec<u8>,
}

impl<W: Write> ArchiveWriter<W> {
    /// A file written to `out`, gzip at `level` (0-9).
    pub fn new(out: W, level: u32) -> Self {
        let hashing = Hashing { inner: out, hash: Sha256::new(), bytes: 0 };
        // No mtime, no file name: the bytes depend on the records alone.
        let gz = GzBuilder::new().mtime(0).write(hashing, Compression::new(level.min(9)));
        Self { gz, summary: FileSummary::default(), pending: Vec::with_capacity(WRITE_BLOCK_BYTES + 1024) }
    }

    /// Appends `record`.
    pub fn append(&mut self, record: &proto::ArchivedRecord) -> io::Result<()> {
        record.encode_length_delimited(&mut self.pending).expect("a Vec always has room");
        // deflate pays per call: hand it records in blocks, not one by one.
        if self.pending.len() >= WRITE_BLOCK_BYTES {
            self.gz.write_all(&self.pending)?;
            self.pending.clear();
        }
        let s = &mut self.summary;
        s.records += 1;
        s.first_offset.get_or_insert(record.offset);
        s.last_offset = Some(record.offset);
        s.min_timestamp_ms = Some(s.min_timestamp_ms.map_or(record.timestamp_ms, |m| m.min(record.timestamp_ms)));
        s.max_timestamp_ms = Some(s.max_timestamp_ms.map_or(record.timestamp_ms, |m| m.max(record.timestamp_ms)));
        Ok(())
    }

    /// Records so far.
    pub fn records(&self) -> u64 {
        self.summary.records
    }

    /// Ends the gzip stream; the writer and what it holds.
    pub fn finish(mut self) -> io::Result<(W, FileSummary)> {
        self.gz.write_all(&self.pending)?;
        let hashing = self.gz.finish()?;
        let mut summary = self.summary;
        summary.bytes = hashing.bytes;
        summary.sha256 = hex::encode(hashing.hash.finalize());
        Ok((hashing.inner, summary))
    }
}

/// Reads the records of one partition file, in order.
pub struct ArchiveReader<R: Read> {
    // Buffered: record lengths are read a byte at a time.
    gz: io::BufReader<GzDecoder<R>>,
    done: bool,
}

impl<R: Read> ArchiveReader<R> {
    /// Reads the gzip stream `input`.
    pub fn new(input: R) -> Self {
        Self { gz: io::BufReader::new(GzDecoder::new(input)), done: false }
    }

    fn next_record(&mut self) -> Result<Option<proto::ArchivedRecord>, FormatError> {
        // A varint length, then that many bytes; a clean end only before a length.
        let mut len: u64 = 0;
        for i in 0..10 {
            let mut byte = [0u8; 1];
            match self.gz.read(&mut byte)? {
                0 if i == 0 => return Ok(None),
                0 => return Err(FormatError::Corrupt("file ends inside a record length")),
                _ => {}
            }
            len |= u64::from(byte[0] & 0x7f) << (7 * i);
            if byte[0] & 0x80 == 0 {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > MAX_RECORD_BYTES {
                    return Err(FormatError::Corrupt("record length beyond the limit"));
                }
                let mut body = vec![0u8; len];
                self.gz.read_exact(&mut body).map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => FormatError::Corrupt("file ends inside a record"),
                    _ => FormatError::Io(e),
                })?;
                return proto::ArchivedRecord::decode(body.as_slice())
                    .map(Some)
                    .map_err(|_| FormatError::Corrupt("a record does not decode"));
            }
        }
        Err(FormatError::Corrupt("record length is not a varint"))
    }
}

impl<R: Read> Iterator for ArchiveReader<R> {
    type Item = Result<proto::ArchivedRecord, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_record();
        if !matches!(next, Ok(Some(_))) {
            self.done = true;
        }
        next.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(offset: i64, ts: i64, value: Option<Vec<u8>>) -> proto::ArchivedRecord {
        proto::ArchivedRecord { offset, timestamp_ms: ts, key: Some(b"u1".to_vec()), value }
    }

    fn write(records: &[proto::ArchivedRecord]) -> (Vec<u8>, FileSummary) {
        let mut w = ArchiveWriter::new(Vec::new(), 6);
        for r in records {
            w.append(r).unwrap();
        }
        w.finish().unwrap()
    }

    proptest! {
        #[test]
        fn files_round_trip_and_are_deterministic(
            records in proptest::collection::vec(
                (0i64..1 << 40, any::<i64>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300))),
                0..40,
            )
        ) {
            let records: Vec<_> = records.into_iter().map(|(o, t, v)| record(o, t, v)).collect();
            let (bytes, summary) = write(&records);
            let again = write(&records);
            prop_assert_eq!(&again.0, &bytes);
            prop_assert_eq!(&summary.sha256, &sha256_hex(&bytes));
            prop_assert_eq!(summary.bytes, bytes.len() as u64);
            prop_assert_eq!(summary.records, records.len() as u64);
            let read: Vec<_> = ArchiveReader::new(bytes.as_slice()).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(read, records);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            for item in ArchiveReader::new(bytes.as_slice()) {
                let _ = item;
            }
        }
    }

    #[test]
    fn records_spanning_many_write_blocks_read_back_and_compress_as_one_stream() {
        // About 10 blocks, with records of varied sizes crossing block boundaries.
        let records: Vec<_> =
            (0..5000).map(|i| record(i, i * 10, Some(vec![(i % 251) as u8; (i % 257) as usize]))).collect();
        let (bytes, summary) = write(&records);
        let read: Vec<_> = ArchiveReader::new(bytes.as_slice()).collect::<Result<_, _>>().unwrap();
        assert_eq!(read, records);
        assert_eq!(summary.records, 5000);
        // Blocking is invisible in the file: the same bytes as compressing every record in one go.
        let framed: Vec<u8> = records.iter().flat_map(|r| r.encode_length_delimited_to_vec()).collect();
        assert!(framed.len() > 8 * WRITE_BLOCK_BYTES);
        let mut gz = GzBuilder::new().mtime(0).write(Vec::new(), Compression::new(6));
        gz.write_all(&framed).unwrap();
        assert_eq!(gz.finish().unwrap(), bytes);
    }

    #[test]
    fn a_truncated_file_is_an_error_not_fewer_records() {
        let records: Vec<_> = (0..200).map(|i| record(i, i * 10, Some(vec![7; 40]))).collect();
        let (bytes, _) = write(&records);
        let cut = &bytes[..bytes.len() / 2];
        let result: Result<Vec<_>, _> = ArchiveReader::new(cut).collect();
        assert!(result.is_err(), "half a file must not read as a shorter day");
    }

    #[test]
    fn summaries_track_offsets_and_times() {
        let (_, s) = write(&[record(5, 300, None), record(6, 100, None), record(9, 200, None)]);
        assert_eq!((s.first_offset, s.last_offset), (Some(5), Some(9)));
        assert_eq!((s.min_timestamp_ms, s.max_timestamp_ms), (Some(100), Some(300)));
        let (_, empty) = write(&[]);
        assert_eq!((empty.records, empty.first_offset), (0, None));
    }

    #[test]
    fn days_parse_bound_and_name_paths() {
        let day = Day::parse("2026-11-28").unwrap();
        assert_eq!(day.to_string(), "2026-11-28");
        let (start, end) = day.bounds_ms();
        assert_eq!(start, 1_795_824_000_000);
        assert_eq!(end - start, 86_400_000);
        assert_eq!(Day::containing(start), day);
        assert_eq!(Day::containing(end - 1), day);
        assert_eq!(Day::yesterday(end + 5), day);
        assert!(Day::parse("2026-13-01").is_err());
        assert!(Day::parse("yesterday").is_err());
        assert_eq!(partition_path("keys.events", day, 3), "keys.events/day=2026-11-28/partition-00003.pb.gz");
        assert_eq!(manifest_path("keys.events", day), "keys.events/day=2026-11-28/manifest.json");
        assert_eq!(day_of_segment("day=2026-11-28"), Some(day));
        assert_eq!(day_of_segment("partition-00003.pb.gz"), None);
    }

    #[test]
    fn retention_keeps_the_configured_days() {
        let today = Day::parse("2026-11-29").unwrap();
        let days: Vec<Day> = (0..10).map(|n| today.minus(n)).collect();
        let gone = expired(&days, today, 7);
        assert_eq!(gone, vec![today.minus(9), today.minus(8)]);
        assert!(expired(&days, today, 0).is_empty(), "0 keeps everything");
    }

    #[test]
    fn manifests_round_trip_and_refuse_other_versions() {
        let m = Manifest {
            format: FORMAT_VERSION,
            topic: "t".into(),
            day: "2026-11-28".into(),
            start_ms: 0,
            end_ms: 86_400_000,
            records: 0,
            partitions: vec![],
        };
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        let mut other = m.clone();
        other.format = 99;
        assert!(matches!(Manifest::from_json(&other.to_json()), Err(FormatError::Version(99))));
        assert!(Manifest::from_json(b"{").is_err());
    }
}
