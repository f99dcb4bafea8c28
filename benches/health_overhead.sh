#!/usr/bin/env bash
# The cost of passive health windows on the data plane: two switchyard processes, identical but
# for `rollback` limits on the route (windows recorded) or none (windows off), measured with wrk
# in alternating rounds of one run. Prints req/s and CPU per request for each, and the ratio.
# Needs wrk and nginx (the backend, as in ../shared/bench): apt-get install wrk nginx.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DUR=${DUR:-8}
CONNS=${CONNS:-50}
OUT=$(mktemp -d /tmp/health-overhead.XXXXXX)
cargo build --release --quiet

# Backend: nginx answering 200 with a 100-byte body, pinned to CPU 0 with wrk.
cat > "$OUT/backend.conf" <<NGINX
worker_processes 1; daemon off; pid $OUT/nginx.pid; error_log $OUT/nginx.err;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:19181; location / { return 200 "$(printf 'x%.0s' $(seq 100))"; } } }
NGINX
taskset -c 0 nginx -c "$OUT/backend.conf" &
NGINX_PID=$!

# shellcheck source=benches/bench_config.sh
. benches/bench_config.sh
mk() { # $1 = name, $2 = port, $3 = admin port, $4 = extra route YAML
  bench_config "$OUT/$1.yaml" "$2" "$3" 19181 "$OUT/$1.db" "$4"
}
mk off 19182 19192 ""
mk on 19183 19193 "    rollback: { max_error_rate: 0.5, max_latency_ratio: 100, window: 10s, min_requests: 20 }"
taskset -c 1 ./target/release/switchyard --log-level error serve --config "$OUT/off.yaml" --concurrency 1 >/dev/null &
OFF_PID=$!
taskset -c 1 ./target/release/switchyard --log-level error serve --config "$OUT/on.yaml" --concurrency 1 >/dev/null &
ON_PID=$!
trap 'kill $NGINX_PID $OFF_PID $ON_PID 2>/dev/null || true' EXIT
for port in 19192 19193; do
  for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$port/readyz" && break; sleep 0.1; done
done

cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
run() { # $1 = name, $2 = port, $3 = pid
  local before after rps reqs
  before=$(cpu_of "$3")
  taskset -c 0 wrk -t1 -c"$CONNS" -d"${DUR}s" "http://127.0.0.1:$2/" > "$OUT/wrk.txt"
  after=$(cpu_of "$3")
  rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/wrk.txt")
  reqs=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
  printf '%s\t%s\t%s\n' "$1" "$rps" "$(echo "($after - $before) / $TICK * 1000000 / $reqs" | bc -l)" >> "$OUT/raw.tsv"
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 0 ]; then run off 19182 $OFF_PID; run on 19183 $ON_PID; else run on 19183 $ON_PID; run off 19182 $OFF_PID; fi
done
python3 - "$OUT/raw.tsv" <<'PY'
import statistics, sys
rows = [l.split('\t') for l in open(sys.argv[1]).read().split('\n') if l]
med = {n: (statistics.median(float(r[1]) for r in rows if r[0] == n), statistics.median(float(r[2]) for r in rows if r[0] == n)) for n in ('off', 'on')}
print(f"{'windows':8} {'req/s (median)':>15} {'cpu/req us':>11}   rounds={len(rows)//2}")
for n in ('off', 'on'):
    print(f"{n:8} {med[n][0]:15.0f} {med[n][1]:11.2f}")
print(f"on/off   req/s x{med['on'][0]/med['off'][0]:.3f}   cpu/req x{med['on'][1]/med['off'][1]:.3f}")
PY
