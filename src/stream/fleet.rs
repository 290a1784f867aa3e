//! The fleet stages' tasks: one per partition of a repartition topic, each with its store, its
//! checkpoint and the same exactly-once cycle as the processor's tasks (records in, one Kafka
//! transaction with the outputs, the changelog and the input position, then one store write).
//!
//! ```text
//!  processor tasks --fingerprint records, keyed by fingerprint-->  <app>-fleet-fingerprints-repartition
//!    Stage::Fingerprints (per partition): users per fingerprint  --candidates-->
//!                                                                   <app>-fleet-candidates-repartition (1 partition)
//!    Stage::Fleets: links between accounts, fleets  --one alert per settled fleet--> alert topic
//! ```
//!
//! Nothing here knows rdkafka: the transaction is [`TaskProducer`], so the in-memory twin of
//! `task`'s tests drives these too. `stages` runs them against Kafka.

use std::collections::BTreeMap;

use metronome_state::{Store, WriteBatch};
use prost::Message as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::task::{self, Checkpoint, TaskError, TaskProducer};
use metronome_core::detect::fleet::{FingerprintUsers, FleetConfig, FleetGraph, GraphChange, Link, Member};
use metronome_core::wire::{self, DeadLetterClass, InputRecord, OutRecord, OutTopic};

/// Users per fingerprint: `[NS_FINGERPRINT] + fingerprint (8 bytes, big-endian)`.
const NS_FINGERPRINT: u8 = 0x02;
/// The stage's event time (latest sighting).
const STREAM_TIME_KEY: &[u8] = &[0x03];
/// A link: `[NS_LINK] + len(a) + a + len(b) + b`.
const NS_LINK: u8 = 0x04;
/// A fleet member: `[NS_MEMBER] + name`.
const NS_MEMBER: u8 = 0x05;
/// Version byte in front of every stored value.
const VALUE_FORMAT: u8 = 1;

/// Which stage a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Counts the distinct users of each fingerprint; emits candidates.
    Fingerprints,
    /// Links the accounts of candidates into fleets; emits fleet alerts.
    Fleets,
}

/// What a stage's batch borrows.
#[derive(Debug, Clone, Copy)]
pub struct StageContext<'a> {
    /// Fleet settings.
    pub cfg: &'a FleetConfig,
    /// Processing time, µs since the epoch (fleets settle in it; alerts carry it).
    pub now_us: i64,
    /// The topic the task consumes, for dead-letter headers.
    pub source_topic: &'a str,
    /// The detector's version, in fleet alerts.
    pub model_version: &'a str,
}

/// What one stage batch did (counts only).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StageOutcome {
    /// Records consumed.
    pub records: u64,
    /// Records set aside, by class.
    pub dead_letters: Vec<DeadLetterClass>,
    /// Candidates sent on.
    pub candidates: u64,
    /// Fleet alerts produced.
    pub alerts: u64,
    /// Entries expired from the store.
    pub expired: u64,
    /// Whether a transaction committed.
    pub committed: bool,
}

/// One partition's stage task.
#[derive(Debug)]
pub struct StageTask<S> {
    stage: Stage,
    partition: i32,
    store: S,
    checkpoint: Checkpoint,
    /// The fleet graph (the [`Stage::Fleets`] task's whole state, mirrored from its store).
    graph: FleetGraph,
    stream_time_us: i64,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    wire::versioned(VALUE_FORMAT, value)
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, TaskError> {
    wire::unversioned(VALUE_FORMAT, bytes).ok_or(TaskError::CorruptState(what))
}

fn fingerprint_key(fingerprint: u64) -> Vec<u8> {
    let mut key = vec![NS_FINGERPRINT];
    key.extend_from_slice(&fingerprint.to_be_bytes());
    key
}

fn push_name(key: &mut Vec<u8>, name: &str) {
    key.extend_from_slice(&(name.len() as u16).to_be_bytes());
    key.extend_from_slice(name.as_bytes());
}

fn link_key(a: &str, b: &str) -> Vec<u8> {
    let mut key = vec![NS_LINK];
    push_name(&mut key, a);
    push_name(&mut key, b);
    key
}

fn split_name(bytes: &[u8]) -> Option<(String, &[u8])> {
    let (len, rest) = bytes.split_at_checked(2)?;
    let (name, rest) = rest.split_at_checked(usize::from(u16::from_be_bytes([len[0], len[1]])))?;
    Some((std::str::from_utf8(name).ok()?.to_owned(), rest))
}

fn member_key(name: &str) -> Vec<u8> {
    let mut key = vec![NS_MEMBER];
    key.extend_from_slice(name.as_bytes());
    key
}

impl<S: Store> StageTask<S> {
    /// Opens the task over a store consistent with the committed input position (restored).
    pub fn open(stage: Stage, partition: i32, store: S) -> Result<Self, TaskError> {
        let checkpoint = task::read_checkpoint(&store)?;
        let mut t = Self { stage, partition, store, checkpoint, graph: FleetGraph::default(), stream_time_us: 0 };
        t.reload()?;
        Ok(t)
    }

    /// Reads the in-memory parts back from the store (at open, and after a failed batch).
    fn reload(&mut self) -> Result<(), TaskError> {
        self.stream_time_us = match self.store.get(STREAM_TIME_KEY)? {
            Some(bytes) => decode(&bytes, "stage time")?,
            None => 0,
        };
        if self.stage == Stage::Fleets {
            let mut links = Vec::new();
            for (key, value) in self.store.scan_prefix(&[NS_LINK])? {
                let (a, rest) = split_name(&key[1..]).ok_or(TaskError::CorruptState("link key"))?;
                let (b, _) = split_name(rest).ok_or(TaskError::CorruptState("link key"))?;
                links.push(((a, b), decode::<Link>(&value, "link")?));
            }
            let mut members = Vec::new();
            for (key, value) in self.store.scan_prefix(&[NS_MEMBER])? {
                let name = std::str::from_utf8(&key[1..]).map_err(|_| TaskError::CorruptState("member key"))?;
                members.push((name.to_owned(), decode::<Member>(&value, "member")?));
            }
            self.graph = FleetGraph::from_parts(links, members, self.stream_time_us);
        }
        Ok(())
    }

    /// What the store reflects.
    pub fn checkpoint(&self) -> Checkpoint {
        self.checkpoint
    }

    /// The store, for shutdown and tests.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Links the fleet graph holds (the [`Stage::Fleets`] task's).
    #[cfg(test)]
    pub fn links(&self) -> usize {
        self.graph.links()
    }

    /// Processes `records` (consecutive, from this partition), then commits through `producer`
    /// and the store. The [`Stage::Fleets`] task also decides fleets, so it is run with no
    /// records now and then (fleets settle in processing time). On an error nothing was written
    /// and the caller rewinds to [`StageTask::checkpoint`].
    pub fn run_batch<P: TaskProducer>(
        &mut self,
        ctx: &StageContext<'_>,
        records: &[InputRecord],
        producer: &mut P,
    ) -> Result<StageOutcome, TaskError> {
        let mut outcome = StageOutcome { records: records.len() as u64, ..StageOutcome::default() };
        // A task that never consumed a record has nothing to decide and no position to commit.
        let Some(next_offset) = records.last().map(|r| r.offset + 1).or(self.checkpoint.input_offset) else {
            return Ok(outcome);
        };
        let mut out = Vec::new();
        let mut writes = WriteBatch::new();
        let result = match self.stage {
            Stage::Fingerprints => self.count_users(ctx, records, &mut out, &mut writes, &mut outcome),
            Stage::Fleets => self.decide_fleets(ctx, records, &mut out, &mut writes, &mut outcome),
        };
        let committed = result.and_then(|()| {
            if records.is_empty() && out.is_empty() && writes.is_empty() {
                return Ok(false);
            }
            self.commit(producer, &out, writes, next_offset)?;
            Ok(true)
        });
        match committed {
            Ok(c) => {
                outcome.committed = c;
                Ok(outcome)
            }
            Err(e) => {
                // The graph and the stage time ran ahead of the store: back to what it holds.
                self.reload()?;
                Err(e)
            }
        }
    }

    fn count_users(
        &mut self,
        ctx: &StageContext<'_>,
        records: &[InputRecord],
        out: &mut Vec<OutRecord>,
        writes: &mut WriteBatch,
        outcome: &mut StageOutcome,
    ) -> Result<(), TaskError> {
        let mut touched: BTreeMap<u64, FingerprintUsers> = BTreeMap::new();
        let start_time = self.stream_time_us;
        for record in records {
            let (fingerprint, seen) = match wire::decode_fingerprint(record) {
                Ok(decoded) => decoded,
                Err(class) => {
                    self.set_aside(ctx, record, class, out, outcome);
                    continue;
                }
            };
            self.stream_time_us = self.stream_time_us.max(seen.at_us);
            let users = match touched.entry(fingerprint) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(match self.store.get(&fingerprint_key(fingerprint))? {
                        Some(bytes) => decode(&bytes, "fingerprint users")?,
                        None => FingerprintUsers::default(),
                    })
                }
            };
            if let Some(candidate) = users.observe(ctx.cfg, fingerprint, &seen) {
                out.push(wire::candidate_record(&candidate));
                outcome.candidates += 1;
            }
        }
        for (fingerprint, users) in &touched {
            task::put_logged(out, writes, fingerprint_key(*fingerprint), encode(users));
        }
        if self.stream_time_us != start_time {
            task::put_logged(out, writes, STREAM_TIME_KEY.to_vec(), encode(&self.stream_time_us));
        }
        Ok(())
    }

    /// Sends a record that does not decode to the dead-letter topic with its class.
    fn set_aside(
        &self,
        ctx: &StageContext<'_>,
        record: &InputRecord,
        class: DeadLetterClass,
        out: &mut Vec<OutRecord>,
        outcome: &mut StageOutcome,
    ) {
        outcome.dead_letters.push(class);
        out.push(wire::dead_letter(record, class, ctx.source_topic, self.partition));
    }

    fn decide_fleets(
        &mut self,
        ctx: &StageContext<'_>,
        records: &[InputRecord],
        out: &mut Vec<OutRecord>,
        writes: &mut WriteBatch,
        outcome: &mut StageOutcome,
    ) -> Result<(), TaskError> {
        for record in records {
            match wire::decode_candidate(record) {
                Ok(candidate) => self.graph.observe(&candidate),
                Err(class) => self.set_aside(ctx, record, class, out, outcome),
            }
        }
        for report in self.graph.decide(ctx.cfg, ctx.now_us) {
            let alert = wire::fleet_alert_message(&report, ctx.model_version, ctx.now_us);
            out.push(OutRecord {
                topic: OutTopic::Alerts,
                key: Some(alert.user_id.as_bytes().to_vec()),
                value: Some(alert.encode_to_vec()),
                headers: Vec::new(),
            });
            outcome.alerts += 1;
        }
        for change in self.graph.take_changes() {
            match change {
                GraphChange::Link(a, b, Some(link)) => task::put_logged(out, writes, link_key(&a, &b), encode(&link)),
                GraphChange::Link(a, b, None) => task::delete_logged(out, writes, link_key(&a, &b)),
                GraphChange::Member(m, Some(member)) => task::put_logged(out, writes, member_key(&m), encode(&member)),
                GraphChange::Member(m, None) => task::delete_logged(out, writes, member_key(&m)),
                GraphChange::StreamTime(t) => {
                    self.stream_time_us = t;
                    task::put_logged(out, writes, STREAM_TIME_KEY.to_vec(), encode(&t));
                }
            }
        }
        Ok(())
    }

    /// Deletes the fingerprints nobody produced within the window (store and changelog, in a
    /// transaction with the unchanged input position). Only the [`Stage::Fingerprints`] task
    /// has any; the fleet graph expires its own as it decides.
    pub fn expire<P: TaskProducer>(&mut self, ctx: &StageContext<'_>, producer: &mut P) -> Result<u64, TaskError> {
        let horizon =
            self.stream_time_us.saturating_sub(i64::try_from(ctx.cfg.window_s * 1_000_000).unwrap_or(i64::MAX));
        let (Stage::Fingerprints, Some(position)) = (self.stage, self.checkpoint.input_offset) else { return Ok(0) };
        let mut out = Vec::new();
        let mut writes = WriteBatch::new();
        for (key, value) in self.store.scan_prefix(&[NS_FINGERPRINT])? {
            let users: FingerprintUsers = decode(&value, "fingerprint users")?;
            if users.newest_us().is_none_or(|t| t < horizon) {
                task::delete_logged(&mut out, &mut writes, key);
            }
        }
        if out.is_empty() {
            return Ok(0);
        }
        let expired = out.len() as u64;
        self.commit(producer, &out, writes, position)?;
        self.store.compact()?;
        Ok(expired)
    }

    /// Commits `out` with the input position `next_offset`, then writes `writes` and the new
    /// checkpoint to the store.
    fn commit<P: TaskProducer>(
        &mut self,
        producer: &mut P,
        out: &[OutRecord],
        mut writes: WriteBatch,
        next_offset: i64,
    ) -> Result<(), TaskError> {
        let end = task::transact(producer, out, next_offset)?;
        let checkpoint = Checkpoint {
            input_offset: Some(next_offset),
            changelog_offset: end.unwrap_or(self.checkpoint.changelog_offset),
        };
        task::put_checkpoint(&mut writes, checkpoint);
        self.store.write(&writes)?;
        self.checkpoint = checkpoint;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::task::twin::MemoryProducer;
    use metronome_core::detect::fleet::Candidate;
    use metronome_core::proto;
    use metronome_state::MemoryStore;

    const S: i64 = 1_000_000;

    fn cfg() -> FleetConfig {
        FleetConfig { settle_s: 10, ..FleetConfig::default() }
    }

    fn ctx(cfg: &FleetConfig, now_s: i64) -> StageContext<'_> {
        StageContext { cfg, now_us: now_s * S, source_topic: "in", model_version: "timing-1" }
    }

    fn as_input(records: &[OutRecord], first_offset: i64) -> Vec<InputRecord> {
        records
            .iter()
            .enumerate()
            .map(|(i, r)| InputRecord {
                offset: first_offset + i as i64,
                key: r.key.clone(),
                payload: r.value.clone(),
                ..InputRecord::default()
            })
            .collect()
    }

    fn sightings(fingerprint: u64, users: &[&str], at_s: i64) -> Vec<OutRecord> {
        users.iter().map(|u| wire::fingerprint_record(fingerprint, u, at_s * S)).collect()
    }

    /// The store a restore from `producer`'s committed changelog gives, with the checkpoint
    /// recovery writes (the committed input position).
    fn restored(producer: &MemoryProducer) -> MemoryStore {
        let mut store = MemoryStore::new();
        let mut batch = WriteBatch::new();
        for r in producer.committed.iter().filter(|r| r.topic == OutTopic::Changelog) {
            task::apply_changelog_record(&mut batch, r.key.as_deref().unwrap(), r.value.as_deref());
        }
        let position = producer.positions.last().copied();
        task::put_checkpoint(
            &mut batch,
            Checkpoint { input_offset: position, changelog_offset: producer.changelog_len },
        );
        store.write(&batch).unwrap();
        store
    }

    fn of_topic(producer: &MemoryProducer, topic: OutTopic) -> Vec<&OutRecord> {
        producer.committed.iter().filter(|r| r.topic == topic).collect()
    }

    #[test]
    fn a_fingerprint_shared_by_enough_users_becomes_one_candidate_and_garbage_a_dead_letter() {
        let c = cfg();
        let mut t = StageTask::open(Stage::Fingerprints, 0, MemoryStore::new()).unwrap();
        let mut p = MemoryProducer::default();
        let mut input = sightings(7, &["a", "b", "a"], 1);
        input.push(OutRecord {
            topic: OutTopic::Fingerprints,
            key: Some(vec![1]),
            value: Some(vec![9]),
            headers: vec![],
        });
        input.extend(sightings(7, &["c", "c"], 2));
        input.extend(sightings(8, &["a"], 2));
        let outcome = t.run_batch(&ctx(&c, 0), &as_input(&input, 0), &mut p).unwrap();
        assert_eq!((outcome.records, outcome.candidates, outcome.dead_letters.len()), (7, 1, 1));
        let candidates = of_topic(&p, OutTopic::FleetCandidates);
        let candidate = wire::decode_candidate(&as_input(&[candidates[0].clone()], 0)[0]).unwrap();
        assert_eq!(
            candidate,
            Candidate { fingerprint: 7, users: vec!["a".into(), "b".into(), "c".into()], at_us: 2 * S }
        );
        let dead = of_topic(&p, OutTopic::DeadLetters);
        assert_eq!(dead[0].value, Some(vec![9]), "the record is kept as it came");
        assert_eq!(p.positions, [7]);
        // Restored from its changelog, the task goes on as if it had never stopped.
        let mut again = StageTask::open(Stage::Fingerprints, 0, restored(&p)).unwrap();
        let more = sightings(7, &["d"], 3);
        let outcome = again.run_batch(&ctx(&c, 0), &as_input(&more, 7), &mut p).unwrap();
        assert_eq!(outcome.candidates, 1, "a fourth user: the candidate again, with all four");
    }

    #[test]
    fn fingerprints_nobody_produced_within_the_window_expire() {
        let c = FleetConfig { window_s: 60, ..cfg() };
        let mut t = StageTask::open(Stage::Fingerprints, 0, MemoryStore::new()).unwrap();
        let mut p = MemoryProducer::default();
        let mut input = sightings(1, &["a"], 0);
        input.extend(sightings(2, &["b"], 100));
        t.run_batch(&ctx(&c, 0), &as_input(&input, 0), &mut p).unwrap();
        assert_eq!(t.expire(&ctx(&c, 0), &mut p).unwrap(), 1);
        assert_eq!(t.store().scan_prefix(&[NS_FINGERPRINT]).unwrap().len(), 1);
        assert_eq!(restored(&p).scan_prefix(&[NS_FINGERPRINT]).unwrap().len(), 1, "the changelog agrees");
        assert_eq!(t.expire(&ctx(&c, 0), &mut p).unwrap(), 0);
    }

    fn candidates(groups: &[(u64, &[&str], i64)]) -> Vec<OutRecord> {
        groups
            .iter()
            .map(|(f, users, at)| {
                wire::candidate_record(&Candidate {
                    fingerprint: *f,
                    users: users.iter().map(|u| (*u).to_owned()).collect(),
                    at_us: at * S,
                })
            })
            .collect()
    }

    fn fleet_alerts(p: &MemoryProducer) -> Vec<proto::Alert> {
        of_topic(p, OutTopic::Alerts)
            .iter()
            .map(|r| <proto::Alert as prost::Message>::decode(r.value.as_deref().unwrap()).unwrap())
            .collect()
    }

    const SIX: [&str; 6] = ["u1", "u2", "u3", "u4", "u5", "u6"];

    #[test]
    fn a_settled_fleet_gives_one_alert_naming_every_account_even_across_a_restart() {
        let c = cfg();
        let mut t = StageTask::open(Stage::Fleets, 0, MemoryStore::new()).unwrap();
        let mut p = MemoryProducer::default();
        let input = candidates(&[(1, &SIX[..3], 1), (2, &SIX[..4], 2), (3, &SIX[2..], 3), (4, &SIX[1..], 4)]);
        let first = t.run_batch(&ctx(&c, 100), &as_input(&input, 0), &mut p).unwrap();
        assert_eq!(first.alerts, 0, "not settled yet");
        // A restart before the fleet settled: the new owner restores and decides later.
        let mut t = StageTask::open(Stage::Fleets, 0, restored(&p)).unwrap();
        assert_eq!(t.links(), 13, "every pair that shared a candidate");
        assert_eq!(t.run_batch(&ctx(&c, 105), &[], &mut p).unwrap().alerts, 0);
        let settled = t.run_batch(&ctx(&c, 110), &[], &mut p).unwrap();
        assert!(settled.committed && settled.alerts == 1);
        assert_eq!(p.positions.last(), Some(&4), "a decision commits the unchanged input position");
        let alerts = fleet_alerts(&p);
        assert_eq!(alerts.len(), 1);
        let fleet = alerts[0].fleet.as_ref().unwrap();
        assert_eq!(fleet.accounts, SIX);
        assert_eq!(fleet.new_accounts, SIX);
        assert_eq!((alerts[0].user_id.as_str(), alerts[0].scorers.as_slice()), ("u1", &["fleet".to_owned()][..]));
        // Restarted again after the alert: nothing is reported twice.
        let mut t = StageTask::open(Stage::Fleets, 0, restored(&p)).unwrap();
        assert_eq!(t.run_batch(&ctx(&c, 500), &[], &mut p).unwrap().alerts, 0);
        assert_eq!(fleet_alerts(&p).len(), 1);
    }

    #[test]
    fn an_aborted_decision_is_made_again_and_reported_once() {
        let c = cfg();
        let mut t = StageTask::open(Stage::Fleets, 0, MemoryStore::new()).unwrap();
        let mut p = MemoryProducer::default();
        let input = candidates(&[(1, &SIX[..3], 1), (2, &SIX[..3], 2)]);
        t.run_batch(&ctx(&c, 100), &as_input(&input, 0), &mut p).unwrap();
        p.fail_next_commit = true;
        assert!(t.run_batch(&ctx(&c, 200), &[], &mut p).is_err());
        assert!(fleet_alerts(&p).is_empty());
        assert_eq!(t.run_batch(&ctx(&c, 201), &[], &mut p).unwrap().alerts, 1, "the graph went back to the store's");
        assert_eq!(fleet_alerts(&p).len(), 1);
        assert_eq!(t.run_batch(&ctx(&c, 202), &[], &mut p).unwrap().alerts, 0);
    }

    #[test]
    fn undecodable_candidates_are_set_aside_and_the_stage_goes_on() {
        let c = cfg();
        let mut t = StageTask::open(Stage::Fleets, 0, MemoryStore::new()).unwrap();
        let mut p = MemoryProducer::default();
        let bad = InputRecord { payload: Some(vec![1, 0xff, 0xff]), ..InputRecord::default() };
        let outcome = t.run_batch(&ctx(&c, 1), &[bad], &mut p).unwrap();
        assert_eq!(outcome.dead_letters, [DeadLetterClass::FleetRecord]);
        assert_eq!(p.positions, [1]);
    }
}
