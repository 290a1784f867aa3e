//! End to end on Apache Kafka (started here, as the tests start it): on one topic in one run, the
//! rates of a bare rdkafka consumer, the processor with both scorers (RocksDB state, timing
//! rules and LSTM), the processor with the timing rules alone, and the same timing job in Kafka
//! Streams (`benches/peers/kafka-streams`, exactly_once_v2, RocksDB store), and their ratios.
//!
//! `cargo bench --bench stream` (needs what `scripts/setup` installs: Kafka's jars, Java, the
//! Kafka Streams peer built; `../shared/data` for the human typing). `STREAM_BENCH_EVENTS` sets the event count (default 1,000,000). Records are
//! cut as the agent sends them, every 100 ms of typing or 50 events (1-2 events a record for
//! human typing); `STREAM_BENCH_EVENTS_PER_RECORD=N` cuts them by count instead, N a record.
//! Not `METRONOME_*` names, which the `metronome` child processes would read as configuration.

#[allow(dead_code)]
#[path = "../tests/common/broker.rs"]
mod broker;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use metronome::stream::publish::RecordShape;
use metronome::stream::{Processor, StreamConfig};
use metronome_core::detect::{Detector, DetectorConfig};
use metronome_core::keylog::KeylogReader;
use metronome_model::{LstmModel, ReloadingModel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 4;

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let target: u64 = env_number("STREAM_BENCH_EVENTS").unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let shape = match env_number("STREAM_BENCH_EVENTS_PER_RECORD") {
        Some(n) => RecordShape::by_count(n as usize),
        None => RecordShape::agent(50),
    };
    let broker = broker::Broker::start();
    // The Kafka Streams peer's output (the processors create their own topics).
    broker.create_topics(&["events", "alerts-kafka-streams"], PARTITIONS);
    let dir = tempfile::tempdir().unwrap();

    let keylog = dir.path().join("sim.csv");
    // Simulated users average about 1,330 events (humans replay Aalto sessions, 20 % are macro
    // users at 400 presses): enough users for at least the target.
    broker::simulate_keylog(&keylog, (target / 1_300).max(10), &["--macro-share", "0.2", "--macro-presses", "400"]);
    let props = BTreeMap::from([("bootstrap.servers".to_owned(), broker.bootstrap.clone())]);
    let producer = metronome::stream::publish::producer(&props).unwrap();
    let published = metronome::stream::publish::publish_keylog(
        &producer,
        "events",
        KeylogReader::open(&keylog).unwrap(),
        shape,
        Default::default(),
    )
    .unwrap();
    eprintln!(
        "published {} events of {} users as {} records ({:.2} events a record; {shape:?})",
        published.events,
        published.users,
        published.records,
        published.events as f64 / published.records as f64
    );

    let bare_1 = bare_consumer_seconds(&broker, published.records);
    let both = processor_seconds(&broker, &props, dir.path().join("state-both"), "both", true);
    let timing = processor_seconds(&broker, &props, dir.path().join("state-timing"), "timing", false);
    let streams = kafka_streams_seconds(&broker, &dir.path().join("state-kafka-streams"), published.records);
    let bare_2 = bare_consumer_seconds(&broker, published.records);
    let bare = (bare_1 + bare_2) / 2.0;
    let events = published.events as f64;
    let rate = |secs: f64| events / secs;
    println!(
        "stream/bare_consumer:      {:.0} events/s ({bare:.2} s, runs {bare_1:.2} s and {bare_2:.2} s)",
        rate(bare)
    );
    println!(
        "stream/processor:          {:.0} events/s ({both:.2} s; RocksDB state, timing rules + LSTM, exactly-once)",
        rate(both)
    );
    println!(
        "stream/processor_timing:   {:.0} events/s ({timing:.2} s; RocksDB state, timing rules only, exactly-once)",
        rate(timing)
    );
    println!(
        "stream/kafka_streams:      {:.0} events/s ({streams:.2} s; timing job, RocksDB store, exactly_once_v2)",
        rate(streams)
    );
    println!("stream/ratio: processor (both scorers) at {:.1} % of the bare consumer", 100.0 * bare / both);
    println!("stream/ratio: processor (timing only) at {:.1} % of the bare consumer", 100.0 * bare / timing);
    println!("stream/ratio: Kafka Streams (timing) at {:.1} % of the bare consumer", 100.0 * bare / streams);
    println!("stream/ratio: processor (both scorers) / Kafka Streams (timing): {:.2}x", streams / both);
    println!("stream/ratio: processor (timing only) / Kafka Streams (timing): {:.2}x", streams / timing);
}

/// A number from the environment; a value that does not parse is an error, not the default.
fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a number")))
}

/// Reads every record of the topic once; seconds from assignment to the last record. (Not to
/// the end-of-partition events: the broker answers a fetch at the end only after the fetch wait,
/// 500 ms, which would be counted against the bare consumer.) The consumer knows the topic's
/// leaders before the clock starts, as the processor's does once its tasks are ready: a client
/// assigned partitions whose leader it has not looked up yet retries the offset lookup only
/// after 500 ms, which would be counted against the bare consumer too. Its fetch queue pauses as
/// briefly as the processor's consumer's (with librdkafka's default, 1 s, both sat idle).
fn bare_consumer_seconds(broker: &broker::Broker, records: u64) -> f64 {
    let consumer: BaseConsumer = broker
        .config()
        .set("group.id", "bench-bare")
        .set("enable.auto.commit", "false")
        .set("fetch.queue.backoff.ms", metronome::stream::kafka::FETCH_QUEUE_BACKOFF_MS)
        .create()
        .unwrap();
    consumer.fetch_metadata(Some("events"), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset("events", p, Offset::Beginning).unwrap();
    }
    let started = Instant::now();
    consumer.assign(&tpl).unwrap();
    let (mut seen, mut bytes) = (0u64, 0usize);
    while seen < records {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(m)) => {
                seen += 1;
                bytes += rdkafka::message::Message::payload(&m).map_or(0, <[u8]>::len);
            }
            Some(Err(e)) => panic!("bare consumer: {e}"),
            None => panic!("bare consumer stalled after {seen} of {records} records"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(bytes > 0, "the bare consumer read the payloads");
    secs
}

/// Runs the processor (with the LSTM when `lstm`, else the timing rules alone) as application
/// `bench-NAME-PID` until it has committed the whole topic; seconds from all tasks ready.
fn processor_seconds(
    broker: &broker::Broker,
    props: &BTreeMap<String, String>,
    state: PathBuf,
    name: &str,
    lstm: bool,
) -> f64 {
    let cfg = StreamConfig {
        application_id: format!("bench-{name}-{}", std::process::id()),
        input_topic: "events".into(),
        alerts_topic: format!("alerts-{name}"),
        dlq_topic: format!("dlq-{name}"),
        state_dir: state,
        topic_partitions: PARTITIONS,
        ..StreamConfig::default()
    };
    let group = cfg.application_id.clone();
    let detector = Detector::new(DetectorConfig::default()).unwrap();
    let model = lstm.then(|| ReloadingModel::fixed(LstmModel::embedded().unwrap()));
    let processor =
        Processor::new(cfg, props.clone(), detector, Duration::from_secs(10), model, Duration::from_secs(3600))
            .unwrap();
    let status = processor.status();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handle = std::thread::spawn(move || processor.run(&stop));
    let deadline = Instant::now() + Duration::from_secs(600);
    while status.tasks().len() < PARTITIONS as usize || !status.tasks_restored() {
        assert!(Instant::now() < deadline && !handle.is_finished(), "processor never became ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    broker.wait_fully_committed_every(&group, "events", Duration::from_millis(5));
    let secs = started.elapsed().as_secs_f64();
    shutdown.cancel();
    let summary = handle.join().unwrap().expect("processor run");
    eprintln!("processor ({name}) summary: {summary:?}");
    secs
}

/// Runs the Kafka Streams peer with as many stream threads as the processor has task threads,
/// until its group has committed the whole topic; seconds from its tasks running (its `state
/// RUNNING` line), timed by the committed offsets as the processor is.
fn kafka_streams_seconds(broker: &broker::Broker, state: &Path, records: u64) -> f64 {
    let peer = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/peers/kafka-streams/target");
    let classpath = std::fs::read_to_string(peer.join("classpath")).unwrap_or_else(|_| {
        panic!("the Kafka Streams peer is not built ({}): run scripts/setup", peer.join("classpath").display())
    });
    let app = format!("bench-kafka-streams-{}", std::process::id());
    let threads = StreamConfig::default().task_threads().to_string();
    let log4j = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/kafka/log4j2.properties");
    let mut child = Command::new(broker::java())
        .args(["-Xms512m", "-Xmx2g"])
        .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
        .arg("-cp")
        .arg(format!("{}:{}", peer.join("classes").display(), classpath.trim()))
        .args(["dev.metronome.peer.TimingJob", &broker.bootstrap, "events", "alerts-kafka-streams", &app])
        .arg(state)
        .arg(&threads)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the Kafka Streams peer (java)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line == "state RUNNING" => break,
            Some(Ok(_)) => {}
            _ => panic!("the Kafka Streams peer exited before running: {:?}", child.wait()),
        }
    }
    let started = Instant::now();
    broker.wait_fully_committed_every(&app, "events", Duration::from_millis(5));
    let secs = started.elapsed().as_secs_f64();
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    // Its last line on stdout: the counts it printed as it closed.
    let summary = lines.map_while(Result::ok).last().unwrap_or_default();
    child.wait().unwrap();
    eprintln!("kafka streams summary: {summary}");
    let counts: serde_json::Value = serde_json::from_str(&summary)
        .unwrap_or_else(|_| panic!("the Kafka Streams peer printed no counts: {summary:?}"));
    assert_eq!(counts["records"].as_u64(), Some(records), "the Kafka Streams peer processed every record");
    secs
}
