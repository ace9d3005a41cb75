#!/bin/sh
# Runs inside the soft-RoCE harness (ci/softroce.sh) with shoal copied in:
# a 2-node pod over verbs on rxe0, nested KVM for the guest. memtouch
# touches more than either node may hold, so pages cross with RDMA READs,
# each checked against its owner's digest (--verify-pages on: a page whose
# RDMA READ brought other bytes would end the VM). Checks the guest's own
# verdict and the metrics, and that --node-memory bounds real memory over
# verbs too: on every node the memfd holds exactly its resident pages, no
# 2 MiB chunk was registered, exposures (one registration per page a peer
# may read) end as pages leave, and what the process pins is its resident
# pages and the transport's buffers at most; and that the home read pages
# parked by its evictions directly, under the key the parking node gave.
# Then the sharing guest with a vCPU on each node, under the same bound.
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
# The bound, per node, from a run's metrics (pretty-printed JSON: one key
# a line; the totals first, then each node from its "node" key on);
# evicting=1: pages left the nodes (exposures ended, parked pages read
# directly by their home)
bound_holds() {
  awk -v evicting="$2" -F': ' '
function num(s) { gsub(/[^0-9.]/, "", s); return s + 0 }
/"node":/ { n = num($2); nodes[n] = 1; next }
n == "" { next }
/"pages_resident":/ { res[n] = num($2) }
/"memfd_bytes":/ { memfd[n] = num($2) }
/"pinned_bytes":/ { pin[n] = num($2) }
/"exposures":/ { xp[n] = num($2) }
/"exposures_ended":/ { ended[n] = num($2) }
/"exposure_us":/ { us[n] = num($2) }
/"chunks_registered":/ { chunks[n] = num($2) }
/"faults_remote_direct":/ { direct[n] = num($2) }
/"pages_shared":/ { shared[n] = num($2) }
END {
  bad = 0
  for (k in nodes) {
    live = xp[k] - ended[k]
    printf "node %d: %d pages resident, memfd %d bytes, pinned %d bytes, %d exposures (%d ended, %d live, %.1f us each), %d chunks registered, %d direct faults, %d pages shared\n", k, res[k], memfd[k], pin[k], xp[k], ended[k], live, (xp[k] + ended[k]) ? us[k] / (xp[k] + ended[k]) : 0, chunks[k], direct[k], shared[k]
    if (memfd[k] != 4096 * res[k]) { print "node " k ": memfd_bytes is not 4096 x pages_resident"; bad = 1 }
    if (chunks[k] != 0) { print "node " k ": a chunk was registered (pinning 2 MiB)"; bad = 1 }
    if (live > res[k]) { print "node " k ": more pages exposed than resident"; bad = 1 }
    if (evicting && ended[k] == 0) { print "node " k ": no exposure ended although pages left"; bad = 1 }
    if (pin[k] > 4096 * res[k] + 8 * 1048576) { print "node " k ": pins more than its pages and the transport buffers"; bad = 1 }
    # what is pinned beyond the live exposures is the transport buffers,
    # the same on every node: the exposures are all a node pins for pages
    other = pin[k] - 4096 * live
    if (buffers == "") buffers = other
    if (other != buffers) { print "node " k ": pins " other " bytes beyond its exposures, another node " buffers; bad = 1 }
    total_direct += direct[k]
  }
  if (evicting && total_direct == 0) { print "no page parked by an eviction was read directly by its home (the key Fetched carries)"; bad = 1 }
  exit bad
}
' "$1"
}
bound_holds /tmp/pod-verbs.json 1 || fail "the memory bound does not hold over verbs (above)"

# vCPUs on both nodes: one writes a page the other polls, so pages cross
# to the reader (as read copies where the kernel can map a copy write-
# protected, else as transfers; each read under the owner's key) and
# back by every write
status=0
timeout 300 shoal run --guest sharing --memory 32M --cmdline "rounds=20" --cpus 2 --nodes 2 --fabric verbs \
  --migration off --liveness-timeout 30 --metrics-json /tmp/pod-verbs-sharing.json >"$out" || status=$?
cat "$out"
[ "$status" = 0 ] || fail "sharing: shoal exited with status $status"
grep -q "sharing: readers=1 rounds=20 ipi=0" "$out" && grep -q " ok" "$out" || fail "sharing: the reader missed a value"
bound_holds /tmp/pod-verbs-sharing.json 0 || fail "sharing: the memory bound does not hold over verbs (above)"
echo "pod-verbs: ok: $fetched pages moved by RDMA READ on $RXE_DEV"
