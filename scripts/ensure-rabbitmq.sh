#!/usr/bin/env bash
# Makes sure a healthy RabbitMQ node answers on this machine: installs Debian's
# rabbitmq-server if it is missing, starts it if it is down, restarts it if it runs with an
# open-files limit too small for the tests, deletes queues interrupted test runs left
# behind (with --delete-stale-queues), then enables the monitoring plugins. Used by scripts/test.sh and scripts/e2e.sh.
#
# Why the limit matters: RabbitMQ budgets file handles from the limit it booted with
# (limit - ~100). At a shell's usual 1024, a few hundred quorum queues use them all up and
# every new AMQP connection hangs in its handshake instead of failing (seen here: a CI run
# that hung until its 90-minute deadline). Debian's wrapper starts the node through `su`,
# which resets the limit, so as root we start it with setpriv, which keeps ours.
set -euo pipefail
clean_stale=
case "${1:-}" in
  -h|--help)
    echo "usage: scripts/ensure-rabbitmq.sh [--delete-stale-queues]   (root on Debian for the install and restart steps)"
    echo "  --delete-stale-queues  delete queues named t-* and e2e-* (left by interrupted test and demo runs;"
    echo "                         scripts/test.sh passes it: do not while other test runs use the node)"
    exit 0 ;;
  --delete-stale-queues) clean_stale=1 ;;
  "") ;;
  *) echo "ensure-rabbitmq: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

WANT_FILES=16384
LIB=/usr/lib/rabbitmq/bin

log() { echo "ensure-rabbitmq: $*"; }
node_pid() { pgrep -f -- '-s rabbit boot' | head -n1; }
ping() { timeout 20 rabbitmqctl -q ping >/dev/null 2>&1; }
open_files_limit() {
  awk '/^Max open files/ {print $4}' "/proc/$1/limits" 2>/dev/null || echo 0
}

start_node() {
  local hard
  hard=$(ulimit -Hn)
  if [ "$hard" != unlimited ] && [ "$hard" -lt "$WANT_FILES" ]; then
    ulimit -Hn "$WANT_FILES" 2>/dev/null || true
  fi
  ulimit -n "$WANT_FILES" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  log "starting RabbitMQ (open files: $(ulimit -n))"
  if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1 && [ -x "$LIB/rabbitmq-server" ] \
      && command -v setpriv >/dev/null; then
    (cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq \
      setpriv --reuid rabbitmq --regid rabbitmq --init-groups "$LIB/rabbitmq-server" -detached)
  else
    rabbitmq-server -detached
  fi
  # await_startup fails at once while the new node is not yet registered with epmd: poll first.
  for _ in $(seq 90); do ping && return 0; sleep 1; done
  log "RabbitMQ did not answer a ping within 90 s"; return 1
}

# Stops the node without trusting the CLI to return: `rabbitmqctl stop` was seen to hang
# on a node that had run out of file handles.
stop_node() {
  local pid=$1
  timeout 30 rabbitmqctl -q shutdown >/dev/null 2>&1 || true
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  log "RabbitMQ (pid $pid) ignored TERM for 30 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 10); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
}

if ! command -v rabbitmq-server >/dev/null; then
  log "installing rabbitmq-server"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server </dev/null
fi

pid=$(node_pid || true)
if [ -n "$pid" ] && [ "$(id -u)" = 0 ]; then
  limit=$(open_files_limit "$pid")
  if [ "$limit" != unlimited ] && [ "${limit:-0}" -lt "$WANT_FILES" ]; then
    log "running node (pid $pid) has an open-files limit of $limit; restarting it with $WANT_FILES"
    stop_node "$pid"
    pid=
  fi
fi
if [ -n "$pid" ] && ping; then
  log "RabbitMQ node already running"
else
  start_node
fi
timeout 120 rabbitmqctl await_startup

# Queues of test runs that were killed before they could clean up (tests name theirs
# "t-<test>-<8 hex>.", the demo "e2e-<time>-<pid>."). Each costs file handles and memory.
stale=
if [ -n "$clean_stale" ]; then
  stale=$(timeout 60 rabbitmqctl -q list_queues name 2>/dev/null | grep -E '^(t|e2e)-' || true)
fi
if [ -n "$stale" ]; then
  log "deleting $(wc -l <<<"$stale") queues left by earlier test runs"
  while read -r q; do
    # </dev/null: rabbitmqctl reads stdin, which would swallow the rest of the list.
    timeout 20 rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true
  done <<<"$stale"
fi
scripts/rabbitmq-setup.sh
