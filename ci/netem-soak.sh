#!/usr/bin/env bash
# The injected-faults soak: vmm/tests/netfaults.rs (2-node tcp pods across
# network namespaces with tc netem on the veth: memtouch and smp exact, a
# partition ending the pod on both nodes) ROUNDS times under each of
# several fault profiles, inside the soft-RoCE harness (this machine's
# kernel has no sch_netem; the harness's Debian kernel has). ci/test.sh
# runs the same tests once with the default profile.
#
#   ci/netem-soak.sh               # ROUNDS=3 per profile, bounded by the harness's --timeout
#   ROUNDS=10 ci/netem-soak.sh
#   TESTS=smp ROUNDS=3 ci/netem-soak.sh   # only the tests whose names contain smp
#
# The first profile, "delay 0ms", injects nothing: the control, to tell a
# failure the faults cause from one of the harness (nested KVM under TCG).
# Prints one line per run (profile, round, passed or failed) and a summary;
# exits 1 when any run failed.
set -euo pipefail

if [ "${1:-}" = inside ]; then
  # inside the harness: netfaults and shoal were copied in
  shift
  rounds=$1
  TESTS=$2
  shift 2
  failed=0
  for profile in "$@"; do
    for r in $(seq 1 "$rounds"); do
      status=0
      start=$(cut -d' ' -f1 /proc/uptime)
      SHOAL_NETEM="$profile" timeout 900 netfaults --test-threads=1 --include-ignored $TESTS >/tmp/soak.out 2>&1 || status=$?
      end=$(cut -d' ' -f1 /proc/uptime)
      if [ "$status" = 0 ]; then
        echo "SOAK ok     [$profile] round $r ($(echo "$start $end" | awk '{printf "%.0f", $2 - $1}') s)"
      else
        failed=$((failed + 1))
        echo "SOAK FAILED [$profile] round $r (status $status):"
        grep -i -E "panicked|assert|failed|error" /tmp/soak.out | head -30
      fi
      grep '^partition:' /tmp/soak.out | sed 's/^/SOAK   /' || true
    done
  done
  echo "SOAK done: $failed failed"
  [ "$failed" = 0 ]
  exit
fi

cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
netfaults=$(cargo test --locked -p shoal-vmm --test netfaults --no-run --message-format=json 2>/dev/null |
  grep -o '"executable":"[^"]*netfaults[^"]*"' | tail -1 | cut -d'"' -f4)
[ -x "$netfaults" ] || { echo "cannot find the netfaults test binary" >&2; exit 1; }
# the tests run shoal from the path cargo compiled into them
ci/softroce.sh --smp "${HARNESS_SMP:-1}" --timeout $((rounds * 4 * 600 + 300)) \
  --add "$netfaults:/usr/local/bin/netfaults" --add "$PWD/target/debug/shoal:$PWD/target/debug/shoal" \
  --add "ci/netem-soak.sh:/usr/local/bin/netem-soak" \
  --env SHOAL_REQUIRE_NETEM=1 --env SHOAL_REQUIRE_KVM=1 -- \
  sh /usr/local/bin/netem-soak inside "$rounds" "${TESTS:-}" \
  "delay 0ms" \
  "delay 1ms 0.5ms loss 1% duplicate 1% reorder 25% 50%" \
  "delay 5ms 2ms loss 3% duplicate 3% reorder 30% 50%" \
  "delay 10ms 5ms loss 5% duplicate 5%"
