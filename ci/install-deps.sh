#!/usr/bin/env bash
# Installs what shoal needs on a fresh Debian 12 machine, idempotently: the
# Debian packages in ci/packages.txt that are missing (apt-get update only
# when something is), and checks the Rust toolchain. Safe to run every time.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[install-deps] %s\n' "$*" >&2; }

mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' ci/packages.txt)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing packages: ${missing[*]}; run as root (or install them) and retry"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  for i in 1 2 3 4 5; do      # apt-get update has no lock timeout: retry
    apt-get update -qq >/dev/null 2>&1 && break
    [ "$i" = 5 ] && { log "apt-get update failed"; exit 1; }
    sleep 5
  done
  log "apt-get install ${missing[*]}"
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { log "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }
for c in fmt clippy; do
  cargo "$c" --version >/dev/null 2>&1 ||
    { log "cargo $c missing: rustup component add $c"; exit 1; }
done
log "ok"
