//! Running the processor as a service: the stream processor, its HTTP server (metrics, health,
//! the alert API and page), the instance directory and the in-process PostgreSQL sink, started
//! together and stopped together. `metronome process` and `metronome demo` both run it.
//!
//! # Layout
//! - [`service_runtime`], [`shutdown_on_signal`], [`wait_for_termination`]: the process edge.
//! - [`run_processor`]: wiring and lifecycle of one processor instance.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, ModelSource};
use crate::http::{AlertDb, ApiState, BrokerProbe, HttpConfig, Readiness, UserApi};
use crate::sink::PostgresSink;
use crate::stream::directory::DirectoryReader;
use crate::stream::stages::FleetStages;
use crate::stream::{Processor, RunSummary, Shutdown};
use metronome_core::detect::Detector;
use metronome_io::postgres::PgTarget;
use metronome_model::stream::StreamModel;
use metronome_model::{LstmModel, ReloadingModel};

/// The runtime of the long-running commands: one worker (the processor has its own threads).
pub fn service_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

/// A shutdown signal raised by SIGTERM or Ctrl-C (call inside the runtime).
pub fn shutdown_on_signal() -> Shutdown {
    let shutdown = Shutdown::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_termination().await;
        tracing::info!("termination requested: finishing the work in hand");
        on_signal.trigger();
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

/// Starts the HTTP server when `[http]` enables it, within its limits; it stops when `stop`
/// fires. An address other machines reach without a token is refused
/// ([`HttpConfig::check_exposure`]).
pub async fn start_http(
    http: &HttpConfig,
    state: ApiState,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<Option<(tokio::task::JoinHandle<()>, SocketAddr)>, String> {
    if !http.enabled {
        return Ok(None);
    }
    http.check_exposure()?;
    let addr = http.listen_addr()?;
    let (bound, server) = crate::http::serve(addr, state, http.limits(), async move {
        let _ = stop.await;
    })
    .await
    .map_err(|e| format!("http: cannot listen on {addr}: {e}"))?;
    tracing::info!(%bound, "http serving /, /metrics, /healthz, /readyz, /api/alerts, /api/users");
    Ok(Some((tokio::spawn(server), bound)))
}

/// Runs one processor instance with its HTTP server and (when `postgres.sink_in_process`) its
/// PostgreSQL sink until `shutdown` fires or the processor fails; all three stop together.
/// `on_http` hears the address the server bound. `/api/alerts` reads `alerts`, else the
/// `postgres.url` database. Call inside a runtime.
pub async fn run_processor(
    config: Config,
    shutdown: Shutdown,
    alerts: Option<AlertDb>,
    on_http: impl FnOnce(SocketAddr),
) -> Result<RunSummary, String> {
    // Before anything connects: an API open to anyone is refused at once.
    config.http.check_exposure()?;
    let detector = Detector::new(config.detector.clone()).map_err(|e| e.to_string())?;
    let model = match config.model.source() {
        ModelSource::Manifest(path) => {
            let reloading = ReloadingModel::load(&path).map_err(|e| e.to_string())?;
            Some(match load_press_model(&config)? {
                Some(press) => reloading.with_press_model(press),
                None => reloading,
            })
        }
        _ => load_model(&config)?.map(ReloadingModel::fixed),
    };
    let sink = if config.postgres.sink_in_process { Some(postgres_sink(&config)?) } else { None };
    let idle = Duration::from_millis(u64::from(config.detector.window.idle_timeout_ms));
    let reload = Duration::from_secs(config.model.reload_check_s.max(1));
    let http = config.http.clone();
    let alerts_db = alerts.or_else(|| PgTarget::parse(&config.postgres.url).ok().map(AlertDb::new));
    let kafka = config.kafka.clone();
    let instances_topic = config.stream.instances_topic();
    let host = config.stream.instance_name();
    let stages = if config.detector.fleet.enabled {
        let fleet = config.detector.fleet.clone();
        let stages =
            FleetStages::new(config.stream.clone(), config.kafka.clone(), fleet, &config.detector.model_version)
                .map_err(|e| e.to_string())?;
        Some(stages)
    } else {
        None
    };
    let processor =
        Processor::new(config.stream, config.kafka, detector, idle, model, reload).map_err(|e| e.to_string())?;
    let (status, queries) = (processor.status(), processor.queries());

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let directory = match DirectoryReader::start(&kafka, &instances_topic) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read instance announcements: user queries will not be redirected");
            None
        }
    };
    let state = ApiState {
        token: http.token(),
        readiness: Readiness { status: Some(status), broker: Some(BrokerProbe::new(&kafka, Duration::from_secs(2))?) },
        alerts: alerts_db,
        users: Some(UserApi { queries, directory }),
    };
    let server = start_http(&http, state, http_stopped).await?;
    let processor = match &server {
        Some((_, bound)) => {
            on_http(*bound);
            processor.with_advertised_url(&advertised_url(&http, *bound, &host))
        }
        None => processor,
    };
    let sink = sink.map(|s| {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let result = s.run(stop).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "postgres sink stopped");
            }
            result
        })
    });
    let stages = stages.map(|stages| {
        let stop = shutdown.clone();
        tokio::task::spawn_blocking(move || {
            let result = stages.run(&stop);
            // The fleet stages failing stops the instance: its partitions then move elsewhere.
            stop.trigger();
            result
        })
    });
    let for_processor = shutdown.clone();
    let processed = tokio::task::spawn_blocking(move || processor.run(&for_processor))
        .await
        .map_err(|e| format!("processor thread failed: {e}"));
    // The processor stopped (asked to, or failed): the stages, the sink and the server stop with it.
    shutdown.trigger();
    let staged = match stages {
        Some(stages) => match stages.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("fleet stages: {e}")),
            Err(e) => Err(format!("fleet stages thread failed: {e}")),
        },
        None => Ok(()),
    };
    let _ = stop_http.send(());
    if let Some((server, _)) = server {
        let _ = server.await;
    }
    if let Some(sink) = sink {
        match sink.await {
            Ok(Ok(s)) => eprintln!("metronome: postgres sink wrote {} alerts", s.writes.written),
            Ok(Err(e)) => eprintln!("metronome: postgres sink failed: {e}"),
            Err(e) => eprintln!("metronome: postgres sink task failed: {e}"),
        }
    }
    let summary = processed?.map_err(|e| e.to_string())?;
    staged.map(|()| summary)
}
