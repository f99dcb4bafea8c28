#!/usr/bin/env bash
# The cost of the access log: ../shared/bench/peers.sh run alternately against two switchyard
# processes, identical but for `access_log` (JSON, every request, to a file) on or off, with
# the reference nginx writing its own access log (JSON lines, every request, to a file) in the
# same runs. Prints CPU per request for each, from peers.sh's raw figures, and the ratios.
# Needs what peers.sh needs: apt-get install nginx haproxy wrk.
#   ALTERNATIONS=3 (off/on pairs)  BENCH=../shared/bench  ROUNDS=1 DUR=8 per peers.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
# ../shared/bench beside the main checkout; ../../shared/bench from a worktree under wt/.
BENCH=${BENCH:-$(ls -d ../shared/bench ../../shared/bench 2>/dev/null | head -1 || true)}
ALTERNATIONS=${ALTERNATIONS:-3}
OUT=$(mktemp -d /tmp/access-log-bench.XXXXXX)
cargo build --release --quiet

# peers.sh with an nginx that logs every request: a copy of the bench folder whose nginx.conf
# writes JSON lines (nginx's escape=json) to a file.
cp -r "$BENCH" "$OUT/bench"
sed -i "s|    access_log off;|    log_format json_lines escape=json '{\"time\":\"\$time_iso8601\",\"request_id\":\"\$request_id\",\"client\":\"\$remote_addr\",\"method\":\"\$request_method\",\"host\":\"\$host\",\"path\":\"\$uri\",\"status\":\$status,\"upstream\":\"\$upstream_addr\",\"bytes_in\":\"\$request_length\",\"bytes_out\":\$body_bytes_sent,\"ttfb\":\"\$upstream_header_time\",\"duration\":\$request_time}';\n    access_log $OUT/nginx-access.log json_lines;|" "$OUT/bench/nginx.conf"
grep -q json_lines "$OUT/bench/nginx.conf"

# shellcheck source=benches/bench_config.sh
. benches/bench_config.sh
mk() { # $1 = name, $2 = port, $3 = admin port, $4 = extra top-level YAML
  bench_config "$OUT/$1.yaml" "$2" "$3" 9001 "$OUT/$1.db" "" "$4"
}
mk off 18180 18190 ""
mk on 18181 18191 "access_log: { format: json, path: $OUT/switchyard-access.log, sample: 1 }"
./target/release/switchyard --log-level error serve --config "$OUT/off.yaml" --concurrency 1 >/dev/null &
OFF_PID=$!
./target/release/switchyard --log-level error serve --config "$OUT/on.yaml" --concurrency 1 >/dev/null &
ON_PID=$!
trap 'kill $OFF_PID $ON_PID 2>/dev/null || true' EXIT
for port in 18190 18191; do
  for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$port/readyz" && break; sleep 0.1; done
done

for i in $(seq "$ALTERNATIONS"); do
  for variant in off on; do
    port=18180; pid=$OFF_PID
    [ "$variant" = on ] && { port=18181; pid=$ON_PID; }
    echo "access_log.sh: run $i, switchyard with the access log $variant"
    OUT="$OUT/run-$i-$variant" ROUNDS=${ROUNDS:-1} DUR=${DUR:-8} LAT_DUR=${LAT_DUR:-2} \
      IDLE_CONNS=0 H2=0 PUT_PID=$pid "$OUT/bench/peers.sh" "127.0.0.1:$port" >"$OUT/run-$i-$variant.log" 2>&1 \
      || { cat "$OUT/run-$i-$variant.log"; exit 1; }
    grep WARNING "$OUT/run-$i-$variant/summary.txt" || true
  done
done

python3 - "$OUT" "$ALTERNATIONS" <<'PY'
import csv, glob, os, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
cpu = {}  # (label) -> [us per request]
for i in range(1, n + 1):
    for variant in ("off", "on"):
        with open(os.path.join(out, f"run-{i}-{variant}", "raw.tsv")) as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if row["mode"] != "load" or not int(row["requests"]):
                    continue
                us = float(row["proxy_cpu_s"]) * 1e6 / int(row["requests"])
                label = {"put": f"switchyard log {variant}", "nginx": "nginx log on"}.get(row["target"], row["target"])
                cpu.setdefault(label, []).append(us)
med = {k: statistics.median(v) for k, v in cpu.items()}
print(f"{'target':<22} {'cpu/req (median)':>17} {'runs':>5}")
for k in ("switchyard log off", "switchyard log on", "nginx log on", "haproxy", "direct"):
    if k in med:
        print(f"{k:<22} {med[k]:>15.2f}us {len(cpu[k]):>5}")
on, off = med["switchyard log on"], med["switchyard log off"]
print(f"switchyard log on / off: x{on / off:.3f} (target <= x1.10)")
print(f"switchyard log on / nginx log on: x{on / med['nginx log on']:.2f}")
lines = sum(1 for _ in open(os.path.join(out, "switchyard-access.log")))
print(f"switchyard access log lines written: {lines}")
PY
echo "switchyard access log lines dropped: $(curl -fs http://127.0.0.1:18191/metrics | awk '/^switchyard_access_log_dropped_lines_total/ {print $2}')"
echo "access_log.sh: results in $OUT"
