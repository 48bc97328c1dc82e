#!/usr/bin/env bash
# A throw-away RabbitMQ node on this machine that speaks only AMQPS (AMQP over TLS), with a
# test CA and server certificate made here by openssl: for trying `dmr-server run` against
# an `amqps://` URL with --amqp-ca-file. Never touches the system node on 5672.
set -euo pipefail

DIR=${DMR_RABBIT_TLS_DIR:-/tmp/dmr-rabbit-tls}
PORT=${DMR_RABBIT_TLS_PORT:-56710}
# The Erlang distribution port (rabbitmqctl talks to the node through it). RabbitMQ's default
# (AMQP port + 20000) would not fit in 16 bits for a port like 56710.
DIST_PORT=${DMR_RABBIT_TLS_DIST_PORT:-25670}
NODE=rabbit-dmr-tls@localhost
CERTS=$DIR/certs

usage() {
  cat <<USAGE
usage: scripts/rabbitmq-tls-node.sh start|stop|status
  start   start $NODE with an AMQPS listener on 127.0.0.1:$PORT only (no plain
          AMQP, no plugins); makes a test CA and a server certificate for localhost and
          127.0.0.1 on first start; prints how to connect (below). Already running: prints
          the same again.
  stop    stop the node and delete everything it wrote (certificates included)
  status  say whether the node runs, and print how to connect when it does

What start and status print last, one KEY=VALUE a line, for scripts and tests:
  DMR_TLS_NODE_URL=amqps://guest:guest@127.0.0.1:$PORT/%2f
  DMR_TLS_NODE_CA=$CERTS/ca.pem           (pass as dmr-server run --amqp-ca-file)
  DMR_TLS_NODE_PORT=$PORT
  DMR_TLS_NODE_NAME=$NODE          (rabbitmqctl -n $NODE ...)
The certificate's names are localhost and 127.0.0.1; guest/guest works (loopback only).

Environment: DMR_RABBIT_TLS_DIR (state, default /tmp/dmr-rabbit-tls),
DMR_RABBIT_TLS_PORT (default 56710), DMR_RABBIT_TLS_DIST_PORT (default 25670).
Waits are bounded: start gives up after about 5 minutes, stop after about 2.
USAGE
}

# shellcheck source=scripts/rabbitmq-node-lib.sh
. "$(dirname "$0")/rabbitmq-node-lib.sh"

ctl() { as_rabbit timeout 60 "$BIN/rabbitmqctl" -q -n "$NODE" "$@"; }
# A short timeout: start polls this until the node answers.
running() { as_rabbit timeout 10 "$BIN/rabbitmqctl" -q -n "$NODE" ping >/dev/null 2>&1; }

make_certs() {
  [ -s "$CERTS/ca.pem" ] && [ -s "$CERTS/server.pem" ] && [ -s "$CERTS/server.key" ] && return 0
  command -v openssl >/dev/null || { echo "openssl is needed: apt-get install openssl" >&2; exit 1; }
  mkdir -p "$CERTS"
  local log=$CERTS/openssl.log
  {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
      -subj "/CN=DMR test CA" -keyout "$CERTS/ca.key" -out "$CERTS/ca.pem" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -subj "/CN=localhost" -keyout "$CERTS/server.key" -out "$CERTS/server.csr"
    printf '%s\n' 'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' \
      'subjectAltName=DNS:localhost,IP:127.0.0.1' >"$CERTS/server.ext"
    openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca.key" \
      -CAcreateserial -days 30 -extfile "$CERTS/server.ext" -out "$CERTS/server.pem"
  } >"$log" 2>&1 || { cat "$log" >&2; echo "could not make the test certificates" >&2; exit 1; }
  # The CA's key is only needed to sign the server certificate.
  rm -f "$CERTS/ca.key" "$CERTS/server.csr" "$CERTS/ca.srl"
}

write_config() {
  mkdir -p "$DIR/mnesia" "$DIR/log"
  # Our own config file, not /etc/rabbitmq/rabbitmq.conf (which pins a listener to 5672), and
  # no plugins (the system's enabled_plugins would claim port 15672).
  cat >"$DIR/rabbitmq.conf" <<CONF
listeners.tcp = none
listeners.ssl.local = 127.0.0.1:$PORT
ssl_options.cacertfile = $CERTS/ca.pem
ssl_options.certfile = $CERTS/server.pem
ssl_options.keyfile = $CERTS/server.key
# Clients authenticate with a password, not a certificate.
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
CONF
  echo '[].' >"$DIR/enabled_plugins"
  [ -z "$RUN_USER" ] || chown -R "$RUN_USER:" "$DIR"
  # The CA certificate must be readable by whoever runs the client; the key file is 0600.
  chmod 755 "$DIR" "$CERTS"
}

info() {
  echo "AMQPS on 127.0.0.1:$PORT, test CA in $CERTS/ca.pem"
  echo "dmr-server run --amqp-url 'amqps://guest:guest@127.0.0.1:$PORT/%2f' --amqp-ca-file $CERTS/ca.pem"
  echo "DMR_TLS_NODE_URL=amqps://guest:guest@127.0.0.1:$PORT/%2f"
  echo "DMR_TLS_NODE_CA=$CERTS/ca.pem"
  echo "DMR_TLS_NODE_PORT=$PORT"
  echo "DMR_TLS_NODE_NAME=$NODE"
}

start() {
  if running; then echo "$NODE already running"; info; return 0; fi
  for p in "$PORT" "$DIST_PORT"; do
    if port_in_use "$p"; then echo "port $p is taken; run '$0 stop' or free it" >&2; exit 1; fi
  done
  rm -rf "$DIR/mnesia" "$DIR/log"
  make_certs
  write_config
  echo "starting $NODE"
  as_rabbit env \
    RABBITMQ_NODENAME="$NODE" \
    RABBITMQ_DIST_PORT="$DIST_PORT" \
    RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf" \
    RABBITMQ_CONFIG_FILES="$DIR/conf.d" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$DIR/mnesia" \
    RABBITMQ_LOG_BASE="$DIR/log" \
    RABBITMQ_PID_FILE="$DIR/pid" \
    ERL_CRASH_DUMP="$DIR/log/erl_crash.dump" \
    "$BIN/rabbitmq-server" -detached
  # -detached returns before the node has registered with epmd, and await_startup fails at
  # once on a node epmd does not know yet: poll until it answers, then await the boot.
  local deadline=$((SECONDS + 60))
  while ! running && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
  if ! as_rabbit timeout 120 "$BIN/rabbitmqctl" -q -n "$NODE" await_startup; then
    echo "$NODE did not start; see $DIR/log" >&2; exit 1
  fi
  # A loaded machine (the test suite on two cores) has been seen to take over 30 s here.
  for _ in $(seq 90); do port_in_use "$PORT" && break; sleep 1; done
  if ! port_in_use "$PORT"; then
    echo "$NODE runs but nothing listens on $PORT; the end of its log ($DIR/log):" >&2
    tail -n 40 "$DIR"/log/*.log >&2 2>/dev/null || true
    exit 1
  fi
  info
}

stop() {
  local pid
  pid=$(cat "$DIR/pid" 2>/dev/null || true)
  if running; then echo "stopping $NODE"; ctl stop || true; fi
  # If the node outlives its stop (or the CLI could not reach it), end the process this script
  # started, by the pid it recorded.
  if [ -n "$pid" ]; then
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$NODE still running after stop; killing pid $pid"
      kill "$pid"; sleep 3; kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -rf "$DIR"
  echo "$NODE stopped, $DIR removed"
}

status() {
  if running; then echo "$NODE: running"; info; else echo "$NODE: down"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
