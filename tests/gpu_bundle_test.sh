#!/usr/bin/env bash
# ctest `gpu_bundle.run_script` (label cpu): scripts/gpu_bundle_run.sh's own
# logic, on a fake bundle of stub programs (no build, no device, seconds):
#  1. dry run: every step skips with its reason, rc 0, one table row each,
#     peer_bench's absence and the missing wheel are said, a binary that
#     does not start is a fail;
#  2. a run with stubs standing in for the GPU programs: a step that hangs
#     (and ignores SIGTERM) is killed at its timeout and the others still
#     run; a failing test binary is a fail; rc 1; extra files a step leaves
#     are folded into logs.txt so at most 7 files remain;
#  3. a budget too small for everything: later steps are skipped "budget"
#     and the table is still printed within the budget.
#   tests/gpu_bundle_test.sh scripts/gpu_bundle_run.sh
set -uo pipefail
RUN_SCRIPT="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
T="$(mktemp -d "${TMPDIR:-/tmp}/vattn_bundle_test.XXXXXX")"
trap 'rm -rf "$T"' EXIT
fails=0
check() {  # description, command...
  local what="$1"; shift
  if "$@"; then echo "ok   - $what"; else echo "FAIL - $what"; fails=$((fails + 1)); fi
}

# ---- A fake bundle -----------------------------------------------------------------
B="$T/bundle"
mkdir -p "$B/fallback" "$B/python/tests"
cp "$RUN_SCRIPT" "$B/run_gpu.sh"
chmod +x "$B/run_gpu.sh"
echo test >"$B/VERSION"
gtest_stub() {  # name, behaviour: pass | fail | skip | hang
  cat >"$B/$1" <<EOF
#!/usr/bin/env bash
if [[ "\${1:-}" == --gtest_list_tests ]]; then printf 'Suite.\n  A\n  B\n'; exit 0; fi
case $2 in
  pass) printf '[ RUN      ] Suite.A\n[       OK ] Suite.A (1 ms)\n[ RUN      ] Suite.B\n[       OK ] Suite.B (1 ms)\n' ;;
  fail) printf '[ RUN      ] Suite.A\nx.cc:1: Failure\n[  FAILED  ] Suite.A (1 ms)\n'; exit 1 ;;
  skip) printf '[ RUN      ] Suite.A\nx.cc:1: Skipped\nno device here\n[  SKIPPED ] Suite.A (0 ms)\n' ;;
  hang) trap '' TERM; sleep 600 & wait ;;
esac
EOF
  chmod +x "$B/$1"
}
program_stub() {  # name [extra file to leave in OUT]
  cat >"$B/$1" <<EOF
#!/usr/bin/env bash
[[ "\${1:-}" == --help ]] && { echo "usage: $1 [--backends=LIST] [--benchmark_out=FILE]"; exit 0; }
for a in "\$@"; do
  case "\$a" in
    --json=*) echo '{}' >"\${a#--json=}" ;;
    --benchmark_out=*) echo '{}' >"\${a#--benchmark_out=}" ;;
  esac
done
${2:+echo junk >"\$OUT/$2"}
echo "$1 ran: \$*"
EOF
  chmod +x "$B/$1"
}
gtest_stub backend_contract_gpu_test pass
gtest_stub cuda_gpu_test pass
gtest_stub kv_cache_gpu_test pass
gtest_stub attention_gpu_test pass
printf '%s\n' backend_contract_gpu_test cuda_gpu_test kv_cache_gpu_test attention_gpu_test >"$B/gpu_tests.txt"
program_stub map_bench extra_1.json
program_stub step_bench extra_2.json
program_stub batch_decode
echo "pip wheel failed on the build machine: test" >"$B/python/NO_WHEEL.txt"

rows_of() { sed -n '/^step  *result/,$p' "$1" | tail -n +2; }
nfiles() { find "$1" -mindepth 1 -maxdepth 1 | wc -l; }
STEPS="backend_contract_gpu_test cuda_gpu_test kv_cache_gpu_test attention_gpu_test python batch_decode_b32_16k map_bench step_bench peer_bench batch_decode_b256"
every_step_once() {  # log
  local s
  for s in $STEPS; do
    [[ "$(rows_of "$1" | awk -v s="$s" '$1 == s' | wc -l)" == 1 ]] || { echo "  no single row for $s"; return 1; }
  done
}

# ---- 1. Dry run ----------------------------------------------------------------------
mkdir -p "$T/out1"
OUT="$T/out1" VATTN_GPU_DRY_RUN=1 "$B/run_gpu.sh" >"$T/dry.log" 2>&1
rc=$?
cat "$T/dry.log"
check "dry run exits 0" test "$rc" -eq 0
check "dry run: one row per step" every_step_once "$T/dry.log"
check "dry run: every step skips" test -z "$(rows_of "$T/dry.log" | awk '$2 != "skip"')"
check "dry run: says why (dry run)" grep -q 'gpu_test *skip .*dry run (VATTN_GPU_DRY_RUN=1); starts' "$T/dry.log"
check "dry run: peer_bench's absence is explained" grep -q 'peer_bench *skip .*not in the bundle' "$T/dry.log"
check "dry run: the missing wheel is explained" grep -q 'python *skip .*no wheel.*pip wheel failed' "$T/dry.log"
check "dry run: at most 7 files" test "$(nfiles "$T/out1")" -le 7

# A binary that does not start is a fail, even in a dry run.
printf '#!/bin/sh\nexit 127\n' >"$B/step_bench"
mkdir -p "$T/out1b"
OUT="$T/out1b" VATTN_GPU_DRY_RUN=1 "$B/run_gpu.sh" >"$T/dry2.log" 2>&1
rc=$?
check "dry run: a binary that does not start fails the run" test "$rc" -eq 1
check "dry run: ... and its row says so" grep -q 'step_bench *fail .*--help fails' "$T/dry2.log"
program_stub step_bench extra_2.json

# ---- 2. A run with stubs -----------------------------------------------------------------
gtest_stub cuda_gpu_test hang
# Google Benchmark prints an error and still exits 0.
cat >>"$B/step_bench" <<'EOF2'
echo "Raw/Map/cuda/2    ERROR OCCURRED: 'no device'"
EOF2
gtest_stub attention_gpu_test fail
mkdir -p "$T/out2"
echo stale >"$T/out2/stale.txt"
start=$(date +%s)
OUT="$T/out2" VATTN_GPU_DRY_RUN=0 VATTN_STEP_CAP_S=2 VATTN_KILL_GRACE_S=1 PYTHON=false \
  "$B/run_gpu.sh" >"$T/run.log" 2>&1
rc=$?
secs=$(($(date +%s) - start))
cat "$T/run.log"
check "run: exits 1 (a step failed)" test "$rc" -eq 1
check "run: one row per step" every_step_once "$T/run.log"
check "run: the hanging step is killed at its timeout" grep -q 'cuda_gpu_test *fail .*timed out after 2s' "$T/run.log"
check "run: ... and the steps after it still ran" grep -q 'kv_cache_gpu_test *pass .*2 passed' "$T/run.log"
check "run: a failing test binary is a fail" grep -q 'attention_gpu_test *fail .*1 failed (first: Suite.A)' "$T/run.log"
check "run: programs pass" grep -q 'map_bench *pass' "$T/run.log"
check "run: a benchmark that reports an error (rc 0) fails" \
  grep -q 'step_bench *fail .*1 benchmarks errored: .no device' "$T/run.log"
check "run: python skips without torch" grep -q 'python *skip' "$T/run.log"
check "run: took under 30 s" test "$secs" -lt 30
check "run: at most 7 files ($(nfiles "$T/out2"))" test "$(nfiles "$T/out2")" -le 7
check "run: extra files are folded into logs.txt" grep -q 'unexpected result file extra_1.json' "$T/out2/logs.txt"
check "run: the JSON results are kept" test -f "$T/out2/map_bench.json" -a -f "$T/out2/batch_decode_b256.json"
check "run: logs.txt holds every step's log and the table" \
  grep -q 'step_bench ran: --backends=cuda' "$T/out2/logs.txt"

# ---- 3. A budget too small for everything --------------------------------------------------
program_stub step_bench
gtest_stub cuda_gpu_test pass
gtest_stub attention_gpu_test pass
printf '#!/usr/bin/env bash\n[[ "${1:-}" == --gtest_list_tests ]] && { printf "S.\\n  A\\n"; exit 0; }\nsleep 6; printf "[       OK ] S.A (1 ms)\\n"\n' >"$B/kv_cache_gpu_test"
mkdir -p "$T/out3"
start=$(date +%s)
# 48 s: 25 s are kept for the kill grace and the table, and a step needs
# 20 s left, so the 6-s step leaves too little for the ones after it.
OUT="$T/out3" VATTN_GPU_DRY_RUN=0 VATTN_RUN_BUDGET_S=48 PYTHON=false \
  "$B/run_gpu.sh" >"$T/budget.log" 2>&1
rc=$?
secs=$(($(date +%s) - start))
cat "$T/budget.log"
check "budget: no step failed (rc 0)" test "$rc" -eq 0
check "budget: later steps are skipped for the budget" grep -q 'batch_decode_b256 *skip .*budget' "$T/budget.log"
check "budget: one row per step" every_step_once "$T/budget.log"
check "budget: ends within its 48 s (10 s spared for a loaded machine)" test "$secs" -le 58

echo
if ((fails > 0)); then echo "$fails check(s) failed"; exit 1; fi
echo "all checks passed"
