//! Re-scoring an archived day (`metronome score --archive LOCATION --day D`): the manifest, each
//! partition file checked against its sha256, each record decoded and validated as the processor
//! does (what it would dead-letter is skipped and counted), the events into the detection core.
//!
//! Users are scored from an empty state, as the day's first record finds them: state carried
//! over from the day before (an incident already open at midnight) is not in an archive.

use std::cell::Cell;
use std::rc::Rc;

use super::format::{manifest_path, sha256_hex, ArchiveReader, Day, FormatError, Manifest};
use metronome_core::keylog::{KeylogError, KeylogRecord};
use metronome_core::wire::{decode_record, InputRecord};
use metronome_io::objects::{Objects, ObjectsError, S3Config};

/// Why a backtest could not read its day.
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    /// The object store failed.
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    /// No manifest: the day was never archived, or its run did not finish.
    #[error("no complete archive of {topic} for {day} at {location} (no manifest)")]
    NotArchived {
        /// The topic.
        topic: String,
        /// The day.
        day: Day,
        /// The archive root.
        location: String,
    },
    /// A manifest or file is bad.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A file the manifest names is missing.
    #[error("{0} is in the manifest but not in the archive")]
    Missing(String),
}

/// An archived day, opened.
pub struct ArchivedDay {
    archive: Objects,
    manifest: Manifest,
    runtime: tokio::runtime::Runtime,
}

impl ArchivedDay {
    /// Opens the manifest of `day` of `topic` at `location`.
    pub fn open(location: &str, s3: &S3Config, topic: &str, day: Day) -> Result<Self, BacktestError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BacktestError::Format(FormatError::Io(e)))?;
        let archive = Objects::open(location, s3)?;
        let bytes = runtime.block_on(archive.get(&manifest_path(topic, day)))?.ok_or_else(|| {
            BacktestError::NotArchived { topic: topic.to_owned(), day, location: location.to_owned() }
        })?;
        let manifest = Manifest::from_json(&bytes)?;
        Ok(Self { archive, manifest, runtime })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The records of the day, partition by partition, in offset order, as keylog records.
    /// Records the processor would dead-letter are skipped and counted in `skipped`.
    pub fn records(
        self,
        max_events_per_record: usize,
        skipped: Rc<Cell<u64>>,
    ) -> impl Iterator<Item = Result<KeylogRecord, KeylogError>> {
        let ArchivedDay { archive, manifest, runtime } = self;
        let read = Rc::new(Cell::new(0u64));
        manifest.partitions.into_iter().flat_map(move |entry| {
            let file = runtime.block_on(archive.get(&entry.path)).map_err(BacktestError::from).and_then(|bytes| {
                let bytes = bytes.ok_or_else(|| BacktestError::Missing(entry.path.clone()))?;
                let actual = sha256_hex(&bytes);
                if actual != entry.file.sha256 {
                    return Err(FormatError::Checksum {
                        path: entry.path.clone(),
                        expected: entry.file.sha256.clone(),
                        actual,
                    }
                    .into());
                }
                Ok(bytes)
            });
            let records: Box<dyn Iterator<Item = Result<KeylogRecord, KeylogError>>> = match file {
                Err(e) => Box::new(std::iter::once(Err(archive_error(read.get(), &e)))),
                // Decoded a record at a time: memory holds the compressed file, not its events.
                Ok(bytes) => {
                    let (read, skipped) = (Rc::clone(&read), Rc::clone(&skipped));
                    Box::new(ArchiveReader::new(std::io::Cursor::new(bytes)).flat_map(move |item| {
                        read.set(read.get() + 1);
                        // The reader ends after an error, as the file can no longer be trusted.
                        let record = match item {
                            Ok(record) => record,
                            Err(e) => return vec![Err(archive_error(read.get(), &BacktestError::Format(e)))],
                        };
                        let input = InputRecord {
                            offset: record.offset,
                            key: record.key,
                            payload: record.value,
                            ..InputRecord::default()
                        };
                        match decode_record(&input, max_events_per_record) {
                            Ok(batch) => batch
                                .events
                                .into_iter()
                                .map(|event| {
                                    Ok(KeylogRecord {
                                        user_id: batch.user_id.clone(),
                                        session_id: String::new(),
                                        event,
                                    })
                                })
                                .collect(),
                            Err(_) => {
                                skipped.set(skipped.get() + 1);
                                Vec::new()
                            }
                        }
                    }))
                }
            };
            records
        })
    }
}

fn archive_error(records: u64, e: &BacktestError) -> KeylogError {
    KeylogError::Read { line: records, message: format!("archive: {e}") }
}
