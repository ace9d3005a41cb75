#!/bin/sh
# Runs inside the soft-RoCE harness (ci/softroce.sh) with shoal copied in:
# a 2-node pod over verbs on rxe0, nested KVM for the guest. memtouch
# touches more than either node may hold, so pages cross with RDMA READs,
# each checked against its owner's digest (--verify-pages on: a page whose
# RDMA READ brought other bytes would end the VM). Checks the guest's own
# verdict and the metrics.
set -eu
fail() { echo "pod-verbs: FAILED: $*" >&2; exit 1; }
[ "${GUEST_KVM:-0}" = 1 ] || fail "no /dev/kvm inside the harness (nested KVM did not load)"
out=/tmp/pod-verbs.out
status=0
timeout 300 shoal run --guest memtouch --memory 32M --cmdline "mib=6 seed=3" --nodes 2 --fabric verbs --liveness-timeout 30 \
  --node-memory 4M --verify-pages on --metrics-json /tmp/pod-verbs.json >"$out" || status=$?
cat "$out"
[ "$status" = 0 ] || fail "shoal exited with status $status"
grep -q "memtouch: verified 1536 pages" "$out" || fail "the guest did not verify its memory"
fetched=$(grep -m1 '"remote_fetches"' /tmp/pod-verbs.json | tr -dc 0-9)
bytes=$(grep -m1 '"bytes_fabric_read"' /tmp/pod-verbs.json | tr -dc 0-9)
[ "${fetched:-0}" -gt 0 ] || fail "no page crossed the fabric although 6 MiB > 4 MiB per node"
[ "$bytes" = $((fetched * 4096)) ] || fail "bytes_fabric_read $bytes is not 4096 x $fetched remote fetches"
echo "pod-verbs: ok: $fetched pages moved by RDMA READ on $RXE_DEV"
