#!/usr/bin/env bash
# A peer side by side (issue 11): QEMU's post-copy live migration page
# requests beside shoal's remote faults over tcp, same guest memory size,
# same run, on this host. Writes bench/results/qemu-postcopy.{json,md,svg}.
#
#   bench/scripts/qemu-postcopy.sh [--memory MIB] [--mib MIB] [--stride N]
#                                  [--accel "kvm tcg"] [--repeat N] [--out DIR]
#
# QEMU side: two qemu-system-x86_64 processes on this host, the source
# running a boot-sector guest (qemu-postcopy-guest.S) that keeps adding 1 to
# one byte of every page of MIB MiB of its RAM (in a scattered order: page
# k*STRIDE mod pages at step k), the destination started with
# -incoming tcp:127.0.0.1:PORT. postcopy-ram on on both sides,
# postcopy-blocktime on the destination; `migrate -d` then at once
# `migrate_start_postcopy`, so the destination runs the guest while most of
# its pages are still at the source: each touch of one is a userfaultfd
# fault, a page request over the TCP return path, and the page back over
# the migration stream. Each accelerator (kvm: this host's KVM, the one
# shoal runs on; tcg) in two modes: QEMU's defaults (requested pages share
# the migration stream with the background push of every other page) and
# postcopy-preempt (requested pages on a channel of their own), REPEAT
# rounds; every run gives QEMU's own counters (`info migrate`: blocktime,
# request count) and, from three trace events on the destination, each
# page request's time from the fault thread recording it to the page being
# placed. max-postcopy-bandwidth stays unlimited: QEMU 7.2 serves requests
# only when its rate limit's 100 ms window reopens (see the results).
#
# shoal side: memtouch over the same MIB MiB of a guest of the same size on
# a 2-node tcp pod whose nodes hold 16 MiB each: what memtouch writes beyond
# that goes to node 1 and its read-back pulls it back with remote faults
# (three runs, spread over the QEMU rounds).
#
# QEMU is the one ci/softroce.sh unpacks under $SHOAL_SOFTROCE_WORK (default
# /var/tmp/shoal-softroce; run `ci/softroce.sh -- true` once to fetch it).
# Root needed (KVM, userfaultfd). Waits (bounded) for any other QEMU on the
# machine to finish first: two shared cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
MEM=64 MIB=20 STRIDE=2503 ACCELS="kvm tcg" REPEAT=20 OUT=bench/results PORT=4471
while [ $# -gt 0 ]; do
  case "$1" in
    --memory) MEM=$2; shift 2 ;;
    --mib) MIB=$2; shift 2 ;;
    --stride) STRIDE=$2; shift 2 ;;
    --accel) ACCELS=$2; shift 2 ;;
    --repeat) REPEAT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "qemu-postcopy: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { printf '[qemu-postcopy %(%T)T] %s\n' -1 "$*" >&2; }
die() { say "error: $*"; exit 1; }

QROOT=${SHOAL_SOFTROCE_WORK:-/var/tmp/shoal-softroce}/qemu
[ -x "$QROOT/usr/bin/qemu-system-x86_64" ] ||
  die "no QEMU at $QROOT (ci/softroce.sh downloads and unpacks it: run 'ci/softroce.sh -- true' once)"
[ "$(id -u)" = 0 ] || die "run as root (KVM and userfaultfd)"
PAGES=$((MIB * 256))
gcd() { local a=$1 b=$2; while [ "$b" -ne 0 ]; do set -- "$b" $((a % b)); a=$1 b=$2; done; echo "$a"; }
[ "$(gcd "$STRIDE" "$PAGES")" = 1 ] || die "--stride $STRIDE must be coprime with $PAGES pages"
[ $((2 + MIB)) -le "$MEM" ] || die "--mib $MIB does not fit above 2 MiB in --memory $MEM"

W=$(mktemp -d /tmp/qemu-postcopy.XXXXXX)
trap 'rm -rf "$W"' EXIT

# two cores, shared: one heavy thing at a time
wait_for_other_qemu() {
  local waited=0
  while pgrep -f qemu-system >/dev/null; do
    [ $waited -ge 1800 ] && die "another QEMU has run for 30 minutes: not starting ours beside it"
    say "another QEMU is running; waiting"
    sleep 30; waited=$((waited + 30))
  done
}

wait_for_other_qemu
say "building shoal (release)"
cargo build --release --locked -p shoal-vmm --bin shoal >&2

say "assembling the guest: $PAGES pages from 2 MiB, stride $STRIDE"
as --32 --defsym BASE=0x200000 --defsym PAGES="$PAGES" --defsym STRIDE="$STRIDE" \
  -o "$W/guest.o" bench/scripts/qemu-postcopy-guest.S
ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o "$W/boot.img" "$W/guest.o"
[ "$(stat -c %s "$W/boot.img")" = 512 ] || die "the boot sector is not 512 bytes"

shoal_run() {  # $1: its number
  SHOAL_CMD=(target/release/shoal run --guest memtouch --cmdline "mib=$MIB seed=5" --memory "${MEM}M"
    --nodes 2 --fabric tcp --node-memory 16M --metrics-json "$W/shoal-$1.json" --timeout 300)
  wait_for_other_qemu
  say "shoal, run $1: ${SHOAL_CMD[*]}"
  timeout 330 "${SHOAL_CMD[@]}" >"$W/shoal-$1.out" 2>&1 || { cat "$W/shoal-$1.out" >&2; die "the shoal run failed"; }
  cat "$W/shoal-$1.out" >&2
}

# Rounds: each runs every QEMU configuration once (accelerator x mode),
# so that the load of this shared machine, which drifts, falls on all of
# them alike; shoal runs before the first round, after the middle one and
# after the last.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
QEMU_ARGS=(--qemu-root "$QROOT" --image "$W/boot.img" --memory-mib "$MEM" --timeout 60 --trace)
shoal_run 1
n=0
for i in $(seq 1 "$REPEAT"); do
  for accel in $ACCELS; do
    for mode in default preempt; do
      extra=()
      [ "$mode" = preempt ] && extra+=(--preempt)
      wait_for_other_qemu
      say "QEMU post-copy: $accel, $mode, round $i of $REPEAT"
      timeout 90 python3 bench/scripts/qemu-postcopy.py "${QEMU_ARGS[@]}" --accel "$accel" \
        --port $((PORT + n % 50)) --workdir "$W/q" "${extra[@]}" \
        >"$W/qemu-$accel-$mode-$i.json" || say "that run failed (kept in the results)"
      n=$((n + 1))
    done
  done
  [ "$i" = $(((REPEAT + 1) / 2)) ] && shoal_run 2
done
shoal_run 3
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p "$OUT"
QEMU_VERSION=$(LD_LIBRARY_PATH="$QROOT/usr/lib/x86_64-linux-gnu:$QROOT/lib/x86_64-linux-gnu" \
  "$QROOT/usr/bin/qemu-system-x86_64" --version | head -1)
python3 bench/scripts/qemu-postcopy-report.py "$W" "$OUT" "$MEM" "$MIB" "$STRIDE" "$REPEAT" "$ACCELS" \
  "$QEMU_VERSION" "$(uname -r)" "${SHOAL_CMD[*]/shoal-3.json/m.json}" "$LOAD_BEFORE" "$LOAD_AFTER"
