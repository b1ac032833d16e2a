#!/usr/bin/env bash
# Every GPU path of vattn in one call, from the self-contained bundle (built
# by scripts/build_gpu_bundle.sh, copied into the bundle as run_gpu.sh):
#
#   bundle/run_gpu.sh                  # results into $OUT (or bundle/results)
#   VATTN_GPU_DRY_RUN=1 bundle/run_gpu.sh   # no device: check, skip, report
#
# Steps, in this order (most telling first, so a run cut short by its budget
# still says the most), each with its own timeout; a step that fails or
# times out does not stop the others:
#   1. every gpu test binary of gpu_tests.txt (gtest), contract suite first:
#      backend_contract_gpu_test (the backend contract on CUDA),
#      cuda_gpu_test (streams, fences on a blocked stream), any
#      kv_cache*_gpu_test (the cache on CUDA: a real fence, then forced
#      reclamation), attention_gpu_test (kernels vs the float64 reference)
#   2. python: the Python package's tests (pytest tests/python) on CUDA with
#      the machine's torch, in a venv (--system-site-packages) holding the
#      wheel from bundle/python/ (skipped, with the reason, when the wheel,
#      torch or pytest is missing; without transformers only the tests
#      that need it skip)
#   3. batch_decode --compare-paged, Llama-3-8B, batch 32, contexts to 16k
#   4. map_bench --backends=cuda,host
#   5. step_bench --backends=cuda
#   6. peer_bench on CUDA (skipped, with the reason, when not in the bundle)
#   7. batch_decode --compare-paged, Llama-3-8B, batch 256
# and prints ONE table: step, pass/fail/skip, seconds, a short detail.
# Exit status: 0 when no step failed, 1 otherwise, 2 when the bundle cannot
# run at all.
#
# Limits (the device machine's): the whole run keeps within
# VATTN_RUN_BUDGET_S seconds (default 480 = 8 minutes): each step's timeout
# is cut to what is left (minus 25 s: a step that ignores SIGTERM is killed
# 10 s later, then the table is printed), and a step with under 20 s left is
# skipped ("budget"). At most 7 files are written under the results folder:
#   logs.txt (every step's full log, appended as each step ends, and the
#   table), map_bench.json, step_bench.json, peer_bench.json,
#   batch_decode_b32_16k.json, batch_decode_b256.json, pytest.xml.
# gtest JSON and per-step logs live in a scratch folder; anything else a
# step leaves in the results folder is folded into logs.txt and removed.
#
# Dry run (VATTN_GPU_DRY_RUN=1, or automatically when no NVIDIA device is
# found; VATTN_GPU_DRY_RUN=0 forces a real run): every step is checked
# without a device - its binary is in the bundle and starts
# (--gtest_list_tests or --help), the wheel is there - and reported as skip
# with the reason; a binary that does not start is a fail.
#
# Knobs: VATTN_RUN_BUDGET_S, VATTN_GPU_STEPS (comma list of step names to
# run; default all), VATTN_STEP_CAP_S (lowers every step's cap),
# VATTN_KILL_GRACE_S (10: SIGKILL that long after a step's SIGTERM),
# VATTN_BUNDLE_RUNTIME=fallback (use fallback/'s C++ runtime), PYTHON
# (python3). Needs bash, coreutils, grep, awk. tests/gpu_bundle_test.sh
# checks the budget, timeout, file-limit and dry-run logic on stubs.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RESULTS="${OUT:-$HERE/results}"
mkdir -p "$RESULTS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vattn_gpu_run.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ALL_LOGS="$RESULTS/logs.txt"
: >"$ALL_LOGS"
RUN_BUDGET_S="${VATTN_RUN_BUDGET_S:-480}"
MAX_FILES=7
RUN_START=$(date +%s)
PYTHON="${PYTHON:-python3}"

# ---- Budget --------------------------------------------------------------------
# Seconds a step may take: its own cap, cut to what is left of the budget
# (minus 25 s for the kill grace and the table). 0 when under 20 s are left.
STEP_CAP_S="${VATTN_STEP_CAP_S:-}"   # lowers every step's cap (tests)
KILL_GRACE_S="${VATTN_KILL_GRACE_S:-10}"
step_timeout() {  # cap
  local cap="$1" left=$((RUN_BUDGET_S - ($(date +%s) - RUN_START) - 25))
  [[ -n "$STEP_CAP_S" ]] && ((STEP_CAP_S < cap)) && cap="$STEP_CAP_S"
  if ((left < 20)); then echo 0; elif ((cap < left)); then echo "$cap"; else echo "$left"; fi
}
keep_log() {  # title, log file
  { echo "===== $1"; cat "$2" 2>/dev/null; echo; } >>"$ALL_LOGS"
}
now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN {printf "%.1f", e - s}'; }

# ---- The table -------------------------------------------------------------------
rows=()
failed=0
row() {  # step, result (pass/fail/skip), seconds, detail
  rows+=("$(printf '%-26s %-5s %7s  %s' "$1" "$2" "$3" "$4")")
  [[ "$2" == fail ]] && failed=1
  printf '== %-26s %-5s %7s  %s\n' "$1" "$2" "$3" "$4"
}
wanted() {  # step name: in VATTN_GPU_STEPS (or no list given)?
  [[ -z "${VATTN_GPU_STEPS:-}" ]] && return 0
  [[ ",${VATTN_GPU_STEPS}," == *",$1,"* ]]
}

# ---- Device or dry run -------------------------------------------------------------
DRY=0
DRY_WHY=""
if [[ "${VATTN_GPU_DRY_RUN:-}" == 1 ]]; then
  DRY=1; DRY_WHY="dry run (VATTN_GPU_DRY_RUN=1)"
elif [[ "${VATTN_GPU_DRY_RUN:-}" != 0 ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 && [[ ! -e /dev/nvidia0 ]]; then
    DRY=1; DRY_WHY="dry run: no NVIDIA device (no nvidia-smi, no /dev/nvidia0)"
  elif command -v nvidia-smi >/dev/null 2>&1 && ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    DRY=1; DRY_WHY="dry run: nvidia-smi lists no GPU"
  fi
fi

# ---- The bundle's binaries and C++ runtime -------------------------------------------
mapfile -t gtests < <(
  {
    [[ -f "$HERE/gpu_tests.txt" ]] && cat "$HERE/gpu_tests.txt"
    for f in "$HERE"/*_gpu_test; do [[ -x "$f" ]] && basename "$f"; done
  } | sort -u |
  # Contract suite first, the CUDA backend, the cache, the kernels last.
  awk '{p = 5}
       /^backend_contract/ {p = 1} /^cuda_/ {p = 2} /^kv_cache/ {p = 3}
       /^attention/ {p = 4} {print p, $0}' | sort -k1,1n -k2 | cut -d' ' -f2)
probe_bin=""
for f in "${gtests[@]}"; do [[ -x "$HERE/$f" ]] && { probe_bin="$f"; break; }; done
if [[ -z "$probe_bin" ]]; then
  echo "run_gpu: no GPU test binaries in $HERE" >&2
  exit 2
fi
# The system's C++ runtime when the binaries start with it, else fallback/
# (see build_gpu_bundle.sh).
probe_start() { timeout 30 "$HERE/$probe_bin" --gtest_list_tests >/dev/null 2>"$WORK/probe.err"; }
runtime="system"
if [[ "${VATTN_BUNDLE_RUNTIME:-}" == fallback ]] || ! probe_start; then
  export LD_LIBRARY_PATH="$HERE/fallback${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  runtime="fallback/"
  if ! probe_start; then
    echo "run_gpu: $probe_bin starts neither with the system's C++ runtime nor with fallback/:" >&2
    cat "$WORK/probe.err" >&2
    echo "glibc here: $(ldd --version 2>&1 | head -1)" >&2
    exit 2
  fi
fi

{
  echo "== vattn GPU bundle $(cat "$HERE/VERSION" 2>/dev/null || echo '?') on $(cat /proc/sys/kernel/hostname 2>/dev/null || echo '?'), $(date -u +%FT%TZ)"
  echo "== $(ldd --version 2>&1 | head -1); C++ runtime: $runtime; budget ${RUN_BUDGET_S}s"
  if ((DRY)); then
    echo "== $DRY_WHY"
  else
    if command -v nvidia-smi >/dev/null 2>&1; then
      nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used \
        --format=csv,noheader 2>&1 | sed 's/^/== GPU: /'
    else
      echo "== GPU: nvidia-smi not found"
    fi
  fi
} | tee -a "$ALL_LOGS"

# Does the binary start? (the dry run's check; cheap in a real run too)
starts() {  # name, probe flag
  timeout 20 "$HERE/$1" "$2" >"$WORK/$1.probe" 2>&1
}

# ---- Steps -------------------------------------------------------------------------
# A gtest binary: pass when it exits 0 with some test run, skip when every
# test skipped (with the first reason), fail otherwise.
run_gtest() {  # name, cap
  local name="$1" cap="$2" limit start rc secs p f s why
  wanted "$name" || return 0
  if ((DRY)); then
    if starts "$name" --gtest_list_tests; then
      row "$name" skip - "$DRY_WHY; starts, $(grep -c '^  ' "$WORK/$name.probe") tests listed"
    else
      row "$name" fail - "does not start: $(head -1 "$WORK/$name.probe")"
    fi
    return
  fi
  limit=$(step_timeout "$cap")
  ((limit > 0)) || { row "$name" skip - "budget: under 20 s left"; return; }
  start=$(now)
  timeout -k "$KILL_GRACE_S" "$limit" "$HERE/$name" --gtest_color=no \
    --gtest_output="json:$WORK/$name.json" >"$WORK/$name.log" 2>&1
  rc=$?
  secs=$(since "$start")
  keep_log "$name (rc=$rc, ${secs}s)" "$WORK/$name.log"
  read -r p f s < <(awk '
    /^\[       OK \] /        {p++}
    /^\[  FAILED  \] .*\(/    {f++}
    /^\[  SKIPPED \] .*\(/    {s++}
    END {print p+0, f+0, s+0}' "$WORK/$name.log")
  if ((rc == 124 || rc == 137)); then
    row "$name" fail "$secs" "timed out after ${limit}s ($p passed so far)"
  elif ((rc != 0 || f > 0)); then
    why="$(grep -m1 -E '^\[  FAILED  \] [^ ]+\.' "$WORK/$name.log" | sed 's/^\[  FAILED  \] //; s/ (.*//')"
    row "$name" fail "$secs" "rc=$rc, $p passed, $f failed${why:+ (first: $why)}, $s skipped"
  elif ((p == 0 && s > 0)); then
    why="$(grep -A1 -m1 ': Skipped$' "$WORK/$name.log" | tail -1 | cut -c1-60)"
    row "$name" skip "$secs" "all $s skipped: ${why:-no reason printed}"
  else
    row "$name" pass "$secs" "$p passed, $s skipped"
  fi
}

# A program with a JSON result: pass when it exits 0.
run_program() {  # step name, cap, json file (or -), binary, args...
  local name="$1" cap="$2" json="$3" bin="$4" limit start rc secs
  shift 4
  wanted "$name" || return 0
  if [[ ! -x "$HERE/$bin" ]]; then
    row "$name" fail - "$bin is not in the bundle"
    return
  fi
  if ((DRY)); then
    if starts "$bin" --help; then
      row "$name" skip - "$DRY_WHY; $bin starts"
    else
      row "$name" fail - "$bin --help fails: $(head -1 "$WORK/$bin.probe")"
    fi
    return
  fi
  limit=$(step_timeout "$cap")
  ((limit > 0)) || { row "$name" skip - "budget: under 20 s left"; return; }
  start=$(now)
  timeout -k "$KILL_GRACE_S" "$limit" "$HERE/$bin" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  secs=$(since "$start")
  keep_log "$name: $bin $* (rc=$rc, ${secs}s)" "$WORK/$name.log"
  if ((rc == 124 || rc == 137)); then
    row "$name" fail "$secs" "timed out after ${limit}s"
  elif ((rc != 0)); then
    row "$name" fail "$secs" "rc=$rc: $(grep -m1 -i -E 'error|fail' "$WORK/$name.log" | cut -c1-70)"
  elif grep -q 'ERROR OCCURRED' "$WORK/$name.log"; then
    # Google Benchmark exits 0 when a benchmark reports an error.
    row "$name" fail "$secs" "$(grep -c 'ERROR OCCURRED' "$WORK/$name.log") benchmarks errored: $(grep -m1 -o "ERROR OCCURRED: .*" "$WORK/$name.log" | cut -c17-76)"
  else
    row "$name" pass "$secs" "${json:+$(basename "$json")}"
  fi
}

# The Python package's tests, in a venv over the machine's torch. Without
# transformers the tests that need it skip (pytest.importorskip) and the
# rest still run; without torch or pytest the step is skipped.
run_python() {
  local name=python cap=150 limit start rc secs wheel missing="" note="" p f s
  wanted "$name" || return 0
  wheel="$(ls "$HERE"/python/*.whl 2>/dev/null | head -1)"
  if [[ -z "$wheel" ]]; then
    row "$name" skip - "no wheel in bundle/python/ ($(head -1 "$HERE/python/NO_WHEEL.txt" 2>/dev/null || echo 'not built'))"
    return
  fi
  if [[ ! -d "$HERE/python/tests" ]]; then
    row "$name" fail - "bundle/python/tests/ is missing"
    return
  fi
  if ((DRY)); then
    row "$name" skip - "$DRY_WHY; $(basename "$wheel") present"
    return
  fi
  for mod in torch pytest; do
    "$PYTHON" -c "import $mod" >/dev/null 2>&1 || missing+="${missing:+, }$mod"
  done
  if [[ -n "$missing" ]]; then
    row "$name" skip - "$PYTHON lacks $missing"
    return
  fi
  # A cpXY wheel installs only on Python X.Y.
  local tag want
  tag="$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])' 2>/dev/null)"
  want="$(basename "$wheel" | grep -o -E -- '-cp[0-9]+-' | head -1 | tr -d -)"
  if [[ -n "$want" && "$want" != "$tag" ]]; then
    row "$name" skip - "$(basename "$wheel") is for $want, $PYTHON is $tag"
    return
  fi
  "$PYTHON" -c "import transformers" >/dev/null 2>&1 || note="; no transformers: its tests skip"
  limit=$(step_timeout "$cap")
  ((limit > 0)) || { row "$name" skip - "budget: under 20 s left"; return; }
  start=$(now)
  # venv, install, pytest: all under the step's timeout.
  timeout -k "$KILL_GRACE_S" "$limit" bash -c '
    set -e
    "$1" -m venv --system-site-packages "$2"
    "$2/bin/python" -m pip install --no-deps --no-index --quiet "$3"
    cd "$4"
    exec "$2/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$5" .
  ' run_python "$PYTHON" "$WORK/venv" "$wheel" "$HERE/python/tests" \
    "$RESULTS/pytest.xml" >"$WORK/$name.log" 2>&1
  rc=$?
  secs=$(since "$start")
  keep_log "$name: pytest tests/python (rc=$rc, ${secs}s)" "$WORK/$name.log"
  read -r p f s < <(awk '
    match($0, /[0-9]+ passed/)  {p = substr($0, RSTART, RLENGTH) + 0}
    match($0, /[0-9]+ failed/)  {f = substr($0, RSTART, RLENGTH) + 0}
    match($0, /[0-9]+ skipped/) {s = substr($0, RSTART, RLENGTH) + 0}
    END {print p+0, f+0, s+0}' "$WORK/$name.log")
  if ((rc == 124 || rc == 137)); then
    row "$name" fail "$secs" "timed out after ${limit}s"
  elif ((rc != 0)); then
    row "$name" fail "$secs" "rc=$rc, $p passed, $f failed: $(grep -m1 -E '^(FAILED|ERROR)' "$WORK/$name.log" | cut -c1-50)"
  else
    row "$name" pass "$secs" "$p passed, $s skipped$note"
  fi
}

run_peer_bench() {
  wanted peer_bench || return 0
  if [[ ! -x "$HERE/peer_bench" ]]; then
    row peer_bench skip - "peer_bench is not in the bundle (benchmarks/peer_bench.cc not built yet)"
    return
  fi
  # Its flags are its own: pass the backend and JSON output only if it
  # takes them (its --help says so).
  local args=() help
  help="$(timeout 20 "$HERE/peer_bench" --help 2>&1)"
  grep -q -- '--backends' <<<"$help" && args+=(--backends=cuda)
  grep -q -- '--backend=' <<<"$help" && args+=(--backend=cuda)
  if grep -q -- '--benchmark_out' <<<"$help"; then
    args+=(--benchmark_out="$RESULTS/peer_bench.json" --benchmark_out_format=json)
  elif grep -q -- '--json' <<<"$help"; then
    args+=(--json="$RESULTS/peer_bench.json")
  fi
  run_program peer_bench 120 "$RESULTS/peer_bench.json" peer_bench "${args[@]}"
}

for t in "${gtests[@]}"; do
  case "$t" in
    backend_contract*) cap=90 ;;
    attention*) cap=120 ;;
    *) cap=120 ;;
  esac
  run_gtest "$t" "$cap"
done
run_python
run_program batch_decode_b32_16k 120 "$RESULTS/batch_decode_b32_16k.json" batch_decode \
  --backend=cuda --no-progress --compare-paged --json="$RESULTS/batch_decode_b32_16k.json" \
  --model=llama3-8b --max_slots=32 --max_tokens=16384 --requests=64 \
  --prompt=1024:15360 --output=32:128 --check=4
run_program map_bench 120 "$RESULTS/map_bench.json" map_bench --backends=cuda,host \
  --benchmark_out="$RESULTS/map_bench.json" --benchmark_out_format=json
run_program step_bench 120 "$RESULTS/step_bench.json" step_bench --backends=cuda \
  --benchmark_out="$RESULTS/step_bench.json" --benchmark_out_format=json
run_peer_bench
run_program batch_decode_b256 120 "$RESULTS/batch_decode_b256.json" batch_decode \
  --backend=cuda --no-progress --compare-paged --json="$RESULTS/batch_decode_b256.json" \
  --model=llama3-8b --max_slots=256 --max_tokens=4096 --requests=512 \
  --prompt=128:2048 --output=64:256 --check=4

# ---- At most MAX_FILES files in the results folder ---------------------------------
mapfile -t files < <(find "$RESULTS" -mindepth 1 -maxdepth 1 | sort)
if ((${#files[@]} > MAX_FILES)); then
  for f in "${files[@]}"; do
    case "$(basename "$f")" in
      logs.txt | map_bench.json | step_bench.json | peer_bench.json | \
      batch_decode_b32_16k.json | batch_decode_b256.json | pytest.xml) ;;
      *)
        if [[ -f "$f" ]]; then keep_log "unexpected result file $(basename "$f")" "$f"; fi
        rm -rf "$f"
        ;;
    esac
  done
fi

# ---- The table ---------------------------------------------------------------------
{
  echo
  echo "== vattn GPU run: $(( $(date +%s) - RUN_START ))s of ${RUN_BUDGET_S}s; results: $RESULTS ($(find "$RESULTS" -mindepth 1 -maxdepth 1 | wc -l) files)"
  printf '%-26s %-5s %7s  %s\n' step result seconds detail
  printf '%s\n' "${rows[@]}"
} | tee -a "$ALL_LOGS"
exit "$failed"
