#!/usr/bin/env bash
# Memory returned by the balloon: a Linux guest (320 MiB) fills 192 MiB
# and frees it (memfill exits); Linux reports the free 2 MiB chunks to the
# balloon about 2 s later and shoal makes them dormant again. Measured
# inside the soft-RoCE harness's QEMU/TCG (one CPU, the guest under nested
# KVM), on one node and on a 2-node pod (shm): the
# nodes' RSS when the first memfill ends, the lowest in the 10 s after,
# the seconds until it had fallen by 150 MiB, and the pages reported and
# re-dormanted (ci/linux-guest.sh's balloon test, sampling every 0.2 s).
# Writes bench/results/balloon.{md,json}.
#
#   cargo build --release && bench/scripts/balloon.sh
set -euo pipefail
. "$(dirname "$0")/linux-lib.sh"
tmp=$(mktemp -d /tmp/balloon-bench.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/inner" <<'IN'
#!/bin/sh
set -eu
BALLOON_TIMES=/tmp/balloon.times linux-guest balloon
echo "@@SOFTROCE times"
sed 's/^/@@BALLOON /' /tmp/balloon.times
IN
chmod +x "$tmp/inner"
ci/softroce.sh --smp 1 --timeout 1200 --add "$shoal:/usr/local/bin/shoal" \
  --add ci/linux-guest.sh:/usr/local/bin/linux-guest --add "$tmp/inner:/usr/local/bin/inner" \
  --add "$linux_out/vmlinuz:/vmlinuz" --add "$linux_out/vmlinux:/vmlinux" --add "$linux_out/initrd.img:/initrd.img" \
  -- inner | tee "$tmp/log"
grep '^@@BALLOON ' "$tmp/log" | cut -d' ' -f2- >"$tmp/times"
[ -s "$tmp/times" ] || { echo "balloon bench: no results" >&2; exit 1; }
{
  echo "# Memory returned by the balloon (free page reporting)"
  echo
  echo "\`bench/scripts/balloon.sh\`, $(date -u +%Y-%m-%d), inside the soft-RoCE harness (QEMU/TCG, one CPU;"
  echo "the guest under nested KVM). A 320 MiB Linux guest runs \`memfill 192\` (fills and verifies"
  echo "192 MiB), which then exits: the guest frees 192 MiB. RSS is the sum over the nodes' shoal"
  echo "processes, sampled every 0.2 s for 10 s from the end of memfill; Linux reports free 2 MiB"
  echo "chunks about 2 s after they were freed (\`page_reporting\`'s delay), so about 2 s of the"
  echo "time is the guest's own wait."
  echo
  echo "| run | RSS at the free | lowest in 10 s | returned | 150 MiB returned after | pages reported | pages re-dormanted |"
  echo "|---|---|---|---|---|---|---|"
  while read -r name before low took reported redorm; do
    printf '| %s | %d MiB | %d MiB | %d MiB | %s s | %s | %s |\n' "$name" $((before / 1024)) $((low / 1024)) \
      $(((before - low) / 1024)) "$took" "$reported" "$redorm"
  done <"$tmp/times"
  echo
  echo "\`balloon\`: one node. \`balloonpod\`: 2 nodes over shm (half the blocks homed on node 1,"
  echo "whose frees go through it: a frame of messages each way per 2 MiB chunk)."
} >"$out/balloon.md"
{
  echo "["
  sep=
  while read -r name before low took reported redorm; do
    printf '%s  {"run": "%s", "rss_kib_before": %s, "rss_kib_lowest": %s, "seconds_to_150mib": %s, "pages_reported": %s, "pages_redormanted": %s}' \
      "$sep" "$name" "$before" "$low" "$took" "$reported" "$redorm"
    sep=$',\n'
  done <"$tmp/times"
  printf '\n]\n'
} >"$out/balloon.json"
cat "$out/balloon.md"
