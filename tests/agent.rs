//! `metronome agent` against Apache Kafka (started per test): a replayed
//! keylog goes through the agent's whole path (pseudonyms, cutting, spool, idempotent producer)
//! to the processor and an alert; a broker that is down at first gets everything, in order and
//! once, when it comes up; pseudonyms hold within a session and change across sessions; and no
//! raw key code appears in any record or log line (canary keys).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::broker::{env_vars, free_port, Broker, ProcessorProc};
use metronome::agent::pseudonym::PSEUDONYM_MARK;
use metronome::proto;
use prost::Message;

/// Key codes no simulated or real data here uses, so any trace of them is a leak.
const CANARY_KEYS: [u32; 3] = [753, 754, 755];

/// A macro of `presses` presses on the canary keys: 80 ms apart, 30 ms holds.
fn canary_macro(dir: &Path, presses: usize) -> PathBuf {
    let path = dir.join("canary.csv");
    let mut text = String::from("user_id,session_id,event_time_us,key_code,action\n");
    for i in 0..presses {
        let t = 1_700_000_000_000_000 + i as i64 * 80_000;
        let key = CANARY_KEYS[i % CANARY_KEYS.len()];
        text.push_str(&format!("file-user,s,{t},{key},down\nfile-user,s,{},{key},up\n", t + 30_000));
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn agent_command(bootstrap: &str, keylog: &Path, spool: &Path, user: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metronome"));
    for (k, _) in std::env::vars() {
        if k.starts_with("METRONOME_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["agent", "--user", user, "--topic", "events", "--replay-speed", "0", "--bootstrap-servers", bootstrap])
        .arg("--replay")
        .arg(keylog)
        .arg("--spool")
        .arg(spool)
        // Everything the agent can say, so the canary check reads it all.
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null());
    cmd
}

fn run_agent(bootstrap: &str, keylog: &Path, spool: &Path, user: &str) -> Output {
    let out = agent_command(bootstrap, keylog, spool, user).output().unwrap();
    assert!(out.status.success(), "agent failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Every `KeyEventBatch` on `events`, in offset order per partition.
fn batches(broker: &Broker) -> Vec<(Vec<u8>, proto::KeyEventBatch)> {
    broker
        .read_all("events")
        .into_iter()
        .map(|r| (r.key.unwrap(), proto::KeyEventBatch::decode(r.payload.as_deref().unwrap()).unwrap()))
        .collect()
}

/// The file's raw keys and actions, in order.
fn file_keys(keylog: &Path) -> Vec<(u32, i32)> {
    metronome::keylog::KeylogReader::open(keylog)
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            let action = match r.event.action {
                metronome::event::KeyAction::Down => proto::KeyAction::Down,
                metronome::event::KeyAction::Up => proto::KeyAction::Up,
                metronome::event::KeyAction::Repeat => proto::KeyAction::Repeat,
            };
            (r.event.key, action as i32)
        })
        .collect()
}

/// Checks one session's records against the file: every event once, in order, with a gapless
/// sequence, keys replaced by a consistent one-to-one pseudonym. Returns the pseudonyms used.
fn assert_one_session(records: &[&proto::KeyEventBatch], keylog: &Path) -> BTreeSet<u32> {
    let events: Vec<&proto::KeyEvent> = records.iter().flat_map(|b| b.events.iter()).collect();
    let expected = file_keys(keylog);
    assert_eq!(events.len(), expected.len(), "every captured event arrives once");
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=expected.len() as u64).collect::<Vec<_>>(), "from 1, in order, no gap, no repeat");
    let mut mapping: HashMap<u32, u32> = HashMap::new();
    for (e, (raw, action)) in events.iter().zip(&expected) {
        assert_eq!(e.action, *action);
        assert!(e.key & PSEUDONYM_MARK != 0, "a raw key code left the agent");
        assert!(!CANARY_KEYS.contains(&e.key));
        let known = *mapping.entry(*raw).or_insert(e.key);
        assert_eq!(known, e.key, "a key keeps its pseudonym within the session");
    }
    let pseudonyms: BTreeSet<u32> = mapping.values().copied().collect();
    assert_eq!(pseudonyms.len(), mapping.len(), "distinct keys keep distinct pseudonyms");
    pseudonyms
}

/// No whole number in `text` is a canary key code.
fn assert_no_canary(what: &str, text: &str) {
    for token in text.split(|c: char| !c.is_ascii_alphanumeric()) {
        if let Ok(n) = token.parse::<u32>() {
            assert!(!CANARY_KEYS.contains(&n), "{what} shows a raw key code ({n}):\n{text}");
        }
    }
}

#[test]
fn a_replayed_macro_goes_through_the_agent_to_an_alert_without_raw_keys() {
    let broker = Broker::start();
    broker.create_topics(&["events", "alerts", "dlq"], 4);
    let dir = tempfile::tempdir().unwrap();
    let env = env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", "app-agent"),
        ("METRONOME_STREAM__INPUT_TOPIC", "events"),
        ("METRONOME_STREAM__ALERTS_TOPIC", "alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "dlq"),
        ("METRONOME_STREAM__COMMIT_INTERVAL_MS", "50"),
        ("METRONOME_STREAM__TOPIC_PARTITIONS", "4"),
        ("METRONOME_KAFKA__SESSION_TIMEOUT_MS", "6000"),
    ]);
    let mut processor = ProcessorProc::start(&broker, &dir.path().join("state"), "p", &env, dir.path());
    let keylog = canary_macro(dir.path(), 150);

    let out = run_agent(&broker.bootstrap, &keylog, &dir.path().join("spool"), "canary-user");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("captured 300 events") && stderr.contains("0 left in the spool"), "{stderr}");

    let alerts = broker.wait_for_alerts("alerts", 1);
    assert!(alerts.iter().all(|a| a.user_id == "canary-user"), "{alerts:?}");
    broker.wait_fully_committed("app-agent", "events");

    let records = batches(&broker);
    assert!(records.iter().all(|(key, b)| key == b"canary-user" && b.user_id == "canary-user"));
    assert!(records.iter().all(|(_, b)| b.device_id == "replay" && !b.session_id.is_empty()));
    assert!(records.iter().all(|(_, b)| b.events.len() <= 50), "records are cut at 50 events");
    assert_one_session(&records.iter().map(|(_, b)| b).collect::<Vec<_>>(), &keylog);
    // The raw bytes too: no canary code as a protobuf varint field of an event.
    for r in broker.read_all("events") {
        let payload = r.payload.unwrap();
        for code in CANARY_KEYS {
            let mut field = vec![0x30]; // field 6 (key), varint
            prost::encoding::encode_varint(u64::from(code), &mut field);
            assert!(!payload.windows(field.len()).any(|w| w == field.as_slice()), "raw key {code} in a record");
        }
    }
    assert_no_canary("the agent's log", &stderr);
    assert!(processor.terminate().success());
    assert_no_canary("the processor's log", &processor.log());
    for topic in ["alerts", "dlq"] {
        for r in broker.read_all(topic) {
            let text = format!("{:?} {:?}", r.headers, r.payload.map(|p| proto::Alert::decode(p.as_slice())));
            assert_no_canary(topic, &text);
        }
    }
}

#[test]
fn records_spooled_while_the_broker_is_down_arrive_once_and_in_order_when_it_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let keylog = canary_macro(dir.path(), 400);
    let port = free_port();
    let log_path = dir.path().join("agent.log");
    let mut agent: Child = agent_command(&format!("127.0.0.1:{port}"), &keylog, &dir.path().join("spool"), "u-spool")
        .env("METRONOME_AGENT__DRAIN_TIMEOUT_S", "300")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    // The whole replay is captured and spooled while nothing listens on the port.
    common::wait_until("the agent to finish capturing", || {
        std::fs::read_to_string(&log_path).unwrap_or_default().contains("capture finished")
    });
    let spool_bytes = std::fs::metadata(dir.path().join("spool")).unwrap().len();
    assert!(spool_bytes > 4096, "the records wait in the spool file ({spool_bytes} bytes)");
    assert!(agent.try_wait().unwrap().is_none(), "the agent waits for the broker");

    let broker = Broker::start_on(port);
    broker.create_topics(&["events"], 4);
    let status = {
        let mut status = None;
        common::wait_until("the agent to drain its spool and exit", || {
            status = agent.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    };
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("captured 800 events") && log.contains("0 left in the spool"), "{log}");
    assert!(log.contains("0 refused by a full spool"), "{log}");
    let records = batches(&broker);
    let delivered: u64 = log
        .split("records; ")
        .nth(1)
        .and_then(|rest| rest.split(" delivered").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no delivered count in {log}"));
    assert_eq!(records.len() as u64, delivered, "each record once");
    assert_one_session(&records.iter().map(|(_, b)| b).collect::<Vec<_>>(), &keylog);
}

#[test]
fn a_full_spool_refuses_records_and_says_how_many() {
    let dir = tempfile::tempdir().unwrap();
    let keylog = canary_macro(dir.path(), 400);
    let port = free_port(); // nothing listens: everything stays in the spool
    let out = agent_command(&format!("127.0.0.1:{port}"), &keylog, &dir.path().join("spool"), "u-full")
        .env("METRONOME_AGENT__SPOOL_MAX_BYTES", "8192")
        .env("METRONOME_AGENT__DRAIN_TIMEOUT_S", "1")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let refused: u64 = stderr
        .split(" refused by a full spool")
        .next()
        .and_then(|head| head.rsplit(", ").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refused count in {stderr}"));
    assert!(refused > 0, "{stderr}");
    assert!(stderr.contains("spool full: records refused"), "{stderr}");
    assert!(stderr.contains("0 delivered"), "{stderr}");
    // What was kept is sent by the next run, first, when the broker is there.
    let broker = Broker::start_on(port);
    broker.create_topics(&["events"], 1);
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, "user_id,session_id,event_time_us,key_code,action\n").unwrap();
    let out = run_agent(&broker.bootstrap, &empty, &dir.path().join("spool"), "u-full");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0 left in the spool"), "{stderr}");
    let records = batches(&broker);
    assert!(!records.is_empty());
    let seqs: Vec<u64> = records.iter().flat_map(|(_, b)| b.events.iter().map(|e| e.seq)).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "the oldest records were kept, in order");
}

#[test]
fn pseudonyms_hold_within_a_session_and_change_across_sessions() {
    let broker = Broker::start();
    broker.create_topics(&["events"], 1);
    let dir = tempfile::tempdir().unwrap();
    let keylog = canary_macro(dir.path(), 60);
    run_agent(&broker.bootstrap, &keylog, &dir.path().join("spool"), "u-sessions");
    run_agent(&broker.bootstrap, &keylog, &dir.path().join("spool"), "u-sessions");
    let records = batches(&broker);
    let mut sessions: BTreeMap<String, Vec<&proto::KeyEventBatch>> = BTreeMap::new();
    for (_, b) in &records {
        sessions.entry(b.session_id.clone()).or_default().push(b);
    }
    assert_eq!(sessions.len(), 2, "one session per agent run");
    let used: Vec<BTreeSet<u32>> = sessions.values().map(|s| assert_one_session(s, &keylog)).collect();
    assert_eq!(used[0].len(), CANARY_KEYS.len());
    assert!(used[0].is_disjoint(&used[1]), "the same keys get unrelated pseudonyms in another session");
}
