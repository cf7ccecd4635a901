# Helpers for the scripts that start test engines; sourced, not run.

# A TCP port on 127.0.0.1 that nothing listens on, with the next one free too
# (Kafka's controller and Cassandra's storage port take PORT+1).
free_port_pair() {
  local port
  while :; do
    port=$((20000 + RANDOM % 20000))
    if ! listening "$port" && ! listening $((port + 1)); then
      echo "$port"
      return
    fi
  done
}

# Whether something accepts connections on 127.0.0.1:PORT.
listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Waits until PID listens on 127.0.0.1:PORT; fails, showing LOG, when PID dies
# or SECONDS pass.
wait_listening() {
  local name=$1 pid=$2 port=$3 seconds=$4 log=$5
  local deadline=$((SECONDS + seconds))
  until listening "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited before listening on $port; its log:" >&2
      tail -n 40 "$log" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$name not listening on $port after ${seconds}s; its log:" >&2
      tail -n 40 "$log" >&2
      return 1
    fi
    sleep 0.2
  done
}

# Installs redis-server from Debian's packages when it is missing.
ensure_redis_server() {
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (apt-get)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
}

# Installs OpenSSL's headers, pkg-config and the openssl command from Debian's
# packages when they are missing: librdkafka is built against the system's
# OpenSSL (TLS and SASL to Kafka), and the TLS tests make their certificates
# with the command.
ensure_build_deps() {
  if ! pkg-config --exists openssl 2>/dev/null || ! command -v openssl >/dev/null 2>&1; then
    echo "installing libssl-dev, pkg-config and openssl (apt-get)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config openssl >/dev/null
  fi
}

# Installs Debian's chromium and its chromedriver, which the console's browser
# test drives, when either is missing.
ensure_chromium() {
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver (apt-get)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null
  fi
}
