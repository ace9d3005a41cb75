#!/usr/bin/env bash
# The remote-fault run of `shoal-bench pod` over verbs, on soft-RoCE: a
# 2-node pod inside one VM (ci/softroce.sh), the guest under nested KVM,
# with what exposing pages to peers' reads costs (registrations and
# deregistrations, per page) and whether every node's memory stayed its
# resident pages. Writes bench/results/pod-verbs.{json,md}. Ratios only:
# under QEMU/TCG absolute times say nothing about hardware.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench/results}
cargo build --release --locked -p shoal-bench -p shoal-vmm
log=$(mktemp)
ci/softroce.sh --timeout 900 --add target/release/shoal-bench --add target/release/shoal -- \
  shoal-bench --out /tmp pod --verbs | tee "$log"
mkdir -p "$out"
json=$(grep -a '^@@BENCH-JSON pod-verbs ' "$log" | head -1 | cut -d' ' -f3-)
[ -n "$json" ] || { echo "pod-verbs: no result in the VM's output" >&2; exit 1; }
printf '%s\n' "$json" > "$out/pod-verbs.json"
sed -n '/^@@BENCH-MD-BEGIN pod-verbs/,/^@@BENCH-MD-END/p' "$log" | sed '1d;$d' > "$out/pod-verbs.md"
rm -f "$log"
echo "wrote $out/pod-verbs.json and $out/pod-verbs.md"
