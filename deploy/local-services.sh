#!/usr/bin/env bash
# Runs dak's seven services as separate processes on this machine, against a
# Kafka broker (Tansu) and Redis, the way a distributed deployment runs them.
# persistence, push and group-router keep their SQLite files under deploy/data/.
# Ctrl-C stops everything this script started. See deploy/README.md.
#
# Script settings (all optional):
#   DAK_KAFKA_BROKERS   use this Kafka instead of a local Tansu on 127.0.0.1:9092
#   DAK_REDIS_URL       use this Redis instead of a local one on 127.0.0.1:6379
#   DAK_JWT_SECRET      client token secret (default: dev-secret)
#   DAK_INTERNAL_TOKEN  token of the gateways' internal API, used by session and
#                       persistence (default: dev-internal-token)
#   DAK_DATA_DIR        where persistence, push and group-router keep their
#                       SQLite files (default: deploy/data)
#   DAK_FCM_CREDENTIALS a Google service-account file: push sends real FCM
#                       notifications. Unset: push only logs them.
#   DAK_BIN             run this dak binary instead of building target/release/dak
#   DAK_TANSU_BIN       the tansu binary (default: tansu on PATH or ~/.cargo/bin)
# Every other DAK_ variable in the environment (DAK_TOPIC_PREFIX,
# DAK_ACK_TIMEOUT, RUST_LOG, ...) reaches every service unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

LOGS=deploy/logs
mkdir -p "$LOGS"
DATA=${DAK_DATA_DIR:-deploy/data}
mkdir -p "$DATA"
if [ "$DATA" = deploy/data ] && ! [ -e "$DATA/.gitignore" ]; then
  printf '%s\n' '# SQLite files written by deploy/local-services.sh; all ignored.' '*' >"$DATA/.gitignore"
fi

WS_PUBLIC=127.0.0.1:8080
WS_INTERNAL=127.0.0.1:8081
REST_PUBLIC=127.0.0.1:8082
PERSISTENCE_PUBLIC=127.0.0.1:8083
GROUPS_PUBLIC=127.0.0.1:8084
ADMIN_ROUTER=127.0.0.1:9191
ADMIN_SESSION=127.0.0.1:9192
ADMIN_WS=127.0.0.1:9193
ADMIN_REST=127.0.0.1:9194
ADMIN_PERSISTENCE=127.0.0.1:9195
ADMIN_PUSH=127.0.0.1:9196
ADMIN_GROUPS=127.0.0.1:9197

LOCAL_KAFKA_PORT=9092
LOCAL_REDIS_PORT=6379

# name:pid of every process this script started, in start order.
STARTED=()
REDIS_STARTED=no

log() { printf '%s\n' "$*" >&2; }

listening() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

stop_all() {
  trap - EXIT INT TERM
  if [ ${#STARTED[@]} -gt 0 ]; then
    log ""
    log "stopping"
    # Newest first: gateways before group-router, push, persistence, session
    # and router, the broker last.
    local i entry name pid
    for (( i=${#STARTED[@]}-1; i>=0; i-- )); do
      entry=${STARTED[i]}
      name=${entry%%:*}
      pid=${entry#*:}
      kill -0 "$pid" 2>/dev/null || continue
      log "  $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      if kill -0 "$pid" 2>/dev/null; then
        log "  $name did not stop within 20 s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done
  fi
  if [ "$REDIS_STARTED" = yes ]; then
    log "  redis-server"
    redis-cli -h 127.0.0.1 -p "$LOCAL_REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  fi
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background in a session of its own, so a Ctrl-C in this
# terminal reaches only this script, which then stops the services in order.
spawn() { # name command...
  local name=$1
  shift
  if command -v setsid >/dev/null 2>&1; then
    setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  else
    "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  fi
  STARTED+=("$name:$!")
}

pid_of() { # name
  local entry
  for entry in "${STARTED[@]}"; do
    if [ "${entry%%:*}" = "$1" ]; then
      echo "${entry#*:}"
      return
    fi
  done
}

wait_ready() { # name admin-addr
  local name=$1 admin=$2 pid
  pid=$(pid_of "$name")
  for _ in $(seq 600); do
    if curl -fsS "http://$admin/readyz" >/dev/null 2>&1; then
      log "  $name ready (admin http://$admin)"
      return
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited during start-up; the end of $LOGS/$name.log:"
      tail -n 20 "$LOGS/$name.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  log "$name not ready after 60 s; see $LOGS/$name.log"
  exit 1
}

command -v curl >/dev/null 2>&1 || { log "curl is needed"; exit 1; }

# --- dak ---------------------------------------------------------------------
if [ -n "${DAK_BIN:-}" ]; then
  BIN=$DAK_BIN
else
  log "building dak (cargo build --release -p dak)"
  cargo build --release -p dak
  BIN=target/release/dak
fi
[ -x "$BIN" ] || { log "no dak binary at $BIN"; exit 1; }

# --- Kafka ---------------------------------------------------------------------
if [ -n "${DAK_KAFKA_BROKERS:-}" ]; then
  log "Kafka: $DAK_KAFKA_BROKERS (from DAK_KAFKA_BROKERS)"
else
  export DAK_KAFKA_BROKERS=127.0.0.1:$LOCAL_KAFKA_PORT
  if listening 127.0.0.1 "$LOCAL_KAFKA_PORT"; then
    log "Kafka: something already listens on $DAK_KAFKA_BROKERS, using it"
  else
    TANSU=${DAK_TANSU_BIN:-$(command -v tansu || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")}
    if ! [ -x "$TANSU" ]; then
      log "installing the Tansu broker (cargo install tansu 0.6.0; takes a while, once)"
      cargo install tansu --version 0.6.0 --features dynostore,libsql --locked
      TANSU="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    fi
    log "Kafka: starting Tansu on $DAK_KAFKA_BROKERS (in memory)"
    spawn tansu "$TANSU" broker \
      --listener-url "tcp://127.0.0.1:$LOCAL_KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$LOCAL_KAFKA_PORT" \
      --storage-engine memory://tansu/
    for _ in $(seq 300); do
      listening 127.0.0.1 "$LOCAL_KAFKA_PORT" && break
      kill -0 "$(pid_of tansu)" 2>/dev/null || { tail -n 20 "$LOGS/tansu.log" >&2; exit 1; }
      sleep 0.1
    done
    listening 127.0.0.1 "$LOCAL_KAFKA_PORT" || { log "Tansu did not start; see $LOGS/tansu.log"; exit 1; }
  fi
fi

# --- Redis ---------------------------------------------------------------------
command -v redis-cli >/dev/null 2>&1 || {
  log "redis-cli is needed (Debian/Ubuntu: apt-get install redis-server)"
  exit 1
}
if [ -n "${DAK_REDIS_URL:-}" ]; then
  log "Redis: $DAK_REDIS_URL (from DAK_REDIS_URL)"
  redis-cli -u "$DAK_REDIS_URL" ping >/dev/null || { log "Redis at $DAK_REDIS_URL does not answer"; exit 1; }
else
  export DAK_REDIS_URL=redis://127.0.0.1:$LOCAL_REDIS_PORT
  if redis-cli -h 127.0.0.1 -p "$LOCAL_REDIS_PORT" ping >/dev/null 2>&1; then
    log "Redis: using the server already on 127.0.0.1:$LOCAL_REDIS_PORT"
  else
    command -v redis-server >/dev/null 2>&1 || {
      log "redis-server is needed (Debian/Ubuntu: apt-get install redis-server)"
      exit 1
    }
    log "Redis: starting redis-server on 127.0.0.1:$LOCAL_REDIS_PORT (no persistence)"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$LOCAL_REDIS_PORT" \
      --save '' --appendonly no --logfile "$PWD/$LOGS/redis.log"
    REDIS_STARTED=yes
    for _ in $(seq 50); do
      redis-cli -h 127.0.0.1 -p "$LOCAL_REDIS_PORT" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  fi
fi

# --- shared settings -----------------------------------------------------------
export DAK_JWT_SECRET=${DAK_JWT_SECRET:-dev-secret}
export DAK_INTERNAL_TOKEN=${DAK_INTERNAL_TOKEN:-dev-internal-token}
log "DAK_JWT_SECRET=$DAK_JWT_SECRET"
log "DAK_INTERNAL_TOKEN=$DAK_INTERNAL_TOKEN"

# --- services ------------------------------------------------------------------
# One at a time, so each sees the topics the previous one created.
log "starting the services (logs in $LOGS/)"
spawn message-router env DAK_ADMIN_ADDR=$ADMIN_ROUTER "$BIN" message-router
wait_ready message-router $ADMIN_ROUTER

spawn session env DAK_ADMIN_ADDR=$ADMIN_SESSION "$BIN" session
wait_ready session $ADMIN_SESSION

# Before the gateways: every new socket waits for persistence's replay and
# its sync.done before it gets messages.
spawn persistence env DAK_ADMIN_ADDR=$ADMIN_PERSISTENCE \
  DAK_PUBLIC_ADDR=$PERSISTENCE_PUBLIC DAK_DATA_DIR="$DATA" "$BIN" persistence
wait_ready persistence $ADMIN_PERSISTENCE

if [ -n "${DAK_FCM_CREDENTIALS:-}" ]; then
  PUSH_MODE="FCM ($DAK_FCM_CREDENTIALS)"
  log "push: sending through FCM with $DAK_FCM_CREDENTIALS"
else
  PUSH_MODE="log only ($LOGS/push.log)"
  log "push: DAK_FCM_CREDENTIALS is not set, notifications are only logged ($LOGS/push.log)"
fi
spawn push env DAK_ADMIN_ADDR=$ADMIN_PUSH DAK_DATA_DIR="$DATA" "$BIN" push
wait_ready push $ADMIN_PUSH

spawn group-router env DAK_ADMIN_ADDR=$ADMIN_GROUPS \
  DAK_PUBLIC_ADDR=$GROUPS_PUBLIC DAK_DATA_DIR="$DATA" "$BIN" group-router
wait_ready group-router $ADMIN_GROUPS

spawn ws-gateway env DAK_ADMIN_ADDR=$ADMIN_WS \
  DAK_PUBLIC_ADDR=$WS_PUBLIC DAK_INTERNAL_ADDR=$WS_INTERNAL "$BIN" ws-gateway
wait_ready ws-gateway $ADMIN_WS

spawn rest-gateway env DAK_ADMIN_ADDR=$ADMIN_REST DAK_PUBLIC_ADDR=$REST_PUBLIC "$BIN" rest-gateway
wait_ready rest-gateway $ADMIN_REST

cat >&2 <<EOF

dak is running as seven services:
  ws-gateway      ws://$WS_PUBLIC/v1/ws   (internal http://$WS_INTERNAL)   admin http://$ADMIN_WS
  rest-gateway    http://$REST_PUBLIC: POST /v1/messages, POST /v1/acks,
                  POST /v1/receipts, PUT /v1/devices/{device}/push-token,
                  POST /v1/groups, POST|DELETE /v1/groups/{g}/members...,
                  PUT /v1/groups/{g}/name                                admin http://$ADMIN_REST
  persistence     http://$PERSISTENCE_PUBLIC: GET /v1/messages           admin http://$ADMIN_PERSISTENCE
  group-router    http://$GROUPS_PUBLIC: GET /v1/groups/{g}         admin http://$ADMIN_GROUPS
  push            notifications: $PUSH_MODE
                                                                          admin http://$ADMIN_PUSH
  message-router                                                          admin http://$ADMIN_ROUTER
  session                                                                 admin http://$ADMIN_SESSION

Connect:
  export DAK_JWT_SECRET=$DAK_JWT_SECRET
  ALICE=\$($BIN token --user alice --device phone)
  BOB=\$($BIN token --user bob --device phone)
  websocat -H "Authorization: Bearer \$ALICE" ws://$WS_PUBLIC/v1/ws
  curl -s -X POST http://$REST_PUBLIC/v1/messages -H "Authorization: Bearer \$ALICE" \\
    -d '{"messages":[{"id":"c-1","to":"bob","body":{"text":"hi"}}]}'
  curl -s -H "Authorization: Bearer \$BOB" 'http://$PERSISTENCE_PUBLIC/v1/messages?limit=100'
  curl -s -X POST http://$REST_PUBLIC/v1/groups -H "Authorization: Bearer \$ALICE" \\
    -d '{"id":"team-7","name":"Team 7","members":["bob"]}'
  curl -s -H "Authorization: Bearer \$BOB" http://$GROUPS_PUBLIC/v1/groups/team-7

Data: $DATA/. Logs: $LOGS/. Ctrl-C stops everything this script started.
EOF

# Until Ctrl-C, or until a service dies.
while sleep 1; do
  for entry in "${STARTED[@]}"; do
    if ! kill -0 "${entry#*:}" 2>/dev/null; then
      log "${entry%%:*} exited; the end of $LOGS/${entry%%:*}.log:"
      tail -n 20 "$LOGS/${entry%%:*}.log" >&2 || true
      exit 1
    fi
  done
done
