//! The real-broker harness: starts the test broker (tansu's Kafka-compatible broker with the
//! transaction APIs it lacks, `tools/test-broker`) on a free loopback port with in-memory
//! storage, runs `metronome process` instances against it, and reads topics back.
//!
//! The broker binary comes from `TEST_BROKER_BIN`, `~/.cargo/bin/metronome-test-broker`
//! or `PATH`; `scripts/test` installs it when missing. A missing broker fails the test loudly.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// How long any wait in these tests may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(120);

const BROKER_BINARY: &str = "metronome-test-broker";

/// Finds the test broker binary.
pub fn broker_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TEST_BROKER_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let cached = home.join(".cargo/bin").join(BROKER_BINARY);
    if cached.is_file() {
        return cached;
    }
    if let Some(found) = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(BROKER_BINARY)).find(|p| p.is_file()))
    {
        return found;
    }
    panic!(
        "the test broker is not installed: these tests need a real Kafka-compatible broker. \
         Run scripts/setup (scripts/test does) to build tools/test-broker into ~/.cargo/bin"
    );
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes a simulated keylog to `out` with `metronome simulate`: `users` users replayed from
/// the real typing in `../shared/data/aalto-b-train.csv.gz`, plus `extra` flags.
pub fn simulate_keylog(out: &Path, users: u64, extra: &[&str]) {
    let humans = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/aalto-b-train.csv.gz");
    assert!(humans.is_file(), "real typing data missing at {}: see README, 'Data'", humans.display());
    let status = Command::new(env!("CARGO_BIN_EXE_metronome"))
        .args(["simulate", "--users", &users.to_string()])
        .args(extra)
        .arg("--humans")
        .arg(&humans)
        .arg("--output")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "metronome simulate failed");
}

/// A running broker, stopped on drop.
pub struct Broker {
    child: Child,
    /// `host:port` for `bootstrap.servers`.
    pub bootstrap: String,
    log_dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker and waits until it answers metadata requests.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// [`Broker::start`] on a given loopback port (a client already aims at it).
    pub fn start_on(port: u16) -> Self {
        let url = format!("tcp://127.0.0.1:{port}");
        let log_dir = tempfile::tempdir().unwrap();
        let log = File::create(log_dir.path().join("broker.log")).unwrap();
        let child = Command::new(broker_binary())
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            // The group coordinator's joins, leaders and departures, for failure messages.
            .env("RUST_LOG", "warn,tansu_broker::coordinator=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the test broker");
        let broker = Broker { child, bootstrap: format!("127.0.0.1:{port}"), log_dir };
        let consumer: BaseConsumer = broker.config().create().unwrap();
        let deadline = Instant::now() + PATIENCE;
        while consumer.fetch_metadata(None, Duration::from_secs(1)).is_err() {
            assert!(Instant::now() < deadline, "the test broker did not answer on {}", broker.bootstrap);
        }
        broker
    }

    /// A client configuration for this broker.
    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    /// Creates topics with `partitions` each.
    pub fn create_topics(&self, names: &[&str], partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let topics: Vec<NewTopic<'_>> =
            names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
        let results = futures::executor::block_on(admin.create_topics(&topics, &AdminOptions::new())).unwrap();
        for r in results {
            r.unwrap_or_else(|(name, code)| panic!("creating {name}: {code}"));
        }
    }

    /// Produces `(key, payload)` records to `topic` and waits until all are acknowledged.
    pub fn produce(&self, topic: &str, records: &[(Vec<u8>, Vec<u8>)]) {
        let producer = metronome::stream::publish::producer(&BTreeMap::from([(
            "bootstrap.servers".to_owned(),
            self.bootstrap.clone(),
        )]))
        .unwrap();
        for (k, v) in records {
            metronome::stream::publish::send(&producer, topic, k, v).unwrap();
        }
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).unwrap();
    }

    /// The end offset of every partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> BTreeMap<i32, i64> {
        let consumer: BaseConsumer = self.config().create().unwrap();
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let partitions = md.topics()[0].partitions().len() as i32;
        (0..partitions).map(|p| (p, consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1)).collect()
    }

    /// Waits until `group` has committed every partition of `topic` up to its end offset.
    pub fn wait_fully_committed(&self, group: &str, topic: &str) {
        self.wait_fully_committed_every(group, topic, Duration::from_millis(100));
    }

    /// [`Broker::wait_fully_committed`], checking every `interval` (the benchmark times the
    /// commit itself, not the next check after it).
    pub fn wait_fully_committed_every(&self, group: &str, topic: &str, interval: Duration) {
        let ends = self.end_offsets(topic);
        // While a transaction's offsets are pending the broker answers "unstable", and
        // librdkafka asks again after retry.backoff.ms (100 ms by default): the wait would
        // report a commit up to 100 ms late.
        let consumer: BaseConsumer =
            self.config().set("group.id", group).set("retry.backoff.ms", "5").create().unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut tpl = TopicPartitionList::new();
            for p in ends.keys() {
                tpl.add_partition(topic, *p);
            }
            let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
            let done = ends.iter().all(|(p, end)| {
                *end == 0
                    || matches!(committed.find_partition(topic, *p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= *end)
            });
            if done {
                return;
            }
            assert!(Instant::now() < deadline, "group {group} did not commit all of {topic} in time");
            std::thread::sleep(interval); // polling interval of a condition, not synchronisation by time
        }
    }

    /// Every committed record of `topic` (read_committed), read to the current end.
    pub fn read_all(&self, topic: &str) -> Vec<Record> {
        let consumer: BaseConsumer = self
            .config()
            .set("group.id", "metronome-tests-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let ends = self.end_offsets(topic);
        let mut tpl = TopicPartitionList::new();
        for p in ends.keys() {
            tpl.add_partition_offset(topic, *p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut at_end = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        while at_end.len() < ends.len() {
            assert!(Instant::now() < deadline, "reading {topic} did not reach its end");
            match consumer.poll(Duration::from_secs(1)) {
                Some(Ok(m)) => out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                                .collect()
                        })
                        .unwrap_or_default(),
                }),
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        out
    }

    /// Committed alerts on `topic`, decoded.
    pub fn alerts(&self, topic: &str) -> Vec<metronome::proto::Alert> {
        self.read_all(topic)
            .into_iter()
            .map(|r| metronome::proto::Alert::decode(r.payload.as_deref().unwrap()).expect("alerts decode"))
            .collect()
    }

    /// Waits until at least `n` alerts are committed on `topic`; returns them all.
    pub fn wait_for_alerts(&self, topic: &str, n: usize) -> Vec<metronome::proto::Alert> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let alerts = self.alerts(topic);
            if alerts.len() >= n {
                return alerts;
            }
            assert!(Instant::now() < deadline, "only {} of {n} alerts arrived on {topic}", alerts.len());
            std::thread::sleep(Duration::from_millis(200)); // polling interval of a condition
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A consumed record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A `metronome process` child process with its log in a file.
pub struct ProcessorProc {
    child: Option<Child>,
    log: PathBuf,
    broker_log: PathBuf,
}

impl ProcessorProc {
    /// Starts `metronome process` against `broker` with `env` (METRONOME_* settings).
    pub fn start(broker: &Broker, state_dir: &Path, instance: &str, env: &[(String, String)], log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{instance}-{}.log", std::process::id() ^ rand_suffix()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_metronome"));
        for (k, _) in std::env::vars() {
            if k.starts_with("METRONOME_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["process", "--bootstrap-servers", &broker.bootstrap, "--instance-id", instance])
            .arg("--state-dir")
            .arg(state_dir)
            // No fixed port to collide on, no sink unless a test asks for one.
            .env("METRONOME_HTTP__LISTEN", "127.0.0.1:0")
            .env("METRONOME_POSTGRES__SINK_IN_PROCESS", "false")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn,metronome=info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let broker_log = broker.log_dir.path().join("broker.log");
        Self { child: Some(cmd.spawn().expect("starting metronome process")), log, broker_log }
    }

    /// Where its HTTP server listens, once it has logged it.
    pub fn http_addr(&mut self) -> String {
        self.wait_for_log("http serving", 1);
        let log = self.log();
        let line = log.lines().find(|l| l.contains("http serving")).unwrap();
        let addr = line.split("bound=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
        addr.to_owned()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` at least `times` times.
    pub fn wait_for_log(&mut self, needle: &str, times: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.log().matches(needle).count() >= times {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("processor exited ({status}) before logging {needle:?}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "processor never logged {needle:?} {times} times:\n{}\nthe broker's log ends:\n{}",
                self.log(),
                log_tail(&self.broker_log, 40)
            );
            std::thread::sleep(Duration::from_millis(100)); // polling interval of a condition
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "processor ignored SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50)); // polling interval of a condition
        }
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill_9(&mut self) {
        let mut child = self.child.take().expect("already stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The last `lines` lines of a log file, for failure messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn rand_suffix() -> u32 {
    use std::time::SystemTime;
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().subsec_nanos()
}

impl Drop for ProcessorProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
