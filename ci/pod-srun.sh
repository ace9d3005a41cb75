#!/usr/bin/env bash
# A 2-node pod under Slurm, as a cluster runs it: `srun -N1 -n2 shoal node
# --pod FILE`, rank and size from Slurm's environment. Checks the guest's
# own output and both nodes' metrics, not only srun's status (srun exits 0
# even when a task could not start). Run it inside ci/slurm.sh:
#
#   ci/slurm.sh -- ci/pod-srun.sh target/debug/shoal
set -euo pipefail
shoal=$(realpath "${1:?usage: ci/pod-srun.sh SHOAL_BINARY}")
dir=$(mktemp -d /var/tmp/shoal-srun.XXXXXX)
trap 'rm -rf "$dir"' EXIT
head -c 32 /dev/urandom >"$dir/secret"
# ranks listen at port and port + 1: below Linux's default ephemeral range (32768
# and up), so no outgoing connection or bind(0) elsewhere holds them
port=$((20000 + RANDOM % 12000))
cat >"$dir/pod.toml" <<POD
pod_id = "srun-$$"
fabric = "tcp"
port = $port
secret_file = "$dir/secret"
memory = "64M"
node_memory = "12M"
guest = "memtouch"
cmdline = "mib=20 seed=9"
metrics_json = "$dir/metrics.json"
join_timeout = 30.0
timeout = 300.0
POD
status=0
timeout 360 srun -N1 -n2 --kill-on-bad-exit=1 "$shoal" node --pod "$dir/pod.toml" >"$dir/out" 2>"$dir/err" || status=$?
cat "$dir/out"
cat "$dir/err" >&2
fail() { echo "pod-srun: FAILED: $*" >&2; exit 1; }
[ "$status" = 0 ] || fail "srun exited with status $status"
grep -q "memtouch: verified 5120 pages" "$dir/out" || fail "the guest did not verify its memory"
[ -s "$dir/metrics.json" ] || fail "node 0 wrote no metrics"
[ "$(grep -c '"node":' "$dir/metrics.json")" = 2 ] || fail "the metrics do not hold 2 nodes"
fetched=$(grep -m1 '"remote_fetches"' "$dir/metrics.json" | tr -dc 0-9)
[ "${fetched:-0}" -gt 0 ] || fail "no page crossed the fabric although 20 MiB > 12 MiB per node"
echo "pod-srun: ok: 2 Slurm tasks ran one guest; $fetched remote fetches in total"
