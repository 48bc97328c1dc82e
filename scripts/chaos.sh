#!/usr/bin/env bash
# The fault suite (tests/faults.rs) on its own, output shown, for a longer run than CI's:
# two servers, two agents, a stream of numbered messages, and one fault at a time — server
# SIGKILL, RabbitMQ stop_app/start_app, agent SIGKILL, webhook 500s, network cuts, SIGSTOP.
# Ends with the report table (target/fault-report.txt): per fault, sent / accepted / retried /
# delivered / duplicated / dead-lettered / left in queue.
set -euo pipefail

case "${1:-}" in
  -h|--help)
    cat <<'USAGE'
usage: scripts/chaos.sh          run the fault suite and print target/fault-report.txt

Environment:
  DMR_FAULT_MESSAGES=N   least number of messages sent per fault (default 40, CI's size);
                         e.g. 400 for a longer run
  DMR_FAULTS=a,b,...     only these faults: server1-kill server2-kill rabbitmq-restart
                         agent-kill webhook-500 network-cut-a network-cut-b agent-stop
                         (a key may repeat: DMR_FAULTS=agent-kill,agent-kill)

Restarts the RabbitMQ application on this machine (rabbitmqctl stop_app/start_app): run it
where nothing else uses that RabbitMQ. Needs root (rabbitmqctl); starts RabbitMQ via
scripts/ensure-rabbitmq.sh if it is not up.
USAGE
    exit 0 ;;
esac

cd "$(dirname "$0")/.."
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
export SMOL_THREADS=${SMOL_THREADS:-2}
export DMR_FAULT_MESSAGES=${DMR_FAULT_MESSAGES:-40}

scripts/ensure-rabbitmq.sh
report=target/fault-report.txt
rm -f "$report"
rc=0
cargo test --locked --test faults -- --nocapture || rc=$?
printf '\n==== %s ====\n' "$report"
cat "$report" 2>/dev/null || echo "(no report: the suite stopped before its first fault ended)"
exit "$rc"
