#!/usr/bin/env bash
# Installs what vattn's build needs on Debian (or Ubuntu), and only what is
# missing: cmake, ninja, make, g++, clang++ (with its sanitizer runtimes, for
# the ThreadSanitizer build), and the -dev packages of Abseil, fmt,
# GoogleTest/GoogleMock and Google Benchmark. Runs apt-get only when
# something is missing; uses sudo only when not root.
#
# The CUDA toolkit is optional and never installed here: when nvcc / cuda.h
# are present the CUDA backend is compiled; without them it reports
# Unavailable at run time. Neither case needs a GPU driver to build.
set -euo pipefail

# command -> Debian package that provides it
declare -A COMMANDS=(
  [cmake]=cmake
  [ninja]=ninja-build
  [make]=make
  [g++]=g++
  [clang++]=clang
)
# Packages checked with dpkg: libraries, and clang's sanitizer runtimes.
PACKAGES=(
  libabsl-dev
  libfmt-dev
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  libclang-rt-dev
  # Python tests (make test-python): venv, pip and the headers the nanobind
  # extension compiles against. torch and the rest come from PyPI.
  python3-dev
  python3-venv
  python3-pip
)

missing=()
for cmd in "${!COMMANDS[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${COMMANDS[$cmd]}")
done
have_dpkg=1
command -v dpkg-query >/dev/null 2>&1 || have_dpkg=0
for pkg in "${PACKAGES[@]}"; do
  if [[ $have_dpkg == 0 ]] ||
     [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != installed ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup: build dependencies present"
else
  # Sorted, without duplicates, for a stable message.
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: installing ${missing[*]}"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get not found; install these packages (or their" \
         "equivalents) by hand: ${missing[*]}" >&2
    exit 1
  fi
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "setup: not root and no sudo; as root run:" \
           "apt-get update && apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

if command -v nvcc >/dev/null 2>&1 || [[ -e /usr/local/cuda/include/cuda.h ]]; then
  echo "setup: CUDA toolkit found: the CUDA backend will be built"
else
  echo "setup: no CUDA toolkit: the CUDA backend will report Unavailable" \
       "(optional; install NVIDIA's toolkit to build it)"
fi
