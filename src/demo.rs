//! `metronome demo`: the whole pipeline on one machine with nothing installed.
//!
//! ```text
//!  simulated users, typing in real time --> [keys.events] --> processor (RocksDB in a temp dir,
//!  (real recordings or the built-in model;     ^              timing rules + LSTM)
//!   some switch a macro on part-way)           |                   |
//!                                  embedded Kafka cluster    [keys.alerts] --> this terminal
//!                                  (librdkafka's mock, or         |        --> the alert page
//!                                   --bootstrap-servers)          +--> PostgreSQL (--postgres-url)
//! ```
//!
//! The embedded cluster is librdkafka's mock cluster, which has no transactions, so the demo's
//! processor runs at least once (alerts keep their deterministic ids, and the terminal and the
//! page show each once); against a real broker it runs exactly once, as configured. Because the
//! demo made the traffic, it knows who is a macro user and when each macro started, and says for
//! every alert how long after the macro's start it came, or that it was a false alarm.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::agent::capture::epoch_us;
use crate::config::Config;
use crate::http::{AlertDb, RecentAlerts};
use crate::service::{service_runtime, shutdown_on_signal, Service};
use crate::simulate::{self, Humans, SimulatedUser, SimulationPlan, Truth};
use crate::stream::alerts::follow_until;
use crate::stream::config::{Guarantee, FLEET_CANDIDATES, FLEET_FINGERPRINTS, USER_STATE_STORE};
use crate::stream::publish::{self, Pace, RecordShape};
use metronome_core::alert_json::alert_json;
use metronome_core::event::KeyEvent;
use metronome_core::macrogen::MacroFamily;
use metronome_core::proto;
use tokio_util::sync::CancellationToken;

/// Partitions of the embedded cluster's topics.
const DEMO_PARTITIONS: i32 = 4;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated users.
    pub users: usize,
    /// Share of them that switch a macro on.
    pub macro_share: f64,
    /// Real recordings to replay as humans; `None`: the built-in typing model.
    pub recordings: Option<Vec<Vec<KeyEvent>>>,
    /// How long each user types (event time), at most.
    pub typing: Duration,
    /// Stop after this long whatever is left; `None`: once the traffic is sent and scored.
    pub duration: Option<Duration>,
    /// Where the HTTP server listens (port 0: any free port).
    pub listen: SocketAddr,
    /// A real broker instead of the embedded cluster.
    pub bootstrap_servers: Option<String>,
    /// PostgreSQL for the alerts (the sink runs in the processor).
    pub postgres_url: Option<String>,
    /// RNG seed of the simulation.
    pub seed: u64,
}

/// What the demo saw.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DemoSummary {
    /// Events published.
    pub events: u64,
    /// Macro users simulated, and how many were caught.
    pub macro_users: usize,
    /// Macro users with at least one alert.
    pub caught: usize,
    /// Humans simulated.
    pub humans: usize,
    /// Humans with an alert (false alarms).
    pub humans_flagged: usize,
    /// Seconds from the demo's start to the first alert.
    pub first_alert_s: Option<f64>,
    /// Median seconds from a caught user's macro onset to their first alert.
    pub median_catch_s: Option<f64>,
}

/// Turns alerts into lines for people, knowing the ground truth.
struct Reporter {
    truths: HashMap<String, Truth>,
    started: Instant,
    seen: HashSet<String>,
    first_alert_s: Option<f64>,
    /// User -> seconds from the macro onset (or the demo start, for humans) to the first alert.
    flagged: HashMap<String, f64>,
    recent: Arc<RecentAlerts>,
}

impl Reporter {
    fn line(&mut self, alert: &proto::Alert, now_us: i64) -> Option<String> {
        if !self.seen.insert(alert.alert_id.clone()) {
            return None; // at least once: a repeat of an alert already shown
        }
        self.recent.add(alert_json(alert));
        let since_start = self.started.elapsed().as_secs_f64();
        self.first_alert_s.get_or_insert(since_start);
        let scorers = alert.scorers.join("+");
        let head = format!(
            "[{since_start:6.1}s] ALERT {:<28} score {:.2} ({scorers}: {})",
            alert.user_id,
            alert.score,
            alert.reasons.join(", ")
        );
        let verdict = match self.truths.get(&alert.user_id) {
            Some(Truth::Macro { family, onset_us }) => {
                let after_s = (now_us - onset_us) as f64 / 1e6;
                self.flagged.entry(alert.user_id.clone()).or_insert(after_s);
                format!("macro ({}) caught {after_s:.1}s after it started", family.name())
            }
            Some(Truth::Human) => {
                self.flagged.entry(alert.user_id.clone()).or_insert(since_start);
                "a human: FALSE ALARM".to_owned()
            }
            None => "not a simulated user".to_owned(),
        };
        Some(format!("{head}  {verdict}"))
    }

    fn summary(&self, events: u64) -> DemoSummary {
        let is_macro = |u: &str| matches!(self.truths.get(u), Some(Truth::Macro { .. }));
        let mut catches: Vec<f64> = self.flagged.iter().filter(|(u, _)| is_macro(u)).map(|(_, s)| *s).collect();
        catches.sort_by(f64::total_cmp);
        DemoSummary {
            events,
            macro_users: self.truths.keys().filter(|u| is_macro(u)).count(),
            caught: catches.len(),
            humans: self.truths.values().filter(|t| **t == Truth::Human).count(),
            humans_flagged: self.flagged.keys().filter(|u| self.truths.get(*u) == Some(&Truth::Human)).count(),
            first_alert_s: self.first_alert_s,
            median_catch_s: catches.get(catches.len() / 2).copied(),
        }
    }
}

/// The traffic: every user starts typing now, macro users switch on after 20-60 presses, and
/// no one types for longer than `typing`.
fn traffic(opts: &DemoOptions) -> Result<(SimulationPlan, Vec<SimulatedUser>), String> {
    let plan = SimulationPlan {
        users: opts.users,
        macro_share: opts.macro_share,
        families: MacroFamily::ALL.to_vec(),
        mixed: true,
        onset_presses: 20..60,
        macro_presses: 400,
        seed: opts.seed,
        start_us: epoch_us(SystemTime::now()) + 500_000,
    };
    let humans = match &opts.recordings {
        Some(r) => Humans::Recorded(r),
        None => Humans::Parametric { presses: 600 },
    };
    let mut users = simulate::simulate(&plan, humans).map_err(|e| e.to_string())?;
    let end_us = plan.start_us + opts.typing.as_micros() as i64;
    for u in &mut users {
        u.events.retain(|e| e.time_us <= end_us);
    }
    Ok((plan, users))
}

/// Runs the demo, writing what happens to `out`.
pub fn run(mut config: Config, opts: DemoOptions, out: Arc<Mutex<dyn Write + Send>>) -> Result<DemoSummary, String> {
    let say = |line: &str| {
        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let state_dir = tempfile::Builder::new()
        .prefix("metronome-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a state directory: {e}"))?;
    config.stream.state_dir = state_dir.path().to_owned();
    config.stream.instance_id = "demo".to_owned();
    config.http.enabled = true;
    config.http.listen = opts.listen.to_string();
    config.postgres.sink_in_process = opts.postgres_url.is_some();
    if let Some(url) = &opts.postgres_url {
        config.postgres.url = url.clone();
        config.postgres.validate()?;
    }
    // The embedded cluster lives as long as this function.
    let _cluster = match &opts.bootstrap_servers {
        Some(servers) => {
            config.kafka.insert("bootstrap.servers".to_owned(), servers.clone());
            None
        }
        None => {
            let cluster = rdkafka::mocking::MockCluster::new(1).map_err(|e| format!("embedded kafka: {e}"))?;
            let stream = &config.stream;
            let topics = [
                (stream.input_topic.clone(), DEMO_PARTITIONS),
                (stream.alerts_topic.clone(), DEMO_PARTITIONS),
                (stream.dlq_topic.clone(), DEMO_PARTITIONS),
                (stream.changelog_topic(USER_STATE_STORE), DEMO_PARTITIONS),
                (stream.instances_topic(), 1),
                (stream.repartition_topic(FLEET_FINGERPRINTS), DEMO_PARTITIONS),
                (stream.changelog_topic(FLEET_FINGERPRINTS), DEMO_PARTITIONS),
                (stream.repartition_topic(FLEET_CANDIDATES), 1),
                (stream.changelog_topic(FLEET_CANDIDATES), 1),
            ];
            for (topic, partitions) in topics {
                cluster.create_topic(&topic, partitions, 1).map_err(|e| format!("embedded kafka: {topic}: {e}"))?;
            }
            config.kafka.insert("bootstrap.servers".to_owned(), cluster.bootstrap_servers());
            // The mock cluster takes transaction calls but does not implement them.
            config.stream.guarantee = Guarantee::AtLeastOnce;
            config.stream.create_topics = false;
            Some(cluster)
        }
    };

    let (plan, users) = traffic(&opts)?;
    let macro_users = users.iter().filter(|u| matches!(u.truth, Truth::Macro { .. })).count();
    let recent = Arc::new(RecentAlerts::new(10_000));
    let reporter = Reporter {
        truths: users.iter().map(|u| (u.user_id.clone(), u.truth)).collect(),
        started: Instant::now(),
        seen: HashSet::new(),
        first_alert_s: None,
        flagged: HashMap::new(),
        recent: Arc::clone(&recent),
    };
    say(&format!(
        "metronome demo: {} users typing in real time for up to {:.0}s ({} of them switch a macro on after {}-{} key presses; humans {})",
        users.len(),
        opts.typing.as_secs_f64(),
        macro_users,
        plan.onset_presses.start,
        plan.onset_presses.end,
        if opts.recordings.is_some() { "replayed from real recordings" } else { "from the built-in typing model" },
    ));
    say(&format!(
        "metronome demo: kafka at {} ({}), state in {}",
        config.kafka["bootstrap.servers"],
        if opts.bootstrap_servers.is_some() { "your broker" } else { "embedded mock cluster, at least once" },
        state_dir.path().display()
    ));

    let kafka = config.kafka.clone();
    let input_topic = config.stream.input_topic.clone();
    let alerts_topic = config.stream.alerts_topic.clone();
    let idle_close = Duration::from_millis(u64::from(config.detector.window.idle_timeout_ms));
    let alerts_db = if opts.postgres_url.is_some() { None } else { Some(AlertDb::in_memory(Arc::clone(&recent))) };
    let out_for_alerts = Arc::clone(&out);
    let runtime = service_runtime()?;
    runtime.block_on(async move {
        let shutdown = shutdown_on_signal();
        if let Some(limit) = opts.duration {
            let s = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                s.cancel();
            });
        }
        // The users' agents, all at once: real time, records cut as agents cut them.
        let publisher = {
            let (kafka, shutdown) = (kafka.clone(), shutdown.clone());
            std::thread::spawn(move || -> Result<u64, String> {
                let producer = publish::producer(&kafka).map_err(|e| format!("kafka producer: {e}"))?;
                let summary = publish::publish_simulation(
                    &producer,
                    &input_topic,
                    &users,
                    RecordShape::agent(50),
                    Pace::Speed(1.0),
                    &shutdown,
                    |_| {},
                )
                .map_err(|e| e.to_string())?;
                // The last windows close once their users have been idle; then the demo is done.
                let settle = Instant::now() + idle_close + Duration::from_secs(5);
                while Instant::now() < settle && !shutdown.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(100)); // waiting out the idle close
                }
                shutdown.cancel();
                Ok(summary.events)
            })
        };
        let follow_stop = CancellationToken::new();
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let follower = {
            let (out, stop, mut reporter) = (out_for_alerts, follow_stop.clone(), reporter);
            let received = Arc::clone(&received);
            std::thread::spawn(move || {
                let result = follow_until(&kafka, &alerts_topic, Duration::from_secs(u64::MAX / 4), &stop, |alert| {
                    received.fetch_add(1, Ordering::Relaxed);
                    if let Some(line) = reporter.line(alert, epoch_us(SystemTime::now())) {
                        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = writeln!(out, "{line}");
                        let _ = out.flush();
                    }
                });
                if let Err(e) = result {
                    tracing::warn!(error = %e, "following the alert topic failed");
                }
                reporter
            })
        };
        let service = match alerts_db {
            Some(alerts) => Service::processor(config).with_alerts(alerts),
            None => Service::processor(config),
        };
        let processed = service.run(shutdown.clone(), |bound| {
            let base = format!("http://{bound}");
            say(&format!("metronome demo: alert page   {base}/"));
            say(&format!("metronome demo: metrics      {base}/metrics"));
            say(&format!("metronome demo: alerts API   {base}/api/alerts    users: {base}/api/users/<user id>"));
            say("metronome demo: alerts as they are committed (Ctrl-C stops):");
        })
        .await;
        shutdown.cancel();
        let events = publisher.join().map_err(|_| "the traffic thread panicked".to_owned())??;
        let ran = processed?;
        if let Some(sink) = &ran.sink {
            eprintln!("metronome: postgres sink wrote {} alerts", sink.writes.written);
        }
        let summary = ran.processor.unwrap_or_default();
        // The follower stops once it has read as many alert records as the processor committed
        // (or after 5 s: a record it could not decode is not counted).
        let deadline = Instant::now() + Duration::from_secs(5);
        while received.load(Ordering::Relaxed) < summary.alerts && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50)); // polling a condition
        }
        follow_stop.cancel();
        let reporter = follower.join().map_err(|_| "the alert follower panicked".to_owned())?;
        let result = reporter.summary(events);
        say(&format!(
            "metronome demo: {} events processed, {} alerts committed; caught {} of {} macro users{}; {} of {} humans flagged",
            summary.events,
            summary.alerts,
            result.caught,
            result.macro_users,
            result.median_catch_s.map(|s| format!(" (median {s:.1}s after the macro started)")).unwrap_or_default(),
            result.humans_flagged,
            result.humans,
        ));
        Ok(result)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(id: &str, user: &str) -> proto::Alert {
        proto::Alert { alert_id: id.into(), user_id: user.into(), score: 0.9, ..Default::default() }
    }

    #[test]
    fn alerts_are_told_against_the_truth_once_each() {
        let mut reporter = Reporter {
            truths: HashMap::from([
                ("m".to_owned(), Truth::Macro { family: MacroFamily::Fixed, onset_us: 1_000_000 }),
                ("h".to_owned(), Truth::Human),
                ("m2".to_owned(), Truth::Macro { family: MacroFamily::OsTick, onset_us: 0 }),
            ]),
            started: Instant::now(),
            seen: HashSet::new(),
            first_alert_s: None,
            flagged: HashMap::new(),
            recent: Arc::new(RecentAlerts::new(10)),
        };
        let line = reporter.line(&alert("a1", "m"), 4_500_000).unwrap();
        assert!(line.contains("macro (fixed) caught 3.5s after it started"), "{line}");
        assert_eq!(reporter.line(&alert("a1", "m"), 5_000_000), None, "a repeat is not shown again");
        let line = reporter.line(&alert("a2", "h"), 6_000_000).unwrap();
        assert!(line.contains("FALSE ALARM"), "{line}");
        let s = reporter.summary(100);
        assert_eq!((s.macro_users, s.caught, s.humans, s.humans_flagged), (2, 1, 1, 1));
        assert_eq!(s.median_catch_s, Some(3.5));
        assert!(s.first_alert_s.is_some());
    }

    #[test]
    fn demo_traffic_starts_now_and_stops_typing_in_time() {
        let opts = DemoOptions {
            users: 10,
            macro_share: 0.3,
            recordings: None,
            typing: Duration::from_secs(90),
            duration: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            bootstrap_servers: None,
            postgres_url: None,
            seed: 1,
        };
        let now = epoch_us(SystemTime::now());
        let (plan, users) = traffic(&opts).unwrap();
        assert!(plan.start_us >= now);
        for u in &users {
            assert!(u.events.iter().all(|e| e.time_us <= plan.start_us + 90_000_000), "{}", u.user_id);
            if let Truth::Macro { onset_us, .. } = u.truth {
                assert!(onset_us < plan.start_us + 45_000_000, "every macro starts early in the demo");
            }
        }
    }
}
