//! The `archive_runs` table: one row per archived (topic, day), the run's consistency record.

use tokio_postgres::Client;

use super::format::{Day, Manifest};
use metronome_io::postgres::{migrate, ConnectError, PgTarget};

/// The run log in PostgreSQL.
pub struct RunLog {
    client: Client,
}

impl RunLog {
    /// Connects and brings the schema up to date.
    pub async fn connect(target: &PgTarget) -> Result<Self, ConnectError> {
        let mut client = target.connect().await?;
        migrate(&mut client).await?;
        Ok(Self { client })
    }

    /// Marks the day's run started: a new row, or the old one reset with one attempt more.
    pub async fn started(&self, topic: &str, day: Day, location: &str) -> Result<(), ConnectError> {
        self.client
            .execute(
                "INSERT INTO archive_runs (topic, day, status, attempts, location, started_at)
                 VALUES ($1, $2::text::date, 'running', 1, $3, now())
                 ON CONFLICT (topic, day) DO UPDATE SET
                   status = 'running', attempts = archive_runs.attempts + 1, location = EXCLUDED.location,
                   partitions = NULL, records_read = NULL, records_written = NULL, checksums = NULL,
                   manifest_sha256 = NULL, error = NULL, started_at = now(), finished_at = NULL",
                &[&topic, &day.to_string(), &location],
            )
            .await?;
        Ok(())
    }

    /// Records a complete run.
    pub async fn succeeded(
        &self,
        manifest: &Manifest,
        records_read: u64,
        records_written: u64,
        manifest_sha256: &str,
    ) -> Result<(), ConnectError> {
        let checksums: serde_json::Map<String, serde_json::Value> =
            manifest.partitions.iter().map(|p| (p.partition.to_string(), p.file.sha256.clone().into())).collect();
        self.client
            .execute(
                "UPDATE archive_runs SET status = 'succeeded', partitions = $3, records_read = $4,
                   records_written = $5, checksums = $6, manifest_sha256 = $7, finished_at = now()
                 WHERE topic = $1 AND day = $2::text::date",
                &[
                    &manifest.topic,
                    &manifest.day,
                    &(manifest.partitions.len() as i32),
                    &(records_read as i64),
                    &(records_written as i64),
                    &serde_json::Value::Object(checksums),
                    &manifest_sha256,
                ],
            )
            .await?;
        Ok(())
    }

    /// Records a failed run and why.
    pub async fn failed(&self, topic: &str, day: Day, error: &str) -> Result<(), ConnectError> {
        self.client
            .execute(
                "UPDATE archive_runs SET status = 'failed', error = $3, finished_at = now()
                 WHERE topic = $1 AND day = $2::text::date",
                &[&topic, &day.to_string(), &error],
            )
            .await?;
        Ok(())
    }

    /// Marks days whose archive retention deleted.
    pub async fn expired(&self, topic: &str, days: &[Day]) -> Result<(), ConnectError> {
        for day in days {
            self.client
                .execute(
                    "UPDATE archive_runs SET status = 'expired' WHERE topic = $1 AND day = $2::text::date",
                    &[&topic, &day.to_string()],
                )
                .await?;
        }
        Ok(())
    }
}
