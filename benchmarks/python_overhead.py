#!/usr/bin/env python3
# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
"""What the Python package adds per call, against the C++ call in the same run.

    python benchmarks/python_overhead.py \
        --baseline=build/benchmarks/python_overhead_baseline [--repeats=5] [--json=FILE]

Runs the C++ program (benchmarks/python_overhead_baseline.cc: the same cache
shape and calls, Google Benchmark, median of --repeats) first, then times the
Python calls (median of --repeats runs of N calls each, with the spread):
grow to the current length (a no-op), step at batch 1/32/256 given as a list
of (slot, tokens) pairs, as two int64 tensors, and as a vattn.StepBatch made
once from two tensors (it owns the StepRequest array), and the export of a view
(cache.k(layer), and torch.from_dlpack of it). Prints a Markdown table with
the ratio to C++ (target: step at batch 256 within 1.5x of C++ Step).
--clock=cpu (the default) times thread CPU time on both sides (Google
Benchmark's cpu_time), which a loaded shared machine disturbs least.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import vattn

SLOTS = 256
BACKED = 128


def cpp_baseline(path, repeats, clock):
    out = subprocess.run(
        [path, "--benchmark_format=json", f"--benchmark_repetitions={repeats}",
         "--benchmark_report_aggregates_only=true", "--benchmark_min_time=0.2"],
        check=True, capture_output=True, text=True).stdout
    medians = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") == "median":
            medians[b["run_name"]] = b["cpu_time" if clock == "cpu" else "real_time"] * {"ns": 1, "us": 1e3, "ms": 1e6}[b["time_unit"]]
    return medians


def time_call(fn, repeats, clock, min_seconds=0.2):
    """Per-call ns: (median, min, max) over `repeats` timed loops."""
    now = time.thread_time_ns if clock == "cpu" else time.perf_counter_ns
    n = 1
    while True:  # Calibrate: one loop takes at least min_seconds.
        t0 = now()
        for _ in range(n):
            fn()
        if now() - t0 > min_seconds * 1e9:
            break
        n *= 2
    per_call = []
    for _ in range(repeats):
        t0 = now()
        for _ in range(n):
            fn()
        per_call.append((now() - t0) / n)
    return statistics.median(per_call), min(per_call), max(per_call)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="build/benchmarks/python_overhead_baseline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="thread CPU time (default: robust on a shared machine) or wall time")
    args = ap.parse_args()

    cpp = cpp_baseline(args.baseline, args.repeats, args.clock)

    backend = vattn.HostBackend(physical_limit_bytes=1 << 40)
    cache = vattn.Cache(backend=backend, num_layers=4, num_kv_heads=8, head_dim=128,
                        dtype="float16", max_slots=SLOTS, max_tokens=4096)
    slots = []
    for _ in range(SLOTS):
        s = cache.alloc_slot(expected_tokens=BACKED)
        cache.grow(s, BACKED)
        slots.append(s)

    rows = []  # (case, cpp key, python fn)
    rows.append(("grow no-op", "BM_GrowNoop", lambda: cache.grow(slots[0], BACKED)))
    for batch in (1, 32, 256):
        # Every slot stepped to its backed length: bookkeeping only, as in C++.
        pairs = [(s, BACKED) for s in slots[:batch]]
        tensors = (torch.tensor(slots[:batch], dtype=torch.int64),
                   torch.full((batch,), BACKED, dtype=torch.int64))
        prepared = vattn.StepBatch(*tensors)
        rows.append((f"step batch {batch}, list of pairs", f"BM_Step/{batch}",
                     lambda pairs=pairs: cache.step(pairs)))
        rows.append((f"step batch {batch}, two int64 tensors", f"BM_Step/{batch}",
                     lambda t=tensors: cache.step(*t)))
        rows.append((f"step batch {batch}, StepBatch of two tensors", f"BM_Step/{batch}",
                     lambda b=prepared: cache.step(b)))
    rows.append(("view export: cache.k(1)", "BM_ViewK", lambda: cache.k(1)))
    rows.append(("view export: torch.from_dlpack(cache.k(1))", "BM_ViewK",
                 lambda: torch.from_dlpack(cache.k(1))))

    results = []
    print("| call | C++ (ns) | Python median (ns) [min-max] | ratio | added (ns) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for case, key, fn in rows:
        med, lo, hi = time_call(fn, args.repeats, args.clock)
        base = cpp[key]
        results.append(dict(case=case, cpp_ns=base, python_ns=med, python_min_ns=lo,
                            python_max_ns=hi, ratio=med / base))
        print(f"| {case} | {base:.0f} | {med:.0f} [{lo:.0f}-{hi:.0f}] | {med / base:.2f}x | {med - base:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(python=sys.version.split()[0], torch=torch.__version__, clock=args.clock,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
