#!/usr/bin/env bash
# The verbs half of `shoal-bench fabric`, on soft-RoCE: runs the benchmark
# and perftest's ib_read_lat / ib_read_bw on the same rxe0 in one VM
# (ci/softroce.sh), and writes bench/results/fabric-verbs.{json,md}.
# Ratios only: under QEMU/TCG absolute times say nothing about hardware.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench/results}
cargo build --release --locked -p shoal-bench
log=$(mktemp)
ci/softroce.sh --add target/release/shoal-bench -- \
  shoal-bench fabric --kinds verbs --perftest --rounds 5 --reads 3000 --batches 50 --print-json | tee "$log"
mkdir -p "$out"
json=$(grep -a '^@@BENCH-JSON fabric-verbs ' "$log" | head -1 | cut -d' ' -f3-)
[ -n "$json" ] || { echo "fabric-verbs: no result in the VM's output" >&2; exit 1; }
printf '%s\n' "$json" > "$out/fabric-verbs.json"
sed -n '/^@@BENCH-MD-BEGIN fabric-verbs/,/^@@BENCH-MD-END/p' "$log" | sed '1d;$d' > "$out/fabric-verbs.md"
printf '\nRun inside QEMU/TCG with rdma_rxe (ci/softroce.sh): compare ratios, not absolute times.\n' >> "$out/fabric-verbs.md"
rm -f "$log"
echo "wrote $out/fabric-verbs.json and $out/fabric-verbs.md"
