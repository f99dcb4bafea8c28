# Sourced by the side-by-side benchmark scripts: the switchyard config they measure.
# bench_config FILE PORT ADMIN_PORT BACKEND_PORT STATE_DB [EXTRA_ROUTE_YAML] [EXTRA_TOP_YAML]
# One route on `/` splitting 20% to target by client IP, both sides on the same backend.
bench_config() {
  cat > "$1" <<YAML
listen: { http: 127.0.0.1:$2 }
admin: { listen: 127.0.0.1:$3 }
state: { url: "sqlite://$5" }
backends:
  monolith: { endpoints: [ "http://127.0.0.1:$4" ] }
  users-v2: { endpoints: [ "http://127.0.0.1:$4" ] }
default_backend: monolith
routes:
  - name: bench
    match: { path_prefix: / }
    legacy: monolith
    target: users-v2
    split: { percentage: { weight: 20 } }
    sticky: { key: client_ip }
${6:-}
${7:-}
YAML
}
