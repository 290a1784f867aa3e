//! The processor's settings (`[stream]`) and the Kafka client passthrough (`[kafka]`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use metronome_state::RocksOptions;
use serde::{Deserialize, Serialize};

/// Settings of `metronome process`. Every key is documented in `config/default.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Names the consumer group, the transactional ids and the changelog topics.
    pub application_id: String,
    /// This process among the group, for client ids and logs; empty: the host name.
    pub instance_id: String,
    /// Key events in (`KeyEventBatch`, keyed by user id).
    pub input_topic: String,
    /// Alerts out (`Alert`, keyed by user id).
    pub alerts_topic: String,
    /// Records that fail to decode or validate.
    pub dlq_topic: String,
    /// Where tasks keep their RocksDB stores, one directory per input partition.
    pub state_dir: PathBuf,
    /// Longest time records wait before their batch is processed and committed, milliseconds.
    pub commit_interval_ms: u64,
    /// Most records in one batch (one transaction per task per batch).
    pub max_batch_records: usize,
    /// Most payload bytes in one batch: bounds the memory a batch holds whatever the records' size.
    pub max_batch_bytes: usize,
    /// Most users whose state one transaction loads and writes: a batch of records from more
    /// users, or more idle windows to close, commits in parts. Bounds a batch's output (states
    /// and changelog records), which its input bounds do not: a record of one press from a new
    /// id makes a state of a kilobyte, and closing a window another.
    pub max_batch_users: usize,
    /// Most events one input record may carry; more goes to the dead-letter topic.
    pub max_events_per_record: usize,
    /// Events per second of event time one user may send, sustained; more is dropped and
    /// counted (`metronome_core::intake`). Typing makes a few dozen, the fastest macros a few hundred.
    pub max_user_events_per_s: u64,
    /// Events one user may send at once above that rate (and what a new user starts with).
    pub max_user_event_burst: u64,
    /// The enrolled agents' signing keys (TOML, `metronome_core::signing`); empty: signatures are not
    /// checked.
    pub device_keys_file: PathBuf,
    /// Refuse unsigned records (to the dead-letter topic, `unsigned`); needs `device_keys_file`.
    pub require_signed: bool,
    /// Most users with an open window per task: past it the smallest, then longest quiet, are closed
    /// early, as if idle, so a flood of new user ids holds bounded memory.
    pub max_open_users_per_task: usize,
    /// Most an event's time may lead its record's reference (the broker's append time, else
    /// the processor's clock), seconds: one stray future stamp blinds a user for at most this
    /// (`metronome_core::timebound`).
    pub max_event_lead_s: u64,
    /// Most an event's time may lag its record's broker append time, seconds; records further
    /// behind are shifted to it, keeping their intervals.
    pub max_event_lag_s: u64,
    /// Create the input topic with `message.timestamp.type=LogAppendTime`, so that each record
    /// carries the broker's clock and event times are bounded both ways. Off by default
    /// because replaying a recorded keylog into the topic (tests, demos, backfills) then reads
    /// as a clock far behind; a deployment of agents should have it (`k8s/base/config.toml`).
    pub input_log_append_time: bool,
    /// Threads that work the tasks' batches side by side (tasks are independent: one partition
    /// each); 0: one per available core.
    pub task_threads: usize,
    /// Create missing topics at start-up (input, alerts, dead letters, changelogs).
    pub create_topics: bool,
    /// Partitions of the input, alert and dead-letter topics when this process creates them.
    pub topic_partitions: i32,
    /// Replication factor of topics this process creates.
    pub replication_factor: i32,
    /// Kafka transaction timeout, milliseconds.
    pub transaction_timeout_ms: u64,
    /// Processing guarantee: `exactly_once` (Kafka transactions) or `at_least_once`.
    pub guarantee: Guarantee,
    /// Retention: a user whose newest event is older than this many days loses its state (store
    /// and changelog); 0 keeps every user.
    pub state_retention_days: u32,
    /// When retention passes run: at this UTC time of day (`HH:MM`), then every
    /// `prune_interval_s` seconds.
    pub prune_at_utc: String,
    /// Seconds between retention passes (86400: nightly).
    pub prune_interval_s: u64,
    /// RocksDB tuning of the task stores.
    pub rocksdb: RocksOptions,
}

impl StreamConfig {
    /// Each user's event budget (`metronome_core::intake`).
    pub fn rate_limit(&self) -> metronome_core::intake::RateLimit {
        metronome_core::intake::RateLimit { events_per_s: self.max_user_events_per_s, burst: self.max_user_event_burst }
    }

    /// The bounds on event times (`metronome_core::timebound`).
    pub fn time_bounds(&self) -> metronome_core::timebound::TimeBounds {
        let us = |s: u64| i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1_000_000);
        metronome_core::timebound::TimeBounds { lead_us: us(self.max_event_lead_s), lag_us: us(self.max_event_lag_s) }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            application_id: "metronome".to_owned(),
            instance_id: String::new(),
            input_topic: "keys.events".to_owned(),
            alerts_topic: "keys.alerts".to_owned(),
            dlq_topic: "keys.dlq".to_owned(),
            state_dir: PathBuf::from("metronome-state"),
            commit_interval_ms: 100,
            max_batch_records: 50_000,
            max_batch_bytes: 32 << 20,
            max_batch_users: 4_096,
            max_events_per_record: 10_000,
            max_user_events_per_s: 1_000,
            max_user_event_burst: 20_000,
            max_open_users_per_task: 100_000,
            device_keys_file: PathBuf::new(),
            require_signed: false,
            max_event_lead_s: 120,
            max_event_lag_s: 300,
            input_log_append_time: false,
            task_threads: 0,
            create_topics: true,
            topic_partitions: 8,
            replication_factor: 1,
            transaction_timeout_ms: 60_000,
            guarantee: Guarantee::ExactlyOnce,
            state_retention_days: 30,
            prune_at_utc: "03:00".to_owned(),
            prune_interval_s: 86_400,
            rocksdb: RocksOptions::default(),
        }
    }
}

/// When retention passes run: at `anchor_s` seconds after a UTC midnight, then every
/// `interval_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneSchedule {
    /// Seconds after midnight UTC.
    pub anchor_s: i64,
    /// Seconds between passes.
    pub interval_s: i64,
}

impl PruneSchedule {
    /// The first pass strictly after `now_s` (Unix seconds).
    pub fn next_after(&self, now_s: i64) -> i64 {
        self.anchor_s + ((now_s - self.anchor_s).div_euclid(self.interval_s) + 1) * self.interval_s
    }
}

/// What a crash may do to the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Alerts, dead letters, changelog records and input offsets commit in one Kafka
    /// transaction per task and batch: nothing lost, nothing twice under read_committed.
    ExactlyOnce,
    /// Records are flushed, then the offsets committed: nothing lost, but a crash between the
    /// two repeats the batch (alerts then repeat with the same deterministic `alert_id`). For
    /// brokers without transactions.
    AtLeastOnce,
}

/// The store every task keeps: per-user detector state (window, histogram inputs, incident,
/// late-event watermark).
pub const USER_STATE_STORE: &str = "user-state";
/// The fleet fingerprints stage: its repartition topic and its store (users per fingerprint).
pub const FLEET_FINGERPRINTS: &str = "fleet-fingerprints";
/// The fleet decision stage: its repartition topic and its store (links and fleets).
pub const FLEET_CANDIDATES: &str = "fleet-candidates";

impl StreamConfig {
    /// The compacted changelog topic of `store`: `<application-id>-<store>-changelog`.
    pub fn changelog_topic(&self, store: &str) -> String {
        format!("{}-{store}-changelog", self.application_id)
    }

    /// The repartition topic of stage `name`: `<application-id>-<name>-repartition`, as Kafka
    /// Streams names them.
    pub fn repartition_topic(&self, name: &str) -> String {
        format!("{}-{name}-repartition", self.application_id)
    }

    /// The consumer group of the fleet stages.
    pub fn fleet_group(&self) -> String {
        format!("{}-fleet", self.application_id)
    }

    /// The transactional id of the task consuming `topic`'s `partition` (a fleet stage's).
    pub fn stage_transactional_id(&self, topic: &str, partition: i32) -> String {
        format!("{}-{topic}-{partition}", self.application_id)
    }

    /// The RocksDB directory of the task consuming `topic`'s `partition` (a fleet stage's).
    pub fn stage_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.state_dir.join(&self.application_id).join(format!("{topic}-{partition}"))
    }

    /// The compacted topic where instances announce their partitions and HTTP addresses.
    pub fn instances_topic(&self) -> String {
        format!("{}-instances", self.application_id)
    }

    /// The transactional id of the task for `partition`. One per task, so a task that moves to
    /// another process fences its old producer there (a zombie cannot commit).
    pub fn transactional_id(&self, partition: i32) -> String {
        format!("{}-{}-{partition}", self.application_id, self.input_topic)
    }

    /// This instance's name: `instance_id`, else the host name, else `metronome`.
    pub fn instance_name(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "metronome".to_owned())
    }

    /// Threads to work tasks with: `task_threads`, or one per available core when 0.
    pub fn task_threads(&self) -> usize {
        match self.task_threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    /// The RocksDB directory of the task for `partition`.
    pub fn task_dir(&self, partition: i32) -> PathBuf {
        self.state_dir.join(&self.application_id).join(format!("{}-{partition}", self.input_topic))
    }

    /// The retention schedule `prune_at_utc` and `prune_interval_s` describe.
    pub fn prune_schedule(&self) -> Result<PruneSchedule, String> {
        let bad = || format!("stream.prune_at_utc `{}` is not HH:MM", self.prune_at_utc);
        let (h, m) = self.prune_at_utc.trim().split_once(':').ok_or_else(bad)?;
        let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if !(0..24).contains(&h) || !(0..60).contains(&m) {
            return Err(bad());
        }
        if self.prune_interval_s == 0 {
            return Err("stream.prune_interval_s must be at least 1".to_owned());
        }
        Ok(PruneSchedule { anchor_s: h * 3600 + m * 60, interval_s: self.prune_interval_s as i64 })
    }

    /// Checks values that would fail later in a less obvious way.
    pub fn validate(&self) -> Result<(), String> {
        self.prune_schedule()?;
        let named = [
            ("application_id", &self.application_id),
            ("input_topic", &self.input_topic),
            ("alerts_topic", &self.alerts_topic),
            ("dlq_topic", &self.dlq_topic),
        ];
        for (name, value) in named {
            if value.is_empty() {
                return Err(format!("stream.{name} must not be empty"));
            }
        }
        if self.commit_interval_ms == 0
            || self.max_batch_records == 0
            || self.max_batch_bytes == 0
            || self.max_batch_users == 0
            || self.max_events_per_record == 0
        {
            return Err("stream.commit_interval_ms, max_batch_records, max_batch_bytes, max_batch_users and \
                        max_events_per_record must be positive"
                .into());
        }
        if self.require_signed && self.device_keys_file.as_os_str().is_empty() {
            return Err("stream.require_signed needs stream.device_keys_file (the enrolled agents' keys)".into());
        }
        if self.max_user_events_per_s == 0 || self.max_user_event_burst == 0 || self.max_open_users_per_task == 0 {
            return Err(
                "stream.max_user_events_per_s, max_user_event_burst and max_open_users_per_task must be positive"
                    .into(),
            );
        }
        if self.max_event_lead_s == 0
            || self.max_event_lag_s == 0
            || self.max_event_lead_s.max(self.max_event_lag_s) > 86_400
        {
            return Err("stream.max_event_lead_s and max_event_lag_s must be 1 to 86400 seconds".into());
        }
        if self.topic_partitions < 1 || self.replication_factor < 1 {
            return Err("stream.topic_partitions and replication_factor must be at least 1".into());
        }
        Ok(())
    }
}

/// librdkafka properties passed to every client unchanged (`bootstrap.servers`,
/// `security.protocol`, `sasl.*`, `ssl.*`...). Environment variables cannot hold dots, so keys
/// written with `_` (`METRONOME_KAFKA__BOOTSTRAP_SERVERS`) are read as dotted names.
/// The underscore spelling is applied last, so an environment variable beats the file.
pub fn normalise_kafka_properties(props: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let (dotted, underscored): (Vec<_>, Vec<_>) = props.iter().partition(|(k, _)| !k.contains('_'));
    dotted.into_iter().chain(underscored).map(|(k, v)| (k.replace('_', "."), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_runs_nightly_at_the_configured_time() {
        let cfg = StreamConfig::default();
        let schedule = cfg.prune_schedule().unwrap();
        // 2026-11-29 02:59:59 UTC -> 03:00:00 the same day; 03:00:00 -> the next day's.
        let day = 1_795_910_400;
        assert_eq!(schedule.next_after(day + 3 * 3600 - 1), day + 3 * 3600);
        assert_eq!(schedule.next_after(day + 3 * 3600), day + 86_400 + 3 * 3600);
        let every_2s = PruneSchedule { anchor_s: 0, interval_s: 2 };
        assert_eq!(every_2s.next_after(11), 12);
        for bad in ["3", "25:00", "03:61", "x:y"] {
            let cfg = StreamConfig { prune_at_utc: bad.to_owned(), ..StreamConfig::default() };
            assert!(cfg.validate().is_err(), "{bad}");
        }
        let cfg = StreamConfig { prune_interval_s: 0, ..StreamConfig::default() };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn names_follow_the_kafka_streams_conventions() {
        let cfg = StreamConfig::default();
        assert_eq!(cfg.changelog_topic(USER_STATE_STORE), "metronome-user-state-changelog");
        assert_eq!(cfg.transactional_id(3), "metronome-keys.events-3");
        assert!(cfg.task_dir(3).ends_with("metronome/keys.events-3"));
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn environment_spelling_becomes_dotted() {
        let props = BTreeMap::from([
            ("bootstrap_servers".to_owned(), "env:9092".to_owned()),
            ("bootstrap.servers".to_owned(), "file:9092".to_owned()),
        ]);
        assert_eq!(normalise_kafka_properties(&props)["bootstrap.servers"], "env:9092");
    }

    #[test]
    fn nonsense_is_refused() {
        let cfg = StreamConfig { max_batch_records: 0, ..StreamConfig::default() };
        assert!(cfg.validate().is_err());
        let cfg = StreamConfig { max_batch_bytes: 0, ..StreamConfig::default() };
        assert!(cfg.validate().unwrap_err().contains("max_batch_bytes"));
        let cfg = StreamConfig { input_topic: String::new(), ..StreamConfig::default() };
        assert!(cfg.validate().unwrap_err().contains("input_topic"));
    }
}
