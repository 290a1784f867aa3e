//! What goes in and out of a task as plain data: input validation, dead letters, alerts.
//!
//! Pure: no Kafka client here. The processor turns [`OutRecord`]s into produced records.

use prost::Message;

use crate::detect::dependence::{GroupSums, KeySums};
use crate::detect::fleet::{Candidate, FingerprintSeen, FleetReport};
use crate::detect::{AlertReport, Rule, WindowFeatures};
use crate::event::{KeyAction, KeyEvent};
use crate::keylog::{MAX_EVENT_TIME_US, MAX_ID_LEN};
use crate::proto;

use crate::intake::SessionKey;
use crate::signing::{DeviceKeys, Refusal};
pub use crate::timebound::RecordTime;

/// One consumed input record, detached from the client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InputRecord {
    /// Offset in its partition.
    pub offset: i64,
    /// The record key (the user id, as the producer partitioned by it).
    pub key: Option<Vec<u8>>,
    /// The encoded `KeyEventBatch`.
    pub payload: Option<Vec<u8>>,
    /// Its timestamp, which bounds its event times (`crate::timebound`).
    pub time: RecordTime,
}

/// Why a record went to the dead-letter topic. A closed set: it is a header value and a metric
/// label, so it must stay bounded and must never carry the record's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterClass {
    /// No payload at all.
    EmptyPayload,
    /// The payload is not a `KeyEventBatch`.
    Decode,
    /// The batch names no user, or a user id longer than allowed.
    InvalidUser,
    /// The record key is not the batch's user id: the record sits on the wrong partition.
    KeyMismatch,
    /// An event names a different user than its batch.
    UserMismatch,
    /// More events than one record may carry.
    OversizeBatch,
    /// An event time before the epoch or after 2100-01-01.
    AbsurdTimestamp,
    /// An event whose action is not down, up or repeat.
    InvalidAction,
    /// A record of a fleet stage's internal topic that does not decode.
    FleetRecord,
    /// No signature while `stream.require_signed` is on.
    Unsigned,
    /// Signed with a key the processor was not given.
    UnknownKey,
    /// A signature that does not match the batch.
    BadSignature,
    /// A valid signature of a key bound to another user or device.
    SignedForAnotherUser,
}

impl DeadLetterClass {
    /// Every class, for metrics that want to pre-register labels.
    pub const ALL: [DeadLetterClass; 13] = [
        DeadLetterClass::EmptyPayload,
        DeadLetterClass::Decode,
        DeadLetterClass::InvalidUser,
        DeadLetterClass::KeyMismatch,
        DeadLetterClass::UserMismatch,
        DeadLetterClass::OversizeBatch,
        DeadLetterClass::AbsurdTimestamp,
        DeadLetterClass::InvalidAction,
        DeadLetterClass::FleetRecord,
        DeadLetterClass::Unsigned,
        DeadLetterClass::UnknownKey,
        DeadLetterClass::BadSignature,
        DeadLetterClass::SignedForAnotherUser,
    ];

    /// The stable name used in headers, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterClass::EmptyPayload => "empty_payload",
            DeadLetterClass::Decode => "decode",
            DeadLetterClass::InvalidUser => "invalid_user",
            DeadLetterClass::KeyMismatch => "key_mismatch",
            DeadLetterClass::UserMismatch => "user_mismatch",
            DeadLetterClass::OversizeBatch => "oversize_batch",
            DeadLetterClass::AbsurdTimestamp => "absurd_timestamp",
            DeadLetterClass::InvalidAction => "invalid_action",
            DeadLetterClass::FleetRecord => "fleet_record",
            DeadLetterClass::Unsigned => "unsigned",
            DeadLetterClass::UnknownKey => "unknown_key",
            DeadLetterClass::BadSignature => "bad_signature",
            DeadLetterClass::SignedForAnotherUser => "signed_for_another_user",
        }
    }

    /// A fixed description for the error header; never built from the record.
    pub fn description(self) -> &'static str {
        match self {
            DeadLetterClass::EmptyPayload => "record has no payload",
            DeadLetterClass::Decode => "payload is not a metronome.v1.KeyEventBatch",
            DeadLetterClass::InvalidUser => "batch user id is empty or too long",
            DeadLetterClass::KeyMismatch => "record key is not the batch user id",
            DeadLetterClass::UserMismatch => "an event names another user than its batch",
            DeadLetterClass::OversizeBatch => "batch carries more events than allowed",
            DeadLetterClass::AbsurdTimestamp => "an event time is outside 1970..2100",
            DeadLetterClass::InvalidAction => "an event action is not down, up or repeat",
            DeadLetterClass::FleetRecord => "a fleet stage record does not decode",
            DeadLetterClass::Unsigned => "batch is not signed and signatures are required",
            DeadLetterClass::UnknownKey => "batch is signed with a key id the processor does not hold",
            DeadLetterClass::BadSignature => "batch signature does not match its content",
            DeadLetterClass::SignedForAnotherUser => "batch is signed with a key bound to another user or device",
        }
    }
}

/// A decoded, validated input record.
#[derive(Debug, Clone, PartialEq)]
pub struct UserEvents {
    /// The user the events belong to.
    pub user_id: String,
    /// The device and capture session the events' numbers belong to.
    pub session: SessionKey,
    /// The events, in capture order.
    pub events: Vec<KeyEvent>,
    /// `seqs[i]` is `events[i]`'s sequence number (0: unnumbered).
    pub seqs: Vec<u64>,
    /// The agent reported a virtual input device (uinput) as their source.
    pub virtual_device: bool,
    /// The key-dependence sums the agent computed over the real keys, if it sent them.
    pub key_sums: Option<KeySums>,
}

/// What signatures a task checks (`crate::signing`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Signatures<'a> {
    /// The enrolled keys; `None`: signatures are not checked.
    pub keys: Option<&'a DeviceKeys>,
    /// Refuse unsigned batches.
    pub required: bool,
}

/// Decodes and validates one record, without checking signatures. Errors name a class only,
/// never content.
pub fn decode_record(record: &InputRecord, max_events: usize) -> Result<UserEvents, DeadLetterClass> {
    decode_signed_record(record, max_events, Signatures::default())
}

/// [`decode_record`], checking the batch's signature as `signatures` says.
pub fn decode_signed_record(
    record: &InputRecord,
    max_events: usize,
    signatures: Signatures<'_>,
) -> Result<UserEvents, DeadLetterClass> {
    let payload = record.payload.as_deref().ok_or(DeadLetterClass::EmptyPayload)?;
    let mut batch = proto::KeyEventBatch::decode(payload).map_err(|_| DeadLetterClass::Decode)?;
    if batch.user_id.is_empty() || batch.user_id.len() > MAX_ID_LEN {
        return Err(DeadLetterClass::InvalidUser);
    }
    if record.key.as_deref() != Some(batch.user_id.as_bytes()) {
        return Err(DeadLetterClass::KeyMismatch);
    }
    if let Some(keys) = signatures.keys {
        keys.check(&mut batch, signatures.required).map_err(|refusal| match refusal {
            Refusal::Unsigned => DeadLetterClass::Unsigned,
            Refusal::UnknownKey => DeadLetterClass::UnknownKey,
            Refusal::BadSignature => DeadLetterClass::BadSignature,
            Refusal::SignedForAnotherUser => DeadLetterClass::SignedForAnotherUser,
        })?;
    }
    if batch.events.len() > max_events {
        return Err(DeadLetterClass::OversizeBatch);
    }
    let mut events = Vec::with_capacity(batch.events.len());
    let mut seqs = Vec::with_capacity(batch.events.len());
    for e in &batch.events {
        if !e.user_id.is_empty() && e.user_id != batch.user_id {
            return Err(DeadLetterClass::UserMismatch);
        }
        if !(0..=MAX_EVENT_TIME_US).contains(&e.event_time_us) {
            return Err(DeadLetterClass::AbsurdTimestamp);
        }
        let action = match proto::KeyAction::try_from(e.action) {
            Ok(proto::KeyAction::Down) => KeyAction::Down,
            Ok(proto::KeyAction::Up) => KeyAction::Up,
            Ok(proto::KeyAction::Repeat) => KeyAction::Repeat,
            _ => return Err(DeadLetterClass::InvalidAction),
        };
        events.push(KeyEvent::new(e.event_time_us, e.key, action));
        seqs.push(e.seq);
    }
    let virtual_device = batch.device.is_some_and(|d| d.is_virtual);
    let session = SessionKey::of(&batch.device_id, &batch.session_id);
    let key_sums = batch.key_sums.as_ref().map(key_sums_from_proto);
    Ok(UserEvents { user_id: batch.user_id, session, events, seqs, virtual_device, key_sums })
}

/// The key-dependence sums as the wire carries them.
pub fn key_sums_to_proto(sums: &KeySums) -> proto::KeySums {
    let group = |g: &GroupSums| proto::GroupSums {
        groups: g.groups,
        values: g.values,
        sum: g.sum,
        sum_sq_over_n: g.sum_sq_over_n,
        within: g.within,
    };
    proto::KeySums {
        presses: sums.presses,
        hold_by_key: Some(group(&sums.hold_by_key)),
        flight_by_key: Some(group(&sums.flight_by_key)),
        flight_by_pair: Some(group(&sums.flight_by_pair)),
    }
}

/// The key-dependence sums off the wire (absent groups read as empty; plausibility is the
/// detector's to judge).
pub fn key_sums_from_proto(sums: &proto::KeySums) -> KeySums {
    let group = |g: &Option<proto::GroupSums>| {
        g.as_ref().map_or(GroupSums::default(), |g| GroupSums {
            groups: g.groups,
            values: g.values,
            sum: g.sum,
            sum_sq_over_n: g.sum_sq_over_n,
            within: g.within,
        })
    };
    KeySums {
        presses: sums.presses,
        hold_by_key: group(&sums.hold_by_key),
        flight_by_key: group(&sums.flight_by_key),
        flight_by_pair: group(&sums.flight_by_pair),
    }
}

/// Which topic an output record is for; the processor maps these to configured names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutTopic {
    /// The alert topic (`keys.alerts`).
    Alerts,
    /// The dead-letter topic (`keys.dlq`).
    DeadLetters,
    /// The task's state changelog, on the task's own partition.
    Changelog,
    /// The fleet fingerprints' repartition topic, partitioned by the record key.
    Fingerprints,
    /// The fleet candidates' repartition topic (one partition: fleets are decided globally).
    FleetCandidates,
}

/// A record a task wants produced inside its transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// Where it goes.
    pub topic: OutTopic,
    /// The record key.
    pub key: Option<Vec<u8>>,
    /// The value; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    /// Headers; names and values never carry keystroke content.
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

/// Header names on dead letters.
pub mod dlq_headers {
    /// The [`super::DeadLetterClass`] name.
    pub const ERROR_CLASS: &str = "metronome.error.class";
    /// Its fixed description.
    pub const ERROR_DESCRIPTION: &str = "metronome.error.description";
    /// Where the record came from: topic, partition, offset.
    pub const SOURCE_TOPIC: &str = "metronome.source.topic";
    /// Source partition (decimal).
    pub const SOURCE_PARTITION: &str = "metronome.source.partition";
    /// Source offset (decimal).
    pub const SOURCE_OFFSET: &str = "metronome.source.offset";
}

/// The dead letter for `record`: its key and payload unchanged (nothing is lost), headers that
/// say why and where from.
pub fn dead_letter(record: &InputRecord, class: DeadLetterClass, source_topic: &str, partition: i32) -> OutRecord {
    OutRecord {
        topic: OutTopic::DeadLetters,
        key: record.key.clone(),
        value: record.payload.clone(),
        headers: vec![
            (dlq_headers::ERROR_CLASS, class.as_str().as_bytes().to_vec()),
            (dlq_headers::ERROR_DESCRIPTION, class.description().as_bytes().to_vec()),
            (dlq_headers::SOURCE_TOPIC, source_topic.as_bytes().to_vec()),
            (dlq_headers::SOURCE_PARTITION, partition.to_string().into_bytes()),
            (dlq_headers::SOURCE_OFFSET, record.offset.to_string().into_bytes()),
        ],
    }
}

/// The wire form of an alert. `detected_at_us` is the wall clock at detection.
pub fn alert_message(user_id: &str, alert: &AlertReport, detected_at_us: i64) -> proto::Alert {
    let w = &alert.window;
    let fired_features: Vec<&str> = alert.reasons.iter().flat_map(|r: Rule| r.features().iter().copied()).collect();
    let features = WindowFeatures::NAMES
        .iter()
        .zip(w.features.to_array())
        .map(|(name, value)| proto::Feature { name: (*name).to_owned(), value, fired: fired_features.contains(name) })
        .collect();
    proto::Alert {
        alert_id: alert.alert_id.to_string(),
        user_id: user_id.to_owned(),
        window_start_us: w.window_start_us,
        window_end_us: w.window_end_us,
        score: w.score,
        histogram_score: w.histogram_score,
        lstm_score: w.lstm_score,
        features,
        reasons: alert.reasons.names().into_iter().map(str::to_owned).collect(),
        model_version: alert.model_version.clone(),
        detected_at_us,
        scorers: alert.reasons.scorers().into_iter().map(str::to_owned).collect(),
        timing_score: w.timing_score,
        interval_histogram: Some(proto::IntervalHistogram {
            bin_ms: w.interval_histogram.bin_ms,
            counts: w.interval_histogram.counts.clone(),
        }),
        fleet: None,
    }
}

/// Version byte in front of the fleet stages' record values.
const FLEET_RECORD_FORMAT: u8 = 1;
/// The key of every fleet candidate (one partition decides all fleets).
pub const FLEET_CANDIDATE_KEY: &[u8] = b"fleets";

/// `value` as postcard behind a format byte: how stored states and internal records are kept,
/// so a later format can be told from this one.
pub fn versioned<T: serde::Serialize>(format: u8, value: &T) -> Vec<u8> {
    let mut out = vec![format];
    out.extend(postcard::to_stdvec(value).expect("plain data always serializes"));
    out
}

/// Reads what [`versioned`] wrote with `format`; `None` for another format or bad bytes.
pub fn unversioned<T: serde::de::DeserializeOwned>(format: u8, bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&f, body)) if f == format => postcard::from_bytes(body).ok(),
        _ => None,
    }
}

fn fleet_value<T: serde::Serialize>(value: &T) -> Vec<u8> {
    versioned(FLEET_RECORD_FORMAT, value)
}

fn fleet_value_of<T: serde::de::DeserializeOwned>(record: &InputRecord) -> Result<T, DeadLetterClass> {
    record.payload.as_deref().and_then(|p| unversioned(FLEET_RECORD_FORMAT, p)).ok_or(DeadLetterClass::FleetRecord)
}

/// A changelog record: `value` put under `key`, or a tombstone for `None`.
pub fn changelog_record(key: Vec<u8>, value: Option<Vec<u8>>) -> OutRecord {
    OutRecord { topic: OutTopic::Changelog, key: Some(key), value, headers: Vec::new() }
}

/// The record that sends `user`'s `fingerprint` to the stage that counts its users, keyed (and
/// so partitioned) by the fingerprint.
pub fn fingerprint_record(fingerprint: u64, user: &str, at_us: i64) -> OutRecord {
    OutRecord {
        topic: OutTopic::Fingerprints,
        key: Some(fingerprint.to_be_bytes().to_vec()),
        value: Some(fleet_value(&FingerprintSeen { user: user.to_owned(), at_us })),
        headers: Vec::new(),
    }
}

/// Reads a fingerprint record back.
pub fn decode_fingerprint(record: &InputRecord) -> Result<(u64, FingerprintSeen), DeadLetterClass> {
    let key: [u8; 8] = record.key.as_deref().and_then(|k| k.try_into().ok()).ok_or(DeadLetterClass::FleetRecord)?;
    let seen: FingerprintSeen = fleet_value_of(record)?;
    if seen.user.is_empty() || seen.user.len() > MAX_ID_LEN {
        return Err(DeadLetterClass::FleetRecord);
    }
    Ok((u64::from_be_bytes(key), seen))
}

/// The record that sends a candidate to the stage that decides fleets.
pub fn candidate_record(candidate: &Candidate) -> OutRecord {
    OutRecord {
        topic: OutTopic::FleetCandidates,
        key: Some(FLEET_CANDIDATE_KEY.to_vec()),
        value: Some(fleet_value(candidate)),
        headers: Vec::new(),
    }
}

/// Reads a candidate record back.
pub fn decode_candidate(record: &InputRecord) -> Result<Candidate, DeadLetterClass> {
    let candidate: Candidate = fleet_value_of(record)?;
    if candidate.users.iter().any(|u| u.is_empty() || u.len() > MAX_ID_LEN) {
        return Err(DeadLetterClass::FleetRecord);
    }
    Ok(candidate)
}

/// The wire form of a fleet alert: the fleet's first account as its user, the span of the
/// sharing as its window, scorer and reason `fleet`.
pub fn fleet_alert_message(report: &FleetReport, model_version: &str, detected_at_us: i64) -> proto::Alert {
    proto::Alert {
        alert_id: report.fleet_id.to_string(),
        user_id: report.accounts.first().cloned().unwrap_or_default(),
        window_start_us: report.first_us,
        window_end_us: report.last_us,
        score: 1.0,
        reasons: vec![Rule::Fleet.name().to_owned()],
        model_version: model_version.to_owned(),
        detected_at_us,
        scorers: vec![Rule::Fleet.scorer().to_owned()],
        fleet: Some(proto::FleetEvidence {
            fleet_id: report.fleet_id.to_string(),
            accounts: report.accounts.clone(),
            new_accounts: report.new_accounts.clone(),
            links: report.links,
            fingerprints: report.fingerprints,
        }),
        ..Default::default()
    }
}

/// Groups time-ordered keylog events into `KeyEventBatch` records of at most `max_events`,
/// one user per record, keyed by user: what an agent publishes.
pub fn batches_for_user(user_id: &str, session_id: &str, events: &[KeyEvent], max_events: usize) -> Vec<Vec<u8>> {
    let max_events = max_events.max(1);
    events.chunks(max_events).map(|chunk| encode_batch(user_id, "", session_id, chunk, None)).collect()
}

/// One encoded `KeyEventBatch`: `events` of one user from one device, numbered from `first_seq`
/// (a capture session's sequence, from 1; `None` for files and simulations: every seq is 0,
/// unnumbered, never deduplicated).
/// Events leave user, device and session empty: the batch carries them once.
pub fn encode_batch(
    user_id: &str,
    device_id: &str,
    session_id: &str,
    events: &[KeyEvent],
    first_seq: Option<u64>,
) -> Vec<u8> {
    batch_message(user_id, device_id, session_id, events, first_seq).encode_to_vec()
}

/// The `KeyEventBatch` [`encode_batch`] encodes, for senders that add to it (the agent's device).
pub fn batch_message(
    user_id: &str,
    device_id: &str,
    session_id: &str,
    events: &[KeyEvent],
    first_seq: Option<u64>,
) -> proto::KeyEventBatch {
    proto::KeyEventBatch {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        session_id: session_id.to_owned(),
        events: events
            .iter()
            .enumerate()
            .map(|(i, e)| proto::KeyEvent {
                user_id: String::new(),
                device_id: String::new(),
                session_id: String::new(),
                seq: first_seq.map_or(0, |s| s + i as u64),
                event_time_us: e.time_us,
                key: e.key,
                action: match e.action {
                    KeyAction::Down => proto::KeyAction::Down,
                    KeyAction::Up => proto::KeyAction::Up,
                    KeyAction::Repeat => proto::KeyAction::Repeat,
                } as i32,
            })
            .collect(),
        device: None,
        key_id: String::new(),
        signature: Vec::new(),
        key_sums: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(user: &str, events: Vec<proto::KeyEvent>) -> InputRecord {
        let batch = proto::KeyEventBatch { user_id: user.into(), events, ..Default::default() };
        InputRecord {
            offset: 7,
            key: Some(user.as_bytes().to_vec()),
            payload: Some(batch.encode_to_vec()),
            ..InputRecord::default()
        }
    }

    fn event(t: i64, action: i32) -> proto::KeyEvent {
        proto::KeyEvent { event_time_us: t, key: 30, action, ..Default::default() }
    }

    #[test]
    fn valid_batch_decodes_in_order() {
        let r = record("u1", vec![event(10, 1), event(20, 2), event(25, 3)]);
        let got = decode_record(&r, 100).unwrap();
        assert_eq!(got.user_id, "u1");
        let actions: Vec<_> = got.events.iter().map(|e| e.action).collect();
        assert_eq!(actions, [KeyAction::Down, KeyAction::Up, KeyAction::Repeat]);
    }

    #[test]
    fn a_batch_says_whether_its_device_is_virtual() {
        let plain = decode_record(&record("u1", vec![event(10, 1)]), 10).unwrap();
        assert!(!plain.virtual_device, "no device info: files and older agents");
        for is_virtual in [false, true] {
            let device = Some(proto::DeviceInfo { bus_type: 6, is_virtual, ..Default::default() });
            let batch =
                proto::KeyEventBatch { user_id: "u1".into(), events: vec![event(10, 1)], device, ..Default::default() };
            let r = InputRecord {
                offset: 1,
                key: Some(b"u1".to_vec()),
                payload: Some(batch.encode_to_vec()),
                ..InputRecord::default()
            };
            assert_eq!(decode_record(&r, 10).unwrap().virtual_device, is_virtual);
        }
    }

    #[test]
    fn each_violation_has_its_class() {
        let ok = record("u1", vec![event(10, 1)]);
        let cases = [
            (InputRecord { payload: None, ..ok.clone() }, DeadLetterClass::EmptyPayload),
            (InputRecord { payload: Some(vec![0xff, 0xff, 0xff]), ..ok.clone() }, DeadLetterClass::Decode),
            (record("", vec![event(1, 1)]), DeadLetterClass::InvalidUser),
            (record(&"x".repeat(MAX_ID_LEN + 1), vec![]), DeadLetterClass::InvalidUser),
            (InputRecord { key: Some(b"u2".to_vec()), ..ok.clone() }, DeadLetterClass::KeyMismatch),
            (InputRecord { key: None, ..ok.clone() }, DeadLetterClass::KeyMismatch),
            (record("u1", vec![event(1, 1); 101]), DeadLetterClass::OversizeBatch),
            (record("u1", vec![event(-1, 1)]), DeadLetterClass::AbsurdTimestamp),
            (record("u1", vec![event(MAX_EVENT_TIME_US + 1, 1)]), DeadLetterClass::AbsurdTimestamp),
            (record("u1", vec![event(1, 0)]), DeadLetterClass::InvalidAction),
            (record("u1", vec![event(1, 9)]), DeadLetterClass::InvalidAction),
            (
                record("u1", vec![proto::KeyEvent { user_id: "u2".into(), ..event(1, 1) }]),
                DeadLetterClass::UserMismatch,
            ),
        ];
        for (r, class) in cases {
            assert_eq!(decode_record(&r, 100), Err(class));
        }
    }

    #[test]
    fn dead_letter_keeps_the_record_and_says_only_why_and_where() {
        let r = record("u1", vec![event(-5, 1)]);
        let dl = dead_letter(&r, DeadLetterClass::AbsurdTimestamp, "keys.events", 3);
        assert_eq!(dl.topic, OutTopic::DeadLetters);
        assert_eq!(dl.value, r.payload, "payload preserved for replay");
        let header =
            |name| dl.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| String::from_utf8(v.clone()).unwrap());
        assert_eq!(header(dlq_headers::ERROR_CLASS).as_deref(), Some("absurd_timestamp"));
        assert_eq!(header(dlq_headers::SOURCE_PARTITION).as_deref(), Some("3"));
        assert_eq!(header(dlq_headers::SOURCE_OFFSET).as_deref(), Some("7"));
        for (_, v) in &dl.headers {
            let text = String::from_utf8_lossy(v);
            assert!(!text.contains("-5") && !text.contains("30"), "no timing or key in headers: {text}");
        }
    }

    #[test]
    fn class_names_are_unique() {
        let mut names: Vec<_> = DeadLetterClass::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DeadLetterClass::ALL.len());
    }

    #[test]
    fn published_batches_decode_back_to_the_events() {
        let events: Vec<KeyEvent> =
            (0..25).map(|i| KeyEvent::new(1_000 + i * 50, 30 + (i % 3) as u32, KeyAction::Down)).collect();
        let records = batches_for_user("u9", "s", &events, 10);
        assert_eq!(records.len(), 3);
        let mut back = Vec::new();
        for (i, payload) in records.into_iter().enumerate() {
            let r = InputRecord {
                offset: i as i64,
                key: Some(b"u9".to_vec()),
                payload: Some(payload),
                ..InputRecord::default()
            };
            back.extend(decode_record(&r, 10).unwrap().events);
        }
        assert_eq!(back, events);
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8))) {
            let r = InputRecord { key, payload: Some(bytes), ..InputRecord::default() };
            let _ = decode_record(&r, 1000);
        }
    }
}
