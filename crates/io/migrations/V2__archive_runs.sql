-- One row per archived (topic, day): the nightly archive's consistency record, as the batch
-- system's line counts were. A re-run of a day updates its row (attempts + 1), never adds one.
CREATE TABLE archive_runs (
    topic            TEXT NOT NULL,
    day              DATE NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'expired')),
    attempts         INTEGER NOT NULL DEFAULT 1,
    location         TEXT NOT NULL,             -- archive root (no credentials)
    partitions       INTEGER,                   -- partitions archived
    records_read     BIGINT,                    -- records consumed from the topic
    records_written  BIGINT,                    -- records read back from the staged files
    checksums        JSONB,                     -- {"<partition>": "<sha256 of its file>"}
    manifest_sha256  TEXT,
    error            TEXT,                      -- why the last attempt failed (no record content)
    started_at       TIMESTAMPTZ NOT NULL,
    finished_at      TIMESTAMPTZ,
    PRIMARY KEY (topic, day)
);
