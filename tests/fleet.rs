//! Fleets on Apache Kafka: six accounts running one script among real humans give exactly one
//! `fleet` alert naming the six; after a restart on an empty state directory the fingerprint
//! store comes back from its changelog, so a seventh account running the script later joins
//! the same fleet in a second alert.

mod common;

use std::path::Path;

use common::broker::{env_vars, Broker, ProcessorProc};
use metronome_core::event::KeyEvent;
use metronome_core::keylog::{self, KeylogReader};
use metronome_core::macrogen::{self, FleetScript, MacroFamily, MacroSpec};
use metronome_core::proto;
use metronome_core::wire::batches_for_user;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const APP: &str = "app-fleet";

fn env() -> Vec<(String, String)> {
    env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", APP),
        ("METRONOME_STREAM__INPUT_TOPIC", "events"),
        ("METRONOME_STREAM__ALERTS_TOPIC", "alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "dlq"),
        ("METRONOME_STREAM__COMMIT_INTERVAL_MS", "50"),
        ("METRONOME_STREAM__TOPIC_PARTITIONS", "4"),
        ("METRONOME_DETECTOR__WINDOW__IDLE_TIMEOUT_MS", "3000"),
        // Long enough for the whole published fleet to be processed before it settles.
        ("METRONOME_DETECTOR__FLEET__SETTLE_S", "10"),
        ("METRONOME_KAFKA__SESSION_TIMEOUT_MS", "6000"),
    ])
}

fn publish(broker: &Broker, users: &[(String, Vec<KeyEvent>)]) {
    let mut records = Vec::new();
    for (user, events) in users {
        for payload in batches_for_user(user, "s", events, 40) {
            records.push((user.as_bytes().to_vec(), payload));
        }
    }
    broker.produce("events", &records);
}

fn fleet_alerts(broker: &Broker) -> Vec<proto::Alert> {
    broker.alerts("alerts").into_iter().filter(|a| a.fleet.is_some()).collect()
}

fn start(broker: &Broker, dir: &Path, instance: &str) -> ProcessorProc {
    ProcessorProc::start(broker, &dir.join(instance), instance, &env(), dir)
}

#[test]
fn six_accounts_on_one_script_give_one_fleet_alert_and_a_restart_restores_the_fingerprints() {
    let broker = Broker::start();
    broker.create_topics(&["events", "alerts", "dlq"], 4);
    let dir = tempfile::tempdir().unwrap();
    let reader = KeylogReader::open(&common::shared_data("aalto-a-train.csv.gz")).unwrap();
    let mut humans = keylog::group_by_user(reader, |_| true, Some(13)).unwrap();
    let source = humans.pop().unwrap().1;

    // The script: random keys with flights and holds drawn from one human's, the family no
    // per-account scorer catches reliably. Six accounts play it within a minute of each other.
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    let spec = MacroSpec::random(MacroFamily::HumanIid, &mut rng);
    let script = FleetScript::generate(&spec, &macrogen::recorded_presses(&source), 400, &mut rng);
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    let start_us = now_us - 600_000_000;
    let played = macrogen::fleet(&script, 6, start_us, 60_000_000, 600, &mut rng);
    let six: Vec<String> = (1..=6).map(|i| format!("fleet-account-{i}")).collect();
    let mut users: Vec<(String, Vec<KeyEvent>)> = six.iter().cloned().zip(played).collect();
    // Real humans typing at the same time.
    for (user, events) in &humans {
        let first = events.iter().map(|e| e.time_us).min().unwrap();
        let shifted = events.iter().map(|e| KeyEvent { time_us: e.time_us - first + start_us, ..*e }).collect();
        users.push((format!("human-{user}"), shifted));
    }
    publish(&broker, &users);

    let mut a = start(&broker, dir.path(), "a");
    a.wait_until("a fleet alert", || !fleet_alerts(&broker).is_empty());
    broker.wait_fully_committed(APP, "events");
    let fingerprints = format!("{APP}-fleet-fingerprints-repartition");
    broker.wait_records_committed(&format!("{APP}-fleet"), &fingerprints);
    broker.wait_records_committed(&format!("{APP}-fleet"), &format!("{APP}-fleet-candidates-repartition"));
    let alerts = fleet_alerts(&broker);
    assert_eq!(alerts.len(), 1, "one alert for the fleet: {alerts:#?}");
    let fleet = alerts[0].fleet.clone().unwrap();
    assert_eq!(fleet.accounts, six, "every account of the fleet and no human");
    assert_eq!(fleet.new_accounts, six);
    assert!(fleet.links >= 5 && fleet.fingerprints >= 2, "{fleet:?}");
    assert_eq!(alerts[0].user_id, six[0]);
    assert_eq!(alerts[0].scorers, ["fleet"]);
    assert_eq!(alerts[0].reasons, ["fleet"]);
    // Fingerprints travel keyed by themselves, as Kafka Streams repartitions.
    let repartitioned = broker.read_all(&fingerprints);
    assert!(!repartitioned.is_empty());
    assert!(repartitioned.iter().all(|r| r.key.as_ref().is_some_and(|k| k.len() == 8)));
    let status = a.terminate();
    assert!(status.success(), "{}", a.log());

    // A new instance with nothing on disk: the fingerprint store is rebuilt from its changelog.
    let mut b = start(&broker, dir.path(), "b");
    b.wait_for_log("fleet stage opened", 2);
    let log = b.log();
    let restored: u64 = log
        .lines()
        .filter(|l| l.contains("fleet stage opened") && l.contains("Fingerprints"))
        .filter_map(|l| l.split("replayed=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(restored > 0, "the fingerprint store came back from its changelog:\n{log}");
    // A seventh account runs the script later: only the restored fingerprints link it.
    let seventh = "fleet-account-7".to_owned();
    let later = script.play(now_us, 17, 600, 3_000, &mut rng);
    publish(&broker, &[(seventh.clone(), later)]);
    b.wait_until("a second fleet alert", || fleet_alerts(&broker).len() >= 2);
    broker.wait_fully_committed(APP, "events");
    let alerts = fleet_alerts(&broker);
    assert_eq!(alerts.len(), 2, "{alerts:#?}");
    let grown = alerts[1].fleet.clone().unwrap();
    let mut seven = six.clone();
    seven.push(seventh.clone());
    assert_eq!(grown.accounts, seven);
    assert_eq!(grown.new_accounts, [seventh]);
    assert_eq!(alerts.iter().filter(|a| a.alert_id == alerts[0].alert_id).count(), 1, "the first alert once");
    let status = b.terminate();
    assert!(status.success(), "{}", b.log());
}
