//! `metronome archive` and the backtest, on Apache Kafka, real PostgreSQL
//! (a temporary database) and a real directory as the object store, through the real binary:
//! a day cut out exactly by record time, counts and checksums, the `archive_runs` row, re-runs
//! that change nothing, a crash mid-run that leaves nothing half-written, and an archived day
//! re-scored to the same alerts the live processor committed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::broker::{env_vars, Broker, ProcessorProc};
use common::postgres::TempDb;
use metronome::archive::format::{sha256_hex, ArchiveReader, Day, Manifest};
use metronome_core::event::{KeyAction, KeyEvent};
use metronome_core::proto;
use metronome_core::wire::batches_for_user;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;

const TOPIC: &str = "arch.events";
const PARTITIONS: i32 = 3;

/// 2026-11-20, the day archived; the days around it must stay out.
fn day() -> Day {
    Day::parse("2026-11-20").unwrap()
}

/// A record as produced: key, payload, Kafka timestamp.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Produced {
    key: Vec<u8>,
    value: Vec<u8>,
    timestamp_ms: i64,
}

/// Produces `records` in order with their timestamps and waits for every acknowledgement.
fn produce(broker: &Broker, records: &[Produced]) {
    let producer: BaseProducer = broker.config().set("enable.idempotence", "true").create().unwrap();
    for r in records {
        producer
            .send(BaseRecord::to(TOPIC).key(&r.key).payload(&r.value).timestamp(r.timestamp_ms))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Key-event records of `users` users every `step_ms` from `from_ms` to `to_ms` (exclusive).
fn traffic(users: usize, from_ms: i64, to_ms: i64, step_ms: i64) -> Vec<Produced> {
    let mut out = Vec::new();
    let mut t = from_ms;
    let mut i = 0usize;
    while t < to_ms {
        let user = format!("user-{}", i % users);
        let events = [
            KeyEvent::new(t * 1000, 30 + (i % 20) as u32, KeyAction::Down),
            KeyEvent::new(t * 1000 + 40_000, 30 + (i % 20) as u32, KeyAction::Up),
        ];
        for payload in batches_for_user(&user, "s", &events, 50) {
            out.push(Produced { key: user.as_bytes().to_vec(), value: payload, timestamp_ms: t });
        }
        t += step_ms;
        i += 1;
    }
    out
}

fn metronome(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metronome"));
    for (k, _) in std::env::vars() {
        if k.starts_with("METRONOME_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).envs(env.iter().copied()).env("RUST_LOG", "warn,metronome=info").output().unwrap()
}

fn archive(broker: &Broker, dir: &Path, db: &TempDb, day: Day, env: &[(&str, &str)]) -> Output {
    let day = day.to_string();
    let url = db.url("sslmode=disable");
    let args = [
        "archive",
        "--day",
        &day,
        "--bootstrap-servers",
        &broker.bootstrap,
        "--archive",
        dir.to_str().unwrap(),
        "--topic",
        TOPIC,
        "--postgres-url",
        &url,
    ];
    metronome(&args, env)
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "metronome failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
}

fn read_manifest(dir: &Path, day: Day) -> (Manifest, Vec<u8>) {
    let bytes = std::fs::read(dir.join(format!("{TOPIC}/day={day}/manifest.json"))).expect("the manifest is written");
    (Manifest::from_json(&bytes).unwrap(), bytes)
}

/// Every regular file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The `archive_runs` row of the day: status, attempts, partitions, read, written, checksums.
fn run_row(db: &TempDb, day: Day) -> (String, i64, i64, i64, i64, Value) {
    let row = db.sql(&format!(
        "SELECT status, attempts, coalesce(partitions, -1), coalesce(records_read, -1), \
         coalesce(records_written, -1), coalesce(checksums, 'null'::jsonb) \
         FROM archive_runs WHERE topic = '{TOPIC}' AND day = '{day}'"
    ));
    let f: Vec<&str> = row.trim().split('|').collect();
    assert_eq!(f.len(), 6, "one archive_runs row for {day}: {row:?}");
    (
        f[0].to_owned(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
        f[3].parse().unwrap(),
        f[4].parse().unwrap(),
        serde_json::from_str(f[5]).unwrap(),
    )
}

/// What the files of a manifest hold, checked against it: records in offset order per partition.
fn archived_records(dir: &Path, manifest: &Manifest) -> Vec<proto::ArchivedRecord> {
    let mut all = Vec::new();
    for entry in &manifest.partitions {
        let bytes = std::fs::read(dir.join(&entry.path)).unwrap();
        assert_eq!(sha256_hex(&bytes), entry.file.sha256, "{}: checksum", entry.path);
        assert_eq!(bytes.len() as u64, entry.file.bytes);
        let records: Vec<proto::ArchivedRecord> =
            ArchiveReader::new(bytes.as_slice()).collect::<Result<_, _>>().unwrap();
        assert_eq!(records.len() as u64, entry.file.records, "{}: count", entry.path);
        assert!(records.windows(2).all(|w| w[0].offset < w[1].offset), "offset order");
        assert_eq!(records.first().map(|r| r.offset), entry.file.first_offset);
        assert_eq!(records.last().map(|r| r.offset), entry.file.last_offset);
        assert!(records.iter().all(|r| (entry.start_offset..entry.end_offset).contains(&r.offset)));
        all.extend(records);
    }
    all
}

fn as_produced(records: &[proto::ArchivedRecord]) -> Vec<Produced> {
    let mut out: Vec<Produced> = records
        .iter()
        .map(|r| Produced {
            key: r.key.clone().unwrap_or_default(),
            value: r.value.clone().unwrap_or_default(),
            timestamp_ms: r.timestamp_ms,
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_day_is_archived_exactly_with_counts_checksums_and_one_run_row_and_reruns_change_nothing() {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS);
    let (start, end) = day().bounds_ms();
    // The evening before, the day (with a record that does not decode: archived as it is), and
    // the morning after; record times one minute apart, in order, as agents stamp them.
    let before = traffic(5, start - 3_600_000, start, 60_000);
    let mut during = traffic(5, start, end, 240_000);
    during.insert(
        100,
        Produced { key: b"user-1".to_vec(), value: vec![0xff; 9], timestamp_ms: during[100].timestamp_ms },
    );
    let after = traffic(5, end, end + 3_600_000, 60_000);
    produce(&broker, &[before.clone(), during.clone(), after].concat());

    let db = TempDb::create();
    let store = tempfile::tempdir().unwrap();
    let out = archive(&broker, store.path(), &db, day(), &[]);
    assert_ok(&out);
    let (manifest, manifest_bytes) = read_manifest(store.path(), day());
    assert_eq!((manifest.topic.as_str(), manifest.day.as_str()), (TOPIC, "2026-11-20"));
    assert_eq!((manifest.start_ms, manifest.end_ms), (start, end));
    assert_eq!(manifest.partitions.len(), PARTITIONS as usize, "one file per partition");
    assert_eq!(manifest.records, during.len() as u64, "exactly the day's records");
    let archived = archived_records(store.path(), &manifest);
    let mut expected = during.clone();
    expected.sort();
    assert_eq!(as_produced(&archived), expected, "every record of the day, once, unchanged; no other");

    let (status, attempts, partitions, read, written, checksums) = run_row(&db, day());
    assert_eq!((status.as_str(), attempts, partitions), ("succeeded", 1, i64::from(PARTITIONS)));
    assert_eq!((read, written), (during.len() as i64, during.len() as i64));
    for entry in &manifest.partitions {
        assert_eq!(checksums[entry.partition.to_string()], Value::from(entry.file.sha256.clone()));
    }

    // Again: the same bytes everywhere, still one row.
    let files = files_under(store.path());
    let contents: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(store.path().join(f)).unwrap()).collect();
    assert_ok(&archive(&broker, store.path(), &db, day(), &[]));
    assert_eq!(files_under(store.path()), files);
    let again: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(store.path().join(f)).unwrap()).collect();
    assert!(again == contents, "a re-run rewrites the same bytes");
    assert_eq!(read_manifest(store.path(), day()).1, manifest_bytes);
    assert_eq!(db.count("archive_runs"), 1, "no duplicate row");
    let (status, attempts, ..) = run_row(&db, day());
    assert_eq!((status.as_str(), attempts), ("succeeded", 2));

    // The day before holds the evening: days share no record and miss none.
    assert_ok(&archive(&broker, store.path(), &db, day().minus(1), &[]));
    let (previous, _) = read_manifest(store.path(), day().minus(1));
    assert_eq!(previous.records, before.len() as u64);
    assert_eq!(db.count("archive_runs"), 2);
}

#[test]
fn a_crash_mid_run_leaves_no_file_and_a_running_row_and_the_rerun_completes() {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS);
    let (start, end) = day().bounds_ms();
    let during = traffic(4, start, end, 120_000);
    produce(&broker, &during);
    let db = TempDb::create();
    let store = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let scratch_env = ("METRONOME_ARCHIVE__SCRATCH_DIR", scratch.path().to_str().unwrap());

    // Aborted (SIGABRT, no clean-up of any kind) in the middle of the second partition.
    let abort_at = (during.len() / PARTITIONS as usize + 10).to_string();
    let out = archive(
        &broker,
        store.path(),
        &db,
        day(),
        &[scratch_env, ("METRONOME_FAULT_ARCHIVE_ABORT_AFTER_RECORDS", abort_at.as_str())],
    );
    assert!(!out.status.success(), "the injected crash must stop the run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("aborting"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(files_under(store.path()), Vec::<PathBuf>::new(), "nothing half-written in the archive");
    assert_eq!(files_under(scratch.path()), Vec::<PathBuf>::new(), "staged files die with the process");
    let (status, attempts, ..) = run_row(&db, day());
    assert_eq!((status.as_str(), attempts), ("running", 1), "the row shows the run never finished");
    let day_arg = day().to_string();
    let backtest =
        metronome(&["score", "--archive", store.path().to_str().unwrap(), "--day", &day_arg, "--topic", TOPIC], &[]);
    assert!(!backtest.status.success(), "a day without a manifest is not scored");
    assert!(String::from_utf8_lossy(&backtest.stderr).contains("no manifest"));

    assert_ok(&archive(&broker, store.path(), &db, day(), &[scratch_env]));
    let (manifest, _) = read_manifest(store.path(), day());
    assert_eq!(manifest.records, during.len() as u64);
    archived_records(store.path(), &manifest);
    let (status, attempts, _, read, written, _) = run_row(&db, day());
    assert_eq!((status.as_str(), attempts), ("succeeded", 2));
    assert_eq!((read, written), (during.len() as i64, during.len() as i64));
}

#[test]
fn retention_deletes_archived_days_older_than_configured() {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS);
    let db = TempDb::create();
    let store = tempfile::tempdir().unwrap();
    // Three archived days ten days apart; keeping 15 days from today deletes the oldest only
    // when today is within 15 days of the middle one. Today is fixed by the clock, so the days
    // are placed relative to it.
    let today = Day::containing(metronome::agent::capture::epoch_us(std::time::SystemTime::now()) / 1000);
    let days = [today.minus(25), today.minus(12), today.minus(2)];
    for d in days {
        let (start, _) = d.bounds_ms();
        produce(&broker, &traffic(2, start + 1000, start + 60_000, 10_000));
    }
    let keep = [("METRONOME_ARCHIVE__RETENTION_DAYS", "0")];
    for d in &days[..2] {
        assert_ok(&archive(&broker, store.path(), &db, *d, &keep));
    }
    assert!(store.path().join(format!("{TOPIC}/day={}/manifest.json", days[0])).is_file());
    let out = archive(&broker, store.path(), &db, days[2], &[("METRONOME_ARCHIVE__RETENTION_DAYS", "15")]);
    assert_ok(&out);
    let left: Vec<String> = files_under(store.path()).iter().map(|p| p.display().to_string()).collect();
    assert!(left.iter().all(|p| !p.contains(&days[0].to_string())), "{} was kept: {left:?}", days[0]);
    assert!(left.iter().any(|p| p.contains(&format!("day={}/manifest.json", days[1]))));
    assert!(left.iter().any(|p| p.contains(&format!("day={}/manifest.json", days[2]))));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("deleted by retention: {}", days[0])));
    assert_eq!(run_row(&db, days[0]).0, "expired");
    assert_eq!(run_row(&db, days[1]).0, "succeeded");
}

/// moto's S3 server on a free loopback port (from `target/test-venv`, installed by
/// `scripts/setup`), stopped on drop.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
}

impl S3Server {
    fn start() -> Self {
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/moto_server");
        assert!(bin.is_file(), "{} is missing: run scripts/setup (it installs the test tools)", bin.display());
        let port = common::broker::free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = S3Server { child, endpoint: format!("http://127.0.0.1:{port}") };
        common::wait_until("the S3 server to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        server
    }

    fn create_bucket(&self, bucket: &str) {
        let status =
            Command::new("curl").args(["-sSf", "-X", "PUT", &format!("{}/{bucket}", self.endpoint)]).status().unwrap();
        assert!(status.success(), "creating bucket {bucket}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_day_archives_to_an_s3_compatible_store_and_backtests_from_it() {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS);
    let (start, _) = day().bounds_ms();
    // Typing a key a second for two minutes: windows to score in the backtest.
    let during = traffic(4, start + 1000, start + 121_000, 250);
    produce(&broker, &during);
    let s3 = S3Server::start();
    s3.create_bucket("metronome-archive");
    let env = [
        ("METRONOME_ARCHIVE__S3__ENDPOINT", s3.endpoint.as_str()),
        ("METRONOME_ARCHIVE__S3__ALLOW_HTTP", "true"),
        ("METRONOME_ARCHIVE__S3__ACCESS_KEY_ID", "metronome"),
        ("METRONOME_ARCHIVE__S3__SECRET_ACCESS_KEY", "not-a-secret"),
    ];
    let db = TempDb::create();
    let day_arg = day().to_string();
    let url = db.url("sslmode=disable");
    let args = [
        "archive",
        "--day",
        &day_arg,
        "--bootstrap-servers",
        &broker.bootstrap,
        "--archive",
        "s3://metronome-archive/raw",
        "--topic",
        TOPIC,
        "--postgres-url",
        &url,
    ];
    assert_ok(&metronome(&args, &env));
    let (status, _, partitions, read, written, checksums) = run_row(&db, day());
    assert_eq!((status.as_str(), partitions), ("succeeded", i64::from(PARTITIONS)));
    assert_eq!((read, written), (during.len() as i64, during.len() as i64));
    // Again: the same checksums, one row.
    assert_ok(&metronome(&args, &env));
    assert_eq!(run_row(&db, day()).5, checksums);
    assert_eq!(db.count("archive_runs"), 1);

    // The objects are where the manifest says: the backtest reads and checks every one.
    let backtest = metronome(
        &["score", "--archive", "s3://metronome-archive/raw", "--day", &day_arg, "--topic", TOPIC, "--model", "none"],
        &env,
    );
    assert_ok(&backtest);
    let stderr = String::from_utf8_lossy(&backtest.stderr);
    assert!(stderr.contains(&format!("{} records in {PARTITIONS} partitions", during.len())), "{stderr}");
    let events = String::from_utf8_lossy(&backtest.stdout).lines().count();
    assert!(events > 0, "windows were scored from the archived records");
    // The wrong bucket is a clear error, not an empty day.
    let missing =
        metronome(&["score", "--archive", "s3://no-such-bucket/raw", "--day", &day_arg, "--topic", TOPIC], &env);
    assert!(!missing.status.success());
}

/// Alert ids, user and window of every alert line `metronome score` printed.
fn scored_alerts(stdout: &[u8]) -> Vec<(String, String, i64, i64)> {
    let mut out: Vec<_> = std::str::from_utf8(stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "alert")
        .map(|v| {
            (
                v["alert_id"].as_str().unwrap().to_owned(),
                v["user_id"].as_str().unwrap().to_owned(),
                v["window_start_us"].as_i64().unwrap(),
                v["window_end_us"].as_i64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn an_archived_day_backtests_to_the_alerts_the_live_processor_committed() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let app = "arch-live";
    broker.create_topics(&[TOPIC, "arch.alerts", "arch.dlq"], PARTITIONS);
    let env = env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", app),
        ("METRONOME_STREAM__INPUT_TOPIC", TOPIC),
        ("METRONOME_STREAM__ALERTS_TOPIC", "arch.alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "arch.dlq"),
        ("METRONOME_STREAM__COMMIT_INTERVAL_MS", "50"),
        ("METRONOME_DETECTOR__WINDOW__IDLE_TIMEOUT_MS", "1000"),
    ]);

    // Real human typing and macro users, recorded on 2023-11-14 (the simulator's clock), published
    // with their event times as record times.
    let keylog = dir.path().join("sim.csv");
    common::broker::simulate_keylog(
        &keylog,
        16,
        &["--macro-share", "0.3", "--mixed", "--seed", "5", "--macro-presses", "150"],
    );
    let events = metronome_core::keylog::KeylogReader::open(&keylog).unwrap().map(|r| r.unwrap().event.time_us);
    let (first, last) = events.fold((i64::MAX, i64::MIN), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let recorded = Day::containing(first / 1000);
    assert_eq!(Day::containing(last / 1000), recorded, "the simulated traffic fits in one day");
    let out = metronome(
        &[
            "publish",
            "--input",
            keylog.to_str().unwrap(),
            "--bootstrap-servers",
            &broker.bootstrap,
            "--topic",
            TOPIC,
            "--timestamps",
            "event-time",
        ],
        &[],
    );
    assert_ok(&out);

    // The live run: the processor over the topic until everything is committed and scored.
    let mut processor = ProcessorProc::start(&broker, &dir.path().join("state"), "p1", &env, dir.path());
    broker.wait_fully_committed(app, TOPIC);

    // The nightly job, then the backtest of the archived day with the same model.
    let db = TempDb::create();
    let store = dir.path().join("archive");
    assert_ok(&archive(&broker, &store, &db, recorded, &[]));
    let day_arg = recorded.to_string();
    // The same detector settings as the live run (the idle timeout shapes windows in event time).
    let settings: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("METRONOME_DETECTOR"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let backtest = metronome(
        &["score", "--alerts-only", "--archive", store.to_str().unwrap(), "--day", &day_arg, "--topic", TOPIC],
        &settings,
    );
    assert_ok(&backtest);
    let expected = scored_alerts(&backtest.stdout);
    assert!(expected.len() >= 3, "the scenario must raise alerts to compare: {}", expected.len());

    let live = broker.wait_for_alerts("arch.alerts", expected.len());
    assert!(processor.terminate().success());
    let live_after_stop = broker.alerts("arch.alerts");
    assert_eq!(live_after_stop.len(), live.len(), "no further alert arrived");
    let mut live: Vec<_> = live_after_stop
        .iter()
        .map(|a| (a.alert_id.clone(), a.user_id.clone(), a.window_start_us, a.window_end_us))
        .collect();
    live.sort();
    assert_eq!(live, expected, "the backtest finds exactly the alerts the live run committed");
    let by_user: BTreeMap<&str, usize> = expected.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.1.as_str()).or_default() += 1;
        m
    });
    assert!(by_user.len() >= 2, "alerts of several users: {by_user:?}");
}
