//! The HTTP side of an instance (warp): metrics, health, the alert and user API, the alert page.
//!
//! ```text
//!  GET /metrics              Prometheus text (no auth)
//!  GET /healthz              200 while the process runs (no auth)
//!  GET /readyz               200 when the processor has joined, every task is restored and the
//!                            broker answers; else 503 with the reasons
//!  GET /api/alerts           alerts from PostgreSQL (or kept in memory by the demo):
//!                            ?since=RFC3339|micros&user=&limit=
//!  GET /api/users/{id}       the user's live window state and latest scores, from the instance
//!                            owning the user's partition; elsewhere 421 naming the owner
//!  GET /                     the alert page (static, embedded)
//! ```
//! Everything but `/healthz` and `/metrics` takes `Authorization: Bearer <token>` when
//! `http.bearer_token` is set. `/readyz` without any `Authorization` header (a kubelet's probe)
//! still answers 200 or 503, without the reasons; a wrong token is refused everywhere.
//!
//! Safe by default: a listen address other machines can reach, without a token, refuses to
//! start unless `http.allow_anonymous = true` ([`HttpConfig::check_exposure`]). The server
//! ([`serve`]) speaks HTTP/1.1 with a deadline on every request head (`header_read_timeout_ms`:
//! a slow-loris socket is closed, an idle keep-alive one too) and at most `max_connections`
//! open at once (past that, new ones wait in the listen backlog until one closes). `/readyz`
//! answers from the broker probe's cached verdict, and user queries wait in a bounded queue.
//!
//! # Layout
//! - [`HttpConfig`]: `[http]` settings.
//! - [`mod@routes`]: the filters, over an [`ApiState`] whose parts are seams (readiness, alert
//!   source), so warp's test utilities can drive them.
//! - [`serve`]: binding, the connection limits and graceful shutdown.

pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::events::HttpConnectionOpened;

pub use routes::{routes, AlertDb, ApiState, BrokerProbe, Readiness, RecentAlerts, UserApi};

/// `[http]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve HTTP at all.
    pub enabled: bool,
    /// Address to listen on.
    pub listen: String,
    /// When not empty, every route but `/healthz` and `/metrics` wants `Authorization: Bearer`
    /// with this token.
    pub bearer_token: String,
    /// Serve the API without a token on an address other machines can reach (refused otherwise).
    pub allow_anonymous: bool,
    /// The URL other instances send callers to for users this instance owns; empty: derived
    /// from the host name and the bound port.
    pub advertised_url: String,
    /// Longest a client may take to send a request's head (and an idle keep-alive connection
    /// may stay open) before the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Most connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:9464".to_owned(),
            bearer_token: String::new(),
            allow_anonymous: false,
            advertised_url: String::new(),
            header_read_timeout_ms: 10_000,
            max_connections: 1024,
        }
    }
}

impl HttpConfig {
    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|_| format!("http.listen {:?} is not an address like 0.0.0.0:9464", self.listen))
    }

    /// Checks the values a file or the environment can get wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.listen_addr()?;
        if self.header_read_timeout_ms == 0 {
            return Err("http.header_read_timeout_ms must be at least 1".to_owned());
        }
        if self.max_connections == 0 {
            return Err("http.max_connections must be at least 1".to_owned());
        }
        Ok(())
    }

    /// Refuses to serve the API to anyone who can reach the address: a listen address other
    /// than loopback needs a bearer token, or `allow_anonymous` said out loud.
    pub fn check_exposure(&self) -> Result<(), String> {
        let addr = self.listen_addr()?;
        if !self.enabled || addr.ip().is_loopback() || self.token().is_some() || self.allow_anonymous {
            return Ok(());
        }
        Err(format!(
            "http.listen {addr} is reachable from other machines and http.bearer_token is empty: set a token \
             (METRONOME_HTTP__BEARER_TOKEN), listen on 127.0.0.1, or set http.allow_anonymous = true"
        ))
    }

    /// The server's limits.
    pub fn limits(&self) -> ServeLimits {
        ServeLimits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            max_connections: self.max_connections,
        }
    }

    /// The token, if auth is on.
    pub fn token(&self) -> Option<Arc<str>> {
        let t = self.bearer_token.trim();
        (!t.is_empty()).then(|| Arc::from(t))
    }
}

/// What one server lets its clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Longest a request's head may take to arrive (and an idle connection may stay open).
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        HttpConfig::default().limits()
    }
}

/// Most time open requests get to finish once the server is told to stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves `state`'s routes until `shutdown` completes, within `limits`.
/// Returns the bound address (port 0 picks one) and the server's future: it accepts while a
/// connection slot is free, serves each connection on a task of its own, and on `shutdown`
/// stops accepting and lets open requests finish (for at most 5 s, `DRAIN_TIMEOUT`).
pub async fn serve(
    addr: SocketAddr,
    state: ApiState,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let service = TowerToHyperService::new(warp::service(routes(Arc::new(state))));
    let server = async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let graceful = GracefulShutdown::new();
        let mut http1 = http1::Builder::new();
        http1.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        tokio::pin!(shutdown);
        loop {
            let slot = tokio::select! {
                slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
                () = &mut shutdown => break,
            };
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, most often: back off rather than spin.
                        tracing::warn!(error = %e, "http: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let connection = graceful.watch(http1.serve_connection(TokioIo::new(stream), service.clone()));
            let open = HttpConnectionOpened::emit_guard();
            tokio::spawn(async move {
                // A client's error (a head too slow, a reset) ends its own connection only.
                let _ = connection.await;
                drop((open, slot));
            });
        }
        drop(listener);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await;
    };
    Ok((bound, server))
}
