//! The Kafka contracts the exactly-once tests and the archive rely on, on the Apache Kafka the
//! harness starts: transactions commit and abort, a transactional id taken over fences its old
//! owner, `read_committed` readers see committed records only, watermarks count records, a
//! reader resuming mid-batch gets the rest of the batch, and offsets can be looked up by
//! timestamp. Checked with librdkafka, as the processor uses it.

mod common;

use std::time::Duration;

use common::broker::Broker;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

const T: Duration = Duration::from_secs(30);

fn transactional(broker: &Broker, id: &str) -> ThreadedProducer<DefaultProducerContext> {
    let p: ThreadedProducer<DefaultProducerContext> =
        broker.config().set("transactional.id", id).set("linger.ms", "5").create().unwrap();
    p.init_transactions(T).unwrap();
    p
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, values: &[&str]) {
    for v in values {
        p.send(BaseRecord::<(), str>::to(topic).partition(0).payload(*v)).unwrap();
    }
}

/// Values of partition 0 of `topic` from `from`, read with `isolation`.
fn read(broker: &Broker, topic: &str, from: i64, isolation: &str) -> Vec<(i64, String)> {
    let consumer: BaseConsumer = broker
        .config()
        .set("group.id", "reader")
        .set("isolation.level", isolation)
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(from)).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    loop {
        match consumer.poll(T).expect("the read reaches the end of the partition") {
            Ok(m) => {
                use rdkafka::message::Message as _;
                out.push((m.offset(), String::from_utf8(m.payload().unwrap().to_vec()).unwrap()));
            }
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Waits until `read_committed` readers of partition 0 see `n` records. A committed
/// transaction becomes visible once the coordinator has written its markers, which Kafka does
/// after answering the commit.
fn wait_visible(broker: &Broker, topic: &str, n: usize) {
    common::wait_until("the committed transaction to become visible", || {
        read(broker, topic, 0, "read_committed").len() >= n
    });
}

fn values(records: &[(i64, String)]) -> Vec<&str> {
    records.iter().map(|(_, v)| v.as_str()).collect()
}

#[test]
fn read_committed_sees_committed_transactions_only() {
    let broker = Broker::start();
    broker.create_topics(&["t"], 1);
    let p = transactional(&broker, "tx-a");
    p.begin_transaction().unwrap();
    send(&p, "t", &["c1", "c2"]);
    p.commit_transaction(T).unwrap();
    p.begin_transaction().unwrap();
    send(&p, "t", &["a1", "a2", "a3"]);
    p.flush(T).unwrap();
    p.abort_transaction(T).unwrap();
    p.begin_transaction().unwrap();
    send(&p, "t", &["c3"]);
    p.commit_transaction(T).unwrap();
    wait_visible(&broker, "t", 3);

    assert_eq!(values(&read(&broker, "t", 0, "read_committed")), ["c1", "c2", "c3"]);
    assert_eq!(values(&read(&broker, "t", 0, "read_uncommitted")), ["c1", "c2", "a1", "a2", "a3", "c3"]);
}

#[test]
fn a_transaction_left_open_is_aborted_when_its_id_is_taken_over() {
    let broker = Broker::start();
    broker.create_topics(&["t"], 1);
    let old = transactional(&broker, "tx-z");
    old.begin_transaction().unwrap();
    send(&old, "t", &["zombie"]);
    old.flush(T).unwrap();
    // A new owner of the transactional id fences the old one and aborts what it left open.
    let new = transactional(&broker, "tx-z");
    new.begin_transaction().unwrap();
    send(&new, "t", &["fresh"]);
    new.commit_transaction(T).unwrap();
    wait_visible(&broker, "t", 1);
    assert_eq!(values(&read(&broker, "t", 0, "read_committed")), ["fresh"]);
    assert!(old.commit_transaction(T).is_err(), "the fenced producer cannot commit");
}

#[test]
fn watermarks_count_records_and_a_mid_batch_reader_gets_the_rest_of_the_batch() {
    let broker = Broker::start();
    broker.create_topics(&["t"], 1);
    let records: Vec<(Vec<u8>, Vec<u8>)> = (0..50).map(|i| (b"k".to_vec(), format!("v{i}").into_bytes())).collect();
    broker.produce("t", &records);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    assert_eq!(consumer.fetch_watermarks("t", 0, T).unwrap(), (0, 50));
    let tail = read(&broker, "t", 45, "read_committed");
    assert_eq!(tail.first().map(|r| r.0), Some(45));
    assert_eq!(values(&tail), ["v45", "v46", "v47", "v48", "v49"]);
}

#[test]
fn offsets_are_found_by_record_timestamp() {
    let broker = Broker::start();
    broker.create_topics(&["t"], 1);
    let p = transactional(&broker, "tx-t");
    p.begin_transaction().unwrap();
    for (i, ts) in [1_000i64, 2_000, 3_000].iter().enumerate() {
        p.send(BaseRecord::<(), str>::to("t").partition(0).payload(&format!("r{i}")).timestamp(*ts)).unwrap();
    }
    p.commit_transaction(T).unwrap();
    wait_visible(&broker, "t", 3);
    let consumer: BaseConsumer = broker.config().set("group.id", "times").create().unwrap();
    let at = |ts: i64| {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Offset(ts)).unwrap();
        consumer.offsets_for_times(tpl, T).unwrap().elements()[0].offset()
    };
    assert_eq!(at(500), Offset::Offset(0));
    assert_eq!(at(1_000), Offset::Offset(0));
    assert_eq!(at(1_500), Offset::Offset(1));
    assert_eq!(at(3_000), Offset::Offset(2));
    // Past every data record: the commit marker, which Kafka stamps with the commit's own time
    // and indexes like a record, or the end. Either way no data record is skipped or repeated by
    // a reader that starts there (the archive reads a day as [start, end) of such lookups and
    // checks the records on both sides of each).
    assert!(matches!(at(9_000), Offset::Offset(3) | Offset::End), "after the last record: {:?}", at(9_000));
}
