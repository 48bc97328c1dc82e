#!/usr/bin/env bash
# The project's whole test gate, exactly as the README and CI run it: installs what the
# tests call (openssl, systemd-analyze, RabbitMQ) if missing, starts RabbitMQ if it is
# down, then formatting, lints as errors, and every test.
set -euo pipefail

case "${1:-}" in
  -h|--help)
    echo "usage: scripts/test.sh   # deps + RabbitMQ, then cargo fmt --check && cargo clippy --all-targets --locked -- -D warnings && cargo test --locked"
    exit 0 ;;
esac

cd "$(dirname "$0")/.."
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
if [ -d "$HOME/.cargo/bin" ]; then PATH=$HOME/.cargo/bin:$PATH; fi
export PATH

command -v cargo >/dev/null || { echo "cargo not found: this machine needs a Rust toolchain (rustup)" >&2; exit 1; }
# command -> Debian package; apt-get update only once, and only if something is missing.
apt_updated=
need() {
  command -v "$1" >/dev/null && return 0
  if [ -z "$apt_updated" ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq; apt_updated=1; fi
  echo "installing $2 (for $1)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" </dev/null
}
need openssl openssl              # tests check key interop with `openssl genpkey`
need systemd-analyze systemd      # scripts/verify-systemd.sh
need curl curl
need promtool prometheus          # tests/ops.rs: promtool check rules deploy/prometheus/*.yml
need shellcheck shellcheck        # tests/ops.rs: lints scripts/*.sh
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
scripts/ensure-rabbitmq.sh --delete-stale-queues

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# Bounded, so a hung test fails the run with its output instead of holding CI to its
# deadline (each test binary also has a watchdog: tests/support/mod.rs).
timeout --kill-after=60 45m cargo test --locked
