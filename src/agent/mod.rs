//! `metronome agent`: captures one user's key events and publishes them to the input topic.
//!
//! ```text
//!  evdev keyboard --+                                        +--> KafkaSink (idempotent producer,
//!  (or --replay     |--> SourceItem --> labels --> cutter  |    never times out) --> [keys.events]
//!   keylog file) ---+    (own thread)   (short-lived)(100 ms|          ^
//!                                                     or N)  +--> Spool (bounded file) --+
//! ```
//!
//! Every record is written to the spool first and leaves it only once the broker has it, so a
//! broker outage or an agent restart loses nothing up to the spool's size; past it records are
//! refused, counted and reported. Key codes never leave this module: they are replaced by
//! short-lived random labels ([`labels`]) before anything is cut, spooled, sent or logged.
//!
//! # Layout
//! - [`capture`]: the sources (evdev device, keylog replay) and the pure mapping of raw input
//!   events.
//! - [`labels`]: the short-lived random labels that replace key codes.
//! - [`key_sums`]: the key-dependence test's sums over the real keys, sent beside short-lived
//!   labels.
//! - [`spool`]: the bounded on-disk FIFO.
//! - [`ship`]: spool to broker, in order, over the [`ship::RecordSink`] seam.
//! - Cutting into records is [`metronome_core::cutting`], shared with the simulator and `publish`.

pub mod capture;
pub mod key_sums;
pub mod labels;
pub mod ship;
pub mod spool;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use self::capture::{DeviceChoice, SourceItem};
use self::key_sums::KeySumsReporter;
use self::labels::KeyLabeler;
use self::ship::{frame, KafkaSink, Shipper};
use self::spool::{Pushed, Spool, SpoolError};
use metronome_core::cutting::{CutRecord, RecordCutter, RecordShape};
use metronome_core::event::KeyEvent;
use metronome_core::keylog::MAX_ID_LEN;
use metronome_core::proto;
use metronome_core::signing::SigningKey;
use metronome_core::wire::{batch_message, key_sums_to_proto};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// Settings of `metronome agent` (`[agent]`). Every key is documented in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The user whose keys this agent captures (the record key); `--user` overrides it.
    pub user_id: String,
    /// The topic to publish to; empty: `stream.input_topic`.
    pub topic: String,
    /// The spool file.
    pub spool_path: PathBuf,
    /// Most bytes of records the spool holds before refusing new ones.
    pub spool_max_bytes: u64,
    /// A record spans at most this much typing, milliseconds.
    pub batch_ms: u32,
    /// Most events per record.
    pub batch_events: usize,
    /// Most records handed to the producer at once; the rest wait in the spool.
    pub max_in_flight: usize,
    /// On stop, how long to keep sending what the spool holds, seconds (what is left is sent
    /// by the next run).
    pub drain_timeout_s: u64,
    /// How often a missing device is looked for, milliseconds.
    pub device_retry_ms: u64,
    /// How often the agent logs its counts, seconds (0: never).
    pub report_interval_s: u64,
    /// The signing key enrolment handed this agent (`key_id`, `secret_hex`; `metronome_core::signing`);
    /// empty: records go unsigned.
    pub signing_key_file: PathBuf,
    /// Presses a key label lives (`agent::labels`; the default, 16, resists frequency analysis);
    /// 0: one label per key for the whole session, which a long session's text falls to
    /// frequency analysis of. Shorter lives than 16 are refused: the detector's
    /// `keys_never_recur` rule expects a typist's keys to recur within 16 presses.
    pub key_label_presses: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            user_id: String::new(),
            topic: String::new(),
            spool_path: PathBuf::from("metronome-agent.spool"),
            spool_max_bytes: 64 << 20,
            batch_ms: 100,
            batch_events: 50,
            max_in_flight: 1000,
            drain_timeout_s: 10,
            device_retry_ms: 1000,
            report_interval_s: 60,
            signing_key_file: PathBuf::new(),
            key_label_presses: labels::SHORT_LIFETIME,
        }
    }
}

impl AgentConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.user_id.len() > MAX_ID_LEN {
            return Err(format!("agent.user_id: at most {MAX_ID_LEN} bytes"));
        }
        if self.batch_events == 0 || self.batch_events > 10_000 {
            return Err("agent.batch_events: between 1 and 10000".to_owned());
        }
        if self.spool_max_bytes < 4096 {
            return Err("agent.spool_max_bytes: at least 4096".to_owned());
        }
        // Shorter lives break the recurrence of keys people show, which `keys_never_recur` reads.
        let lives = labels::SHORT_LIFETIME..=10_000;
        if self.key_label_presses != 0 && !lives.contains(&self.key_label_presses) {
            return Err(format!("agent.key_label_presses: 0, or between {} and {}", lives.start(), lives.end()));
        }
        if self.max_in_flight == 0 {
            return Err("agent.max_in_flight: at least 1".to_owned());
        }
        Ok(())
    }

    fn shape(&self) -> RecordShape {
        RecordShape { max_events: self.batch_events, span_us: i64::from(self.batch_ms) * 1_000 }
    }
}

/// Where the agent's keys come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A keyboard: a given device, or the first one found.
    Device(DeviceChoice),
    /// A keylog file, one user of it, at `speed` times the recorded pace (0: at once).
    Replay {
        /// The keylog.
        path: PathBuf,
        /// Which user; `None`: the file's first.
        user: Option<String>,
        /// Pace multiplier.
        speed: f64,
    },
}

/// Why the agent stopped with an error. Messages carry no key and no timing.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No user id, from `--user` or `agent.user_id`.
    #[error("no user id: pass --user or set agent.user_id")]
    NoUser,
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The producer could not be created.
    #[error("kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The source failed (an unreadable replay file).
    #[error("key source: {0}")]
    Source(String),
    /// The signing key cannot be used.
    #[error(transparent)]
    SigningKey(#[from] metronome_core::signing::KeyFileError),
}

/// Counts of an agent run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AgentSummary {
    /// Key events captured.
    pub events: u64,
    /// Records cut from them.
    pub records: u64,
    /// Records the spool refused (full), and the events in them.
    pub refused_records: u64,
    /// Events in refused records.
    pub refused_events: u64,
    /// Records the broker acknowledged (including ones an earlier run spooled).
    pub delivered: u64,
    /// Records the broker refused for good.
    pub rejected: u64,
    /// Records still in the spool at exit (sent by the next run).
    pub left_in_spool: u64,
    /// Times the kernel reported lost input events.
    pub kernel_dropped: u64,
    /// Times the device went away.
    pub device_losses: u64,
}

/// One capture session: its key labels, the session id, the device's sequence.
struct Session {
    user_id: String,
    session_id: String,
    device_id: String,
    /// The device the keys come from, sent with every batch.
    device: Option<proto::DeviceInfo>,
    labels: KeyLabeler,
    /// With short-lived labels, the key-dependence sums over the real keys, sent beside them.
    key_sums: Option<KeySumsReporter>,
    next_seq: u64,
    /// Signs every batch, when enrolment gave the agent a key.
    signer: Option<SigningKey>,
}

impl Session {
    fn encode(&mut self, record: &CutRecord) -> Vec<u8> {
        let mut batch =
            batch_message(&self.user_id, &self.device_id, &self.session_id, &record.events, Some(self.next_seq));
        batch.device = self.device.clone();
        batch.key_sums = self.key_sums.as_mut().and_then(KeySumsReporter::take).map(|s| key_sums_to_proto(&s));
        if let Some(signer) = &self.signer {
            signer.sign(&mut batch);
        }
        let payload = batch.encode_to_vec();
        self.next_seq += record.events.len() as u64;
        frame(self.user_id.as_bytes(), &payload)
    }
}

/// Runs the agent until the source ends (a replay) or `stop` is cancelled, then keeps sending what
/// the spool holds for up to `drain_timeout_s`.
pub fn run(
    config: &AgentConfig,
    kafka: &BTreeMap<String, String>,
    topic: &str,
    source: Source,
    stop: CancellationToken,
) -> Result<AgentSummary, AgentError> {
    if config.user_id.is_empty() {
        return Err(AgentError::NoUser);
    }
    let signer = match config.signing_key_file.as_os_str().is_empty() {
        true => None,
        false => Some(SigningKey::load(&config.signing_key_file)?),
    };
    let mut spool = Spool::open(&config.spool_path, config.spool_max_bytes)?;
    if !spool.is_empty() {
        tracing::info!(records = spool.len(), "sending what an earlier run left in the spool first");
    }
    let mut sink = KafkaSink::new(kafka, topic)?;
    let mut shipper = Shipper::new(config.max_in_flight);
    let mut cutter = RecordCutter::new(config.shape());
    let mut session = Session {
        user_id: config.user_id.clone(),
        session_id: uuid::Uuid::new_v4().to_string(),
        device_id: String::new(),
        device: None,
        labels: KeyLabeler::new_session(config.key_label_presses),
        key_sums: (config.key_label_presses > 0).then(KeySumsReporter::default),
        // Numbered from 1: the processor reads 0 as unnumbered.
        next_seq: 1,
        signer,
    };
    let mut summary = AgentSummary::default();

    let (tx, rx) = mpsc::channel();
    let source_stop = CancellationToken::new();
    let speed = match &source {
        Source::Device(_) => 1.0,
        Source::Replay { speed, .. } => *speed,
    };
    {
        let stop = source_stop.clone();
        let retry = Duration::from_millis(config.device_retry_ms.max(10));
        std::thread::Builder::new()
            .name("key-source".into())
            .spawn(move || match source {
                Source::Device(choice) => capture::run_evdev(choice, retry, tx, stop),
                Source::Replay { path, user, speed } => capture::run_replay(&path, user.as_deref(), speed, tx, stop),
            })
            .map_err(|e| AgentError::Source(format!("cannot start the capture thread: {e}")))?;
    }
    tracing::info!(session = %session.session_id, "agent session started");

    // The cutter's clock while no key comes: the last event's time plus what has passed since,
    // at the source's pace (a replay at speed 0 has no idle time).
    let mut last_event: Option<(i64, Instant)> = None;
    let mut failure = None;
    let mut next_report = Instant::now() + Duration::from_secs(config.report_interval_s.max(1));
    loop {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(SourceItem::Key(k)) => {
                summary.events += 1;
                if let Some(sums) = &mut session.key_sums {
                    sums.observe(KeyEvent::new(k.time_us, u32::from(k.code), k.action));
                }
                let event = KeyEvent::new(k.time_us, session.labels.label(u32::from(k.code), k.action), k.action);
                last_event = Some((k.time_us, Instant::now()));
                let records = cutter.push(&config.user_id, "", event);
                store(records, &mut session, &mut spool, &mut summary)?;
            }
            Ok(SourceItem::KernelDropped) => summary.kernel_dropped += 1,
            Ok(SourceItem::DeviceLost) => {
                summary.device_losses += 1;
                store(cutter.finish(), &mut session, &mut spool, &mut summary)?;
            }
            Ok(SourceItem::DeviceReady { device_id, info }) => {
                tracing::info!(device = %device_id, "capturing keys");
                session.device_id = device_id;
                session.device = info.map(|i| proto::DeviceInfo {
                    bus_type: u32::from(i.bus_type),
                    is_virtual: i.is_virtual,
                    vendor: u32::from(i.vendor),
                    product: u32::from(i.product),
                    fingerprint: i.fingerprint,
                });
            }
            Ok(SourceItem::End) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(SourceItem::Failed(message)) => {
                failure = Some(message);
                break;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Some((time_us, at)) = last_event.filter(|_| speed > 0.0) {
            let now_us = time_us + (at.elapsed().as_micros() as f64 * speed) as i64;
            store(cutter.expire(now_us), &mut session, &mut spool, &mut summary)?;
        }
        shipper.pump(&mut spool, &mut sink, Duration::ZERO)?;
        if config.report_interval_s > 0 && Instant::now() >= next_report {
            report(&summary, &shipper, &spool, &sink);
            next_report = Instant::now() + Duration::from_secs(config.report_interval_s);
        }
        if stop.is_cancelled() {
            break;
        }
    }
    source_stop.cancel();
    store(cutter.finish(), &mut session, &mut spool, &mut summary)?;
    tracing::info!(events = summary.events, records = summary.records, "capture finished: draining the spool");

    let deadline = Instant::now() + Duration::from_secs(config.drain_timeout_s);
    while !spool.is_empty() && Instant::now() < deadline {
        shipper.pump(&mut spool, &mut sink, Duration::from_millis(50))?;
    }
    spool.sync()?;
    let stats = shipper.stats();
    summary.delivered = stats.delivered;
    summary.rejected = stats.rejected;
    summary.left_in_spool = spool.len() as u64;
    report(&summary, &shipper, &spool, &sink);
    match failure {
        Some(message) => Err(AgentError::Source(message)),
        None => Ok(summary),
    }
}

/// Spools cut records; a full spool refuses them, and that is counted and reported.
fn store(
    records: Vec<CutRecord>,
    session: &mut Session,
    spool: &mut Spool,
    summary: &mut AgentSummary,
) -> Result<(), SpoolError> {
    for r in records {
        summary.records += 1;
        if spool.push(&session.encode(&r))? == Pushed::Refused {
            summary.refused_records += 1;
            summary.refused_events += r.events.len() as u64;
            if summary.refused_records.is_power_of_two() {
                tracing::warn!(refused = summary.refused_records, "spool full: records refused");
            }
        }
    }
    Ok(())
}

fn report(summary: &AgentSummary, shipper: &Shipper, spool: &Spool, sink: &KafkaSink) {
    let stats = shipper.stats();
    tracing::info!(
        events = summary.events,
        records = summary.records,
        delivered = stats.delivered,
        in_spool = spool.len(),
        in_flight = shipper.in_flight(),
        refused = summary.refused_records,
        rejected = stats.rejected,
        broker_down = sink.context().brokers_down(),
        "agent status"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use metronome_core::event::KeyAction;
    use prost::Message;

    #[test]
    fn records_carry_the_session_device_and_a_gapless_sequence() {
        let mut session = Session {
            user_id: "u1".into(),
            session_id: "s-1".into(),
            device_id: "kbd-1".into(),
            device: Some(proto::DeviceInfo {
                bus_type: 6,
                is_virtual: true,
                fingerprint: "kbd-1".into(),
                ..Default::default()
            }),
            labels: KeyLabeler::new_session(labels::SHORT_LIFETIME),
            key_sums: None,
            next_seq: 1,
            signer: None,
        };
        let record = |n: i64| CutRecord {
            user_id: "u1".into(),
            session_id: String::new(),
            events: (0..n).map(|i| KeyEvent::new(i, 0x8000_0001, KeyAction::Down)).collect(),
        };
        let mut seqs = Vec::new();
        for n in [3, 1, 2] {
            let entry = session.encode(&record(n));
            let (key, payload) = ship::unframe(&entry).unwrap();
            assert_eq!(key, b"u1");
            let batch = proto::KeyEventBatch::decode(payload).unwrap();
            assert_eq!(
                (batch.user_id.as_str(), batch.device_id.as_str(), batch.session_id.as_str()),
                ("u1", "kbd-1", "s-1")
            );
            assert_eq!(batch.device, session.device, "every record says where its keys come from");
            seqs.extend(batch.events.iter().map(|e| e.seq));
        }
        assert_eq!(seqs, (1..7).collect::<Vec<u64>>(), "numbered from 1, one per event");
    }

    /// A session of user `u1` on `kbd-1`: short-lived labels, no key sums, unsigned.
    fn test_session() -> Session {
        Session {
            user_id: "u1".into(),
            session_id: "s-1".into(),
            device_id: "kbd-1".into(),
            device: None,
            labels: KeyLabeler::new_session(labels::SHORT_LIFETIME),
            key_sums: None,
            next_seq: 1,
            signer: None,
        }
    }

    #[test]
    fn a_signing_agent_s_records_pass_the_processor_s_check() {
        let secret = b"an enrolment secret of 32 bytes!";
        let mut session = Session { signer: Some(SigningKey::new("u1-kbd", secret)), ..test_session() };
        let events = (0..5).map(|i| KeyEvent::new(1_700_000_000_000_000 + i, 0x8000_0001, KeyAction::Down)).collect();
        let entry = session.encode(&CutRecord { user_id: "u1".into(), session_id: String::new(), events });
        let (_, payload) = ship::unframe(&entry).unwrap();
        let mut keys = metronome_core::signing::DeviceKeys::default();
        keys.insert("u1-kbd", "u1", "kbd-1", secret);
        let mut batch = proto::KeyEventBatch::decode(payload).unwrap();
        assert_eq!(batch.key_id, "u1-kbd");
        assert_eq!(keys.check(&mut batch, true), Ok(()));
    }

    #[test]
    fn with_short_lived_labels_each_block_s_key_sums_go_out_once_beside_them() {
        let mut session = Session { key_sums: Some(KeySumsReporter::default()), ..test_session() };
        let mut sent = Vec::new();
        for chunk in 0..20i64 {
            let mut events = Vec::new();
            for i in 0..20 {
                let (t, code) =
                    (1_700_000_000_000_000 + (chunk * 20 + i) * 150_000, 16 + ((chunk * 20 + i) * 7 % 23) as u32);
                for (at, action) in [(t, KeyAction::Down), (t + 60_000, KeyAction::Up)] {
                    session.key_sums.as_mut().unwrap().observe(KeyEvent::new(at, code, action));
                    events.push(KeyEvent::new(at, session.labels.label(code, action), action));
                }
            }
            let entry = session.encode(&CutRecord { user_id: "u1".into(), session_id: String::new(), events });
            let batch = proto::KeyEventBatch::decode(ship::unframe(&entry).unwrap().1).unwrap();
            sent.extend(batch.key_sums.map(|s| (chunk, s.presses)));
        }
        // 400 presses: the first block of 300 settles at press 308, in the 16th record.
        assert_eq!(sent, [(15, 300)]);
    }

    #[test]
    fn bad_settings_are_refused() {
        let ok = AgentConfig::default();
        assert!(ok.validate().is_ok());
        assert!(AgentConfig { batch_events: 0, ..ok.clone() }.validate().is_err());
        assert!(AgentConfig { spool_max_bytes: 10, ..ok.clone() }.validate().is_err());
        // Labels shorter-lived than the span the detector reads recurrences over are refused.
        assert!(AgentConfig { key_label_presses: 0, ..ok.clone() }.validate().is_ok());
        assert!(AgentConfig { key_label_presses: 15, ..ok.clone() }.validate().is_err());
        assert!(AgentConfig { key_label_presses: 1, ..ok.clone() }.validate().is_err());
        assert!(AgentConfig { user_id: "x".repeat(300), ..ok }.validate().is_err());
    }
}
