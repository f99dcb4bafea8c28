#!/usr/bin/env bash
# Full TLS handshakes per second against switchyard's HTTPS listener, and against nginx and
# haproxy terminating TLS with the same certificate on loopback, for comparison.
#
# Each target gets one worker (switchyard --concurrency 1, nginx worker_processes 1, haproxy
# nbthread 1) pinned to CPU 1; the client, `openssl s_time -new` (a fresh full handshake per
# connection, no resumption, no request), runs on CPU 0. s_time is one sequential client, so
# handshakes/s is the rate of a latency-bound loop whose client does as much crypto as the
# server; `server cpu/hs` (CPU time the target's processes used, over handshakes done) is the
# server's own cost and the better figure to compare. Compare rows measured in the same run,
# never across machines. Certificates: ECDSA P-256 and RSA 2048, TLS 1.3.
#
#   benches/tls_handshake.sh            # needs target/release/switchyard (cargo build --release)
#   DUR=10 benches/tls_handshake.sh
#
# Needs: openssl, nginx, haproxy (apt-get install nginx haproxy), taskset (util-linux).
# Only loopback addresses are used; every process started here is stopped on exit.
set -euo pipefail

DUR=${DUR:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SWITCHYARD:-$ROOT/target/release/switchyard}
WORK=$(mktemp -d /tmp/tls-bench-XXXXXX)
PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    stop_all
    rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$BIN" ] || { echo "no $BIN: run cargo build --release first" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
pin() { if have taskset; then taskset -c "$@"; else shift; "$@"; fi; }
# Starts a server on CPU $1 in the background; exec so that $! is the server itself.
serve_on() {
    ( if have taskset; then exec taskset -c "$@"; else shift; exec "$@"; fi ) &
    PIDS+=($!)
}

# A backend nobody reaches (the handshake bench sends no request), but the config needs one.
PORT_SY=18443 PORT_NGINX=18444 PORT_HAPROXY=18445

cert() { # cert KIND
    local kind=$1
    case $kind in
        ecdsa) openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                   -keyout "$WORK/$kind.key" -out "$WORK/$kind.crt" -days 2 \
                   -subj /CN=bench.test -addext subjectAltName=DNS:bench.test 2>/dev/null ;;
        rsa)   openssl req -x509 -newkey rsa:2048 -nodes \
                   -keyout "$WORK/$kind.key" -out "$WORK/$kind.crt" -days 2 \
                   -subj /CN=bench.test -addext subjectAltName=DNS:bench.test 2>/dev/null ;;
    esac
    cat "$WORK/$kind.crt" "$WORK/$kind.key" > "$WORK/$kind.pem"
}

wait_port() { # wait_port PORT
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    return 1
}

start_switchyard() { # KIND
    cat > "$WORK/switchyard.yaml" <<EOF
listen:
  http: "127.0.0.1:0"
  https: { addr: "127.0.0.1:$PORT_SY", cert: $1.crt, key: $1.key }
admin: { listen: "127.0.0.1:0" }
state: { url: "sqlite://$WORK/state.db" }
backends:
  monolith: { endpoints: ["http://127.0.0.1:9"] }
default_backend: monolith
EOF
    serve_on 1 "$BIN" --log-level error serve --config "$WORK/switchyard.yaml" --concurrency 1 >/dev/null
    wait_port $PORT_SY
}

start_nginx() { # KIND
    mkdir -p "$WORK/nginx"
    cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log error;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
    fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
    server {
        listen 127.0.0.1:$PORT_NGINX ssl;
        ssl_certificate $WORK/$1.crt;
        ssl_certificate_key $WORK/$1.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        return 200 "ok\n";
    }
}
EOF
    serve_on 1 nginx -c "$WORK/nginx.conf"
    wait_port $PORT_NGINX
}

start_haproxy() { # KIND
    cat > "$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    tune.ssl.cachesize 0
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend tls
    bind 127.0.0.1:$PORT_HAPROXY ssl crt $WORK/$1.pem no-tls-tickets
    http-request return status 200 content-type text/plain string ok
EOF
    serve_on 1 haproxy -f "$WORK/haproxy.cfg" -db >/dev/null 2>&1
    wait_port $PORT_HAPROXY
}

# utime + stime, in clock ticks, of the last server started and its child processes
# (nginx's and haproxy's workers).
cpu_ticks() {
    local root=${PIDS[-1]} total=0 pid f
    for pid in $root $(pgrep -P "$root" || true); do
        [ -r "/proc/$pid/stat" ] || continue
        # Fields after the command name, which is in parentheses; utime and stime are the
        # 14th and 15th fields of the whole line.
        f=$(sed 's/^.*) //' "/proc/$pid/stat")
        set -- $f
        total=$((total + ${12} + ${13}))
    done
    echo $total
}

# Prints "handshakes/s  server-CPU-µs-per-handshake" for one target.
measure() { # PORT
    local out before after
    before=$(cpu_ticks)
    out=$(pin 0 openssl s_time -connect "127.0.0.1:$1" -new -time "$DUR" 2>&1 || true)
    after=$(cpu_ticks)
    # s_time ends with "N connections in T real seconds, B bytes read per connection".
    awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
        /connections in [0-9]+ real seconds/ {
            printf "%14.0f %16.0f", $1 / $4, ticks / hz * 1e6 / $1; found = 1 }
        END { if (!found) printf "%14s %16s", "n/a", "n/a" }' <<<"$out"
}

printf '%-10s %-7s %14s %16s\n' target cert 'handshakes/s' 'server cpu/hs us'
for kind in ecdsa rsa; do
    cert $kind
    start_switchyard $kind
    printf '%-10s %-7s %s\n' switchyard $kind "$(measure $PORT_SY)"
    stop_all
    if have nginx; then
        start_nginx $kind
        printf '%-10s %-7s %s\n' nginx $kind "$(measure $PORT_NGINX)"
        stop_all
    fi
    if have haproxy; then
        start_haproxy $kind
        printf '%-10s %-7s %s\n' haproxy $kind "$(measure $PORT_HAPROXY)"
        stop_all
    fi
done
