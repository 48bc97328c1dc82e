#!/usr/bin/env bash
# The two-agent demo: RabbitMQ (reused or started), two dmr-server instances, two agents
# connected to different servers, two tiny local services. Sends A→B and B→A through the
# agents' HTTP API, shows what each service received, checks it, and cleans up.
set -euo pipefail

case "${1:-}" in
  -h|--help)
    cat <<'USAGE'
usage: scripts/e2e.sh     run the local two-agent demo; prints PASS or FAIL (exit 0 / 1)
Needs cargo and python3; starts RabbitMQ via scripts/ensure-rabbitmq.sh if it is not up.
Set KEEP=1 to keep the temporary directory (keys, directory, logs) for a look afterwards.
USAGE
    exit 0 ;;
esac

cd "$(dirname "$0")/.."
root=$PWD
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

say() { printf '\n== %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*"; exit 1; }

for tool in python3 curl; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$tool" </dev/null; } \
    || fail "$tool is needed (the demo's local services and HTTP calls)"
done
scripts/ensure-rabbitmq.sh

say "building"
cargo build --locked --bins --quiet
# Where cargo put them: CARGO_TARGET_DIR when set (relative to this directory, as cargo reads it).
target=${CARGO_TARGET_DIR:-target}
case "$target" in /*) ;; *) target=$root/$target ;; esac
bin=$target/debug

work=$(mktemp -d /tmp/dmr-e2e.XXXXXX)
prefix="e2e-$(date +%s)-$$."
pids=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # The demo's queues live under its own prefix; remove them so runs don't pile up.
  for q in "${prefix}dmr.agent.police" "${prefix}dmr.agent.tax-board" "${prefix}dmr.dlq" \
    "${prefix}dmr.failures"; do
    timeout 20 rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  for x in "${prefix}dmr.messages" "${prefix}dmr.dlx"; do
    curl -fsS -u guest:guest -X DELETE "http://127.0.0.1:15672/api/exchanges/%2f/$x" >/dev/null 2>&1 || true
  done
  for x in "${prefix}dmr-agents" "${prefix}dmr-dlq"; do
    curl -fsS -u guest:guest -X DELETE "http://127.0.0.1:15672/api/policies/%2f/$x" >/dev/null 2>&1 || true
  done
  if [ "$rc" -ne 0 ]; then
    for f in "$work"/*.log; do printf '\n----- %s -----\n' "$f"; tail -n 30 "$f"; done
  fi
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S1=$(port); S2=$(port); A=$(port); B=$(port); WA=$(port); WB=$(port)

say "keys and directory"
"$bin/dmr-agent" keygen --out "$work/police"
"$bin/dmr-agent" keygen --out "$work/tax-board"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
agents = [{"id": i, "name": n, "authentication_certificate": open(f"{work}/{i}.pub").read(),
           "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z"}
          for i, n in [("police", "Police and Border Guard"), ("tax-board", "Tax and Customs Board")]]
json.dump({"response": agents}, open(f"{work}/agents.json", "w"), indent=2)
PY

say "local services (webhooks) on :$WA (police) and :$WB (tax-board)"
service() {  # port, file: a webhook that appends each JSON body to file
  python3 - "$1" "$2" <<'PY' &
import http.server, sys
port, out = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with open(out, "ab") as f: f.write(body + b"\n")
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
PY
  pids+=($!)
}
service "$WA" "$work/police.received"
service "$WB" "$work/tax-board.received"

say "queue policies (TTL, delivery limit, dead-lettering) for prefix $prefix"
"$bin/dmr-server" rabbitmq setup --management-url http://guest:guest@127.0.0.1:15672 \
  --queue-prefix "$prefix" >"$work/rabbitmq-setup.log" 2>&1 \
  || fail "dmr-server rabbitmq setup: $(cat "$work/rabbitmq-setup.log")"

say "two servers on :$S1 and :$S2 (queue prefix $prefix)"
for p in "$S1" "$S2"; do
  "$bin/dmr-server" run --listen "127.0.0.1:$p" --agents-file "$work/agents.json" \
    --queue-prefix "$prefix" --management-url http://guest:guest@127.0.0.1:15672 \
    2>"$work/server-$p.log" &
  pids+=($!)
done

say "agent police → server 1, agent tax-board → server 2"
"$bin/dmr-agent" run --id police --key "$work/police.key" --listen "127.0.0.1:$A" \
  --state-dir "$work/state-police" \
  --server "ws://127.0.0.1:$S1/v1/ws,ws://127.0.0.1:$S2/v1/ws" \
  --deliver-url "http://127.0.0.1:$WA/" 2>"$work/agent-police.log" &
pids+=($!)
"$bin/dmr-agent" run --id tax-board --key "$work/tax-board.key" --listen "127.0.0.1:$B" \
  --state-dir "$work/state-tax-board" \
  --server "ws://127.0.0.1:$S2/v1/ws,ws://127.0.0.1:$S1/v1/ws" \
  --deliver-url "http://127.0.0.1:$WB/" 2>"$work/agent-tax-board.log" &
pids+=($!)

wait_ready() {  # url, what
  for _ in $(seq 300); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "$2 not ready at $1"
}
for p in "$S1" "$S2"; do wait_ready "http://127.0.0.1:$p/readyz" "server :$p"; done
wait_ready "http://127.0.0.1:$A/readyz" "agent police"
wait_ready "http://127.0.0.1:$B/readyz" "agent tax-board"

send() {  # agent port, recipient, question
  local body
  body=$(python3 -c 'import json,sys; print(json.dumps({"recipientId": sys.argv[1], "payload": {"question": sys.argv[2]}}))' "$2" "$3")
  curl -sS -o "$work/reply" -w '%{http_code}' -H 'content-type: application/json' \
    --data "$body" "http://127.0.0.1:$1/v1/messages"
}

say "police asks tax-board; tax-board asks police"
Q1="Kas maksuvõlg takistab relvaloa saamist?"
Q2="Is a stolen car still subject to vehicle tax?"
code=$(send "$A" tax-board "$Q1"); [ "$code" = 202 ] || fail "police send answered $code: $(cat "$work/reply")"
echo "police → tax-board: 202 $(cat "$work/reply")"
code=$(send "$B" police "$Q2"); [ "$code" = 202 ] || fail "tax-board send answered $code: $(cat "$work/reply")"
echo "tax-board → police: 202 $(cat "$work/reply")"

for _ in $(seq 100); do
  [ -s "$work/tax-board.received" ] && [ -s "$work/police.received" ] && break
  sleep 0.1
done

say "delivered to tax-board's service"
cat "$work/tax-board.received" 2>/dev/null || true
say "delivered to police's service"
cat "$work/police.received" 2>/dev/null || true

python3 - "$work" "$Q1" "$Q2" <<'PY' || fail "delivered bodies do not match what was sent"
import json, sys
work, q1, q2 = sys.argv[1:4]
def one(path):
    lines = [l for l in open(path, encoding="utf-8").read().splitlines() if l.strip()]
    assert len(lines) == 1, f"{path}: expected exactly one delivery, got {len(lines)}"
    return json.loads(lines[0])
b = one(f"{work}/tax-board.received")
a = one(f"{work}/police.received")
assert (b["senderId"], b["recipientId"], b["payload"]) == ("police", "tax-board", {"question": q1}), b
assert (a["senderId"], a["recipientId"], a["payload"]) == ("tax-board", "police", {"question": q2}), a
assert b["type"] == "ChatMessage" and b["id"] and b["timestamp"]
PY

say "PASS: both messages delivered once, intact, across two server instances"
