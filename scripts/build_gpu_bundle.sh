#!/usr/bin/env bash
# Builds the self-contained GPU bundle: a Release build of every test,
# benchmark and example with the CUDA backend compiled in, copied into
# bundle/ with the few shared libraries that have no static form, so that it
# runs on a GPU machine that has none of Debian's packages installed.
#
#   scripts/build_gpu_bundle.sh            # build-gpu/ and bundle/
#   JOBS=2 BUILD_DIR=... BUNDLE_DIR=... scripts/build_gpu_bundle.sh
#
# Then, on the GPU machine, from the directory holding bundle/:
#   bundle/run_gpu.sh                      # results (JSON) go to $OUT if set
# and here, without a device, the same script checks the bundle:
#   VATTN_GPU_DRY_RUN=1 bundle/run_gpu.sh  # every binary starts; steps skip
#
# How it stays self-contained:
#  * Abseil is linked from its .a archives (-DVATTN_STATIC_DEPS=ON, see
#    cmake/VattnDependencies.cmake); GoogleTest is static on Debian anyway.
#  * libfmt and libbenchmark (shared only on Debian) are copied beside the
#    binaries, which carry an $ORIGIN rpath (written as DT_RPATH with
#    --disable-new-dtags, so it also serves the copied libraries' own
#    dependencies).
#  * The C++ runtime (libstdc++, libgcc_s) is copied into fallback/, not
#    beside the binaries: Debian 12's libstdc++ needs glibc 2.36, which an
#    older GPU machine lacks, while that machine's own libstdc++ may be too
#    old for the binaries. run_gpu.sh uses the system's runtime when the
#    binaries start with it and puts fallback/ on LD_LIBRARY_PATH otherwise.
#  * libcuda is never linked: vattn dlopens it at run time. The check below
#    fails if any binary names it.
#  * The CUDA kernels are built for sm_90 (VATTN_CUDA_ARCHITECTURES=90:
#    H100/H200) only, which keeps the bundle small.
#  * python/ holds the Python package's wheel (when pip can build it) and
#    tests/python, for run_gpu.sh's python step.
# Only glibc (libc, libm, ld-linux, ...) comes from the GPU machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build-gpu}"
BUNDLE_DIR="${BUNDLE_DIR:-$ROOT/bundle}"
JOBS="${JOBS:-2}"
MAX_BUNDLE_MIB="${MAX_BUNDLE_MIB:-48}"

log() { printf '== %s\n' "$*"; }
die() { printf 'build_gpu_bundle: %s\n' "$*" >&2; exit 1; }

# ---- Build -------------------------------------------------------------------
log "configuring $BUILD_DIR (Release, CUDA on, static Abseil)"
cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DVATTN_WITH_CUDA=ON \
  -DVATTN_STATIC_DEPS=ON \
  -DVATTN_BUILD_TESTS=ON -DVATTN_BUILD_BENCHMARKS=ON -DVATTN_BUILD_EXAMPLES=ON \
  -DVATTN_CUDA_ARCHITECTURES=90 \
  '-DCMAKE_BUILD_RPATH=$ORIGIN' \
  -DCMAKE_EXE_LINKER_FLAGS=-Wl,--disable-new-dtags
log "building with -j$JOBS"
cmake --build "$BUILD_DIR" -j "$JOBS"
# batch_decode and attention_gpu_test are only worth shipping with their
# CUDA kernels (examples/decode/cuda_attention.cu, built when nvcc is found).
[[ -n "$(find "$BUILD_DIR/examples/decode" -name 'cuda_attention.cu.o' 2>/dev/null)" ]] ||
  die "the decode example's CUDA kernels were not built (is nvcc on PATH or CUDACXX set?)"

# ---- Collect executables -----------------------------------------------------
is_elf_executable() {
  [[ -f "$1" && -x "$1" ]] || return 1
  [[ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" == '177ELF' ]] || return 1
  # Executables (EXEC or PIE DYN with an interpreter), not shared libraries.
  readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}

rm -rf "$BUNDLE_DIR"
mkdir -p "$BUNDLE_DIR"
mapfile -t candidates < <(
  find "$BUILD_DIR" -type f \( -path '*/CMakeFiles/*' -o -path '*/_deps/*' \) -prune -o \
       -type f -perm -u+x -print | sort)
binaries=()
for f in "${candidates[@]}"; do
  is_elf_executable "$f" || continue
  name="$(basename "$f")"
  # Fuzz targets run on the CPU (make test-fuzz), not on the device.
  [[ "$name" == *_fuzzer || "$name" == *_fuzzer_replay ]] && continue
  if [[ -e "$BUNDLE_DIR/$name" ]]; then
    die "two executables are named $name ($f); the bundle is flat"
  fi
  cp "$f" "$BUNDLE_DIR/$name"
  binaries+=("$name")
done
((${#binaries[@]} > 0)) || die "no executables found under $BUILD_DIR"
log "copied ${#binaries[@]} executables"

# ---- Shared libraries without a static form ----------------------------------
# Everything a binary needs that is not part of glibc is copied, by soname,
# from where the build machine's loader finds it.
GLIBC_RE='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread\.so|libdl\.so|librt\.so|libresolv\.so|libutil\.so|libmvec\.so)'
RUNTIME_RE='^(libstdc\+\+\.so|libgcc_s\.so)'
mkdir -p "$BUNDLE_DIR/fallback"
declare -A copied=()
copy_deps() {
  local bin="$1" line soname path
  while IFS= read -r line; do
    # "	libfmt.so.9 => /lib/x86_64-linux-gnu/libfmt.so.9 (0x...)"
    soname="$(awk '{print $1}' <<<"$line")"
    path="$(awk '$2 == "=>" {print $3}' <<<"$line")"
    [[ -n "$soname" ]] || continue
    [[ "$soname" =~ $GLIBC_RE ]] && continue
    [[ "$soname" == /* ]] && continue            # the interpreter, by path
    [[ -n "${copied[$soname]:-}" ]] && continue
    [[ "$path" == "$BUNDLE_DIR"/* ]] && { copied[$soname]=1; continue; }
    [[ "$path" == "$BUNDLE_DIR"/fallback/* ]] && { copied[$soname]=1; continue; }
    [[ -n "$path" && -f "$path" ]] || die "$bin: cannot find $soname ($line)"
    if [[ "$soname" =~ $RUNTIME_RE ]]; then
      cp -L "$path" "$BUNDLE_DIR/fallback/$soname"
      copied[$soname]=1
      continue
    fi
    cp -L "$path" "$BUNDLE_DIR/$soname"
    copied[$soname]=1
    copy_deps "$BUNDLE_DIR/$soname"
  done < <(ldd "$bin" | grep -v 'statically linked')
}
for b in "${binaries[@]}"; do copy_deps "$BUNDLE_DIR/$b"; done
log "copied shared libraries: ${!copied[*]}"

# ---- Checks ------------------------------------------------------------------
fail=0
for b in "${binaries[@]}"; do
  f="$BUNDLE_DIR/$b"
  needed="$(readelf -d "$f" | awk '/\(NEEDED\)/ {gsub(/[\[\]]/, "", $5); print $5}')"
  if grep -q 'libcuda' <<<"$needed"; then
    echo "ERROR: $b links libcuda (it must be dlopen'ed)"; fail=1
  fi
  if grep -Eq 'libabsl|libgtest|libgmock' <<<"$needed"; then
    echo "ERROR: $b links a library that should be static: $(grep -E 'libabsl|libgtest|libgmock' <<<"$needed" | head -3 | tr '\n' ' ')"
    fail=1
  fi
  if ! readelf -d "$f" | grep -Eq '\((RPATH|RUNPATH)\).*\$ORIGIN'; then
    echo "ERROR: $b has no \$ORIGIN rpath"; fail=1
  fi
  lddout="$(ldd "$f")"
  if grep -q 'not found' <<<"$lddout"; then
    echo "ERROR: $b: $(grep 'not found' <<<"$lddout" | tr '\n' ' ')"; fail=1
  fi
  # Every non-glibc library must resolve inside the bundle.
  while IFS= read -r line; do
    soname="$(awk '{print $1}' <<<"$line")"; path="$(awk '$2 == "=>" {print $3}' <<<"$line")"
    [[ "$soname" =~ $GLIBC_RE || "$soname" =~ $RUNTIME_RE ]] && continue
    [[ "$soname" == /* || -z "$path" ]] && continue
    if [[ "$path" != "$BUNDLE_DIR"/* ]]; then
      echo "ERROR: $b resolves $soname outside the bundle: $path"; fail=1
    fi
  done <<<"$lddout"
done
((fail == 0)) || die "bundle checks failed"
for rt in libstdc++.so.6 libgcc_s.so.1; do
  [[ -f "$BUNDLE_DIR/fallback/$rt" ]] || die "fallback/$rt was not copied"
done
# The binaries must also start on the fallback runtime.
probe="$(printf '%s\n' "${binaries[@]}" | grep '_test$' | head -1)"
if [[ -n "$probe" ]]; then
  LD_LIBRARY_PATH="$BUNDLE_DIR/fallback" "$BUNDLE_DIR/$probe" --gtest_list_tests >/dev/null ||
    die "$probe does not start with fallback/ on LD_LIBRARY_PATH"
  [[ "$(LD_LIBRARY_PATH="$BUNDLE_DIR/fallback" ldd "$BUNDLE_DIR/$probe" | awk '/libstdc/ {print $3}')" == "$BUNDLE_DIR"/fallback/* ]] ||
    die "fallback/ libstdc++ is not picked up through LD_LIBRARY_PATH"
fi
log "ldd: every binary resolves; only glibc and the C++ runtime (or fallback/) come from the system; none names libcuda"

# The newest glibc symbol version the bundle needs (the GPU machine's glibc
# must be at least this).
newest_version() {  # newest $1 symbol version (GLIBC, GLIBCXX) the files need
  local prefix="$1"; shift
  for f in "$@"; do objdump -T "$f" 2>/dev/null; done |
    grep -o "(${prefix}_[0-9.]*)" | tr -d '()' | sort -V -u | tail -1
}
top_level=("${binaries[@]/#/$BUNDLE_DIR/}")
for f in "$BUNDLE_DIR"/*.so*; do [[ -f "$f" ]] && top_level+=("$f"); done
log "binaries need: $(newest_version GLIBC "${top_level[@]}") and $(newest_version GLIBCXX "${top_level[@]}");" \
    "fallback/ needs $(newest_version GLIBC "$BUNDLE_DIR"/fallback/*)"

# ---- GPU test list and runner ------------------------------------------------
# Binaries with a gpu-labelled ctest test (plus every *_gpu_test by name).
{
  if command -v jq >/dev/null 2>&1; then
    (cd "$BUILD_DIR" && ctest -L gpu --show-only=json-v1 2>/dev/null) |
      jq -r '.tests[].command[0] // empty' | xargs -r -n1 basename
  fi
  printf '%s\n' "${binaries[@]}" | grep '_gpu_test$' || true
} | sort -u | while read -r b; do
  [[ -f "$BUNDLE_DIR/$b" ]] && echo "$b"
done >"$BUNDLE_DIR/gpu_tests.txt"
log "gpu test binaries: $(tr '\n' ' ' <"$BUNDLE_DIR/gpu_tests.txt")"

# ---- Size: strip what run_gpu.sh does not run ------------------------------------
# The CPU-only tests ride along for diagnosis on the device; their symbol
# tables (static Abseil and GoogleTest) are a fifth of the bundle. The
# programs run_gpu.sh runs keep theirs, for readable backtraces.
stripped=0
for b in "${binaries[@]}"; do
  case "$b" in
    *_gpu_test | batch_decode | map_bench | step_bench | peer_bench) continue ;;
  esac
  grep -qx "$b" "$BUNDLE_DIR/gpu_tests.txt" && continue
  strip --strip-unneeded "$BUNDLE_DIR/$b" && stripped=$((stripped + 1))
done
log "stripped $stripped CPU-only binaries"

# ---- Python wheel ------------------------------------------------------------
# The Python package (pyproject.toml) as a self-contained wheel: the
# extension with its Abseil libraries beside it ($ORIGIN rpath,
# VATTN_PYTHON_BUNDLE_LIBS=ON), and tests/python to run against it. When it
# cannot be built, python/NO_WHEEL.txt says why and run_gpu.sh skips the
# step with that reason. VATTN_BUNDLE_PYTHON=0 leaves it out.
mkdir -p "$BUNDLE_DIR/python"
no_wheel() { printf '%s\n' "$*" >"$BUNDLE_DIR/python/NO_WHEEL.txt"; log "python: no wheel: $*"; }
if [[ "${VATTN_BUNDLE_PYTHON:-1}" == 0 ]]; then
  no_wheel "left out (VATTN_BUNDLE_PYTHON=0)"
elif [[ ! -f "$ROOT/pyproject.toml" ]]; then
  no_wheel "no pyproject.toml in the source tree"
elif ! python3 -m pip --version >/dev/null 2>&1; then
  no_wheel "pip is not installed on the build machine"
else
  log "building the Python wheel (log: $BUILD_DIR/python_wheel.log)"
  if VATTN_PYTHON_BUNDLE_LIBS=ON SKBUILD_BUILD_DIR="$BUILD_DIR/python" \
     CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
     python3 -m pip wheel "$ROOT" --no-deps --wheel-dir "$BUNDLE_DIR/python" \
       >"$BUILD_DIR/python_wheel.log" 2>&1 &&
     compgen -G "$BUNDLE_DIR/python/*.whl" >/dev/null; then
    log "python: $(cd "$BUNDLE_DIR/python" && ls ./*.whl | sed 's#^\./##') ($(du -k "$BUNDLE_DIR"/python/*.whl | awk '{s += $1} END {print s}') KiB)"
  else
    no_wheel "pip wheel failed on the build machine: $(grep -m1 -i -E 'error' "$BUILD_DIR/python_wheel.log" | cut -c1-120)"
  fi
fi
if [[ -d "$ROOT/tests/python" ]]; then
  rm -rf "$BUNDLE_DIR/python/tests"
  cp -r "$ROOT/tests/python" "$BUNDLE_DIR/python/tests"
  find "$BUNDLE_DIR/python/tests" -name '__pycache__' -prune -exec rm -rf {} +
fi

cp "$ROOT/scripts/gpu_bundle_run.sh" "$BUNDLE_DIR/run_gpu.sh"
chmod +x "$BUNDLE_DIR/run_gpu.sh"
git -C "$ROOT" rev-parse --short HEAD >"$BUNDLE_DIR/VERSION" 2>/dev/null || echo unknown >"$BUNDLE_DIR/VERSION"

# ---- Dry run -------------------------------------------------------------------
# run_gpu.sh without a device: every step's binary must start from the
# bundle (with the system's C++ runtime or fallback/), each step skips with
# its reason, and the table comes out.
dry_out="$(mktemp -d)"
if ! OUT="$dry_out" VATTN_GPU_DRY_RUN=1 "$BUNDLE_DIR/run_gpu.sh" >"$BUILD_DIR/dry_run.log" 2>&1; then
  cat "$BUILD_DIR/dry_run.log"
  rm -rf "$dry_out"
  die "the dry run of run_gpu.sh failed (log above)"
fi
rm -rf "$dry_out"
log "dry run of run_gpu.sh (every binary starts):"
sed -n '/^step /,$p' "$BUILD_DIR/dry_run.log"

# ---- Size --------------------------------------------------------------------
size_kib="$(du -sk "$BUNDLE_DIR" | awk '{print $1}')"
log "bundle: $BUNDLE_DIR, $(ls "$BUNDLE_DIR" | wc -l) files, $((size_kib / 1024)) MiB ($size_kib KiB)"
if ((size_kib > MAX_BUNDLE_MIB * 1024)); then
  die "the bundle is over ${MAX_BUNDLE_MIB} MiB; the device machine takes 64 MiB in all"
fi
