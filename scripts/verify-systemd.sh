#!/usr/bin/env bash
# Checks the unit files in systemd/ with systemd-analyze, without installing anything: copies
# them to a temp dir with ExecStart pointing at stub executables (verify insists that the binary
# exists), verifies the template both as itself and as an instance, and requires the hardening
# to keep an exposure score of at most 3.0. Exit 0 = clean, 1 = a problem, 77 = no
# systemd-analyze here (skip).
set -euo pipefail

case "${1:-}" in
  -h|--help)
    echo "usage: scripts/verify-systemd.sh [UNIT_DIR]   (default: systemd/ of this repo)"
    exit 0 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
src=${1:-$root/systemd}
if ! command -v systemd-analyze >/dev/null; then
  echo "SKIP: systemd-analyze not found (apt-get install systemd)" >&2
  exit 77
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin"
for b in dmr-server dmr-agent; do printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/$b"; chmod +x "$tmp/bin/$b"; done

units=()
for f in "$src"/*.service; do
  name=$(basename "$f")
  sed "s|/usr/local/bin/|$tmp/bin/|g" "$f" >"$tmp/$name"
  units+=("$tmp/$name")
  # A template is only fully expanded (%i in paths and arguments) as an instance.
  if [[ $name == *@.service ]]; then
    inst=${name/@./@verify-agent-1.}
    cp "$tmp/$name" "$tmp/$inst"
    units+=("$tmp/$inst")
  fi
done
[ ${#units[@]} -gt 0 ] || { echo "no unit files in $src" >&2; exit 1; }

# verify exits 0 on most problems (unknown keys, bad values are "ignored"), so read its output:
# any line naming one of our units is a failure. Other lines (about the host) are shown only.
status=0
out=$(cd "$tmp" && systemd-analyze verify --man=no "${units[@]}" 2>&1) || status=1
[ -z "$out" ] || printf '%s\n' "$out"
for u in "${units[@]}"; do
  if grep -qF "$(basename "$u")" <<<"$out"; then status=1; fi
done

# The hardening is part of the contract; a regression should fail here, not in production.
# (security --offline needs systemd >= 250; older ones skip this part.)
if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
  for u in "${units[@]}"; do
    [[ $u == *@.service ]] && continue
    if sec=$(cd "$tmp" && systemd-analyze security --offline=yes --threshold=30 --no-pager "$u" 2>&1); then
      grep -h 'Overall exposure' <<<"$sec" || true
    else
      printf '%s\n' "$sec"; status=1
    fi
  done
fi

if [ "$status" = 0 ]; then echo "systemd units OK: $(cd "$src" && echo *.service)"; fi
exit "$status"
