#!/usr/bin/env bash
# Prepares a RabbitMQ node for DMR: monitoring plugins; isolated vhosts for tests; for
# production, a vhost and a least-privilege user for dmr-server, and optionally the AMQPS
# (TLS) listener. Safe to run again and again; CI runs it (without arguments) on every build.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/rabbitmq-setup.sh [ACTION...]
  (no action)                 enable rabbitmq_management + rabbitmq_prometheus
  --vhost NAME                create vhost NAME, give guest full rights on it (tests only)
  --delete-vhost NAME         delete vhost NAME (no error if it is absent)

  --server-user USER          create (or update) USER for dmr-server with rights on DMR's
                              names only, in the vhost of --dmr-vhost (created if missing);
                              no user tags, and guest gets nothing on that vhost
     --password-file FILE     USER's password: read from FILE, or, if FILE does not exist,
                              a random one is generated and written there (mode 0600);
                              required with --server-user
     --dmr-vhost VHOST        default: dmr
     --queue-prefix PREFIX    the server's --queue-prefix (default none): rights are
                              limited to names starting with PREFIX + "dmr."
     --amqp-host HOST[:PORT]  only used in the printed --amqp-url (default 127.0.0.1:5672)
  --delete-user USER          delete USER (no error if it is absent)

  --tls CA CERT KEY           configure RabbitMQ's AMQPS listener with these PEM files
                              (paths as the rabbitmq user will read them); writes a
                              config snippet and tells you to restart RabbitMQ
     --tls-listen PORT|IP:PORT  default 5671
     --tls-conf FILE          where to write it (default /etc/rabbitmq/conf.d/20-dmr-tls.conf)

The user's permissions (configure, write, read) are all ^PREFIXdmr\. with PREFIX's regex
characters escaped: exactly the exchanges dmr.messages and dmr.dlx and the queues
dmr.agent.<id> and dmr.dlq (and any later dmr.* name) of that prefix, nothing else.
Acts on the node that rabbitmqctl reaches by default (here: rabbit@localhost on 127.0.0.1:5672).
USAGE
}

# The node may still be booting right after start; never let a hung CLI stall CI forever.
ctl() { timeout 60 rabbitmqctl "$@"; }

die() { echo "$*" >&2; exit 2; }

vhost_exists() { ctl -q list_vhosts name | grep -qxF -- "$1"; }
user_exists() { ctl -q list_users | cut -f1 | grep -qxF -- "$1"; }

ensure_vhost() {
  # add_vhost fails on an existing vhost, so check first to stay idempotent.
  vhost_exists "$1" || ctl add_vhost "$1"
}

add_vhost() {
  ensure_vhost "$1"
  ctl set_permissions -p "$1" guest ".*" ".*" ".*"
  echo "vhost '$1' ready: amqp://guest:guest@127.0.0.1:5672/$(vhost_path "$1")"
}

delete_vhost() {
  if vhost_exists "$1"; then ctl delete_vhost "$1"; else echo "vhost '$1' not present"; fi
}

delete_user() {
  if user_exists "$1"; then ctl delete_user "$1"; else echo "user '$1' not present"; fi
}

# AMQP URLs carry the vhost and user percent-encoded; enough for the names people use.
url_part() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
vhost_path() { local v=${1//%/%25}; printf '%s' "${v//\//%2f}"; }

# A regex matching PREFIX literally: RabbitMQ's permission patterns are Erlang regexes.
regex_escape() { printf '%s' "$1" | sed 's/[][\.*^$+?(){}|]/\\&/g'; }

# The password file: read it, or create it with a fresh random password (never printed).
password_from() {
  local file=$1
  if [ ! -e "$file" ]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$file")
    echo "generated a password for the server user in $file (mode 0600)" >&2
  fi
  [ -r "$file" ] || die "cannot read --password-file $file"
  local pw
  pw=$(head -n1 "$file")
  [ -n "$pw" ] || die "--password-file $file is empty"
  printf '%s' "$pw"
}

server_user() {
  local user=$1 vhost=$2 prefix=$3 file=$4 host=$5 re
  [ -n "$file" ] || die "--server-user needs --password-file FILE (created with a random password if missing)"
  re="^$(regex_escape "$prefix")dmr\\."
  ensure_vhost "$vhost"
  # The password goes through stdin, so it never shows in the process list.
  if user_exists "$user"; then
    password_from "$file" | ctl -q change_password "$user" >/dev/null
  else
    password_from "$file" | ctl -q add_user "$user" >/dev/null
  fi
  # No tags: no management UI or HTTP API for the relay's own account.
  ctl -q set_user_tags "$user"
  ctl -q set_permissions -p "$vhost" "$user" "$re" "$re" "$re"
  # Topic permissions only matter for topic exchanges; DMR has none, so none are set.
  echo "user '$user' on vhost '$vhost': configure/write/read $re"
  echo "dmr-server run --queue-prefix '$prefix' --amqp-url 'amqp://$(url_part "$user"):<password from $file>@$host/$(url_part "$vhost")'"
}

tls_listener() {
  local ca=$1 cert=$2 key=$3 listen=$4 conf=$5 f
  for f in "$ca" "$cert" "$key"; do
    [ -r "$f" ] || die "--tls: cannot read $f"
    case "$f" in /*) ;; *) die "--tls: give absolute paths (RabbitMQ reads them from its own directory): $f" ;; esac
  done
  if id rabbitmq >/dev/null 2>&1 && ! runuser -u rabbitmq -- test -r "$key" 2>/dev/null; then
    echo "WARNING: the rabbitmq user cannot read $key; e.g. chown root:rabbitmq and chmod 0640 it" >&2
  fi
  mkdir -p "$(dirname "$conf")"
  cat >"$conf" <<CONF
# Written by DMR's scripts/rabbitmq-setup.sh --tls: AMQPS listener for dmr-server.
listeners.ssl.dmr = $listen
ssl_options.cacertfile = $ca
ssl_options.certfile = $cert
ssl_options.keyfile = $key
# Clients (dmr-server) authenticate with user and password, not a client certificate.
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
CONF
  chmod 0644 "$conf"
  echo "wrote $conf (AMQPS on $listen)"
  echo "restart RabbitMQ to open it (e.g. systemctl restart rabbitmq-server), then check with"
  echo "  openssl s_client -connect HOST:PORT -CAfile $ca </dev/null"
  echo "dmr-server run --amqp-url 'amqps://USER:PASSWORD@HOST:PORT/VHOST' --amqp-ca-file $ca"
}

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

# Options first (they may come in any order), then the actions in the order given.
user='' dmr_vhost=dmr prefix='' password_file='' amqp_host=127.0.0.1:5672
tls=() tls_listen=5671 tls_conf=/etc/rabbitmq/conf.d/20-dmr-tls.conf
actions=()
need_value() { [ "$1" -ge 2 ] || { usage >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --vhost|--delete-vhost|--delete-user) need_value $#; actions+=("$1" "$2"); shift 2 ;;
    --server-user) need_value $#; user=$2; shift 2 ;;
    --dmr-vhost) need_value $#; dmr_vhost=$2; shift 2 ;;
    --queue-prefix) need_value $#; prefix=$2; shift 2 ;;
    --password-file) need_value $#; password_file=$2; shift 2 ;;
    --amqp-host) need_value $#; amqp_host=$2; shift 2 ;;
    --tls) [ $# -ge 4 ] || { usage >&2; exit 2; }; tls=("$2" "$3" "$4"); shift 4 ;;
    --tls-listen) need_value $#; tls_listen=$2; shift 2 ;;
    --tls-conf) need_value $#; tls_conf=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$user" ] || [ -z "$password_file" ] || die "--password-file needs --server-user"

set -- "${actions[@]+"${actions[@]}"}"
while [ $# -gt 0 ]; do
  case "$1" in
    --vhost) add_vhost "$2" ;;
    --delete-vhost) delete_vhost "$2" ;;
    --delete-user) delete_user "$2" ;;
  esac
  shift 2
done
[ -z "$user" ] || server_user "$user" "$dmr_vhost" "$prefix" "$password_file" "$amqp_host"
[ ${#tls[@]} -eq 0 ] || tls_listener "${tls[@]}" "$tls_listen" "$tls_conf"
