#!/usr/bin/env bash
# The fault suite (tests/faults.rs) on its own, output shown, for a longer run than CI's:
# two servers, two agents, a stream of numbered messages, and one fault at a time — server
# SIGKILL, RabbitMQ stop_app/start_app, agent SIGKILL, webhook 500s, network cuts, SIGSTOP.
# Ends with the report table ($CARGO_TARGET_DIR or target/, fault-report.txt): per fault,
# sent / accepted / retried / delivered / duplicated / dead-lettered / left in queue.
# `cluster-node` runs the cluster case instead: one node of a local 3-node cluster stopped and
# started again under a stream of messages.
set -euo pipefail

case "${1:-}" in
  -h|--help)
    cat <<'USAGE'
usage: scripts/chaos.sh               run the fault suite and print the fault report
       scripts/chaos.sh cluster-node  run the cluster-node case against a throw-away 3-node
                                      cluster (scripts/rabbitmq-cluster.sh up ... down)

Environment:
  DMR_FAULT_MESSAGES=N   least number of messages sent per fault (default 40, CI's size);
                         e.g. 400 for a longer run
  DMR_FAULTS=a,b,...     only these faults: server1-kill server2-kill rabbitmq-restart
                         agent-kill webhook-500 network-cut-a network-cut-b agent-stop
                         (a key may repeat: DMR_FAULTS=agent-kill,agent-kill)
  CARGO_TARGET_DIR       honoured; the report is fault-report.txt in it (default target/)

The default suite restarts the RabbitMQ application on this machine (rabbitmqctl
stop_app/start_app): run it where nothing else uses that RabbitMQ. Needs root (rabbitmqctl);
starts RabbitMQ via scripts/ensure-rabbitmq.sh if it is not up.

cluster-node: starts rabbit-dmr1..3@localhost (AMQP 127.0.0.1:5681-5683; it refuses to start
if those ports are taken), runs
    cargo test --locked --test faults cluster_node -- --ignored --nocapture
with these variables set for the test, and takes the cluster down afterwards, pass or fail:
  DMR_CLUSTER_AMQP_URL   the three nodes' amqp:// URLs, comma-separated (the --amqp-url)
  DMR_CLUSTER_SCRIPT     absolute path of scripts/rabbitmq-cluster.sh; the test stops and
                         starts a node with "$DMR_CLUSTER_SCRIPT stop-node N" / "start-node N"
  DMR_CLUSTER_NODES      rabbit-dmr1@localhost,rabbit-dmr2@localhost,rabbit-dmr3@localhost
Set KEEP_CLUSTER=1 to leave the cluster up for a look (then: scripts/rabbitmq-cluster.sh down).
The system RabbitMQ node on 5672 is not touched by this case.
USAGE
    exit 0 ;;
  ""|cluster-node) ;;
  *) echo "unknown argument: $1 (see scripts/chaos.sh --help)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
root=$PWD
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
export DMR_FAULT_MESSAGES=${DMR_FAULT_MESSAGES:-40}
report=${CARGO_TARGET_DIR:-target}/fault-report.txt

show_report() {
  printf '\n==== %s ====\n' "$report"
  cat "$report" 2>/dev/null || echo "(no report: the suite stopped before its first fault ended)"
}

cluster=$root/scripts/rabbitmq-cluster.sh
# shellcheck disable=SC2317  # run by the EXIT trap
cluster_teardown() {
  if [ -n "${KEEP_CLUSTER:-}" ]; then echo "cluster kept: $cluster down when done"
  else "$cluster" down || true; fi
}

cluster_node() {
  scripts/ensure-rabbitmq.sh >/dev/null   # installs rabbitmq-server if missing
  trap cluster_teardown EXIT
  "$cluster" up
  DMR_CLUSTER_AMQP_URL=$("$cluster" urls)
  export DMR_CLUSTER_AMQP_URL DMR_CLUSTER_SCRIPT=$cluster
  export DMR_CLUSTER_NODES=rabbit-dmr1@localhost,rabbit-dmr2@localhost,rabbit-dmr3@localhost
  rm -f "$report"
  local rc=0 log
  log=$(mktemp)
  cargo test --locked --test faults cluster_node -- --ignored --nocapture 2>&1 | tee "$log" || rc=$?
  # A filter that matches nothing "passes": say so instead.
  if [ "$rc" = 0 ] && ! grep -Eq '^running [1-9]' "$log"; then
    echo "no cluster_node test ran: tests/faults.rs has no #[ignore]d test named cluster_node*" >&2
    rc=1
  fi
  rm -f "$log"
  show_report
  return "$rc"
}

if [ "${1:-}" = cluster-node ]; then
  rc=0; cluster_node || rc=$?
  exit "$rc"
fi

scripts/ensure-rabbitmq.sh
rm -f "$report"
rc=0
cargo test --locked --test faults -- --nocapture || rc=$?
show_report
exit "$rc"
