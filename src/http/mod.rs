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
//! # Layout
//! - [`HttpConfig`]: `[http]` settings.
//! - [`mod@routes`]: the filters, over an [`ApiState`] whose parts are seams (readiness, alert
//!   source), so warp's test utilities can drive them.
//! - [`serve`]: binding and graceful shutdown.

pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

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
    /// The URL other instances send callers to for users this instance owns; empty: derived
    /// from the host name and the bound port.
    pub advertised_url: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:9464".to_owned(),
            bearer_token: String::new(),
            advertised_url: String::new(),
        }
    }
}

impl HttpConfig {
    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|_| format!("http.listen {:?} is not an address like 0.0.0.0:9464", self.listen))
    }

    /// The token, if auth is on.
    pub fn token(&self) -> Option<Arc<str>> {
        let t = self.bearer_token.trim();
        (!t.is_empty()).then(|| Arc::from(t))
    }
}

/// Binds `addr` and serves `state`'s routes until `shutdown` completes. Returns the bound
/// address (port 0 picks one) and the server's future.
pub async fn serve(
    addr: SocketAddr,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let server = warp::serve(routes(Arc::new(state))).incoming(listener).graceful(shutdown).run();
    Ok((bound, server))
}
