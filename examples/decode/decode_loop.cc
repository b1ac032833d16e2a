// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "decode_loop.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "block_allocator.h"
#include "cpu_attention.h"
#include "cuda_attention.h"
#include "kv_fill.h"
#include "thread_pool.h"

namespace vdecode {

// ---- Shapes, requests, plan -------------------------------------------------

std::optional<ModelShape> ModelPreset(std::string_view name) {
  ModelShape s;
  s.name = std::string(name);
  if (name == "llama3-8b" || name == "mistral-7b") {
    s.layers = 32, s.kv_heads = 8, s.q_heads = 32, s.head_dim = 128;
  } else if (name == "llama3-70b-tp8") {
    // 80 layers, 64 query and 8 KV heads split over 8 GPUs.
    s.layers = 80, s.kv_heads = 1, s.q_heads = 8, s.head_dim = 128;
  } else if (name == "yi-6b") {
    s.layers = 32, s.kv_heads = 4, s.q_heads = 32, s.head_dim = 128;
  } else if (name == "tiny") {
    s.layers = 2, s.kv_heads = 2, s.q_heads = 8, s.head_dim = 64;
  } else {
    return std::nullopt;
  }
  return s;
}

std::vector<std::string> ModelPresetNames() {
  return {"llama3-8b", "llama3-70b-tp8", "yi-6b", "mistral-7b", "tiny"};
}

std::vector<Request> RandomRequests(int n, std::int64_t prompt_min,
                                    std::int64_t prompt_max,
                                    std::int64_t output_min,
                                    std::int64_t output_max,
                                    std::uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int64_t> prompt(prompt_min, prompt_max);
  std::uniform_int_distribution<std::int64_t> output(output_min, output_max);
  std::vector<Request> out(static_cast<std::size_t>(std::max(n, 0)));
  for (Request& r : out) {
    r.prompt_tokens = prompt(rng);
    r.output_tokens = output(rng);
  }
  return out;
}

absl::StatusOr<std::vector<Request>> ParseTraceCsv(std::string_view text) {
  std::vector<Request> out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text.data(), text.size()), '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> f = absl::StrSplit(line, ',');
    if (out.empty() && !f.empty() &&
        !(std::isdigit(static_cast<unsigned char>(
              absl::StripAsciiWhitespace(f[0]).empty()
                  ? 'x'
                  : absl::StripAsciiWhitespace(f[0])[0])))) {
      continue;  // A header.
    }
    double arrival = 0;
    std::int64_t prompt = 0, output = 0;
    if (f.size() != 3 ||
        !absl::SimpleAtod(absl::StripAsciiWhitespace(f[0]), &arrival) ||
        !absl::SimpleAtoi(absl::StripAsciiWhitespace(f[1]), &prompt) ||
        !absl::SimpleAtoi(absl::StripAsciiWhitespace(f[2]), &output) ||
        arrival < 0 || prompt < 1 || output < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "trace line ", line_no, ": want arrival,prompt_tokens,output_tokens "
          "(arrival >= 0, lengths >= 1), got '", line, "'"));
    }
    out.push_back({static_cast<std::int64_t>(std::floor(arrival)), prompt,
                   output});
  }
  if (out.empty()) return absl::InvalidArgumentError("trace has no requests");
  return out;
}

std::vector<PlannedStep> PlanSteps(const std::vector<Request>& requests,
                                   int max_slots) {
  std::vector<int> order(requests.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return requests[static_cast<std::size_t>(a)].arrival_step <
           requests[static_cast<std::size_t>(b)].arrival_step;
  });
  std::vector<PlannedStep> plan;
  std::vector<std::pair<int, std::int64_t>> active;  // (request, left)
  std::size_t next = 0;
  std::int64_t step = 0;
  while (next < order.size() || !active.empty()) {
    if (active.empty() &&
        requests[static_cast<std::size_t>(order[next])].arrival_step > step) {
      step = requests[static_cast<std::size_t>(order[next])].arrival_step;
    }
    while (static_cast<int>(active.size()) < max_slots && next < order.size() &&
           requests[static_cast<std::size_t>(order[next])].arrival_step <= step) {
      const int id = order[next++];
      active.emplace_back(id, requests[static_cast<std::size_t>(id)].output_tokens);
    }
    PlannedStep p;
    p.step = step;
    for (const auto& a : active) p.active.push_back(a.first);
    plan.push_back(std::move(p));
    std::vector<std::pair<int, std::int64_t>> still;
    for (auto& a : active) {
      if (--a.second > 0) still.push_back(a);
    }
    active = std::move(still);
    ++step;
  }
  return plan;
}

std::int64_t PeakBlocks(const std::vector<Request>& requests,
                        const std::vector<PlannedStep>& plan,
                        int block_tokens) {
  std::vector<std::int64_t> len(requests.size(), 0);
  std::int64_t peak = 0;
  for (const PlannedStep& p : plan) {
    std::int64_t blocks = 0;
    for (int id : p.active) {
      std::int64_t& l = len[static_cast<std::size_t>(id)];
      l = l == 0 ? requests[static_cast<std::size_t>(id)].prompt_tokens + 1
                 : l + 1;
      blocks += (l + block_tokens - 1) / block_tokens;
    }
    peak = std::max(peak, blocks);
  }
  return peak;
}

std::int64_t DefaultBudgetBytes(const std::vector<Request>& requests,
                                int max_slots, const ModelShape& shape,
                                double headroom) {
  constexpr std::int64_t kGranule = std::int64_t{2} << 20;
  const std::int64_t peak =
      PeakBlocks(requests, PlanSteps(requests, max_slots), 16) * 16 *
      shape.BytesPerToken();
  const double want = headroom * static_cast<double>(peak);
  const std::int64_t granules = static_cast<std::int64_t>(
      std::ceil(want / static_cast<double>(kGranule)));
  // A vattn slot holding a request holds at least one granule, and the loop
  // holds up to max_slots + max_slots / 4 + 1 of them (see DecodeConfig).
  const std::int64_t rows = max_slots + max_slots / 4 + 1;
  return std::max(granules, rows) * kGranule;
}

const char* EngineName(Engine engine) {
  return engine == Engine::kVattn ? "vattn" : "paged";
}

double DefaultTolerance(DType dtype) {
  switch (dtype) {
    case DType::kF16: return 2e-3;
    case DType::kBF16: return 1e-2;
    case DType::kF32: return 1e-4;
  }
  return 1e-2;
}

namespace {

using Clock = std::chrono::steady_clock;
double Us(Clock::duration d) {
  return std::chrono::duration<double, std::micro>(d).count();
}

absl::Status CudaStatus(const std::string& e) {
  if (e.empty()) return absl::OkStatus();
  return absl::InternalError(e);
}
#define DECODE_CUDA(expr) VATTN_RETURN_IF_ERROR(CudaStatus(expr))

vattn::DType ToVattn(DType t) {
  switch (t) {
    case DType::kF16: return vattn::DType::kFloat16;
    case DType::kBF16: return vattn::DType::kBFloat16;
    case DType::kF32: return vattn::DType::kFloat32;
  }
  return vattn::DType::kFloat16;
}

KvTensor FromView(const vattn::TensorView& v, DType dtype) {
  KvTensor t;
  t.data = v.data;
  t.dtype = dtype;
  t.stride_row = v.strides[0];
  t.stride_token = v.strides[1];
  t.stride_head = v.strides[2];
  t.stride_dim = v.strides[3];
  return t;
}

bool SameStrides(const KvTensor& a, const KvTensor& b) {
  return a.stride_row == b.stride_row && a.stride_token == b.stride_token &&
         a.stride_head == b.stride_head && a.stride_dim == b.stride_dim;
}

// Where K and V live and who allocates them.
class KvStore {
 public:
  virtual ~KvStore() = default;
  // A row (slot or block-table row) for a new request.
  virtual absl::StatusOr<int> Admit(std::int64_t prompt_tokens) = 0;
  // Backs every batch row to its tokens. Adds slots mapped on the caller's
  // thread to *misses.
  virtual absl::Status Prepare(const std::vector<vattn::StepRequest>& batch,
                               std::int64_t* misses) = 0;
  virtual absl::Status Release(int row) = 0;
  virtual KvTensor K(int layer) const = 0;
  virtual KvTensor V(int layer) const = 0;
  virtual BlockTable table() const { return {}; }
  // The table as the CPU sees it (for the reference check).
  virtual const std::int32_t* host_table() const { return nullptr; }
  virtual std::int64_t physical_bytes() const = 0;
  virtual std::int64_t peak_physical_bytes() const = 0;
  // Where the memory is now (RunResult's in use / reclaimable / pooled).
  struct MemoryUse {
    std::int64_t in_use = 0;
    std::int64_t reclaimable = 0;
    std::int64_t pooled = 0;
  };
  virtual MemoryUse Memory() const = 0;
  virtual std::int64_t driver_calls() const = 0;
  virtual std::string name() const = 0;
  // The shared system prompt (shared_prefix.h): true while the row maps the
  // kept prompt (its prefill skips those rows); called after the fill of a
  // step in which the row prefilled; peaks and counters into *s.
  virtual bool PrefixMapped(int /*row*/) const { return false; }
  // Keeping the prompt before the first step: a row backed to the prompt
  // for the loop to fill (-1: this store does not keep it), then End.
  virtual absl::StatusOr<int> BeginPrefix() { return -1; }
  virtual absl::Status EndPrefix(int /*row*/) { return absl::OkStatus(); }
  virtual absl::Status AfterPrefill(int /*row*/) { return absl::OkStatus(); }
  virtual void SampleSharing(PrefixSharing* /*s*/) const {}
};

class VattnStore final : public KvStore {
 public:
  static absl::StatusOr<std::unique_ptr<VattnStore>> Create(
      const DecodeConfig& c, int rows, void* stream) {
    if (c.backend == nullptr) {
      return absl::InvalidArgumentError("the vattn engine needs a backend");
    }
    vattn::KVCacheOptions o;
    o.num_layers = c.shape.layers;
    o.num_kv_heads = c.shape.kv_heads;
    o.head_dim = c.shape.head_dim;
    o.dtype = ToVattn(c.shape.dtype);
    o.max_slots = rows;
    o.max_tokens = c.max_tokens;
    o.layout = c.layout;
    o.map_ahead_tokens = c.map_ahead_tokens;
    o.memory_budget_bytes = static_cast<std::size_t>(c.budget_bytes);
    if (c.max_extent_tokens > 0) o.max_extent_tokens = c.max_extent_tokens;
    int low = c.pool_low_water >= 0 ? c.pool_low_water
                                    : std::max(2, c.max_slots / 16);
    int high = c.pool_high_water >= 0 ? c.pool_high_water
                                      : std::max(4, c.max_slots / 4);
    if (c.budget_bytes > 0 && c.pool_high_water < 0) {
      // The marks follow the budget: handles of the decode-extent size the
      // cache refills with, at most 1/16 of the budget idle.
      constexpr std::int64_t kGranule = std::int64_t{2} << 20;
      const int regions =
          c.layout == vattn::Layout::kTokenMajor ? 1 : 2 * c.shape.layers;
      const std::int64_t per_region = c.shape.BytesPerToken() / regions;
      const std::int64_t handle = std::max(
          kGranule, o.max_extent_tokens * per_region / kGranule * kGranule);
      high = std::min<std::int64_t>(high, c.budget_bytes / 16 / handle);
      low = std::min(low, high);
    }
    o.pool_low_water = c.map_ahead_tokens > 0 ? low : 0;
    o.pool_high_water = c.map_ahead_tokens > 0 ? std::max(low, high) : 0;
    VATTN_ASSIGN_OR_RETURN(std::unique_ptr<vattn::KVCache> cache,
                           vattn::KVCache::Create(o, c.backend));
    std::unique_ptr<VattnStore> store(
        new VattnStore(std::move(cache), c.shape.dtype, stream));
    if (c.shared_prefix_tokens > 0 && c.share_prefix) {
      store->sharer_ = std::make_unique<PrefixSharer>(
          store->cache_.get(), c.shared_prefix_tokens, stream);
    }
    return store;
  }

  absl::StatusOr<int> Admit(std::int64_t prompt_tokens) override {
    if (sharer_ != nullptr) return sharer_->Admit(prompt_tokens);
    return cache_->AllocSlot(prompt_tokens);
  }
  bool PrefixMapped(int row) const override {
    return sharer_ != nullptr && sharer_->Mapped(row);
  }
  absl::StatusOr<int> BeginPrefix() override {
    if (sharer_ == nullptr) return -1;
    return sharer_->Begin();
  }
  absl::Status EndPrefix(int row) override { return sharer_->End(row); }
  absl::Status AfterPrefill(int row) override {
    return sharer_ != nullptr ? sharer_->AfterPrefill(row) : absl::OkStatus();
  }
  void SampleSharing(PrefixSharing* s) const override {
    if (sharer_ != nullptr) sharer_->Sample(s);
    const vattn::CacheStats st = cache_->Stats();
    s->peak_held_bytes = std::max(s->peak_held_bytes, st.physical_bytes - st.pooled_bytes);
  }
  absl::Status Prepare(const std::vector<vattn::StepRequest>& batch,
                       std::int64_t* misses) override {
    VATTN_ASSIGN_OR_RETURN(const vattn::StepResult r, cache_->Step(batch));
    *misses += r.misses;
    return absl::OkStatus();
  }
  absl::Status Release(int row) override {
    if (sharer_ != nullptr) sharer_->Released(row);
    if (stream_ != nullptr) {
      return cache_->Free(row, vattn::Stream::FromHandle(stream_));
    }
    return cache_->Free(row);
  }
  KvTensor K(int layer) const override {
    return FromView(cache_->K(layer), dtype_);
  }
  KvTensor V(int layer) const override {
    return FromView(cache_->V(layer), dtype_);
  }
  std::int64_t physical_bytes() const override {
    return cache_->Stats().physical_bytes;
  }
  std::int64_t peak_physical_bytes() const override {
    return cache_->Stats().peak_physical_bytes;
  }
  MemoryUse Memory() const override {
    MemoryUse m;
    const int slots = cache_->options().max_slots;
    for (int i = 0; i < slots; ++i) {
      const absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(i);
      if (!info.ok()) continue;
      if (info->active) {
        m.in_use += info->adopted_bytes;
        m.reclaimable += info->mapped_bytes - info->adopted_bytes;
      } else {
        m.reclaimable += info->mapped_bytes;
      }
    }
    const vattn::CacheStats st = cache_->Stats();
    m.pooled = st.pooled_bytes;
    if (sharer_ != nullptr) {
      // The kept prompt's extents are adopted by every slot that shares them
      // but are one physical allocation: count them once; and a freed slot's
      // mapping of them frees nothing, so what is reclaimable is at most
      // what is held beyond the memory in use.
      m.in_use -= sharer_->SharedOvercount();
      m.reclaimable = std::min(
          m.reclaimable,
          std::max<std::int64_t>(0, st.physical_bytes - st.pooled_bytes - m.in_use));
    }
    return m;
  }
  std::int64_t driver_calls() const override {
    const vattn::CacheStats s = cache_->Stats();
    return s.create_calls + s.destroy_calls + s.map_calls + s.unmap_calls;
  }
  std::string name() const override {
    return cache_->backend()->capabilities().name;
  }

 private:
  VattnStore(std::unique_ptr<vattn::KVCache> cache, DType dtype, void* stream)
      : cache_(std::move(cache)), dtype_(dtype), stream_(stream) {}
  std::unique_ptr<vattn::KVCache> cache_;
  DType dtype_;
  void* stream_;  // The compute stream Free fences (CUDA), or nullptr.
  std::unique_ptr<PrefixSharer> sharer_;  // With a shared prompt kept once.
};

// The paged baseline: one pool of 16-token blocks for all layers
// ([layers][K,V][blocks][16][kv_heads][head_dim]), a block table per row,
// and BlockAllocator. The pool is sized to the plan's peak, allocated once.
class PagedStore final : public KvStore {
 public:
  static constexpr int kBlockTokens = 16;

  static absl::StatusOr<std::unique_ptr<PagedStore>> Create(
      const DecodeConfig& c, int rows, std::int64_t num_blocks, bool gpu,
      void* stream) {
    std::unique_ptr<PagedStore> s(new PagedStore(c, rows, num_blocks, gpu, stream));
    const std::size_t pool_bytes = static_cast<std::size_t>(s->pool_bytes_);
    const std::size_t table_entries =
        static_cast<std::size_t>(rows) * static_cast<std::size_t>(s->max_blocks_);
    s->host_table_.assign(table_entries, 0);
    if (gpu) {
      DECODE_CUDA(cuda::Malloc(&s->device_pool_, pool_bytes));
      void* t = nullptr;
      DECODE_CUDA(cuda::Malloc(&t, table_entries * sizeof(std::int32_t)));
      s->device_table_ = static_cast<std::int32_t*>(t);
      DECODE_CUDA(cuda::Memset(t, 0, table_entries * sizeof(std::int32_t), stream));
      s->pool_ = static_cast<char*>(s->device_pool_);
    } else {
      // Not value-initialized: pages are touched by the prefill, as vattn's
      // Host memory is.
      s->host_pool_.reset(new char[pool_bytes]);
      s->pool_ = s->host_pool_.get();
    }
    return s;
  }

  ~PagedStore() override {
    cuda::Free(device_pool_);
    cuda::Free(device_table_);
  }

  absl::StatusOr<int> Admit(std::int64_t) override {
    if (free_rows_.empty()) {
      return absl::ResourceExhaustedError("paged: every table row is taken");
    }
    const int row = free_rows_.back();
    free_rows_.pop_back();
    return row;
  }
  absl::Status Prepare(const std::vector<vattn::StepRequest>& batch,
                       std::int64_t*) override {
    idx_.clear();
    val_.clear();
    for (const vattn::StepRequest& r : batch) {
      std::vector<std::int32_t>& blocks = blocks_[static_cast<std::size_t>(r.slot)];
      const std::int64_t need = (r.tokens + kBlockTokens - 1) / kBlockTokens;
      while (static_cast<std::int64_t>(blocks.size()) < need) {
        const std::int32_t b = allocator_.Allocate();
        if (b < 0) {
          return absl::ResourceExhaustedError(absl::StrCat(
              "paged: the pool of ", allocator_.num_blocks(), " blocks is full"));
        }
        const std::int32_t at = r.slot * max_blocks_ +
                                static_cast<std::int32_t>(blocks.size());
        blocks.push_back(b);
        host_table_[static_cast<std::size_t>(at)] = b;
        idx_.push_back(at);
        val_.push_back(b);
      }
    }
    if (gpu_ && !idx_.empty()) {
      DECODE_CUDA(cuda::Scatter(device_table_, idx_.data(), val_.data(),
                                static_cast<int>(idx_.size()), stream_));
    }
    return absl::OkStatus();
  }
  absl::Status Release(int row) override {
    for (std::int32_t b : blocks_[static_cast<std::size_t>(row)]) allocator_.Free(b);
    blocks_[static_cast<std::size_t>(row)].clear();
    free_rows_.push_back(row);
    return absl::OkStatus();
  }
  KvTensor K(int layer) const override { return Tensor(layer, 0); }
  KvTensor V(int layer) const override { return Tensor(layer, 1); }
  BlockTable table() const override {
    BlockTable t;
    t.table = gpu_ ? device_table_ : host_table_.data();
    t.max_blocks = max_blocks_;
    t.block_tokens = kBlockTokens;
    return t;
  }
  const std::int32_t* host_table() const override { return host_table_.data(); }
  std::int64_t physical_bytes() const override { return pool_bytes_; }
  std::int64_t peak_physical_bytes() const override { return pool_bytes_; }
  std::int64_t driver_calls() const override { return 0; }
  MemoryUse Memory() const override {
    const std::int64_t block = pool_bytes_ / allocator_.num_blocks();
    MemoryUse m;
    m.in_use = allocator_.used() * block;
    m.pooled = pool_bytes_ - m.in_use;
    return m;
  }
  std::string name() const override {
    return absl::StrCat("paged pool (", allocator_.num_blocks(), " blocks of ",
                        kBlockTokens, " tokens)");
  }

 private:
  PagedStore(const DecodeConfig& c, int rows, std::int64_t num_blocks, bool gpu,
             void* stream)
      : gpu_(gpu),
        stream_(stream),
        dtype_(c.shape.dtype),
        kv_heads_(c.shape.kv_heads),
        head_dim_(c.shape.head_dim),
        max_blocks_(static_cast<int>((c.max_tokens + kBlockTokens - 1) / kBlockTokens)),
        tensor_elems_(num_blocks * kBlockTokens * c.shape.kv_heads *
                      c.shape.head_dim),
        pool_bytes_(tensor_elems_ * 2 * c.shape.layers *
                    static_cast<std::int64_t>(DTypeBytes(c.shape.dtype))),
        allocator_(static_cast<std::int32_t>(num_blocks)),
        blocks_(static_cast<std::size_t>(rows)) {
    for (int r = rows - 1; r >= 0; --r) free_rows_.push_back(r);
  }
  KvTensor Tensor(int layer, int kv) const {
    KvTensor t;
    t.data = pool_ + (static_cast<std::int64_t>(layer) * 2 + kv) * tensor_elems_ *
                         static_cast<std::int64_t>(DTypeBytes(dtype_));
    t.dtype = dtype_;
    t.stride_head = head_dim_;
    t.stride_token = static_cast<std::int64_t>(kv_heads_) * head_dim_;
    t.stride_row = t.stride_token * kBlockTokens;
    t.stride_dim = 1;
    return t;
  }

  const bool gpu_;
  void* const stream_;
  const DType dtype_;
  const int kv_heads_;
  const int head_dim_;
  const int max_blocks_;
  const std::int64_t tensor_elems_;  // Elements of one layer's K (or V).
  const std::int64_t pool_bytes_;
  BlockAllocator allocator_;
  std::vector<std::vector<std::int32_t>> blocks_;  // Per row.
  std::vector<int> free_rows_;
  std::vector<std::int32_t> host_table_;
  std::int32_t* device_table_ = nullptr;
  void* device_pool_ = nullptr;
  std::unique_ptr<char[]> host_pool_;
  char* pool_ = nullptr;
  std::vector<std::int32_t> idx_, val_;  // Table updates of one Prepare.
};

struct ReqState {
  int row = -1;
  std::int64_t len = 0;  // Rows written.
  std::int64_t generated = 0;
  bool admitted = false;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t i = std::min(
      v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

// Device buffers of a CUDA run, freed on scope exit.
struct DeviceBuffers {
  void* stream = nullptr;
  void* ev[4] = {nullptr, nullptr, nullptr, nullptr};
  float* q = nullptr;
  float* out = nullptr;
  std::int32_t* meta = nullptr;  // rows | lengths
  FillItem* items = nullptr;
  void** layer_ptrs = nullptr;   // K pointers then V pointers
  ~DeviceBuffers() {
    cuda::Free(q);
    cuda::Free(out);
    cuda::Free(meta);
    cuda::Free(items);
    cuda::Free(layer_ptrs);
    for (void* e : ev) cuda::EventDestroy(e);
    cuda::StreamDestroy(stream);
  }
};

}  // namespace

absl::StatusOr<RunResult> RunDecode(const DecodeConfig& c,
                                    const std::vector<Request>& requests) {
  const ModelShape& m = c.shape;
  if (m.layers <= 0 || m.kv_heads <= 0 || m.q_heads <= 0 || m.head_dim <= 0 ||
      m.q_heads % m.kv_heads != 0) {
    return absl::InvalidArgumentError(
        "shape: layers, heads and head_dim must be positive and q_heads a "
        "multiple of kv_heads");
  }
  if (c.max_slots <= 0) return absl::InvalidArgumentError("max_slots <= 0");
  if (requests.empty()) return absl::InvalidArgumentError("no requests");
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const Request& r = requests[i];
    if (r.prompt_tokens < 1 || r.output_tokens < 1 || r.arrival_step < 0 ||
        r.prompt_tokens + r.output_tokens > c.max_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "request ", i, ": prompt ", r.prompt_tokens, " + output ",
          r.output_tokens, " must be >= 1 each and fit max_tokens ",
          c.max_tokens));
    }
  }
  if (c.shared_prefix_tokens < 0) {
    return absl::InvalidArgumentError("shared_prefix_tokens < 0");
  }
  for (std::size_t i = 0; i < requests.size() && c.shared_prefix_tokens > 0; ++i) {
    if (requests[i].prompt_tokens < c.shared_prefix_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "request ", i, ": prompt ", requests[i].prompt_tokens,
          " is shorter than the shared prompt of ", c.shared_prefix_tokens, " tokens"));
    }
  }
  const bool gpu = c.device == Device::kCuda;
  const int L = m.layers;
  const int rows = c.max_slots + c.max_slots / 4 + 1;
  const std::int64_t head_elems = static_cast<std::int64_t>(m.q_heads) * m.head_dim;
  const std::int64_t out_layer_elems = rows * head_elems;

  RunResult res;
  res.engine = c.engine;
  res.requests = static_cast<std::int64_t>(requests.size());
  res.layout = c.engine == Engine::kPaged ? "paged (16-token blocks)"
                                          : vattn::LayoutName(c.layout);
  res.tolerance =
      c.check_tolerance > 0 ? c.check_tolerance : DefaultTolerance(m.dtype);

  const std::vector<PlannedStep> plan = PlanSteps(requests, c.max_slots);

  // ---- Device set-up --------------------------------------------------------
  ThreadPool pool(c.threads);
  DeviceBuffers dev;
  std::vector<float> host_q;
  std::vector<float> host_out;
  if (gpu) {
    int count = 0;
    const std::string e = cuda::DeviceCount(&count);
    if (!e.empty() || count == 0) {
      return absl::UnavailableError(
          e.empty() ? std::string("no CUDA device") : e);
    }
    if (m.dtype == DType::kF32) {
      return absl::InvalidArgumentError("the CUDA kernels take fp16 or bf16");
    }
    DECODE_CUDA(cuda::SetDevice(0));
    DECODE_CUDA(cuda::DeviceName(0, &res.device));
    DECODE_CUDA(cuda::StreamCreate(&dev.stream));
    for (void*& ev : dev.ev) DECODE_CUDA(cuda::EventCreate(&ev));
    void* p = nullptr;
    DECODE_CUDA(cuda::Malloc(&p, static_cast<std::size_t>(rows * head_elems) * sizeof(float)));
    dev.q = static_cast<float*>(p);
    DECODE_CUDA(cuda::Malloc(&p, static_cast<std::size_t>(L * out_layer_elems) * sizeof(float)));
    dev.out = static_cast<float*>(p);
    DECODE_CUDA(cuda::Malloc(&p, static_cast<std::size_t>(2 * rows) * sizeof(std::int32_t)));
    dev.meta = static_cast<std::int32_t*>(p);
    // Two fill items per row at most (a prefill: the shared prompt, its own).
    DECODE_CUDA(cuda::Malloc(&p, static_cast<std::size_t>(2 * rows) * sizeof(FillItem)));
    dev.items = static_cast<FillItem*>(p);
    DECODE_CUDA(cuda::Malloc(&p, static_cast<std::size_t>(2 * L) * sizeof(void*)));
    dev.layer_ptrs = static_cast<void**>(p);
  } else {
    res.device = absl::StrCat("cpu (", pool.size(), " threads)");
    host_q.resize(static_cast<std::size_t>(rows * head_elems));
    host_out.resize(static_cast<std::size_t>(L * out_layer_elems));
  }

  // The kernels read vattn's views where they run: device 0's (the CUDA
  // kernels call SetDevice(0)) or the CPU's. A backend of another device, or
  // a CUDA backend under the CPU kernels, would fault instead of failing.
  if (c.engine == Engine::kVattn && c.backend != nullptr) {
    const vattn::BackendCapabilities& caps = c.backend->capabilities();
    if (gpu ? caps.device != 0 : !caps.host_accessible) {
      return absl::InvalidArgumentError(absl::StrCat(
          "backend ", caps.name, " cannot serve the ",
          gpu ? "CUDA kernels (they run on device 0)" : "CPU kernels",
          " (its memory is not addressable there)"));
    }
  }

  std::unique_ptr<KvStore> store;
  if (c.engine == Engine::kVattn) {
    VATTN_ASSIGN_OR_RETURN(store, VattnStore::Create(c, rows, dev.stream));
  } else {
    // The budget in blocks (vLLM sizes its pool to the memory it is given),
    // else exactly the plan's peak.
    const std::int64_t block_bytes = PagedStore::kBlockTokens * m.BytesPerToken();
    const std::int64_t blocks =
        c.budget_bytes > 0 ? c.budget_bytes / block_bytes
                           : PeakBlocks(requests, plan, PagedStore::kBlockTokens);
    if (blocks < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "budget_bytes ", c.budget_bytes, " holds no ", PagedStore::kBlockTokens,
          "-token block of ", block_bytes, " bytes"));
    }
    VATTN_ASSIGN_OR_RETURN(store, PagedStore::Create(c, rows, blocks, gpu, dev.stream));
  }
  res.backend = store->name();

  // Every layer's K and V must share strides (true of vattn's views and of
  // the paged pool): the fill takes one layout and per-layer pointers.
  std::vector<void*> layer_ptrs(static_cast<std::size_t>(2 * L));
  for (int l = 0; l < L; ++l) {
    if (!SameStrides(store->K(l), store->K(0)) ||
        !SameStrides(store->V(l), store->K(0))) {
      return absl::InternalError("K/V views differ in strides across layers");
    }
    layer_ptrs[static_cast<std::size_t>(l)] = const_cast<void*>(store->K(l).data);
    layer_ptrs[static_cast<std::size_t>(L + l)] = const_cast<void*>(store->V(l).data);
  }
  if (gpu) {
    DECODE_CUDA(cuda::CopyToDevice(dev.layer_ptrs, layer_ptrs.data(),
                                   layer_ptrs.size() * sizeof(void*), dev.stream));
    DECODE_CUDA(cuda::StreamSync(dev.stream));
  }
  FillArgs fill;
  fill.k_layers = gpu ? dev.layer_ptrs : layer_ptrs.data();
  fill.v_layers = fill.k_layers + L;
  fill.layout = store->K(0);
  fill.paged = store->table();
  fill.layers = L;
  fill.kv_heads = m.kv_heads;
  fill.head_dim = m.head_dim;
  fill.seed = c.seed;

  // ---- The shared prompt, kept once before the first step (vattn) --------------
  if (c.shared_prefix_tokens > 0) {
    VATTN_ASSIGN_OR_RETURN(const int row, store->BeginPrefix());
    if (row >= 0) {
      FillItem item;
      item.row = row;
      item.start = 0;
      item.count = static_cast<std::int32_t>(c.shared_prefix_tokens);
      item.id = kSharedPrefixFillId;
      fill.num_items = 1;
      fill.max_count = item.count;
      if (gpu) {
        DECODE_CUDA(cuda::CopyToDevice(dev.items, &item, sizeof(item), dev.stream));
        fill.items = dev.items;
        DECODE_CUDA(cuda::FillKv(fill, dev.stream));
      } else {
        fill.items = &item;
        CpuFillKv(fill, pool);
      }
      VATTN_RETURN_IF_ERROR(store->EndPrefix(row));
      if (gpu) DECODE_CUDA(cuda::StreamSync(dev.stream));
    }
  }

  // ---- Check sampling ---------------------------------------------------------
  std::set<std::size_t> check_steps;
  if (c.check_samples > 0) {
    for (int k = 0; k < c.check_samples; ++k) {
      check_steps.insert(static_cast<std::size_t>(
          (static_cast<double>(k) + 0.5) * static_cast<double>(plan.size()) /
          c.check_samples));
    }
  }
  std::mt19937 check_rng(c.seed * 7919u + 1u);

  // ---- The loop -----------------------------------------------------------------
  std::vector<ReqState> st(requests.size());
  std::int64_t tokens_total = 0;
  for (const Request& r : requests) tokens_total += r.output_tokens;
  std::vector<double> step_call_us;
  step_call_us.reserve(plan.size());
  double alloc_us = 0, attention_us = 0, fill_us = 0, wall_us = 0;
  std::int64_t peak_logical_tokens = 0;
  const std::int64_t calls_before = store->driver_calls();
  // Records where the memory is; returns the time it took (kept out of the
  // step times).
  auto sample_memory = [&](bool overlap) -> Clock::duration {
    const Clock::time_point s0 = Clock::now();
    const KvStore::MemoryUse u = store->Memory();
    if (!overlap) res.peak_in_use_bytes = std::max(res.peak_in_use_bytes, u.in_use);
    res.peak_in_use_overlap_bytes = std::max(res.peak_in_use_overlap_bytes, u.in_use);
    res.peak_reclaimable_bytes = std::max(res.peak_reclaimable_bytes, u.reclaimable);
    res.peak_pooled_bytes = std::max(res.peak_pooled_bytes, u.pooled);
    if (c.shared_prefix_tokens > 0) store->SampleSharing(&res.sharing);
    return Clock::now() - s0;
  };
  Clock::time_point last_progress = Clock::now();

  auto admit = [&](int id) -> absl::Status {
    ReqState& s = st[static_cast<std::size_t>(id)];
    VATTN_ASSIGN_OR_RETURN(s.row,
                           store->Admit(requests[static_cast<std::size_t>(id)].prompt_tokens));
    s.admitted = true;
    return absl::OkStatus();
  };
  for (int id : plan.front().active) VATTN_RETURN_IF_ERROR(admit(id));

  std::vector<vattn::StepRequest> batch;
  std::vector<FillItem> items;
  std::vector<std::int32_t> meta;  // rows | lengths
  std::vector<int> finished;
  std::vector<int> prefilled;  // Rows that prefilled this step (shared prompt).
  for (std::size_t pi = 0; pi < plan.size(); ++pi) {
    const PlannedStep& ps = plan[pi];
    const int B = static_cast<int>(ps.active.size());
    const bool checking = check_steps.count(pi) > 0;
    batch.clear();
    items.clear();
    prefilled.clear();
    meta.assign(static_cast<std::size_t>(2 * B), 0);
    std::int64_t live_tokens = 0;
    std::int64_t max_fill = 0;
    for (int j = 0; j < B; ++j) {
      const int id = ps.active[static_cast<std::size_t>(j)];
      const ReqState& s = st[static_cast<std::size_t>(id)];
      const Request& r = requests[static_cast<std::size_t>(id)];
      FillItem it;
      it.row = s.row;
      it.id = static_cast<std::uint32_t>(id);
      if (s.len == 0) {  // Prefill step: the prompt and the first new token.
        it.start = 0;
        it.count = static_cast<std::int32_t>(r.prompt_tokens + 1);
        // The shared prompt's rows under their own id (none when the row
        // maps the kept prompt: only its own rows are written, and counted).
        const bool mapped = store->PrefixMapped(s.row);
        res.prefill_tokens += r.prompt_tokens - (mapped ? c.shared_prefix_tokens : 0);
        const std::size_t first = items.size();
        AppendPrefillItems(s.row, it.id, it.count, c.shared_prefix_tokens, mapped, &items);
        for (std::size_t x = first; x < items.size(); ++x) {
          max_fill = std::max<std::int64_t>(max_fill, items[x].count);
        }
        if (c.shared_prefix_tokens > 0) prefilled.push_back(s.row);
      } else {
        it.start = static_cast<std::int32_t>(s.len);
        it.count = 1;
        items.push_back(it);
        max_fill = std::max<std::int64_t>(max_fill, it.count);
      }
      const std::int64_t tokens = it.start + it.count;
      batch.push_back({s.row, tokens});
      meta[static_cast<std::size_t>(j)] = s.row;
      meta[static_cast<std::size_t>(B + j)] = static_cast<std::int32_t>(tokens);
      live_tokens += tokens;
    }
    peak_logical_tokens = std::max(peak_logical_tokens, live_tokens);
    res.max_batch = std::max(res.max_batch, B);
    if (checking) {
      if (gpu) {
        DECODE_CUDA(cuda::Memset(dev.out, 0xff,
                                 static_cast<std::size_t>(L * out_layer_elems) * sizeof(float),
                                 dev.stream));
        DECODE_CUDA(cuda::StreamSync(dev.stream));
      } else {
        Poison(host_out.data(), host_out.size());
      }
    }

    // -- the step --
    const Clock::time_point t0 = Clock::now();
    VATTN_RETURN_IF_ERROR(store->Prepare(batch, &res.misses));
    const Clock::time_point t_prep = Clock::now();
    // Memory while this step's batch is backed; not timed.
    Clock::duration untimed = sample_memory(/*overlap=*/false);
    step_call_us.push_back(Us(t_prep - t0));
    double step_alloc_us = Us(t_prep - t0);

    // Requests of the next step take free rows now, so the map-ahead thread
    // maps their prompts while this step computes.
    if (pi + 1 < plan.size()) {
      const Clock::time_point a0 = Clock::now();
      int spare = rows - B;
      for (int id : plan[pi + 1].active) {
        if (spare == 0) break;
        if (!st[static_cast<std::size_t>(id)].admitted) {
          VATTN_RETURN_IF_ERROR(admit(id));
          --spare;
        }
      }
      step_alloc_us += Us(Clock::now() - a0);
    }

    DecodeArgs args;
    args.num_q_heads = m.q_heads;
    args.num_kv_heads = m.kv_heads;
    args.head_dim = m.head_dim;
    args.paged = store->table();
    args.num_requests = B;
    fill.items = items.data();
    fill.num_items = static_cast<int>(items.size());
    fill.max_count = static_cast<int>(max_fill);
    if (gpu) {
      DECODE_CUDA(cuda::CopyToDevice(dev.meta, meta.data(),
                                     meta.size() * sizeof(std::int32_t), dev.stream));
      DECODE_CUDA(cuda::CopyToDevice(dev.items, items.data(),
                                     items.size() * sizeof(FillItem), dev.stream));
      fill.items = dev.items;
      DECODE_CUDA(cuda::EventRecord(dev.ev[0], dev.stream));
      DECODE_CUDA(cuda::FillKv(fill, dev.stream));
      DECODE_CUDA(cuda::FillQ(dev.q, B * head_elems, c.seed,
                              static_cast<std::uint32_t>(pi), dev.stream));
      DECODE_CUDA(cuda::EventRecord(dev.ev[1], dev.stream));
      args.rows = dev.meta;
      args.lengths = dev.meta + B;
      args.q = dev.q;
      for (int l = 0; l < L; ++l) {
        args.k = store->K(l);
        args.v = store->V(l);
        args.out = dev.out + l * out_layer_elems;
        DECODE_CUDA(cuda::DecodeAttention(args, dev.stream));
      }
      DECODE_CUDA(cuda::EventRecord(dev.ev[2], dev.stream));
    } else {
      const Clock::time_point f0 = Clock::now();
      CpuFillKv(fill, pool);
      CpuFillQ(host_q.data(), B * head_elems, c.seed, static_cast<std::uint32_t>(pi));
      const Clock::time_point a0 = Clock::now();
      args.rows = meta.data();
      args.lengths = meta.data() + B;
      args.q = host_q.data();
      for (int l = 0; l < L; ++l) {
        args.k = store->K(l);
        args.v = store->V(l);
        args.out = host_out.data() + l * out_layer_elems;
        const std::string e = CpuDecodeAttention(args, pool);
        if (!e.empty()) return absl::InternalError(e);
      }
      const Clock::time_point a1 = Clock::now();
      fill_us += Us(a0 - f0);
      attention_us += Us(a1 - a0);
    }

    // The shared prompt is kept once a request has prefilled it (the copy,
    // if any, ordered after the fill on the stream).
    for (int row : prefilled) VATTN_RETURN_IF_ERROR(store->AfterPrefill(row));
    // Finished requests leave (fenced on the stream on CUDA).
    untimed += sample_memory(/*overlap=*/true);
    finished.clear();
    for (int id : ps.active) {
      ReqState& s = st[static_cast<std::size_t>(id)];
      if (s.generated + 1 >= requests[static_cast<std::size_t>(id)].output_tokens) {
        finished.push_back(id);
      }
    }
    {
      const Clock::time_point r0 = Clock::now();
      for (int id : finished) {
        VATTN_RETURN_IF_ERROR(store->Release(st[static_cast<std::size_t>(id)].row));
      }
      step_alloc_us += Us(Clock::now() - r0);
    }
    if (gpu) DECODE_CUDA(cuda::StreamSync(dev.stream));
    const Clock::time_point t1 = Clock::now();
    wall_us += Us(t1 - t0) - Us(untimed);
    alloc_us += step_alloc_us;
    if (gpu) {
      float f_ms = 0, a_ms = 0;
      DECODE_CUDA(cuda::EventElapsedMs(dev.ev[0], dev.ev[1], &f_ms));
      DECODE_CUDA(cuda::EventElapsedMs(dev.ev[1], dev.ev[2], &a_ms));
      fill_us += 1e3 * static_cast<double>(f_ms);
      attention_us += 1e3 * static_cast<double>(a_ms);
    }

    // -- check one (request, layer) against the float64 reference --
    if (checking) {
      const int j = static_cast<int>(check_rng() % static_cast<unsigned>(B));
      const int l = static_cast<int>(check_rng() % static_cast<unsigned>(L));
      const std::int64_t ctx = meta[static_cast<std::size_t>(B + j)];
      DecodeArgs ref = args;
      std::vector<double> expect;
      std::vector<float> got(static_cast<std::size_t>(head_elems));
      if (!gpu) {
        ref.k = store->K(l);
        ref.v = store->V(l);
        ref.paged.table = store->host_table();
        ReferenceDecodeAttention(ref, j, &expect);
        // The shared prompt's rows read through this row are the prompt's.
        VATTN_RETURN_IF_ERROR(CheckPrefixRows(
            ref.k, ref.v, ref.paged, meta[static_cast<std::size_t>(j)], l, m.kv_heads,
            m.head_dim, std::min(ctx, c.shared_prefix_tokens), c.seed,
            &res.sharing.rows_checked));
        const float* o = host_out.data() + l * out_layer_elems + j * head_elems;
        std::copy(o, o + head_elems, got.begin());
      } else {
        // Copy the request's K/V rows of layer l, its query and its output.
        const KvTensor kd = store->K(l);
        const KvTensor vd = store->V(l);
        const std::size_t esz = DTypeBytes(m.dtype);
        const std::size_t row_bytes =
            static_cast<std::size_t>(m.kv_heads) * static_cast<std::size_t>(m.head_dim) * esz;
        if (kd.stride_head != m.head_dim || kd.stride_dim != 1) {
          return absl::InternalError("check: K/V heads are not packed");
        }
        std::vector<char> hk(row_bytes * static_cast<std::size_t>(ctx));
        std::vector<char> hv(hk.size());
        const std::int32_t row = meta[static_cast<std::size_t>(j)];
        const std::size_t pitch = static_cast<std::size_t>(kd.stride_token) * esz;
        for (std::int64_t t = 0; t < ctx;) {
          std::int64_t off, n;
          if (store->host_table() == nullptr) {
            off = row * kd.stride_row;
            n = ctx;
          } else {
            off = store->host_table()[row * args.paged.max_blocks + t / PagedStore::kBlockTokens] *
                  kd.stride_row;
            n = std::min<std::int64_t>(PagedStore::kBlockTokens, ctx - t);
          }
          const std::size_t at = static_cast<std::size_t>(t) * row_bytes;
          DECODE_CUDA(cuda::CopyRowsToHost(
              hk.data() + at, row_bytes,
              static_cast<const char*>(kd.data) + off * static_cast<std::int64_t>(esz),
              pitch, row_bytes, static_cast<std::size_t>(n), dev.stream));
          DECODE_CUDA(cuda::CopyRowsToHost(
              hv.data() + at, row_bytes,
              static_cast<const char*>(vd.data) + off * static_cast<std::int64_t>(esz),
              pitch, row_bytes, static_cast<std::size_t>(n), dev.stream));
          t += n;
        }
        std::vector<float> hq(static_cast<std::size_t>(head_elems));
        DECODE_CUDA(cuda::CopyToHost(hq.data(), dev.q + j * head_elems,
                                     hq.size() * sizeof(float), dev.stream));
        DECODE_CUDA(cuda::CopyToHost(got.data(),
                                     dev.out + l * out_layer_elems + j * head_elems,
                                     got.size() * sizeof(float), dev.stream));
        const std::int32_t zero = 0;
        const std::int32_t len32 = static_cast<std::int32_t>(ctx);
        ref.k = KvTensor{hk.data(), m.dtype, 0,
                         static_cast<std::int64_t>(m.kv_heads) * m.head_dim, m.head_dim, 1};
        ref.v = ref.k;
        ref.v.data = hv.data();
        ref.paged = BlockTable{};
        ref.num_requests = 1;
        ref.rows = &zero;
        ref.lengths = &len32;
        ref.q = hq.data();
        ReferenceDecodeAttention(ref, 0, &expect);
        VATTN_RETURN_IF_ERROR(CheckPrefixRows(
            ref.k, ref.v, BlockTable{}, 0, l, m.kv_heads, m.head_dim,
            std::min(ctx, c.shared_prefix_tokens), c.seed, &res.sharing.rows_checked));
      }
      CheckSample cs;
      cs.step = static_cast<std::int64_t>(pi);
      cs.request = ps.active[static_cast<std::size_t>(j)];
      cs.layer = l;
      cs.context = ctx;
      cs.rel_error = RelativeError(got.data(), expect.data(), expect.size());
      res.checks.push_back(cs);
      res.max_rel_error = std::max(res.max_rel_error, cs.rel_error);
      if (!(cs.rel_error <= res.tolerance)) {
        return absl::FailedPreconditionError(absl::StrCat(
            EngineName(c.engine), ": attention output of request ", cs.request,
            ", layer ", l, " (context ", ctx, ", step ", pi,
            ") differs from the float64 reference: relative error ",
            cs.rel_error, " > ", res.tolerance));
      }
    }

    // -- bookkeeping --
    for (int j = 0; j < B; ++j) {
      ReqState& s = st[static_cast<std::size_t>(ps.active[static_cast<std::size_t>(j)])];
      s.len = meta[static_cast<std::size_t>(B + j)];
      ++s.generated;
    }
    res.generated_tokens += B;
    res.steps += 1;
    // Requests of the next step that found no spare row before the frees.
    if (pi + 1 < plan.size()) {
      for (int id : plan[pi + 1].active) {
        if (!st[static_cast<std::size_t>(id)].admitted) {
          const Clock::time_point a0 = Clock::now();
          VATTN_RETURN_IF_ERROR(admit(id));
          alloc_us += Us(Clock::now() - a0);
        }
      }
    }
    const bool last = pi + 1 == plan.size();
    if (c.progress &&
        (last || std::chrono::duration<double>(Clock::now() - last_progress).count() >=
                     c.progress_interval_s)) {
      last_progress = Clock::now();
      ProgressInfo info;
      info.engine = c.engine;
      info.tokens_done = res.generated_tokens;
      info.tokens_total = tokens_total;
      info.steps_done = res.steps;
      info.steps_total = static_cast<std::int64_t>(plan.size());
      info.elapsed_s = wall_us / 1e6;
      info.active = B;
      info.physical_bytes = store->physical_bytes();
      info.final = last;
      c.progress(info);
    }
  }

  const double steps = static_cast<double>(std::max<std::int64_t>(res.steps, 1));
  res.wall_s = wall_us / 1e6;
  res.tokens_per_s = res.wall_s > 0 ? static_cast<double>(res.generated_tokens) / res.wall_s : 0;
  res.step_us = wall_us / steps;
  res.attention_us = attention_us / steps;
  res.fill_us = fill_us / steps;
  res.alloc_us = alloc_us / steps;
  res.alloc_share = wall_us > 0 ? alloc_us / wall_us : 0;
  res.step_call_p50_us = Percentile(step_call_us, 0.50);
  res.step_call_p99_us = Percentile(step_call_us, 0.99);
  res.step_call_max_us = Percentile(step_call_us, 1.0);
  res.driver_calls = store->driver_calls() - calls_before;
  res.peak_physical_bytes = store->peak_physical_bytes();
  res.budget_bytes = c.budget_bytes;
  res.peak_logical_bytes = peak_logical_tokens * m.BytesPerToken();
  if (c.shared_prefix_tokens > 0) {
    res.sharing.prefix_tokens = c.shared_prefix_tokens;
    store->SampleSharing(&res.sharing);
    res.sharing.peak_physical_bytes = res.peak_physical_bytes;
    res.sharing.peak_in_use_bytes = res.peak_in_use_bytes;
  }
  // The remaining slots are idle; the store (and its cache) goes away here,
  // after the stream has drained.
  if (gpu) DECODE_CUDA(cuda::StreamSync(dev.stream));
  return res;
}

}  // namespace vdecode
