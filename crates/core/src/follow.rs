//! A value loaded from a file and loaded again when the file's contents change: the device keys
//! (`signing::ReloadingKeys`) and the LSTM model (`metronome_model::ReloadingModel`) follow their
//! files this way, so a rotation or a new version needs no restart.
//!
//! A check reads the file once and compares its bytes with those last loaded (no window for the
//! file to change between the comparison and the parse). A file that does not read or parse is
//! an error for the caller to report, and the value in use stays: a half-written or broken file
//! never replaces it, and the next check tries again.

use std::fmt;
use std::path::{Path, PathBuf};

/// Reads the followed file's bytes.
pub type ReadFn<E> = fn(&Path) -> Result<Vec<u8>, E>;
/// Turns the bytes read into the value (the path is for error messages).
pub type ParseFn<T, E> = fn(&Path, &[u8]) -> Result<T, E>;

/// A value following its file; or, made with [`Followed::fixed`], one with no file behind it.
pub struct Followed<T, E> {
    source: Option<Source<T, E>>,
    current: T,
}

struct Source<T, E> {
    path: PathBuf,
    /// Contents of the file last loaded.
    seen: Vec<u8>,
    read: ReadFn<E>,
    parse: ParseFn<T, E>,
}

impl<T: fmt::Debug, E> fmt::Debug for Followed<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Followed")
            .field("path", &self.source.as_ref().map(|s| &s.path))
            .field("current", &self.current)
            .finish()
    }
}

impl<T, E> Followed<T, E> {
    /// Loads the file at `path`, then follows it.
    pub fn load(path: &Path, read: ReadFn<E>, parse: ParseFn<T, E>) -> Result<Self, E> {
        let seen = read(path)?;
        let current = parse(path, &seen)?;
        Ok(Self { source: Some(Source { path: path.to_owned(), seen, read, parse }), current })
    }

    /// A value with no file behind it: checks never change it.
    pub fn fixed(current: T) -> Self {
        Self { source: None, current }
    }

    /// The value in use.
    pub fn current(&self) -> &T {
        &self.current
    }

    /// The value in use, to change in place (what a reload does not replace).
    pub fn current_mut(&mut self) -> &mut T {
        &mut self.current
    }

    /// Loads the file again if its contents changed since the last load, and returns the value
    /// it replaced; `None` when nothing changed. On error the value in use stays.
    pub fn reload_if_changed(&mut self) -> Result<Option<T>, E> {
        let Some(source) = &mut self.source else { return Ok(None) };
        let bytes = (source.read)(&source.path)?;
        if bytes == source.seen {
            return Ok(None);
        }
        let next = (source.parse)(&source.path, &bytes)?;
        source.seen = bytes;
        Ok(Some(std::mem::replace(&mut self.current, next)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| e.kind().to_string())
    }

    fn parse(_: &Path, bytes: &[u8]) -> Result<u32, String> {
        std::str::from_utf8(bytes).ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| "not a number".to_owned())
    }

    #[test]
    fn a_change_replaces_the_value_and_a_broken_file_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let mut n = Followed::load(&path, read, parse).unwrap();
        assert_eq!(n.reload_if_changed(), Ok(None));

        std::fs::write(&path, "2").unwrap();
        assert_eq!(n.reload_if_changed(), Ok(Some(1)));
        assert_eq!(*n.current(), 2);

        std::fs::write(&path, "two").unwrap();
        assert_eq!(n.reload_if_changed(), Err("not a number".to_owned()));
        assert_eq!(*n.current(), 2, "a broken file leaves the value in use");
        std::fs::remove_file(&path).unwrap();
        assert!(n.reload_if_changed().is_err());
        assert_eq!(*n.current(), 2);

        // The same contents written back after a failure: still a change from what is in use.
        std::fs::write(&path, "3").unwrap();
        assert_eq!(n.reload_if_changed(), Ok(Some(2)));
    }

    #[test]
    fn a_fixed_value_never_changes() {
        let mut n: Followed<u32, String> = Followed::fixed(7);
        assert_eq!(n.reload_if_changed(), Ok(None));
        *n.current_mut() = 8;
        assert_eq!(*n.current(), 8);
    }
}
