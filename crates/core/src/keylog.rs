//! The keylog CSV interchange format: `user_id,session_id,event_time_us,key_code,action`.
//!
//! Used for replays, the simulator, offline scoring and training. Files may be gzip-compressed
//! (detected by content, not name). Every row is validated; a bad row is reported with its line
//! number and the kind of problem, never its content, because keylogs hold keystrokes.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::event::{KeyAction, KeyEvent};

/// The header every keylog file starts with.
pub const HEADER: [&str; 5] = ["user_id", "session_id", "event_time_us", "key_code", "action"];
/// Largest evdev key code (`KEY_MAX`).
pub const MAX_KEY_CODE: u32 = 0x2ff;
/// Latest accepted event time: 2100-01-01T00:00:00Z in microseconds.
pub const MAX_EVENT_TIME_US: i64 = 4_102_444_800_000_000;
/// Longest accepted user or session id, bytes.
pub const MAX_ID_LEN: usize = 256;

/// One row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeylogRecord {
    /// Who typed.
    pub user_id: String,
    /// Which session (a sentence in the Aalto data, an agent session live).
    pub session_id: String,
    /// The event.
    pub event: KeyEvent,
}

/// What is wrong with a row. Carries no field values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RowProblem {
    /// Not five columns.
    #[error("expected 5 columns, found {0}")]
    Columns(usize),
    /// Not valid UTF-8.
    #[error("not valid UTF-8")]
    NotUtf8,
    /// `user_id` is empty.
    #[error("user_id is empty")]
    EmptyUser,
    /// An id is longer than [`MAX_ID_LEN`].
    #[error("user_id or session_id longer than {MAX_ID_LEN} bytes")]
    IdTooLong,
    /// `event_time_us` is not an integer.
    #[error("event_time_us is not an integer")]
    TimeNotInteger,
    /// `event_time_us` is negative or after 2100.
    #[error("event_time_us is outside 1970..2100")]
    TimeOutOfRange,
    /// `key_code` is not an integer in range.
    #[error("key_code is not an integer between 0 and {MAX_KEY_CODE}")]
    BadKeyCode,
    /// `action` is not down, up or repeat.
    #[error("action is not one of down, up, repeat")]
    BadAction,
}

/// Errors reading a keylog.
#[derive(Debug, thiserror::Error)]
pub enum KeylogError {
    /// The file could not be opened.
    #[error("cannot open keylog {path}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading or decompressing failed; the rest of the file is unreadable.
    #[error("keylog read failed near line {line}: {message}")]
    Read {
        /// Last line reached.
        line: u64,
        /// The reader's description (I/O or gzip error; holds no row content).
        message: String,
    },
    /// The first line is not the keylog header.
    #[error("line 1: header must be `{}`", HEADER.join(","))]
    Header,
    /// A row is invalid; reading may continue with the next row.
    #[error("line {line}: {problem}")]
    Row {
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        problem: RowProblem,
    },
}

impl KeylogError {
    /// True when reading can go on after this error.
    pub fn is_row_error(&self) -> bool {
        matches!(self, KeylogError::Row { .. })
    }
}

/// Reads keylog rows from plain or gzip-compressed CSV.
pub struct KeylogReader {
    csv: csv::Reader<Box<dyn Read + Send>>,
    record: csv::ByteRecord,
    header_checked: bool,
    done: bool,
}

impl KeylogReader {
    /// Opens `path`; `-` reads standard input.
    pub fn open(path: &Path) -> Result<Self, KeylogError> {
        if path.as_os_str() == "-" {
            return Self::from_reader(io::stdin()).map_err(|source| KeylogError::Open { path: path.into(), source });
        }
        let file = File::open(path).map_err(|source| KeylogError::Open { path: path.into(), source })?;
        Self::from_reader(file).map_err(|source| KeylogError::Open { path: path.into(), source })
    }

    /// Reads from any byte source, decompressing gzip when the content starts with its magic.
    pub fn from_reader(inner: impl Read + Send + 'static) -> io::Result<Self> {
        let mut buffered = BufReader::with_capacity(1 << 16, inner);
        let gzip = buffered.fill_buf()?.starts_with(&[0x1f, 0x8b]);
        let source: Box<dyn Read + Send> =
            if gzip { Box::new(flate2::bufread::MultiGzDecoder::new(buffered)) } else { Box::new(buffered) };
        let csv = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(source);
        Ok(Self { csv, record: csv::ByteRecord::new(), header_checked: false, done: false })
    }

    fn line(&self) -> u64 {
        self.record.position().map_or(0, |p| p.line())
    }
}

impl Iterator for KeylogReader {
    type Item = Result<KeylogRecord, KeylogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            match self.csv.read_byte_record(&mut self.record) {
                Ok(false) => {
                    self.done = true;
                    return (!self.header_checked).then_some(Err(KeylogError::Header));
                }
                Ok(true) => {}
                Err(e) => {
                    self.done = true;
                    let line = e.position().map_or(self.line(), |p| p.line());
                    let message = match e.kind() {
                        csv::ErrorKind::Io(io) => io.to_string(),
                        _ => "malformed CSV".to_owned(),
                    };
                    return Some(Err(KeylogError::Read { line, message }));
                }
            }
            if !self.header_checked {
                self.header_checked = true;
                if self.record.iter().ne(HEADER.iter().map(|h| h.as_bytes())) {
                    self.done = true;
                    return Some(Err(KeylogError::Header));
                }
                continue;
            }
            // A blank line parses as one empty field: skip it rather than call it a bad row.
            if self.record.len() == 1 && self.record[0].is_empty() {
                continue;
            }
            let line = self.line();
            return Some(parse_row(&self.record).map_err(|problem| KeylogError::Row { line, problem }));
        }
    }
}

fn parse_row(r: &csv::ByteRecord) -> Result<KeylogRecord, RowProblem> {
    if r.len() != 5 {
        return Err(RowProblem::Columns(r.len()));
    }
    let text = |i: usize| std::str::from_utf8(&r[i]).map_err(|_| RowProblem::NotUtf8);
    let (user, session) = (text(0)?, text(1)?);
    if user.is_empty() {
        return Err(RowProblem::EmptyUser);
    }
    if user.len() > MAX_ID_LEN || session.len() > MAX_ID_LEN {
        return Err(RowProblem::IdTooLong);
    }
    let time: i64 = text(2)?.parse().map_err(|_| RowProblem::TimeNotInteger)?;
    if !(0..=MAX_EVENT_TIME_US).contains(&time) {
        return Err(RowProblem::TimeOutOfRange);
    }
    let key: u32 = text(3)?.parse().map_err(|_| RowProblem::BadKeyCode)?;
    if key > MAX_KEY_CODE {
        return Err(RowProblem::BadKeyCode);
    }
    let action = match &r[4] {
        b"down" => KeyAction::Down,
        b"up" => KeyAction::Up,
        b"repeat" => KeyAction::Repeat,
        _ => return Err(RowProblem::BadAction),
    };
    Ok(KeylogRecord {
        user_id: user.to_owned(),
        session_id: session.to_owned(),
        event: KeyEvent { time_us: time, key, action },
    })
}

/// One user's events, in file order.
pub type UserEvents = (String, Vec<KeyEvent>);

/// Groups rows by user in order of first appearance, keeping users `keep` accepts, and stops
/// reading once `max_users` users are complete (files sorted by user read only what they need).
/// Any bad row is an error: recordings feed training and simulation, which need clean input.
pub fn group_by_user(
    rows: impl Iterator<Item = Result<KeylogRecord, KeylogError>>,
    mut keep: impl FnMut(&str) -> bool,
    max_users: Option<usize>,
) -> Result<Vec<UserEvents>, KeylogError> {
    let mut users: Vec<UserEvents> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for row in rows {
        let row = row?;
        if let Some(&i) = index.get(&row.user_id) {
            let (_, events): &mut UserEvents = &mut users[i];
            events.push(row.event);
            continue;
        }
        if !keep(&row.user_id) {
            continue;
        }
        if max_users.is_some_and(|m| users.len() >= m) {
            break;
        }
        index.insert(row.user_id.clone(), users.len());
        users.push((row.user_id, vec![row.event]));
    }
    Ok(users)
}

/// Writes keylog rows, header first.
pub struct KeylogWriter<W: Write> {
    out: W,
}

impl<W: Write> KeylogWriter<W> {
    /// Writes the header to `out`.
    pub fn new(mut out: W) -> io::Result<Self> {
        writeln!(out, "{}", HEADER.join(","))?;
        Ok(Self { out })
    }

    /// Writes one row. Ids must not contain commas, quotes or newlines (the generator's never do).
    pub fn write(&mut self, user_id: &str, session_id: &str, event: &KeyEvent) -> io::Result<()> {
        writeln!(self.out, "{user_id},{session_id},{},{},{}", event.time_us, event.key, event.action.as_str())
    }

    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_all(text: &str) -> Vec<Result<KeylogRecord, KeylogError>> {
        KeylogReader::from_reader(io::Cursor::new(text.as_bytes().to_vec())).unwrap().collect()
    }

    const HEAD: &str = "user_id,session_id,event_time_us,key_code,action\n";

    #[test]
    fn reads_valid_rows() {
        let rows = read_all(&format!("{HEAD}u1,s1,1000,30,down\nu1,s1,2000,30,up\n\nu1,s1,2500,30,repeat\n"));
        let rows: Vec<KeylogRecord> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].event, KeyEvent::new(2000, 30, KeyAction::Up));
        assert_eq!(rows[2].event.action, KeyAction::Repeat);
    }

    #[test]
    fn bad_rows_name_their_line_and_reading_continues() {
        let text = format!(
            "{HEAD}u1,s1,1000,30,down\n,s1,1,1,down\nu1,s1,x,30,up\nu1,s1,-5,30,up\nu1,s1,1,9999,up\n\
             u1,s1,1,30,sideways\nu1,s1,1\nu1,s1,3000,30,up\n"
        );
        let rows = read_all(&text);
        let problems: Vec<(u64, RowProblem)> = rows
            .iter()
            .filter_map(|r| match r {
                Err(KeylogError::Row { line, problem }) => Some((*line, *problem)),
                _ => None,
            })
            .collect();
        assert_eq!(
            problems,
            vec![
                (3, RowProblem::EmptyUser),
                (4, RowProblem::TimeNotInteger),
                (5, RowProblem::TimeOutOfRange),
                (6, RowProblem::BadKeyCode),
                (7, RowProblem::BadAction),
                (8, RowProblem::Columns(3)),
            ]
        );
        assert_eq!(rows.iter().filter(|r| r.is_ok()).count(), 2, "good rows around bad ones survive");
    }

    #[test]
    fn error_messages_carry_no_row_content() {
        let rows = read_all(&format!("{HEAD}secretuser,s1,123456789,300,nope\n"));
        let msg = rows[0].as_ref().unwrap_err().to_string();
        assert_eq!(msg, "line 2: action is not one of down, up, repeat");
        assert!(!msg.contains("secretuser") && !msg.contains("123456789"));
    }

    #[test]
    fn missing_or_wrong_header_is_refused() {
        assert!(matches!(read_all("")[..], [Err(KeylogError::Header)]));
        assert!(matches!(read_all("u1,s1,1000,30,down\n")[..], [Err(KeylogError::Header)]));
    }

    #[test]
    fn gzip_is_detected_by_content() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(format!("{HEAD}u1,s1,1000,30,down\n").as_bytes()).unwrap();
        let bytes = gz.finish().unwrap();
        let rows: Vec<_> = KeylogReader::from_reader(io::Cursor::new(bytes)).unwrap().collect();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].is_ok());
    }

    #[test]
    fn truncated_gzip_is_a_read_error_not_a_panic() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(format!("{HEAD}u1,s1,1000,30,down\n").repeat(200).as_bytes()).unwrap();
        let mut bytes = gz.finish().unwrap();
        bytes.truncate(bytes.len() / 2);
        let rows: Vec<_> = KeylogReader::from_reader(io::Cursor::new(bytes)).unwrap().collect();
        assert!(matches!(rows.last(), Some(Err(KeylogError::Read { .. }))));
    }

    #[test]
    fn writer_output_reads_back() {
        let mut w = KeylogWriter::new(Vec::new()).unwrap();
        let events = [KeyEvent::new(5, 30, KeyAction::Down), KeyEvent::new(9, 30, KeyAction::Up)];
        for e in &events {
            w.write("u7", "s", e).unwrap();
        }
        let bytes = w.finish().unwrap();
        let back: Vec<KeyEvent> =
            KeylogReader::from_reader(io::Cursor::new(bytes)).unwrap().map(|r| r.unwrap().event).collect();
        assert_eq!(back, events);
    }

    #[test]
    fn grouping_keeps_order_filters_and_stops_early() {
        let text =
            format!("{HEAD}a,s,1,30,down\na,s,2,30,up\nb,s,1,31,down\nc,s,5,32,down\nc,s,6,32,up\nd,s,1,1,down\n");
        let rows = KeylogReader::from_reader(io::Cursor::new(text.into_bytes())).unwrap();
        let users = group_by_user(rows, |u| u != "b", Some(2)).unwrap();
        let summary: Vec<(&str, usize)> = users.iter().map(|(u, e)| (u.as_str(), e.len())).collect();
        assert_eq!(summary, vec![("a", 2), ("c", 2)]);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut bytes = HEAD.as_bytes().to_vec();
            bytes.extend(body);
            for r in KeylogReader::from_reader(io::Cursor::new(bytes)).unwrap() {
                let _ = r.map_err(|e| e.to_string());
            }
        }

        #[test]
        fn valid_rows_round_trip(
            user in "[a-z0-9]{1,12}", time in 0i64..MAX_EVENT_TIME_US, key in 0u32..=MAX_KEY_CODE,
            action in prop_oneof![Just(KeyAction::Down), Just(KeyAction::Up), Just(KeyAction::Repeat)]
        ) {
            let event = KeyEvent::new(time, key, action);
            let mut w = KeylogWriter::new(Vec::new()).unwrap();
            w.write(&user, "s", &event).unwrap();
            let bytes = w.finish().unwrap();
            let rows: Vec<_> = KeylogReader::from_reader(io::Cursor::new(bytes)).unwrap().collect();
            prop_assert_eq!(rows.len(), 1);
            let row = rows[0].as_ref().unwrap();
            prop_assert_eq!(&row.user_id, &user);
            prop_assert_eq!(row.event, event);
        }
    }
}
