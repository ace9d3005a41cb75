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
echo "metrics: $out/zeroboot-dormant-{on,off}.json"
