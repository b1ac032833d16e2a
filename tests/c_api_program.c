/* Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
 *
 * A C99 program on vattn/c_api.h (built as C with -std=c99 -Wpedantic, so it
 * also proves the header is valid C): a host backend and a small cache;
 * alloc, grow, write through the K view, steps, stats, free, destroy. Every
 * return code is checked; exits non-zero, with vattn_last_error(), on the
 * first failure. Run by ctest as c_api.c_program. */
#include <stdio.h>
#include <stdlib.h>

#include "vattn/c_api.h"

#define CHECK(call)                                                       \
  do {                                                                    \
    int rc_ = (call);                                                     \
    if (rc_ != VATTN_OK) {                                                \
      fprintf(stderr, "%s:%d: %s -> %d (%s)\n", __FILE__, __LINE__, #call, \
              rc_, vattn_last_error());                                   \
      return 1;                                                           \
    }                                                                     \
  } while (0)

#define EXPECT(cond)                                                      \
  do {                                                                    \
    if (!(cond)) {                                                        \
      fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      return 1;                                                           \
    }                                                                     \
  } while (0)

static int Run(vattn_backend* backend, vattn_cache** cache) {
  vattn_cache_options opts;
  vattn_cache_stats stats;
  vattn_slot_info info;
  vattn_tensor_view k;
  vattn_step_request req;
  vattn_step_result result;
  int64_t len;
  int64_t bytes_per_token = 0;
  int slot = -1;
  int rc;
  float* row;

  vattn_cache_options_default(&opts);
  EXPECT(opts.struct_size == sizeof(opts));
  opts.num_layers = 2;
  opts.num_kv_heads = 2;
  opts.head_dim = 8;
  opts.dtype = VATTN_DTYPE_FLOAT32;
  opts.max_slots = 4;
  opts.max_tokens = 4096;
  CHECK(vattn_cache_create(&opts, backend, cache));
  CHECK(vattn_cache_bytes_per_token(*cache, &bytes_per_token));
  EXPECT(bytes_per_token == 2 * 2 * 2 * 8 * 4);

  CHECK(vattn_cache_alloc_slot(*cache, 100, &slot));
  CHECK(vattn_cache_grow(*cache, slot, 100));

  /* Token 99, head 1 of layer 1's K: write and read back. */
  CHECK(vattn_cache_k(*cache, 1, &k));
  EXPECT(k.data != NULL && k.dtype == VATTN_DTYPE_FLOAT32);
  EXPECT(k.shape[0] == 4 && k.shape[1] == 4096 && k.shape[2] == 2 &&
         k.shape[3] == 8 && k.strides[3] == 1);
  row = (float*)k.data + slot * k.strides[0] + 99 * k.strides[1] +
        1 * k.strides[2];
  row[7] = 42.0f;
  EXPECT(((const float*)k.data)[slot * k.strides[0] + 99 * k.strides[1] +
                                k.strides[2] + 7] == 42.0f);

  for (len = 101; len <= 200; ++len) {
    req.slot = slot;
    req.tokens = len;
    CHECK(vattn_cache_step(*cache, &req, 1, &result));
    EXPECT(result.misses >= 0 && result.map_nanos >= 0);
  }

  info.struct_size = sizeof(info);
  CHECK(vattn_cache_get_slot(*cache, slot, &info));
  EXPECT(info.active == 1 && info.length == 200 && info.backed_tokens >= 200);

  stats.struct_size = sizeof(stats);
  CHECK(vattn_cache_get_stats(*cache, &stats));
  EXPECT(stats.active_slots == 1);
  EXPECT(stats.logical_bytes == 200 * bytes_per_token);
  EXPECT(stats.step_calls == 100 && stats.map_calls >= 1);
  printf("physical %lld bytes, %lld map calls, %lld steps\n",
         (long long)stats.physical_bytes, (long long)stats.map_calls,
         (long long)stats.step_calls);

  CHECK(vattn_cache_free(*cache, slot, NULL, 0));
  /* Errors come back as codes, with a message. */
  rc = vattn_cache_free(*cache, slot, NULL, 0);
  EXPECT(rc == VATTN_FAILED_PRECONDITION);
  printf("double free: %d (%s)\n", rc, vattn_last_error());
  rc = vattn_cache_grow(*cache, 0, 1 << 20);
  EXPECT(rc == VATTN_OUT_OF_RANGE || rc == VATTN_FAILED_PRECONDITION);
  EXPECT(vattn_cache_grow(NULL, 0, 1) == VATTN_INVALID_ARGUMENT);

  CHECK(vattn_cache_get_stats(*cache, &stats));
  EXPECT(stats.active_slots == 0 && stats.idle_slots_with_memory == 1);
  return 0;
}

int main(void) {
  vattn_backend* backend = NULL;
  vattn_cache* cache = NULL;
  int failed;
  CHECK(vattn_backend_host(&backend));
  failed = Run(backend, &cache);
  vattn_cache_destroy(cache);
  vattn_backend_release(backend);
  if (failed) return EXIT_FAILURE;
  printf("c_api_program: OK\n");
  return EXIT_SUCCESS;
}
