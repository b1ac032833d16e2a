# vattn: a thin Makefile over CMake. A new user needs two commands:
#
#   make demo   install what is missing, build, run the main example
#   make test   install what is missing, build, run the whole test suite:
#               ctest in a warnings-as-errors build (test-main), the Python
#               package's tests (test-python), the cpu-labelled tests again
#               under ThreadSanitizer (test-tsan) and under AddressSanitizer
#               + UndefinedBehaviorSanitizer with LeakSanitizer (test-asan),
#               both with clang++, then the fuzz targets under ASan+UBSan:
#               their seed corpus replayed and FUZZ_SECONDS of fuzzing each
#               (test-fuzz)
#
# Knobs (make VAR=value ...):
#   BUILD_DIR, TSAN_BUILD_DIR  build directories (build, build-tsan,
#   ASAN_BUILD_DIR,            build-asan, build-fuzz)
#   FUZZ_BUILD_DIR
#   FUZZ_SECONDS               seconds test-fuzz fuzzes each target (60)
#   JOBS                       parallel compile and test jobs (nproc)
#   DEMO, DEMO_ARGS            the program `make demo` builds and runs
#   PREFIX                     where `make install` puts vattn

BUILD_DIR      ?= build
TSAN_BUILD_DIR ?= build-tsan
ASAN_BUILD_DIR ?= build-asan
FUZZ_BUILD_DIR ?= build-fuzz
FUZZ_SECONDS   ?= 60
BUILD_TYPE     ?= RelWithDebInfo
GENERATOR      ?= Ninja
JOBS           ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE          ?= cmake
CTEST          ?= ctest
PREFIX         ?= /usr/local

# The main job: an example target (examples/<name>.cc) and its arguments.
DEMO      ?= batch_decode
DEMO_ARGS ?=

# Main build: the default compiler, warnings as errors, everything built.
CMAKE_FLAGS ?=
MAIN_FLAGS = -G "$(GENERATOR)" -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) \
             -DVATTN_WERROR=ON $(CMAKE_FLAGS)
# ThreadSanitizer build: clang++, tests only.
TSAN_FLAGS = -G "$(GENERATOR)" -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) \
             -DCMAKE_CXX_COMPILER=clang++ -DVATTN_SANITIZE=thread \
             -DVATTN_WERROR=ON -DVATTN_BUILD_TESTS=ON \
             -DVATTN_BUILD_BENCHMARKS=OFF -DVATTN_BUILD_EXAMPLES=OFF \
             $(CMAKE_FLAGS)
TSAN_OPTIONS_RUN ?= halt_on_error=1 second_deadlock_stack=1
# AddressSanitizer + UndefinedBehaviorSanitizer build: clang++, tests only.
# Any report is fatal (-fno-sanitize-recover=all, see
# cmake/VattnDependencies.cmake); LeakSanitizer runs at every exit.
ASAN_FLAGS = -G "$(GENERATOR)" -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) \
             -DCMAKE_CXX_COMPILER=clang++ -DVATTN_SANITIZE=address,undefined \
             -DVATTN_WERROR=ON -DVATTN_BUILD_TESTS=ON \
             -DVATTN_BUILD_BENCHMARKS=OFF -DVATTN_BUILD_EXAMPLES=OFF \
             $(CMAKE_FLAGS)
# Fuzzing build: the library with libFuzzer's coverage instrumentation plus
# ASan+UBSan, and the fuzz targets of tests/fuzz/ (nothing else).
FUZZ_FLAGS = -G "$(GENERATOR)" -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) \
             -DCMAKE_CXX_COMPILER=clang++ -DVATTN_SANITIZE=address,undefined \
             -DVATTN_FUZZ=ON -DVATTN_FUZZ_SECONDS=$(FUZZ_SECONDS) \
             -DVATTN_WERROR=ON -DVATTN_BUILD_TESTS=OFF \
             -DVATTN_BUILD_BENCHMARKS=OFF -DVATTN_BUILD_EXAMPLES=OFF \
             -DVATTN_BUILD_C_SHARED=OFF $(CMAKE_FLAGS)
ASAN_OPTIONS_RUN ?= detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1
UBSAN_OPTIONS_RUN ?= print_stacktrace=1:halt_on_error=1
# Clang 14's TSan cannot map its shadow memory when the kernel randomizes
# mmap with more than 28 bits; run without ASLR there (when allowed).
TSAN_LAUNCH := $(shell [ "$$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 28)" -gt 28 ] && \
                 setarch "$$(uname -m)" -R true 2>/dev/null && \
                 echo "setarch $$(uname -m) -R")

.PHONY: demo test setup configure build test-main configure-tsan test-tsan \
        configure-asan test-asan configure-fuzz test-fuzz install clean

demo: setup configure
	$(CMAKE) --build $(BUILD_DIR) --target $(DEMO) -j $(JOBS)
	./$(BUILD_DIR)/examples/$(DEMO) $(DEMO_ARGS)

test: setup
	$(MAKE) --no-print-directory test-main
	$(MAKE) --no-print-directory test-python
	$(MAKE) --no-print-directory test-tsan
	$(MAKE) --no-print-directory test-asan
	$(MAKE) --no-print-directory test-fuzz

setup:
	@bash scripts/setup.sh

configure:
	$(CMAKE) -S . -B $(BUILD_DIR) $(MAIN_FLAGS)

build: configure
	$(CMAKE) --build $(BUILD_DIR) -j $(JOBS)

test-main: build
	cd $(BUILD_DIR) && $(CTEST) --output-on-failure -j $(JOBS)

configure-tsan:
	$(CMAKE) -S . -B $(TSAN_BUILD_DIR) $(TSAN_FLAGS)

test-tsan: configure-tsan
	$(CMAKE) --build $(TSAN_BUILD_DIR) -j $(JOBS)
	cd $(TSAN_BUILD_DIR) && TSAN_OPTIONS="$(TSAN_OPTIONS_RUN)" \
	  $(TSAN_LAUNCH) $(CTEST) --output-on-failure -j $(JOBS) -L cpu

configure-asan:
	$(CMAKE) -S . -B $(ASAN_BUILD_DIR) $(ASAN_FLAGS)

test-asan: configure-asan
	$(CMAKE) --build $(ASAN_BUILD_DIR) -j $(JOBS)
	cd $(ASAN_BUILD_DIR) && ASAN_OPTIONS="$(ASAN_OPTIONS_RUN)" \
	  UBSAN_OPTIONS="$(UBSAN_OPTIONS_RUN)" \
	  $(CTEST) --output-on-failure -j $(JOBS) -L cpu

configure-fuzz:
	$(CMAKE) -S . -B $(FUZZ_BUILD_DIR) $(FUZZ_FLAGS)

test-fuzz: configure-fuzz
	$(CMAKE) --build $(FUZZ_BUILD_DIR) -j $(JOBS)
	cd $(FUZZ_BUILD_DIR) && ASAN_OPTIONS="$(ASAN_OPTIONS_RUN)" \
	  UBSAN_OPTIONS="$(UBSAN_OPTIONS_RUN)" \
	  $(CTEST) --output-on-failure -L fuzz

install: build
	$(CMAKE) --install $(BUILD_DIR) --prefix $(PREFIX)

# ---- Python package (pyproject.toml, python/, tests/python/) -----------------
# test-python: a virtual environment in PY_VENV (git-ignored; kept between
# runs), the pinned build and test dependencies from PyPI, `pip install .`
# (the extension builds in PY_BUILD_DIR), then pytest. torch from PyPI is its
# CUDA build (with the nvidia-* wheels, ~5.5 GB); it runs on CPU-only machines.
PYTHON        ?= python3
PY_VENV       ?= .venv
PY_BUILD_DIR  ?= build-python
PY_BUILD_DEPS  = scikit-build-core==1.1.2 nanobind==3.1.0
PY_TEST_DEPS   = torch==2.15.0 transformers==5.24.0 numpy==2.4.6 pytest==9.2.0
# NVIDIA NIXL for tests/python/test_nixl_*.py: the CUDA 13 wheel (bundles UCX;
# imports and moves host memory with no GPU) and the `nixl` meta package,
# both --no-deps: the meta package would pull both CUDA variants and torch's
# whole stack. numpy, their one real dependency, is in PY_TEST_DEPS.
PY_NIXL_DEPS   = nixl-cu13==1.5.1 nixl==1.5.2
PIP            = $(PY_VENV)/bin/python -m pip --disable-pip-version-check

.PHONY: python-venv python-install test-python
python-venv:
	@[ -x $(PY_VENV)/bin/python ] || $(PYTHON) -m venv $(PY_VENV)
	$(PIP) install -q pip==25.3  # Debian's pip 23.0 has no -C (config settings).
	$(PIP) install -q $(PY_BUILD_DEPS) $(PY_TEST_DEPS)
	$(PIP) install -q --no-deps $(PY_NIXL_DEPS)

python-install: python-venv
	$(PIP) install -q --no-build-isolation --no-deps -Cbuild-dir=$(PY_BUILD_DIR) .

test-python: python-install
	$(PY_VENV)/bin/python -m pytest -p no:cacheprovider tests/python

clean:
	rm -rf $(BUILD_DIR) $(TSAN_BUILD_DIR) $(ASAN_BUILD_DIR) $(FUZZ_BUILD_DIR)
