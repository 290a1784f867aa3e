//! `metronome demo` end to end, as a person runs it on a fresh machine: nothing installed, the
//! built-in typing model for humans, the embedded Kafka cluster. A macro user must be flagged
//! within seconds, every macro user must be caught, no human may be flagged, and the alert page's
//! API must serve the alerts while the demo runs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `GET path` over a plain socket; the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> String {
    let (status, body) = common::http_get(addr, path, None);
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// The alerts counter reaches the alert shown. The demo's broker (librdkafka's mock cluster)
/// shows an alert before the processor's commit returns and counts it, so this waits for the
/// count, within the tests' patience.
fn assert_alerts_counted(addr: &str) {
    common::wait_until("the alert shown to be counted in /metrics", || {
        let counted: f64 = http_get(addr, "/metrics")
            .lines()
            .filter(|l| l.starts_with("metronome_alerts_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        counted >= 1.0
    });
}

/// Seconds since the demo started, from a line `[   7.4s] ALERT ...`.
fn alert_second(line: &str) -> f64 {
    line.trim_start_matches('[').split('s').next().unwrap().trim().parse().unwrap()
}

fn metronome() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metronome"));
    for (k, _) in std::env::vars() {
        if k.starts_with("METRONOME_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn the_demo_flags_macro_users_within_seconds_and_no_human() {
    let mut demo = metronome()
        .args(["demo", "--humans", "builtin", "--users", "12", "--typing-s", "45", "--listen", "127.0.0.1:0"])
        .args(["--duration-s", "170"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let stdout = BufReader::new(demo.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut page = None;
    let mut api_checked = false;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(url) = line.split("alert page   http://").nth(1) {
            page = Some(url.trim_end_matches('/').to_owned());
        }
        if line.contains("] ALERT ") && !api_checked {
            // The page's API serves what the terminal shows, while the demo runs.
            let addr = page.as_deref().expect("the page's address comes before any alert");
            let body = http_get(addr, "/api/alerts");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(json["count"].as_u64().unwrap() >= 1, "{body}");
            assert!(http_get(addr, "/").contains("<html"), "the alert page");
            assert_alerts_counted(addr);
            api_checked = true;
        }
        lines.push(line);
    }
    let status = demo.wait().unwrap();
    let text = lines.join("\n");
    assert!(status.success(), "{text}");
    assert!(started.elapsed() < Duration::from_secs(160), "the demo ends on its own once the traffic is scored");
    let alerts: Vec<&String> = lines.iter().filter(|l| l.contains("] ALERT ")).collect();
    let first = alerts.first().unwrap_or_else(|| panic!("no alert:\n{text}"));
    assert!(first.contains("macro ("), "{text}");
    assert!(alert_second(first) < 30.0, "the first macro user is flagged within 30 s:\n{text}");
    assert!(!text.contains("FALSE ALARM"), "no human flagged:\n{text}");
    let summary = lines.last().unwrap();
    // 12 users, a share of 0.3: 4 macro users, 8 humans.
    assert!(summary.contains("caught 4 of 4 macro users"), "{text}");
    assert!(summary.contains("0 of 8 humans flagged"), "{text}");
    assert!(api_checked);
}

#[test]
fn the_demo_writes_its_alerts_to_postgresql_when_given_a_url() {
    let db = common::postgres::TempDb::create();
    let out = metronome()
        .args(["demo", "--humans", "builtin", "--users", "10", "--typing-s", "25", "--listen", "127.0.0.1:0"])
        .args(["--duration-s", "120"])
        .env("METRONOME_POSTGRES_URL", db.url("sslmode=disable"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().filter_map(|l| l.split("] ALERT ").nth(1)).collect();
    let shown: std::collections::BTreeSet<String> =
        lines.iter().map(|l| l.split_whitespace().next().unwrap().to_owned()).collect();
    assert!(!shown.is_empty(), "{stdout}");
    let stored: std::collections::BTreeSet<String> =
        db.sql("SELECT DISTINCT user_id FROM alerts").lines().map(str::to_owned).collect();
    assert_eq!(stored, shown, "PostgreSQL holds the alerts the terminal showed:\n{stdout}");
    assert_eq!(db.count("alerts"), lines.len(), "each alert once");
}
