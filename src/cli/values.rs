//! Value parsers and inputs several commands share.

use std::path::{Path, PathBuf};

use clap::builder::TypedValueParser as _;
use metronome::archive::format::Day;
use metronome::config::Config;
use metronome_core::event::KeyEvent;
use metronome_core::keylog::{self, KeylogReader};
use metronome_core::macrogen::MacroFamily;

use super::AppError;

/// A share, 0..1.
pub fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{text}` is not a share between 0 and 1")),
    }
}

/// A float that is finite and not negative (a pace, a rate).
pub fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{text}` is not a number >= 0")),
    }
}

/// A day, YYYY-MM-DD.
pub fn parse_day(text: &str) -> Result<Day, String> {
    Day::parse(text).map_err(|e| e.to_string())
}

/// `--families`: the macro families by name, listed in `--help`.
pub fn macro_family_parser() -> impl clap::builder::TypedValueParser<Value = MacroFamily> {
    let names = MacroFamily::ALL.map(MacroFamily::name);
    clap::builder::PossibleValuesParser::new(names).try_map(|name: String| name.parse::<MacroFamily>())
}

/// The topic `archive` archives and `score --archive` reads: `archive.topic`, else the
/// processor's input topic.
pub fn archive_topic(config: &Config) -> String {
    Some(config.archive.topic.clone()).filter(|t| !t.is_empty()).unwrap_or_else(|| config.stream.input_topic.clone())
}

/// The recordings `--humans` names: a keylog, `builtin` (none: the parametric model), or by
/// default `../shared/data/aalto-a-train.csv.gz` when it is there.
pub fn load_humans(humans: Option<&str>, users: usize) -> Result<Option<Vec<Vec<KeyEvent>>>, AppError> {
    const DEFAULT_HUMANS: &str = "../shared/data/aalto-a-train.csv.gz";
    let path = match humans {
        Some("builtin") => return Ok(None),
        Some(path) => PathBuf::from(path),
        None if Path::new(DEFAULT_HUMANS).is_file() => PathBuf::from(DEFAULT_HUMANS),
        None => {
            eprintln!("metronome: {DEFAULT_HUMANS} not found: simulating humans with the built-in typing model");
            return Ok(None);
        }
    };
    // Each recorded user is replayed at most once per simulated human, so read what is needed.
    let reader = KeylogReader::open(&path)?;
    let recordings =
        keylog::group_by_user(reader, |_| true, Some(users.max(1)))?.into_iter().map(|(_, events)| events).collect();
    Ok(Some(recordings))
}
