//! Metronome's edges to the outside world: how a Kafka client, a PostgreSQL connection and an
//! object store are made. The services build every client here, so the settings a guarantee
//! rests on live in one place; nothing here knows a key event, a detection or a state format.
//!
//! ```text
//!  [kafka] properties ──> kafka::ClientBuilder ──> processor, sink, agent, archive, probes
//!  postgres.url ────────> postgres::PgTarget ──> connect (sslmode as libpq) + migrate
//!                                                 (migrations/: alerts, archive_runs, fleet)
//!  archive.url ─────────> objects::Objects ───> local directory or S3-compatible bucket
//! ```
//!
//! # Layout
//! - [`kafka`]: the client builder (the operator's properties, then the role's settings).
//! - [`postgres`]: URL parsing with libpq's `sslmode`, TLS (rustls), the schema migrations
//!   (refinery, `migrations/`).
//! - [`objects`]: the object store, writes published whole.

pub mod kafka;
pub mod objects;
pub mod postgres;
