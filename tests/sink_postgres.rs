//! The PostgreSQL sink against Apache Kafka and real PostgreSQL (a temporary
//! database, or a private cluster the test stops and starts): every alert once, through a crash
//! between insert and commit, a crash after the commit, PostgreSQL going away, and TLS modes.
//! The crashes are a wrapping store ([`Crashing`]) over the production one; the loop's own
//! retries, pauses and restarts are unit-tested on in-memory twins (`sink::service`).

mod common;

use std::collections::BTreeMap;

use common::broker::Broker;
use common::postgres::{PrivateCluster, TempDb};
use common::wait_until;
use metronome::sink::store::{stage_batch, SinkRecord, WriteSummary};
use metronome::sink::{
    AlertStore, Offsets, PgAlertStore, PostgresConfig, PostgresSink, SinkError, SinkSummary, StoreFailure,
};
use metronome_core::proto;
use metronome_io::postgres::PgTarget;
use prost::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "t.alerts";
const PARTITIONS: i32 = 3;
const APP: &str = "sinktest";

fn alert(i: usize) -> proto::Alert {
    proto::Alert {
        alert_id: format!("alert-{i:04}"),
        user_id: format!("user-{}", i % 7),
        window_start_us: 1_700_000_000_000_000 + i as i64 * 1_000_000,
        window_end_us: 1_700_000_000_500_000 + i as i64 * 1_000_000,
        score: 0.9,
        histogram_score: 0.8,
        lstm_score: if i % 2 == 0 { Some(0.7) } else { None },
        features: vec![proto::Feature { name: "interval_cv".into(), value: 0.01, fired: true }],
        reasons: vec!["interval_cv".into()],
        model_version: "timing-1".into(),
        detected_at_us: 1_800_000_000_000_000 + i as i64,
        scorers: vec!["histogram".into()],
        timing_score: 0.9,
        interval_histogram: Some(proto::IntervalHistogram { bin_ms: 10.0, counts: vec![0, 3, 45] }),
        // Every fifth alert is a fleet's, naming three accounts.
        fleet: (i % 5 == 0).then(|| proto::FleetEvidence {
            fleet_id: format!("fleet-{i}"),
            accounts: vec![format!("user-{}", i % 7), "x".into(), "y".into()],
            new_accounts: vec!["y".into()],
            links: 3,
            fingerprints: 4,
        }),
    }
}

fn produce_alerts(broker: &Broker, range: std::ops::Range<usize>) {
    let records: Vec<(Vec<u8>, Vec<u8>)> =
        range.map(|i| (alert(i).user_id.into_bytes(), alert(i).encode_to_vec())).collect();
    broker.produce(TOPIC, &records);
}

fn config(url: &str, batch: usize) -> PostgresConfig {
    PostgresConfig {
        url: url.to_owned(),
        batch_max_records: batch,
        batch_linger_ms: 20,
        retry_min_ms: 50,
        retry_max_ms: 500,
        lag_interval_ms: 100,
        ..PostgresConfig::default()
    }
}

fn kafka(broker: &Broker) -> BTreeMap<String, String> {
    BTreeMap::from([("bootstrap.servers".to_owned(), broker.bootstrap.clone())])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn count(db: &TempDb, table: &str) -> usize {
    db.count(table)
}

fn alert_ids(sql: impl Fn(&str) -> String) -> Vec<String> {
    let out = sql("SELECT alert_id FROM alerts ORDER BY alert_id");
    out.lines().map(str::to_owned).collect()
}

fn expected_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("alert-{i:04}")).collect()
}

/// The stored next offsets must equal the topic's end offsets: every record accounted for.
fn assert_offsets_at_end(sql: impl Fn(&str) -> String, broker: &Broker) {
    let stored: BTreeMap<i32, i64> = sql(&format!(
        "SELECT partition, next_offset FROM sink_offsets WHERE consumer = '{APP}-sink-postgres' AND topic = '{TOPIC}'"
    ))
    .lines()
    .map(|l| {
        let (p, o) = l.split_once('|').unwrap();
        (p.parse().unwrap(), o.parse().unwrap())
    })
    .collect();
    let ends: BTreeMap<i32, i64> = broker.end_offsets(TOPIC).into_iter().filter(|(_, o)| *o > 0).collect();
    assert_eq!(stored, ends);
}

/// Commits the sink group's offsets at the topic's end in Kafka, as if a Kafka commit had run
/// ahead of the database: the sink must start from PostgreSQL's offsets anyway. Kafka takes a
/// commit from outside the group only once the group is empty: until the crashed sink's member
/// has left, it answers "unknown member", and the commit is tried again.
fn commit_kafka_offsets_at_end(broker: &Broker) {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let consumer: BaseConsumer = broker.config().set("group.id", format!("{APP}-sink-postgres")).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for (p, end) in broker.end_offsets(TOPIC) {
        tpl.add_partition_offset(TOPIC, p, Offset::Offset(end)).unwrap();
    }
    wait_until("the crashed sink's member to leave the group", || {
        match consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync) {
            Ok(()) => true,
            Err(e) => match e.rdkafka_error_code() {
                Some(Code::UnknownMemberId | Code::RebalanceInProgress | Code::IllegalGeneration) => false,
                _ => panic!("committing the sink group's offsets: {e}"),
            },
        }
    });
}

fn setup(n: usize) -> Broker {
    let broker = Broker::start();
    broker.create_topics(&[TOPIC], PARTITIONS);
    produce_alerts(&broker, 0..n);
    // Two records that are not alerts: kept as dead letters, not lost, not fatal.
    broker.produce(TOPIC, &[(b"x".to_vec(), vec![0xff, 0xfe, 0x01]), (b"y".to_vec(), Vec::new())]);
    broker
}

fn sink(url: &str, broker: &Broker, batch: usize) -> PostgresSink {
    PostgresSink::new(config(url, batch), kafka(broker), TOPIC, APP).unwrap()
}

/// Where a wrapped store stands for a crash.
#[derive(Clone, Copy)]
enum CrashAt {
    /// In this write (0-based) after its rows are in, before PostgreSQL's commit.
    BeforeCommit(u64),
    /// After this write (0-based) committed, before the sink hears of it.
    AfterCommit(u64),
}

/// The production store with a crash at one write: the sink stops there with a store error.
struct Crashing {
    inner: PgAlertStore,
    at: CrashAt,
    writes: u64,
}

impl Crashing {
    fn wrap(at: CrashAt) -> impl FnOnce(PgAlertStore) -> Self {
        move |inner| Self { inner, at, writes: 0 }
    }

    /// The batch's rows written in a transaction of its own that is then dropped, uncommitted,
    /// as a process dying there would leave it.
    async fn die_before_commit(&self, consumer: &str, topic: &str, records: &[SinkRecord]) -> StoreFailure {
        let mut client = self.inner.target().connect().await.expect("the test's own connection");
        let tx = client.transaction().await.expect("a transaction");
        let (staged, _) = stage_batch(&tx, consumer, topic, records).await.expect("the rows staged");
        assert!(staged.written > 0, "the crash comes after rows are in");
        drop(tx);
        StoreFailure::Fatal("crash before commit".into())
    }
}

impl AlertStore for Crashing {
    async fn load_offsets(&mut self, consumer: &str, topic: &str) -> Result<Offsets, StoreFailure> {
        self.inner.load_offsets(consumer, topic).await
    }

    async fn write_batch(
        &mut self,
        consumer: &str,
        topic: &str,
        records: &[SinkRecord],
    ) -> Result<(WriteSummary, Offsets), StoreFailure> {
        let n = self.writes;
        self.writes += 1;
        if matches!(self.at, CrashAt::BeforeCommit(at) if at == n) {
            return Err(self.die_before_commit(consumer, topic, records).await);
        }
        let written = self.inner.write_batch(consumer, topic, records).await?;
        if matches!(self.at, CrashAt::AfterCommit(at) if at == n) {
            return Err(StoreFailure::Fatal("crash after commit".into()));
        }
        Ok(written)
    }
}

fn crashed_with(result: Result<SinkSummary, SinkError>, what: &str) {
    match result {
        Err(SinkError::Store(e)) => assert_eq!(e.to_string(), what),
        other => panic!("expected the store's {what}, got {other:?}"),
    }
}

/// Runs `sink` until `done` holds, then stops it and returns its summary.
fn run_until(rt: &tokio::runtime::Runtime, sink: PostgresSink, what: &str, done: impl FnMut() -> bool) -> SinkSummary {
    let shutdown = CancellationToken::new();
    let handle = rt.spawn(sink.run(shutdown.clone()));
    wait_until(what, done);
    shutdown.cancel();
    rt.block_on(handle).unwrap().unwrap()
}

#[test]
fn a_crash_between_insert_and_commit_loses_and_repeats_nothing() {
    const N: usize = 60;
    let broker = setup(N);
    let db = TempDb::create();
    let url = db.url("sslmode=disable");
    let rt = runtime();

    // First run: the second transaction dies after its inserts, before its commit.
    let crashing = sink(&url, &broker, 10).map_store(Crashing::wrap(CrashAt::BeforeCommit(1)));
    crashed_with(rt.block_on(crashing.run(CancellationToken::new())), "crash before commit");
    let after_crash = count(&db, "alerts");
    assert!((1..=10).contains(&after_crash), "only the first transaction's rows survive: {after_crash}");
    let stored: i64 = db.sql("SELECT coalesce(sum(next_offset), 0) FROM sink_offsets").parse().unwrap();
    let first_batch = after_crash as i64 + db.sql("SELECT count(*) FROM sink_dead_letters").parse::<i64>().unwrap();
    assert_eq!(stored, first_batch, "offsets cover exactly the rows that committed");

    // Kafka's committed offsets run ahead (as a late Kafka commit could leave them): ignored.
    commit_kafka_offsets_at_end(&broker);

    let summary = run_until(&rt, sink(&url, &broker, 10), "every alert in PostgreSQL", || {
        count(&db, "alerts") == N && count(&db, "sink_dead_letters") == 2
    });
    assert_eq!(summary.writes.duplicates, 0, "no record was offered twice");
    assert_eq!(summary.writes.already_written, 0, "the restart started at PostgreSQL's offsets");
    assert_eq!(alert_ids(|q| db.sql(q)), expected_ids(N));
    assert_offsets_at_end(|q| db.sql(q), &broker);
    let row = db.sql("SELECT user_id, score, lstm_score, scorers[1], features->'interval_cv'->>'fired' FROM alerts WHERE alert_id = 'alert-0002'");
    assert_eq!(row, "user-2|0.9|0.7|histogram|true");
    let fleet = db.sql(
        "SELECT fleet->>'fleet_id', fleet->'accounts'->>2, fleet->>'links' FROM alerts WHERE alert_id = 'alert-0005'",
    );
    assert_eq!(fleet, "fleet-5|y|3", "a fleet alert keeps its accounts");
    let fleets = db.sql("SELECT count(*) FROM alerts WHERE fleet -> 'accounts' ? 'x'");
    assert_eq!(fleets, (N.div_ceil(5)).to_string(), "fleet alerts are found by any account they name");
    assert_eq!(db.sql("SELECT count(*) FROM alerts WHERE fleet IS NULL AND alert_id = 'alert-0002'"), "1");
}

#[test]
fn a_crash_after_the_commit_is_not_written_twice() {
    const N: usize = 40;
    let broker = setup(N);
    let db = TempDb::create();
    let url = db.url("sslmode=disable");
    let rt = runtime();
    // Dies after PostgreSQL committed the second transaction, before Kafka heard of it.
    let crashing = sink(&url, &broker, 8).map_store(Crashing::wrap(CrashAt::AfterCommit(1)));
    crashed_with(rt.block_on(crashing.run(CancellationToken::new())), "crash after commit");
    let survived = count(&db, "alerts");
    assert!(survived > 0);

    let summary = run_until(&rt, sink(&url, &broker, 8), "every alert in PostgreSQL", || {
        count(&db, "alerts") == N && count(&db, "sink_dead_letters") == 2
    });
    assert_eq!(summary.writes.duplicates, 0);
    assert_eq!(summary.writes.written as usize, N - survived, "the restart wrote only what was missing");
    assert_eq!(alert_ids(|q| db.sql(q)), expected_ids(N));
    assert_offsets_at_end(|q| db.sql(q), &broker);
}

/// The sink's lag gauge for the partitions it holds, summed, from the process's metrics.
fn sink_lag() -> i64 {
    metronome::metrics::render()
        .lines()
        .filter(|l| l.starts_with("metronome_sink_lag_records{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

fn metric(name: &str) -> f64 {
    metronome::metrics::render()
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn postgres_stopped_then_restarted_every_alert_arrives_once() {
    let broker = setup(20);
    let mut cluster = PrivateCluster::start();
    let rt = runtime();
    let shutdown = CancellationToken::new();
    let handle = rt.spawn(sink(&cluster.url(), &broker, 10).run(shutdown.clone()));
    let rows = |c: &PrivateCluster| -> usize { c.count("alerts") };
    wait_until("the first 20 alerts", || rows(&cluster) == 20);
    wait_until("the lag gauge at 0", || sink_lag() == 0);

    cluster.stop();
    produce_alerts(&broker, 20..45);
    wait_until("the sink to notice and retry", || metric("metronome_sink_retries_total") >= 2.0);
    wait_until("the lag gauge to show the waiting alerts", || sink_lag() == 25);
    assert_eq!(metric("metronome_sink_postgres_connected"), 0.0);

    cluster.resume();
    wait_until("all 45 alerts", || rows(&cluster) == 45);
    wait_until("the lag gauge back at 0", || sink_lag() == 0);
    shutdown.cancel();
    let summary = rt.block_on(handle).unwrap().unwrap();
    assert!(summary.retries >= 2);
    assert_eq!(summary.writes.duplicates, 0);
    assert_eq!(summary.writes.written, 45);
    assert_eq!(metric("metronome_sink_postgres_connected"), 1.0);
    assert_eq!(alert_ids(|q| cluster.sql(q)), expected_ids(45));
    assert_offsets_at_end(|q| cluster.sql(q), &broker);
}

#[test]
fn sslmode_is_honoured() {
    let cluster = PrivateCluster::start_with_tls();
    let rt = runtime();
    let port = cluster.port();
    let cert = cluster.certificate();
    let cert = cert.display();
    let ssl_in_use = |url: String| -> Result<bool, String> {
        rt.block_on(async {
            let target = PgTarget::parse(&url).map_err(|e| e.to_string())?;
            let client = target.connect().await.map_err(|e| e.to_string())?;
            let row = client
                .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok(row.get::<_, bool>(0))
        })
    };
    let db = |host: &str, query: &str| format!("postgresql://postgres@{host}:{port}/metronome?{query}");
    assert_eq!(ssl_in_use(db("127.0.0.1", "sslmode=disable")), Ok(false));
    assert_eq!(ssl_in_use(db("127.0.0.1", "sslmode=prefer")), Ok(true));
    assert_eq!(ssl_in_use(db("127.0.0.1", "sslmode=require")), Ok(true));
    // The certificate names localhost: verify-ca ignores the name, verify-full does not.
    assert_eq!(ssl_in_use(db("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={cert}"))), Ok(true));
    assert_eq!(ssl_in_use(db("localhost", &format!("sslmode=verify-full&sslrootcert={cert}"))), Ok(true));
    let wrong_name = ssl_in_use(db("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={cert}")));
    assert!(wrong_name.is_err(), "{wrong_name:?}");
    // A root that did not sign the server's certificate: refused even by verify-ca.
    let other = tempfile::NamedTempFile::new().unwrap();
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-keyout", "/dev/null", "-out"])
        .arg(other.path())
        .output()
        .unwrap();
    assert!(made.status.success());
    let other = other.path().display();
    let untrusted = ssl_in_use(db("localhost", &format!("sslmode=verify-ca&sslrootcert={other}")));
    assert!(untrusted.is_err(), "{untrusted:?}");
    // And with TLS required against a server without it, no plain-text fallback.
    let plain = PrivateCluster::start();
    let refused = ssl_in_use(format!("postgresql://postgres@127.0.0.1:{}/metronome?sslmode=require", plain.port()));
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        ssl_in_use(format!("postgresql://postgres@127.0.0.1:{}/metronome?sslmode=prefer", plain.port())),
        Ok(false)
    );
}
