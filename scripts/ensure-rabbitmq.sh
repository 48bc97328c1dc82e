#!/usr/bin/env bash
# Makes sure a RabbitMQ node answers on this machine: reuses a running one, installs
# Debian's rabbitmq-server if it is missing, starts it if it is down, then enables the
# monitoring plugins. Used by .ci/run and scripts/e2e.sh.
set -euo pipefail
case "${1:-}" in -h|--help) echo "usage: scripts/ensure-rabbitmq.sh   (root on Debian for the install step)"; exit 0 ;; esac
cd "$(dirname "$0")/.."
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

if ! command -v rabbitmq-server >/dev/null; then
  echo "installing rabbitmq-server"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server </dev/null
fi
# ping, not status: status was seen to crash in the CLI (disk-free NaN) on a healthy node.
if timeout 20 rabbitmqctl -q ping >/dev/null 2>&1; then
  echo "RabbitMQ node already running"
else
  echo "starting RabbitMQ"
  # RabbitMQ budgets file handles from the open-files limit it boots with (limit - ~100).
  # At a shell's usual 1024, ~300 quorum queues use it all up and every new AMQP connection
  # hangs (seen with the benchmark's 300 agents). Debian's systemd unit raises the limit
  # too; here nothing else would.
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  rabbitmq-server -detached
  # await_startup fails at once while the new node is not yet registered with epmd: poll first.
  for _ in $(seq 60); do timeout 20 rabbitmqctl -q ping >/dev/null 2>&1 && break; sleep 1; done
fi
timeout 120 rabbitmqctl await_startup
scripts/rabbitmq-setup.sh
