#!/usr/bin/env python3
# Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#
# vattn's C API through Python's ctypes, loading libvattn_c.so: the structs of
# vattn/c_api.h are mirrored here field by field, so a layout the FFI cannot
# follow (or a missing export) fails this test. Usage:
#   c_api_ctypes_test.py PATH/TO/libvattn_c.so
import ctypes as C
import sys

VATTN_OK = 0
VATTN_INVALID_ARGUMENT = 3
VATTN_OUT_OF_RANGE = 11


class CacheOptions(C.Structure):
    _fields_ = [
        ("struct_size", C.c_size_t),
        ("num_layers", C.c_int),
        ("num_kv_heads", C.c_int),
        ("head_dim", C.c_int),
        ("dtype", C.c_int),
        ("max_slots", C.c_int),
        ("max_tokens", C.c_int64),
        ("layout", C.c_int),
        ("memory_budget_bytes", C.c_size_t),
        ("min_extent_bytes", C.c_size_t),
        ("max_extent_tokens", C.c_int64),
        ("max_extent_bytes", C.c_size_t),
        ("prealloc_handles", C.c_int),
        ("prealloc_handle_bytes", C.c_size_t),
        ("defer_reclaim", C.c_int),
        ("zero_on_reuse", C.c_int),
        ("map_ahead_tokens", C.c_int64),
        ("pool_low_water", C.c_int),
        ("pool_high_water", C.c_int),
        ("max_prefixes", C.c_int),
        ("arbiter", C.c_void_p),
        ("arbiter_floor_bytes", C.c_size_t),
        ("arbiter_cap_bytes", C.c_size_t),
        ("arbiter_name", C.c_char_p),
    ]


class StepRequest(C.Structure):
    _fields_ = [("slot", C.c_int), ("tokens", C.c_int64)]


class StepResult(C.Structure):
    _fields_ = [("misses", C.c_int), ("map_nanos", C.c_int64)]


def main():
    lib = C.CDLL(sys.argv[1])
    lib.vattn_last_error.restype = C.c_char_p
    failures = []

    def check(what, got, want=VATTN_OK):
        if got != want:
            failures.append("%s returned %d, expected %d (%s)" %
                            (what, got, want, lib.vattn_last_error().decode()))

    backend = C.c_void_p()
    check("vattn_backend_host", lib.vattn_backend_host(C.byref(backend)))
    opts = CacheOptions()
    lib.vattn_cache_options_default(C.byref(opts))
    if opts.struct_size != C.sizeof(CacheOptions):
        failures.append("struct_size %d != ctypes' sizeof %d: the mirror is "
                        "out of date" % (opts.struct_size,
                                         C.sizeof(CacheOptions)))
    got = (opts.num_layers, opts.num_kv_heads, opts.head_dim,
           opts.max_extent_tokens, opts.defer_reclaim)
    if got != (32, 8, 128, 64, 1):
        failures.append("defaults read through ctypes: %r" % (got,))
    opts.num_layers, opts.num_kv_heads, opts.head_dim = 2, 2, 64
    opts.max_slots, opts.max_tokens = 4, 4096
    opts.map_ahead_tokens = 64
    cache = C.c_void_p()
    check("vattn_cache_create",
          lib.vattn_cache_create(C.byref(opts), backend, C.byref(cache)))
    lib.vattn_backend_release(backend)  # The cache keeps its own reference.

    slot = C.c_int(-1)
    check("vattn_cache_alloc_slot",
          lib.vattn_cache_alloc_slot(cache, C.c_int64(300), C.byref(slot)))
    check("vattn_cache_grow", lib.vattn_cache_grow(cache, slot, C.c_int64(300)))
    result = StepResult()
    for tokens in range(301, 400):
        req = StepRequest(slot.value, tokens)
        check("vattn_cache_step",
              lib.vattn_cache_step(cache, C.byref(req), C.c_size_t(1),
                                   C.byref(result)))
    per_token = C.c_int64()
    check("vattn_cache_bytes_per_token",
          lib.vattn_cache_bytes_per_token(cache, C.byref(per_token)))
    if per_token.value != 2 * 2 * 2 * 64 * 2:
        failures.append("bytes per token %d" % per_token.value)

    # Errors come back as codes, with a message naming what was wrong.
    check("vattn_cache_grow past max_tokens",
          lib.vattn_cache_grow(cache, slot, C.c_int64(5000)),
          VATTN_OUT_OF_RANGE)
    check("vattn_cache_grow on slot 99",
          lib.vattn_cache_grow(cache, 99, C.c_int64(1)),
          VATTN_INVALID_ARGUMENT)
    if b"99" not in lib.vattn_last_error():
        failures.append("last error does not name the slot: %r" %
                        lib.vattn_last_error())
    check("vattn_cache_free", lib.vattn_cache_free(cache, slot, None, 0))
    lib.vattn_cache_destroy(cache)

    for f in failures:
        print("FAIL:", f)
    print("%d passed, %d failed" % (1 if not failures else 0,
                                    1 if failures else 0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
