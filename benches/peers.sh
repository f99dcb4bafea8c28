#!/usr/bin/env bash
# Side-by-side load benchmark: switchyard vs nginx vs haproxy (and the backend direct), in one
# run, through the shared harness (PEERS, default ../shared/bench/peers.sh; see its README).
# Builds release, starts switchyard with one worker thread on benches/peers.yaml (20% split,
# sticky key on), runs the harness and prints its summary table. Extra env is passed through
# (ROUNDS, DUR, H2, PIN, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-../shared/bench/peers.sh}
[ -x "$PEERS" ] || { echo "benches/peers.sh: harness not found at $PEERS (set PEERS=)" >&2; exit 2; }
cargo build --release --quiet
./target/release/switchyard --log-level warn serve --config benches/peers.yaml --concurrency 1 >/dev/null &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fs -o /dev/null http://127.0.0.1:9901/readyz && break
  sleep 0.1
done
PUT_H2=${PUT_H2:-127.0.0.1:8080} PUT_PID=$PID "$PEERS" 127.0.0.1:8080 | tee /tmp/switchyard-peers.txt
