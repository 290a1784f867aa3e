//! `metronome-test-broker`: the Kafka-compatible broker Metronome's integration tests and
//! benchmarks run against.
//!
//! It is tansu 0.6.0 (storage engines, group coordinator, wire protocol, all from tansu's crates)
//! with the pieces of Kafka transactions that tansu's own broker binary does not provide, so
//! that exactly-once processing can be tested end to end on a machine that cannot fetch Apache
//! Kafka:
//!
//! - **EndTxn** is routed to the storage's `txn_end` (tansu's storage implements it, writes the
//!   commit or abort markers and applies the transaction's offset commits, but tansu's broker
//!   never routes the request, so clients are told transactions are unsupported).
//! - **Fetch** reports aborted transactions to `read_committed` consumers (tansu always answers
//!   an empty list, so records of aborted transactions were delivered), returns the batch that
//!   contains the fetch offset when a consumer resumes in the middle of a batch (tansu skipped
//!   to the next batch, losing the rest of that one), and answers as soon as data is there
//!   instead of always waiting out half the fetch wait.
//! - **ListOffsets** answers latest with the high watermark, or the last stable offset under
//!   `read_committed`, and looks offsets up by record timestamp.
//! - **The group coordinator** is tansu-broker's with `patches/` applied (by `scripts/setup`):
//!   a rebalance round never waits for a leader that has left the group.
//!
//! Layout:
//! - `main.rs`: command line, storage and coordinator set-up, accept loop, shutdown on signals.
//! - `routes.rs`: the request route table (tansu's, with Fetch and ListOffsets replaced and
//!   EndTxn added).
//! - `end_txn.rs`: the EndTxn service.
//! - `fetch.rs`: the transaction-aware Fetch service and its pure scan of record batches.
//! - `list_offsets.rs`: the ListOffsets service.

mod end_txn;
mod fetch;
mod list_offsets;
mod routes;

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;
use rama::{Context, Service as _};
use tansu_broker::coordinator::group::administrator::Controller;
use tansu_storage::{BrokerRegistrationRequest, Storage as _, StorageContainer};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tracing::debug;
use tracing_subscriber::EnvFilter;
use url::Url;

/// Command line; the flags are the ones `tansu broker` takes for the same settings.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on, as `tcp://HOST:PORT` (port 0 picks a free one).
    #[arg(long, default_value = "tcp://127.0.0.1:9092")]
    listener_url: Url,

    /// Address clients are told to connect to (default: the listener's bound address).
    #[arg(long)]
    advertised_listener_url: Option<Url>,

    /// Storage engine URL; `memory://tansu/` keeps everything in memory.
    #[arg(long, default_value = "memory://tansu/")]
    storage_engine: Url,

    /// Cluster id reported in metadata.
    #[arg(long, default_value = "metronome-test")]
    cluster_id: String,

    /// This broker's node id.
    #[arg(long, default_value_t = 111)]
    node_id: i32,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error")))
        .with_writer(std::io::stderr)
        .init();

    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("metronome-test-broker: {error}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run(args: Args) -> Result<(), BoxError> {
    let bind = socket_addr(&args.listener_url)?;
    let listener = TcpListener::bind(bind).await.map_err(|e| format!("cannot listen on {bind}: {e}"))?;
    let local = listener.local_addr()?;
    let advertised = match args.advertised_listener_url {
        Some(url) => url,
        None => Url::parse(&format!("tcp://{local}"))?,
    };

    let storage = StorageContainer::builder()
        .cluster_id(args.cluster_id.clone())
        .node_id(args.node_id)
        .advertised_listener(advertised.clone())
        .storage(args.storage_engine)
        .build()
        .await?;
    storage
        .register_broker(BrokerRegistrationRequest {
            broker_id: args.node_id,
            cluster_id: args.cluster_id.clone(),
            incarnation_id: uuid::Uuid::now_v7(),
            rack: None,
        })
        .await?;
    let coordinator = Controller::with_storage(storage.clone())?;

    // Harnesses wait for this line before connecting.
    println!("ready: listening on {local}, advertised as {advertised}");

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        debug!(%error, "accept failed");
                        continue;
                    }
                };
                stream.set_nodelay(true)?;
                let service = routes::connection_service(
                    &args.cluster_id,
                    coordinator.clone(),
                    storage.clone(),
                )?;
                tokio::spawn(async move {
                    if let Err(error) = service.serve(Context::default(), stream).await {
                        debug!(%peer, ?error, "connection ended");
                    }
                });
            }
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

fn socket_addr(url: &Url) -> Result<SocketAddr, BoxError> {
    let host = url.host_str().ok_or_else(|| format!("listener URL {url} has no host"))?;
    let port = url.port().unwrap_or(9092);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    format!("{host}:{port}").parse::<SocketAddr>().or_else(|_| {
        if host == "localhost" {
            Ok(SocketAddr::from(([127, 0, 0, 1], port)))
        } else {
            Err(format!("listener URL {url}: host must be an IP address or localhost").into())
        }
    })
}
