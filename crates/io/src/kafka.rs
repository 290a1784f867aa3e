//! The one way a Kafka client is made: the operator's `[kafka]` properties first
//! (`bootstrap.servers`, `security.protocol`, `sasl.*`, `ssl.*`, tuning), then what the client's
//! role needs. So every client (processor, sink, agent, archive, probes and tools) reaches
//! Apache Kafka, Confluent, MSK or Redpanda alike, and a role's guarantees cannot be undone by
//! a property.
//!
//! A role's setting is one of two kinds:
//! - [`ClientBuilder::set`]: what its correctness rests on (idempotence, isolation, commits),
//!   applied over the properties;
//! - [`ClientBuilder::set_default`]: a default the operator may tune (batching, backoff), applied
//!   only where the properties say nothing.

use std::collections::BTreeMap;

use rdkafka::config::{FromClientConfig, FromClientConfigAndContext};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientConfig, ClientContext};

/// A client configuration under construction. Each method returns the builder, so a role reads
/// as one chain ending in [`create`](Self::create) or [`create_with_context`](Self::create_with_context).
#[derive(Debug, Clone)]
#[must_use = "a builder makes nothing until create is called"]
pub struct ClientBuilder {
    config: ClientConfig,
}

impl ClientBuilder {
    /// A client with the operator's `properties`.
    pub fn new(properties: &BTreeMap<String, String>) -> Self {
        let mut config = ClientConfig::new();
        for (key, value) in properties {
            config.set(key, value);
        }
        Self { config }
    }

    /// Sets `key` whatever the properties say.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.config.set(key, value);
        self
    }

    /// Sets `key` unless the properties already do.
    pub fn set_default(mut self, key: &str, value: impl Into<String>) -> Self {
        if self.config.get(key).is_none() {
            self.config.set(key, value);
        }
        self
    }

    /// Names the client in the broker's logs and quotas.
    pub fn client_id(self, id: impl Into<String>) -> Self {
        self.set("client.id", id)
    }

    /// Reads committed records only: an aborted transaction's output is never seen.
    pub fn read_committed(self) -> Self {
        self.set("isolation.level", "read_committed")
    }

    /// A consumer that is assigned partitions instead of joining a group and commits nothing.
    /// librdkafka refuses `assign` without a group id ("Unknown group"), so `placeholder` names
    /// one that is never joined.
    pub fn assigned_reader(self, placeholder: impl Into<String>) -> Self {
        self.set_default("group.id", placeholder).set("enable.auto.commit", "false")
    }

    /// Reports reaching the end of each partition (readers that stop there, restores).
    pub fn partition_eof(self) -> Self {
        self.set("enable.partition.eof", "true")
    }

    /// An idempotent producer: retries never duplicate or reorder a partition's records.
    pub fn idempotent(self) -> Self {
        self.set("enable.idempotence", "true")
    }

    /// The configuration as built, for a client that is recreated later (a fenced producer).
    pub fn into_config(self) -> ClientConfig {
        self.config
    }

    /// Creates the client.
    pub fn create<T: FromClientConfig>(self) -> KafkaResult<T> {
        self.config.create()
    }

    /// Creates the client with `context` (rebalance callbacks, statistics, delivery reports).
    pub fn create_with_context<C: ClientContext, T: FromClientConfigAndContext<C>>(self, context: C) -> KafkaResult<T> {
        self.config.create_with_context(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn a_roles_guarantees_override_the_properties_and_its_defaults_do_not() {
        let props = properties(&[
            ("bootstrap.servers", "b:9092"),
            ("isolation.level", "read_uncommitted"),
            ("enable.idempotence", "false"),
            ("linger.ms", "50"),
        ]);
        let config = ClientBuilder::new(&props)
            .read_committed()
            .idempotent()
            .set_default("linger.ms", "5")
            .set_default("compression.type", "lz4")
            .into_config();
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(config.get("isolation.level"), Some("read_committed"));
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("linger.ms"), Some("50"), "the operator's tuning stays");
        assert_eq!(config.get("compression.type"), Some("lz4"));
    }

    #[test]
    fn an_assigned_reader_commits_nothing_and_keeps_a_configured_group() {
        let plain = ClientBuilder::new(&properties(&[("enable.auto.commit", "true")]))
            .assigned_reader("metronome-x")
            .into_config();
        assert_eq!(plain.get("group.id"), Some("metronome-x"));
        assert_eq!(plain.get("enable.auto.commit"), Some("false"));
        let named =
            ClientBuilder::new(&properties(&[("group.id", "ops")])).assigned_reader("metronome-x").into_config();
        assert_eq!(named.get("group.id"), Some("ops"));
    }

    #[test]
    fn a_client_is_created_without_reaching_a_broker() {
        let consumer: KafkaResult<rdkafka::consumer::BaseConsumer> =
            ClientBuilder::new(&properties(&[("bootstrap.servers", "127.0.0.1:1")]))
                .assigned_reader("metronome-test")
                .client_id("metronome-test")
                .create();
        assert!(consumer.is_ok());
        let bad: KafkaResult<rdkafka::consumer::BaseConsumer> =
            ClientBuilder::new(&properties(&[("no.such.property", "1")])).create();
        assert!(bad.is_err(), "librdkafka refuses an unknown property");
    }
}
