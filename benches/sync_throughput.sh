#!/usr/bin/env bash
# The sync worker, PG→PG on this machine (issue 5, "Performance"): backfill rows/s of a 1M-row
# table, worker capacity in changes/s (a backlog of single-row transactions, and one of bulk
# UPDATEs), the rate it sustains while a writer runs flat out beside it, and lag p50/p95 with
# pgbench writing a fixed 5,000 single-row updates/s.
#
#   benches/sync_throughput.sh            # needs psql, pgbench, curl, jq; PostgreSQL on 127.0.0.1:5432
#
# Knobs (env): PGURL_BASE (postgres://postgres@127.0.0.1:5432), ROWS (1000000), BURST_SECS (20),
# BURST_CLIENTS (4), BULK_ROWS (200000), BULK_STMTS (2), RATE (5000), RATE_SECS (30),
# WRITER_SYNC_COMMIT (off: pgbench's sessions only; the worker keeps the server default), KEEP_OUT=1.
#
# Capacity is measured with the applier paused: a session holds a SHARE lock on the target table
# (the worker blocks in its upsert; writes on the source go on), the backlog is built, the lock is
# released, and the drain is timed from `changes_applied` in /v1/sync. That isolates the worker
# (plus the PostgreSQL work it causes) from the load generator on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PGURL_BASE=${PGURL_BASE:-postgres://postgres@127.0.0.1:5432}
ROWS=${ROWS:-1000000}
BURST_SECS=${BURST_SECS:-20}
BURST_CLIENTS=${BURST_CLIENTS:-4}
BULK_ROWS=${BULK_ROWS:-200000}
BULK_STMTS=${BULK_STMTS:-2}
RATE=${RATE:-5000}
RATE_SECS=${RATE_SECS:-30}
# The load generator's sessions only: with synchronous_commit on, single-row commits are bound
# by this disk's fsync (~1,000-3,500 tps with 4 clients), far below the rates to measure.
WRITER_SYNC_COMMIT=${WRITER_SYNC_COMMIT:-off}
TAG="sybench_$$_$(date +%s)"
SRC="${TAG}_src"
DST="${TAG}_dst"
OUT=$(mktemp -d /tmp/sync-bench.XXXXXX)
TOKEN=bench-token
SERVE_PID=""

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
psql_db() { psql "$PGURL_BASE/$1" -X -q -v ON_ERROR_STOP=1 -At "${@:2}"; }

cleanup() {
  set +e
  [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
  psql_db postgres -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '${TAG}_lock'" >/dev/null 2>&1
  psql_db postgres -c "DROP DATABASE IF EXISTS $SRC WITH (FORCE)" >/dev/null 2>&1
  psql_db postgres -c "DROP DATABASE IF EXISTS $DST WITH (FORCE)" >/dev/null 2>&1
  if [ "${KEEP_OUT:-0}" = 1 ]; then log "logs kept in $OUT"; else rm -rf "$OUT"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average at start: $LOAD_START (nproc $(nproc))"
log "building the release binary"
cargo build --release --quiet
BIN=./target/release/switchyard

# --- databases -------------------------------------------------------------------------------
psql_db postgres -c "CREATE DATABASE $SRC" -c "CREATE DATABASE $DST"
TABLE="CREATE TABLE users (id bigint PRIMARY KEY, name text, score int, note text, updated_at timestamptz)"
psql_db "$SRC" -c "$TABLE"
psql_db "$DST" -c "$TABLE"
log "filling the source with $ROWS rows"
psql_db "$SRC" -c "INSERT INTO users SELECT g, 'user ' || g, (g % 1000)::int, repeat('n', 40), now() FROM generate_series(1, $ROWS) g" \
  -c "VACUUM ANALYZE users"

cat > "$OUT/sync.yaml" <<YAML
listen: { http: 127.0.0.1:0 }
admin: { listen: 127.0.0.1:0 }
state: { url: "sqlite://$OUT/state.db" }
backends:
  m: { endpoints: [ "http://127.0.0.1:9" ] }
default_backend: m
sync:
  - name: bench
    source: { url: "$PGURL_BASE/$SRC", table: users, key: [id] }
    target: { url: "$PGURL_BASE/$DST", table: users, key: [id] }
YAML
$BIN --log-level warn sync install --config "$OUT/sync.yaml" > "$OUT/install.log" 2>&1
CHG=$(psql_db "$SRC" -c "SELECT relname FROM pg_class WHERE relname LIKE 'switchyard_chg_%' AND relkind = 'r'")

# --- helpers ---------------------------------------------------------------------------------
now() { date +%s.%N; }
status() { curl -fsS -H "Authorization: Bearer $TOKEN" "http://$ADMIN/v1/sync" | jq -c '.sync[0]'; }
field() { jq -r ".$1 // 0" <<<"$2"; }
pending() { psql_db "$SRC" -c "SELECT COALESCE(max(seq) - min(seq) + 1, 0) FROM $CHG"; }
count_pending() { psql_db "$SRC" -c "SELECT count(*) FROM $CHG"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 " " $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat; }
TICK=$(getconf CLK_TCK)
NPROC=$(nproc)
# cpu_begin / cpu_end NAME: switchyard CPU % of one core and machine busy % over an interval.
cpu_begin() { CPU0=$(cpu_ticks "$SERVE_PID"); read -r CB0 CT0 <<<"$(busy_ticks)"; W0=$(now); }
cpu_end() {
  local c1 b1 t1 w1
  c1=$(cpu_ticks "$SERVE_PID"); read -r b1 t1 <<<"$(busy_ticks)"; w1=$(now)
  CPU_SY=$(echo "($c1 - $CPU0) / $TICK / ($w1 - $W0) * 100" | bc -l)
  CPU_BUSY=$(echo "($b1 - $CB0) / ($t1 - $CT0) * 100" | bc -l)
  printf '%s\tswitchyard %.0f%% of a core\tmachine busy %.0f%% of %s cores\n' "$1" "$CPU_SY" "$CPU_BUSY" "$NPROC" >> "$OUT/cpu.tsv"
}
snapshot_top() { top -b -n1 -w 200 | head -20 > "$OUT/top_$1.txt"; }

pause_applier() { # holds SHARE on the target table: the worker's upsert waits, source writes go on
  PGAPPNAME="${TAG}_lock" psql "$PGURL_BASE/$DST" -X -q -c "BEGIN" -c "LOCK TABLE users IN SHARE MODE" -c "SELECT pg_sleep(3600)" >/dev/null 2>&1 &
  for _ in $(seq 100); do
    [ "$(psql_db "$DST" -c "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.application_name = '${TAG}_lock' AND l.mode = 'ShareLock' AND l.granted")" = 1 ] && return
    sleep 0.05
  done
  echo "could not take the pause lock" >&2; exit 1
}
resume_applier() {
  psql_db postgres -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '${TAG}_lock'" >/dev/null
}

# drain NAME: times the worker emptying the change table; sets DRAIN_RATE (changes/s).
drain() {
  local backlog a0 t0 a1 t1 s
  backlog=$(count_pending)
  s=$(status); a0=$(field changes_applied "$s")
  cpu_begin; snapshot_top "$1_start"
  resume_applier
  t0=$(now)
  local topped=0
  while :; do
    sleep 0.1
    if [ "$topped" = 0 ] && [ "$(echo "$(now) - $t0 > 3" | bc)" = 1 ]; then snapshot_top "$1_mid"; topped=1; fi
    [ "$(psql_db "$SRC" -c "SELECT EXISTS (SELECT 1 FROM $CHG)")" = f ] && break
  done
  t1=$(now)
  cpu_end "$1"
  sleep 0.6; s=$(status); a1=$(field changes_applied "$s")   # published every 500 ms
  DRAIN_RATE=$(echo "$backlog / ($t1 - $t0)" | bc -l)
  printf '%s\tbacklog %s\tapplied %s in %.2f s\t%.0f changes/s\n' "$1" "$backlog" "$((a1 - a0))" "$(echo "$t1 - $t0" | bc -l)" "$DRAIN_RATE" >> "$OUT/drain.tsv"
  log "$1: $backlog changes drained at $(printf %.0f "$DRAIN_RATE") changes/s"
}

cat > "$OUT/update.sql" <<SQL
\set id random(1, $ROWS)
UPDATE users SET score = score + 1, updated_at = now() WHERE id = :id;
SQL

# --- 1. backfill -----------------------------------------------------------------------------
log "starting serve; backfill of $ROWS rows"
T_START=$(now)
SWITCHYARD_ADMIN_TOKEN=$TOKEN $BIN --log-level warn --log-format json serve --config "$OUT/sync.yaml" \
  > "$OUT/serve.out" 2> "$OUT/serve.err" &
SERVE_PID=$!
for _ in $(seq 200); do grep -q '"listening"' "$OUT/serve.out" 2>/dev/null && break; sleep 0.05; done
ADMIN=$(grep -m1 '"listening"' "$OUT/serve.out" | jq -r .admin | sed 's#^http://##')
[ -n "$ADMIN" ] || { cat "$OUT/serve.err" >&2; exit 1; }
cpu_begin
TOPPED=0
while :; do
  s=$(status)
  if [ "$(field phase "$s")" = stream ] && [ "$(field backfill_rows_total "$s")" -gt 0 ] &&
     [ "$(field backfill_rows_copied "$s")" = "$(field backfill_rows_total "$s")" ]; then break; fi
  if [ "$TOPPED" = 0 ] && [ "$(echo "$(now) - $T_START > 10" | bc)" = 1 ]; then snapshot_top backfill_mid; TOPPED=1; fi
  [ "$(echo "$(now) - $T_START > 1800" | bc)" = 1 ] && { echo "backfill did not finish: $s" >&2; exit 1; }
  sleep 0.1
done
T_END=$(now)
cpu_end backfill
BACKFILL_SECS=$(echo "$T_END - $T_START" | bc -l)
COPIED=$(psql_db "$DST" -c "SELECT count(*) FROM users")
BACKFILL_RATE=$(echo "$COPIED / $BACKFILL_SECS" | bc -l)
log "backfill: $COPIED rows in $(printf %.1f "$BACKFILL_SECS") s = $(printf %.0f "$BACKFILL_RATE") rows/s"
psql_db "$DST" -c "VACUUM ANALYZE users"

# --- 2. capacity: single-row transactions ------------------------------------------------------
log "single-row backlog: applier paused, pgbench $BURST_CLIENTS clients for $BURST_SECS s"
pause_applier
PGOPTIONS="-c synchronous_commit=$WRITER_SYNC_COMMIT" pgbench -n -c "$BURST_CLIENTS" -j 2 -T "$BURST_SECS" -f "$OUT/update.sql" "$PGURL_BASE/$SRC" > "$OUT/pgbench_burst.txt" 2>&1
GEN_TPS=$(awk '/^tps/ {print $3; exit}' "$OUT/pgbench_burst.txt")
drain single_row
CAP_SINGLE=$DRAIN_RATE

# --- 3. capacity: bulk UPDATEs -----------------------------------------------------------------
log "bulk backlog: applier paused, $BULK_STMTS UPDATEs of $BULK_ROWS rows"
pause_applier
for i in $(seq 0 $((BULK_STMTS - 1))); do
  lo=$((i * BULK_ROWS + 1)); hi=$(((i + 1) * BULK_ROWS))
  psql_db "$SRC" -c "UPDATE users SET score = score + 1, updated_at = now() WHERE id BETWEEN $lo AND $hi"
done
drain bulk
CAP_BULK=$DRAIN_RATE

# --- 4. writer and applier side by side ---------------------------------------------------------
log "concurrent: pgbench $BURST_CLIENTS clients flat out for $BURST_SECS s with the applier running"
s=$(status); A0=$(field changes_applied "$s"); T0=$(now)
cpu_begin
PGOPTIONS="-c synchronous_commit=$WRITER_SYNC_COMMIT" pgbench -n -c "$BURST_CLIENTS" -j 2 -T "$BURST_SECS" -f "$OUT/update.sql" "$PGURL_BASE/$SRC" > "$OUT/pgbench_concurrent.txt" 2>&1 &
PGB=$!
sleep $((BURST_SECS / 2)); snapshot_top concurrent_mid
wait $PGB
s=$(status); A1=$(field changes_applied "$s"); T1=$(now)
cpu_end concurrent
CONC_GEN=$(awk '/^tps/ {print $3; exit}' "$OUT/pgbench_concurrent.txt")
CONC_APPLY=$(echo "($A1 - $A0) / ($T1 - $T0)" | bc -l)
CONC_BACKLOG=$(count_pending)
log "concurrent: writer $(printf %.0f "$CONC_GEN") tps, applier $(printf %.0f "$CONC_APPLY") changes/s, backlog at end $CONC_BACKLOG"
for _ in $(seq 600); do [ "$(count_pending)" = 0 ] && break; sleep 0.5; done

# --- 5. lag at a fixed rate --------------------------------------------------------------------
log "lag: pgbench -R $RATE for $RATE_SECS s"
sleep 2
cpu_begin
START_RATE=$(now)
PGOPTIONS="-c synchronous_commit=$WRITER_SYNC_COMMIT" pgbench -n -c 4 -j 2 -R "$RATE" -T "$RATE_SECS" -f "$OUT/update.sql" "$PGURL_BASE/$SRC" > "$OUT/pgbench_rate.txt" 2>&1 &
PGB=$!
: > "$OUT/lag_samples.tsv"
for t in $(seq 4 2 $((RATE_SECS - 2))); do
  while [ "$(echo "$(now) - $START_RATE < $t" | bc)" = 1 ]; do sleep 0.05; done
  s=$(status)
  m=$(curl -fsS -H "Authorization: Bearer $TOKEN" "http://$ADMIN/metrics" | awk '/^switchyard_sync_lag_seconds/ && !v {v = $2} END {print v}')
  printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$(field lag_p50_seconds "$s")" "$(field lag_p95_seconds "$s")" "$m" "$(field changes_per_second "$s")" >> "$OUT/lag_samples.tsv"
  [ "$t" = 16 ] && snapshot_top rate_mid
done
wait $PGB
cpu_end rate
RATE_TPS=$(awk '/^tps/ {print $3; exit}' "$OUT/pgbench_rate.txt")
RATE_LATE=$(awk '/schedule lag/ {print $0; exit}' "$OUT/pgbench_rate.txt")
# the last sample (t = RATE_SECS-2) and the worst over the second half
read -r _ LAG50 LAG95 LAGM CPS < <(tail -1 "$OUT/lag_samples.tsv")
med() { awk -v h=$((RATE_SECS / 2)) -v c="$1" '$1 >= h {v[n++] = $c} END {asort(v); print (n % 2) ? v[int(n / 2) + 1] : (v[n / 2] + v[n / 2 + 1]) / 2}' "$OUT/lag_samples.tsv"; }
MED50=$(med 2); MED95=$(med 3); MEDM=$(med 4)
WORST95=$(awk -v h=$((RATE_SECS / 2)) '$1 >= h && $3 > m {m = $3} END {print m + 0}' "$OUT/lag_samples.tsv")
WORSTM=$(awk -v h=$((RATE_SECS / 2)) '$1 >= h && $4 > m {m = $4} END {print m + 0}' "$OUT/lag_samples.tsv")

# --- 6. the tables agree -----------------------------------------------------------------------
for _ in $(seq 200); do [ "$(count_pending)" = 0 ] && break; sleep 0.1; done
sleep 1
CHECK="SELECT count(*) || ' ' || sum(score) || ' ' || md5(string_agg(id || ':' || score || ':' || updated_at, ',' ORDER BY id)) FROM users"
SUM_SRC=$(psql_db "$SRC" -c "$CHECK"); SUM_DST=$(psql_db "$DST" -c "$CHECK")
AGREE=$([ "$SUM_SRC" = "$SUM_DST" ] && echo yes || echo "NO ($SUM_SRC vs $SUM_DST)")

# --- report ------------------------------------------------------------------------------------
f0() { printf '%.0f' "$1"; }
ms() { printf '%.1f ms' "$(echo "$1 * 1000" | bc -l)"; }
echo
echo "switchyard sync worker, PG→PG ($(psql_db postgres -c 'SHOW server_version')), $(date -u +%FT%TZ)"
echo "machine: nproc $NPROC, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//'), load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '%-58s %s\n' "figure" "value"
printf '%-58s %s\n' "backfill, $ROWS rows (rows/s)" "$(f0 "$BACKFILL_RATE")  ($(printf %.1f "$BACKFILL_SECS") s)"
printf '%-58s %s\n' "capacity, single-row txns backlog (changes/s)" "$(f0 "$CAP_SINGLE")  (aim ≥ 20000, bar 10000)"
printf '%-58s %s\n' "capacity, bulk UPDATE backlog (changes/s)" "$(f0 "$CAP_BULK")"
printf '%-58s %s\n' "concurrent: writer tps / applied changes/s" "$(f0 "$CONC_GEN") / $(f0 "$CONC_APPLY")  (backlog left $CONC_BACKLOG)"
printf '%-58s %s\n' "writer alone, applier paused (tps, $BURST_CLIENTS clients)" "$(f0 "$GEN_TPS")"
printf '%-58s %s\n' "lag at $RATE/s: pgbench achieved (tps)" "$(f0 "$RATE_TPS")"
printf '%-58s %s\n' "lag at $RATE/s: p50 / p95 (/v1/sync, median, 2nd half)" "$(ms "$MED50") / $(ms "$MED95")  (aim p95 < 100 ms)"
printf '%-58s %s\n' "lag at $RATE/s: p50 / p95 (/v1/sync, last sample)" "$(ms "$LAG50") / $(ms "$LAG95")"
printf '%-58s %s\n' "lag at $RATE/s: worst p95 over 2nd half" "$(ms "$WORST95")"
printf '%-58s %s\n' "lag at $RATE/s: switchyard_sync_lag_seconds med/last/max" "$(ms "$MEDM") / $(ms "$LAGM") / $(ms "$WORSTM")"
printf '%-58s %s\n' "source and target equal at the end" "$AGREE"
echo
echo "pgbench -R schedule: ${RATE_LATE:-n/a}"
echo "drains:"; sed 's/^/  /' "$OUT/drain.tsv"
echo "cpu:"; sed 's/^/  /' "$OUT/cpu.tsv"
echo "lag samples (t s, p50 s, p95 s, lag metric s, changes/s):"; sed 's/^/  /' "$OUT/lag_samples.tsv"
if [ "${KEEP_OUT:-0}" = 1 ]; then echo "top snapshots and logs: $OUT"; fi
