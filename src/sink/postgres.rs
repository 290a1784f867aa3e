//! [`PgAlertStore`]: the alert store in PostgreSQL. It owns the connection: connects and
//! migrates on first use, drops a connection that failed, and connects again on the next call.

use metronome_io::postgres::{migrate, ConnectError, PgTarget};
use tokio_postgres::Client;

use super::seams::{AlertStore, Offsets, StoreFailure};
use super::store::{self, SinkRecord, WriteSummary};
use crate::metrics::events::{InternalEvent, SinkConnected};

/// The `alerts`, `sink_dead_letters` and `sink_offsets` tables of one database.
pub struct PgAlertStore {
    target: PgTarget,
    client: Option<Client>,
}

impl PgAlertStore {
    /// A store in the database `target` names; nothing is connected until first used.
    pub fn new(target: PgTarget) -> Self {
        Self { target, client: None }
    }

    /// The database it writes to.
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The connection, made (and the schema migrated) if there is none.
    async fn client(&mut self) -> Result<&mut Client, StoreFailure> {
        if self.client.is_none() {
            let mut client = self.target.connect().await.map_err(connect_failure)?;
            migrate(&mut client).await.map_err(connect_failure)?;
            SinkConnected.emit();
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected just above"))
    }

    /// Forgets a connection that failed (a later call connects again) and says to retry.
    fn lost(&mut self, stage: &'static str, error: tokio_postgres::Error) -> StoreFailure {
        self.client = None;
        StoreFailure::Retry { stage, error: error.to_string() }
    }
}

/// A bad URL or unusable TLS roots are not fixed by waiting; the rest may be.
fn connect_failure(error: ConnectError) -> StoreFailure {
    match error {
        ConnectError::Tls(_) | ConnectError::Url(_) => StoreFailure::Fatal(Box::new(error)),
        ConnectError::Migration(_) => StoreFailure::Retry { stage: "migrate", error: error.to_string() },
        ConnectError::Postgres(_) => StoreFailure::Retry { stage: "connect", error: error.to_string() },
    }
}

impl AlertStore for PgAlertStore {
    async fn load_offsets(&mut self, consumer: &str, topic: &str) -> Result<Offsets, StoreFailure> {
        let client = self.client().await?;
        match store::load_offsets(client, consumer, topic).await {
            Ok(offsets) => Ok(offsets),
            Err(e) => Err(self.lost("connect", e)),
        }
    }

    async fn write_batch(
        &mut self,
        consumer: &str,
        topic: &str,
        records: &[SinkRecord],
    ) -> Result<(WriteSummary, Offsets), StoreFailure> {
        let client = self.client().await?;
        match store::write_batch(client, consumer, topic, records).await {
            Ok(written) => Ok(written),
            Err(e) => Err(self.lost("write", e)),
        }
    }
}
