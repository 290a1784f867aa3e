//! The HTTP side: routes through warp's test utilities (auth, errors, readiness, alert queries on
//! a real PostgreSQL database), one request over a real socket, and `/metrics` scraped from a real
//! `metronome process` after a run, its counters matched against what was processed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::broker::{env_vars, Broker, ProcessorProc};
use common::http_get;
use common::postgres::TempDb;
use metronome::http::{routes, AlertDb, ApiState, BrokerProbe, Readiness, ServeLimits};
use metronome::sink::store::{write_batch, SinkRecord};
use metronome::stream::status::Status;
use metronome_core::proto;
use metronome_io::postgres::PgTarget;
use serde_json::Value;

const TOKEN: &str = "t0ken-for-tests";

fn alert(i: i64, user: &str) -> proto::Alert {
    proto::Alert {
        alert_id: format!("a{i}"),
        user_id: user.to_owned(),
        window_start_us: 1_700_000_000_000_000 + i,
        window_end_us: 1_700_000_001_000_000 + i,
        score: 0.95,
        histogram_score: 0.9,
        lstm_score: None,
        features: Vec::new(),
        reasons: vec!["interval_cv".into()],
        model_version: "timing-1".into(),
        // One alert a minute from 2026-11-22T08:00:00Z.
        detected_at_us: 1_795_334_400_000_000 + i * 60_000_000,
        scorers: vec!["histogram".into()],
        timing_score: 0.95,
        interval_histogram: Some(proto::IntervalHistogram { bin_ms: 10.0, counts: vec![1, 0, 48] }),
        fleet: None,
    }
}

/// A database holding five alerts (users u1, u2), written the way the sink writes them.
fn database_with_alerts(rt: &tokio::runtime::Runtime) -> TempDb {
    let db = TempDb::create();
    let url = db.url("sslmode=disable");
    rt.block_on(async {
        let target = PgTarget::parse(&url).unwrap();
        let mut client = target.connect().await.unwrap();
        metronome_io::postgres::migrate(&mut client).await.unwrap();
        let records: Vec<SinkRecord> = (0..5)
            .map(|i| SinkRecord::Alert {
                partition: 0,
                offset: i,
                alert: Box::new(alert(i, if i % 2 == 0 { "u1" } else { "u2" })),
            })
            .collect();
        write_batch(&mut client, "test", "alerts", &records).await.unwrap();
    });
    db
}

fn state(db: Option<&TempDb>, token: Option<&str>, readiness: Readiness) -> Arc<ApiState> {
    Arc::new(ApiState {
        token: token.map(Arc::from),
        readiness,
        alerts: db.map(|d| AlertDb::new(PgTarget::parse(&d.url("sslmode=disable")).unwrap())),
        users: None,
    })
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

#[test]
fn alerts_api_filters_authenticates_and_explains_errors() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = database_with_alerts(&rt);
    let api = routes(state(Some(&db), Some(TOKEN), Readiness::default()));
    rt.block_on(async {
        let get = |path: &str, auth: Option<&str>| {
            let mut r = warp::test::request().method("GET").path(path);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r.reply(&api)
        };
        let bearer = format!("Bearer {TOKEN}");

        // Health and metrics need no token; everything else does.
        assert_eq!(get("/healthz", None).await.status(), 200);
        let metrics = get("/metrics", None).await;
        assert_eq!(metrics.status(), 200);
        assert!(metrics.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        let r = get("/api/alerts", None).await;
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        // A probe without credentials gets readiness; wrong credentials get nothing anywhere.
        assert_eq!(get("/readyz", None).await.status(), 200);
        for path in ["/api/alerts", "/readyz"] {
            assert_eq!(get(path, Some("Bearer wrong")).await.status(), 401, "{path}");
            assert_eq!(get(path, Some(TOKEN)).await.status(), 401, "{path}: the scheme is required");
        }

        // Newest first, all five.
        let r = get("/api/alerts", Some(&bearer)).await;
        assert_eq!(r.status(), 200);
        let body = json(r.body());
        let ids: Vec<&str> =
            body["alerts"].as_array().unwrap().iter().map(|a| a["alert_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["a4", "a3", "a2", "a1", "a0"]);
        let first = &body["alerts"][0];
        assert_eq!(first["user_id"], "u1");
        assert_eq!(first["detected_at"], "2026-11-22T08:04:00.000000Z");
        assert_eq!(first["window_end_us"], 1_700_000_001_000_004_i64);
        assert_eq!(first["reasons"], serde_json::json!(["interval_cv"]));
        assert!(first["lstm_score"].is_null());
        assert_eq!(first["interval_histogram"], serde_json::json!({"bin_ms": 10.0, "counts": [1, 0, 48]}));

        // Filters: user, since (RFC 3339 or microseconds), limit.
        let body = json(get("/api/alerts?user=u2", Some(&bearer)).await.body());
        assert_eq!(body["count"], 2);
        let body = json(get("/api/alerts?since=2026-11-22T08:02:00Z", Some(&bearer)).await.body());
        assert_eq!(body["count"], 3);
        let body = json(get("/api/alerts?since=1795334580000000&user=u1", Some(&bearer)).await.body());
        assert_eq!(body["count"], 1);
        let body = json(get("/api/alerts?limit=2", Some(&bearer)).await.body());
        assert_eq!(body["count"], 2);
        let body = json(get("/api/alerts?user=nobody", Some(&bearer)).await.body());
        assert_eq!(body["count"], 0);

        // Bad input: 400 with a one-line reason; unknown paths 404; both as JSON.
        for bad in ["/api/alerts?limit=0", "/api/alerts?since=soon", "/api/alerts?colour=red"] {
            let r = get(bad, Some(&bearer)).await;
            assert_eq!(r.status(), 400, "{bad}");
            let message = json(r.body())["error"].as_str().unwrap().to_owned();
            assert!(!message.is_empty() && !message.contains('\n'), "{bad}: {message}");
        }
        let r = get("/nothing/here", Some(&bearer)).await;
        assert_eq!((r.status().as_u16(), json(r.body())["error"].as_str().unwrap()), (404, "not found"));
    });
}

#[test]
fn alerts_api_without_a_reachable_database_answers_503() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = routes(Arc::new(ApiState {
        token: None,
        readiness: Readiness::default(),
        // Nothing listens on port 1.
        alerts: Some(AlertDb::new(PgTarget::parse("postgresql://postgres@127.0.0.1:1/x?sslmode=disable").unwrap())),
        users: None,
    }));
    rt.block_on(async {
        let r = warp::test::request().path("/api/alerts").reply(&api).await;
        assert_eq!(r.status(), 503);
        assert_eq!(json(r.body())["error"], "the alert database is unavailable");
    });
}

#[test]
fn readiness_needs_a_started_processor_and_a_reachable_broker() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let check = |readiness: Readiness| async move {
            let r = warp::test::request().path("/readyz").reply(&routes(state(None, None, readiness))).await;
            (r.status().as_u16(), json(r.body()))
        };
        // A processor that has not joined its group yet.
        let (status, body) = check(Readiness { status: Some(Arc::new(Status::default())), broker: None }).await;
        assert_eq!(status, 503);
        assert_eq!(body["reasons"], serde_json::json!(["processor not started"]));
        // With auth on, a probe without credentials gets the verdict and the token the reasons.
        let not_started =
            || routes(state(None, Some(TOKEN), Readiness { status: Some(Arc::new(Status::default())), broker: None }));
        let r = warp::test::request().path("/readyz").reply(&not_started()).await;
        assert_eq!(r.status(), 503);
        assert_eq!(json(r.body()), serde_json::json!({"ready": false}));
        let r = warp::test::request()
            .path("/readyz")
            .header("authorization", format!("Bearer {TOKEN}"))
            .reply(&not_started())
            .await;
        assert_eq!(r.status(), 503);
        assert_eq!(json(r.body())["reasons"], serde_json::json!(["processor not started"]));
        // A broker nobody answers for.
        let dead = std::collections::BTreeMap::from([("bootstrap.servers".to_owned(), "127.0.0.1:1".to_owned())]);
        let probe = BrokerProbe::new(&dead, Duration::from_millis(500)).unwrap();
        let (status, body) = check(Readiness { status: None, broker: Some(probe) }).await;
        assert_eq!(status, 503);
        assert!(body["reasons"][0].as_str().unwrap().starts_with("broker unreachable"), "{body}");
    });
    // A broker that answers.
    let broker = Broker::start();
    let live = std::collections::BTreeMap::from([("bootstrap.servers".to_owned(), broker.bootstrap.clone())]);
    rt.block_on(async {
        let probe = BrokerProbe::new(&live, Duration::from_secs(5)).unwrap();
        let r = warp::test::request()
            .path("/readyz")
            .reply(&routes(state(None, None, Readiness { status: None, broker: Some(probe) })))
            .await;
        assert_eq!(r.status(), 200, "{}", String::from_utf8_lossy(r.body()));
    });
}

#[test]
fn the_api_answers_over_a_real_socket() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = database_with_alerts(&rt);
    let state = ApiState {
        token: Some(Arc::from(TOKEN)),
        readiness: Readiness::default(),
        alerts: Some(AlertDb::new(PgTarget::parse(&db.url("sslmode=disable")).unwrap())),
        users: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = rt
        .block_on(metronome::http::serve("127.0.0.1:0".parse().unwrap(), state, ServeLimits::default(), async move {
            let _ = stopped.await;
        }))
        .unwrap();
    let server = rt.spawn(server);
    let addr = addr.to_string();
    let (status, body) = http_get(&addr, "/api/alerts?user=u1&limit=5", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(body.as_bytes())["count"], 3);
    assert_eq!(http_get(&addr, "/api/alerts", None).0, 401);
    assert_eq!(http_get(&addr, "/healthz", None), (200, "ok\n".to_owned()));
    stop.send(()).unwrap();
    rt.block_on(server).unwrap();
    assert!(TcpStream::connect(&addr).is_err(), "the server stopped");
}

#[test]
fn slow_loris_sockets_are_cut_off_and_do_not_starve_the_api() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let limits = ServeLimits { header_read_timeout: Duration::from_millis(500), max_connections: 4 };
    let state = ApiState { token: None, readiness: Readiness::default(), alerts: None, users: None };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = rt
        .block_on(metronome::http::serve("127.0.0.1:0".parse().unwrap(), state, limits, async move {
            let _ = stopped.await;
        }))
        .unwrap();
    let server = rt.spawn(server);
    let addr = addr.to_string();
    // Twice as many sockets as the server holds at once, each sending a request head that
    // never ends, and one that sends nothing at all.
    let mut slow: Vec<TcpStream> = (0..8)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap();
            if i > 0 {
                write!(s, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").unwrap();
            }
            s
        })
        .collect();
    // A client behind them is answered once the server has cut the slow ones off.
    assert_eq!(http_get(&addr, "/healthz", None), (200, "ok\n".to_owned()));
    for (i, s) in slow.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // The server closes the socket (with or without a 408 first, or with a reset): the read
        // ends rather than running into the 30-second timeout.
        let ended = match s.read_to_end(&mut Vec::new()) {
            Ok(_) => true,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        };
        assert!(ended, "slow socket {i} is still open");
    }
    stop.send(()).unwrap();
    rt.block_on(server).unwrap();
}

#[test]
fn readiness_asks_the_broker_once_however_many_call() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dead = std::collections::BTreeMap::from([("bootstrap.servers".to_owned(), "127.0.0.1:1".to_owned())]);
    let probe = BrokerProbe::new(&dead, Duration::from_millis(300)).unwrap();
    let state = Arc::new(ApiState {
        token: Some(Arc::from(TOKEN)),
        readiness: Readiness { status: None, broker: Some(probe) },
        alerts: None,
        users: None,
    });
    let api = routes(Arc::clone(&state));
    rt.block_on(async {
        // Fifty anonymous probes at once: one metadata request between them.
        let calls = (0..50).map(|_| warp::test::request().path("/readyz").reply(&api));
        for r in futures::future::join_all(calls).await {
            assert_eq!(r.status(), 503);
        }
    });
    assert_eq!(state.readiness.broker.as_ref().unwrap().probes(), 1);
}

#[test]
fn an_api_open_to_other_machines_without_a_token_refuses_to_start() {
    use metronome::http::HttpConfig;
    let open = HttpConfig { listen: "0.0.0.0:9464".into(), ..HttpConfig::default() };
    let refused = open.check_exposure().unwrap_err();
    assert!(refused.contains("http.allow_anonymous"), "{refused}");
    assert!(HttpConfig { bearer_token: TOKEN.into(), ..open.clone() }.check_exposure().is_ok());
    assert!(HttpConfig { allow_anonymous: true, ..open.clone() }.check_exposure().is_ok());
    assert!(HttpConfig { listen: "127.0.0.1:9464".into(), ..open.clone() }.check_exposure().is_ok());
    assert!(HttpConfig { listen: "[::1]:9464".into(), ..open.clone() }.check_exposure().is_ok());
    assert!(HttpConfig { enabled: false, ..open }.check_exposure().is_ok());
}

/// Sum of a metric's samples whose line starts with `prefix` (name and, optionally, labels).
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .filter(|l| l[prefix.len()..].starts_with([' ', '{']) || prefix.ends_with('}'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Debian's Chromium, headless: the page's DOM after its scripts ran (`--dump-dom`), and a
/// screenshot at `screenshot`.
fn chromium(url: &str, screenshot: &std::path::Path) -> String {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Debian's chromium is needed for the alert page test (scripts/setup installs it)");
    let profile = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            // Virtual time runs the page's polls and fetches to completion before the dump.
            .args(["--virtual-time-budget=20000", "--window-size=1400,1000"])
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&[&format!("--screenshot={}", screenshot.display())]);
    run(&["--dump-dom"])
}

#[test]
fn a_run_seen_through_metrics_the_api_and_the_alert_page() {
    const PARTITIONS: i32 = 4;
    let broker = Broker::start();
    broker.create_topics(&["events", "alerts", "dlq"], PARTITIONS);
    let db = TempDb::create();
    let dir = tempfile::tempdir().unwrap();
    let keylog = dir.path().join("sim.csv");
    common::broker::simulate_keylog(&keylog, 12, &["--macro-share", "0.4", "--seed", "3", "--macro-presses", "150"]);
    let env = env_vars(&[
        ("METRONOME_STREAM__APPLICATION_ID", "metrics-run"),
        ("METRONOME_STREAM__INPUT_TOPIC", "events"),
        ("METRONOME_STREAM__ALERTS_TOPIC", "alerts"),
        ("METRONOME_STREAM__DLQ_TOPIC", "dlq"),
        ("METRONOME_STREAM__COMMIT_INTERVAL_MS", "50"),
        ("METRONOME_STREAM__TOPIC_PARTITIONS", "4"),
        ("METRONOME_POSTGRES__SINK_IN_PROCESS", "true"),
        ("METRONOME_POSTGRES__URL", &db.url("sslmode=disable")),
        ("METRONOME_HTTP__BEARER_TOKEN", TOKEN),
    ]);
    let mut processor = ProcessorProc::start(&broker, &dir.path().join("state"), "m1", &env, dir.path());
    let addr = processor.http_addr();

    // Publish: every user's events in records of 40, plus two records that are not key events.
    let users = metronome_core::keylog::group_by_user(
        metronome_core::keylog::KeylogReader::open(&keylog).unwrap(),
        |_| true,
        None,
    )
    .unwrap();
    let mut records = Vec::new();
    let mut events = 0usize;
    for (user, user_events) in &users {
        events += user_events.len();
        for payload in metronome_core::wire::batches_for_user(user, "s", user_events, 40) {
            records.push((user.as_bytes().to_vec(), payload));
        }
    }
    records.push((b"bad".to_vec(), vec![0xff, 0x00, 0x13]));
    records.push((b"bad".to_vec(), vec![0x01]));
    broker.produce("events", &records);
    broker.wait_fully_committed("metrics-run", "events");
    let alerts = broker.alerts("alerts");
    assert!(alerts.len() >= 2, "the run must raise alerts to count: {}", alerts.len());
    let scorer_mentions: usize = alerts.iter().map(|a| a.scorers.len()).sum();
    // The sink writes them all.
    common::wait_until("the sink to write every alert", || db.count("alerts") == alerts.len());

    let (status, metrics) = http_get(&addr, "/metrics", None);
    assert_eq!(status, 200);
    assert_eq!(sample(&metrics, "metronome_events_consumed_total"), events as f64);
    assert_eq!(sample(&metrics, "metronome_records_consumed_total{outcome=\"processed\"}"), (records.len() - 2) as f64);
    assert_eq!(sample(&metrics, "metronome_records_consumed_total{outcome=\"dead_letter\"}"), 2.0);
    assert_eq!(sample(&metrics, "metronome_dead_letters_total"), 2.0);
    assert_eq!(sample(&metrics, "metronome_alerts_total"), scorer_mentions as f64);
    assert_eq!(sample(&metrics, "metronome_end_to_end_latency_seconds_count"), alerts.len() as f64);
    assert_eq!(sample(&metrics, "metronome_sink_alerts_written_total"), alerts.len() as f64);
    assert_eq!(sample(&metrics, "metronome_sink_duplicate_alerts_total"), 0.0);
    assert_eq!(sample(&metrics, "metronome_transactions_total{outcome=\"aborted\"}"), 0.0);
    assert!(sample(&metrics, "metronome_transactions_total{outcome=\"committed\"}") >= 1.0);
    assert_eq!(sample(&metrics, "metronome_tasks{phase=\"running\"}"), f64::from(PARTITIONS));
    assert_eq!(sample(&metrics, "metronome_tasks{phase=\"restoring\"}"), 0.0);
    assert!(sample(&metrics, "metronome_window_score_count{scorer=\"combined\"}") >= alerts.len() as f64);
    assert_eq!(sample(&metrics, "metronome_sink_postgres_connected"), 1.0);
    // No label carries a user id.
    for (user, _) in &users {
        assert!(!metrics.contains(user.as_str()), "a user id leaked into the metrics");
    }

    assert_eq!(http_get(&addr, "/readyz", Some(TOKEN)).0, 200);
    let (status, body) = http_get(&addr, "/api/alerts?limit=1000", Some(TOKEN));
    assert_eq!(status, 200);
    assert_eq!(json(body.as_bytes())["count"], alerts.len());

    // Interactive queries: this instance owns every partition, so it knows every user, in the
    // partition the producer's partitioner chose.
    for (user, _) in &users {
        let (status, body) = http_get(&addr, &format!("/api/users/{user}"), Some(TOKEN));
        assert_eq!(status, 200, "{body}");
        let view = json(body.as_bytes());
        assert_eq!(view["known"], true, "{user}: {view}");
        assert_eq!(view["instance"], "m1");
        assert_eq!(view["partition"], metronome::stream::query::partition_for(user.as_bytes(), PARTITIONS));
    }
    let alerted = alerts[0].user_id.clone();
    let view = json(http_get(&addr, &format!("/api/users/{alerted}"), Some(TOKEN)).1.as_bytes());
    assert!(view["state"]["alerts_raised"].as_u64().unwrap() >= 1, "{view}");

    // The page in a real browser: it lists the run's alerts and draws the user's histogram.
    let artifacts = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("alert-page.png");
    let dom = chromium(&format!("http://{addr}/#token={TOKEN}&user={alerted}"), &screenshot);
    // What the page drew, without its script (whose source spells the same markup).
    let page = dom.split("<script").next().unwrap();
    for a in &alerts {
        assert!(
            page.contains(&format!("data-alert-id=\"{}\"", a.alert_id)),
            "alert {} not listed:\n{page}",
            a.alert_id
        );
    }
    let table = page.split("<tbody id=\"alerts\">").nth(1).and_then(|t| t.split("</tbody>").next()).unwrap();
    assert_eq!(table.matches("<tr ").count(), alerts.len(), "one row per alert");
    // The user's newest alert's histogram: one bar per non-empty bin; one point per alert.
    let (_, body) = http_get(&addr, &format!("/api/alerts?user={alerted}"), Some(TOKEN));
    let user_alerts = json(body.as_bytes())["alerts"].as_array().unwrap().clone();
    let bins = user_alerts[0]["interval_histogram"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.as_u64() != Some(0))
        .count();
    assert!(bins >= 1);
    let histogram =
        page.split("id=\"histogram-chart\"").nth(1).expect("no histogram drawn").split("</svg>").next().unwrap();
    assert_eq!(histogram.matches("<rect").count(), bins, "one bar per non-empty bin");
    let timeline =
        page.split("id=\"timeline-chart\"").nth(1).expect("no timeline drawn").split("</svg>").next().unwrap();
    assert_eq!(timeline.matches("<circle").count(), user_alerts.len(), "one point per alert of the user");
    assert!(page.contains("Live on m1"), "the live state is shown");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000, "a real screenshot at {}", screenshot.display());
    eprintln!("alert page screenshot: {}", screenshot.display());

    // A second instance takes some partitions: each instance answers for its own users and
    // names the owner for the others.
    let mut second = ProcessorProc::start(&broker, &dir.path().join("state2"), "m2", &env, dir.path());
    let addr2 = second.http_addr();
    common::wait_until("a user owned by the second instance, named as such by the first", || {
        users.iter().any(|(user, _)| {
            let (status, body) = http_get(&addr, &format!("/api/users/{user}"), Some(TOKEN));
            status == 421 && json(body.as_bytes())["owner"]["url"] == format!("http://{addr2}")
        })
    });
    let moved = users
        .iter()
        .map(|(u, _)| u)
        .find(|u| http_get(&addr, &format!("/api/users/{u}"), Some(TOKEN)).0 == 421)
        .unwrap();
    common::wait_until("the second instance to answer for its user", || {
        let (status, body) = http_get(&addr2, &format!("/api/users/{moved}"), Some(TOKEN));
        status == 200 && json(body.as_bytes())["known"] == true
    });
    assert!(second.terminate().success());
    assert!(processor.terminate().success());
}
