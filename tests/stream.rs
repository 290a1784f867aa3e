//! `metronome process`, exactly once, against Apache Kafka (KRaft, started per test): the stream
//! agrees exactly with `metronome score` on the same events, through rebalances, restarts, state
//! loss, stale state, kill -9, the death of a partition leader in a three-node cluster and bad
//! records, as read by a `read_committed` consumer.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::broker::{env_vars, Broker, ProcessorProc};
use metronome_core::keylog::{self, KeylogReader};
use metronome_core::wire::{batches_for_user, dlq_headers, encode_batch};
use prost::Message;
use serde_json::Value;

const PARTITIONS: i32 = 4;

/// What identifies an alert across the file and stream paths.
#[derive(Debug, Clone, PartialEq, PartialOrd)]
struct AlertKey {
    alert_id: String,
    user_id: String,
    window_start_us: i64,
    window_end_us: i64,
    reasons: Vec<String>,
    model_version: String,
    /// `[score, timing, histogram, lstm]`.
    scores: [f64; 4],
}

struct Scenario {
    broker: Broker,
    dir: tempfile::TempDir,
    app: String,
    env: Vec<(String, String)>,
    /// Users in file order with their events.
    users: Vec<(String, Vec<metronome_core::event::KeyEvent>)>,
    expected: Vec<AlertKey>,
}

impl Scenario {
    /// A broker, a simulated keylog of `users` users and what `metronome score` says about it.
    fn new(name: &str, users: u64, seed: u64) -> Self {
        Self::on(Broker::start(), name, users, seed)
    }

    /// [`Scenario::new`] on a given broker (a cluster).
    fn on(broker: Broker, name: &str, users: u64, seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let app = format!("app-{name}");
        let env = env_vars(&[
            ("METRONOME_STREAM__APPLICATION_ID", app.as_str()),
            ("METRONOME_STREAM__INPUT_TOPIC", "events"),
            ("METRONOME_STREAM__ALERTS_TOPIC", "alerts"),
            ("METRONOME_STREAM__DLQ_TOPIC", "dlq"),
            ("METRONOME_STREAM__COMMIT_INTERVAL_MS", "50"),
            ("METRONOME_STREAM__MAX_BATCH_RECORDS", "40"),
            ("METRONOME_STREAM__TOPIC_PARTITIONS", "4"),
            ("METRONOME_DETECTOR__WINDOW__IDLE_TIMEOUT_MS", "3000"),
            // A rejoining group waits for members that left uncleanly at most this long.
            ("METRONOME_KAFKA__SESSION_TIMEOUT_MS", "6000"),
            ("METRONOME_KAFKA__MAX_POLL_INTERVAL_MS", "15000"),
        ]);
        broker.create_topics(&["events", "alerts", "dlq"], PARTITIONS);

        let keylog = dir.path().join("sim.csv");
        let seed = seed.to_string();
        common::broker::simulate_keylog(
            &keylog,
            users,
            &["--macro-share", "0.3", "--mixed", "--seed", &seed, "--macro-presses", "150"],
        );
        let expected = score_alerts(&keylog, &env);
        assert!(expected.len() >= 3, "the scenario must raise alerts to compare: {}", expected.len());
        let records = KeylogReader::open(&keylog).unwrap();
        let users = keylog::group_by_user(records, |_| true, None).unwrap();
        Scenario { broker, dir, app, env, users, expected }
    }

    /// Overrides one setting of the processors started from now on.
    fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    fn state_dir(&self, instance: &str) -> PathBuf {
        self.dir.path().join("state").join(instance)
    }

    fn start(&self, instance: &str) -> ProcessorProc {
        ProcessorProc::start(&self.broker, &self.state_dir(instance), instance, &self.env, self.dir.path())
    }

    /// Publishes the users whose index satisfies `pick`, 40 events per record.
    fn publish(&self, pick: impl Fn(usize) -> bool) {
        let mut records = Vec::new();
        for (i, (user, events)) in self.users.iter().enumerate() {
            if pick(i) {
                for payload in batches_for_user(user, "s", events, 40) {
                    records.push((user.as_bytes().to_vec(), payload));
                }
            }
        }
        self.broker.produce("events", &records);
    }

    /// Waits for the processor to consume and commit everything, and for the expected alerts;
    /// then checks the committed alert topic holds exactly them.
    fn assert_exactly_expected(&self) {
        self.broker.wait_fully_committed(&self.app, "events");
        let got = self.broker.wait_for_alerts("alerts", self.expected.len());
        assert_same_alerts(&got, &self.expected);
    }
}

fn score_alerts(keylog: &Path, env: &[(String, String)]) -> Vec<AlertKey> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metronome"))
        .args(["score", "--alerts-only", "--input"])
        .arg(keylog)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut alerts: Vec<AlertKey> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "alert")
        .map(|v| AlertKey {
            alert_id: v["alert_id"].as_str().unwrap().to_owned(),
            user_id: v["user_id"].as_str().unwrap().to_owned(),
            window_start_us: v["window_start_us"].as_i64().unwrap(),
            window_end_us: v["window_end_us"].as_i64().unwrap(),
            reasons: v["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect(),
            model_version: v["model_version"].as_str().unwrap().to_owned(),
            scores: ["score", "timing_score", "histogram_score", "lstm_score"].map(|k| v[k].as_f64().unwrap_or(-1.0)),
        })
        .collect();
    alerts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    alerts
}

fn assert_same_alerts(got: &[metronome_core::proto::Alert], expected: &[AlertKey]) {
    let ids: Vec<&str> = got.iter().map(|a| a.alert_id.as_str()).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an alert was delivered twice");
    let mut got: Vec<AlertKey> = got
        .iter()
        .map(|a| AlertKey {
            alert_id: a.alert_id.clone(),
            user_id: a.user_id.clone(),
            window_start_us: a.window_start_us,
            window_end_us: a.window_end_us,
            reasons: a.reasons.clone(),
            model_version: a.model_version.clone(),
            scores: [a.score, a.timing_score, a.histogram_score, a.lstm_score.unwrap_or(-1.0)],
        })
        .collect();
    got.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(got.len(), expected.len(), "stream alerts {:#?}\nfile alerts {:#?}", got, expected);
    for (g, e) in got.iter().zip(expected) {
        // Exactly (a window's score does not depend on what else the model scored with it), up
        // to the last bit serde_json's default float parsing may round differently.
        let same = g.scores.iter().zip(&e.scores).all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs().max(1.0));
        assert!(same, "scores of {} differ: {:?} vs {:?}", e.alert_id, g.scores, e.scores);
        assert_eq!(AlertKey { scores: [0.0; 4], ..g.clone() }, AlertKey { scores: [0.0; 4], ..e.clone() });
    }
}

fn task_ready_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("task ready")).collect()
}

fn replayed_in(line: &str) -> u64 {
    let at = line.find("replayed=").expect("task ready lines carry replayed=");
    line[at + 9..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[test]
fn stream_alerts_equal_the_file_scorer_and_sigterm_exits_cleanly() {
    let s = Scenario::new("agree", 40, 11);
    s.publish(|_| true);
    let mut p = s.start("a");
    s.assert_exactly_expected();
    let status = p.terminate();
    assert!(status.success(), "SIGTERM exits 0:\n{}", p.log());
    let log = p.log();
    assert!(log.contains("processor stopped"), "{log}");
    assert_eq!(task_ready_lines(&log).len(), PARTITIONS as usize, "one task per partition:\n{log}");
    // Every alert is keyed by its user, so security staff can follow one user's partition.
    for r in s.broker.read_all("alerts") {
        let alert = metronome_core::proto::Alert::decode(r.payload.as_deref().unwrap()).unwrap();
        assert_eq!(r.key.as_deref(), Some(alert.user_id.as_bytes()));
        assert!(alert.detected_at_us > 0);
        // Timing rules name the window features they read; the LSTMs read the presses themselves.
        let by_features = alert.reasons.iter().any(|r| !["lstm", "press_lstm", "accumulated"].contains(&r.as_str()));
        assert_eq!(alert.features.iter().any(|f| f.fired), by_features, "fired features of {:?}", alert.reasons);
    }
    // `metronome alerts`, as security staff would follow the topic: every committed alert once.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metronome"))
        .args(["alerts", "--bootstrap-servers", &s.broker.bootstrap, "--idle-exit-s", "2"])
        .env("METRONOME_STREAM__ALERTS_TOPIC", "alerts")
        .output()
        .unwrap();
    assert!(out.status.success(), "metronome alerts: {}", String::from_utf8_lossy(&out.stderr));
    let mut ids: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["alert_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = s.expected.iter().map(|a| a.alert_id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected, "metronome alerts prints each committed alert");
    // The changelog is compacted-topic shaped: keyed records on the input's partitions.
    let changelog = s.broker.read_all(&format!("{}-user-state-changelog", s.app));
    assert!(!changelog.is_empty());
    assert!(changelog.iter().all(|r| r.key.is_some() && r.partition < PARTITIONS));
}

#[test]
fn two_instances_share_the_partitions_and_a_departure_moves_the_state() {
    let s = Scenario::new("rebalance", 48, 12);
    let mut a = s.start("a");
    a.wait_for_log("task ready", PARTITIONS as usize);
    s.publish(|i| i % 3 == 0);
    s.broker.wait_fully_committed(&s.app, "events");
    let mut b = s.start("b");
    b.wait_for_log("task ready", 1);
    s.publish(|i| i % 3 == 1);
    s.broker.wait_fully_committed(&s.app, "events");
    assert!(a.log().contains("task closed"), "a gave partitions to b:\n{}", a.log());
    // b leaves: a takes everything back, restoring b's changes from the changelog.
    assert!(b.terminate().success(), "{}", b.log());
    s.publish(|i| i % 3 == 2);
    s.assert_exactly_expected();
    let moved_back = task_ready_lines(&a.log()).iter().skip(PARTITIONS as usize).map(|l| replayed_in(l)).sum::<u64>();
    assert!(moved_back > 0, "partitions returning to a replay b's changes:\n{}", a.log());
    assert!(a.terminate().success());
}

#[test]
fn restart_uses_local_state_and_lost_or_stale_state_is_rebuilt() {
    let s = Scenario::new("restart", 40, 13);
    let quarter = |q: usize| move |i: usize| i % 4 == q;
    let mut p = s.start("a");
    s.publish(quarter(0));
    s.broker.wait_fully_committed(&s.app, "events");
    assert!(p.terminate().success());
    let snapshot = s.dir.path().join("snapshot");
    copy_dir(&s.state_dir("a"), &snapshot);

    // 1. A clean restart finds its state on disk: nothing to replay.
    let mut p = s.start("a");
    p.wait_for_log("task ready", PARTITIONS as usize);
    let replayed: u64 = task_ready_lines(&p.log()).iter().map(|l| replayed_in(l)).sum();
    assert_eq!(replayed, 0, "local state is current after a clean stop:\n{}", p.log());
    s.publish(quarter(1));
    s.broker.wait_fully_committed(&s.app, "events");
    assert!(p.terminate().success());

    // 2. State deleted: rebuilt from the changelog.
    std::fs::remove_dir_all(s.state_dir("a")).unwrap();
    let mut p = s.start("a");
    p.wait_for_log("task ready", PARTITIONS as usize);
    let replayed: u64 = task_ready_lines(&p.log()).iter().map(|l| replayed_in(l)).sum();
    assert!(replayed > 0, "deleted state is restored from the changelog:\n{}", p.log());
    s.publish(quarter(2));
    s.broker.wait_fully_committed(&s.app, "events");
    assert!(p.terminate().success());

    // 3. Stale state (an old copy, behind the committed offsets): brought forward.
    std::fs::remove_dir_all(s.state_dir("a")).unwrap();
    copy_dir(&snapshot, &s.state_dir("a"));
    let mut p = s.start("a");
    p.wait_for_log("task ready", PARTITIONS as usize);
    let replayed: u64 = task_ready_lines(&p.log()).iter().map(|l| replayed_in(l)).sum();
    assert!(replayed > 0, "stale state replays what it missed:\n{}", p.log());
    s.publish(quarter(3));
    s.assert_exactly_expected();
    assert!(p.terminate().success());
}

#[test]
fn kill_9_mid_stream_loses_and_duplicates_nothing() {
    let mut s = Scenario::new("kill9", 60, 14);
    // Small batches: many transactions, so the kill lands between two of them mid-stream.
    s.set("METRONOME_STREAM__MAX_BATCH_RECORDS", "8");
    s.publish(|_| true);
    let mut p = s.start("a");
    // Wait until it is part-way: some transactions committed, some work left.
    p.wait_for_log("task ready", PARTITIONS as usize);
    let total: i64 = s.broker.end_offsets("events").values().sum();
    wait_committed_at_least(&s, total / 4);
    p.kill_9();
    let committed_at_kill = committed_total(&s);
    assert!(committed_at_kill < total, "killed before the end ({committed_at_kill} of {total})");
    // The replacement joins at once, while the dead member's session is still open: the group
    // coordinator waits out that session and then hands it every partition.
    let mut p = s.start("a");
    s.assert_exactly_expected();
    assert!(p.terminate().success());
}

#[test]
fn the_death_of_a_partition_leader_loses_and_duplicates_nothing() {
    // Three nodes, every topic and the transaction log replicated three times, two in sync
    // required: one node may die under the processor's transactions.
    let mut s = Scenario::on(Broker::start_cluster(), "failover", 40, 16);
    s.set("METRONOME_STREAM__MAX_BATCH_RECORDS", "8");
    // The changelog the processor creates, replicated as the harness's topics are.
    s.set("METRONOME_STREAM__REPLICATION_FACTOR", "3");
    let mut p = s.start("a");
    p.wait_for_log("task ready", PARTITIONS as usize);
    s.publish(|i| i % 2 == 0);
    let total: i64 = s.broker.end_offsets("events").values().sum();
    wait_committed_at_least(&s, total / 4);
    // The leader of the input's first partition, mid-stream: its partitions' leadership moves to
    // the followers in sync, and the processor's transactions go on with the two nodes left.
    let leader = s.broker.leader_of("events", 0).expect("events/0 has a leader");
    s.broker.kill_9_node(leader);
    common::wait_until("a new leader for events/0", || s.broker.leader_of("events", 0).is_some_and(|l| l != leader));
    s.publish(|i| i % 2 == 1);
    p.wait_until("all input committed with a node down", || s.broker.is_fully_committed(&s.app, "events"));
    // Back in: it catches up as a follower; the results do not change.
    s.broker.restart_node(leader);
    p.wait_until("all input committed with every node back", || s.broker.is_fully_committed(&s.app, "events"));
    s.assert_exactly_expected();
    assert!(p.terminate().success(), "{}", p.log());
}

#[test]
fn bad_records_go_to_the_dead_letter_topic_and_the_rest_flows() {
    let s = Scenario::new("dlq", 24, 15);
    let valid = metronome_core::proto::KeyEventBatch {
        user_id: "bad-user".into(),
        events: vec![metronome_core::proto::KeyEvent { event_time_us: -1, key: 30, action: 1, ..Default::default() }],
        ..Default::default()
    }
    .encode_to_vec();
    let bad = vec![
        (b"garbage".to_vec(), vec![0xff, 0xfe, 0x01, 0x02]),
        (b"bad-user".to_vec(), valid.clone()),
        (b"someone-else".to_vec(), valid),
    ];
    s.publish(|i| i % 2 == 0);
    s.broker.produce("events", &bad);
    s.publish(|i| i % 2 == 1);
    let mut p = s.start("a");
    s.assert_exactly_expected();
    let dlq = s.broker.read_all("dlq");
    assert_eq!(dlq.len(), 3, "each bad record once");
    let class = |r: &common::broker::Record| {
        let h = r.headers.iter().find(|(k, _)| k == dlq_headers::ERROR_CLASS).expect("class header");
        String::from_utf8(h.1.clone()).unwrap()
    };
    let classes: BTreeSet<String> = dlq.iter().map(class).collect();
    assert_eq!(classes, BTreeSet::from(["decode".into(), "absurd_timestamp".into(), "key_mismatch".into()]));
    let payloads: BTreeSet<Vec<u8>> = dlq.iter().map(|r| r.payload.clone().unwrap()).collect();
    let sent: BTreeSet<Vec<u8>> = bad.iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(payloads, sent, "dead letters keep the record unchanged");
    assert!(p.terminate().success());
    let log = p.log();
    assert_eq!(log.matches("dead-letter").count(), 3, "{log}");
    assert!(!log.contains("garbage") && !log.contains("bad-user"), "no record content in logs:\n{log}");
}

#[test]
fn one_event_stamped_a_year_ahead_blinds_no_one() {
    let s = Scenario::new("clock", 12, 16);
    // The player sets their clock a year ahead for one event, after each user's first record:
    // unbounded, the user's watermark would sit there and every later event be late.
    let now_us = wall_clock_us();
    let year_ahead = now_us + 365 * 86_400 * 1_000_000;
    let mut records = Vec::new();
    for (user, events) in &s.users {
        let stray = metronome_core::proto::KeyEventBatch {
            user_id: user.clone(),
            events: vec![metronome_core::proto::KeyEvent {
                event_time_us: year_ahead,
                key: 30,
                action: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        for (i, payload) in batches_for_user(user, "s", events, 40).into_iter().enumerate() {
            records.push((user.as_bytes().to_vec(), payload));
            if i == 0 {
                records.push((user.as_bytes().to_vec(), stray.clone()));
            }
        }
    }
    s.broker.produce("events", &records);
    let mut p = s.start("a");
    s.assert_exactly_expected();
    assert!(s.broker.read_all("dlq").is_empty(), "the stray events are dropped and counted, not dead-lettered");
    assert!(p.terminate().success());
    let log = p.log();
    assert!(log.contains("event times too far from the reference clock"), "{log}");
}

/// The processor's clock, as microseconds since the epoch.
fn wall_clock_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

/// A fixed-interval macro of `presses` presses from `from_us`: 100 ms apart, 20 ms holds, over
/// three keys.
fn fixed_interval_macro(from_us: i64, presses: usize) -> Vec<metronome_core::event::KeyEvent> {
    use metronome_core::event::{KeyAction, KeyEvent};
    let mut events = Vec::with_capacity(2 * presses);
    for i in 0..presses as i64 {
        let (down, key) = (from_us + i * 100_000, 2 + (i % 3) as u32);
        events.push(KeyEvent::new(down, key, KeyAction::Down));
        events.push(KeyEvent::new(down + 20_000, key, KeyAction::Up));
    }
    events
}

#[test]
fn a_macro_user_who_steps_the_clock_a_year_either_way_is_still_caught() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // The processor creates the input topic with the broker's clock on its records.
    let env = env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", "app-step"),
        ("METRONOME_STREAM__INPUT_TOPIC", "events"),
        ("METRONOME_STREAM__ALERTS_TOPIC", "alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "dlq"),
        ("METRONOME_STREAM__COMMIT_INTERVAL_MS", "50"),
        ("METRONOME_STREAM__TOPIC_PARTITIONS", "2"),
        ("METRONOME_STREAM__INPUT_LOG_APPEND_TIME", "true"),
    ]);
    let mut p = ProcessorProc::start(&broker, &dir.path().join("state"), "a", &env, dir.path());
    p.wait_for_log("task ready", 1);
    let now_us = wall_clock_us();
    let year = 365 * 86_400 * 1_000_000i64;
    let mut records = Vec::new();
    for (user, step) in [("m-ahead", year), ("m-behind", -year)] {
        // A fixed-interval macro from now, its clock stepped after its first record (40
        // events); the rest goes out in one record, shifted whole to the broker's append time.
        // Sent at once, it overlaps the first record there and loses its first half as late:
        // the rest (about 70 presses) is still a macro.
        let mut events = fixed_interval_macro(now_us, 200);
        for e in &mut events[40..] {
            e.time_us += step;
        }
        records.push((user.as_bytes().to_vec(), encode_batch(user, "", "s", &events[..40], Some(1))));
        records.push((user.as_bytes().to_vec(), encode_batch(user, "", "s", &events[40..], Some(41))));
    }
    broker.produce("events", &records);
    let alerts = broker.wait_for_alerts("alerts", 2);
    let users: BTreeSet<&str> = alerts.iter().map(|a| a.user_id.as_str()).collect();
    assert_eq!(users, BTreeSet::from(["m-ahead", "m-behind"]));
    assert!(broker.read_all("dlq").is_empty());
    assert!(p.terminate().success());
    let log = p.log();
    assert!(log.contains("event times too far from the reference clock"), "{log}");
}

#[test]
fn with_signatures_required_only_a_user_s_own_enrolled_key_gets_through_and_rotations_need_no_restart() {
    use metronome_core::signing::SigningKey;
    use metronome_core::wire::batch_message;
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = |user: &str| format!("{:0<64}", hex_of(user));
    let keys = dir.path().join("device-keys.toml");
    // Each enrolled user's key, `{user}-kbd` unless rotated: written whole, then moved in place
    // (as the kubelet updates a mounted Secret).
    let write_keys = |enrolled: &[(&str, &str)]| {
        let mut file = String::new();
        for (user, key_id) in enrolled {
            file.push_str(&format!(
                "[[key]]\nkey_id = \"{key_id}\"\nuser_id = \"{user}\"\ndevice_id = \"kbd\"\nsecret_hex = \"{}\"\n",
                secret(user)
            ));
        }
        let next = dir.path().join("device-keys.next");
        std::fs::write(&next, file).unwrap();
        std::fs::rename(&next, &keys).unwrap();
    };
    write_keys(&[("m-signed", "m-signed-kbd"), ("m-tampered", "m-tampered-kbd")]);
    let env = env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", "app-signed"),
        ("METRONOME_STREAM__INPUT_TOPIC", "events"),
        ("METRONOME_STREAM__ALERTS_TOPIC", "alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "dlq"),
        ("METRONOME_STREAM__TOPIC_PARTITIONS", "2"),
        ("METRONOME_STREAM__DEVICE_KEYS_FILE", keys.to_str().unwrap()),
        ("METRONOME_STREAM__REQUIRE_SIGNED", "true"),
        ("METRONOME_MODEL__RELOAD_CHECK_S", "1"),
    ]);
    let mut p = ProcessorProc::start(&broker, &dir.path().join("state"), "a", &env, dir.path());
    p.wait_for_log("task ready", 1);
    let now_us = wall_clock_us();
    let events = fixed_interval_macro(now_us, 200);
    let key_of = |user: &str| SigningKey::new(&format!("{user}-kbd"), &hex::decode(secret(user)).unwrap());
    // The same fixed-interval macro from four users: each would alert if it got through.
    // - m-signed signs with its own key;
    // - m-forger signs with m-signed's valid key (a player's enrolment speaking for another id);
    // - m-unsigned does not sign;
    // - m-tampered signs with its own key, then changes an event time.
    let mut records = Vec::new();
    for user in ["m-signed", "m-forger", "m-unsigned", "m-tampered"] {
        for (i, chunk) in events.chunks(80).enumerate() {
            let mut batch = batch_message(user, "kbd", "s", chunk, Some(1 + 80 * i as u64));
            match user {
                "m-signed" => key_of("m-signed").sign(&mut batch),
                "m-forger" => key_of("m-signed").sign(&mut batch),
                "m-tampered" => {
                    key_of("m-tampered").sign(&mut batch);
                    batch.events[3].event_time_us += 1_000;
                }
                _ => {}
            }
            records.push((user.as_bytes().to_vec(), batch.encode_to_vec()));
        }
    }
    broker.produce("events", &records);
    p.wait_until("every record consumed", || broker.is_fully_committed("app-signed", "events"));
    let alerted: BTreeSet<String> = broker.alerts("alerts").into_iter().map(|a| a.user_id).collect();
    assert_eq!(alerted, BTreeSet::from(["m-signed".to_owned()]));
    let mut refused: BTreeSet<(String, String)> = BTreeSet::new();
    for r in broker.read_all("dlq") {
        let class = r.headers.iter().find(|(k, _)| k == dlq_headers::ERROR_CLASS).expect("class header");
        refused.insert((String::from_utf8(r.key.unwrap()).unwrap(), String::from_utf8(class.1.clone()).unwrap()));
    }
    let expected: BTreeSet<(String, String)> =
        [("m-forger", "signed_for_another_user"), ("m-unsigned", "unsigned"), ("m-tampered", "bad_signature")]
            .into_iter()
            .map(|(u, c)| (u.to_owned(), c.to_owned()))
            .collect();
    assert_eq!(refused, expected, "every refused record with its class, and nothing of m-signed");
    assert_eq!(broker.read_all("dlq").len(), 3 * events.chunks(80).count());

    // A rotation while it runs: m-signed's key replaced by a new one (the old id removed), and
    // a new enrolment, m-late. Records signed with the old key are refused from then on; the
    // new user's get through; nothing restarts.
    write_keys(&[("m-signed", "m-signed-kbd-2"), ("m-tampered", "m-tampered-kbd"), ("m-late", "m-late-kbd")]);
    p.wait_for_log("device keys reloaded", 1);
    let later = fixed_interval_macro(wall_clock_us(), 200);
    let mut records = Vec::new();
    for (user, key_id) in [("m-late", "m-late-kbd"), ("m-signed", "m-signed-kbd")] {
        let key = SigningKey::new(key_id, &hex::decode(secret(user)).unwrap());
        for (i, chunk) in later.chunks(80).enumerate() {
            let mut batch = batch_message(user, "kbd", "s2", chunk, Some(1 + 80 * i as u64));
            key.sign(&mut batch);
            records.push((user.as_bytes().to_vec(), batch.encode_to_vec()));
        }
    }
    broker.produce("events", &records);
    p.wait_until("every record consumed", || broker.is_fully_committed("app-signed", "events"));
    let alerted: BTreeSet<String> = broker.alerts("alerts").into_iter().map(|a| a.user_id).collect();
    assert_eq!(alerted, BTreeSet::from(["m-signed".to_owned(), "m-late".to_owned()]));
    let old_key_refused = broker
        .read_all("dlq")
        .into_iter()
        .filter(|r| r.key.as_deref() == Some(b"m-signed".as_slice()))
        .map(|r| r.headers.into_iter().find(|(k, _)| k == dlq_headers::ERROR_CLASS).expect("class header").1)
        .collect::<Vec<_>>();
    assert_eq!(old_key_refused, vec![b"unknown_key".to_vec(); later.chunks(80).count()]);
    assert!(p.terminate().success());
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Value of an unlabelled metric in a Prometheus text exposition.
fn metric(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the exposition"))
}

/// What a flood of new user ids may make the processor hold, at its peak: well above what it
/// needs (its clients' buffers, RocksDB's memtables and cache, the batch in hand: 341 MiB
/// measured), far below what a million open users' windows would take if nothing bounded them.
const FLOOD_RSS_BOUND: u64 = 512 << 20;

#[test]
fn a_flood_of_new_user_ids_keeps_memory_bounded_and_alerts_flowing() {
    // The million new ids on one partition, with the default cap on open users.
    const FLOOD: usize = 1_000_000;
    const MACRO_RECORDS: usize = 60;
    let cap = metronome::stream::StreamConfig::default().max_open_users_per_task;
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // One partition: the flood and the macro user share a task.
    let env = env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", "app-flood"),
        ("METRONOME_STREAM__INPUT_TOPIC", "events"),
        ("METRONOME_STREAM__ALERTS_TOPIC", "alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "dlq"),
        ("METRONOME_STREAM__TOPIC_PARTITIONS", "1"),
    ]);
    let mut p = ProcessorProc::start(&broker, &dir.path().join("state"), "a", &env, dir.path());
    p.wait_for_log("task ready", 1);
    let idle_rss = p.peak_rss();
    let now_us = wall_clock_us();
    // New ids of one press each, as a sender forging ids would, and through them a
    // fixed-interval macro user: 8 presses a record, one record every sixtieth of the flood
    // (a record a second, were the flood a minute long), closer together than the cap.
    let macro_events = fixed_interval_macro(now_us, 8 * MACRO_RECORDS);
    let mut records = Vec::with_capacity(FLOOD + MACRO_RECORDS);
    let mut macros = macro_events.chunks(16).enumerate().peekable();
    for i in 0..FLOOD {
        if let Some((k, chunk)) = macros.next_if(|_| i % (FLOOD / MACRO_RECORDS) == 0) {
            records.push((b"m1".to_vec(), encode_batch("m1", "kbd", "s", chunk, Some(1 + 16 * k as u64))));
        }
        let user = format!("flood-{i}");
        let t = now_us + (i as i64 * 60_000_000 / FLOOD as i64);
        let press = [
            metronome_core::event::KeyEvent::new(t, 30, metronome_core::event::KeyAction::Down),
            metronome_core::event::KeyEvent::new(t + 50_000, 30, metronome_core::event::KeyAction::Up),
        ];
        records.push((user.into_bytes(), encode_batch(&format!("flood-{i}"), "kbd", "s", &press, Some(1))));
    }
    let started = std::time::Instant::now();
    broker.produce("events", &records);
    let produced = started.elapsed();
    drop(records);
    // Under a minute on a quiet machine; three times the usual patience, for a loaded one.
    p.wait_until_within("the flood consumed and committed", 3 * common::broker::PATIENCE, || {
        broker.is_fully_committed("app-flood", "events")
    });
    let took = started.elapsed();
    let alerts = broker.wait_for_alerts("alerts", 1);
    assert!(alerts.iter().all(|a| a.user_id == "m1"), "only the macro user alerts");
    let peak = p.peak_rss();
    let addr = p.http_addr();
    let (_, exposition) = common::http_get(&addr, "/metrics", None);
    let evicted = metric(&exposition, "metronome_users_evicted_total");
    eprintln!(
        "flood of {FLOOD} ids: produced in {:.1} s, processed by {:.1} s, peak RSS {} MiB (idle {} MiB), \
         {evicted} users closed early",
        produced.as_secs_f64(),
        took.as_secs_f64(),
        peak >> 20,
        idle_rss >> 20
    );
    assert!(peak < FLOOD_RSS_BOUND, "peak RSS {} MiB", peak >> 20);
    // The cap held, the flood's windows closed early (or as idle, where the processor caught up
    // with a producer slowed by a loaded machine).
    assert!(metric(&exposition, "metronome_open_windows") <= cap as f64);
    assert!(evicted >= (FLOOD / 2) as f64, "{evicted} evicted");
    assert!(broker.read_all("dlq").is_empty());
    assert!(p.terminate().success());
}

#[test]
fn records_resent_after_an_agent_restart_or_replayed_change_nothing() {
    let s = Scenario::new("copies", 12, 21);
    let mut records = Vec::new();
    let mut copied_events = 0;
    for (user, events) in &s.users {
        let key = user.as_bytes().to_vec();
        // Numbered as the agent numbers them: per session, from 1.
        let numbered: Vec<(usize, Vec<u8>)> = events
            .chunks(40)
            .enumerate()
            .map(|(i, chunk)| (chunk.len(), encode_batch(user, "kbd-1", "run-1", chunk, Some(1 + 40 * i as u64))))
            .collect();
        for (i, (_, payload)) in numbered.iter().enumerate() {
            records.push((key.clone(), payload.clone()));
            // An agent restart after every fifth record: the two whose acknowledgements it
            // had not seen go again, at once, so their last events are still within the
            // reordering grace and, undeduplicated, would be counted twice.
            if i % 5 == 4 {
                for (n, again) in &numbered[i - 1..=i] {
                    records.push((key.clone(), again.clone()));
                    copied_events += n;
                }
            }
        }
        // And a replay of the user's first records, later.
        for (n, again) in &numbered[..3.min(numbered.len())] {
            records.push((key.clone(), again.clone()));
            copied_events += n;
        }
    }
    s.broker.produce("events", &records);
    let mut p = s.start("a");
    s.assert_exactly_expected();
    assert!(s.broker.read_all("dlq").is_empty());
    assert!(p.terminate().success());
    let log = p.log();
    let dropped: usize = log
        .lines()
        .filter(|l| l.contains("copies of delivered events dropped"))
        .map(|l| l.split("events=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(dropped, copied_events, "every copied event, and only those, dropped as a duplicate");
}

fn committed_total(s: &Scenario) -> i64 {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = s.broker.config().set("group.id", &s.app).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition("events", p);
    }
    let Some(committed) = common::broker::committed_offsets(&consumer, tpl) else {
        return 0;
    };
    committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

fn wait_committed_at_least(s: &Scenario, n: i64) {
    let deadline = std::time::Instant::now() + common::broker::PATIENCE;
    while committed_total(s) < n {
        assert!(std::time::Instant::now() < deadline, "the processor never committed {n} records");
        std::thread::sleep(std::time::Duration::from_millis(20)); // polling interval of a condition
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_caught_up_partition_closes_its_idle_users_while_another_is_still_catching_up() {
    let broker = Broker::start();
    broker.create_topics(&["events", "alerts", "dlq"], 2);
    let dir = tempfile::tempdir().unwrap();
    let env = env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", "app-idle"),
        ("METRONOME_STREAM__INPUT_TOPIC", "events"),
        ("METRONOME_STREAM__ALERTS_TOPIC", "alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "dlq"),
        ("METRONOME_STREAM__COMMIT_INTERVAL_MS", "50"),
        ("METRONOME_STREAM__MAX_BATCH_RECORDS", "20"),
        ("METRONOME_STREAM__TOPIC_PARTITIONS", "2"),
        ("METRONOME_DETECTOR__WINDOW__IDLE_TIMEOUT_MS", "1000"),
    ]);
    // One user on each partition.
    let on = |partition: i32| {
        (0..)
            .map(|i| format!("user-{i}"))
            .find(|u| metronome::stream::query::partition_for(u.as_bytes(), 2) == partition)
            .unwrap()
    };
    let (quiet, busy) = (on(0), on(1));
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
    let typist = metronome_core::humanmodel::Typist::random(&mut rng);
    // The busy user's backlog: hours of typing, the last of it a minute ago.
    let backlog = typist.type_text(0, 150_000, &mut rng);
    let shift = now_us - 60_000_000 - backlog.last().unwrap().time_us;
    let backlog: Vec<_> =
        backlog.into_iter().map(|e| metronome_core::event::KeyEvent { time_us: e.time_us + shift, ..e }).collect();
    let quiet_events = typist.type_text(now_us - 30_000_000, 40, &mut rng);
    let mut records: Vec<(Vec<u8>, Vec<u8>)> =
        batches_for_user(&quiet, "s", &quiet_events, 40).into_iter().map(|p| (quiet.as_bytes().to_vec(), p)).collect();
    records.extend(batches_for_user(&busy, "s", &backlog, 40).into_iter().map(|p| (busy.as_bytes().to_vec(), p)));
    broker.produce("events", &records);
    let busy_end = broker.end_offsets("events")[&1];

    let mut processor = ProcessorProc::start(&broker, &dir.path().join("state"), "p", &env, dir.path());
    let addr = processor.http_addr();
    // A user's open window, in presses; `None` while the processor cannot answer for them
    // (starting, its partition not yet assigned, or busy past the query's deadline).
    let window_presses = |user: &str| {
        let (status, body) = common::http_get(&addr, &format!("/api/users/{user}"), None);
        if status == 503 || status == 421 {
            return None;
        }
        assert_eq!(status, 200, "{body}");
        let view: Value = serde_json::from_str(&body).unwrap();
        Some(view["state"]["window_presses"].as_u64().unwrap_or(0))
    };
    common::wait_until("the quiet user's presses to open a window", || window_presses(&quiet).is_some_and(|n| n > 0));
    common::wait_until("the quiet user's window to close as idle", || window_presses(&quiet) == Some(0));
    let busy_done = broker.committed_offset("app-idle", "events", 1);
    eprintln!("the quiet user closed with the busy partition committed to {busy_done} of {busy_end}");
    assert!(
        busy_done < busy_end,
        "the busy partition was consumed ({busy_done} of {busy_end}) before the quiet one closed its idle user"
    );
    assert_ne!(window_presses(&busy), Some(0), "the busy user's window stays open");
    broker.wait_fully_committed("app-idle", "events");
    assert!(processor.terminate().success());
}
