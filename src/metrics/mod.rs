//! Prometheus metrics: one registry for the process, fed only by typed events.
//!
//! Every occurrence worth counting is a struct in [`events`] with an `emit` that updates its
//! metrics (and logs, where the occurrence deserves a line) in one place, so a metric cannot be
//! updated two ways. Labels are bounded: partitions, scorers, error classes, outcomes; never a
//! user id, key or timing.
//!
//! # Layout
//! - [`Metrics`]: the registry and every metric in it, created once ([`metrics`]).
//! - [`events`]: the typed events, the only writers.
//! - [`render`]: the text exposition `/metrics` serves.

pub mod events;

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, linear_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub(crate) events_consumed: IntCounter,
    pub(crate) records_consumed: IntCounterVec,
    pub(crate) consumer_lag: IntGaugeVec,
    pub(crate) end_to_end_latency: Histogram,
    pub(crate) window_scores: HistogramVec,
    pub(crate) alerts: IntCounterVec,
    pub(crate) dead_letters: IntCounterVec,
    pub(crate) records_rebased: IntCounter,
    pub(crate) events_out_of_bounds: IntCounter,
    pub(crate) events_duplicate: IntCounter,
    pub(crate) key_sums_refused: IntCounter,
    pub(crate) sequence_gaps: IntCounter,
    pub(crate) sequence_fills: IntCounter,
    pub(crate) events_rate_limited: IntCounter,
    pub(crate) users_evicted: IntCounter,
    pub(crate) open_windows: IntGauge,
    pub(crate) restore_records: IntCounter,
    pub(crate) restore_progress: GaugeVec,
    pub(crate) tasks: IntGaugeVec,
    pub(crate) rocksdb_bytes: IntGaugeVec,
    pub(crate) rocksdb_block_cache_bytes: IntGauge,
    pub(crate) transactions: IntCounterVec,
    pub(crate) sink_alerts_written: IntCounter,
    pub(crate) sink_duplicates: IntCounter,
    pub(crate) sink_dead_letters: IntCounter,
    pub(crate) sink_retries: IntCounterVec,
    pub(crate) sink_lag: IntGaugeVec,
    pub(crate) sink_connected: IntGauge,
    pub(crate) sink_write_latency: Histogram,
    pub(crate) http_requests: IntCounterVec,
    pub(crate) http_connections: IntGauge,
    pub(crate) archive_runs: IntCounterVec,
    pub(crate) archive_records: IntCounter,
    pub(crate) archive_seconds: Histogram,
    pub(crate) prune_runs: IntCounterVec,
    pub(crate) pruned_users: IntCounter,
    pub(crate) prune_seconds: Histogram,
    pub(crate) prune_last_success: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

/// Every scorer's series exists from the start at 0, so a dashboard's `rate()` and an
/// alerting rule see the first alert as an increase rather than a series appearing.
fn alerts_by_scorer(registry: &Registry) -> IntCounterVec {
    let c = counter_vec(
        registry,
        "metronome_alerts_total",
        "Alerts committed, by scorer behind them (histogram, lstm, fleet).",
        &["scorer"],
    );
    for scorer in ["histogram", "lstm", "fleet"] {
        c.with_label_values(&[scorer]);
    }
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
    registry.register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
    registry.register(Box::new(h.clone())).expect("metric registered once");
    h
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let restore_progress = GaugeVec::new(
            Opts::new(
                "metronome_state_restore_progress_ratio",
                "Share of a task's changelog replayed, 0..1, by input partition (1 once running).",
            ),
            &["partition"],
        )
        .expect("valid metric");
        r.register(Box::new(restore_progress.clone())).expect("metric registered once");
        let block_cache = int_gauge(
            &r,
            "metronome_rocksdb_block_cache_bytes",
            "Bytes in the block cache all task stores share (memtables are charged to it).",
        );
        let sink_connected = int_gauge(
            &r,
            "metronome_sink_postgres_connected",
            "1 while the PostgreSQL sink holds a working connection, else 0.",
        );
        let http_connections = int_gauge(
            &r,
            "metronome_http_connections",
            "HTTP connections open now (at most http.max_connections; the rest wait in the listen backlog).",
        );
        Self {
            events_consumed: counter(&r, "metronome_events_consumed_total", "Key events fed to the detector (committed batches)."),
            records_consumed: counter_vec(
                &r,
                "metronome_records_consumed_total",
                "Input records consumed in committed batches, by outcome (processed, dead_letter).",
                &["outcome"],
            ),
            consumer_lag: gauge_vec(
                &r,
                "metronome_consumer_lag_records",
                "Input records behind the partition's end, by partition this instance owns.",
                &["partition"],
            ),
            end_to_end_latency: histogram(
                &r,
                "metronome_end_to_end_latency_seconds",
                "From the event time that completed an alerting window to the alert's commit.",
                exponential_buckets(0.01, 2.0, 14).expect("valid buckets"),
            ),
            window_scores: histogram_vec(
                &r,
                "metronome_window_score",
                "Scores of scored windows, 0..1, by scorer (combined, timing, histogram, lstm).",
                &["scorer"],
                linear_buckets(0.1, 0.1, 10).expect("valid buckets"),
            ),
            alerts: alerts_by_scorer(&r),
            dead_letters: counter_vec(
                &r,
                "metronome_dead_letters_total",
                "Input records sent to the dead-letter topic, by error class.",
                &["class"],
            ),
            records_rebased: counter(
                &r,
                "metronome_records_rebased_total",
                "Input records whose event times were shifted to the broker's append time (a clock too far off).",
            ),
            events_out_of_bounds: counter(
                &r,
                "metronome_events_out_of_bounds_total",
                "Key events dropped as too far from their record's append time (stream.max_event_lead_s, max_event_lag_s).",
            ),
            events_duplicate: counter(
                &r,
                "metronome_events_duplicate_total",
                "Key events dropped because their session had delivered their sequence number before (a resend or replay).",
            ),
            key_sums_refused: counter(
                &r,
                "metronome_key_sums_refused_total",
                "Key-dependence sums an agent reported that no real typing gives (not finite, negative spread, more values than presses); the test then groups the labels itself.",
            ),
            sequence_gaps: counter(
                &r,
                "metronome_sequence_gap_events_total",
                "Sequence numbers a session skipped when a later one arrived: events missing between agent and processor, unless filled later.",
            ),
            sequence_fills: counter(
                &r,
                "metronome_sequence_late_events_total",
                "Key events that arrived after a later-numbered one of their session, filling a gap counted before.",
            ),
            events_rate_limited: counter(
                &r,
                "metronome_events_rate_limited_total",
                "Key events dropped because their user sent more than stream.max_user_events_per_s (plus the burst) in event time.",
            ),
            users_evicted: counter(
                &r,
                "metronome_users_evicted_total",
                "Users whose open window was closed early because their task held stream.max_open_users_per_task open windows.",
            ),
            open_windows: int_gauge(
                &r,
                "metronome_open_windows",
                "Users with an open window in this instance's tasks (each task holds at most stream.max_open_users_per_task).",
            ),
            restore_records: counter(&r, "metronome_state_restore_records_total", "Changelog records replayed into task stores."),
            restore_progress,
            tasks: gauge_vec(&r, "metronome_tasks", "Tasks this instance holds, by phase (restoring, running).", &["phase"]),
            rocksdb_bytes: gauge_vec(
                &r,
                "metronome_rocksdb_bytes",
                "Task store sizes, summed over this instance's stores, by kind (memtables, table_readers, sst_files, live_data).",
                &["kind"],
            ),
            rocksdb_block_cache_bytes: block_cache,
            transactions: counter_vec(
                &r,
                "metronome_transactions_total",
                "Task transactions, by outcome (committed, aborted).",
                &["outcome"],
            ),
            sink_alerts_written: counter(&r, "metronome_sink_alerts_written_total", "Alerts the PostgreSQL sink committed."),
            sink_duplicates: counter(
                &r,
                "metronome_sink_duplicate_alerts_total",
                "Alert records whose alert id PostgreSQL already held (an at-least-once replay), not written again.",
            ),
            sink_dead_letters: counter(
                &r,
                "metronome_sink_dead_letters_total",
                "Alert records that did not decode, kept in PostgreSQL's sink_dead_letters table.",
            ),
            sink_retries: counter_vec(
                &r,
                "metronome_sink_retries_total",
                "PostgreSQL sink attempts that failed and will be retried, by stage (connect, migrate, write).",
                &["stage"],
            ),
            sink_lag: gauge_vec(
                &r,
                "metronome_sink_lag_records",
                "Alert records not yet in PostgreSQL, by alert-topic partition this sink owns.",
                &["partition"],
            ),
            sink_connected,
            sink_write_latency: histogram(
                &r,
                "metronome_sink_write_seconds",
                "Duration of one PostgreSQL sink transaction (alerts plus offsets).",
                exponential_buckets(0.001, 2.0, 14).expect("valid buckets"),
            ),
            http_requests: counter_vec(
                &r,
                "metronome_http_requests_total",
                "HTTP requests served, by route and status class.",
                &["route", "status"],
            ),
            http_connections,
            archive_runs: counter_vec(
                &r,
                "metronome_archive_runs_total",
                "Nightly archive runs of this process, by outcome (succeeded, failed).",
                &["outcome"],
            ),
            archive_records: counter(&r, "metronome_archive_records_total", "Records written to archive files by succeeded runs."),
            archive_seconds: histogram(
                &r,
                "metronome_archive_run_seconds",
                "Duration of one archive run (read, stage, upload, manifest, retention).",
                exponential_buckets(1.0, 2.0, 16).expect("valid buckets"),
            ),
            prune_runs: counter_vec(
                &r,
                "metronome_state_prune_runs_total",
                "Retention passes over this instance's task stores, by outcome (succeeded, failed).",
                &["outcome"],
            ),
            pruned_users: counter(
                &r,
                "metronome_state_pruned_users_total",
                "Per-user states deleted by retention (their newest event older than stream.state_retention_days).",
            ),
            prune_seconds: histogram(
                &r,
                "metronome_state_prune_seconds",
                "Duration of one retention pass over a task store (scan, changelog tombstones, delete, compaction).",
                exponential_buckets(0.001, 2.0, 18).expect("valid buckets"),
            ),
            prune_last_success: int_gauge(
                &r,
                "metronome_state_prune_last_success_timestamp_seconds",
                "When the last retention pass of this instance succeeded (Unix seconds; 0: never).",
            ),
            registry: r,
        }
    }

    /// The registry, for exposition.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Every metric in Prometheus' text format.
pub fn render() -> String {
    let families = metrics().registry().gather();
    let mut out = Vec::new();
    // Encoding into memory fails only for invalid families, which registration rules out.
    let _ = TextEncoder::new().encode(&families, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_follow_the_conventions() {
        let text = render();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("metronome_"), "{name}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{name} is a {kind}");
        }
    }

    /// Every metric the Grafana dashboard queries exists, so a rename cannot blank a panel.
    #[test]
    fn the_dashboard_queries_only_metrics_that_exist() {
        use events::*;
        BatchCommitted {
            records: 1,
            events: 1,
            dead_letters: &["undecodable"],
            rebased_records: 1,
            out_of_bounds_events: 1,
            duplicate_events: 1,
            key_sums_refused: 1,
            seq_gap_events: 1,
            late_fill_events: 1,
            rate_limited_events: 1,
            evicted_users: 1,
            windows: &[WindowScores { combined: 0.1, timing: 0.1, histogram: 0.1, lstm: Some(0.1) }],
            alerts: &[AlertCommitted { scorers: vec!["histogram"], latency_s: 1.0 }],
        }
        .emit();
        TransactionAborted { partition: 0, reason: "test" }.emit();
        TaskPhaseChanged { partition: 0, restored_ratio: Some(1.0), restoring: 0, running: 1 }.emit();
        StateRestored { records: 1 }.emit();
        ConsumerLagObserved { partition: 0, lag: 1 }.emit();
        RocksDbSizes::default().emit();
        SinkBatchWritten { written: 1, duplicates: 0, dead_letters: 0, seconds: 0.01 }.emit();
        SinkAttemptFailed { stage: "write", error: "test", retry_in_ms: 1 }.emit();
        SinkLagObserved { partition: 0, lag: Some(1) }.emit();
        let exposed: std::collections::BTreeSet<String> =
            metrics().registry().gather().iter().map(|f| f.name().to_owned()).collect();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../k8s/grafana/metronome.json")).expect("the dashboard is JSON");
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap();
                for (i, _) in expr.match_indices("metronome_") {
                    let name: String =
                        expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    let base =
                        ["_bucket", "_count", "_sum"].iter().fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
                    assert!(exposed.contains(base), "panel {:?} queries {name}, which is not exposed", panel["title"]);
                    queried += 1;
                }
            }
        }
        assert!(queried >= 15, "{queried}");
    }
}
