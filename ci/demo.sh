#!/usr/bin/env bash
# The demo: installs what is missing, builds shoal, and boots guests on
# dormant memory: a 1 GiB guest that zeroes all its RAM like an OS boot and
# then verifies a pattern, once with dormant pages and once without, so
# the metrics show what dormant pages save.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
cargo build --release --locked
shoal=target/release/shoal
out=${SHOAL_DEMO_OUT:-target/demo}
mkdir -p "$out"

echo "== shoal guests"
"$shoal" guests
echo
echo "== hello"
"$shoal" run --guest hello --memory 64M
echo
for dormant in on off; do
  echo "== zeroboot, 1 GiB, dormant $dormant"
  "$shoal" run --guest zeroboot --memory 1G --cmdline "mib=16" --dormant "$dormant" \
    --metrics-json "$out/zeroboot-dormant-$dormant.json"
  echo
done
for dormant in on off; do
  echo "== zeroboot on a 3-node pod (shm), 256 MiB, dormant $dormant"
  "$shoal" run --guest zeroboot --memory 256M --cmdline "mib=16" --nodes 3 --fabric shm --dormant "$dormant" \
    --metrics-json "$out/pod-zeroboot-dormant-$dormant.json"
  echo
done
echo "== memtouch on a 3-node pod (tcp): 20 MiB over nodes that may hold 8 MiB each"
"$shoal" run --guest memtouch --memory 64M --cmdline "mib=20" --nodes 3 --fabric tcp --node-memory 8M \
  --metrics-json "$out/pod-memtouch.json"
echo
echo "== smp on a 3-node pod (shm): one vCPU on each node, one shared counter"
"$shoal" run --guest smp --cpus 3 --memory 64M --cmdline "iters=2000" --nodes 3 --fabric shm \
  --metrics-json "$out/pod-smp.json"
echo
echo "== migrate on a 3-node pod (shm): vCPU 0 moves itself around every node, twice"
"$shoal" run --guest migrate --memory 64M --cmdline "mode=0 mib=2 rounds=2" --nodes 3 --fabric shm \
  --metrics-json "$out/pod-migrate.json"
echo
echo "metrics: $out/{zeroboot-dormant-{on,off},pod-zeroboot-dormant-{on,off},pod-memtouch,pod-smp,pod-migrate}.json"
