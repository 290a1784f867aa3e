//! Alerts as JSON, with the Protobuf message's field names: what `metronome alerts` prints,
//! what the sink stores beside each row and what the page reads.

use crate::proto;

/// Features as a JSON object: `{"name": {"value": v, "fired": b}}`.
pub fn features_json(features: &[proto::Feature]) -> serde_json::Value {
    features.iter().map(|f| (f.name.clone(), serde_json::json!({"value": f.value, "fired": f.fired}))).collect()
}

/// An interval histogram as JSON: `{"bin_ms": w, "counts": [...]}`.
pub fn histogram_json(h: &proto::IntervalHistogram) -> serde_json::Value {
    serde_json::json!({"bin_ms": h.bin_ms, "counts": h.counts})
}

/// A fleet alert's evidence as JSON (the Protobuf message's field names).
pub fn fleet_json(f: &proto::FleetEvidence) -> serde_json::Value {
    serde_json::json!({
        "fleet_id": f.fleet_id,
        "accounts": f.accounts,
        "new_accounts": f.new_accounts,
        "links": f.links,
        "fingerprints": f.fingerprints,
    })
}

/// An alert as a JSON object (the same field names as the Protobuf message).
pub fn alert_json(a: &proto::Alert) -> serde_json::Value {
    let features = features_json(&a.features);
    serde_json::json!({
        "alert_id": a.alert_id,
        "user_id": a.user_id,
        "window_start_us": a.window_start_us,
        "window_end_us": a.window_end_us,
        "score": a.score,
        "timing_score": a.timing_score,
        "histogram_score": a.histogram_score,
        "lstm_score": a.lstm_score,
        "reasons": a.reasons,
        "scorers": a.scorers,
        "model_version": a.model_version,
        "detected_at_us": a.detected_at_us,
        "features": features,
        "interval_histogram": a.interval_histogram.as_ref().map(histogram_json),
        "fleet": a.fleet.as_ref().map(fleet_json),
    })
}
