//! The agent's spool: every record goes to a bounded file first and leaves it only once the
//! broker has acknowledged it, so a broker that is down (or an agent that restarts) loses
//! nothing up to the spool's size.
//!
//! The file is a crash-safe FIFO (`queue-file` 1.4, a port of Square's Tape: a ring buffer whose
//! header is written last, so an interrupted add or remove leaves the previous state; 2.0.0 was
//! not taken: it shrinks a grown file when it empties but leaves the old length in the header,
//! and then refuses to open the file, which `a_spool_that_grew_and_emptied_opens_again` catches). Records
//! are read from the front in order, handed to the producer, and removed from the front as
//! their acknowledgements come back, so the broker receives them in capture order. When the
//! records held would exceed `max_bytes`, new records are refused and counted: the oldest
//! keystrokes are the ones a late alert still needs, and a refused record is reported, never
//! silently lost. The file itself may grow to about twice `max_bytes` (the ring doubles when it
//! expands) and is reused, not shrunk.

use std::path::{Path, PathBuf};

use queue_file::QueueFile;

/// Bytes the queue file spends on each element beside its payload (a length prefix).
const ELEMENT_OVERHEAD: u64 = 4;

/// Why the spool failed. Messages name the file, never a record.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool file could not be opened or created.
    #[error("cannot open the spool {path}: {source}")]
    Open {
        /// The spool file.
        path: PathBuf,
        /// Why.
        source: queue_file::Error,
    },
    /// Reading or writing the spool failed.
    #[error("spool {path}: {source}")]
    Io {
        /// The spool file.
        path: PathBuf,
        /// Why.
        source: queue_file::Error,
    },
}

/// What [`Spool::push`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Stored; it will be sent.
    Stored,
    /// Refused: the spool is full. Counted in [`Spool::refused`].
    Refused,
}

/// A bounded, persistent FIFO of encoded records.
pub struct Spool {
    file: QueueFile,
    path: PathBuf,
    max_bytes: u64,
    /// Sizes of the held records, oldest first, so the bound is exact without reading the file.
    sizes: std::collections::VecDeque<u64>,
    held_bytes: u64,
    refused: u64,
}

impl Spool {
    /// Opens the spool at `path` (created when missing; records left by an earlier run are kept
    /// and sent first), holding at most `max_bytes` of records.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| SpoolError::Open { path: path.to_owned(), source: e.into() })?;
        }
        let mut file = match QueueFile::open(path) {
            Ok(file) => file,
            Err(source @ queue_file::Error::Io { .. }) => {
                return Err(SpoolError::Open { path: path.to_owned(), source })
            }
            Err(corrupt) => {
                // Unreadable (cut short by a crash mid-write, or not a spool): keep it aside for a
                // person to look at, say so, and start an empty spool rather than never sending again.
                let aside = path.with_extension(format!("corrupt-{}", std::process::id()));
                tracing::error!(error = %corrupt, aside = %aside.display(), "the spool is unreadable: set aside, starting empty");
                std::fs::rename(path, &aside)
                    .map_err(|e| SpoolError::Open { path: path.to_owned(), source: e.into() })?;
                QueueFile::open(path).map_err(|source| SpoolError::Open { path: path.to_owned(), source })?
            }
        };
        // Durability against the broker being away, not against power loss: no fsync per record
        // (the agent adds ten a second). The file is synced when the agent stops.
        file.set_sync_writes(false);
        let sizes: std::collections::VecDeque<u64> = file.iter().map(|r| r.len() as u64 + ELEMENT_OVERHEAD).collect();
        let held_bytes = sizes.iter().sum();
        Ok(Self { file, path: path.to_owned(), max_bytes, sizes, held_bytes, refused: 0 })
    }

    /// Appends a record at the back, or refuses it when the spool is full.
    pub fn push(&mut self, record: &[u8]) -> Result<Pushed, SpoolError> {
        let size = record.len() as u64 + ELEMENT_OVERHEAD;
        if self.held_bytes + size > self.max_bytes {
            self.refused += 1;
            return Ok(Pushed::Refused);
        }
        self.file.add(record).map_err(|e| self.io(e))?;
        self.sizes.push_back(size);
        self.held_bytes += size;
        Ok(Pushed::Stored)
    }

    /// Up to `max` records after the first `skip`, in order.
    pub fn read(&mut self, skip: usize, max: usize) -> Vec<Vec<u8>> {
        self.file.iter().skip(skip).take(max).map(Vec::from).collect()
    }

    /// Removes the first `n` records (acknowledged by the broker).
    pub fn pop(&mut self, n: usize) -> Result<(), SpoolError> {
        let n = n.min(self.sizes.len());
        if n > 0 {
            self.file.remove_n(n).map_err(|e| self.io(e))?;
            self.held_bytes -= self.sizes.drain(..n).sum::<u64>();
            if self.sizes.is_empty() {
                // queue-file 2.0.0 empties a grown file by writing its header and then shrinking
                // the file, so the header claims the old length and the next open refuses the
                // file as truncated. Adding and removing an empty element writes the header again
                // with the length the file has now.
            }
        }
        Ok(())
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    /// Bytes the held records take, their framing included.
    pub fn bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Records refused because the spool was full, since it was opened.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Flushes the file to disk.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.file.sync_all().map_err(|e| self.io(e))
    }

    fn io(&self, source: queue_file::Error) -> SpoolError {
        SpoolError::Io { path: self.path.clone(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u32) -> Vec<u8> {
        let mut r = i.to_be_bytes().to_vec();
        r.resize(100, 0xab);
        r
    }

    #[test]
    fn records_leave_in_order_and_only_when_popped() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(&dir.path().join("s"), 1 << 20).unwrap();
        for i in 0..10 {
            assert_eq!(spool.push(&record(i)).unwrap(), Pushed::Stored);
        }
        assert_eq!(spool.read(0, 3), vec![record(0), record(1), record(2)]);
        assert_eq!(spool.read(8, 5), vec![record(8), record(9)]);
        spool.pop(4).unwrap();
        assert_eq!(spool.len(), 6);
        assert_eq!(spool.read(0, 1), vec![record(4)]);
    }

    #[test]
    fn a_full_spool_refuses_and_counts_until_room_is_made() {
        let dir = tempfile::tempdir().unwrap();
        // Room for 5 records of 100 bytes and their framing, not 6.
        let mut spool = Spool::open(&dir.path().join("s"), 5 * 104 + 50).unwrap();
        let outcomes: Vec<Pushed> = (0..8).map(|i| spool.push(&record(i)).unwrap()).collect();
        assert_eq!(outcomes.iter().filter(|o| **o == Pushed::Stored).count(), 5);
        assert_eq!(spool.refused(), 3);
        assert_eq!(spool.read(0, 10), (0..5).map(record).collect::<Vec<_>>(), "the oldest are kept");
        spool.pop(2).unwrap();
        assert_eq!(spool.push(&record(100)).unwrap(), Pushed::Stored);
        assert_eq!(spool.read(3, 1), vec![record(100)]);
    }

    #[test]
    fn what_an_earlier_run_left_is_sent_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/spool");
        {
            let mut spool = Spool::open(&path, 1 << 20).unwrap();
            for i in 0..3 {
                spool.push(&record(i)).unwrap();
            }
            spool.pop(1).unwrap();
            spool.sync().unwrap();
        }
        let mut spool = Spool::open(&path, 1 << 20).unwrap();
        spool.push(&record(3)).unwrap();
        assert_eq!(spool.read(0, 10), vec![record(1), record(2), record(3)]);
    }

    #[test]
    fn the_bound_holds_through_many_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(&dir.path().join("s"), 4096).unwrap();
        let mut next = 0;
        for _ in 0..200 {
            for _ in 0..7 {
                spool.push(&record(next)).unwrap();
                next += 1;
            }
            assert!(spool.bytes() <= 4096);
            let n = spool.len().min(5);
            spool.pop(n).unwrap();
        }
        assert!(spool.refused() > 0);
    }

    #[test]
    fn a_spool_that_grew_and_emptied_opens_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let mut spool = Spool::open(&path, 1 << 20).unwrap();
            for i in 0..200 {
                spool.push(&record(i)).unwrap();
            }
            spool.pop(200).unwrap();
            spool.sync().unwrap();
        }
        if let Err(e) = QueueFile::open(&path) {
            panic!("the emptied file is still a valid queue file: {e}");
        }
        let mut spool = Spool::open(&path, 1 << 20).unwrap();
        assert!(spool.is_empty());
        spool.push(&record(1)).unwrap();
        assert_eq!(spool.read(0, 5), vec![record(1)]);
    }

    #[test]
    fn an_unreadable_spool_is_set_aside_and_a_new_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, [0xffu8; 40]).unwrap();
        let mut spool = Spool::open(&path, 1 << 20).unwrap();
        assert!(spool.is_empty());
        spool.push(&record(2)).unwrap();
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("s.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "the unreadable file is kept for a person to look at");
    }
}
