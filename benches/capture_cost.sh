#!/usr/bin/env bash
# What change capture costs the monolith: pgbench single-row UPDATEs on the source table with
# and without `switchyard sync install` (its triggers and change table), alternating in one run
# so that both see the same machine. The worker is not running: this is the cost of the
# capture alone, paid inside the application's transactions.
#
#   benches/capture_cost.sh       # needs psql, pgbench; PostgreSQL on 127.0.0.1:5432
#
# Knobs (env): PGURL_BASE (postgres://postgres@127.0.0.1:5432), ROWS (100000), ROUNDS (3),
# SECS (10 per measurement), CLIENTS (4), WRITER_SYNC_COMMIT (off: with it on, single-row commits
# are bound by this disk's fsync and the capture's share disappears in it).
set -euo pipefail
cd "$(dirname "$0")/.."
PGURL_BASE=${PGURL_BASE:-postgres://postgres@127.0.0.1:5432}
ROWS=${ROWS:-100000}
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-10}
CLIENTS=${CLIENTS:-4}
WRITER_SYNC_COMMIT=${WRITER_SYNC_COMMIT:-off}
TAG="sycap_$$"
SRC="${TAG}_src"; DST="${TAG}_dst"
OUT=$(mktemp -d /tmp/capture-cost.XXXXXX)
psql_db() { psql "$PGURL_BASE/$1" -X -q -v ON_ERROR_STOP=1 -At "${@:2}"; }
cleanup() {
  set +e
  psql_db postgres -c "DROP DATABASE IF EXISTS $SRC WITH (FORCE)" -c "DROP DATABASE IF EXISTS $DST WITH (FORCE)" >/dev/null 2>&1
  rm -rf "$OUT"
}
trap cleanup EXIT
cargo build --release --quiet
BIN=./target/release/switchyard
psql_db postgres -c "CREATE DATABASE $SRC" -c "CREATE DATABASE $DST"
TABLE="CREATE TABLE users (id bigint PRIMARY KEY, name text, score int, note text, updated_at timestamptz)"
psql_db "$SRC" -c "$TABLE" \
  -c "INSERT INTO users SELECT g, 'user ' || g, (g % 1000)::int, repeat('n', 40), now() FROM generate_series(1, $ROWS) g" \
  -c "VACUUM ANALYZE users"
psql_db "$DST" -c "$TABLE"
cat > "$OUT/sync.yaml" <<YAML
backends: { m: { endpoints: [ "http://127.0.0.1:9" ] } }
default_backend: m
sync:
  - name: bench
    source: { url: "$PGURL_BASE/$SRC", table: users, key: [id] }
    target: { url: "$PGURL_BASE/$DST", table: users, key: [id] }
YAML
cat > "$OUT/update.sql" <<SQL
\set id random(1, $ROWS)
UPDATE users SET score = score + 1, updated_at = now() WHERE id = :id;
SQL
run() { # prints tps
  PGOPTIONS="-c synchronous_commit=$WRITER_SYNC_COMMIT" pgbench -n -c "$CLIENTS" -j 2 -T "$SECS" \
    -f "$OUT/update.sql" "$PGURL_BASE/$SRC" 2>&1 | awk '/^tps/ {print $3; exit}'
}
: > "$OUT/rounds.tsv"
for r in $(seq "$ROUNDS"); do
  without=$(run)
  $BIN --log-level warn sync install --config "$OUT/sync.yaml" > /dev/null
  with=$(run)
  $BIN --log-level warn sync uninstall --config "$OUT/sync.yaml" > /dev/null
  psql_db "$SRC" -c "VACUUM users"
  printf '%s\t%s\t%s\n' "$r" "$without" "$with" | tee -a "$OUT/rounds.tsv" >&2
done
echo
echo "capture cost, PostgreSQL $(psql_db postgres -c 'SHOW server_version'), $CLIENTS clients, synchronous_commit=$WRITER_SYNC_COMMIT, $(nproc) cores"
printf '%-8s %14s %14s %8s\n' round "without (tps)" "with (tps)" "cost"
awk '{printf "%-8s %14.0f %14.0f %7.1f%%\n", $1, $2, $3, (1 - $3 / $2) * 100; a += $2; b += $3}
     END {printf "%-8s %14.0f %14.0f %7.1f%%\n", "mean", a / NR, b / NR, (1 - b / a) * 100}' "$OUT/rounds.tsv"
