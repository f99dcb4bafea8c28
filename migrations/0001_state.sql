-- Runtime state of switchyard: operator changes that win over the config file's values, and the
-- audit log of every change. Portable SQL: the same migration runs on SQLite and PostgreSQL.

CREATE TABLE route_overrides (
    route           TEXT PRIMARY KEY,
    weight_bp       BIGINT,            -- basis points (0..10000), NULL: the file's weight
    active          TEXT,              -- 'legacy' | 'target', NULL: the file's side
    rolled_back     BIGINT NOT NULL DEFAULT 0,
    rollback_at     TEXT,
    rollback_by     TEXT,
    rollback_reason TEXT,
    updated_at      TEXT NOT NULL,
    updated_by      TEXT NOT NULL
);

CREATE TABLE flag_overrides (
    flag          TEXT PRIMARY KEY,
    percentage_bp BIGINT,              -- NULL: the file's percentage
    updated_at    TEXT NOT NULL,
    updated_by    TEXT NOT NULL
);

CREATE TABLE audit (
    id           BIGINT PRIMARY KEY,
    at           TEXT NOT NULL,
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    target       TEXT NOT NULL,
    before_state TEXT,                 -- JSON
    after_state  TEXT,                 -- JSON
    outcome      TEXT NOT NULL,        -- 'applied' | 'refused'
    detail       TEXT
);

-- Bumped by every change, so replicas can poll one row to learn that something changed.
CREATE TABLE state_version (
    id      BIGINT PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO state_version (id, version) VALUES (1, 0);
