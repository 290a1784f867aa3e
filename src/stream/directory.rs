//! Which instance owns which input partition, and where to reach it over HTTP: each processor
//! announces its assignment on a compacted topic (`<application_id>-instances`, keyed by
//! instance) after every rebalance and withdraws it on a clean stop; every instance reads the
//! topic, so any of them can tell a caller where to ask about a user.
//!
//! A crashed instance's announcement stays until the partitions' new owners announce theirs:
//! the latest announcement claiming a partition wins.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metronome_io::kafka::ClientBuilder;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// One instance's claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The instance.
    pub instance: String,
    /// Its HTTP base URL (`http.advertised_url`), empty when it serves none.
    pub url: String,
    /// The input partitions it owns.
    pub partitions: Vec<i32>,
    /// When it announced, microseconds since the epoch.
    pub at_us: i64,
}

/// The latest announcement that claims `partition`.
pub fn owner_of(announcements: &BTreeMap<String, Announcement>, partition: i32) -> Option<&Announcement> {
    announcements.values().filter(|a| a.partitions.contains(&partition)).max_by_key(|a| a.at_us)
}

/// Publishes this instance's announcements.
pub struct Announcer {
    producer: BaseProducer,
    topic: String,
    instance: String,
    url: String,
}

impl Announcer {
    /// An announcer for `instance` reachable at `url`, with the `[kafka]` properties.
    pub fn new(
        properties: &BTreeMap<String, String>,
        topic: &str,
        instance: &str,
        url: &str,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let producer =
            ClientBuilder::new(properties).client_id(format!("{instance}-directory")).idempotent().create()?;
        Ok(Self { producer, topic: topic.to_owned(), instance: instance.to_owned(), url: url.to_owned() })
    }

    /// Announces `partitions` as this instance's (empty: withdraws with a tombstone).
    pub fn announce(&self, partitions: &[i32]) {
        let at_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let value = (!partitions.is_empty()).then(|| {
            serde_json::to_vec(&Announcement {
                instance: self.instance.clone(),
                url: self.url.clone(),
                partitions: partitions.to_vec(),
                at_us,
            })
            .unwrap_or_default()
        });
        let mut record = BaseRecord::<str, [u8]>::to(&self.topic).key(self.instance.as_str());
        if let Some(v) = value.as_deref() {
            record = record.payload(v);
        }
        if let Err((e, _)) = self.producer.send(record) {
            tracing::warn!(error = %e, "announcing the assignment failed; queries will be sent elsewhere");
            return;
        }
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "announcing the assignment timed out");
        }
    }
}

/// Reads every instance's announcements on a background thread.
pub struct DirectoryReader {
    announcements: Arc<RwLock<BTreeMap<String, Announcement>>>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DirectoryReader {
    /// Starts reading `topic` (partition 0, from the beginning) with the `[kafka]` properties.
    pub fn start(properties: &BTreeMap<String, String>, topic: &str) -> Result<Self, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer = ClientBuilder::new(properties)
            .assigned_reader(format!("metronome-directory-{}", std::process::id()))
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let announcements = Arc::new(RwLock::new(BTreeMap::new()));
        let stop = CancellationToken::new();
        let (map, stopping) = (Arc::clone(&announcements), stop.clone());
        let thread = std::thread::Builder::new()
            .name("directory".into())
            .spawn(move || {
                while !stopping.is_cancelled() {
                    let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
                    let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else { continue };
                    let mut map = map.write().unwrap_or_else(|p| p.into_inner());
                    match m.payload().map(serde_json::from_slice::<Announcement>) {
                        Some(Ok(a)) => {
                            map.insert(key.to_owned(), a);
                        }
                        None => {
                            map.remove(key);
                        }
                        Some(Err(_)) => {}
                    }
                }
            })
            .expect("spawning the directory thread");
        Ok(Self { announcements, stop, thread: Some(thread) })
    }

    /// The announcement of `partition`'s owner, if one claimed it.
    pub fn owner_of(&self, partition: i32) -> Option<Announcement> {
        owner_of(&self.announcements.read().unwrap_or_else(|p| p.into_inner()), partition).cloned()
    }
}

impl Drop for DirectoryReader {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_claim_wins() {
        let a = |instance: &str, partitions: &[i32], at_us| Announcement {
            instance: instance.into(),
            url: format!("http://{instance}:9464"),
            partitions: partitions.to_vec(),
            at_us,
        };
        let mut map = BTreeMap::new();
        map.insert("a".to_owned(), a("a", &[0, 1], 10));
        map.insert("b".to_owned(), a("b", &[1, 2], 20));
        assert_eq!(owner_of(&map, 0).unwrap().instance, "a");
        assert_eq!(owner_of(&map, 1).unwrap().instance, "b", "b took 1 over after a crashed");
        assert!(owner_of(&map, 3).is_none());
    }
}
