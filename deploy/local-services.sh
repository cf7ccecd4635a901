#!/usr/bin/env bash
# Runs dak's seven services as separate processes on this machine, the way a
# distributed deployment runs them, with what they need around them:
#   - Apache Kafka 4.1 (one KRaft node) on 127.0.0.1:9092, data in $DATA/kafka;
#   - Apache Cassandra 5.0 (CQL) on 127.0.0.1:9042, data in $DATA/cassandra,
#     holding the inbox, the push tokens and the groups;
#   - Redis on 127.0.0.1:6379 with AOF persistence in $DATA/redis;
#   - nginx on one public address (DAK_PUBLIC_ADDR, default 127.0.0.1:8080)
#     in front of the services, which listen on loopback ports of their own.
# Kafka and Cassandra run from jars that scripts/engines/fetch resolves from
# Maven Central once. $DATA is deploy/data unless DAK_DATA_DIR says otherwise;
# it is kept across runs. Ctrl-C (or SIGTERM) stops everything this script
# started. See deploy/README.md.
#
# Script settings (all optional):
#   DAK_PUBLIC_ADDR     where nginx serves the whole client API (default 127.0.0.1:8080)
#   DAK_KAFKA_BROKERS   use this Kafka; start none
#   DAK_KAFKA_PARTITIONS partitions of each topic dak creates (default 3 on
#                       the Kafka this script starts, dak's 12 on another)
#   DAK_SCYLLA_NODES    use this ScyllaDB/Cassandra cluster (CQL); start none
#   DAK_STORES          cql (default) or sqlite: sqlite keeps the inbox, push
#                       tokens and groups in SQLite files under $DATA, and
#                       starts no Cassandra
#   DAK_REDIS_URL       use this Redis; start none
#   DAK_JWT_SECRET      client token secret (default: dev-secret)
#   DAK_INTERNAL_TOKEN  token of the gateways' internal API, used by session and
#                       persistence (default: dev-internal-token)
#   DAK_DATA_DIR        where Kafka, Cassandra, Redis (and the SQLite files)
#                       keep their data (default: deploy/data)
#   DAK_FCM_CREDENTIALS a Google service-account file: push sends real FCM
#                       notifications. Unset: push only logs them.
#   DAK_BIN             run this dak binary instead of building target/release/dak
#   DAK_NGINX_BIN       the nginx binary (default: nginx on PATH, or /usr/sbin/nginx)
#   DAK_ENGINES_DIR     the jar cache of scripts/engines/fetch (default /var/tmp/dak-engines)
# Every other DAK_ variable in the environment (DAK_TOPIC_PREFIX,
# DAK_ACK_TIMEOUT, DAK_SCYLLA_KEYSPACE, RUST_LOG, ...) reaches every service
# unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# listening PORT, wait_listening NAME PID PORT SECONDS LOG, ensure_redis_server
source scripts/engines/lib.sh

LOGS=$ROOT/deploy/logs
mkdir -p "$LOGS"
DATA=${DAK_DATA_DIR:-deploy/data}
mkdir -p "$DATA"
DATA=$(cd "$DATA" && pwd)
if [ "$DATA" = "$ROOT/deploy/data" ] && ! [ -e "$DATA/.gitignore" ]; then
  printf '%s\n' '# Data written by deploy/local-services.sh; all ignored.' '*' >"$DATA/.gitignore"
fi

STORES=${DAK_STORES:-cql}
case "$STORES" in
  cql | sqlite) ;;
  *) echo "DAK_STORES must be cql or sqlite, not '$STORES'" >&2; exit 64 ;;
esac
if [ "$STORES" = sqlite ] && [ -n "${DAK_SCYLLA_NODES:-}" ]; then
  echo "DAK_STORES=sqlite and DAK_SCYLLA_NODES are both set; unset one" >&2
  exit 64
fi

# The address clients use. The services' own addresses are set per service
# below, so none of these may reach them from the environment.
PUBLIC=${DAK_PUBLIC_ADDR:-127.0.0.1:8080}
unset DAK_PUBLIC_ADDR DAK_ADMIN_ADDR DAK_INTERNAL_ADDR DAK_INTERNAL_URL
if ! [[ "$PUBLIC" =~ ^(.+):([0-9]+)$ ]]; then
  echo "DAK_PUBLIC_ADDR must be host:port, not '$PUBLIC'" >&2
  exit 64
fi
# Where a client on this machine reaches it.
case "${BASH_REMATCH[1]}" in
  0.0.0.0) CLIENT=127.0.0.1:${BASH_REMATCH[2]} ;;
  '[::]') CLIENT=[::1]:${BASH_REMATCH[2]} ;;
  *) CLIENT=$PUBLIC ;;
esac

# Behind nginx, on loopback only.
WS_PUBLIC=127.0.0.1:18080
WS_INTERNAL=127.0.0.1:18081
REST_PUBLIC=127.0.0.1:18082
PERSISTENCE_PUBLIC=127.0.0.1:18083
GROUPS_PUBLIC=127.0.0.1:18084
ADMIN_ROUTER=127.0.0.1:9191
ADMIN_SESSION=127.0.0.1:9192
ADMIN_WS=127.0.0.1:9193
ADMIN_REST=127.0.0.1:9194
ADMIN_PERSISTENCE=127.0.0.1:9195
ADMIN_PUSH=127.0.0.1:9196
ADMIN_GROUPS=127.0.0.1:9197

LOCAL_KAFKA_PORT=9092     # controller on 9093
LOCAL_CQL_PORT=9042       # storage port 9043, JMX 9044
LOCAL_REDIS_PORT=6379

# name:pid of every process this script started, in start order: Redis,
# Kafka, Cassandra, nginx, then the services.
STARTED=()

# Never fails: with the terminal gone, stopping must still go on.
log() { printf '%s\n' "$*" >&2 2>/dev/null || true; }

stop_all() {
  trap - EXIT INT TERM
  trap '' HUP PIPE
  if [ ${#STARTED[@]} -gt 0 ]; then
    log ""
    log "stopping"
    # Newest first: the gateways (which close their sockets with 1001 through
    # nginx), group-router, push, persistence, session and message-router;
    # then nginx, Cassandra, Kafka and Redis.
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
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The terminal closed, or the output went away: stop everything too.
trap 'exit 129' HUP
trap 'exit 141' PIPE

# Starts "$@" in the background in a session of its own, so a Ctrl-C in this
# terminal reaches only this script, which then stops everything in order.
# Its stdout and stderr go to deploy/logs/NAME.log.
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

# Waits until NAME, started by spawn, listens on 127.0.0.1:PORT. On failure it
# shows the end of the process's own log and of deploy/logs/NAME.log.
wait_port() { # name port seconds own-log
  local name=$1 port=$2 seconds=$3 own=$4
  if ! wait_listening "$name" "$(pid_of "$name")" "$port" "$seconds" "$own"; then
    log "the end of $LOGS/$name.log:"
    tail -n 20 "$LOGS/$name.log" >&2 || true
    exit 1
  fi
}

wait_ready() { # name admin-addr
  local name=$1 admin=$2 pid
  pid=$(pid_of "$name")
  for _ in $(seq 1200); do
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
  log "$name not ready after 120 s; see $LOGS/$name.log"
  exit 1
}

# Installs a Debian package with apt-get when running as root; otherwise says
# what to install.
apt_install() { # package
  if [ "$(id -u)" != 0 ]; then
    log "$1 is missing: install it (Debian/Ubuntu: sudo apt-get install $1) and run again"
    exit 1
  fi
  log "installing $1 (apt-get)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

need_java() {
  command -v java >/dev/null 2>&1 && return
  log "Kafka and Cassandra need Java 17 (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)."
  log "Or point DAK_KAFKA_BROKERS / DAK_SCYLLA_NODES at running servers, or set DAK_STORES=sqlite."
  exit 1
}

fetch_engine() { # kafka|cassandra
  if ! scripts/engines/fetch "$1" >/dev/null; then
    log "resolving $1's jars failed: scripts/engines/fetch needs Maven (mvn) and access to Maven Central"
    exit 1
  fi
}

command -v curl >/dev/null 2>&1 || { log "curl is needed"; exit 1; }

# --- dak ---------------------------------------------------------------------
if [ -n "${DAK_BIN:-}" ]; then
  BIN=$DAK_BIN
else
  # librdkafka is built against the system's OpenSSL.
  pkg-config --exists openssl 2>/dev/null || { apt_install pkg-config; apt_install libssl-dev; }
  log "building dak (cargo build --release -p dak)"
  cargo build --release -p dak
  BIN=target/release/dak
fi
[ -x "$BIN" ] || { log "no dak binary at $BIN"; exit 1; }

# --- nginx (checked early: installing it is quicker than finding out late) ----
NGINX=${DAK_NGINX_BIN:-$(command -v nginx || true)}
if [ -z "$NGINX" ] && [ -x /usr/sbin/nginx ]; then
  NGINX=/usr/sbin/nginx
fi
if [ -z "$NGINX" ]; then
  apt_install nginx
  NGINX=/usr/sbin/nginx
fi

# --- Redis ---------------------------------------------------------------------
if [ -n "${DAK_REDIS_URL:-}" ]; then
  log "Redis: $DAK_REDIS_URL (from DAK_REDIS_URL)"
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -u "$DAK_REDIS_URL" ping >/dev/null || { log "Redis at $DAK_REDIS_URL does not answer"; exit 1; }
  fi
else
  export DAK_REDIS_URL=redis://127.0.0.1:$LOCAL_REDIS_PORT
  if listening "$LOCAL_REDIS_PORT"; then
    if command -v redis-cli >/dev/null 2>&1 &&
      ! redis-cli -h 127.0.0.1 -p "$LOCAL_REDIS_PORT" ping >/dev/null 2>&1; then
      log "something listens on 127.0.0.1:$LOCAL_REDIS_PORT but does not answer PING; stop it or set DAK_REDIS_URL"
      exit 1
    fi
    log "Redis: using the server already on 127.0.0.1:$LOCAL_REDIS_PORT"
  else
    if ! command -v redis-server >/dev/null 2>&1; then
      if [ "$(id -u)" = 0 ]; then
        ensure_redis_server
      else
        apt_install redis-server # not root: says what to install, and exits
      fi
    fi
    mkdir -p "$DATA/redis"
    log "Redis: starting redis-server on 127.0.0.1:$LOCAL_REDIS_PORT (AOF in $DATA/redis)"
    spawn redis redis-server --bind 127.0.0.1 --port "$LOCAL_REDIS_PORT" \
      --dir "$DATA/redis" --appendonly yes --save '' \
      --maxmemory-policy noeviction --logfile ''
    wait_port redis "$LOCAL_REDIS_PORT" 30 "$LOGS/redis.log"
  fi
fi

# --- Kafka ---------------------------------------------------------------------
KAFKA_STARTED=no
if [ -n "${DAK_KAFKA_BROKERS:-}" ]; then
  log "Kafka: $DAK_KAFKA_BROKERS (from DAK_KAFKA_BROKERS)"
else
  export DAK_KAFKA_BROKERS=127.0.0.1:$LOCAL_KAFKA_PORT
  # One broker and one instance of each service: 3 partitions per topic make
  # bigger batches than dak's default of 12, and cost the broker less per
  # message (docs/performance.md). dak sets the count only when it creates a
  # topic: set DAK_KAFKA_PARTITIONS before the first start to run more
  # instances of a service.
  export DAK_KAFKA_PARTITIONS=${DAK_KAFKA_PARTITIONS:-3}
  if listening "$LOCAL_KAFKA_PORT"; then
    log "Kafka: something already listens on $DAK_KAFKA_BROKERS, using it"
  else
    need_java
    fetch_engine kafka
    log "Kafka: starting Apache Kafka on $DAK_KAFKA_BROKERS (controller on $((LOCAL_KAFKA_PORT + 1)), data in $DATA/kafka)"
    spawn kafka scripts/engines/kafka "$DATA/kafka" "$LOCAL_KAFKA_PORT"
    KAFKA_STARTED=yes
  fi
fi

# --- Cassandra (CQL) -------------------------------------------------------------
CASSANDRA_STARTED=no
if [ "$STORES" = sqlite ]; then
  log "stores: SQLite files in $DATA (DAK_STORES=sqlite)"
elif [ -n "${DAK_SCYLLA_NODES:-}" ]; then
  log "stores: CQL at $DAK_SCYLLA_NODES (from DAK_SCYLLA_NODES)"
else
  export DAK_SCYLLA_NODES=127.0.0.1:$LOCAL_CQL_PORT
  if listening "$LOCAL_CQL_PORT"; then
    log "stores: something already listens on $DAK_SCYLLA_NODES, using it as CQL"
  else
    need_java
    fetch_engine cassandra
    log "stores: starting Apache Cassandra, CQL on $DAK_SCYLLA_NODES (data in $DATA/cassandra)"
    spawn cassandra scripts/engines/cassandra "$DATA/cassandra" "$LOCAL_CQL_PORT"
    CASSANDRA_STARTED=yes
  fi
fi

# Both start at once; Kafka takes some 10 s, Cassandra longer.
if [ "$KAFKA_STARTED" = yes ]; then
  wait_port kafka "$LOCAL_KAFKA_PORT" 120 "$DATA/kafka/log/server.log"
  log "  Kafka listening"
fi
if [ "$CASSANDRA_STARTED" = yes ]; then
  wait_port cassandra "$LOCAL_CQL_PORT" 180 "$DATA/cassandra/log/system.log"
  log "  Cassandra listening"
fi

# --- nginx -----------------------------------------------------------------------
# Started before the services: until they are ready it answers 503. Stopped
# after them, so the gateways' close frames reach the clients.
RUN=$LOGS/nginx
rm -rf "$RUN"
mkdir -p "$RUN"
if [ "$(id -u)" = 0 ]; then
  # nginx's default worker user is nobody:nobody, and Debian has no group
  # nobody. The workers write nothing to disk but the logs, which the master
  # opens.
  USER_LINE="user nobody $(id -gn nobody);"
else
  USER_LINE="# not root: the workers run as $(id -un)"
fi
MAX_BODY=$(( 100 * ${DAK_MAX_FRAME_BYTES:-98304} + 4096 + 1048576 ))
# Every socket is a file: raise this script's open-file limit (which nginx and
# the services inherit) as far as allowed, and size nginx's connections by it.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 4096 ]; then
  WORKER_CONNECTIONS=4096
else
  WORKER_CONNECTIONS=$NOFILE
fi
conf=$(<deploy/nginx.conf)
conf=${conf//@USER_LINE@/"$USER_LINE"}
conf=${conf//@RUN_DIR@/"$RUN"}
conf=${conf//@ERROR_LOG@/"$LOGS/nginx-error.log"}
conf=${conf//@ACCESS_LOG@/"$LOGS/nginx-access.log"}
conf=${conf//@MAX_BODY@/"$MAX_BODY"}
conf=${conf//@WORKER_CONNECTIONS@/"$WORKER_CONNECTIONS"}
conf=${conf//@LISTEN@/"$PUBLIC"}
conf=${conf//@WS_ADDR@/"$WS_PUBLIC"}
conf=${conf//@REST_ADDR@/"$REST_PUBLIC"}
conf=${conf//@PERSISTENCE_ADDR@/"$PERSISTENCE_PUBLIC"}
conf=${conf//@GROUPS_ADDR@/"$GROUPS_PUBLIC"}
printf '%s\n' "$conf" >"$RUN/nginx.conf"
NGINX_ARGS=(-p "$RUN/" -c "$RUN/nginx.conf" -e "$LOGS/nginx-error.log")
: >"$LOGS/nginx-error.log"
: >"$LOGS/nginx-access.log"
"$NGINX" -t -q "${NGINX_ARGS[@]}" || { log "nginx refused $RUN/nginx.conf"; exit 1; }
client_host=${CLIENT%:*}
client_host=${client_host#[}
client_host=${client_host%]}
if (exec 3<>"/dev/tcp/$client_host/${CLIENT##*:}") 2>/dev/null; then
  log "something already listens on $CLIENT; stop it or set DAK_PUBLIC_ADDR"
  exit 1
fi
log "nginx: serving the client API on http://$PUBLIC"
spawn nginx "$NGINX" "${NGINX_ARGS[@]}" -g 'daemon off;'
# Ready once its own JSON 404 comes back.
nginx_answers() {
  curl -s --max-time 2 "http://$CLIENT/" 2>/dev/null | grep -q '"not_found"'
}
for _ in $(seq 100); do
  nginx_answers && break
  if ! kill -0 "$(pid_of nginx)" 2>/dev/null; then
    log "nginx exited during start-up:"
    tail -n 20 "$LOGS/nginx.log" "$LOGS/nginx-error.log" >&2 || true
    exit 1
  fi
  sleep 0.1
done
nginx_answers || {
  log "nginx does not answer on http://$CLIENT/; see $LOGS/nginx-error.log"
  exit 1
}

# --- shared settings -----------------------------------------------------------
export DAK_JWT_SECRET=${DAK_JWT_SECRET:-dev-secret}
export DAK_INTERNAL_TOKEN=${DAK_INTERNAL_TOKEN:-dev-internal-token}
log "DAK_JWT_SECRET=$DAK_JWT_SECRET"
log "DAK_INTERNAL_TOKEN=$DAK_INTERNAL_TOKEN"

# --- services ------------------------------------------------------------------
# One at a time, so each sees the topics (and the keyspace) the previous one
# created.
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

if [ "$STORES" = sqlite ]; then
  STORES_TEXT="SQLite files in $DATA"
else
  STORES_TEXT="CQL at $DAK_SCYLLA_NODES, keyspace ${DAK_SCYLLA_KEYSPACE:-dak}"
fi
origin() { # yes|no
  if [ "$1" = yes ]; then echo "started here"; else echo "not started here"; fi
}

cat >&2 <<EOF

dak is ready on http://$CLIENT (nginx, listening on $PUBLIC)
  ws://$CLIENT/v1/ws
  http://$CLIENT/v1/messages (GET: inbox sync; POST: send), /v1/acks,
  /v1/receipts, /v1/devices/{device}/push-token, /v1/groups...

admin (/livez /readyz /metrics), one per service:
  message-router  http://$ADMIN_ROUTER
  session         http://$ADMIN_SESSION
  persistence     http://$ADMIN_PERSISTENCE
  push            http://$ADMIN_PUSH     notifications: $PUSH_MODE
  group-router    http://$ADMIN_GROUPS
  ws-gateway      http://$ADMIN_WS
  rest-gateway    http://$ADMIN_REST

behind nginx, on loopback: ws-gateway $WS_PUBLIC (internal API $WS_INTERNAL),
rest-gateway $REST_PUBLIC, persistence $PERSISTENCE_PUBLIC, group-router $GROUPS_PUBLIC

Kafka: $DAK_KAFKA_BROKERS ($(origin $KAFKA_STARTED))
stores: $STORES_TEXT$([ "$STORES" = cql ] && echo " ($(origin $CASSANDRA_STARTED))")
Redis: $DAK_REDIS_URL
data: $DATA/   logs: $LOGS/

Connect:
  export DAK_JWT_SECRET=$DAK_JWT_SECRET
  ALICE=\$($BIN token --user alice --device phone)
  BOB=\$($BIN token --user bob --device phone)
  websocat -H "Authorization: Bearer \$BOB" ws://$CLIENT/v1/ws
  curl -s -X POST http://$CLIENT/v1/messages -H "Authorization: Bearer \$ALICE" \\
    -d '{"messages":[{"id":"c-1","to":"bob","body":{"text":"hi"}}]}'
  curl -s -H "Authorization: Bearer \$BOB" 'http://$CLIENT/v1/messages?limit=100'

Ctrl-C stops everything this script started.
EOF

# Until Ctrl-C or SIGTERM, or until a process it started dies.
while sleep 1; do
  for entry in "${STARTED[@]}"; do
    if ! kill -0 "${entry#*:}" 2>/dev/null; then
      log "${entry%%:*} exited; the end of $LOGS/${entry%%:*}.log:"
      tail -n 20 "$LOGS/${entry%%:*}.log" >&2 || true
      exit 1
    fi
  done
done
