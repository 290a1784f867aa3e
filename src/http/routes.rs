//! The routes and their handlers, over seams a test can fill in.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use metronome_io::kafka::ClientBuilder;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use subtle::ConstantTimeEq;
use warp::http::StatusCode;
use warp::reply::Reply;
use warp::{Filter, Rejection};

use crate::metrics::events::{HttpRequestServed, InternalEvent};
use crate::sink::store::{query_alerts, AlertQuery};
use crate::stream::directory::DirectoryReader;
use crate::stream::query::{Lookup, UserQueries};
use crate::stream::status::Status;
use metronome_io::postgres::PgTarget;

/// Most alerts one `GET /api/alerts` returns, and the default.
pub const ALERTS_MAX_LIMIT: i64 = 1000;
const ALERTS_DEFAULT_LIMIT: i64 = 100;

/// What the routes need. Every part is optional: an instance serves what it runs.
pub struct ApiState {
    /// The bearer token, when auth is on.
    pub token: Option<Arc<str>>,
    /// What `/readyz` checks.
    pub readiness: Readiness,
    /// Where `/api/alerts` reads.
    pub alerts: Option<AlertDb>,
    /// Where `/api/users/{id}` asks.
    pub users: Option<UserApi>,
}

/// Interactive user queries: the local processor, and the directory of the others.
pub struct UserApi {
    /// The local processor's question box.
    pub queries: Arc<UserQueries>,
    /// Who owns which partition, for redirecting; `None`: not known.
    pub directory: Option<DirectoryReader>,
}

/// How long a user query waits for the processing loop (one batch at most, normally).
const USER_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// `/readyz`: the processor's task phases and the broker.
#[derive(Default)]
pub struct Readiness {
    /// The processor's status; `None`: this process runs no processor (always ready on it).
    pub status: Option<Arc<Status>>,
    /// The broker probe; `None`: not checked.
    pub broker: Option<BrokerProbe>,
}

impl Readiness {
    /// `Ok` when ready, else the reasons.
    pub async fn check(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if let Some(status) = &self.status {
            if !status.is_started() {
                reasons.push("processor not started".to_owned());
            }
            let restoring =
                status.tasks().values().filter(|p| **p != crate::stream::status::TaskPhase::Running).count();
            if restoring > 0 {
                reasons.push(format!("{restoring} tasks restoring"));
            }
        }
        if let Some(broker) = &self.broker {
            if let Err(e) = broker.reachable().await {
                reasons.push(format!("broker unreachable: {e}"));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

/// How long a broker verdict is reused: `/readyz` callers (anonymous ones too) cost the broker
/// at most one metadata request per this interval, however many call.
pub const PROBE_FRESH_FOR: Duration = Duration::from_secs(5);

/// Asks the brokers for metadata: reachable when they answer within the timeout. The verdict
/// is cached for [`PROBE_FRESH_FOR`], and callers arriving while a probe runs wait for its
/// verdict instead of starting another.
pub struct BrokerProbe {
    client: Arc<BaseConsumer>,
    timeout: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    probes: AtomicU64,
}

impl BrokerProbe {
    /// A probe with the `[kafka]` properties.
    pub fn new(properties: &std::collections::BTreeMap<String, String>, timeout: Duration) -> Result<Self, String> {
        let client: BaseConsumer =
            ClientBuilder::new(properties).client_id("metronome-readyz").create().map_err(|e| e.to_string())?;
        Ok(Self { client: Arc::new(client), timeout, last: tokio::sync::Mutex::new(None), probes: AtomicU64::new(0) })
    }

    /// Metadata requests sent so far.
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    async fn reachable(&self) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, verdict)) = &*last {
            if at.elapsed() < PROBE_FRESH_FOR {
                return verdict.clone();
            }
        }
        self.probes.fetch_add(1, Ordering::Relaxed);
        let (client, timeout) = (Arc::clone(&self.client), self.timeout);
        let verdict = tokio::task::spawn_blocking(move || {
            client.fetch_metadata(None, timeout).map(|_| ()).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        *last = Some((Instant::now(), verdict.clone()));
        verdict
    }
}

/// Where `/api/alerts` reads: PostgreSQL (what the sink wrote), or the recent alerts a process
/// keeps in memory when it has no database (the demo).
pub struct AlertDb {
    backend: AlertBackend,
}

/// One connection, made on first use and again after a failure.
struct PgAlerts {
    target: PgTarget,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

enum AlertBackend {
    Postgres(Box<PgAlerts>),
    Memory(Arc<RecentAlerts>),
}

impl AlertDb {
    /// Reads alerts from the database `target` names.
    pub fn new(target: PgTarget) -> Self {
        Self { backend: AlertBackend::Postgres(Box::new(PgAlerts { target, client: tokio::sync::Mutex::new(None) })) }
    }

    /// Reads the alerts kept in `recent`.
    pub fn in_memory(recent: Arc<RecentAlerts>) -> Self {
        Self { backend: AlertBackend::Memory(recent) }
    }

    async fn query(&self, q: &AlertQuery) -> Result<Vec<serde_json::Value>, String> {
        let (target, client) = match &self.backend {
            AlertBackend::Memory(recent) => return Ok(recent.query(q)),
            AlertBackend::Postgres(pg) => (&pg.target, &pg.client),
        };
        let mut slot = client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(target.connect().await.map_err(|e| e.to_string())?);
        }
        let client = slot.as_ref().expect("connected above");
        match query_alerts(client, q).await {
            Ok(rows) => Ok(rows),
            Err(e) => {
                *slot = None;
                Err(format!("postgres: {e}"))
            }
        }
    }
}

/// The most recent alerts, in memory, deduplicated by alert id (an at-least-once stream may
/// repeat one). Holds at most `capacity`; the oldest leave first.
pub struct RecentAlerts {
    capacity: usize,
    alerts: std::sync::Mutex<std::collections::VecDeque<serde_json::Value>>,
}

impl RecentAlerts {
    /// An empty store of at most `capacity` alerts.
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), alerts: std::sync::Mutex::new(Default::default()) }
    }

    /// Keeps `alert` (the alert topic's JSON, as [`metronome_core::alert_json::alert_json`] makes it);
    /// `false` when its id is already kept.
    pub fn add(&self, alert: serde_json::Value) -> bool {
        let mut alerts = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        if alerts.iter().any(|a| a["alert_id"] == alert["alert_id"]) {
            return false;
        }
        if alerts.len() == self.capacity {
            alerts.pop_front();
        }
        alerts.push_back(alert);
        true
    }

    /// As `GET /api/alerts` answers from PostgreSQL: detected at or after `since`, one user or
    /// all, newest first, at most `limit`.
    pub fn query(&self, q: &AlertQuery) -> Vec<serde_json::Value> {
        let alerts = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<serde_json::Value> = alerts
            .iter()
            .filter(|a| q.since_us.is_none_or(|s| a["detected_at_us"].as_i64().unwrap_or(0) >= s))
            .filter(|a| q.user.as_deref().is_none_or(|u| a["user_id"] == u))
            .cloned()
            .collect();
        rows.sort_by_key(|a| std::cmp::Reverse(a["detected_at_us"].as_i64().unwrap_or(0)));
        rows.truncate(usize::try_from(q.limit).unwrap_or(0));
        rows
    }
}

/// An error answer: status and a one-line message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl warp::reject::Reject for ApiError {}

fn reject(status: StatusCode, message: impl Into<String>) -> Rejection {
    warp::reject::custom(ApiError { status, message: message.into() })
}

fn with_state(state: Arc<ApiState>) -> impl Filter<Extract = (Arc<ApiState>,), Error = Infallible> + Clone {
    warp::any().map(move || Arc::clone(&state))
}

/// What a request may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Auth is off, or the request carries the token.
    Full,
    /// Auth is on and the request carries no credentials at all (a kubelet's probe).
    Anonymous,
}

/// The request's [`Access`]; credentials that are present but wrong are refused outright.
fn access(token: Option<Arc<str>>) -> impl Filter<Extract = (Access,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization").and_then(move |header: Option<String>| {
        let token = token.clone();
        async move {
            let (Some(token), Some(header)) = (token.as_deref(), header.as_deref()) else {
                return Ok(if token.is_some() { Access::Anonymous } else { Access::Full });
            };
            let given = header.strip_prefix("Bearer ").unwrap_or("");
            if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
                Ok(Access::Full)
            } else {
                Err(unauthorized())
            }
        }
    })
}

fn unauthorized() -> Rejection {
    reject(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
}

/// Passes when auth is off or the request carries the token.
fn authorized(token: Option<Arc<str>>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    access(token)
        .and_then(|access: Access| async move {
            match access {
                Access::Full => Ok(()),
                Access::Anonymous => Err(unauthorized()),
            }
        })
        .untuple_one()
}

/// Every route, with request accounting and JSON errors.
pub fn routes(state: Arc<ApiState>) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let auth = authorized(state.token.clone());
    let metrics = warp::path!("metrics").and(warp::get()).map(|| {
        warp::reply::with_header(crate::metrics::render(), "content-type", "text/plain; version=0.0.4; charset=utf-8")
    });
    let healthz = warp::path!("healthz").and(warp::get()).map(|| "ok\n");
    // Probes send no credentials: they get the verdict; the reasons need the token.
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(access(state.token.clone()))
        .and(with_state(Arc::clone(&state)))
        .and_then(|access: Access, state: Arc<ApiState>| async move {
            let (status, body) = match state.readiness.check().await {
                Ok(()) => (StatusCode::OK, json!({"ready": true})),
                Err(_) if access == Access::Anonymous => (StatusCode::SERVICE_UNAVAILABLE, json!({"ready": false})),
                Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, json!({"ready": false, "reasons": reasons})),
            };
            Ok::<_, Rejection>(warp::reply::with_status(warp::reply::json(&body), status))
        });
    let alerts = warp::path!("api" / "alerts")
        .and(warp::get())
        .and(auth.clone())
        .and(warp::query::<HashMap<String, String>>())
        .and(with_state(Arc::clone(&state)))
        .and_then(|params: HashMap<String, String>, state: Arc<ApiState>| async move {
            let query = alert_query(&params).map_err(|m| reject(StatusCode::BAD_REQUEST, m))?;
            let Some(db) = &state.alerts else {
                return Err(reject(StatusCode::SERVICE_UNAVAILABLE, "no alert database configured"));
            };
            let rows = db.query(&query).await.map_err(|e| {
                tracing::warn!(error = %e, "alert query failed");
                reject(StatusCode::SERVICE_UNAVAILABLE, "the alert database is unavailable")
            })?;
            Ok::<_, Rejection>(warp::reply::json(&json!({"alerts": rows, "count": rows.len()})))
        });
    let users =
        warp::path!("api" / "users" / String).and(warp::get()).and(auth).and(with_state(Arc::clone(&state))).and_then(
            |raw: String, state: Arc<ApiState>| async move {
                let user = percent_encoding::percent_decode_str(&raw)
                    .decode_utf8()
                    .map_err(|_| reject(StatusCode::BAD_REQUEST, "the user id is not UTF-8"))?
                    .into_owned();
                let Some(api) = &state.users else {
                    return Err(reject(StatusCode::SERVICE_UNAVAILABLE, "this instance runs no processor"));
                };
                let reply = match api.queries.ask(&user, USER_QUERY_TIMEOUT).await {
                    Lookup::Owned(view) => warp::reply::with_status(warp::reply::json(&view), StatusCode::OK),
                    Lookup::Elsewhere { partition } => {
                        let owner = api.directory.as_ref().and_then(|d| d.owner_of(partition));
                        warp::reply::with_status(
                            warp::reply::json(&json!({
                                "error": "another instance owns this user's partition",
                                "partition": partition,
                                "owner": owner.map(|o| json!({"instance": o.instance, "url": o.url})),
                            })),
                            StatusCode::MISDIRECTED_REQUEST,
                        )
                    }
                    Lookup::Unavailable => {
                        return Err(reject(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the processor is not answering (starting or stopping)",
                        ))
                    }
                    Lookup::Busy => {
                        return Err(reject(StatusCode::SERVICE_UNAVAILABLE, "too many user queries waiting: retry"))
                    }
                };
                Ok::<_, Rejection>(reply)
            },
        );
    // The page itself holds no data; the API calls it makes carry the token.
    let page = warp::path::end().and(warp::get()).map(|| warp::reply::html(PAGE));
    metrics
        .map(Reply::into_response)
        .or(healthz.map(Reply::into_response))
        .unify()
        .or(readyz.map(Reply::into_response))
        .unify()
        .or(alerts.map(Reply::into_response))
        .unify()
        .or(users.map(Reply::into_response))
        .unify()
        .or(page.map(Reply::into_response))
        .unify()
        .recover(recover)
        .unify()
        .with(warp::log::custom(|info| {
            HttpRequestServed { route: route_name(info.path()), status: info.status().as_u16() }.emit();
        }))
}

/// The alert page: static, embedded, no build step.
const PAGE: &str = include_str!("page/index.html");

/// Bounded route names for the request counter: never the path's parameters.
fn route_name(path: &str) -> &'static str {
    match path {
        "/metrics" => "metrics",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/api/alerts" => "api_alerts",
        "/" => "page",
        p if p.starts_with("/api/users/") => "api_users",
        _ => "other",
    }
}

fn alert_query(params: &HashMap<String, String>) -> Result<AlertQuery, String> {
    for key in params.keys() {
        if !matches!(key.as_str(), "since" | "user" | "limit") {
            return Err(format!("unknown parameter {key:?} (since, user, limit)"));
        }
    }
    let since_us = match params.get("since").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(match s.parse::<i64>() {
            Ok(us) => us,
            Err(_) => humantime::parse_rfc3339_weak(s)
                .map_err(|_| {
                    "since: expected RFC 3339 (2026-11-22T08:00:00Z) or microseconds since the epoch".to_owned()
                })?
                .duration_since(UNIX_EPOCH)
                .map_err(|_| "since: before 1970".to_owned())?
                .as_micros() as i64,
        }),
    };
    let limit = match params.get("limit") {
        None => ALERTS_DEFAULT_LIMIT,
        Some(l) => match l.parse::<i64>() {
            Ok(n) if (1..=ALERTS_MAX_LIMIT).contains(&n) => n,
            _ => return Err(format!("limit: expected 1..={ALERTS_MAX_LIMIT}")),
        },
    };
    let user = params.get("user").filter(|u| !u.is_empty()).cloned();
    Ok(AlertQuery { since_us, user, limit })
}

async fn recover(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    let (status, message) = if let Some(e) = rejection.find::<ApiError>() {
        (e.status, e.message.clone())
    } else if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "not found".to_owned())
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed".to_owned())
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        (StatusCode::BAD_REQUEST, "invalid query string".to_owned())
    } else {
        (StatusCode::BAD_REQUEST, "bad request".to_owned())
    };
    let mut reply = warp::reply::with_status(warp::reply::json(&json!({"error": message})), status).into_response();
    if status == StatusCode::UNAUTHORIZED {
        reply.headers_mut().insert("www-authenticate", warp::http::HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        reply.headers_mut().insert("retry-after", warp::http::HeaderValue::from_static("1"));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn alert_queries_parse_with_clear_refusals() {
        let q = alert_query(&params(&[("since", "2026-11-22T08:00:00Z"), ("user", "u1"), ("limit", "5")])).unwrap();
        assert_eq!(q.since_us, Some(1_795_334_400_000_000));
        assert_eq!(q.user.as_deref(), Some("u1"));
        assert_eq!(q.limit, 5);
        let q = alert_query(&params(&[("since", "1700000000000000")])).unwrap();
        assert_eq!((q.since_us, q.limit), (Some(1_700_000_000_000_000), ALERTS_DEFAULT_LIMIT));
        for bad in [&[("since", "yesterday")][..], &[("limit", "0")], &[("limit", "1001")], &[("users", "x")]] {
            assert!(alert_query(&params(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn route_names_are_bounded() {
        assert_eq!(route_name("/api/users/someone"), "api_users");
        assert_eq!(route_name("/api/alerts"), "api_alerts");
        assert_eq!(route_name("/wp-admin"), "other");
    }

    #[test]
    fn recent_alerts_answer_like_the_database() {
        let recent = RecentAlerts::new(3);
        let alert = |id: &str, user: &str, at: i64| json!({"alert_id": id, "user_id": user, "detected_at_us": at});
        assert!(recent.add(alert("a", "u1", 10)));
        assert!(!recent.add(alert("a", "u1", 10)), "a repeated alert is kept once");
        recent.add(alert("b", "u2", 20));
        recent.add(alert("c", "u1", 30));
        recent.add(alert("d", "u1", 40));
        let ids = |rows: Vec<serde_json::Value>| {
            rows.iter().map(|r| r["alert_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
        };
        let all = AlertQuery { since_us: None, user: None, limit: 10 };
        assert_eq!(ids(recent.query(&all)), ["d", "c", "b"], "newest first; the oldest left");
        assert_eq!(ids(recent.query(&AlertQuery { user: Some("u1".into()), ..all.clone() })), ["d", "c"]);
        assert_eq!(ids(recent.query(&AlertQuery { since_us: Some(30), ..all.clone() })), ["d", "c"]);
        assert_eq!(ids(recent.query(&AlertQuery { limit: 1, ..all })), ["d"]);
    }
}
