/* Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
 *
 * vattn's C API: the KV cache and its backends for C, and for other languages
 * through their C foreign-function interfaces (Python's ctypes or cffi, Rust,
 * Go, ...). Plain C99; the same header compiles as C++.
 *
 * It is a thin layer over the C++ API (vattn/kv_cache.h, vattn/backend.h);
 * the comments there say what each operation does in detail. Here:
 *
 *  * Status. Every function that can fail returns an int: 0 (VATTN_OK) on
 *    success, otherwise one of the vattn_status codes below, which are
 *    absl::StatusCode's numeric values. The codes mean what vattn/status.h
 *    says (InvalidArgument: bad options, a bad slot or layer, a NULL
 *    argument; OutOfRange: beyond max_tokens; FailedPrecondition: a freed
 *    slot; ResourceExhausted: budget or memory used up; Unavailable: no
 *    driver or device; Internal: the driver or OS said something else).
 *    No C++ exception ever leaves these functions.
 *  * Last error. A failing call stores a message ("CODE: function: what
 *    happened", naming the offending argument or options field) in
 *    thread-local storage; vattn_last_error() returns it. A successful call
 *    leaves it unchanged (like errno), so read it right after the failing
 *    call. The pointer is valid until the next vattn call on that thread.
 *  * Outputs. Output arguments are written only on success, except that a
 *    handle output (vattn_backend**, vattn_cache**) is set to NULL when the
 *    call fails and the pointer to it is not NULL.
 *  * Versioned structs. vattn_cache_options, vattn_cache_stats,
 *    vattn_slot_info and vattn_prefix_info start with `size_t struct_size`,
 *    which the caller sets to sizeof the struct it was compiled with; a
 *    size this library does not know is InvalidArgument, so a program built
 *    against another version of this header fails cleanly instead of
 *    reading or writing past a struct.
 *  * Threads. As in C++: every call is thread-safe, and calls on one cache
 *    from several threads at once are fine. A handle must not be released or
 *    destroyed while another thread is using it, nor used afterwards.
 *  * Ownership. vattn_backend_host and vattn_backend_cuda return a backend
 *    handle owned by the caller (vattn_backend_release). A cache holds its
 *    own reference to its backend, so the caller may release the backend
 *    handle right after vattn_cache_create; the backend lives until its last
 *    cache is destroyed. vattn_cache_create returns a cache owned by the
 *    caller (vattn_cache_destroy).
 *
 * A decode loop, shortened (check every return code):
 *
 *   vattn_backend* backend;
 *   vattn_backend_host(&backend);           // or vattn_backend_cuda(0, ...)
 *   vattn_cache_options opts;
 *   vattn_cache_options_default(&opts);     // sets struct_size too
 *   opts.max_slots = 64;
 *   vattn_cache* cache;
 *   vattn_cache_create(&opts, backend, &cache);
 *   vattn_backend_release(backend);         // the cache keeps its own
 *   int slot;
 *   vattn_cache_alloc_slot(cache, 500, &slot);
 *   vattn_cache_grow(cache, slot, 500);     // prefill
 *   vattn_step_request req = {slot, 501};
 *   vattn_cache_step(cache, &req, 1, NULL); // one decode step
 *   vattn_cache_free(cache, slot, NULL, 0);
 *   vattn_cache_destroy(cache);
 */
#ifndef VATTN_C_API_H_
#define VATTN_C_API_H_

#include <stddef.h>
#include <stdint.h>

#include "vattn/export.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Status codes (absl::StatusCode's values) ---------------------------- */
typedef enum vattn_status {
  VATTN_OK = 0,
  VATTN_CANCELLED = 1,
  VATTN_UNKNOWN = 2,
  VATTN_INVALID_ARGUMENT = 3,
  VATTN_DEADLINE_EXCEEDED = 4,
  VATTN_NOT_FOUND = 5,
  VATTN_ALREADY_EXISTS = 6,
  VATTN_PERMISSION_DENIED = 7,
  VATTN_RESOURCE_EXHAUSTED = 8,
  VATTN_FAILED_PRECONDITION = 9,
  VATTN_ABORTED = 10,
  VATTN_OUT_OF_RANGE = 11,
  VATTN_UNIMPLEMENTED = 12,
  VATTN_INTERNAL = 13,
  VATTN_UNAVAILABLE = 14,
  VATTN_DATA_LOSS = 15,
  VATTN_UNAUTHENTICATED = 16
} vattn_status;

/* The message of the most recent failed vattn call on this thread, or "" if
 * none has failed. Never NULL. Valid until the next vattn call on this
 * thread; copy it to keep it. */
VATTN_EXPORT const char* vattn_last_error(void);

/* ---- Enumerations (values of vattn::DType and vattn::Layout) ------------- */
typedef enum vattn_dtype {
  VATTN_DTYPE_FLOAT16 = 0,
  VATTN_DTYPE_BFLOAT16 = 1,
  VATTN_DTYPE_FLOAT32 = 2,
  VATTN_DTYPE_FLOAT8_E4M3 = 3,
  VATTN_DTYPE_INT8 = 4
} vattn_dtype;

typedef enum vattn_layout {
  /* One buffer [slots][max_tokens][layers][2 (K,V)][kv_heads][head_dim]. */
  VATTN_LAYOUT_TOKEN_MAJOR = 0,
  /* Per-layer packed K and V tensors [slots][max_tokens][kv_heads][head_dim]. */
  VATTN_LAYOUT_LAYER_MAJOR = 1
} vattn_layout;

/* Bytes per element of `dtype` (a vattn_dtype value) in *out.
 * InvalidArgument: out is NULL or dtype is not a vattn_dtype. */
VATTN_EXPORT int vattn_dtype_size(int dtype, size_t* out);

/* ---- Backends ------------------------------------------------------------ */
/* An opaque reference to a physical-memory backend (vattn::Backend). */
typedef struct vattn_backend vattn_backend;

/* The Host backend with default options (CPU memory, 2 MiB granularity, the
 * machine's physical memory as its limit). The caller owns *out.
 * InvalidArgument: out is NULL. Otherwise the C++ factory's errors. */
VATTN_EXPORT int vattn_backend_host(vattn_backend** out);

/* The CUDA backend of device `device`. libcuda.so.1 is loaded at run time:
 * without a driver or device this is Unavailable, with the reason in
 * vattn_last_error(). InvalidArgument: out is NULL or the ordinal is out of
 * range. The caller owns *out. */
VATTN_EXPORT int vattn_backend_cuda(int device, vattn_backend** out);

/* Drops the caller's reference. Caches made on the backend keep theirs, so it
 * lives on until the last of them is destroyed. NULL is ignored. The handle
 * must not be used afterwards, nor released while another thread uses it. */
VATTN_EXPORT void vattn_backend_release(vattn_backend* backend);

/* Number of CUDA devices in *out (0 with a driver and no device).
 * Unavailable: no CUDA driver can be loaded. InvalidArgument: out is NULL. */
VATTN_EXPORT int vattn_cuda_device_count(int* out);

/* An opaque shared budget (vattn::MemoryArbiter; "Elastic memory" below). */
typedef struct vattn_arbiter vattn_arbiter;

/* ---- Cache options (vattn::KVCacheOptions) ------------------------------- */
/* Mirrors vattn::KVCacheOptions field by field (see vattn/options.h for what
 * each one trades off); booleans are ints (0 false, anything else true) and
 * enums are ints. Fill it with vattn_cache_options_default, then change what
 * you need. */
typedef struct vattn_cache_options {
  size_t struct_size; /* sizeof(vattn_cache_options); set by _default. */

  /* Shape. */
  int num_layers;
  int num_kv_heads;
  int head_dim;
  int dtype;          /* a vattn_dtype */
  int max_slots;
  int64_t max_tokens;
  int layout;         /* a vattn_layout */

  /* Physical memory. */
  size_t memory_budget_bytes; /* 0: the backend's physical memory. */

  /* Extent policy. */
  size_t min_extent_bytes;
  int64_t max_extent_tokens;
  size_t max_extent_bytes;

  /* Handle pool. */
  int prealloc_handles;
  size_t prealloc_handle_bytes;

  /* Reclamation and isolation. */
  int defer_reclaim;
  int zero_on_reuse;

  /* Map-ahead. */
  int64_t map_ahead_tokens;
  int pool_low_water;
  int pool_high_water;

  /* Prefix sharing: cached prefixes held at once (0: KeepPrefix off). */
  int max_prefixes;

  /* Shared budget (vattn/memory_arbiter.h; see "Elastic memory" below). */
  vattn_arbiter* arbiter;     /* NULL: the cache's own budget. The cache takes
                                 its own reference; the caller keeps its. With
                                 an arbiter, memory_budget_bytes must be 0. */
  size_t arbiter_floor_bytes; /* Never reclaimed by other caches; 0: none. */
  size_t arbiter_cap_bytes;   /* Ceiling (0: the arbiter's budget only). */
  const char* arbiter_name;   /* Name in the telemetry (copied); NULL or "":
                                 "cache-<id>". */
} vattn_cache_options;

/* Fills *options with the C++ defaults (KVCacheOptions{}) and sets
 * struct_size. NULL is ignored. */
VATTN_EXPORT void vattn_cache_options_default(vattn_cache_options* options);

/* ---- The cache ------------------------------------------------------------ */
/* An opaque KV cache (vattn::KVCache). */
typedef struct vattn_cache vattn_cache;

/* Makes a cache on `backend` with `options`. The cache takes its own
 * reference to the backend; the caller owns *out (vattn_cache_destroy).
 * InvalidArgument: a NULL argument, an unknown options->struct_size, options
 * that fail validation (the message names the field), or a cache larger than
 * the backend can reserve. Also the backend's errors while reserving or
 * pre-creating handles (nothing is left behind). */
VATTN_EXPORT int vattn_cache_create(const vattn_cache_options* options,
                                    vattn_backend* backend, vattn_cache** out);

/* Destroys the cache: joins its map-ahead thread, waits for GPU work fenced
 * at vattn_cache_free, and gives back every mapping, handle and reservation.
 * NULL is ignored. No other thread may be using the cache. */
VATTN_EXPORT void vattn_cache_destroy(vattn_cache* cache);

/* Takes a free slot for a new request (length 0) into *slot, preferring an
 * idle slot whose memory fits `expected_tokens` (the prompt length, say).
 * InvalidArgument: NULL argument or expected_tokens < 0. OutOfRange: above
 * max_tokens. ResourceExhausted: every slot is active. */
VATTN_EXPORT int vattn_cache_alloc_slot(vattn_cache* cache,
                                        int64_t expected_tokens, int* slot);

/* Backs tokens [0, tokens) of `slot` and sets its length to
 * max(length, tokens). InvalidArgument: NULL cache, bad slot, tokens < 0.
 * OutOfRange: tokens > max_tokens. FailedPrecondition: the slot is not
 * active. ResourceExhausted: the budget cannot hold the memory even after
 * reclaiming idle slots (the slot is then unchanged). */
VATTN_EXPORT int vattn_cache_grow(vattn_cache* cache, int slot,
                                  int64_t tokens);

/* Lowers the slot's length to `tokens`; unmaps nothing. InvalidArgument:
 * NULL cache, bad slot, tokens < 0 or above the length.
 * FailedPrecondition: the slot is not active. */
VATTN_EXPORT int vattn_cache_shrink(vattn_cache* cache, int slot,
                                    int64_t tokens);

/* Ends the slot's request; its memory stays mapped for the next request
 * placed there (unless defer_reclaim is off), and is never unmapped before
 * a fence recorded here has completed. With has_fence non-zero the fence is
 * recorded on `stream` (a CUstream; NULL is the legacy default stream);
 * with has_fence 0, `stream` is ignored and the fence is recorded on the
 * legacy default stream, which waits for the work queued on every blocking
 * stream (safe by default; work on non-blocking streams needs its stream).
 * Backends without streams keep no fence. InvalidArgument: NULL cache or
 * bad slot. FailedPrecondition: the slot is not active. */
VATTN_EXPORT int vattn_cache_free(vattn_cache* cache, int slot,
                                  void* stream, int has_fence);

/* As vattn_cache_free, but records no fence: for callers that have
 * synchronised their streams themselves (the memory may be unmapped at
 * once). Errors as vattn_cache_free's. */
VATTN_EXPORT int vattn_cache_free_no_fence(vattn_cache* cache, int slot);

/* One active request of a decode step: after vattn_cache_step succeeds, the
 * slot is backed to, and has its length set to, `tokens` (counting the
 * tokens the step writes). */
typedef struct vattn_step_request {
  int slot;
  int64_t tokens;
} vattn_step_request;

/* What one step cost the caller. */
typedef struct vattn_step_result {
  int misses;         /* Slots the step had to map on the caller's thread. */
  int64_t map_nanos;  /* Time spent mapping (or waiting) on that thread. */
} vattn_step_result;

/* Prepares one decode step for the `n` requests in `requests` (which may be
 * NULL when n is 0). When the map-ahead thread kept up this is bookkeeping
 * only. Writes *result when it is not NULL. Errors as vattn_cache_grow's for
 * the first failing request (requests before it stay grown; bad slots or
 * token counts change nothing), and the map-ahead thread's sticky error. */
VATTN_EXPORT int vattn_cache_step(vattn_cache* cache,
                                  const vattn_step_request* requests, size_t n,
                                  vattn_step_result* result);

/* A strided 4-D view of one layer's K or V for every slot:
 * shape = {max_slots, max_tokens, num_kv_heads, head_dim}; element
 * (b, t, h, d) is at data + (b*strides[0] + t*strides[1] + h*strides[2] +
 * d*strides[3]) * element size (vattn_dtype_size) bytes. Only tokens a grow
 * or step has backed may be touched. `data` is a device address on device
 * backends; it stays valid until the cache is destroyed. */
typedef struct vattn_tensor_view {
  void* data;
  int dtype; /* a vattn_dtype */
  int64_t shape[4];
  int64_t strides[4]; /* In elements. */
} vattn_tensor_view;

/* The K (or V) view of `layer` in *out. InvalidArgument: a NULL argument or
 * a layer outside [0, num_layers). */
VATTN_EXPORT int vattn_cache_k(const vattn_cache* cache, int layer,
                               vattn_tensor_view* out);
VATTN_EXPORT int vattn_cache_v(const vattn_cache* cache, int layer,
                               vattn_tensor_view* out);

/* A snapshot of the cache's memory and driver activity; mirrors
 * vattn::CacheStats field by field (see vattn/stats.h). */
typedef struct vattn_cache_stats {
  size_t struct_size; /* The caller sets sizeof(vattn_cache_stats). */

  /* Memory now (bytes). */
  int64_t physical_bytes;
  int64_t pooled_bytes;
  int64_t mapped_bytes;
  int64_t surplus_bytes;
  int64_t logical_bytes;
  int64_t budget_bytes;
  int64_t peak_physical_bytes;

  /* Slots. */
  int64_t active_slots;
  int64_t idle_slots_with_memory;

  /* Driver calls made by this cache. */
  int64_t create_calls;
  int64_t destroy_calls;
  int64_t map_calls;
  int64_t unmap_calls;

  /* Policy outcomes. */
  int64_t grow_calls;
  int64_t extents_mapped;
  int64_t reuse_hits;
  int64_t adopted_extents;
  int64_t reclaimed_bytes;
  int64_t reclaimed_extents;
  int64_t fence_waits;
  int64_t zeroed_bytes;

  /* Step and map-ahead. */
  int64_t step_calls;
  int64_t step_misses;
  int64_t step_map_nanos;
  int64_t background_extents;
  int64_t background_creates;
  /* Map-ahead thread wake-ups: all, on its own deadline, by a caller. */
  int64_t background_wakeups;
  int64_t background_deadline_wakeups;
  int64_t background_caller_wakeups;

  /* Faults (see vattn::CacheStats). */
  int64_t quarantined_extents;
  int64_t quarantined_bytes;
  int64_t background_failures;

  /* Prefix sharing (see "Prefix sharing" below and vattn::CacheStats). */
  int64_t shared_bytes;        /* Physical bytes mapped in several places. */
  int64_t shared_saved_bytes;  /* What the sharers would need on top. */
  int64_t cached_prefixes;
  int64_t cached_prefix_bytes;
  int64_t prefix_hits;         /* vattn_cache_alloc_slot_with_prefix successes. */
  int64_t forks;               /* vattn_cache_fork successes. */
  int64_t prefix_evictions;    /* Cached prefixes reclaimed under pressure. */
  int64_t cow_copied_bytes;    /* Tails copied at share time. */
  int64_t copy_calls;          /* Backend device-to-device copies. */
  int64_t set_access_calls;    /* Backend access changes (read-only). */

  /* Zero-copy handoff (vattn_cache_send_slot / vattn_cache_receive_slot). */
  int64_t exported_bytes;  /* Mapped here, exported: still this cache's. */
  int64_t imported_bytes;  /* Mapped here, another process's: not physical. */
  int64_t exported_slots;
  int64_t imported_slots;
} vattn_cache_stats;

/* Fills *out (whose struct_size the caller has set). InvalidArgument: a NULL
 * argument or an unknown out->struct_size. */
VATTN_EXPORT int vattn_cache_get_stats(const vattn_cache* cache,
                                       vattn_cache_stats* out);

/* A snapshot of one slot (vattn::SlotInfo). */
typedef struct vattn_slot_info {
  size_t struct_size; /* The caller sets sizeof(vattn_slot_info). */
  int active;                /* 1 while a request holds the slot. */
  int extents;
  int64_t length;            /* Logical tokens. */
  int64_t backed_tokens;     /* Tokens that may be touched. */
  int64_t mapped_bytes;      /* Physical bytes mapped, all tensors. */
  int64_t adopted_bytes;     /* Of mapped_bytes, those backing the request. */
} vattn_slot_info;

/* Fills *out (whose struct_size the caller has set) for `slot`.
 * InvalidArgument: a NULL argument, an unknown out->struct_size or a bad
 * slot. */
VATTN_EXPORT int vattn_cache_get_slot(const vattn_cache* cache, int slot,
                                      vattn_slot_info* out);

/* Bytes of K and V, all layers, of one token, in *out. InvalidArgument: a
 * NULL argument. */
VATTN_EXPORT int vattn_cache_bytes_per_token(const vattn_cache* cache,
                                             int64_t* out);

/* A virtual address range of the cache (vattn::MemoryRange). */
typedef struct vattn_memory_range {
  uint64_t address; /* A device address on device backends. */
  size_t bytes;
} vattn_memory_range;

/* The ranges that hold tokens [0, tokens) of an active slot, for a transfer
 * engine (KVCache::SlotRanges: one range in token-major, 2 x num_layers in
 * layer-major, K of layer 0, V of layer 0, K of layer 1, ...; none for
 * tokens == 0). Sets *count to the number of ranges and writes them to
 * out[0 .. *count) when capacity allows; out may be NULL with capacity 0 to
 * ask for the count only. Thread-safe.
 * InvalidArgument: a NULL cache or count, out NULL with capacity > 0, a bad
 * slot, tokens < 0, or capacity below the count (then *count is still set).
 * FailedPrecondition: the slot is not active. OutOfRange: tokens above the
 * slot's backed tokens or above max_tokens. */
VATTN_EXPORT int vattn_cache_slot_ranges(const vattn_cache* cache, int slot,
                                         int64_t tokens,
                                         vattn_memory_range* out,
                                         size_t capacity, size_t* count);

/* The cache's whole virtual reservation in *out (KVCache::Reservation): it
 * never moves for the cache's life. InvalidArgument: a NULL argument. */
VATTN_EXPORT int vattn_cache_reservation(const vattn_cache* cache,
                                         vattn_memory_range* out);

/* ---- Prefix sharing (KVCache::KeepPrefix and friends) --------------------
 * A request's first tokens can be another request's without a copy: the
 * slots map the same physical extents, read-only, and their views read them
 * as their own contiguous KV (unchanged kernels). The engine names prefixes
 * by a 64-bit id and owns hashing and matching; vattn owns the memory. Whole
 * extents inside the shared tokens are aliased; the tokens of an extent that
 * is only partly shared (the tail) are copied into a fresh extent of the new
 * slot at share time. The shared part is read-only for every slot that maps
 * it, the owner included: a write through it faults (SIGSEGV on the Host
 * backend, a device fault on CUDA). A shared extent counts once in physical
 * bytes and the budget; a cached prefix no request uses is reclaimed, with
 * the idle slots, when memory is needed. vattn/kv_cache.h says the rest.
 *
 * Streams: the copies are ordered on a CUDA stream. With has_stream non-zero
 * they go on `stream` (a CUstream; NULL is the legacy default stream); with
 * has_stream 0 `stream` is ignored and the C++ overload without a stream is
 * called (the legacy default stream). Backends without streams ignore both.
 * Every call is thread-safe, as the rest of the cache.
 *
 *   int owner, user;
 *   vattn_cache_alloc_slot_split(cache, 2100, 2048, &owner);  // prefix boundary
 *   vattn_cache_grow(cache, owner, 2100);          // prefill, write the K/V
 *   vattn_cache_keep_prefix(cache, owner, 2048, 42, NULL, 0);
 *   vattn_cache_alloc_slot_with_prefix(cache, 42, 2150, 0, NULL, 0, &user);
 *   vattn_cache_drop_prefix(cache, 42);            // users keep the memory
 */

/* vattn_cache_alloc_slot with the prompt's prefix boundary
 * (`split_at_tokens`, e.g. the system prompt's length; 0: none): the slot
 * maps one extent up to that boundary, rounded down to the granularity, and
 * separate extents after it, so the prefix can later be kept whole (costs
 * one more map per request when the boundary is not the first extent's end
 * anyway). The slot in *slot. InvalidArgument: a NULL argument,
 * expected_tokens < 0 or split_at_tokens < 0. OutOfRange: either above
 * max_tokens. ResourceExhausted: every slot is active. */
VATTN_EXPORT int vattn_cache_alloc_slot_split(vattn_cache* cache,
                                              int64_t expected_tokens,
                                              int64_t split_at_tokens,
                                              int* slot);

/* vattn_cache_grow, setting the slot's prefix boundary first (see
 * vattn_cache_alloc_slot_split; a boundary at or below what the slot maps
 * already changes nothing there). Errors as vattn_cache_grow's; also
 * InvalidArgument for split_at_tokens < 0, OutOfRange above max_tokens. */
VATTN_EXPORT int vattn_cache_grow_split(vattn_cache* cache, int slot,
                                        int64_t tokens,
                                        int64_t split_at_tokens);

/* Keeps tokens [0, tokens) of an active slot as a cached prefix named
 * `prefix_id`, which outlives the slot's request. The slot's extents inside
 * the prefix turn read-only in the slot too; the tail is copied once into
 * memory the prefix keeps (after the work queued on the stream, which must
 * have written the tokens). The slot may keep growing and writing tokens at
 * and after `tokens`. InvalidArgument: NULL cache, bad slot, tokens < 1.
 * OutOfRange: tokens above the slot's length or max_tokens.
 * FailedPrecondition: the slot is not active. AlreadyExists: `prefix_id`
 * names a cached prefix already. ResourceExhausted: the tail does not fit
 * the budget even after reclaiming, or max_prefixes are cached and none can
 * be evicted. A failure leaves the cache as it was. */
VATTN_EXPORT int vattn_cache_keep_prefix(vattn_cache* cache, int slot,
                                         int64_t tokens, uint64_t prefix_id,
                                         void* stream, int has_stream);

/* Starts a request (its slot in *slot) whose first `tokens` tokens, up to
 * the prefix's length, are the prefix's, with length `tokens`: its slot maps
 * the prefix's whole extents read-only and a fresh extent the tail is copied
 * into, backed to max(tokens, expected_tokens); tokens past the prefix are
 * backed and the engine prefills them. Counts a prefix hit.
 * InvalidArgument: NULL cache or slot, tokens < 1, expected_tokens < 0.
 * OutOfRange: either above max_tokens. NotFound: no cached prefix has this
 * id (never kept, dropped or evicted). ResourceExhausted: every slot is
 * active, or the budget cannot hold the tail even after reclaiming (nothing
 * changed then). */
VATTN_EXPORT int vattn_cache_alloc_slot_with_prefix(
    vattn_cache* cache, uint64_t prefix_id, int64_t tokens,
    int64_t expected_tokens, void* stream, int has_stream, int* slot);

/* Forgets a cached prefix; slots that share its memory keep it, and the
 * memory goes when the last of them lets go. InvalidArgument: NULL cache.
 * NotFound: no cached prefix has this id. */
VATTN_EXPORT int vattn_cache_drop_prefix(vattn_cache* cache,
                                         uint64_t prefix_id);

/* Starts a request (its slot in *child) sharing every token of the active
 * `slot` (parallel sampling, beam search): same length, the source's whole
 * extents mapped read-only in both, a copy of the partly filled last
 * extent's tokens in a fresh extent. Both then grow independently.
 * InvalidArgument: NULL cache or child, bad slot. FailedPrecondition: the
 * slot is not active. ResourceExhausted: as
 * vattn_cache_alloc_slot_with_prefix. */
VATTN_EXPORT int vattn_cache_fork(vattn_cache* cache, int slot, void* stream,
                                  int has_stream, int* child);

/* A snapshot of one cached prefix (vattn::PrefixInfo). */
typedef struct vattn_prefix_info {
  size_t struct_size;  /* The caller sets sizeof(vattn_prefix_info). */
  int64_t tokens;
  int64_t bytes;       /* Physical bytes it keeps, all tensors. */
  int64_t tail_bytes;  /* Of which its copied tail. */
  int whole_extents;   /* Extents aliased by every request using it. */
  int users;           /* Active slots sharing its memory now. */
  int64_t hits;        /* Requests started from it. */
} vattn_prefix_info;

/* Fills *out (whose struct_size the caller has set) for `prefix_id`.
 * InvalidArgument: a NULL argument or an unknown out->struct_size.
 * NotFound: no cached prefix has this id. */
VATTN_EXPORT int vattn_cache_get_prefix(const vattn_cache* cache,
                                        uint64_t prefix_id,
                                        vattn_prefix_info* out);

/* ---- Zero-copy handoff between processes (vattn/slot_export.h) ----------
 * A prefill process hands a request to a decode process on the same machine
 * (or GPU) without copying it: the decode cache maps the prefill cache's
 * physical memory into one of its slots and grows it with memory of its
 * own. The descriptors travel over a connected AF_UNIX SOCK_STREAM socket
 * (SCM_RIGHTS). The memory lives while either side maps it; each side's
 * stats say what it counts (exported_bytes / imported_bytes in vattn::
 * CacheStats). Thread-safe as the rest of the cache; the calls block until
 * the message is written or has arrived.
 *
 *   prefill: vattn_backend_host_exportable(&b);  ... make the cache on b ...
 *            vattn_cache_send_slot(cache, sock, slot, prompt);
 *            vattn_cache_free(cache, slot);        // decode keeps the memory
 *   decode:  vattn_cache_receive_slot(cache, sock, &slot);  // same shape */

/* The Host backend with exportable handles (one memfd per handle; see
 * vattn::HostBackendOptions::exportable_handles), otherwise the defaults.
 * The caller owns *out. InvalidArgument: out is NULL. */
VATTN_EXPORT int vattn_backend_host_exportable(vattn_backend** out);

/* The CUDA backend of `device` with exportable handles (POSIX file
 * descriptors requested at cuMemCreate, GPUDirect RDMA where supported).
 * Unavailable: no driver or device, or the device cannot export POSIX
 * descriptors. InvalidArgument: out is NULL or a bad ordinal. */
VATTN_EXPORT int vattn_backend_cuda_exportable(int device, vattn_backend** out);

/* Exports tokens [0, tokens) of `slot` and sends them over `sock`
 * (vattn::SendSlot): afterwards the exported extents never back another
 * request of this cache (free the slot once sent; write none of its
 * tokens). InvalidArgument: cache NULL, bad slot or tokens, `sock` not a
 * connected AF_UNIX stream socket. FailedPrecondition: the slot is not
 * active or the backend is not exportable. OutOfRange: tokens above what
 * the slot backs. Unavailable: the peer has gone. */
VATTN_EXPORT int vattn_cache_send_slot(vattn_cache* cache, int sock, int slot,
                                       int64_t tokens);

/* Receives one vattn_cache_send_slot message from `sock` and imports it
 * into a free slot of `cache` (vattn::ReceiveSlot), written to *slot_out;
 * its length is the sender's `tokens`. Every descriptor received is closed
 * before the call returns. InvalidArgument: a NULL argument, another shape
 * (both named in vattn_last_error()), a descriptor that is not an export, a
 * message that is not a slot export. ResourceExhausted: no free slot.
 * DataLoss: the message was cut short. Nothing is imported on error. */
VATTN_EXPORT int vattn_cache_receive_slot(vattn_cache* cache, int sock,
                                          int* slot_out);

/* ---- Elastic memory (vattn::MemoryArbiter, vattn/memory_arbiter.h) -------
 * One physical budget shared by several caches on one backend: each cache
 * made with options.arbiter set draws its memory from the arbiter's budget;
 * when one needs memory and the budget is full, idle memory of any cache
 * (pooled handles, idle slots, cached prefixes; least recently used first)
 * is taken back. Active memory is never taken. arbiter_floor_bytes is a
 * cache's guarantee, arbiter_cap_bytes its ceiling. Every call is
 * thread-safe and may run while the caches are in use.
 *
 *   vattn_arbiter* arb;
 *   vattn_arbiter_create(backend, (size_t)8 << 30, &arb);
 *   opts.arbiter = arb;  opts.arbiter_name = "llama";
 *   vattn_cache_create(&opts, backend, &cache_a);    // and cache_b ...
 *   vattn_arbiter_release(arb);                      // the caches keep theirs
 *
 * Ownership: vattn_arbiter_create returns a handle owned by the caller
 * (vattn_arbiter_release); every cache made with it holds its own
 * reference, so the arbiter lives until its last cache is destroyed. */

/* Makes an arbiter over `backend` whose caches together hold at most
 * `budget_bytes` physical bytes at any instant. Every cache attached must
 * be made on this same backend handle's backend. InvalidArgument: a NULL
 * argument, budget_bytes 0 or above 2^60. The caller owns *out. */
VATTN_EXPORT int vattn_arbiter_create(vattn_backend* backend,
                                      size_t budget_bytes,
                                      vattn_arbiter** out);

/* Drops the caller's reference (caches keep theirs). NULL is ignored. */
VATTN_EXPORT void vattn_arbiter_release(vattn_arbiter* arbiter);

/* Changes the shared budget (MemoryArbiter::SetBudget). Growth takes effect
 * at once; shrinking first takes idle memory back, never below a cache's
 * floor. The new budget stands either way. ResourceExhausted (with the
 * bytes held, active and asked for): active memory keeps the caches above
 * it; growth is refused until memory is freed. InvalidArgument: NULL
 * arbiter, bytes 0, above 2^60 or below the sum of the caches' floors
 * (nothing changes). A backend error while destroying memory as is. */
VATTN_EXPORT int vattn_arbiter_set_budget(vattn_arbiter* arbiter,
                                          size_t bytes);

/* Returns idle memory of every cache to the driver (handles destroyed, not
 * pooled) until the caches hold at most `target_bytes` together
 * (MemoryArbiter::Trim); never active memory, never a cache below its
 * floor. The bytes destroyed go to *destroyed_bytes when it is not NULL.
 * When active memory keeps the caches above the target it destroys what it
 * can and returns OK. The budget is unchanged. InvalidArgument: NULL
 * arbiter. Backend errors as they are. */
VATTN_EXPORT int vattn_arbiter_trim(vattn_arbiter* arbiter,
                                    size_t target_bytes,
                                    size_t* destroyed_bytes);

/* The budget in force, in *out. InvalidArgument: a NULL argument. */
VATTN_EXPORT int vattn_arbiter_budget_bytes(const vattn_arbiter* arbiter,
                                            size_t* out);

/* A JSON snapshot of the arbiter and every cache attached to it
 * (vattn::TelemetryJson, vattn/arbiter_telemetry.h, documents the fields):
 * sets *length to the JSON's length in bytes (without the NUL) and, when
 * capacity > length, copies it with a terminating NUL into buffer. Pass
 * buffer NULL and capacity 0 to ask for the length only; the next snapshot
 * may be a few bytes longer, so leave slack or retry. InvalidArgument: NULL
 * arbiter or length, buffer NULL with capacity > 0, or capacity <= the
 * length (then *length is still set and nothing is copied). */
VATTN_EXPORT int vattn_arbiter_telemetry_json(const vattn_arbiter* arbiter,
                                              char* buffer, size_t capacity,
                                              size_t* length);

/* Changes the cache's budget at run time (KVCache::SetBudget): without an
 * arbiter its memory_budget_bytes, with one its cap. Growth takes effect at
 * once; shrinking first destroys the cache's idle memory. The new budget
 * stands either way. ResourceExhausted (with the numbers): active memory
 * keeps the cache above it. InvalidArgument: NULL cache, bytes below one
 * granule per tensor, above 2^60 or (with an arbiter) below the cache's
 * floor (nothing changes). A backend error while destroying as is. */
VATTN_EXPORT int vattn_cache_set_budget(vattn_cache* cache, size_t bytes);

/* Returns the cache's idle memory to the driver until it holds at most
 * `target_bytes` (KVCache::Trim); the bytes destroyed go to
 * *destroyed_bytes when it is not NULL. OK with what it could destroy when
 * active memory keeps it above the target. The budget is unchanged, and
 * the background pool refill does not re-create what was trimmed.
 * InvalidArgument: NULL cache. Backend errors as they are. */
VATTN_EXPORT int vattn_cache_trim(vattn_cache* cache, size_t target_bytes,
                                  size_t* destroyed_bytes);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* VATTN_C_API_H_ */
