//! End to end on a real broker: the processor's rate (RocksDB state, timing rules and LSTM on)
//! next to a bare rdkafka consumer reading the same topic, in the same run.
//!
//! `cargo bench --bench stream` (needs the test broker, see README; `../shared/data` for the
//! human typing). `STREAM_BENCH_EVENTS` sets the event count (default 1,000,000). Records are
//! cut as the agent sends them, every 100 ms of typing or 50 events (1-2 events a record for
//! human typing); `STREAM_BENCH_EVENTS_PER_RECORD=N` cuts them by count instead, N a record.
//! Not `METRONOME_*` names, which the `metronome` child processes would read as configuration.

#[allow(dead_code)]
#[path = "../tests/common/broker.rs"]
mod broker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use metronome::detect::{Detector, DetectorConfig};
use metronome::keylog::KeylogReader;
use metronome::lstm::{LstmModel, ReloadingModel};
use metronome::stream::publish::RecordShape;
use metronome::stream::{Processor, Shutdown, StreamConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

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
    broker.create_topics(&["events"], PARTITIONS);
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
    let processor = processor_seconds(&broker, &props, dir.path().join("state"));
    let bare_2 = bare_consumer_seconds(&broker, published.records);
    let bare = (bare_1 + bare_2) / 2.0;
    let events = published.events as f64;
    println!(
        "stream/bare_consumer: {:.0} events/s ({:.2} s, runs {:.2} s and {:.2} s)",
        events / bare,
        bare,
        bare_1,
        bare_2
    );
    println!(
        "stream/processor:     {:.0} events/s ({:.2} s; RocksDB state, timing rules + LSTM, exactly-once)",
        events / processor,
        processor
    );
    println!("stream/ratio:         processor at {:.1} % of the bare consumer", 100.0 * bare / processor);
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

/// Runs the processor until it has committed the whole topic; seconds from all tasks ready.
fn processor_seconds(broker: &broker::Broker, props: &BTreeMap<String, String>, state: PathBuf) -> f64 {
    let cfg = StreamConfig {
        application_id: format!("bench-{}", std::process::id()),
        input_topic: "events".into(),
        alerts_topic: "alerts".into(),
        dlq_topic: "dlq".into(),
        state_dir: state,
        topic_partitions: PARTITIONS,
        ..StreamConfig::default()
    };
    let group = cfg.application_id.clone();
    let detector = Detector::new(DetectorConfig::default()).unwrap();
    let model = ReloadingModel::fixed(LstmModel::embedded().unwrap());
    let processor =
        Processor::new(cfg, props.clone(), detector, Duration::from_secs(10), Some(model), Duration::from_secs(3600))
            .unwrap();
    let status = processor.status();
    let shutdown = Shutdown::new();
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
    shutdown.trigger();
    let summary = handle.join().unwrap().expect("processor run");
    eprintln!("processor summary: {summary:?}");
    secs
}
