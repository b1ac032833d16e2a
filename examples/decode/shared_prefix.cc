// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "shared_prefix.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "half.h"

namespace vdecode {

void AppendPrefillItems(std::int32_t row, std::uint32_t id, std::int64_t count,
                        std::int64_t prefix_tokens, bool prefix_mapped,
                        std::vector<FillItem>* items) {
  const std::int64_t prefix = std::min(prefix_tokens, count);
  if (prefix > 0 && !prefix_mapped) {
    FillItem shared;
    shared.row = row;
    shared.start = 0;
    shared.count = static_cast<std::int32_t>(prefix);
    shared.id = kSharedPrefixFillId;
    items->push_back(shared);
  }
  if (count > prefix) {
    FillItem own;
    own.row = row;
    own.start = static_cast<std::int32_t>(prefix);
    own.count = static_cast<std::int32_t>(count - prefix);
    own.id = id;
    items->push_back(own);
  }
}

absl::Status CheckPrefixRows(const KvTensor& k, const KvTensor& v,
                             const BlockTable& table, std::int32_t row,
                             int layer, int kv_heads, int head_dim,
                             std::int64_t prefix_tokens, std::uint32_t seed,
                             std::int64_t* checked) {
  if (prefix_tokens <= 0) return absl::OkStatus();
  const std::size_t esz = DTypeBytes(k.dtype);
  // The first and last rows, and six between.
  std::vector<std::int64_t> tokens = {0, prefix_tokens - 1};
  for (int i = 1; i <= 6; ++i) tokens.push_back(prefix_tokens * i / 7);
  for (const std::int64_t t : tokens) {
    for (int kv = 0; kv < 2; ++kv) {
      const KvTensor& x = kv == 0 ? k : v;
      std::int64_t off;
      if (table.table == nullptr) {
        off = row * x.stride_row + t * x.stride_token;
      } else {
        const std::int32_t block =
            table.table[static_cast<std::int64_t>(row) * table.max_blocks +
                        t / table.block_tokens];
        off = block * x.stride_row + (t % table.block_tokens) * x.stride_token;
      }
      const std::uint32_t key = RowKey(seed, kSharedPrefixFillId, layer, kv, t);
      for (int h = 0; h < kv_heads; ++h) {
        for (int d = 0; d < head_dim; ++d) {
          const float want = ElementValue(key, static_cast<std::uint32_t>(h * head_dim + d));
          unsigned char bits[4];
          switch (x.dtype) {
            case DType::kF32: std::memcpy(bits, &want, 4); break;
            case DType::kF16: {
              const std::uint16_t b = FloatToHalf(want);
              std::memcpy(bits, &b, 2);
              break;
            }
            case DType::kBF16: {
              const std::uint16_t b = FloatToBf16(want);
              std::memcpy(bits, &b, 2);
              break;
            }
          }
          const char* got = static_cast<const char*>(x.data) +
                            (off + h * x.stride_head + d * x.stride_dim) *
                                static_cast<std::int64_t>(esz);
          if (std::memcmp(got, bits, esz) != 0) {
            return absl::FailedPreconditionError(absl::StrCat(
                "shared prompt: row ", row, " token ", t, " layer ", layer,
                kv == 0 ? " K" : " V", " head ", h, " dim ", d,
                " differs from what the fill wrote"));
          }
        }
      }
    }
    ++*checked;
  }
  return absl::OkStatus();
}

absl::StatusOr<int> PrefixSharer::Begin() {
  VATTN_ASSIGN_OR_RETURN(const int row, cache_->AllocSlot(prefix_tokens_, prefix_tokens_));
  const absl::Status grown = cache_->Grow(row, prefix_tokens_);
  if (!grown.ok()) {
    cache_->Free(row, vattn::kNoFence).IgnoreError();  // Nothing was written.
    return grown;
  }
  return row;
}

absl::Status PrefixSharer::End(int row) {
  VATTN_RETURN_IF_ERROR(AfterPrefill(row));
  if (stream_ != nullptr) return cache_->Free(row, vattn::Stream::FromHandle(stream_));
  return cache_->Free(row);
}

absl::StatusOr<int> PrefixSharer::Admit(std::int64_t prompt_tokens) {
  if (kept_) {
    absl::StatusOr<int> slot =
        stream_ != nullptr
            ? cache_->AllocSlotWithPrefix(kSharedPrefixId, prompt_tokens, prompt_tokens,
                                          vattn::Stream::FromHandle(stream_))
            : cache_->AllocSlotWithPrefix(kSharedPrefixId, prompt_tokens, prompt_tokens);
    if (slot.ok()) {
      ++hits_;
      mapped_.insert(*slot);
      return slot;
    }
    if (slot.status().code() != absl::StatusCode::kNotFound) return slot.status();
    // Reclaimed under pressure: the next cold request keeps it again.
    ++misses_;
    kept_ = false;
  }
  ++cold_;
  // The prompt's boundary as a split hint, so it can be kept whole.
  return cache_->AllocSlot(prompt_tokens, prefix_tokens_);
}

absl::Status PrefixSharer::AfterPrefill(int row) {
  if (kept_ || Mapped(row)) return absl::OkStatus();
  const absl::Status s =
      stream_ != nullptr
          ? cache_->KeepPrefix(row, prefix_tokens_, kSharedPrefixId,
                               vattn::Stream::FromHandle(stream_))
          : cache_->KeepPrefix(row, prefix_tokens_, kSharedPrefixId);
  if (s.code() == absl::StatusCode::kResourceExhausted) {
    return absl::OkStatus();  // No room for it now: a later row tries.
  }
  VATTN_RETURN_IF_ERROR(s);
  kept_ = true;
  return absl::OkStatus();
}

std::int64_t PrefixSharer::SharedOvercount() const {
  if (!kept_) return 0;
  const absl::StatusOr<vattn::PrefixInfo> p = cache_->GetPrefix(kSharedPrefixId);
  if (!p.ok() || p->users <= 1) return 0;
  return static_cast<std::int64_t>(p->users - 1) * (p->bytes - p->tail_bytes);
}

void PrefixSharer::Sample(PrefixSharing* s) const {
  const vattn::CacheStats st = cache_->Stats();
  s->prefix_tokens = prefix_tokens_;
  s->shared = true;
  s->requests_cold = cold_;
  s->prefix_hits = hits_;
  s->prefix_misses = misses_;
  s->peak_shared_bytes = std::max(s->peak_shared_bytes, st.shared_bytes);
  s->peak_shared_saved_bytes = std::max(s->peak_shared_saved_bytes, st.shared_saved_bytes);
  s->cow_copied_bytes = st.cow_copied_bytes;
  s->copy_calls = st.copy_calls;
  s->set_access_calls = st.set_access_calls;
}

std::string SharedPrefixSummary(const PrefixSharing& with, const PrefixSharing& without) {
  auto mib = [](std::int64_t b) { return static_cast<double>(b) / (1 << 20); };
  auto pct = [](std::int64_t part, std::int64_t whole) {
    return whole > 0 ? 100.0 * static_cast<double>(part) / static_cast<double>(whole) : 0.0;
  };
  const std::int64_t saved = without.peak_in_use_bytes - with.peak_in_use_bytes;
  std::string out = absl::StrFormat(
      "  prefix sharing (%d-token system prompt kept once): vattn peak memory in use %.1f "
      "MiB with sharing vs %.1f MiB without: saved %.1f MiB (%.1f%%); peak physical %.1f "
      "vs %.1f MiB, held (physical less pooled) %.1f vs %.1f MiB (both include memory "
      "kept mapped in freed slots until a Grow needs it)\n",
      with.prefix_tokens, mib(with.peak_in_use_bytes), mib(without.peak_in_use_bytes),
      mib(saved), pct(saved, without.peak_in_use_bytes), mib(with.peak_physical_bytes),
      mib(without.peak_physical_bytes), mib(with.peak_held_bytes),
      mib(without.peak_held_bytes));
  absl::StrAppendFormat(
      &out,
      "  prefix sharing: %d requests started from the kept prompt (prefix hits), %d "
      "prefilled it themselves (%s); peak shared %.1f MiB, peak "
      "saved by sharing %.1f MiB; copy-on-write %.1f MiB in %d copies, %d access "
      "changes; %d prompt rows read back through sharing slots matched the fill\n",
      with.prefix_hits, with.requests_cold,
      with.prefix_misses > 0
          ? absl::StrCat("after ", with.prefix_misses, " found it evicted")
          : std::string("it was never evicted"),
      mib(with.peak_shared_bytes), mib(with.peak_shared_saved_bytes),
      mib(with.cow_copied_bytes), with.copy_calls, with.set_access_calls, with.rows_checked);
  return out;
}

}  // namespace vdecode
