//! Running a service: [`Service`] owns the HTTP server (metrics, health, the alert API and page)
//! and either a processor instance (its fleet stages, instance directory and in-process
//! PostgreSQL sink) or the sink alone, started together and stopped together.
//! `metronome process`, `metronome sink-postgres` and `metronome demo` all run it.
//!
//! # Layout
//! - [`service_runtime`], [`shutdown_on_signal`], [`wait_for_termination`]: the process edge.
//! - [`Service`]: what runs and its lifecycle; `Parts` builds a processor before anything
//!   connects, `Http` is the server's start and stop.
//! - [`postgres_sink`], [`load_model`], [`load_press_model`]: the pieces commands share.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, ModelSource};
use crate::http::{AlertDb, ApiState, BrokerProbe, HttpConfig, Readiness, UserApi};
use crate::sink::{PostgresSink, SinkSummary};
use crate::stream::directory::DirectoryReader;
use crate::stream::stages::FleetStages;
use crate::stream::{Processor, RunSummary};
use metronome_core::detect::Detector;
use metronome_io::postgres::PgTarget;
use metronome_model::stream::StreamModel;
use metronome_model::{LstmModel, ReloadingModel};
use tokio_util::sync::CancellationToken;

/// The runtime of the long-running commands: one worker (the processor has its own threads).
pub fn service_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

/// A token SIGTERM or Ctrl-C cancels (call inside the runtime).
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_termination().await;
        tracing::info!("termination requested: finishing the work in hand");
        on_signal.cancel();
    });
    shutdown
}

/// SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C).
pub async fn wait_for_termination() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The sink of the alert topic into `postgres.url`.
pub fn postgres_sink(config: &Config) -> Result<PostgresSink, String> {
    PostgresSink::new(
        config.postgres.clone(),
        config.kafka.clone(),
        &config.stream.alerts_topic,
        &config.stream.application_id,
    )
    .map_err(|e| e.to_string())
}

/// The LSTM `model.manifest` names, loaded once, with the per-press model
/// `model.press_manifest` names beside it (`None`: timing rules only).
pub fn load_model(config: &Config) -> Result<Option<LstmModel>, String> {
    let Some(model) = (match config.model.source() {
        ModelSource::Embedded => Some(LstmModel::embedded().map_err(|e| e.to_string())?),
        ModelSource::Manifest(path) => Some(LstmModel::load(&path).map_err(|e| e.to_string())?),
        ModelSource::None => None,
    }) else {
        return Ok(None);
    };
    Ok(Some(match load_press_model(config)? {
        Some(press) => model.with_press_model(press),
        None => model,
    }))
}

/// The per-press model `model.press_manifest` names (`None`: none).
pub fn load_press_model(config: &Config) -> Result<Option<StreamModel>, String> {
    Ok(match config.model.press_source() {
        ModelSource::Embedded => Some(StreamModel::embedded().map_err(|e| e.to_string())?),
        ModelSource::Manifest(path) => Some(StreamModel::load(&path).map_err(|e| e.to_string())?),
        ModelSource::None => None,
    })
}

/// `http.advertised_url`, else `http://<listen ip or host name>:<bound port>`.
fn advertised_url(http: &HttpConfig, bound: SocketAddr, host: &str) -> String {
    if !http.advertised_url.is_empty() {
        return http.advertised_url.clone();
    }
    if bound.ip().is_unspecified() {
        format!("http://{host}:{}", bound.port())
    } else {
        format!("http://{bound}")
    }
}

/// The HTTP server of a running service, stopped by [`Http::stop`].
struct Http {
    task: tokio::task::JoinHandle<()>,
    bound: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Http {
    /// Starts the server when `[http]` enables it, within its limits. An address other
    /// machines reach without a token is refused ([`HttpConfig::check_exposure`]).
    async fn start(http: &HttpConfig, state: ApiState) -> Result<Option<Self>, String> {
        if !http.enabled {
            return Ok(None);
        }
        http.check_exposure()?;
        let addr = http.listen_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, server) = crate::http::serve(addr, state, http.limits(), async move {
            let _ = stopped.await;
        })
        .await
        .map_err(|e| format!("http: cannot listen on {addr}: {e}"))?;
        tracing::info!(%bound, "http serving /, /metrics, /healthz, /readyz, /api/alerts, /api/users");
        Ok(Some(Self { task: tokio::spawn(server), bound, stop }))
    }

    /// Stops accepting, lets the requests in hand finish, and waits for the server to end.
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// What a service ran, for its exit summary.
#[derive(Debug, Default)]
pub struct ServiceSummary {
    /// The processor's totals (`None`: the sink alone).
    pub processor: Option<RunSummary>,
    /// The sink's totals (`None`: no sink, or it failed; a failed in-process sink is logged
    /// and does not stop the processor).
    pub sink: Option<SinkSummary>,
}

/// What a process runs: HTTP (metrics, health, the alert API and page) with either a
/// processor instance (its fleet stages, its instance directory and, when
/// `postgres.sink_in_process`, the PostgreSQL sink), or the sink alone. Everything it starts
/// stops together: when `shutdown` is cancelled, or when the processor (or the sink alone)
/// stops by itself.
pub struct Service {
    config: Config,
    with_processor: bool,
    alerts: Option<AlertDb>,
}

impl Service {
    /// A processor instance, with its sink when `postgres.sink_in_process`.
    pub fn processor(config: Config) -> Self {
        Self { config, with_processor: true, alerts: None }
    }

    /// The PostgreSQL sink alone (`metronome sink-postgres`).
    pub fn sink_alone(config: Config) -> Self {
        Self { config, with_processor: false, alerts: None }
    }

    /// `/api/alerts` reads `alerts` instead of the `postgres.url` database.
    pub fn with_alerts(mut self, alerts: AlertDb) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// Runs until `shutdown` is cancelled or the service stops by itself; `on_http` hears the
    /// address the server bound. Call inside a runtime.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        on_http: impl FnOnce(SocketAddr),
    ) -> Result<ServiceSummary, String> {
        // Before anything connects: an API open to anyone is refused at once.
        self.config.http.check_exposure()?;
        let alerts = self.alerts.or_else(|| PgTarget::parse(&self.config.postgres.url).ok().map(AlertDb::new));
        if self.with_processor {
            run_processor(self.config, shutdown, alerts, on_http).await
        } else {
            run_sink_alone(self.config, shutdown, alerts, on_http).await
        }
    }
}

/// The sink with HTTP beside it, until `shutdown` or a sink error.
async fn run_sink_alone(
    config: Config,
    shutdown: CancellationToken,
    alerts: Option<AlertDb>,
    on_http: impl FnOnce(SocketAddr),
) -> Result<ServiceSummary, String> {
    let sink = postgres_sink(&config)?;
    let state = ApiState { token: config.http.token(), readiness: Readiness::default(), alerts, users: None };
    let http = Http::start(&config.http, state).await?;
    if let Some(http) = &http {
        on_http(http.bound);
    }
    let result = sink.run(shutdown).await;
    if let Some(http) = http {
        http.stop().await;
    }
    Ok(ServiceSummary { processor: None, sink: Some(result.map_err(|e| e.to_string())?) })
}

/// A processor and what it needs, built before anything connects.
struct Parts {
    processor: Processor,
    stages: Option<FleetStages>,
    sink: Option<PostgresSink>,
}

impl Parts {
    fn build(config: &Config) -> Result<Self, String> {
        let detector = Detector::new(config.detector.clone()).map_err(|e| e.to_string())?;
        let model = match config.model.source() {
            ModelSource::Manifest(path) => {
                let reloading = ReloadingModel::load(&path).map_err(|e| e.to_string())?;
                Some(match load_press_model(config)? {
                    Some(press) => reloading.with_press_model(press),
                    None => reloading,
                })
            }
            _ => load_model(config)?.map(ReloadingModel::fixed),
        };
        let sink = if config.postgres.sink_in_process { Some(postgres_sink(config)?) } else { None };
        let stages = if config.detector.fleet.enabled {
            let fleet = config.detector.fleet.clone();
            let stages =
                FleetStages::new(config.stream.clone(), config.kafka.clone(), fleet, &config.detector.model_version)
                    .map_err(|e| e.to_string())?;
            Some(stages)
        } else {
            None
        };
        let idle = Duration::from_millis(u64::from(config.detector.window.idle_timeout_ms));
        let reload = Duration::from_secs(config.model.reload_check_s.max(1));
        let processor = Processor::new(config.stream.clone(), config.kafka.clone(), detector, idle, model, reload)
            .map_err(|e| e.to_string())?;
        Ok(Self { processor, stages, sink })
    }
}

/// The API's state for a processor: readiness from its status and the broker, user queries
/// answered here or redirected through the instance directory.
fn processor_api(config: &Config, processor: &Processor, alerts: Option<AlertDb>) -> Result<ApiState, String> {
    let directory = match DirectoryReader::start(&config.kafka, &config.stream.instances_topic()) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read instance announcements: user queries will not be redirected");
            None
        }
    };
    let broker = BrokerProbe::new(&config.kafka, Duration::from_secs(2))?;
    Ok(ApiState {
        token: config.http.token(),
        readiness: Readiness { status: Some(processor.status()), broker: Some(broker) },
        alerts,
        users: Some(UserApi { queries: processor.queries(), directory }),
    })
}

/// One processor instance with HTTP, its fleet stages and its sink, until `shutdown` or the
/// processor stops; then all of them stop.
async fn run_processor(
    config: Config,
    shutdown: CancellationToken,
    alerts: Option<AlertDb>,
    on_http: impl FnOnce(SocketAddr),
) -> Result<ServiceSummary, String> {
    let Parts { processor, stages, sink } = Parts::build(&config)?;
    let state = processor_api(&config, &processor, alerts)?;
    let http = Http::start(&config.http, state).await?;
    let processor = match &http {
        Some(http) => {
            on_http(http.bound);
            let host = config.stream.instance_name();
            processor.with_advertised_url(&advertised_url(&config.http, http.bound, &host))
        }
        None => processor,
    };
    let sink = sink.map(|s| tokio::spawn(s.run(shutdown.clone())));
    let stages = stages.map(|stages| {
        let stop = shutdown.clone();
        tokio::task::spawn_blocking(move || {
            let result = stages.run(&stop);
            // The fleet stages failing stops the instance: its partitions then move elsewhere.
            stop.cancel();
            result
        })
    });
    let for_processor = shutdown.clone();
    let processed = tokio::task::spawn_blocking(move || processor.run(&for_processor))
        .await
        .map_err(|e| format!("processor thread failed: {e}"));
    // The processor stopped (asked to, or failed): the stages, the sink and the server stop with it.
    shutdown.cancel();
    let staged = match stages {
        Some(stages) => match stages.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("fleet stages: {e}")),
            Err(e) => Err(format!("fleet stages thread failed: {e}")),
        },
        None => Ok(()),
    };
    if let Some(http) = http {
        http.stop().await;
    }
    let sink = match sink {
        Some(sink) => match sink.await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "postgres sink stopped");
                eprintln!("metronome: postgres sink failed: {e}");
                None
            }
            Err(e) => {
                eprintln!("metronome: postgres sink task failed: {e}");
                None
            }
        },
        None => None,
    };
    let summary = processed?.map_err(|e| e.to_string())?;
    staged.map(|()| ServiceSummary { processor: Some(summary), sink })
}
