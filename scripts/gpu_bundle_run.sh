#!/usr/bin/env bash
# Runs vattn's GPU tests from the self-contained bundle (built by
# scripts/build_gpu_bundle.sh, copied into the bundle as run_gpu.sh).
#
#   bundle/run_gpu.sh [extra gtest flags...]
#
# Runs every binary listed in gpu_tests.txt and every *_gpu_test beside this
# script, each with --gtest_output=json into $OUT (when set) or bundle/results.
# Prints one row per test case (test, passed/failed/skipped, time) and a row
# per binary, then runs map_bench --backends=host,cuda (JSON into the same
# place; VATTN_SKIP_MAP_BENCH=1 skips it) and batch_decode --compare-paged
# at batch 32 (contexts up to 16k) and 256 (VATTN_SKIP_BATCH_DECODE=1 skips
# them), and prints nvidia-smi's GPU name line. Exits non-zero when any test
# failed or any binary crashed. Needs only bash, coreutils, grep and awk.
#
# Files in the results folder (the device machine returns at most 8): one
# gtest JSON per GPU test binary (3 today), map_bench.json, one JSON per
# batch_decode run (2) and logs.txt, every step's full log appended as soon
# as the step ends (so a run cut short still leaves what it did): 7 in all.
# Per-step logs live in a scratch folder outside the results.
#
# The whole run keeps within VATTN_RUN_BUDGET_S seconds (default 480, under
# the device machine's 10-minute command limit): each step's timeout is cut
# to what is left, a step with under 20 s left is skipped, and the summary
# table is always printed last.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RESULTS="${OUT:-$HERE/results}"
mkdir -p "$RESULTS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vattn_gpu_run.XXXXXX")"
ALL_LOGS="$RESULTS/logs.txt"
: >"$ALL_LOGS"
PER_BINARY_TIMEOUT="${PER_BINARY_TIMEOUT:-180}"
RUN_BUDGET_S="${VATTN_RUN_BUDGET_S:-480}"
RUN_START=$(date +%s)

# Seconds a step may take: its own cap, cut to the budget that is left
# (minus 25 s: a step that ignores SIGTERM is killed 10 s later, and the
# summary comes after). Prints 0 when under 20 s are left.
step_timeout() {
  local left=$((RUN_BUDGET_S - ($(date +%s) - RUN_START) - 25))
  if ((left < 20)); then echo 0; elif (($1 < left)); then echo "$1"; else echo "$left"; fi
}
# Appends a step's log to logs.txt under a header.
keep_log() {  # name, log file
  { echo "===== $1"; cat "$2" 2>/dev/null; echo; } >>"$ALL_LOGS"
}

mapfile -t tests < <(
  {
    [[ -f "$HERE/gpu_tests.txt" ]] && cat "$HERE/gpu_tests.txt"
    for f in "$HERE"/*_gpu_test; do [[ -x "$f" ]] && basename "$f"; done
  } | sort -u)
if ((${#tests[@]} == 0)); then
  echo "run_gpu: no GPU test binaries in $HERE" >&2
  exit 2
fi

# The C++ runtime: the system's when the binaries start with it, else the
# copy in fallback/ (which needs a glibc at least as new as the build
# machine's; see build_gpu_bundle.sh). VATTN_BUNDLE_RUNTIME=fallback forces
# the copy.
probe_start() { "$HERE/${tests[0]}" --gtest_list_tests >/dev/null 2>"$WORK/probe.err"; }
runtime="system"
if [[ "${VATTN_BUNDLE_RUNTIME:-}" == fallback ]] || ! probe_start; then
  export LD_LIBRARY_PATH="$HERE/fallback${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  runtime="fallback/"
  if ! probe_start; then
    echo "run_gpu: ${tests[0]} does not start with the system's C++ runtime nor with fallback/:" >&2
    cat "$WORK/probe.err" >&2
    echo "glibc here: $(ldd --version 2>&1 | head -1)" >&2
    exit 2
  fi
fi

echo "== vattn GPU bundle $(cat "$HERE/VERSION" 2>/dev/null || echo '?') on $(cat /proc/sys/kernel/hostname 2>/dev/null || echo '?')"
echo "== $(ldd --version 2>&1 | head -1); C++ runtime: $runtime"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 |
    sed 's/^/== GPU: /'
else
  echo "== GPU: nvidia-smi not found"
fi

status=0
summary=()
for t in "${tests[@]}"; do
  bin="$HERE/$t"
  [[ -x "$bin" ]] || { echo "run_gpu: $t missing" >&2; status=1; continue; }
  log="$WORK/$t.log"
  limit=$(step_timeout "$PER_BINARY_TIMEOUT")
  if ((limit == 0)); then
    echo "run_gpu: $t not run: the ${RUN_BUDGET_S}s budget is spent" >&2
    summary+=("$(printf '%-34s %6s %6s %7s %9s  not run (budget)' "$t" - - - -)")
    status=1; continue
  fi
  start=$(date +%s.%N)
  timeout -k 10 "$limit" "$bin" --gtest_output="json:$RESULTS/$t.json" \
    --gtest_color=no "$@" >"$log" 2>&1
  rc=$?
  keep_log "$t (rc=$rc)" "$log"
  secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f", e - s}')
  read -r passed failed skipped < <(awk '
    /^\[       OK \] /        {p++}
    /^\[  FAILED  \] .*\(/    {f++}
    /^\[  SKIPPED \] .*\(/    {s++}
    END {print p+0, f+0, s+0}' "$log")
  if ((rc != 0)); then status=1; fi
  summary+=("$(printf '%-34s %6s %6s %7s %8ss  rc=%d' "$t" "$passed" "$failed" "$skipped" "$secs" "$rc")")

  echo
  echo "== $t (rc=$rc, ${secs}s; full log in $ALL_LOGS)"
  printf '%-72s %-8s %s\n' "test" "result" "time"
  awk '
    /^\[       OK \] /     {r = "passed"}
    /^\[  FAILED  \] .*\(/ {r = "FAILED"}
    /^\[  SKIPPED \] .*\(/ {r = "skipped"}
    r != "" {
      line = $0; sub(/^\[[^]]*\] /, "", line)
      name = line; sub(/ \(.*$/, "", name)
      tm = line; sub(/^.*\(/, "", tm); sub(/\).*$/, "", tm)
      printf "%-72s %-8s %s\n", name, r, tm
      r = ""
    }' "$log"
  # Why tests failed (first lines of each failure), and the distinct reasons
  # for skips.
  grep -E -A3 ': Failure$' "$log" | head -40 | sed 's/^/   | failure: /'
  grep -A1 -E ': Skipped$' "$log" | grep -v -E ': Skipped$|^--$' | sort | uniq -c |
    sort -rn | head -5 | sed 's/^ */   | skipped x/'
  if ((rc > 1)); then
    echo "   | binary exited with rc=$rc (crash or timeout); last lines:"
    tail -5 "$log" | sed 's/^/   | /'
  fi
done

# The map path against the driver's floor: map_bench on CUDA, with the Host
# figures in the same run (ratios are within one backend), JSON into
# $RESULTS. Takes well under a minute on an H100/H200; capped by
# MAP_BENCH_TIMEOUT (default 150 s) and by the run's budget.
if [[ -x "$HERE/map_bench" && "${VATTN_SKIP_MAP_BENCH:-}" != 1 ]] &&
   limit=$(step_timeout "${MAP_BENCH_TIMEOUT:-150}") && ((limit > 0)); then
  echo
  echo "== map_bench --backends=host,cuda (JSON: $RESULTS/map_bench.json)"
  start=$(date +%s.%N)
  timeout -k 10 "$limit" "$HERE/map_bench" --backends=host,cuda \
    --benchmark_out="$RESULTS/map_bench.json" --benchmark_out_format=json \
    >"$WORK/map_bench.log" 2>&1
  rc=$?
  keep_log "map_bench (rc=$rc)" "$WORK/map_bench.log"
  secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f", e - s}')
  # Raw calls (benchmark, median us), the summary tables (library vs raw,
  # with the ratio column) and any error.
  awk '/^Raw\// {p50 = ""; for (i = 1; i <= NF; i++) if ($i ~ /^p50_us=/) p50 = substr($i, 8);
       printf "%-44s p50 %s us\n", $1, p50}' "$WORK/map_bench.log"
  sed -n '/^Library path vs raw/,$p' "$WORK/map_bench.log"
  grep -m3 'ERROR OCCURRED' "$WORK/map_bench.log" | sed 's/^/   | /'
  if ((rc != 0)); then status=1; fi
  summary+=("$(printf '%-34s %6s %6s %7s %8ss  rc=%d' map_bench - - - "$secs" "$rc")")
elif [[ -x "$HERE/map_bench" && "${VATTN_SKIP_MAP_BENCH:-}" != 1 ]]; then
  summary+=("$(printf '%-34s %6s %6s %7s %9s  not run (budget)' map_bench - - - -)")
  status=1
fi

# The main job on the GPU: batch_decode, vattn against the paged baseline on
# the same requests (Llama-3-8B shape, fp16), with attention outputs checked
# against the float64 reference: batch 32 with contexts up to 16k, and
# batch 256. JSON summaries into $RESULTS. About a minute in all on an
# H100/H200; each run capped by BATCH_DECODE_TIMEOUT (default 150 s) and by
# the run's budget; VATTN_SKIP_BATCH_DECODE=1 skips them.
if [[ -x "$HERE/batch_decode" && "${VATTN_SKIP_BATCH_DECODE:-}" != 1 ]]; then
  run_batch_decode() {  # name, flags...
    local name="$1"; shift
    local start rc secs limit
    limit=$(step_timeout "${BATCH_DECODE_TIMEOUT:-150}")
    if ((limit == 0)); then
      echo "run_gpu: $name not run: the ${RUN_BUDGET_S}s budget is spent" >&2
      summary+=("$(printf '%-34s %6s %6s %7s %9s  not run (budget)' "$name" - - - -)")
      status=1; return
    fi
    echo
    echo "== batch_decode $* (JSON: $RESULTS/$name.json)"
    start=$(date +%s.%N)
    timeout -k 10 "$limit" "$HERE/batch_decode" --backend=cuda --no-progress \
      --compare-paged --json="$RESULTS/$name.json" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    keep_log "$name (rc=$rc)" "$WORK/$name.log"
    secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f", e - s}')
    cat "$WORK/$name.log"
    if ((rc != 0)); then status=1; fi
    summary+=("$(printf '%-34s %6s %6s %7s %8ss  rc=%d' "$name" - - - "$secs" "$rc")")
  }
  run_batch_decode batch_decode_llama3_8b_b32_16k --model=llama3-8b --max_slots=32 \
    --max_tokens=16384 --requests=64 --prompt=1024:15360 --output=32:128 --check=4
  run_batch_decode batch_decode_llama3_8b_b256 --model=llama3-8b --max_slots=256 \
    --max_tokens=4096 --requests=512 --prompt=128:2048 --output=64:256 --check=4
fi

echo
echo "== summary"
printf '%-34s %6s %6s %7s %9s\n' "binary" "passed" "failed" "skipped" "time"
printf '%s\n' "${summary[@]}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L 2>&1 | head -4 | sed 's/^/== /'
fi
echo "== results (JSON, logs.txt): $RESULTS ($(ls "$RESULTS" | wc -l) files)"
rm -rf "$WORK"
exit "$status"
