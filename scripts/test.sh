#!/usr/bin/env bash
# The project's whole test gate, exactly as the README and CI run it:
# formatting, lints as errors, then every test. Needs a RabbitMQ on 127.0.0.1:5672
# (scripts/rabbitmq-setup.sh, or .ci/run which starts one).
set -euo pipefail

case "${1:-}" in
  -h|--help)
    echo "usage: scripts/test.sh   # cargo fmt --check && cargo clippy --all-targets --locked -- -D warnings && cargo test --locked"
    exit 0 ;;
esac

cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
