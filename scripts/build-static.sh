#!/usr/bin/env bash
# Builds fully static dmr-server and dmr-agent (x86_64-unknown-linux-musl), the same binaries
# the Dockerfile puts in its scratch image, for hosts without a matching glibc. Fails unless
# it could check that neither binary asks for a dynamic loader.
set -euo pipefail

TARGET=x86_64-unknown-linux-musl
case "${1:-}" in
  -h|--help)
    echo "usage: scripts/build-static.sh   # -> \${CARGO_TARGET_DIR:-target}/$TARGET/release/dmr-{server,agent}"
    exit 0 ;;
esac
cd "$(dirname "$0")/.."
out=${CARGO_TARGET_DIR:-target}

# Installs a Debian package as root, or says how to.
need() {
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" </dev/null
  else
    echo "$1 missing: sudo apt-get install $2" >&2; exit 1
  fi
}
# ring compiles C/assembly, which needs a musl C toolchain, not just the Rust target.
need musl-gcc musl-tools
# The static check below; without it a dynamic binary could slip into a scratch image.
need readelf binutils
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"

cargo build --release --locked --target "$TARGET" --bins

for b in dmr-server dmr-agent; do
  f=$out/$TARGET/release/$b
  [ -x "$f" ] || { echo "$f was not built (CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-unset})" >&2; exit 1; }
  # A dynamic loader in the binary would break it in a scratch image: fail loudly instead.
  if ! headers=$(readelf -lW "$f" 2>&1); then
    printf 'cannot check that %s is static: readelf failed:\n%s\n' "$f" "$headers" >&2; exit 1
  fi
  if grep -q 'Requesting program interpreter' <<<"$headers"; then
    echo "$f is not static (it asks for a dynamic loader)" >&2; exit 1
  fi
  echo "$f ($(du -h "$f" | cut -f1)): static"
done
