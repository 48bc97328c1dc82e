#!/usr/bin/env bash
# Prepares the local RabbitMQ node for DMR: monitoring plugins, and isolated vhosts for tests.
# Safe to run again and again; CI runs it on every build.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/rabbitmq-setup.sh                      enable rabbitmq_management + rabbitmq_prometheus
       scripts/rabbitmq-setup.sh --vhost NAME         create vhost NAME, give guest full rights on it
       scripts/rabbitmq-setup.sh --delete-vhost NAME  delete vhost NAME (no error if it is absent)
Acts on the node that rabbitmqctl reaches by default (here: rabbit@localhost on 127.0.0.1:5672).
USAGE
}

# The node may still be booting right after start; never let a hung CLI stall CI forever.
ctl() { timeout 60 rabbitmqctl "$@"; }

vhost_exists() { ctl -q list_vhosts name | grep -qxF -- "$1"; }

add_vhost() {
  # add_vhost fails on an existing vhost, so check first to stay idempotent.
  vhost_exists "$1" || ctl add_vhost "$1"
  ctl set_permissions -p "$1" guest ".*" ".*" ".*"
  echo "vhost '$1' ready: amqp://guest:guest@127.0.0.1:5672/$(vhost_path "$1")"
}

delete_vhost() {
  if vhost_exists "$1"; then ctl delete_vhost "$1"; else echo "vhost '$1' not present"; fi
}

# AMQP URLs carry the vhost percent-encoded ('/' -> %2f); enough for the names tests use.
vhost_path() { local v=${1//%/%25}; printf '%s' "${v//\//%2f}"; }

enable_plugins() {
  # Plain 'enable' (not --offline) so a running node starts them now; already-on is a no-op.
  # Monitoring is a convenience, not something the tests need: a failure only warns.
  if ! timeout 120 rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus; then
    echo "WARNING: could not enable rabbitmq_management/rabbitmq_prometheus; continuing" >&2
  fi
  echo "RabbitMQ management UI: http://127.0.0.1:15672/ (guest/guest works from this machine only)"
  echo "RabbitMQ Prometheus:    http://127.0.0.1:15692/metrics"
}

if [ $# -eq 0 ]; then enable_plugins; exit 0; fi
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --vhost) [ $# -ge 2 ] || { usage >&2; exit 2; }; add_vhost "$2"; shift 2 ;;
    --delete-vhost) [ $# -ge 2 ] || { usage >&2; exit 2; }; delete_vhost "$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
