#!/usr/bin/env bash
# Builds fully static dmr-server and dmr-agent (x86_64-unknown-linux-musl), the same binaries
# the Dockerfile puts in its scratch image, for hosts without a matching glibc.
set -euo pipefail

TARGET=x86_64-unknown-linux-musl
case "${1:-}" in
  -h|--help)
    echo "usage: scripts/build-static.sh   # -> target/$TARGET/release/dmr-{server,agent}"
    exit 0 ;;
esac
cd "$(dirname "$0")/.."

# ring compiles C/assembly, which needs a musl C toolchain, not just the Rust target.
if ! command -v musl-gcc >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y musl-tools
  else
    echo "musl-gcc missing: sudo apt-get install musl-tools" >&2; exit 1
  fi
fi
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"

cargo build --release --locked --target "$TARGET" --bins

for b in dmr-server dmr-agent; do
  f=target/$TARGET/release/$b
  # A dynamic loader in the binary would break it in a scratch image: fail loudly instead.
  if command -v readelf >/dev/null && readelf -l "$f" | grep -q 'Requesting program interpreter'; then
    echo "$f is not static" >&2; exit 1
  fi
  echo "$f ($(du -h "$f" | cut -f1))"
done
