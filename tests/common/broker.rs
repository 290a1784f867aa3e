//! The real-broker harness: starts Apache Kafka (4.x, KRaft: broker and controller in one JVM)
//! on free loopback ports with its storage in a temporary directory, either one node or a
//! three-node cluster whose nodes a test can kill and restart; runs `metronome process`
//! instances against it, and reads topics back.
//!
//! Kafka's jars come from Maven Central through `tools/kafka/pom.xml`: `scripts/setup` resolves
//! them into Maven's local repository and writes their classpath to
//! `$METRONOME_CACHE_DIR/kafka/classpath` (default `~/.cache/metronome`); `TEST_KAFKA_CLASSPATH`
//! overrides it. Java comes from `JAVA_HOME` or `PATH`. Without either the tests fail loudly.

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

/// Where `scripts/setup` keeps what it resolved for the tests (`METRONOME_CACHE_DIR`, default
/// `~/.cache/metronome`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("METRONOME_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).expect("HOME is set");
    home.join(".cache/metronome")
}

/// The classpath of Kafka's broker and storage tool.
pub fn kafka_classpath() -> String {
    if let Ok(cp) = std::env::var("TEST_KAFKA_CLASSPATH") {
        return cp;
    }
    let file = cache_dir().join("kafka/classpath");
    match std::fs::read_to_string(&file) {
        Ok(cp) if !cp.trim().is_empty() => cp.trim().to_owned(),
        _ => panic!(
            "Apache Kafka is not resolved ({} is missing): these tests need a real broker. \
             Run scripts/setup (scripts/test does) to fetch it from Maven Central",
            file.display()
        ),
    }
}

pub fn java() -> PathBuf {
    match std::env::var_os("JAVA_HOME") {
        Some(home) => PathBuf::from(home).join("bin/java"),
        None => PathBuf::from("java"),
    }
}

/// A loopback port nothing listens on now, below the kernel's ephemeral range. A port the kernel
/// hands out for `:0` is in that range, and between its release here and a broker's bind the
/// kernel may give it to any outgoing connection as its local port (a broker once failed to
/// start on "Address already in use" that way); ports below the range are only ever bound on
/// purpose. Tried at random, so concurrent test processes seldom try the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_start.clamp(10_001, 65_535));
    let mut seed = rand_suffix()
        ^ std::process::id().rotate_left(16)
        ^ CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9);
    for _ in 0..1000 {
        // xorshift: a few independent draws from the seed.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let port = (low + seed % (high - low)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `(name, value)` pairs as the owned environment a processor is started with.
pub fn env_vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
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

/// One Kafka node (broker and controller in one JVM), its storage and log in `dir`.
struct Node {
    id: u32,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn config(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }

    /// Starts the JVM on this node's (formatted) storage; its output is appended to its log.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = File::options().create(true).append(true).open(self.log()).unwrap();
        let mut cmd = kafka_java();
        cmd.arg("kafka.Kafka").arg(self.config()).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        die_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().expect("starting Kafka (java)"));
    }

    /// SIGKILL: the node gets no chance to finish anything.
    fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `java` with Kafka's classpath and the options every node and tool runs with.
fn kafka_java() -> Command {
    let log4j = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/kafka/log4j2.properties");
    let mut cmd = Command::new(java());
    cmd.args(["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"])
        .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
        .arg("-cp")
        .arg(kafka_classpath());
    cmd
}

/// The JVM is killed when the thread that started it ends, so a test process that dies without
/// unwinding (a time-out, a signal) leaves no broker behind.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running Kafka cluster of one or three nodes, stopped (and its storage removed) on drop.
pub struct Broker {
    nodes: Vec<Node>,
    /// `host:port,...` of every node, for `bootstrap.servers`.
    pub bootstrap: String,
    log_dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a single-node cluster and waits until it answers metadata requests.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// [`Broker::start`] with its client listener on a given loopback port (a client already
    /// aims at it).
    pub fn start_on(port: u16) -> Self {
        Self::launch(&[port])
    }

    /// Starts a three-node cluster (every node a broker and a controller voter): topics and the
    /// transaction and offset logs replicated three times, `min.insync.replicas` 2, so one node
    /// can die without losing an acknowledged write or stopping transactions.
    pub fn start_cluster() -> Self {
        Self::launch(&[free_port(), free_port(), free_port()])
    }

    fn launch(ports: &[u16]) -> Self {
        let log_dir = tempfile::tempdir().unwrap();
        let controller_ports: Vec<u16> = ports.iter().map(|_| free_port()).collect();
        let voters: Vec<String> =
            controller_ports.iter().enumerate().map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1)).collect();
        let replication = ports.len().min(3);
        let min_isr = if replication >= 3 { 2 } else { 1 };
        let cluster_id = kafka_cluster_id();
        let mut nodes = Vec::new();
        for (i, (port, controller_port)) in ports.iter().zip(&controller_ports).enumerate() {
            let id = i as u32 + 1;
            let dir = log_dir.path().join(format!("node-{id}"));
            std::fs::create_dir_all(dir.join("data")).unwrap();
            let props = server_properties(
                id,
                *port,
                *controller_port,
                &voters.join(","),
                &dir.join("data"),
                replication,
                min_isr,
            );
            std::fs::write(dir.join("server.properties"), props).unwrap();
            nodes.push(Node { id, dir, child: None });
        }
        // Formatting is a JVM start of its own: all nodes at once.
        let formats: Vec<(u32, Child)> = nodes
            .iter()
            .map(|n| {
                let mut cmd = kafka_java();
                cmd.args(["kafka.tools.StorageTool", "format", &format!("--cluster-id={cluster_id}"), "--config"])
                    .arg(n.config())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                die_with_parent(&mut cmd);
                (n.id, cmd.spawn().expect("running Kafka's storage tool (java)"))
            })
            .collect();
        for (id, child) in formats {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "formatting node {id}'s storage failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for n in &mut nodes {
            n.spawn();
        }
        let bootstrap = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let broker = Broker { nodes, bootstrap, log_dir };
        broker.wait_brokers(ports.len());
        broker
    }

    /// Waits until `n` brokers are registered and the cluster answers metadata requests.
    fn wait_brokers(&self, n: usize) {
        let consumer: BaseConsumer = self.config().create().unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(1)) {
                if md.brokers().len() >= n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "Kafka did not answer with {n} brokers on {}:\n{}",
                self.bootstrap,
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100)); // polling interval of a condition
        }
    }

    /// SIGKILL of node `index` (a broker and a controller voter).
    pub fn kill_9_node(&mut self, index: usize) {
        self.nodes[index].kill_9();
    }

    /// Restarts node `index` on its storage and ports after [`Broker::kill_9_node`], and waits
    /// until every node is registered again.
    pub fn restart_node(&mut self, index: usize) {
        self.nodes[index].spawn();
        self.wait_brokers(self.nodes.len());
    }

    /// The node index of the leader of `topic`'s `partition`, if it has one now.
    pub fn leader_of(&self, topic: &str, partition: i32) -> Option<usize> {
        let consumer: BaseConsumer = self.config().create().unwrap();
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).ok()?;
        let p = md.topics().first()?.partitions().iter().find(|p| p.id() == partition)?;
        (p.leader() > 0).then(|| (p.leader() - 1) as usize)
    }

    /// The last `lines` lines of every node's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .map(|n| format!("-- node {} --\n{}", n.id, log_tail(&n.log(), lines)))
            .collect::<Vec<_>>()
            .join("\n")
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
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(self.nodes.len().min(3) as i32)))
            .collect();
        let results = futures::executor::block_on(admin.create_topics(&topics, &AdminOptions::new())).unwrap();
        for r in results {
            r.unwrap_or_else(|(name, code)| panic!("creating {name}: {code}"));
        }
        // The controller has them; wait until the brokers' metadata does too (a processor that
        // starts at once and finds no input topic exits, which a loaded machine made happen).
        let consumer: BaseConsumer = self.config().create().unwrap();
        let deadline = Instant::now() + PATIENCE;
        let visible = |name: &str| {
            consumer.fetch_metadata(Some(name), Duration::from_secs(10)).is_ok_and(|md| {
                md.topics().iter().any(|t| {
                    t.error().is_none()
                        && t.partitions().len() == partitions as usize
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                })
            })
        };
        while !names.iter().all(|n| visible(n)) {
            assert!(Instant::now() < deadline, "topics {names:?} did not become visible in time");
            std::thread::sleep(Duration::from_millis(50)); // polling interval of a condition
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

    /// The offset `group` has committed on `partition` of `topic` (0 before its first commit).
    pub fn committed_offset(&self, group: &str, topic: &str, partition: i32) -> i64 {
        let consumer = self.offsets_reader(group);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(committed) = committed_offsets(&consumer, tpl.clone()) {
                return match committed.find_partition(topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
            }
            assert!(Instant::now() < deadline, "group {group}'s coordinator did not answer in time");
            std::thread::sleep(Duration::from_millis(100)); // polling interval of a condition
        }
    }

    /// Waits until `group` has committed every partition of `topic` up to its end offset.
    pub fn wait_fully_committed(&self, group: &str, topic: &str) {
        self.wait_fully_committed_every(group, topic, Duration::from_millis(100));
    }

    /// [`Broker::wait_fully_committed`], checking every `interval` (the benchmark times the
    /// commit itself, not the next check after it).
    pub fn wait_fully_committed_every(&self, group: &str, topic: &str, interval: Duration) {
        let ends = self.end_offsets(topic);
        let consumer = self.offsets_reader(group);
        let deadline = Instant::now() + PATIENCE;
        while !fully_committed(&consumer, topic, &ends) {
            assert!(Instant::now() < deadline, "group {group} did not commit all of {topic} in time");
            std::thread::sleep(interval); // polling interval of a condition, not synchronisation by time
        }
    }

    /// Waits until `group` has committed every record of `topic`, a topic written in
    /// transactions: its end offsets count the commit markers, the group's positions do not.
    pub fn wait_records_committed(&self, group: &str, topic: &str) {
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        for r in self.read_all(topic) {
            let end = ends.entry(r.partition).or_insert(0);
            *end = (*end).max(r.offset + 1);
        }
        let consumer = self.offsets_reader(group);
        let deadline = Instant::now() + PATIENCE;
        while !fully_committed(&consumer, topic, &ends) {
            assert!(Instant::now() < deadline, "group {group} did not commit the records of {topic} in time");
            std::thread::sleep(Duration::from_millis(100)); // polling interval of a condition
        }
    }

    /// Whether `group` has committed every partition of `topic` up to its end offset now.
    pub fn is_fully_committed(&self, group: &str, topic: &str) -> bool {
        fully_committed(&self.offsets_reader(group), topic, &self.end_offsets(topic))
    }

    /// A client that reads `group`'s committed offsets. While a transaction's offsets are
    /// pending the broker answers "unstable", and librdkafka asks again after retry.backoff.ms
    /// (100 ms by default): a wait would report a commit up to 100 ms late.
    fn offsets_reader(&self, group: &str) -> BaseConsumer {
        self.config().set("group.id", group).set("retry.backoff.ms", "5").create().unwrap()
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
    pub fn alerts(&self, topic: &str) -> Vec<metronome_core::proto::Alert> {
        self.read_all(topic)
            .into_iter()
            .map(|r| metronome_core::proto::Alert::decode(r.payload.as_deref().unwrap()).expect("alerts decode"))
            .collect()
    }

    /// Waits until at least `n` alerts are committed on `topic`; returns them all.
    pub fn wait_for_alerts(&self, topic: &str, n: usize) -> Vec<metronome_core::proto::Alert> {
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
        for n in &mut self.nodes {
            n.kill_9();
        }
    }
}

/// A node's `server.properties`: broker and controller in one process on loopback, internal
/// topics sized for tests (few partitions, no rebalance delay), replicated `replication` times.
/// Topics are not created on first use (as on most managed clusters): what a test or the
/// processor needs it creates, with the partitions it means. Nothing expires: tests write
/// records stamped days in the past (the archive's), which Kafka's default retention (7 days
/// by record time) would delete at its first check, 30 s after start.
fn server_properties(
    id: u32,
    port: u16,
    controller_port: u16,
    voters: &str,
    data: &Path,
    replication: usize,
    min_isr: usize,
) -> String {
    format!(
        "process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=1
default.replication.factor={replication}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={replication}
offsets.topic.num.partitions=4
transaction.state.log.replication.factor={replication}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.ms=-1
",
        data = data.display()
    )
}

/// A fresh cluster id: 16 random bytes, base64url without padding, as `kafka-storage random-uuid`.
fn kafka_cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in uuid::Uuid::new_v4().into_bytes() {
        acc = ((acc << 8) | u32::from(byte)) & 0xffff;
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    out
}

/// Whether the group of `consumer` has committed every partition of `topic` up to `ends`.
fn fully_committed(consumer: &BaseConsumer, topic: &str, ends: &BTreeMap<i32, i64>) -> bool {
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    let Some(committed) = committed_offsets(consumer, tpl) else {
        return false;
    };
    ends.iter().all(|(p, end)| {
        *end == 0
            || matches!(committed.find_partition(topic, *p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= *end)
    })
}

/// A group's committed offsets for `tpl`, or `None` while its coordinator is moving or loading
/// (Kafka answers so right after the offsets topic is created and after a failover; the client
/// finds the coordinator again on the next call).
pub fn committed_offsets(consumer: &BaseConsumer, tpl: TopicPartitionList) -> Option<TopicPartitionList> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(committed) => Some(committed),
        Err(e) => match e.rdkafka_error_code() {
            Some(
                Code::NotCoordinator
                | Code::CoordinatorLoadInProgress
                | Code::CoordinatorNotAvailable
                | Code::RequestTimedOut
                | Code::OperationTimedOut,
            ) => None,
            _ => panic!("reading committed offsets: {e}"),
        },
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
    broker_logs: Vec<PathBuf>,
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
        let broker_logs = broker.nodes.iter().map(Node::log).collect();
        Self { child: Some(cmd.spawn().expect("starting metronome process")), log, broker_logs }
    }

    /// Where its HTTP server listens, once it has logged it.
    pub fn http_addr(&mut self) -> String {
        self.wait_for_log("http serving", 1);
        let log = self.log();
        let line = log.lines().find(|l| l.contains("http serving")).unwrap();
        let addr = line.split("bound=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
        addr.to_owned()
    }

    /// Its peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib * 1024
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` at least `times` times.
    pub fn wait_for_log(&mut self, needle: &str, times: usize) {
        let log = self.log.clone();
        self.wait_until(&format!("logging {needle:?} {times} times"), || {
            std::fs::read_to_string(&log).unwrap_or_default().matches(needle).count() >= times
        });
    }

    /// Waits until `condition` holds while the processor runs; fails with its log (and the
    /// brokers') if it exits first or the wait runs out.
    pub fn wait_until(&mut self, what: &str, condition: impl FnMut() -> bool) {
        self.wait_until_within(what, PATIENCE, condition);
    }

    /// [`Self::wait_until`] with a patience of its own, for work that takes longer.
    pub fn wait_until_within(&mut self, what: &str, patience: Duration, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + patience;
        while !condition() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("processor exited ({status}) before {what}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}\nthe broker's log ends:\n{}",
                self.log(),
                self.broker_logs.iter().map(|l| log_tail(l, 40)).collect::<Vec<_>>().join("\n--\n")
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
