#!/usr/bin/env bash
# Full consistency check of a 1M-row PostgreSQL pair: time to prove 1M equal rows equal, and
# time to find 10 differences scattered through them, for switchyard and for reladiff (the
# maintained data-diff fork, from PyPI) on the same pair in the same run. Prints a table.
#   benches/consistency_check.sh [ROWS]        (PG at SWITCHYARD_TEST_PG, default local)
# reladiff: $RELADIFF if set, else installed with pip into target/bench-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-1000000}
PG=${SWITCHYARD_TEST_PG:-postgres://postgres@127.0.0.1:5432}
SRC=sy_bench_src_$$; DST=sy_bench_dst_$$
WORK=$(mktemp -d)
cleanup() {
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $SRC WITH (FORCE)" -c "DROP DATABASE IF EXISTS $DST WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
cargo build --release -q
BIN=target/release/switchyard
RELADIFF=${RELADIFF:-target/bench-venv/bin/reladiff}
if [ ! -x "$RELADIFF" ]; then
  python3 -m venv target/bench-venv
  target/bench-venv/bin/pip install -q reladiff psycopg2-binary
fi
psql -q "$PG/postgres" -c "CREATE DATABASE $SRC" -c "CREATE DATABASE $DST"
for db in $SRC $DST; do
  psql -q "$PG/$db" -c "CREATE TABLE users (id BIGINT PRIMARY KEY, name TEXT, score INT, balance NUMERIC(12,2), created TIMESTAMPTZ, note TEXT)" \
    -c "INSERT INTO users SELECT g, 'user ' || g, g % 1000, g * 1.25, '2024-01-01'::timestamptz + g * interval '1 second', CASE WHEN g % 7 = 0 THEN NULL ELSE 'note ' || g END FROM generate_series(1, $ROWS) g" \
    -c "VACUUM ANALYZE users"
done
cat > "$WORK/c.yaml" <<YAML
listen: { http: "127.0.0.1:0" }
admin: { listen: "127.0.0.1:0" }
state: { url: "sqlite://$WORK/state.db" }
backends: { m: { endpoints: ["http://127.0.0.1:9"] } }
default_backend: m
sync:
  - name: users
    source: { url: "$PG/$SRC", table: users, key: [id] }
    target: { url: "$PG/$DST", table: users, key: [id] }
YAML
run() { # prints seconds and exit code
  local start end code
  start=$(date +%s.%N)
  set +e; "$BIN" consistency check --config "$WORK/c.yaml" --sync users --output json > "$WORK/out.json" 2> "$WORK/err.txt"; code=$?; set -e
  end=$(date +%s.%N)
  echo "$(echo "$end - $start" | bc) $code"
}
reladiff_run() { # prints seconds and the number of differing keys it reports
  local start end
  start=$(date +%s.%N)
  "$RELADIFF" "$PG/$SRC" users "$PG/$DST" users -k id -c name -c score -c balance -c created -c note --json > "$WORK/reladiff.jsonl" 2> "$WORK/reladiff.err" || true
  end=$(date +%s.%N)
  echo "$(echo "$end - $start" | bc) $(python3 -c "import json;print(len({json.loads(l)[1][0] for l in open('$WORK/reladiff.jsonl') if l.strip()}))")"
}
read -r equal_s equal_code < <(run)
read -r rd_equal_s rd_equal_found < <(reladiff_run)
# Ten differences scattered through the table: changed values, a missing and an extra row.
psql -q "$PG/$DST" \
  -c "UPDATE users SET score = -1 WHERE id IN ($((ROWS/11)), $((ROWS/7)), $((ROWS/5)), $((ROWS/3)))" \
  -c "UPDATE users SET note = 'x' WHERE id IN ($((ROWS/2)), $((ROWS*2/3)), $((ROWS*9/10)))" \
  -c "DELETE FROM users WHERE id IN ($((ROWS/13)), $((ROWS*3/4)))" \
  -c "INSERT INTO users VALUES ($((ROWS+77)), 'ghost', 0, 0, now(), NULL)"
read -r diff_s diff_code < <(run)
read -r rd_diff_s rd_diff_found < <(reladiff_run)
cat "$WORK/reladiff.err" >&2
cat "$WORK/err.txt" >&2
found=$(python3 -c "import json;r=json.load(open('$WORK/out.json'));print(len(r['missing_in_target'])+len(r['extra_in_target'])+len(r['different']))")
printf '\n%-44s %12s %6s %12s %14s\n' "full check, PostgreSQL vs PostgreSQL" "switchyard s" "exit" "reladiff s" "ratio"
printf '%-44s %12.2f %6s %12.2f %13.2fx   (reladiff found %s)\n' "$ROWS equal rows" "$equal_s" "$equal_code" "$rd_equal_s" "$(echo "$equal_s / $rd_equal_s" | bc -l)" "$rd_equal_found"
printf '%-44s %12.2f %6s %12.2f %13.2fx   (switchyard found %s of 10, reladiff %s)\n' "$ROWS rows, 10 scattered differences" "$diff_s" "$diff_code" "$rd_diff_s" "$(echo "$diff_s / $rd_diff_s" | bc -l)" "$found" "$rd_diff_found"
printf 'machine: %s cores, load %s\n' "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
