//! The `metronome` binary: argument parsing and wiring only; the work lives in the library.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use metronome::config::{Config, ModelSource};
use metronome::detect::{Detector, SequenceScorer};
use metronome::http::{AlertDb, ApiState, BrokerProbe, HttpConfig, Readiness, UserApi};
use metronome::keylog::{self, KeylogReader, KeylogWriter};
use metronome::lstm::{LstmModel, ReloadingModel};
use metronome::macrogen::MacroFamily;
use metronome::score::{self, BadRows, OutputSelection, ScoreError};
use metronome::simulate::{self, SimulationPlan};
use metronome::sink::{PgTarget, PostgresSink};
use metronome::stream::directory::DirectoryReader;
use metronome::stream::{self, Processor, Shutdown};

/// Catches users whose keyboards are driven by macros.
#[derive(Debug, Parser)]
#[command(name = "metronome", version, about)]
struct Cli {
    /// Configuration file (TOML) layered over the embedded defaults; METRONOME_* variables
    /// override both.
    #[arg(long, global = true, env = "METRONOME_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the stream processor: consume key events, keep per-user state in RocksDB, produce
    /// alerts exactly once. Stops cleanly on SIGTERM or Ctrl-C.
    Process {
        /// Kafka bootstrap servers (else `kafka."bootstrap.servers"` from the configuration).
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// Where task state lives (else `stream.state_dir`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// This instance's name in the group (else `stream.instance_id`, else the host name).
        #[arg(long)]
        instance_id: Option<String>,
        /// PostgreSQL for the alert sink (else `postgres.url`; METRONOME_POSTGRES__URL).
        #[arg(long)]
        postgres_url: Option<String>,
        /// Do not run the PostgreSQL sink in this process (run `metronome sink-postgres`).
        #[arg(long)]
        no_sink: bool,
    },
    /// Write committed alerts from the alert topic to PostgreSQL, exactly once (the sink
    /// `metronome process` runs by default, alone). Stops cleanly on SIGTERM or Ctrl-C.
    SinkPostgres {
        /// Kafka bootstrap servers (else from the configuration).
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// PostgreSQL URL (else `postgres.url`).
        #[arg(long)]
        postgres_url: Option<String>,
    },
    /// Print committed alerts from the alert topic as JSON lines, from the beginning, until none
    /// arrives for `--idle-exit-s` seconds.
    Alerts {
        /// Kafka bootstrap servers (else from the configuration).
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// Stop after this many seconds without a new alert.
        #[arg(long, default_value_t = 3600)]
        idle_exit_s: u64,
    },
    /// Publish a keylog CSV to the input topic as agents would (KeyEventBatch per user, keyed
    /// by user id, idempotent producer).
    Publish {
        /// The keylog file (plain or gzip, `-` for stdin).
        #[arg(long)]
        input: PathBuf,
        /// Kafka bootstrap servers (else from the configuration).
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// Topic (else `stream.input_topic`).
        #[arg(long)]
        topic: Option<String>,
        /// Most events per record.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch_events: u32,
        /// Most event time a record spans, milliseconds, as an agent sending every ~100 ms does
        /// (0: cut by --batch-events alone).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=3_600_000))]
        batch_ms: u32,
    },
    /// Score a keylog CSV (plain or gzip, `-` for stdin) through the detection core; JSON lines
    /// on stdout, summary on stderr.
    Score {
        /// The keylog file.
        #[arg(long)]
        input: PathBuf,
        /// Skip invalid rows (reported on stderr by line number) instead of stopping.
        #[arg(long)]
        skip_bad_rows: bool,
        /// Print alert records only, not every window.
        #[arg(long)]
        alerts_only: bool,
        /// The LSTM scorer: `embedded`, `none` or a model manifest path (default: the
        /// configuration's `model.manifest`).
        #[arg(long, value_name = "embedded|none|MANIFEST")]
        model: Option<String>,
    },
    /// Write synthetic traffic as a keylog CSV: replayed real humans plus macro users.
    Simulate {
        /// Keylog of real human typing to replay and to draw macros from.
        #[arg(long, default_value = "../shared/data/aalto-a-train.csv.gz")]
        humans: PathBuf,
        /// Output file (`-` for stdout).
        #[arg(long)]
        output: PathBuf,
        /// Users in total.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        users: u32,
        /// Share of users that run a macro, 0..1.
        #[arg(long, default_value_t = 0.25)]
        macro_share: f64,
        /// Macro families, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = MacroFamily::ALL.to_vec())]
        families: Vec<MacroFamily>,
        /// Macro users type as humans first, then switch the macro on.
        #[arg(long)]
        mixed: bool,
        /// Macro key presses per macro user.
        #[arg(long, default_value_t = 200)]
        macro_presses: usize,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    // Logs go to stderr as text; RUST_LOG filters them (default: info).
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,metronome=info".into()),
        )
        .with_target(false)
        // Colour codes only for a terminal: log files and collectors get plain `key=value`.
        .with_ansi(io::stderr().is_terminal())
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's message without the usage block.
            let text = e.to_string();
            let message = text.split("\n\n").next().unwrap_or("invalid arguments");
            let message: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            eprintln!("metronome: {} (see --help)", message.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metronome: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let config = Config::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
    match cli.command {
        Command::Score { input, skip_bad_rows, alerts_only, model } => {
            let mut config = config;
            if let Some(m) = model {
                config.model.manifest = m;
            }
            run_score(config, &input, skip_bad_rows, alerts_only)
        }
        Command::Process { bootstrap_servers, state_dir, instance_id, postgres_url, no_sink } => {
            let mut config = with_postgres(with_bootstrap(config, bootstrap_servers), postgres_url)?;
            if no_sink {
                config.postgres.sink_in_process = false;
            }
            if let Some(dir) = state_dir {
                config.stream.state_dir = dir;
            }
            if let Some(id) = instance_id {
                config.stream.instance_id = id;
            }
            run_process(config)
        }
        Command::SinkPostgres { bootstrap_servers, postgres_url } => {
            let config = with_postgres(with_bootstrap(config, bootstrap_servers), postgres_url)?;
            run_sink(config)
        }
        Command::Alerts { bootstrap_servers, idle_exit_s } => {
            let config = with_bootstrap(config, bootstrap_servers);
            let topic = config.stream.alerts_topic.clone();
            let mut out = io::stdout().lock();
            let (alerts, bad) = stream::alerts::follow(&config.kafka, &topic, Duration::from_secs(idle_exit_s), |a| {
                let _ = writeln!(out, "{}", stream::alerts::alert_json(a));
                let _ = out.flush();
            })
            .map_err(|e| format!("reading {topic}: {e}"))?;
            eprintln!("metronome: {alerts} alerts read from {topic} ({bad} undecodable)");
            Ok(())
        }
        Command::Publish { input, bootstrap_servers, topic, batch_events, batch_ms } => {
            let config = with_bootstrap(config, bootstrap_servers);
            let topic = topic.unwrap_or(config.stream.input_topic.clone());
            let shape = stream::publish::RecordShape {
                max_events: batch_events as usize,
                span_us: i64::from(batch_ms) * 1_000,
            };
            run_publish(&config, &input, &topic, shape)
        }
        Command::Simulate { humans, output, users, macro_share, families, mixed, macro_presses, seed } => {
            let plan = SimulationPlan {
                users: users as usize,
                macro_share,
                families,
                mixed,
                macro_presses,
                seed,
                start_us: 1_700_000_000_000_000,
            };
            run_simulate(&plan, &humans, &output)
        }
    }
}

/// `--bootstrap-servers` wins over `kafka."bootstrap.servers"` from the configuration.
fn with_bootstrap(mut config: Config, servers: Option<String>) -> Config {
    if let Some(servers) = servers {
        config.kafka.insert("bootstrap.servers".to_owned(), servers);
    }
    config
}

/// `--postgres-url` wins over `postgres.url`; checked here so a bad one is one line at start-up.
fn with_postgres(mut config: Config, url: Option<String>) -> Result<Config, String> {
    if let Some(url) = url {
        config.postgres.url = url;
        config.postgres.validate()?;
    }
    Ok(config)
}

fn sink_of(config: &Config) -> Result<PostgresSink, String> {
    PostgresSink::new(
        config.postgres.clone(),
        config.kafka.clone(),
        &config.stream.alerts_topic,
        &config.stream.application_id,
    )
    .map_err(|e| e.to_string())
}

/// `http.advertised_url`, else `http://<listen ip or host name>:<bound port>`.
fn advertised_url(http: &HttpConfig, bound: std::net::SocketAddr, host: &str) -> String {
    if !http.advertised_url.is_empty() {
        return http.advertised_url.clone();
    }
    if bound.ip().is_unspecified() {
        format!("http://{host}:{}", bound.port())
    } else {
        format!("http://{bound}")
    }
}

/// Starts the HTTP server when `[http]` enables it; it stops when `stop` fires.
async fn start_http(
    http: &HttpConfig,
    state: ApiState,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<Option<(tokio::task::JoinHandle<()>, std::net::SocketAddr)>, String> {
    if !http.enabled {
        return Ok(None);
    }
    let addr = http.listen_addr()?;
    let (bound, server) = metronome::http::serve(addr, state, async move {
        let _ = stop.await;
    })
    .await
    .map_err(|e| format!("http: cannot listen on {addr}: {e}"))?;
    tracing::info!(%bound, "http serving /, /metrics, /healthz, /readyz, /api/alerts, /api/users");
    Ok(Some((tokio::spawn(server), bound)))
}

fn run_sink(config: Config) -> Result<(), String> {
    let sink = sink_of(&config)?;
    let http = config.http.clone();
    let state = ApiState {
        token: http.token(),
        readiness: Readiness::default(),
        alerts: PgTarget::parse(&config.postgres.url).ok().map(AlertDb::new),
        users: None,
    };
    let runtime = service_runtime()?;
    runtime.block_on(async move {
        let shutdown = shutdown_on_signal();
        let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = start_http(&http, state, http_stopped).await?;
        let result = sink.run(shutdown).await;
        let _ = stop_http.send(());
        if let Some((server, _)) = server {
            let _ = server.await;
        }
        let summary = result.map_err(|e| e.to_string())?;
        eprintln!(
            "metronome: postgres sink wrote {} alerts in {} transactions ({} duplicates refused, {} dead letters, {} retries)",
            summary.writes.written, summary.batches, summary.writes.duplicates, summary.writes.dead_letters, summary.retries
        );
        Ok(())
    })
}

fn load_model(config: &Config) -> Result<Option<LstmModel>, String> {
    Ok(match config.model.source() {
        ModelSource::Embedded => Some(LstmModel::embedded().map_err(|e| e.to_string())?),
        ModelSource::Manifest(path) => Some(LstmModel::load(&path).map_err(|e| e.to_string())?),
        ModelSource::None => None,
    })
}

fn run_process(config: Config) -> Result<(), String> {
    let detector = Detector::new(config.detector.clone()).map_err(|e| e.to_string())?;
    let model = match config.model.source() {
        ModelSource::Manifest(path) => Some(ReloadingModel::load(&path).map_err(|e| e.to_string())?),
        _ => load_model(&config)?.map(ReloadingModel::fixed),
    };
    let sink = if config.postgres.sink_in_process { Some(sink_of(&config)?) } else { None };
    let idle = Duration::from_millis(u64::from(config.detector.window.idle_timeout_ms));
    let reload = Duration::from_secs(config.model.reload_check_s.max(1));
    let http = config.http.clone();
    let alerts_db = PgTarget::parse(&config.postgres.url).ok().map(AlertDb::new);
    let kafka = config.kafka.clone();
    let instances_topic = config.stream.instances_topic();
    let host = config.stream.instance_name();
    let processor =
        Processor::new(config.stream, config.kafka, detector, idle, model, reload).map_err(|e| e.to_string())?;
    let (status, queries) = (processor.status(), processor.queries());
    let runtime = service_runtime()?;
    runtime.block_on(async move {
        let shutdown = shutdown_on_signal();
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
            readiness: Readiness {
                status: Some(status),
                broker: Some(BrokerProbe::new(&kafka, Duration::from_secs(2))?),
            },
            alerts: alerts_db,
            users: Some(UserApi { queries, directory }),
        };
        let server = start_http(&http, state, http_stopped).await?;
        let processor = match &server {
            Some((_, bound)) => processor.with_advertised_url(&advertised_url(&http, *bound, &host)),
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
        let for_processor = shutdown.clone();
        let processed = tokio::task::spawn_blocking(move || processor.run(&for_processor))
            .await
            .map_err(|e| format!("processor thread failed: {e}"));
        // The processor stopped (asked to, or failed): the sink and the server stop with it.
        shutdown.trigger();
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
        eprintln!(
            "metronome: processed {} records ({} events): {} alerts, {} dead letters, {} commits, {} aborts",
            summary.records, summary.events, summary.alerts, summary.dead_letters, summary.commits, summary.aborts
        );
        Ok(())
    })
}

/// The runtime of the long-running commands: one worker (the processor has its own threads).
fn service_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

/// A shutdown signal raised by SIGTERM or Ctrl-C (call inside the runtime).
fn shutdown_on_signal() -> Shutdown {
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
async fn wait_for_termination() {
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

fn run_publish(config: &Config, input: &Path, topic: &str, shape: stream::publish::RecordShape) -> Result<(), String> {
    let producer = stream::publish::producer(&config.kafka).map_err(|e| format!("kafka producer: {e}"))?;
    let reader = KeylogReader::open(input).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let summary = stream::publish::publish_keylog(&producer, topic, reader, shape).map_err(|e| e.to_string())?;
    eprintln!(
        "metronome: published {} events of {} users as {} records to {topic} in {:.2}s",
        summary.events,
        summary.users,
        summary.records,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_score(config: Config, input: &Path, skip_bad_rows: bool, alerts_only: bool) -> Result<(), String> {
    let mut model = load_model(&config)?;
    let mut detector = Detector::new(config.detector).map_err(|e| e.to_string())?;
    let started = Instant::now();
    // Progress every million rows, for people watching a terminal; never into pipes or logs.
    let show_progress = io::stderr().is_terminal();
    let reader = KeylogReader::open(input).map_err(|e| e.to_string())?.enumerate().map(move |(i, row)| {
        if show_progress && i > 0 && i % (1 << 20) == 0 {
            eprintln!("metronome: {i} rows read ({:.0} rows/s)", i as f64 / started.elapsed().as_secs_f64());
        }
        row
    });
    let bad_rows = if skip_bad_rows { BadRows::Skip } else { BadRows::Stop };
    let select = OutputSelection { windows: !alerts_only };
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let mut reported = 0u32;
    let result = score::score_records(
        &mut detector,
        model.as_mut().map(|m| m as &mut dyn SequenceScorer),
        reader,
        bad_rows,
        select,
        &mut out,
        |e| {
            reported += 1;
            if reported <= 20 {
                eprintln!("metronome: skipped {e}");
            }
        },
        |e| eprintln!("metronome: {e}; those windows were scored on timing alone"),
    );
    let summary = match result {
        Ok(s) => s,
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(ScoreError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "metronome: scored {} rows of {} users in {secs:.2}s ({:.0} rows/s): {} windows, {} alerts, {} late events, {} bad rows",
        summary.rows,
        summary.users,
        summary.rows as f64 / secs.max(1e-9),
        summary.windows,
        summary.alerts,
        summary.late_events,
        summary.bad_rows
    );
    Ok(())
}

fn run_simulate(plan: &SimulationPlan, humans: &Path, output: &Path) -> Result<(), String> {
    // Each recorded user is replayed at most once per simulated human, so read what is needed.
    let wanted = plan.users.max(1);
    let reader = KeylogReader::open(humans).map_err(|e| e.to_string())?;
    let recordings: Vec<_> = keylog::group_by_user(reader, |_| true, Some(wanted))
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(_, events)| events)
        .collect();
    let users = simulate::simulate(plan, &recordings).map_err(|e| e.to_string())?;
    let sink: Box<dyn Write> = if output.as_os_str() == "-" {
        Box::new(io::stdout().lock())
    } else {
        Box::new(File::create(output).map_err(|e| format!("cannot create {}: {e}", output.display()))?)
    };
    let write_err = |e: io::Error| format!("writing {} failed: {e}", output.display());
    let mut writer = KeylogWriter::new(BufWriter::new(sink)).map_err(write_err)?;
    let mut events = 0usize;
    for user in &users {
        for e in &user.events {
            writer.write(&user.user_id, "sim", e).map_err(write_err)?;
        }
        events += user.events.len();
    }
    writer.finish().map_err(write_err)?;
    let macros = users.iter().filter(|u| matches!(u.truth, simulate::Truth::Macro { .. })).count();
    let families: Vec<String> = plan.families.iter().map(ToString::to_string).collect();
    eprintln!(
        "metronome: wrote {events} events of {} users ({macros} macro users: {}{})",
        users.len(),
        families.join(","),
        if plan.mixed { ", mixed sessions" } else { "" }
    );
    Ok(())
}
