//! The typed events that feed the metrics: each names one occurrence and is emitted in one
//! place. None carries a user id, a key or a timing of anyone's typing.

use super::metrics;

/// Something that happened, recorded in metrics (and logged where it deserves a line).
pub trait InternalEvent {
    /// Records it.
    fn emit(self);
}

/// One scored window's scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowScores {
    /// The combined score the policy acted on.
    pub combined: f64,
    /// The timing rules' score.
    pub timing: f64,
    /// The robust interval-histogram score.
    pub histogram: f64,
    /// The sequence model's score, if a model ran.
    pub lstm: Option<f64>,
}

/// One committed alert, as metrics see it.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertCommitted {
    /// Scorers behind it (`histogram`, `lstm`).
    pub scorers: Vec<&'static str>,
    /// Seconds from the window's last event time to the commit.
    pub latency_s: f64,
}

/// A task batch committed: its records, events, windows, alerts and dead letters count now.
#[derive(Debug)]
pub struct BatchCommitted<'a> {
    /// Input records processed (dead letters included).
    pub records: u64,
    /// Key events fed to the detector.
    pub events: u64,
    /// Dead-lettered records' error classes.
    pub dead_letters: &'a [&'static str],
    /// Records whose event times were shifted to their append time.
    pub rebased_records: u64,
    /// Events dropped as out of bounds.
    pub out_of_bounds_events: u64,
    /// Events dropped as copies of delivered ones (by session and sequence number).
    pub duplicate_events: u64,
    /// Agents' key-dependence sums refused as no real typing's.
    pub key_sums_refused: u64,
    /// Sequence numbers skipped when a later one arrived.
    pub seq_gap_events: u64,
    /// Events that arrived after a later-numbered one, filling a gap.
    pub late_fill_events: u64,
    /// Events dropped past their user's budget.
    pub rate_limited_events: u64,
    /// Users closed early to keep a task's open users within its cap.
    pub evicted_users: u64,
    /// Scores of the windows scored.
    pub windows: &'a [WindowScores],
    /// Alerts committed.
    pub alerts: &'a [AlertCommitted],
}

/// A fleet stage's batch committed: its fleet alerts and set-aside records count now.
#[derive(Debug)]
pub struct FleetStageCommitted<'a> {
    /// Fleet alerts committed.
    pub alerts: u64,
    /// Set-aside records' error classes.
    pub dead_letters: &'a [&'static str],
}

impl InternalEvent for FleetStageCommitted<'_> {
    fn emit(self) {
        let m = metrics();
        m.transactions.with_label_values(&["committed"]).inc();
        if self.alerts > 0 {
            m.alerts.with_label_values(&["fleet"]).inc_by(self.alerts);
        }
        for class in self.dead_letters {
            m.dead_letters.with_label_values(&[class]).inc();
        }
    }
}

impl InternalEvent for BatchCommitted<'_> {
    fn emit(self) {
        let m = metrics();
        m.transactions.with_label_values(&["committed"]).inc();
        m.events_consumed.inc_by(self.events);
        let dead = self.dead_letters.len() as u64;
        m.records_consumed.with_label_values(&["processed"]).inc_by(self.records.saturating_sub(dead));
        if dead > 0 {
            m.records_consumed.with_label_values(&["dead_letter"]).inc_by(dead);
        }
        for class in self.dead_letters {
            m.dead_letters.with_label_values(&[class]).inc();
        }
        m.records_rebased.inc_by(self.rebased_records);
        m.events_out_of_bounds.inc_by(self.out_of_bounds_events);
        m.events_duplicate.inc_by(self.duplicate_events);
        m.key_sums_refused.inc_by(self.key_sums_refused);
        m.sequence_gaps.inc_by(self.seq_gap_events);
        m.sequence_fills.inc_by(self.late_fill_events);
        m.events_rate_limited.inc_by(self.rate_limited_events);
        m.users_evicted.inc_by(self.evicted_users);
        let by_scorer = |name: &str| m.window_scores.with_label_values(&[name]);
        let (combined, timing, histogram, lstm) =
            (by_scorer("combined"), by_scorer("timing"), by_scorer("histogram"), by_scorer("lstm"));
        for w in self.windows {
            combined.observe(w.combined);
            timing.observe(w.timing);
            histogram.observe(w.histogram);
            if let Some(s) = w.lstm {
                lstm.observe(s);
            }
        }
        for a in self.alerts {
            for scorer in &a.scorers {
                m.alerts.with_label_values(&[scorer]).inc();
            }
            m.end_to_end_latency.observe(a.latency_s.max(0.0));
        }
    }
}

/// A task transaction was aborted; its records will be processed again.
#[derive(Debug)]
pub struct TransactionAborted<'a> {
    /// The task's input partition.
    pub partition: i32,
    /// The client's reason (broker error text, no record content).
    pub reason: &'a str,
}

impl InternalEvent for TransactionAborted<'_> {
    fn emit(self) {
        metrics().transactions.with_label_values(&["aborted"]).inc();
        tracing::warn!(
            partition = self.partition,
            reason = self.reason,
            "transaction aborted; rewinding the partition"
        );
    }
}

/// A task's phase: restoring (with progress) or running; `None` when the task closed.
#[derive(Debug)]
pub struct TaskPhaseChanged {
    /// The task's input partition.
    pub partition: i32,
    /// Replayed share of the changelog (1.0 when running); `None`: the task closed.
    pub restored_ratio: Option<f64>,
    /// Tasks restoring and running in this instance now.
    pub restoring: usize,
    /// See `restoring`.
    pub running: usize,
}

impl InternalEvent for TaskPhaseChanged {
    fn emit(self) {
        let m = metrics();
        let partition = self.partition.to_string();
        match self.restored_ratio {
            Some(r) => m.restore_progress.with_label_values(&[&partition]).set(r.clamp(0.0, 1.0)),
            None => {
                let _ = m.restore_progress.remove_label_values(&[&partition]);
                let _ = m.consumer_lag.remove_label_values(&[&partition]);
            }
        }
        m.tasks.with_label_values(&["restoring"]).set(self.restoring as i64);
        m.tasks.with_label_values(&["running"]).set(self.running as i64);
    }
}

/// Changelog records replayed into a task store.
#[derive(Debug)]
pub struct StateRestored {
    /// Records replayed.
    pub records: u64,
}

impl InternalEvent for StateRestored {
    fn emit(self) {
        metrics().restore_records.inc_by(self.records);
    }
}

/// The input consumer's lag on a partition it owns, from librdkafka's statistics.
#[derive(Debug)]
pub struct ConsumerLagObserved {
    /// The input partition.
    pub partition: i32,
    /// Records behind the end.
    pub lag: i64,
}

impl InternalEvent for ConsumerLagObserved {
    fn emit(self) {
        metrics().consumer_lag.with_label_values(&[&self.partition.to_string()]).set(self.lag.max(0));
    }
}

/// The open windows of this instance's tasks, after a processing round.
#[derive(Debug)]
pub struct OpenWindowsCounted {
    /// Users with an open window, summed over the tasks.
    pub users: usize,
}

impl InternalEvent for OpenWindowsCounted {
    fn emit(self) {
        metrics().open_windows.set(self.users as i64);
    }
}

/// RocksDB sizes summed over this instance's task stores.
#[derive(Debug, Default)]
pub struct RocksDbSizes {
    /// Memtables.
    pub memtables: u64,
    /// Index and filter blocks held by open table readers.
    pub table_readers: u64,
    /// SST files on disk.
    pub sst_files: u64,
    /// Estimated live data.
    pub live_data: u64,
    /// The shared block cache.
    pub block_cache: u64,
}

impl InternalEvent for RocksDbSizes {
    fn emit(self) {
        let m = metrics();
        for (kind, v) in [
            ("memtables", self.memtables),
            ("table_readers", self.table_readers),
            ("sst_files", self.sst_files),
            ("live_data", self.live_data),
        ] {
            m.rocksdb_bytes.with_label_values(&[kind]).set(v as i64);
        }
        m.rocksdb_block_cache_bytes.set(self.block_cache as i64);
    }
}

/// The PostgreSQL sink committed one transaction.
#[derive(Debug)]
pub struct SinkBatchWritten {
    /// Alerts inserted.
    pub written: u64,
    /// Alerts PostgreSQL already held.
    pub duplicates: u64,
    /// Undecodable records kept as dead letters.
    pub dead_letters: u64,
    /// How long the transaction took.
    pub seconds: f64,
}

impl InternalEvent for SinkBatchWritten {
    fn emit(self) {
        let m = metrics();
        m.sink_alerts_written.inc_by(self.written);
        m.sink_duplicates.inc_by(self.duplicates);
        m.sink_dead_letters.inc_by(self.dead_letters);
        m.sink_write_latency.observe(self.seconds);
        if self.dead_letters > 0 {
            tracing::warn!(records = self.dead_letters, "undecodable alert records kept in sink_dead_letters");
        }
    }
}

/// A PostgreSQL sink attempt failed; it waits `retry_in_ms` and tries again.
#[derive(Debug)]
pub struct SinkAttemptFailed<'a> {
    /// `connect`, `migrate` or `write`.
    pub stage: &'static str,
    /// The error, as text without secrets (the URL's password never reaches it).
    pub error: &'a str,
    /// The backoff before the next attempt.
    pub retry_in_ms: u64,
}

impl InternalEvent for SinkAttemptFailed<'_> {
    fn emit(self) {
        let m = metrics();
        m.sink_retries.with_label_values(&[self.stage]).inc();
        m.sink_connected.set(0);
        tracing::warn!(
            stage = self.stage,
            error = self.error,
            retry_in_ms = self.retry_in_ms,
            "postgres sink: will retry"
        );
    }
}

/// The PostgreSQL sink (re)connected and its schema is current.
#[derive(Debug)]
pub struct SinkConnected;

impl InternalEvent for SinkConnected {
    fn emit(self) {
        metrics().sink_connected.set(1);
        tracing::info!("postgres sink: connected, schema current");
    }
}

/// The sink's lag on an alert-topic partition: records the topic has that PostgreSQL lacks.
#[derive(Debug)]
pub struct SinkLagObserved {
    /// The alert-topic partition.
    pub partition: i32,
    /// Records behind; `None`: the partition is no longer this sink's.
    pub lag: Option<i64>,
}

impl InternalEvent for SinkLagObserved {
    fn emit(self) {
        let g = &metrics().sink_lag;
        let label = self.partition.to_string();
        match self.lag {
            Some(lag) => g.with_label_values(&[&label]).set(lag.max(0)),
            None => {
                let _ = g.remove_label_values(&[&label]);
            }
        }
    }
}

/// An HTTP request was answered.
#[derive(Debug)]
pub struct HttpRequestServed {
    /// The route's name (a fixed set), never the path with its parameters.
    pub route: &'static str,
    /// The status code.
    pub status: u16,
}

impl InternalEvent for HttpRequestServed {
    fn emit(self) {
        let class = match self.status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        metrics().http_requests.with_label_values(&[self.route, class]).inc();
    }
}

/// An HTTP connection was accepted; it counts as open until the returned guard drops.
#[derive(Debug)]
pub struct HttpConnectionOpened;

impl HttpConnectionOpened {
    /// Counts the connection as open while the guard lives.
    pub fn emit_guard() -> HttpConnectionOpen {
        metrics().http_connections.inc();
        HttpConnectionOpen(())
    }
}

/// An open HTTP connection: closed when dropped.
#[derive(Debug)]
pub struct HttpConnectionOpen(());

impl Drop for HttpConnectionOpen {
    fn drop(&mut self) {
        metrics().http_connections.dec();
    }
}

/// A nightly archive run ended.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveRunFinished {
    /// Whether it completed (manifest written).
    pub succeeded: bool,
    /// Records archived (0 when it failed).
    pub records: u64,
    /// How long it ran.
    pub seconds: f64,
}

impl InternalEvent for ArchiveRunFinished {
    fn emit(self) {
        let m = metrics();
        m.archive_runs.with_label_values(&[if self.succeeded { "succeeded" } else { "failed" }]).inc();
        m.archive_records.inc_by(self.records);
        m.archive_seconds.observe(self.seconds);
    }
}

/// A retention pass over one task store ended.
#[derive(Debug, Clone, Copy)]
pub struct StatePruned {
    /// Whether it completed.
    pub succeeded: bool,
    /// User states deleted.
    pub users: u64,
    /// How long it took.
    pub seconds: f64,
    /// When it ended, Unix seconds.
    pub at_unix_s: i64,
}

impl InternalEvent for StatePruned {
    fn emit(self) {
        let m = metrics();
        m.prune_runs.with_label_values(&[if self.succeeded { "succeeded" } else { "failed" }]).inc();
        m.pruned_users.inc_by(self.users);
        m.prune_seconds.observe(self.seconds);
        if self.succeeded {
            m.prune_last_success.set(self.at_unix_s);
        }
    }
}
