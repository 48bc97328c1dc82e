# shellcheck shell=bash
# Sourced (not run) by the scripts that start throw-away RabbitMQ nodes beside the system one
# (rabbitmq-cluster.sh, rabbitmq-tls-node.sh): how to run RabbitMQ's own scripts as the right
# user, and a port probe. Defines BIN, RUN_USER, RUN_HOME, as_rabbit, port_in_use.

# Prefer the real scripts over Debian's /usr/sbin wrappers: those re-quote arguments through
# `su` and swallow server output. Run as the rabbitmq user with its HOME, so the nodes share the
# cookie in ~rabbitmq/.erlang.cookie that the stock `rabbitmqctl` uses too (so
# `rabbitmqctl -n NODE ...` works from root). Without that user, run as ourselves with
# $HOME/.erlang.cookie.
BIN=/usr/lib/rabbitmq/bin
if [ ! -x "$BIN/rabbitmq-server" ]; then
  BIN=$(dirname "$(command -v rabbitmq-server || echo /nonexistent/rabbitmq-server)")
fi
if [ ! -x "$BIN/rabbitmq-server" ]; then
  echo "rabbitmq-server not found: run scripts/ensure-rabbitmq.sh (installs Debian's package)" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then
  RUN_USER=rabbitmq
  RUN_HOME=$(getent passwd rabbitmq | cut -d: -f6)
else
  RUN_USER=
  RUN_HOME=$HOME
fi

as_rabbit() {
  # cd: the rabbitmq user may not be able to read the caller's working directory.
  if [ -n "$RUN_USER" ]; then
    (cd "$RUN_HOME" && runuser -u "$RUN_USER" -- env HOME="$RUN_HOME" "$@")
  else
    (cd "$RUN_HOME" && "$@")
  fi
}

# True when something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
