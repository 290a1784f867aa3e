//! The `metronome` binary: argument parsing and wiring only; the work lives in the library.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand};
use metronome::agent::capture::DeviceChoice;
use metronome::agent::{self, Source};
use metronome::archive::{self, format::Day};
use metronome::config::Config;
use metronome::http::{AlertDb, ApiState, Readiness};
use metronome::score::{self, BadRows, OutputSelection, ScoreError};
use metronome::service::{self, service_runtime, shutdown_on_signal, start_http};
use metronome::simulate::{self, SimulationPlan};
use metronome::stream;
use metronome_core::detect::{Detector, SequenceScorer};
use metronome_core::keylog::{self, KeylogReader, KeylogWriter};
use metronome_core::macrogen::MacroFamily;
use metronome_io::postgres::PgTarget;

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
    /// The whole pipeline on this machine with nothing installed: an embedded Kafka cluster,
    /// simulated users typing in real time (some switch a macro on), the processor with RocksDB
    /// state in a temporary directory, the alert page; alerts are printed as they are committed.
    Demo {
        /// Simulated users.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        users: u32,
        /// Share of users that switch a macro on, 0..1.
        #[arg(long, default_value_t = 0.3, value_parser = share)]
        macro_share: f64,
        /// Keylog of real human typing to replay, or `builtin` for the parametric typing model
        /// (the default when ../shared/data is not there).
        #[arg(long, value_name = "FILE|builtin")]
        humans: Option<String>,
        /// Seconds each user types at most.
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(10..=86_400))]
        typing_s: u64,
        /// Stop after this many seconds (default: once the traffic is sent and scored).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        duration_s: Option<u64>,
        /// Where the alert page and metrics are served (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// A real Kafka broker instead of the embedded cluster (exactly once there).
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// Write the alerts to this PostgreSQL database too.
        #[arg(long, env = "METRONOME_POSTGRES_URL")]
        postgres_url: Option<String>,
        /// RNG seed of the simulation.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Capture one user's key events from an evdev keyboard (or replay a keylog) and publish them
    /// as the agent on a player's machine: keys as per-session pseudonyms, a record every ~100
    /// ms, every record spooled to a bounded file until the broker has it. Stops on SIGTERM or
    /// Ctrl-C (and at the end of a replay), sending what is spooled for `agent.drain_timeout_s`.
    Agent {
        /// Whose keys these are (else `agent.user_id`).
        #[arg(long)]
        user: Option<String>,
        /// The evdev device to read (default: the first keyboard under /dev/input).
        #[arg(long, value_name = "/dev/input/eventN", conflicts_with = "replay")]
        device: Option<PathBuf>,
        /// Replay a keylog CSV (plain or gzip) instead of reading a device.
        #[arg(long, value_name = "FILE")]
        replay: Option<PathBuf>,
        /// The keylog's user to replay (default: its first user).
        #[arg(long, requires = "replay")]
        replay_user: Option<String>,
        /// Replay pace: 1 as recorded, 2 twice as fast, 0 all at once.
        #[arg(long, default_value_t = 1.0, requires = "replay", value_parser = non_negative)]
        replay_speed: f64,
        /// Kafka bootstrap servers (else from the configuration).
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// Topic (else `agent.topic`, else `stream.input_topic`).
        #[arg(long)]
        topic: Option<String>,
        /// The spool file (else `agent.spool_path`).
        #[arg(long)]
        spool: Option<PathBuf>,
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
        /// Record timestamps: `now` (as live agents send), or `event-time` (each record's first
        /// event, so a replayed day is that day to `metronome archive`).
        #[arg(long, value_enum, default_value_t = stream::publish::Timestamps::Now)]
        timestamps: stream::publish::Timestamps,
    },
    /// Score a keylog CSV (plain or gzip, `-` for stdin) through the detection core; JSON lines
    /// on stdout, summary on stderr.
    Score {
        /// The keylog file.
        #[arg(long, required_unless_present = "archive", conflicts_with = "archive")]
        input: Option<PathBuf>,
        /// Re-score an archived day instead (a backtest): the archive's location, a directory or
        /// s3://bucket/prefix (`archive.url` of the configuration: `--archive config`).
        #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX|config", requires = "day")]
        archive: Option<String>,
        /// The archived day to re-score, YYYY-MM-DD.
        #[arg(long, value_parser = parse_day, requires = "archive")]
        day: Option<Day>,
        /// The archived topic (else `archive.topic`, else `stream.input_topic`).
        #[arg(long, requires = "archive")]
        topic: Option<String>,
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
    /// Archive one day of the raw input topic: one compressed file per partition and a manifest
    /// (record counts, offsets, sha256) in the object store (`archive.url`), the run recorded in
    /// PostgreSQL's `archive_runs`; then delete archived days past `archive.retention_days`.
    /// Re-running a day rewrites the same files. Run nightly (k8s/: a CronJob).
    Archive {
        /// The day, YYYY-MM-DD (UTC). Default: yesterday.
        #[arg(long, value_parser = parse_day)]
        day: Option<Day>,
        /// Kafka bootstrap servers (else from the configuration).
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// The archive location, a directory or s3://bucket/prefix (else `archive.url`).
        #[arg(long)]
        archive: Option<String>,
        /// The topic (else `archive.topic`, else `stream.input_topic`).
        #[arg(long)]
        topic: Option<String>,
        /// PostgreSQL for archive_runs (else `postgres.url`).
        #[arg(long)]
        postgres_url: Option<String>,
        /// Do not record the run in PostgreSQL.
        #[arg(long, conflicts_with = "postgres_url")]
        no_record: bool,
    },
    /// Produce synthetic traffic, to Kafka as the users' agents would send it, or to a keylog
    /// CSV: replayed real humans (or the built-in typing model) plus macro users.
    Simulate {
        /// Keylog of real human typing to replay and to draw macros from, or `builtin` for the
        /// parametric typing model (the default when ../shared/data is not there).
        #[arg(long, value_name = "FILE|builtin")]
        humans: Option<String>,
        /// Write a keylog CSV here (`-` for stdout) instead of publishing.
        #[arg(long, conflicts_with_all = ["bootstrap_servers", "kafka"])]
        output: Option<PathBuf>,
        /// Publish to this Kafka broker.
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// Publish to the configuration's Kafka (`kafka."bootstrap.servers"`).
        #[arg(long)]
        kafka: bool,
        /// Topic to publish to (else `stream.input_topic`).
        #[arg(long)]
        topic: Option<String>,
        /// Target rate when publishing, events per second (0: as fast as possible).
        #[arg(long, default_value_t = 0.0, value_parser = non_negative, conflicts_with = "realtime")]
        rate: f64,
        /// Publish in real time: users start typing now, each event sent when it happens.
        #[arg(long)]
        realtime: bool,
        /// Users in total.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        users: u32,
        /// Share of users that run a macro, 0..1.
        #[arg(long, default_value_t = 0.25)]
        macro_share: f64,
        /// Macro families, comma separated.
        #[arg(long, value_delimiter = ',', value_parser = macro_family_parser(),
              default_values_t = MacroFamily::ALL.to_vec())]
        families: Vec<MacroFamily>,
        /// Macro users type as humans first, then switch the macro on.
        #[arg(long)]
        mixed: bool,
        /// Macro key presses per macro user.
        #[arg(long, default_value_t = 200)]
        macro_presses: usize,
        /// Key presses per human of the built-in typing model.
        #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(20..=1_000_000))]
        human_presses: u32,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
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
    // Logs go to stderr as text; RUST_LOG filters them (default: info; the demo talks on stdout
    // and keeps its log to warnings).
    let default_filter = if matches!(cli.command, Command::Demo { .. }) { "warn" } else { "warn,metronome=info" };
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_target(false)
        // Colour codes only for a terminal: log files and collectors get plain `key=value`.
        .with_ansi(io::stderr().is_terminal())
        .init();
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
        Command::Score { input, archive, day, topic, skip_bad_rows, alerts_only, model } => {
            let mut config = config;
            if let Some(m) = model {
                config.model.manifest = m;
            }
            match (input, archive, day) {
                (Some(input), _, _) => run_score(config, ScoreInput::Keylog(&input), skip_bad_rows, alerts_only),
                (None, Some(location), Some(day)) => {
                    let location = if location == "config" { config.archive.url.clone() } else { location };
                    let topic = topic.unwrap_or_else(|| archive_topic(&config));
                    run_score(
                        config,
                        ScoreInput::Archive { location: &location, topic: &topic, day },
                        skip_bad_rows,
                        alerts_only,
                    )
                }
                _ => Err("give --input FILE, or --archive LOCATION --day YYYY-MM-DD".to_owned()),
            }
        }
        Command::Archive { day, bootstrap_servers, archive, topic, postgres_url, no_record } => {
            let mut config = with_postgres(with_bootstrap(config, bootstrap_servers), postgres_url)?;
            if let Some(location) = archive {
                config.archive.url = location;
            }
            let topic = topic.unwrap_or_else(|| archive_topic(&config));
            run_archive(&config, &topic, day, !no_record)
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
                let _ = writeln!(out, "{}", metronome_core::alert_json::alert_json(a));
                let _ = out.flush();
            })
            .map_err(|e| format!("reading {topic}: {e}"))?;
            eprintln!("metronome: {alerts} alerts read from {topic} ({bad} undecodable)");
            Ok(())
        }
        Command::Demo {
            users,
            macro_share,
            humans,
            typing_s,
            duration_s,
            listen,
            bootstrap_servers,
            postgres_url,
            seed,
        } => {
            let recordings = load_humans(humans.as_deref(), users as usize)?;
            let opts = metronome::demo::DemoOptions {
                users: users as usize,
                macro_share,
                recordings,
                typing: Duration::from_secs(typing_s),
                duration: duration_s.map(Duration::from_secs),
                listen: free_or_any(listen),
                bootstrap_servers,
                postgres_url,
                seed,
            };
            let out: std::sync::Arc<std::sync::Mutex<dyn Write + Send>> =
                std::sync::Arc::new(std::sync::Mutex::new(io::stdout()));
            metronome::demo::run(config, opts, out)?;
            Ok(())
        }
        Command::Agent { user, device, replay, replay_user, replay_speed, bootstrap_servers, topic, spool } => {
            let mut config = with_bootstrap(config, bootstrap_servers);
            if let Some(user) = user {
                config.agent.user_id = user;
            }
            if let Some(spool) = spool {
                config.agent.spool_path = spool;
            }
            config.agent.validate()?;
            let topic = topic
                .or_else(|| Some(config.agent.topic.clone()).filter(|t| !t.is_empty()))
                .unwrap_or_else(|| config.stream.input_topic.clone());
            let source = match replay {
                Some(path) => Source::Replay { path, user: replay_user, speed: replay_speed },
                None => Source::Device(device.map_or(DeviceChoice::AutoDetect, DeviceChoice::Path)),
            };
            run_agent(&config, &topic, source)
        }
        Command::Publish { input, bootstrap_servers, topic, batch_events, batch_ms, timestamps } => {
            let config = with_bootstrap(config, bootstrap_servers);
            let topic = topic.unwrap_or(config.stream.input_topic.clone());
            let shape = stream::publish::RecordShape {
                max_events: batch_events as usize,
                span_us: i64::from(batch_ms) * 1_000,
            };
            run_publish(&config, &input, &topic, shape, timestamps)
        }
        Command::Simulate {
            humans,
            output,
            bootstrap_servers,
            kafka,
            topic,
            rate,
            realtime,
            users,
            macro_share,
            families,
            mixed,
            macro_presses,
            human_presses,
            seed,
        } => {
            let plan = SimulationPlan {
                users: users as usize,
                macro_share,
                families,
                mixed,
                onset_presses: 60..150,
                macro_presses,
                seed,
                start_us: if realtime {
                    metronome::agent::capture::epoch_us(std::time::SystemTime::now())
                } else {
                    1_700_000_000_000_000
                },
            };
            let recordings = load_humans(humans.as_deref(), plan.users)?;
            let humans = match &recordings {
                Some(r) => simulate::Humans::Recorded(r),
                None => simulate::Humans::Parametric { presses: human_presses as usize },
            };
            let simulated = simulate::simulate(&plan, humans).map_err(|e| e.to_string())?;
            match output {
                Some(output) => write_simulation(&plan, &simulated, &output),
                None if bootstrap_servers.is_some() || kafka => {
                    let config = with_bootstrap(config, bootstrap_servers);
                    let topic = topic.unwrap_or(config.stream.input_topic.clone());
                    let pace = if realtime {
                        stream::publish::Pace::Speed(1.0)
                    } else {
                        let events: usize = simulated.iter().map(|u| u.events.len()).sum();
                        let first = simulated.iter().filter_map(|u| u.events.first()).map(|e| e.time_us).min();
                        let last = simulated.iter().filter_map(|u| u.events.last()).map(|e| e.time_us).max();
                        stream::publish::Pace::for_rate(rate, events, last.zip(first).map_or(0, |(l, f)| l - f))
                    };
                    publish_simulation(&config, &topic, &plan, &simulated, pace)
                }
                None => Err("give --output FILE, or --bootstrap-servers HOST:PORT (or --kafka) to publish".to_owned()),
            }
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

fn run_sink(config: Config) -> Result<(), String> {
    let sink = service::postgres_sink(&config)?;
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

fn run_process(config: Config) -> Result<(), String> {
    let runtime = service_runtime()?;
    let summary =
        runtime.block_on(async move { service::run_processor(config, shutdown_on_signal(), None, |_| {}).await })?;
    eprintln!(
        "metronome: processed {} records ({} events): {} alerts, {} dead letters, {} commits, {} aborts",
        summary.records, summary.events, summary.alerts, summary.dead_letters, summary.commits, summary.aborts
    );
    Ok(())
}

/// `addr` when it can be bound now, else the same address with any free port (a second demo,
/// or something else on 8080).
fn free_or_any(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => addr,
        Err(_) => std::net::SocketAddr::new(addr.ip(), 0),
    }
}

/// A share, 0..1.
fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{text}` is not a share between 0 and 1")),
    }
}

/// A float that is finite and not negative (a pace, a rate).
fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{text}` is not a number >= 0")),
    }
}

fn run_agent(config: &Config, topic: &str, source: Source) -> Result<(), String> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_signal = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(service::wait_for_termination());
                tracing::info!("termination requested: stopping capture, sending what is spooled");
                on_signal.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .map_err(|e| format!("cannot watch for signals: {e}"))?;
    let s = agent::run(&config.agent, &config.kafka, topic, source, stop).map_err(|e| e.to_string())?;
    eprintln!(
        "metronome: agent captured {} events in {} records; {} delivered, {} left in the spool, {} refused by a full spool ({} events), {} refused by the broker, {} kernel overflows, {} device losses",
        s.events, s.records, s.delivered, s.left_in_spool, s.refused_records, s.refused_events, s.rejected, s.kernel_dropped, s.device_losses
    );
    Ok(())
}

fn run_publish(
    config: &Config,
    input: &Path,
    topic: &str,
    shape: stream::publish::RecordShape,
    timestamps: stream::publish::Timestamps,
) -> Result<(), String> {
    let producer = stream::publish::producer(&config.kafka).map_err(|e| format!("kafka producer: {e}"))?;
    let reader = KeylogReader::open(input).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let summary =
        stream::publish::publish_keylog(&producer, topic, reader, shape, timestamps).map_err(|e| e.to_string())?;
    eprintln!(
        "metronome: published {} events of {} users as {} records to {topic} in {:.2}s",
        summary.events,
        summary.users,
        summary.records,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The topic `metronome archive` archives: `archive.topic`, else the processor's input topic.
fn archive_topic(config: &Config) -> String {
    Some(config.archive.topic.clone()).filter(|t| !t.is_empty()).unwrap_or_else(|| config.stream.input_topic.clone())
}

fn parse_day(text: &str) -> Result<Day, String> {
    Day::parse(text).map_err(|e| e.to_string())
}

fn run_archive(config: &Config, topic: &str, day: Option<Day>, record: bool) -> Result<(), String> {
    let now_ms = metronome::agent::capture::epoch_us(std::time::SystemTime::now()) / 1000;
    let day = day.unwrap_or_else(|| Day::yesterday(now_ms));
    let runs = if record { Some(PgTarget::parse(&config.postgres.url).map_err(|e| e.to_string())?) } else { None };
    let runtime = service_runtime()?;
    let outcome = runtime
        .block_on(archive::archive_day(&config.archive, &config.kafka, topic, day, now_ms, runs.as_ref()))
        .map_err(|e| format!("archiving {topic} for {day}: {e}"))?;
    let expired: Vec<String> = outcome.expired.iter().map(ToString::to_string).collect();
    eprintln!(
        "metronome: archived {topic} for {day}: {} records in {} partition files ({} read), manifest sha256 {}{}",
        outcome.records_written,
        outcome.manifest.partitions.len(),
        outcome.records_read,
        outcome.manifest_sha256,
        if expired.is_empty() { String::new() } else { format!("; deleted by retention: {}", expired.join(", ")) }
    );
    Ok(())
}

/// What `metronome score` reads.
enum ScoreInput<'a> {
    /// A keylog file.
    Keylog(&'a Path),
    /// An archived day (a backtest).
    Archive { location: &'a str, topic: &'a str, day: Day },
}

fn run_score(config: Config, input: ScoreInput<'_>, skip_bad_rows: bool, alerts_only: bool) -> Result<(), String> {
    let mut model = service::load_model(&config)?;
    let max_events = config.stream.max_events_per_record;
    let mut detector = Detector::new(config.detector).map_err(|e| e.to_string())?;
    let started = Instant::now();
    // Progress every million rows, for people watching a terminal; never into pipes or logs.
    let show_progress = io::stderr().is_terminal();
    let skipped_records = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let records: Box<dyn Iterator<Item = Result<keylog::KeylogRecord, keylog::KeylogError>>> = match input {
        ScoreInput::Keylog(path) => Box::new(KeylogReader::open(path).map_err(|e| e.to_string())?),
        ScoreInput::Archive { location, topic, day } => {
            let archived = archive::backtest::ArchivedDay::open(location, &config.archive.s3, topic, day)
                .map_err(|e| e.to_string())?;
            eprintln!(
                "metronome: backtest of {topic} for {day}: {} records in {} partitions, model {}",
                archived.manifest().records,
                archived.manifest().partitions.len(),
                model.as_ref().map_or_else(|| "none (timing rules alone)".to_owned(), |m| m.version().to_string())
            );
            Box::new(archived.records(max_events, std::rc::Rc::clone(&skipped_records)))
        }
    };
    let reader = records.enumerate().map(move |(i, row)| {
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
    if skipped_records.get() > 0 {
        eprintln!(
            "metronome: {} archived records skipped as the processor would dead-letter them",
            skipped_records.get()
        );
    }
    Ok(())
}

/// The recordings `--humans` names: a keylog, `builtin` (none: the parametric model), or by
/// default `../shared/data/aalto-a-train.csv.gz` when it is there.
fn load_humans(
    humans: Option<&str>,
    users: usize,
) -> Result<Option<Vec<Vec<metronome_core::event::KeyEvent>>>, String> {
    const DEFAULT_HUMANS: &str = "../shared/data/aalto-a-train.csv.gz";
    let path = match humans {
        Some("builtin") => return Ok(None),
        Some(path) => PathBuf::from(path),
        None if Path::new(DEFAULT_HUMANS).is_file() => PathBuf::from(DEFAULT_HUMANS),
        None => {
            eprintln!("metronome: {DEFAULT_HUMANS} not found: simulating humans with the built-in typing model");
            return Ok(None);
        }
    };
    // Each recorded user is replayed at most once per simulated human, so read what is needed.
    let reader = KeylogReader::open(&path).map_err(|e| e.to_string())?;
    let recordings = keylog::group_by_user(reader, |_| true, Some(users.max(1)))
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(_, events)| events)
        .collect();
    Ok(Some(recordings))
}

fn describe(plan: &SimulationPlan, users: &[simulate::SimulatedUser]) -> String {
    let macros = users.iter().filter(|u| matches!(u.truth, simulate::Truth::Macro { .. })).count();
    let families: Vec<String> = plan.families.iter().map(ToString::to_string).collect();
    format!(
        "{} users ({macros} macro users: {}{})",
        users.len(),
        families.join(","),
        if plan.mixed { ", mixed sessions" } else { "" }
    )
}

fn write_simulation(plan: &SimulationPlan, users: &[simulate::SimulatedUser], output: &Path) -> Result<(), String> {
    let sink: Box<dyn Write> = if output.as_os_str() == "-" {
        Box::new(io::stdout().lock())
    } else {
        Box::new(File::create(output).map_err(|e| format!("cannot create {}: {e}", output.display()))?)
    };
    let write_err = |e: io::Error| format!("writing {} failed: {e}", output.display());
    let mut writer = KeylogWriter::new(BufWriter::new(sink)).map_err(write_err)?;
    let mut events = 0usize;
    for user in users {
        for e in &user.events {
            writer.write(&user.user_id, "sim", e).map_err(write_err)?;
        }
        events += user.events.len();
    }
    writer.finish().map_err(write_err)?;
    eprintln!("metronome: wrote {events} events of {}", describe(plan, users));
    Ok(())
}

fn publish_simulation(
    config: &Config,
    topic: &str,
    plan: &SimulationPlan,
    users: &[simulate::SimulatedUser],
    pace: stream::publish::Pace,
) -> Result<(), String> {
    let producer = stream::publish::producer(&config.kafka).map_err(|e| format!("kafka producer: {e}"))?;
    let total: usize = users.iter().map(|u| u.events.len()).sum();
    // A bar for people at a terminal; nothing in pipes and logs.
    let bar = if io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let summary = stream::publish::publish_simulation(
        &producer,
        topic,
        users,
        stream::publish::RecordShape::agent(50),
        pace,
        &stop,
        |sent| bar.set_position(sent),
    )
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "metronome: published {} events as {} records to {topic} in {secs:.2}s ({:.0} events/s): {}",
        summary.events,
        summary.records,
        summary.events as f64 / secs.max(1e-9),
        describe(plan, users)
    );
    Ok(())
}

/// `--families`: the macro families by name, listed in `--help`.
fn macro_family_parser() -> impl clap::builder::TypedValueParser<Value = MacroFamily> {
    let names = MacroFamily::ALL.map(MacroFamily::name);
    clap::builder::PossibleValuesParser::new(names).try_map(|name: String| name.parse::<MacroFamily>())
}
