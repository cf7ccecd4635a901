# dak's container image: one `dak` binary that runs every service in one
# process (`dak up`, the default command) or one service per container
# (`dak message-router`, `dak session`, `dak persistence`, `dak push`,
# `dak group-router`, `dak ws-gateway`, `dak rest-gateway`).
#
#   docker build -t dak .
#   docker run --rm -p 8080:8080 -p 8082:8082 -v dak-data:/var/lib/dak dak
#
# This file has not been built here (no container engine on the machines that
# wrote it); see deploy/README.md for what was checked.

# --- build ---------------------------------------------------------------------
# The Rust image carries a C toolchain, make, pkg-config and the headers of
# zlib and OpenSSL, which librdkafka and SQLite (both built from source) need.
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the registry and the build between builds on one machine.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dak \
    && cp target/release/dak /usr/local/bin/dak

# --- runtime -------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dak \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/dak --create-home dak
COPY --from=build /usr/local/bin/dak /usr/local/bin/dak
USER 10001:10001
WORKDIR /var/lib/dak
# Every address on all interfaces inside the container; the same DAK_
# variables change them. The data directory holds `dak up`'s bus and stores,
# or a separate service's SQLite files.
ENV DAK_PUBLIC_ADDR=0.0.0.0:8080 \
    DAK_INTERNAL_ADDR=0.0.0.0:8081 \
    DAK_ADMIN_ADDR=0.0.0.0:8082 \
    DAK_DATA_DIR=/var/lib/dak \
    DAK_LOG_FORMAT=json
VOLUME ["/var/lib/dak"]
# 8080: the client API (WebSocket and REST). 8081: ws-gateway's internal API,
# for session and persistence only; never publish it. 8082: /livez, /readyz,
# /metrics.
EXPOSE 8080 8081 8082
# SIGTERM drains: give `docker stop` more than DAK_SHUTDOWN_GRACE (10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/dak"]
CMD ["up"]
