-- Rollouts (issue 7): one row per route that has ever had a rollout, written with every
-- transition in the same transaction as the route's override and its audit record. Portable SQL:
-- the same migration runs on SQLite and PostgreSQL.

CREATE TABLE rollouts (
    route       TEXT PRIMARY KEY,
    state       TEXT NOT NULL,         -- idle | progressing | paused | promoted | rolled_back | aborted
    step        BIGINT NOT NULL,       -- index into the route's steps
    baked_ms    BIGINT NOT NULL,       -- time every gate has held in this step; saved about once a second
    revision    BIGINT NOT NULL,       -- bumped by every transition
    reason      TEXT,                  -- why it paused, rolled back or was aborted
    history     TEXT NOT NULL,         -- JSON array of transitions, newest last
    updated_at  TEXT NOT NULL
);

-- Which replica drives rollouts when several share a Postgres store. One row; the holder renews
-- it, another replica takes it once expires_ms (milliseconds since the Unix epoch) has passed.
CREATE TABLE rollout_lease (
    id          BIGINT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_ms  BIGINT NOT NULL
);
INSERT INTO rollout_lease (id, holder, expires_ms) VALUES (1, '', 0);
