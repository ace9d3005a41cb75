#!/usr/bin/env bash
# A single-host Slurm cluster for tests: starts munged, slurmctld and
# slurmd as root without systemd (state under $SHOAL_SLURM_DIR, default
# /var/tmp/shoal-slurm), runs the command given after `--` with SLURM_CONF
# exported, stops the daemons again, and exits with the command's status.
#
#   ci/slurm.sh -- srun -N1 -n2 shoal node --pod pod.toml
#
# What it takes to run Slurm here (Debian 12, slurm 22.05, no systemd, no
# cgroups): the proctrack/linuxproc and task/none plugins (the cgroup ones
# fail), the controller and node on 127.0.0.1, and a munge socket of our
# own. The packages come from ci/packages.txt (ci/install-deps.sh).
set -euo pipefail

[ "${1:-}" = -- ] || { echo "usage: ci/slurm.sh -- COMMAND..." >&2; exit 2; }
shift
[ $# -gt 0 ] || { echo "usage: ci/slurm.sh -- COMMAND..." >&2; exit 2; }

dir=${SHOAL_SLURM_DIR:-/var/tmp/shoal-slurm}
run=$dir/run log=$dir/log state=$dir/state
mkdir -p "$dir/etc" "$run" "$log" "$state/ctld" "$state/d" "$state/munge"
export SLURM_CONF=$dir/etc/slurm.conf
sock=$run/munge.socket
host=$(hostname -s)
say() { echo "[slurm $(date +%T)] $*" >&2; }

pids=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap stop_all EXIT

key=$dir/etc/munge.key
[ -s "$key" ] || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
chmod 0400 "$key"; chmod 0700 "$state/munge"
setsid /usr/sbin/munged --foreground --force --key-file="$key" --socket="$sock" \
  --pid-file="$run/munged.pid" --seed-file="$state/munge/seed" >>"$log/munged.out" 2>&1 </dev/null &
pids+=($!)
for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { say "munged did not start"; cat "$log/munged.out" >&2; exit 1; }

cpus=$(nproc)
cat >"$SLURM_CONF" <<CONF
ClusterName=shoal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=$log/slurmctld.log
SlurmdLogFile=$log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
InactiveLimit=0
KillWait=5
NodeName=$host CPUs=$cpus NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=60 State=UP OverSubscribe=YES
CONF

setsid /usr/sbin/slurmctld -D -i -f "$SLURM_CONF" >>"$log/slurmctld.out" 2>&1 </dev/null &
pids+=($!)
setsid /usr/sbin/slurmd -D -f "$SLURM_CONF" >>"$log/slurmd.out" 2>&1 </dev/null &
pids+=($!)
for i in $(seq 1 120); do
  [ "$(sinfo -h -n "$host" -o %t 2>/dev/null || true)" = idle ] && break
  [ "$i" = 120 ] && { say "the node never became idle"; tail -n 20 "$log"/*.log >&2; exit 1; }
  sleep 0.5
done
say "cluster up ($host, $cpus CPUs)"

status=0
"$@" || status=$?
say "command exited with status $status"
exit $status
