# syntax=docker/dockerfile:1
#
# switchyard container image: a multi-stage build, a small Debian runtime, a non-root user.
#
#   docker build -t switchyard:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9901:9901 -e SWITCHYARD_ADMIN_TOKEN=change-me \
#     -v "$PWD/my-config.yaml:/etc/switchyard/switchyard.yaml:ro" switchyard:0.1.0
#
# The config is read from /etc/switchyard/switchyard.yaml (mount it; none is baked in). It must
# listen on 0.0.0.0 to be reachable from outside the container, and a non-loopback admin
# listener needs SWITCHYARD_ADMIN_TOKEN or admin.tokens_file. No secret is part of the image.
# The working directory /var/lib/switchyard is writable by the runtime user, so the default
# SQLite state store (sqlite://switchyard-state.db) works; in Kubernetes it is an emptyDir.
# The build needs BuildKit (the default builder since Docker 23) for the cache mounts.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
# benches/ only because Cargo.toml names a [[bench]] target; tests/ is not needed.
COPY benches ./benches
# The registry and target directories are BuildKit cache mounts: a rebuild after a source change
# recompiles only switchyard, not its dependencies. The binary is copied out of the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin switchyard \
    && install -D -m 0755 target/release/switchyard /out/switchyard

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# Numeric UID/GID so that Kubernetes' runAsNonRoot can verify the user without /etc/passwd.
ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" switchyard \
    && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home \
       --home-dir /var/lib/switchyard --shell /usr/sbin/nologin switchyard \
    && mkdir -p /etc/switchyard /var/lib/switchyard \
    && chown "${UID}:${GID}" /var/lib/switchyard
# CA roots for https:// upstreams, taken from the build stage (no package manager run here).
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/switchyard /usr/local/bin/switchyard

LABEL org.opencontainers.image.title="switchyard" \
      org.opencontainers.image.description="Traffic router for strangler-fig migrations" \
      org.opencontainers.image.licenses="Apache-2.0"

WORKDIR /var/lib/switchyard
USER ${UID}:${GID}
# 8080: the proxy (listen.http); 9901: admin API, /healthz, /readyz, /metrics (admin.listen).
EXPOSE 8080 9901
# SIGTERM (the default stop signal) drains: /readyz turns 503, drain_delay, in-flight finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["switchyard"]
CMD ["serve", "--config", "/etc/switchyard/switchyard.yaml"]
