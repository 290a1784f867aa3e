//! State retention in the processor, on Apache Kafka with RocksDB on disk: users idle past
//! `stream.state_retention_days` are deleted from the store and, as tombstones, from the
//! changelog on the retention timer; the metric counts them; recent users keep their state
//! throughout. A second group member that restores the partitions from the changelog knows the
//! recent users and not the pruned ones.

mod common;

use std::process::Command;
use std::time::SystemTime;

use common::broker::{env_vars, Broker, ProcessorProc};
use common::wait_until;
use metronome_core::event::{KeyAction, KeyEvent};
use metronome_core::wire::batches_for_user;
use serde_json::Value;

fn http_get(addr: &str, path: &str) -> String {
    let out = Command::new("curl").args(["-sSf", &format!("http://{addr}{path}")]).output().unwrap();
    assert!(out.status.success(), "GET {path}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn metric(addr: &str, name: &str) -> f64 {
    http_get(addr, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn user_known(addr: &str, user: &str) -> bool {
    let body: Value = serde_json::from_str(&http_get(addr, &format!("/api/users/{user}"))).unwrap();
    body["known"].as_bool().unwrap_or_else(|| panic!("no `known` in {body}"))
}

/// 40 presses of `user` from `start_us`.
fn typing(user: &str, start_us: i64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let events: Vec<KeyEvent> = (0..40i64)
        .flat_map(|i| {
            let t = start_us + i * 180_000 + (i * 7919 % 50) * 1000;
            [
                KeyEvent::new(t, 30 + (i % 9) as u32, KeyAction::Down),
                KeyEvent::new(t + 60_000, 30 + (i % 9) as u32, KeyAction::Up),
            ]
        })
        .collect();
    batches_for_user(user, "s", &events, 20).into_iter().map(|p| (user.as_bytes().to_vec(), p)).collect()
}

#[test]
fn users_idle_past_retention_leave_store_and_changelog_and_recent_users_stay() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let app = "retention";
    broker.create_topics(&["r.events", "r.alerts", "r.dlq"], 2);
    let env = env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", app),
        ("METRONOME_STREAM__INPUT_TOPIC", "r.events"),
        ("METRONOME_STREAM__ALERTS_TOPIC", "r.alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "r.dlq"),
        ("METRONOME_STREAM__COMMIT_INTERVAL_MS", "50"),
        ("METRONOME_STREAM__STATE_RETENTION_DAYS", "7"),
        // A pass every second instead of nightly.
        ("METRONOME_STREAM__PRUNE_AT_UTC", "00:00"),
        ("METRONOME_STREAM__PRUNE_INTERVAL_S", "1"),
        ("METRONOME_KAFKA__SESSION_TIMEOUT_MS", "6000"),
        ("METRONOME_KAFKA__MAX_POLL_INTERVAL_MS", "15000"),
    ]);
    let now_us = metronome::agent::capture::epoch_us(SystemTime::now());
    let day_us = 86_400_000_000;
    let old_users = ["old-a", "old-b", "old-c"];
    let recent_users = ["recent-a", "recent-b"];
    let mut records = Vec::new();
    for (i, u) in old_users.iter().enumerate() {
        records.extend(typing(u, now_us - (30 + i as i64) * day_us));
    }
    for u in recent_users {
        records.extend(typing(u, now_us - day_us));
    }
    broker.produce("r.events", &records);

    let mut first = ProcessorProc::start(&broker, &dir.path().join("state-1"), "p1", &env, dir.path());
    let addr = first.http_addr();
    broker.wait_fully_committed(app, "r.events");
    wait_until("the old users to be pruned", || {
        metric(&addr, "metronome_state_pruned_users_total") >= old_users.len() as f64
    });
    assert!(metric(&addr, "metronome_state_prune_last_success_timestamp_seconds") > 0.0);
    for u in old_users {
        assert!(!user_known(&addr, u), "{u} is gone from the store");
    }
    for u in recent_users {
        assert!(user_known(&addr, u), "{u} is recent and kept");
    }
    assert!(first.terminate().success());

    // The changelog ends with a tombstone for every old user.
    let changelog = broker.read_all(&format!("{app}-user-state-changelog"));
    for u in old_users {
        let key = metronome::stream::task::user_key(u).unwrap();
        let last = changelog.iter().rfind(|r| r.key.as_deref() == Some(key.as_slice()));
        assert!(last.is_some_and(|r| r.payload.is_none()), "{u}'s last changelog record is a tombstone");
    }

    // A second member of the group, with no local state, takes both partitions over and
    // restores them from the changelog.
    let mut second = ProcessorProc::start(&broker, &dir.path().join("state-2"), "p2", &env, dir.path());
    let addr = second.http_addr();
    second.wait_for_log("task ready", 2);
    let replayed: u64 = second
        .log()
        .lines()
        .filter(|l| l.contains("task ready"))
        .map(|l| l.split("replayed=").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()).unwrap())
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    assert!(replayed > 0, "the second member restored from the changelog:\n{}", second.log());
    for u in old_users {
        assert!(!user_known(&addr, u), "{u} stays gone after a restore");
    }
    for u in recent_users {
        assert!(user_known(&addr, u), "{u} is restored");
    }
    assert!(second.terminate().success());
}
