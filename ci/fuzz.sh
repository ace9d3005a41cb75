#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer, through libfuzzer-sys, on the stable
# toolchain) of every decoder that takes bytes from outside: see
# fuzz/README.md. Builds every target of fuzz/ and runs each for a bounded
# time, starting from the checked-in seeds (fuzz/corpus/TARGET) and what
# earlier runs on this machine found; exits non-zero when any target finds
# a crash, a hang or an out-of-memory input, naming the file that holds it.
#
#   ci/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   # default 20 s, every target
#   ci/fuzz.sh 3600                                # a longer campaign: an hour each
#
# FUZZ_JOBS targets run at once (default: the CPUs here). Work files live
# under $SHOAL_FUZZ_DIR (default /var/tmp/shoal-fuzz): the build, the
# corpus each target grew (kept from run to run), crash files, logs.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-20}
shift || true
[[ $secs =~ ^[1-9][0-9]*$ ]] || { echo "usage: ci/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2; }
mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^shoal-fuzz$')
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  printf '%s\n' "${all[@]}" | grep -qx "$t" || { echo "ci/fuzz.sh: no target $t (targets: ${all[*]})" >&2; exit 2; }
done

work=${SHOAL_FUZZ_DIR:-/var/tmp/shoal-fuzz}
jobs=${FUZZ_JOBS:-$(nproc)}
triple=$(rustc -vV | sed -n 's/^host: //p')
mkdir -p "$work"

# What `cargo fuzz build -s none` does (cargo-fuzz 0.13), without the
# tool: SanitizerCoverage through stable codegen flags, for the target
# only (--target keeps them off build scripts and proc macros). No
# sanitizer: those need a nightly compiler. Debug assertions and overflow
# checks are on (fuzz/Cargo.toml), as in the test suite.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Ccodegen-units=1 --cfg fuzzing"
export CARGO_TARGET_DIR=$work/target
start=$SECONDS
cargo build --manifest-path fuzz/Cargo.toml --locked --release --target "$triple" \
  $(printf -- '--bin %s ' "${targets[@]}")
echo "ci/fuzz.sh: built ${#targets[@]} targets in $((SECONDS - start)) s; fuzzing each for $secs s, $jobs at once" >&2
bin=$CARGO_TARGET_DIR/$triple/release

run() { # target
  local t=$1
  mkdir -p "$work/corpus/$t" "$work/crashes/$t"
  # new inputs go to the first directory (ours), never to the seeds;
  # -timeout: one input running over 10 s is a hang; -rss_limit_mb: a
  # decoder that allocates 2 GiB for an input is a bug too
  "$bin/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$work/crashes/$t/" "$work/corpus/$t" "fuzz/corpus/$t" >"$work/$t.log" 2>&1
}

declare -A pid_of status_of
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run "$t" & pid_of[$t]=$!
  running=$((running + 1))
done
for t in "${targets[@]}"; do
  rc=0
  wait "${pid_of[$t]}" || rc=$?
  status_of[$t]=$rc
done

failed=0
printf '%-18s %10s %8s %8s %8s %9s  %s\n' target execs exec/s cov ft corpus result >&2
for t in "${targets[@]}"; do
  log=$work/$t.log
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  result=ok
  if [ "${status_of[$t]}" != 0 ]; then
    failed=1
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    result="FAILED (status ${status_of[$t]}): input ${artifact:-not written, see $log}"
  fi
  printf '%-18s %10s %8s %8s %8s %9s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result" >&2
done
if [ "$failed" = 1 ]; then
  for t in "${targets[@]}"; do
    [ "${status_of[$t]}" = 0 ] && continue
    echo >&2
    echo "=== $t: the end of $work/$t.log" >&2
    grep -v '^#[0-9]' "$work/$t.log" | tail -n 40 >&2
    echo "reproduce: $bin/$t INPUT   (the input file is named above)" >&2
  done
  exit 1
fi
echo "ci/fuzz.sh: no crash in ${#targets[@]} targets, $secs s each ($((SECONDS - start)) s with the build)" >&2
