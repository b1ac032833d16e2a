// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The decode loop's shared system prompt (batch_decode --shared-prefix,
// issue 13): every request's first `prefix_tokens` tokens are the same
// prompt, whose K/V rows the fill writes under one id (kSharedPrefixFillId),
// so every engine computes the same attention.
//
// On vattn with sharing, the prompt is kept once, as a server keeps a
// system prompt it serves often: before the first step the loop prefills it
// into a slot of its own (Begin: AllocSlot and Grow with the prompt's
// boundary as the split hint, so it is one extent), KeepPrefix keeps it
// (ordered on the compute stream on CUDA) and the slot is freed (End); every
// request then starts with AllocSlotWithPrefix: its slot maps the prompt's
// extents read-only and its prefill writes only its own tokens. Should the
// kept prompt be evicted under pressure (AllocSlotWithPrefix: NotFound), the
// next requests prefill it themselves in slots split at its boundary, and
// the first of them to finish its prefill keeps it again (AfterPrefill). The
// attention kernels are unchanged: they read every slot's K/V through the
// same strided views. Without sharing (and on the paged baseline) every
// request holds and writes its own copy of the prompt.
#ifndef VATTN_EXAMPLES_DECODE_SHARED_PREFIX_H_
#define VATTN_EXAMPLES_DECODE_SHARED_PREFIX_H_

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attention.h"
#include "kv_fill.h"
#include "vattn/vattn.h"

namespace vdecode {

// The fill id of the shared prompt's rows (request ids are far below it).
inline constexpr std::uint32_t kSharedPrefixFillId = 0xfffffff0u;
// The id the loop keeps the prompt under.
inline constexpr std::uint64_t kSharedPrefixId = 0x5157454d;

// What sharing did in one run (RunResult::sharing).
struct PrefixSharing {
  std::int64_t prefix_tokens = 0;  // 0: no shared prompt.
  bool shared = false;             // vattn kept it once (else every request
                                   // holds its own copy).
  std::int64_t requests_cold = 0;  // Prefilled the prompt themselves.
  std::int64_t prefix_hits = 0;    // Started from the kept prompt.
  std::int64_t prefix_misses = 0;  // Found it evicted (then prefilled it).
  std::int64_t peak_shared_bytes = 0;        // CacheStats::shared_bytes.
  std::int64_t peak_shared_saved_bytes = 0;  // CacheStats::shared_saved_bytes.
  std::int64_t peak_held_bytes = 0;  // Physical less pooled, sampled.
  // RunResult's peaks, copied here for SharedPrefixSummary.
  std::int64_t peak_physical_bytes = 0;
  std::int64_t peak_in_use_bytes = 0;
  std::int64_t cow_copied_bytes = 0;
  std::int64_t copy_calls = 0;
  std::int64_t set_access_calls = 0;
  std::int64_t rows_checked = 0;  // Prompt rows compared with the fill.
};

// The fill items of a prefill of `count` tokens from 0 for request `id` at
// `row`: the prompt's rows under kSharedPrefixFillId (unless the row maps
// the kept prompt already: `prefix_mapped`) and the request's own rows.
void AppendPrefillItems(std::int32_t row, std::uint32_t id, std::int64_t count,
                        std::int64_t prefix_tokens, bool prefix_mapped,
                        std::vector<FillItem>* items);

// Compares a sample of the prompt's rows [0, prefix_tokens) of one layer's
// K and V at `row` (host-addressable tensors; a paged table when
// table.table is not null) with what the fill writes, bit for bit. Adds the
// rows compared to *checked. FailedPrecondition naming the first row that
// differs.
absl::Status CheckPrefixRows(const KvTensor& k, const KvTensor& v,
                             const BlockTable& table, std::int32_t row,
                             int layer, int kv_heads, int head_dim,
                             std::int64_t prefix_tokens, std::uint32_t seed,
                             std::int64_t* checked);

// vattn's side of sharing, owned by the loop's vattn store.
class PrefixSharer {
 public:
  // `stream`: the compute stream (CUDA) the copies are ordered on, or
  // nullptr.
  PrefixSharer(vattn::KVCache* cache, std::int64_t prefix_tokens, void* stream)
      : cache_(cache), prefix_tokens_(prefix_tokens), stream_(stream) {}

  // The prompt's own slot, backed to prefix_tokens, for the loop to fill;
  // then End keeps the prompt from it and frees it.
  absl::StatusOr<int> Begin();
  absl::Status End(int row);
  // A slot for a request with `prompt_tokens` tokens (the prompt included).
  absl::StatusOr<int> Admit(std::int64_t prompt_tokens);
  // True while `row`'s slot maps the kept prompt (its prefill skips it).
  bool Mapped(int row) const { return mapped_.count(row) > 0; }
  // After the fill of a step in which `row` prefilled: keeps the prompt
  // from the first cold row.
  absl::Status AfterPrefill(int row);
  void Released(int row) { mapped_.erase(row); }
  // Bytes that the active slots' adopted bytes count more than once: the
  // kept prompt's whole extents, mapped by each of its users.
  std::int64_t SharedOvercount() const;
  // Peaks and counters into *s.
  void Sample(PrefixSharing* s) const;

 private:
  vattn::KVCache* const cache_;
  const std::int64_t prefix_tokens_;
  void* const stream_;
  bool kept_ = false;
  std::set<int> mapped_;
  std::int64_t cold_ = 0, hits_ = 0, misses_ = 0;
};

// A few lines comparing a run with sharing to the same run without: peak
// memory in use, physical and held bytes, what sharing saved, hits, copies.
std::string SharedPrefixSummary(const PrefixSharing& with, const PrefixSharing& without);

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_SHARED_PREFIX_H_
