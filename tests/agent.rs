//! `metronome agent` against Apache Kafka (started per test): a replayed
//! keylog goes through the agent's whole path (pseudonyms, cutting, spool, idempotent producer)
//! to the processor and an alert; a broker that is down at first gets everything, in order and
//! once, when it comes up; key labels are short-lived when configured so, and unrelated across
//! sessions; a frequency-and-digraph attack on the records of a typed passage gets under 10 %
//! of its letters back from the default 16-press labels and reads one label per key per
//! session; and no
//! raw key code or canary timing appears in any record, log line, metric, dead-letter header,
//! API answer or PostgreSQL row.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::broker::{env_vars, free_port, Broker, ProcessorProc};
use common::postgres::TempDb;
use common::text_attack::{self, LanguageModel};
use metronome::agent::labels::{LABEL_MARK, SHORT_LIFETIME};
use metronome_core::proto;
use prost::Message;

/// Key codes no simulated or real data here uses, so any trace of them is a leak.
const CANARY_KEYS: [u32; 3] = [753, 754, 755];

/// An inter-key interval and a hold, microseconds, that one press in seven of the canary macro
/// has (the others: 80 ms and 30 ms, so no median or mode of a window is either).
const CANARY_INTERVAL_US: i64 = 83_417;
const CANARY_HOLD_US: i64 = 31_729;

/// A macro of `presses` presses on the canary keys: 80 ms apart, 30 ms holds, every seventh
/// press after the canary interval and held for the canary hold.
fn canary_macro(dir: &Path, presses: usize) -> PathBuf {
    let path = dir.join("canary.csv");
    let mut text = String::from("user_id,session_id,event_time_us,key_code,action\n");
    let mut t = 1_700_000_000_000_000;
    for i in 0..presses {
        let canary = i % 7 == 6;
        t += if canary { CANARY_INTERVAL_US } else { 80_000 };
        let key = CANARY_KEYS[i % CANARY_KEYS.len()];
        let hold = if canary { CANARY_HOLD_US } else { 30_000 };
        text.push_str(&format!("file-user,s,{t},{key},down\nfile-user,s,{},{key},up\n", t + hold));
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

/// The agent as configured by default (key labels of `SHORT_LIFETIME` presses).
fn run_agent(bootstrap: &str, keylog: &Path, spool: &Path, user: &str) -> Output {
    run_agent_with_labels(bootstrap, keylog, spool, user, None)
}

/// The agent with key labels of `lifetime` presses (0: one per key per session), or the
/// default's.
fn run_agent_with_labels(bootstrap: &str, keylog: &Path, spool: &Path, user: &str, lifetime: Option<u32>) -> Output {
    let mut cmd = agent_command(bootstrap, keylog, spool, user);
    if let Some(lifetime) = lifetime {
        cmd.env("METRONOME_AGENT__KEY_LABEL_PRESSES", lifetime.to_string());
    }
    let out = cmd.output().unwrap();
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
    metronome_core::keylog::KeylogReader::open(keylog)
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            let action = match r.event.action {
                metronome_core::event::KeyAction::Down => proto::KeyAction::Down,
                metronome_core::event::KeyAction::Up => proto::KeyAction::Up,
                metronome_core::event::KeyAction::Repeat => proto::KeyAction::Repeat,
            };
            (r.event.key, action as i32)
        })
        .collect()
}

/// Checks one session's records against the file: every event once, in order, with a gapless
/// sequence, keys replaced by labels of `lifetime` presses (an up carries its down's label, a
/// label stands for one key, and lives fewer than `lifetime` presses; 0: one label per key for
/// the session). Returns the labels used.
fn assert_one_session(records: &[&proto::KeyEventBatch], keylog: &Path, lifetime: u32) -> BTreeSet<u32> {
    let events: Vec<&proto::KeyEvent> = records.iter().flat_map(|b| b.events.iter()).collect();
    let expected = file_keys(keylog);
    assert_eq!(events.len(), expected.len(), "every captured event arrives once");
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=expected.len() as u64).collect::<Vec<_>>(), "from 1, in order, no gap, no repeat");
    let mut held: HashMap<u32, u32> = HashMap::new(); // raw key -> label of its press
    let mut lives: HashMap<u32, (u32, usize, usize)> = HashMap::new(); // label -> key, first, last press
    let mut presses = 0;
    for (e, (raw, action)) in events.iter().zip(&expected) {
        assert_eq!(e.action, *action);
        assert!(e.key & LABEL_MARK != 0, "a raw key code left the agent");
        assert!(!CANARY_KEYS.contains(&e.key));
        if *action == proto::KeyAction::Down as i32 {
            presses += 1;
            held.insert(*raw, e.key);
            let life = lives.entry(e.key).or_insert((*raw, presses, presses));
            assert_eq!(life.0, *raw, "a label stands for one key");
            life.2 = presses;
        } else {
            assert_eq!(held.get(raw), Some(&e.key), "an up carries its down's label");
        }
    }
    if lifetime == 0 {
        let keys: BTreeSet<u32> = lives.values().map(|life| life.0).collect();
        assert_eq!(keys.len(), lives.len(), "one label per key for the session");
    } else {
        let longest = lives.values().map(|(_, first, last)| last - first).max().unwrap_or(0);
        assert!(longest < lifetime as usize, "a label lived {longest} presses");
    }
    lives.keys().copied().collect()
}

/// A canary in `text`: a whole number that is a canary key code, or any number that is the
/// canary interval or hold in microseconds, milliseconds or seconds.
fn canary_in(text: &str) -> Option<String> {
    let key = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .find(|token| token.parse::<u32>().is_ok_and(|n| CANARY_KEYS.contains(&n)));
    let timing = text.split(|c: char| !(c.is_ascii_digit() || c == '.')).find(|token| {
        let Ok(x) = token.trim_matches('.').parse::<f64>() else { return false };
        [CANARY_INTERVAL_US, CANARY_HOLD_US]
            .iter()
            .map(|&us| us as f64)
            .any(|us| x == us || (x - us / 1e3).abs() < 5e-4 || (x - us / 1e6).abs() < 5e-7)
    });
    key.or(timing).map(str::to_owned)
}

fn assert_no_canary(what: &str, text: &str) {
    if let Some(canary) = canary_in(text) {
        panic!("{what} shows a canary ({canary}):\n{text}");
    }
}

#[test]
fn a_replayed_macro_goes_through_the_agent_to_an_alert_without_raw_keys_or_timings_anywhere() {
    const TOKEN: &str = "canary-t0ken";
    let broker = Broker::start();
    broker.create_topics(&["events", "alerts", "dlq"], 4);
    let db = TempDb::create();
    let dir = tempfile::tempdir().unwrap();
    let env = env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", "app-agent"),
        ("METRONOME_STREAM__INPUT_TOPIC", "events"),
        ("METRONOME_STREAM__ALERTS_TOPIC", "alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "dlq"),
        ("METRONOME_STREAM__COMMIT_INTERVAL_MS", "50"),
        ("METRONOME_STREAM__TOPIC_PARTITIONS", "4"),
        ("METRONOME_KAFKA__SESSION_TIMEOUT_MS", "6000"),
        ("METRONOME_POSTGRES__SINK_IN_PROCESS", "true"),
        ("METRONOME_POSTGRES__URL", &db.url("sslmode=disable")),
        ("METRONOME_HTTP__BEARER_TOKEN", TOKEN),
        ("RUST_LOG", "debug"),
    ]);
    let mut processor = ProcessorProc::start(&broker, &dir.path().join("state"), "p", &env, dir.path());
    let keylog = canary_macro(dir.path(), 150);

    let out = run_agent(&broker.bootstrap, &keylog, &dir.path().join("spool"), "canary-user");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("captured 300 events") && stderr.contains("0 left in the spool"), "{stderr}");
    let records = batches(&broker);
    assert!(records.iter().all(|(key, b)| key == b"canary-user" && b.user_id == "canary-user"));
    assert!(records.iter().all(|(_, b)| b.device_id == "replay" && !b.session_id.is_empty()));
    assert!(records.iter().all(|(_, b)| b.events.len() <= 50), "records are cut at 50 events");
    assert_one_session(&records.iter().map(|(_, b)| b).collect::<Vec<_>>(), &keylog, SHORT_LIFETIME);
    // The canary timings went in (the agent moves times to now, keeping their spacing), and
    // the check sees them in the forms a leak would take.
    let downs: Vec<i64> = records
        .iter()
        .flat_map(|(_, b)| {
            b.events.iter().filter(|e| e.action == proto::KeyAction::Down as i32).map(|e| e.event_time_us)
        })
        .collect();
    assert!(downs.windows(2).any(|w| w[1] - w[0] == CANARY_INTERVAL_US), "the canary interval is in the records");
    for leak in ["interval 83417", "83.417 ms", "hold=0.031729s", "31729us", "key 754"] {
        assert!(canary_in(leak).is_some(), "{leak}");
    }
    assert!(canary_in("80.000 ms, 1700000000083417, 30 ms").is_none());
    // Two records carrying the canary timings that the processor refuses: one under another
    // user's key, one with an event in 2200.
    let canary = records[0].1.clone();
    let mut absurd = canary.clone();
    absurd.events[1].event_time_us = 7_258_118_400_000_000 + CANARY_INTERVAL_US;
    broker.produce(
        "events",
        &[(b"someone-else".to_vec(), canary.encode_to_vec()), (b"canary-user".to_vec(), absurd.encode_to_vec())],
    );

    let alerts = broker.wait_for_alerts("alerts", 1);
    assert!(alerts.iter().all(|a| a.user_id == "canary-user"), "{alerts:?}");
    broker.wait_fully_committed("app-agent", "events");
    common::wait_until("the sink to write every alert", || db.count("alerts") == alerts.len());

    // The raw bytes too: no canary code as a protobuf varint field of an event.
    for r in broker.read_all("events") {
        let payload = r.payload.unwrap();
        for code in CANARY_KEYS {
            let mut field = vec![0x30]; // field 6 (key), varint
            prost::encoding::encode_varint(u64::from(code), &mut field);
            assert!(!payload.windows(field.len()).any(|w| w == field.as_slice()), "raw key {code} in a record");
        }
    }

    // Everything a person or a program outside the stream reads.
    let addr = processor.http_addr();
    let mut answers = Vec::new();
    for path in ["/metrics", "/api/alerts?limit=100", "/api/users/canary-user", "/readyz", "/healthz"] {
        let (status, body) = common::http_get(&addr, path, Some(TOKEN));
        assert_eq!(status, 200, "{path}: {body}");
        answers.push((path, body));
    }
    let dead: Vec<common::broker::Record> = broker.read_all("dlq");
    assert_eq!(dead.len(), 2, "the two refused records");
    let rows = db.sql("select row_to_json(a)::text from alerts a");
    assert!(rows.contains("canary-user"), "{rows}");
    assert!(processor.terminate().success());

    assert_no_canary("the agent's log", &stderr);
    assert_no_canary("the processor's log", &processor.log());
    for (path, body) in &answers {
        assert_no_canary(path, body);
    }
    for r in &dead {
        assert_no_canary("a dead letter's headers", &format!("{:?}", r.headers));
    }
    for r in broker.read_all("alerts") {
        let text = format!("{:?} {:?}", r.headers, r.payload.map(|p| proto::Alert::decode(p.as_slice())));
        assert_no_canary("an alert", &text);
    }
    assert_no_canary("the alerts table", &rows);
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
    assert_one_session(&records.iter().map(|(_, b)| b).collect::<Vec<_>>(), &keylog, SHORT_LIFETIME);
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
fn key_labels_are_short_lived_and_unrelated_across_sessions() {
    let broker = Broker::start();
    broker.create_topics(&["events"], 1);
    let dir = tempfile::tempdir().unwrap();
    let keylog = canary_macro(dir.path(), 60);
    for _ in 0..2 {
        run_agent_with_labels(&broker.bootstrap, &keylog, &dir.path().join("spool"), "u-sessions", None);
    }
    let records = batches(&broker);
    let mut sessions: BTreeMap<String, Vec<&proto::KeyEventBatch>> = BTreeMap::new();
    for (_, b) in &records {
        sessions.entry(b.session_id.clone()).or_default().push(b);
    }
    assert_eq!(sessions.len(), 2, "one session per agent run");
    let used: Vec<BTreeSet<u32>> = sessions.values().map(|s| assert_one_session(s, &keylog, SHORT_LIFETIME)).collect();
    // 60 presses of three keys in turn: each key's label is renewed as it ages.
    assert!(used[0].len() > CANARY_KEYS.len(), "{} labels for three keys", used[0].len());
    assert!(used[0].is_disjoint(&used[1]), "the same keys get unrelated labels in another session");
}

/// `text` typed at a steady pace as a keylog of user `typist` (Shift held over each capital).
fn typed_keylog(path: &Path, text: &str) -> Vec<text_attack::Symbol> {
    let mut csv = String::from("user_id,session_id,event_time_us,key_code,action\n");
    let mut t = 1_700_000_000_000_000i64;
    let mut shift_up = None;
    let mut symbols = Vec::new();
    for (code, symbol) in text_attack::presses_of(text) {
        csv.push_str(&format!("typist,s,{t},{code},down\n"));
        symbols.push(symbol);
        if code == 42 {
            shift_up = Some(t);
        } else {
            csv.push_str(&format!("typist,s,{},{code},up\n", t + 80_000));
            if shift_up.take().is_some() {
                csv.push_str(&format!("typist,s,{},42,up\n", t + 90_000));
            }
        }
        t += 150_000;
    }
    std::fs::write(path, csv).unwrap();
    symbols
}

#[test]
fn a_frequency_attack_gets_under_a_tenth_of_a_typed_passage_from_short_lived_labels_and_reads_session_labels() {
    let broker = Broker::start();
    broker.create_topics(&["events"], 1);
    let dir = tempfile::tempdir().unwrap();
    let passage = include_str!("fixtures/passage.txt");
    assert!(passage.len() >= 2000);
    let keylog = dir.path().join("passage.csv");
    let truth = typed_keylog(&keylog, passage);
    // The attacker's English: letter and digraph frequencies of another text (what any
    // attacker has); beside it, the passage's own (more than any attacker has), reported.
    let english: Vec<text_attack::Symbol> =
        text_attack::presses_of(include_str!("fixtures/english.txt")).into_iter().map(|(_, s)| s).collect();
    let model = LanguageModel::of(&english);
    let oracle = LanguageModel::of(&truth);
    // The passage typed in three agent sessions with the default's short-lived labels, each
    // attacked on its own, and once more with one label per key for the session.
    for lifetime in [None, None, None, Some(0)] {
        run_agent_with_labels(&broker.bootstrap, &keylog, &dir.path().join("spool"), "typist", lifetime);
    }
    let mut sessions: Vec<(String, Vec<u32>)> = Vec::new();
    for (_, b) in batches(&broker) {
        let downs = b.events.iter().filter(|e| e.action == proto::KeyAction::Down as i32).map(|e| e.key);
        match sessions.last_mut().filter(|(id, _)| *id == b.session_id) {
            Some((_, labels)) => labels.extend(downs),
            None => sessions.push((b.session_id.clone(), downs.collect())),
        }
    }
    assert_eq!(sessions.len(), 4, "one session per run, in order on one partition");
    let session_labels = sessions.pop().unwrap().1;
    let letters = truth.iter().filter(|s| s.is_ascii_lowercase()).count();
    let share_of = |model: &LanguageModel, seed: u64| {
        let best: Vec<f64> = sessions
            .iter()
            .enumerate()
            .map(|(i, (_, labels))| {
                text_attack::best(&text_attack::recovered_letters(model, &truth, labels, seed + i as u64))
            })
            .collect();
        (best.iter().sum::<f64>() / best.len() as f64, best)
    };
    let (share, by_session) = share_of(&model, 0);
    let (oracle_share, _) = share_of(&oracle, 10);
    // The control: the same attack on one label per key for the session (a simple
    // substitution) reads the passage back.
    let substitution = text_attack::best(&text_attack::recovered_letters(&model, &truth, &session_labels, 20));
    // The floor: labels drawn fresh for every press carry nothing but the language's odds.
    let fresh: Vec<u32> = (0..truth.len() as u32).collect();
    let floor = text_attack::best(&text_attack::recovered_letters(&model, &truth, &fresh, 30));
    // Longer lives, for the record (the agent's labeler itself, seeded).
    for lifetime in [32, 64, 128] {
        let mut labeler = metronome::agent::labels::KeyLabeler::seeded(lifetime.into(), lifetime);
        let labels: Vec<u32> = text_attack::presses_of(passage)
            .into_iter()
            .map(|(code, _)| {
                let label = labeler.label(code, metronome_core::event::KeyAction::Down);
                labeler.label(code, metronome_core::event::KeyAction::Up);
                label
            })
            .collect();
        let got = text_attack::best(&text_attack::recovered_letters(&model, &truth, &labels, 40));
        eprintln!("labels of {lifetime} presses: recovered {got:.4}");
    }
    eprintln!(
        "{letters} letters per session: recovered {share:.4} (sessions {by_session:.4?}), with the passage's own \
         frequencies {oracle_share:.4}; one label per key per session {substitution:.4}; a fresh label per press {floor:.4}"
    );
    assert!(substitution > 0.9, "the attack reads a session's simple substitution ({substitution})");
    assert!(share < 0.10, "the attack got {share} of the letters back");
}
