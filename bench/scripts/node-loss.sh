#!/usr/bin/env bash
# Node-loss statistics: a 3-node pod runs `sharing` with a vCPU on every
# node; at a random moment 1-4 s after every node runs its vCPU, a random
# member (node 1 or 2) is killed (SIGKILL) or hung (SIGSTOP). For every
# node: the time from the signal to its exit and its exit status; for node
# 0: whether its error line names the node that was hit. TRIALS trials per
# fabric (tcp, shm) and fault kind (kill, stop). Writes
# bench/results/node-loss.{json,md}.
#
#   bench/scripts/node-loss.sh                  # 20 trials each: 80 pods, ~15 minutes
#   TRIALS=2 SEED=7 bench/scripts/node-loss.sh  # a quick look
#   bench/scripts/node-loss.sh --report         # the tables again, from the trials in node-loss.json
#
# Every node is started by this script as `shoal node --pod FILE --rank i`
# (as a cluster launcher would), so every node's exit status is its own,
# not reaped by node 0. Every wait is bounded (BOUND s, default 30): a node
# still running then is a hang, and is killed.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench/results
shoal=$PWD/target/release/shoal
trials=${TRIALS:-20}
bound=${BOUND:-30}
RANDOM=${SEED:-$$}
export SHOAL_POD_SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
work=$(mktemp -d /tmp/shoal-node-loss.XXXXXX)
records=$work/trials.jsonl
: >"$records"
report_only=
if [ "${1:-}" = --report ]; then
  report_only=1
  jq -c '.trials[] | del(.named, .right_node_named)' "$out/node-loss.json" >"$records"
  not_started=$(jq '.pods_that_did_not_start' "$out/node-loss.json")
  load_before=$(jq -r '.load_average_before // "-"' "$out/node-loss.json")
  load_after=$(jq -r '.load_average_after // "-"' "$out/node-loss.json")
else
  [ -x "$shoal" ] || cargo build --release --locked -p shoal-vmm
fi

now_ns() { date +%s%N; }

# pids of the nodes of the trial under way, for the cleanup on any exit
live=()
cleanup() {
  for p in "${live[@]}"; do
    kill -CONT "$p" 2>/dev/null || true
    kill -KILL "$p" 2>/dev/null || true
  done
}
trap 'cleanup; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# start_node DIR RANK: the node in the background; DIR/pidRANK holds its
# pid, DIR/rcRANK "status exit_ns" once it exited.
start_node() {
  local d=$1 r=$2
  (
    "$shoal" node --pod "$d/pod.toml" --rank "$r" </dev/null >"$d/out$r" 2>"$d/err$r" &
    echo $! >"$d/pid$r"
    set +e
    wait $!
    st=$?
    echo "$st $(now_ns)" >"$d/rc$r.tmp"
    mv "$d/rc$r.tmp" "$d/rc$r"
  ) &
}

exited() { [ -e "$1/rc$2" ]; }

# has_vcpu PID: the node runs a vCPU thread
has_vcpu() { grep -qs '^shoal-vcpu' /proc/"$1"/task/*/comm; }

# wait_exit DIR DEADLINE_NS RANK...: until every RANK exited or the deadline
wait_exit() {
  local d=$1 deadline=$2 r all
  shift 2
  while :; do
    all=1
    for r in "$@"; do exited "$d" "$r" || all=0; done
    [ $all = 1 ] && return 0
    [ "$(now_ns)" -ge "$deadline" ] && return 1
    sleep 0.01
  done
}

# trial FABRIC KIND N: one pod, one fault; appends a JSON line to $records.
# Returns 1 when the pod did not start (a port taken, a node that failed
# to join): not a trial.
trial() {
  local fabric=$1 kind=$2 n=$3
  local d=$work/$fabric-$kind-$n
  mkdir -p "$d"
  local id="nl$$-$fabric-$kind-$n"
  {
    echo "pod_id = \"$id\""
    echo "nodes = 3"
    echo "fabric = \"$fabric\""
    if [ "$fabric" = shm ]; then
      echo "socket_dir = \"$d\""
    else
      local port=$((20000 + RANDOM % 30000))
      echo "addresses = [\"127.0.0.1:$port\", \"127.0.0.1:$((port + 1))\", \"127.0.0.1:$((port + 2))\"]"
    fi
    echo 'memory = "64M"'
    echo 'guest = "sharing"'
    echo 'cmdline = "rounds=100000000 ipi=1"'
    echo 'cpus = 3'
    echo 'migration = false'
    echo 'join_timeout = 20.0'
  } >"$d/pod.toml"
  local r
  for r in 0 1 2; do start_node "$d" $r; done
  # every node's pid, then every node running its vCPU
  local deadline=$(($(now_ns) + bound * 1000000000)) pids=() started=1
  for r in 0 1 2; do
    while [ ! -s "$d/pid$r" ] && [ "$(now_ns)" -lt "$deadline" ]; do sleep 0.01; done
    pids[r]=$(cat "$d/pid$r" 2>/dev/null || echo 0)
  done
  live=("${pids[@]}")
  for r in 0 1 2; do
    while ! has_vcpu "${pids[r]}"; do
      if exited "$d" $r || [ "$(now_ns)" -ge "$deadline" ]; then
        started=0
        break 2
      fi
      sleep 0.02
    done
  done
  if [ $started = 0 ]; then
    echo "node-loss: $fabric $kind trial $n: the pod did not start; node 0 said: $(grep -m1 error "$d/err0" || true)" >&2
    cleanup
    wait_exit "$d" $(($(now_ns) + bound * 1000000000)) 0 1 2 || true
    wait
    live=()
    return 1
  fi
  local victim=$((1 + RANDOM % 2))
  local delay_ms=$((1000 + RANDOM % 3001))
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  local signal=KILL
  [ "$kind" = stop ] && signal=STOP
  # a node that ended before the fault (it should not: the guest runs for
  # minutes) makes the trial say so
  local early=false
  for r in 0 1 2; do exited "$d" $r && early=true; done
  kill -"$signal" "${pids[victim]}" 2>/dev/null || true
  local t0
  t0=$(now_ns)
  local others=() hung=()
  for r in 0 1 2; do [ $r = "$victim" ] || others+=("$r"); done
  wait_exit "$d" $((t0 + bound * 1000000000)) "${others[@]}" || true
  for r in "${others[@]}"; do exited "$d" "$r" || hung+=("$r"); done
  # let the stopped node go, so it can end and be reaped
  [ "$kind" = stop ] && kill -CONT "${pids[victim]}" 2>/dev/null
  wait_exit "$d" $(($(now_ns) + bound * 1000000000)) "$victim" || hung+=("$victim")
  cleanup
  wait
  live=()
  local line
  line=$(grep -m1 '^shoal: error:' "$d/err0" || true)
  local nodes_json="[]" st ns
  for r in 0 1 2; do
    read -r st ns <"$d/rc$r"
    local hang=false
    [[ " ${hung[*]} " == *" $r "* ]] && hang=true
    nodes_json=$(jq -c --argjson r $r --argjson st "$st" --argjson s "$(((ns - t0) / 1000000))" --argjson h $hang \
      --arg err "$(grep -m1 'error' "$d/err$r" | cut -c1-300 || true)" \
      '. + [{node: $r, exit_status: $st, exit_ms: $s, hang: $h, error: $err}]' <<<"$nodes_json")
  done
  jq -nc --arg f "$fabric" --arg k "$kind" --argjson n "$n" --argjson v $victim --argjson dl $delay_ms \
    --argjson early $early --arg line "$line" --argjson nodes "$nodes_json" \
    '{fabric: $f, kind: $k, trial: $n, victim: $v, delay_ms: $dl, ended_before_fault: $early, node0_error: $line, nodes: $nodes}' \
    >>"$records"
  echo "node-loss: $fabric $kind $n: node $victim; node 0 $(jq -r '.nodes[0] | "\(.exit_status) after \(.exit_ms) ms"' <<<"$(tail -1 "$records")"): $line" >&2
  rm -rf "$d"
}

if [ -z "$report_only" ]; then
  # the machine's load (1 and 5 minutes) around the run: others' builds and tests share it
  load_before=$(cut -d' ' -f1,2 /proc/loadavg)
  not_started=0
  for fabric in tcp shm; do
    for kind in kill stop; do
      n=0 tries=0
      while [ $n -lt "$trials" ] && [ $tries -lt $((trials * 2)) ]; do
        tries=$((tries + 1))
        if trial $fabric $kind $n; then n=$((n + 1)); else not_started=$((not_started + 1)); fi
      done
    done
  done
  load_after=$(cut -d' ' -f1,2 /proc/loadavg)
fi

python3 - "$records" "$out" "$not_started" "$bound" "$load_before" "$load_after" <<'PY'
import json, re, statistics, sys, os
records, out, not_started, bound = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
load_before, load_after = sys.argv[5], sys.argv[6]
trials = [json.loads(l) for l in open(records)]

def named(line):
    """The node node 0's error line blames: the node that left or went silent
    ("node 1: node 2 does not answer" blames node 2, relayed by node 1)."""
    m = re.search(r"node (\d+) (does not answer|left the pod|died|hangs)", line)
    if m:
        return int(m.group(1))
    m = re.findall(r"node (\d+)", line)
    return int(m[-1]) if m else None

for t in trials:
    t["named"] = named(t["node0_error"])
    t["right_node_named"] = t["named"] == t["victim"]

def stats(xs):
    return {"max_ms": max(xs), "median_ms": statistics.median(xs)} if xs else {"max_ms": None, "median_ms": None}

groups = []
for fabric in ("tcp", "shm"):
    for kind in ("kill", "stop"):
        ts = [t for t in trials if t["fabric"] == fabric and t["kind"] == kind]
        if not ts:
            continue
        n0 = [t["nodes"][0] for t in ts]
        surv = [n for t in ts for n in t["nodes"][1:] if n["node"] != t["victim"]]
        vict = [t["nodes"][t["victim"]] for t in ts]
        alive = n0 + surv
        groups.append({
            "fabric": fabric, "kind": kind, "trials": len(ts),
            "node0": stats([n["exit_ms"] for n in n0 if not n["hang"]]),
            "members": stats([n["exit_ms"] for n in surv if not n["hang"]]),
            "over_2s": sum(1 for n in alive if n["hang"] or n["exit_ms"] > 2000),
            "hangs": sum(1 for t in ts for n in t["nodes"] if n["hang"]),
            "wrong_node_named": sum(1 for t in ts if not t["right_node_named"]),
            "node0_exit_statuses": sorted({n["exit_status"] for n in n0}),
            "member_exit_statuses": sorted({n["exit_status"] for n in surv}),
            "victim_exit_statuses": sorted({n["exit_status"] for n in vict}),
            "ended_before_fault": sum(1 for t in ts if t["ended_before_fault"]),
        })

kernel = open("/proc/sys/kernel/osrelease").read().strip()
cpus = os.cpu_count()
doc = {"host": {"kernel": kernel, "cpus": cpus}, "bound_s": bound, "pods_that_did_not_start": not_started,
       "load_average_before": load_before, "load_average_after": load_after, "groups": groups, "trials": trials}
with open(f"{out}/node-loss.json", "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")

def ms(v):
    return "-" if v is None else f"{v / 1000:.2f}"

md = ["# Node loss", "",
      "`bench/scripts/node-loss.sh`: 3-node pods (`shoal node --pod FILE --rank i` each) running `sharing` "
      "(`rounds=100000000 ipi=1`, 3 vCPUs, one a node, migration off, 64 MiB); 1-4 s after every node runs its vCPU "
      "a random member (node 1 or 2) is killed (SIGKILL) or hung (SIGSTOP; continued once the rest ended). "
      f"Times from the signal to a node's exit; a node still running {bound} s after it is a hang. "
      f"Host: {kernel}, {cpus} CPUs shared with other builds and tests (load average, 1 and 5 min, "
      f"before the run: {load_before}, after: {load_after}).", "",
      "| fabric | fault | trials | node 0 median s | node 0 max s | surviving member median s | max s | > 2 s | hangs | wrong node named | node 0 status | member status | victim status |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
for g in groups:
    md.append(f"| {g['fabric']} | {g['kind']} | {g['trials']} | {ms(g['node0']['median_ms'])} | **{ms(g['node0']['max_ms'])}** | "
              f"{ms(g['members']['median_ms'])} | **{ms(g['members']['max_ms'])}** | {g['over_2s']} | {g['hangs']} | "
              f"{g['wrong_node_named']} | {', '.join(map(str, g['node0_exit_statuses']))} | "
              f"{', '.join(map(str, g['member_exit_statuses']))} | {', '.join(map(str, g['victim_exit_statuses']))} |")
md += ["", "Targets (issue 10): every surviving node gone ≤ 2 s after the fault, node 0 exiting 70 and naming the node "
       "that was hit, 0 hangs. \"> 2 s\" counts node 0 and the surviving member. A victim's status: 137 for SIGKILL; "
       "a stopped node, continued after the pod ended, exits on its own. "
       f"Pods that did not start (not counted as trials): {not_started}."]
slow = [t for t in trials if any(n["hang"] or (n["exit_ms"] > 2000 and (n["node"] != t["victim"])) for n in t["nodes"])]
if slow:
    md += ["", "Trials where a surviving node took over 2 s (times in ms from the signal, node 0, 1, 2):", ""]
    for t in slow:
        md.append(f"- {t['fabric']} {t['kind']} trial {t['trial']}, node {t['victim']} hit: "
                  f"{', '.join(str(n['exit_ms']) for n in t['nodes'])}; node 0: `{t['node0_error']}`")
wrong = [t for t in trials if not t["right_node_named"]]
if wrong:
    md += ["", "Trials where node 0 did not name the node that was hit:", ""]
    for t in wrong:
        md.append(f"- {t['fabric']} {t['kind']} trial {t['trial']}, node {t['victim']} hit: `{t['node0_error']}`")
with open(f"{out}/node-loss.md", "w") as f:
    f.write("\n".join(md) + "\n")
print("\n".join(md))
PY
