-- Alerts as the PostgreSQL sink writes them, and the sink's input positions.
-- The offsets table is the source of truth on restart: a batch of alerts and the offsets after it
-- commit in one transaction, so a crash neither loses nor repeats a row.

CREATE TABLE alerts (
    alert_id         TEXT PRIMARY KEY,          -- deterministic: user, window and model version
    user_id          TEXT NOT NULL,
    window_start     TIMESTAMPTZ NOT NULL,      -- event time of the window's first press
    window_end       TIMESTAMPTZ NOT NULL,      -- event time of the window's last press
    detected_at      TIMESTAMPTZ NOT NULL,      -- processor wall clock
    score            DOUBLE PRECISION NOT NULL, -- combined score the policy acted on, 0..1
    timing_score     DOUBLE PRECISION NOT NULL,
    histogram_score  DOUBLE PRECISION NOT NULL,
    lstm_score       DOUBLE PRECISION,          -- NULL when no model scored the window
    scorers          TEXT[] NOT NULL,
    reasons          TEXT[] NOT NULL,
    model_version    TEXT NOT NULL,
    features         JSONB NOT NULL,            -- {"name": {"value": v, "fired": b}}
    interval_histogram JSONB,                   -- {"bin_ms": 10.0, "counts": [...]}: the alerting
                                                -- window's rhythm intervals, for the page
    source_topic     TEXT NOT NULL,
    source_partition INTEGER NOT NULL,
    source_offset    BIGINT NOT NULL,
    written_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (source_topic, source_partition, source_offset)
);
CREATE INDEX alerts_by_time ON alerts (detected_at DESC, alert_id);
CREATE INDEX alerts_by_user ON alerts (user_id, detected_at DESC);

CREATE TABLE sink_offsets (
    consumer     TEXT NOT NULL,    -- the sink's consumer group
    topic        TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    next_offset  BIGINT NOT NULL,  -- first offset not yet written
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);

-- Alert records that did not decode: kept, with their position, so nothing is lost.
CREATE TABLE sink_dead_letters (
    topic        TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    "offset"     BIGINT NOT NULL,
    error_class  TEXT NOT NULL,
    payload      BYTEA,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
