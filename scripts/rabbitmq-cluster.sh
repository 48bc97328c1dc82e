#!/usr/bin/env bash
# A throw-away 3-node RabbitMQ cluster on this machine, for trying dmr-server against a
# cluster (failover, quorum queues across nodes) without touching the default node on 5672.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/rabbitmq-cluster.sh up|down|status|stop-node N|start-node N|urls
  up            start rabbit-dmr1..3@localhost (AMQP 127.0.0.1:5681-5683, management UI
                15681-15683, Prometheus 15791-15793), cluster 2 and 3 with 1, print --amqp-url
  down          stop the three nodes and delete everything they wrote
  status        show which nodes run and the cluster membership
  stop-node N   stop the RabbitMQ application on node N (1-3): its clients are disconnected,
                its quorum queue replicas go away, the others elect new leaders
  start-node N  start it again and wait until it has booted (bounded: 120 s)
  urls          print the comma-separated --amqp-url of the three nodes (one line)
State lives in $DMR_RABBIT_CLUSTER_DIR (default /tmp/dmr-rabbit-cluster).
USAGE
}

DIR=${DMR_RABBIT_CLUSTER_DIR:-/tmp/dmr-rabbit-cluster}
NODES=(1 2 3)
node() { echo "rabbit-dmr$1@localhost"; }

# shellcheck source=scripts/rabbitmq-node-lib.sh
. "$(dirname "$0")/rabbitmq-node-lib.sh"

ctl() { local n=$1; shift; as_rabbit timeout 120 "$BIN/rabbitmqctl" -q -n "$(node "$n")" "$@"; }
running() { ctl "$1" ping >/dev/null 2>&1; }
# ping answers as soon as the Erlang VM is up; this one needs the rabbit app itself.
app_running() { as_rabbit timeout 60 "$BIN/rabbitmq-diagnostics" -q -n "$(node "$1")" check_running >/dev/null 2>&1; }

start_node() {
  local i=$1 d="$DIR/n$1"
  mkdir -p "$d/mnesia" "$d/log"
  # Our own config file, not /etc/rabbitmq/rabbitmq.conf: that one pins the listener to 5672
  # (and an empty conf.d of our own, so the system's /etc/rabbitmq/conf.d stays out too).
  cat >"$d/rabbitmq.conf" <<CONF
listeners.tcp.local = 127.0.0.1:568$i
management.tcp.ip = 127.0.0.1
management.tcp.port = 1568$i
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = 1579$i
CONF
  echo '[rabbitmq_management,rabbitmq_prometheus].' >"$d/enabled_plugins"
  [ -z "$RUN_USER" ] || chown -R "$RUN_USER:" "$d"
  as_rabbit env \
    RABBITMQ_NODENAME="$(node "$i")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="568$i" \
    RABBITMQ_DIST_PORT="2568$i" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_CONFIG_FILES="$d/conf.d" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_PID_FILE="$d/pid" \
    ERL_CRASH_DUMP="$d/log/erl_crash.dump" \
    "$BIN/rabbitmq-server" -detached
}

wait_booted() {
  # -detached returns before the node has registered with epmd, and await_startup fails at
  # once on a node that epmd does not know yet: poll until it answers, then await the boot.
  local i=$1
  for _ in $(seq 60); do running "$i" && break; sleep 1; done
  ctl "$i" await_startup || { echo "$(node "$i") did not start; see $DIR/n$i/log" >&2; exit 1; }
}

up() {
  if running 1; then echo "cluster already up"; status; urls; return; fi
  for i in "${NODES[@]}"; do
    for p in "568$i" "2568$i" "1568$i" "1579$i"; do
      if port_in_use "$p"; then echo "port $p is taken; run '$0 down' or free it" >&2; exit 1; fi
    done
  done
  rm -rf "$DIR"; mkdir -p "$DIR"
  for i in "${NODES[@]}"; do echo "starting $(node "$i")"; start_node "$i"; done
  for i in "${NODES[@]}"; do wait_booted "$i"; done
  # A node must be stopped (app only) and empty to join; these are fresh, so no reset needed.
  for i in "${NODES[@]:1}"; do
    echo "joining $(node "$i") to $(node 1)"
    ctl "$i" stop_app
    # join_cluster logs harmless "tracked connection table" errors on 3.10; keep them out of
    # sight unless the join really fails.
    if ! ctl "$i" join_cluster "$(node 1)" >"$DIR/n$i/join.log" 2>&1; then
      cat "$DIR/n$i/join.log" >&2; exit 1
    fi
    ctl "$i" start_app
  done
  status
  urls
}

url_list() {
  local list="" i
  for i in "${NODES[@]}"; do list+="${list:+,}amqp://guest:guest@127.0.0.1:568$i/%2f"; done
  echo "$list"
}

urls() {
  echo "dmr-server run --amqp-url '$(url_list)'"
  echo "management UI: http://127.0.0.1:15681/ (also 15682, 15683), guest/guest"
}

status() {
  local i
  for i in "${NODES[@]}"; do
    if app_running "$i"; then echo "$(node "$i"): running"
    elif running "$i"; then echo "$(node "$i"): VM up, rabbit app stopped"
    else echo "$(node "$i"): down"; fi
  done
  for i in "${NODES[@]}"; do
    if app_running "$i"; then ctl "$i" cluster_status --formatter json |
      sed -n 's/.*"running_nodes":\(\[[^]]*\]\).*/running_nodes (seen from '"$(node "$i")"'): \1/p'; return 0; fi
  done
}

down() {
  local i pid
  for i in "${NODES[@]}"; do
    pid=$(cat "$DIR/n$i/pid" 2>/dev/null || true)
    if running "$i"; then echo "stopping $(node "$i")"; ctl "$i" stop || true; fi
    # If the node outlives its stop (or the CLI could not reach it), end the process this
    # script started, by the pid it recorded.
    if [ -n "$pid" ]; then
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "$(node "$i") still running after stop; killing pid $pid"
        kill "$pid"; sleep 3; kill -9 "$pid" 2>/dev/null || true
      fi
    fi
  done
  rm -rf "$DIR"
  echo "cluster down, $DIR removed"
}

node_arg() {
  case "${1:-}" in
    1|2|3) ;;
    *) echo "expected a node number 1, 2 or 3; got '${1:-}'" >&2; exit 2 ;;
  esac
}

stop_node() {
  node_arg "$1"
  running "$1" || { echo "$(node "$1") is not running" >&2; exit 1; }
  echo "stopping the rabbit app on $(node "$1")"
  ctl "$1" stop_app
}

start_node_app() {
  node_arg "$1"
  running "$1" || { echo "$(node "$1") is not running (its VM is down): run '$0 up'" >&2; exit 1; }
  echo "starting the rabbit app on $(node "$1")"
  ctl "$1" start_app
  ctl "$1" await_startup
}

case "${1:-}" in
  up) up ;;
  stop-node) stop_node "${2:-}" ;;
  start-node) start_node_app "${2:-}" ;;
  urls) url_list ;;
  down) down ;;
  status) status ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
