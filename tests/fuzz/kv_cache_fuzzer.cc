// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// libFuzzer target: the input is decoded into a cache configuration (layout,
// dtype, shape, budget, map-ahead, pool water marks, zero_on_reuse, defer
// reclaim), a fault plan for a FaultInjectionBackend over the Host backend,
// and a sequence of public KVCache calls. Every call is checked against a
// small reference model (return codes, lengths, budget, leaks); a mismatch
// prints the configuration and the calls so far and aborts.
//
// The model follows the semantics issue 9 section 4 set (all in since
// 4aade9e). Each of them has a switch below, on by default; building with
// -DVATTN_FUZZ_ISSUE9=0 (or a -DVATTN_FUZZ_ISSUE9_MASK) turns them off, to
// replay the corpus against a library from before them.
//
// What the model knows exactly, and checks after every call:
//  * Argument checks: InvalidArgument / OutOfRange / FailedPrecondition /
//    ResourceExhausted (all slots active) as kv_cache.h documents them.
//  * Every slot's active flag and length; backed_tokens >= length.
//  * Memory: the backend's physical bytes never exceed the budget; without
//    a background thread and before any fault, the cache's books equal the
//    backend's (physical, mapped, pooled) exactly.
//  * ResourceExhausted from Grow/Step only when the memory the active
//    requests must keep (what GetSlot says they adopted) plus the request's
//    need really exceeds the budget.
//  * zero_on_reuse: a token a request has not written reads as zero.
//  * Leaks: after the cache is destroyed the backend holds nothing.
//
// Prefix sharing (issue 13): inputs that start with kPrefixMagic run the same
// harness with five more op codes (KeepPrefix, AllocSlotWithPrefix, Fork,
// DropPrefix, a check of what every slot reads) and fault rules that may
// name SetAccess; the ordinary inputs decode exactly as before. The model
// then also knows the bytes the harness wrote (one value per write) and
// what each slot and cached prefix must read back, never writes a token a
// slot shares (its frozen tokens: a write there would fault), and counts a
// shared extent once in the books (mapped - shared_saved). An evicted
// prefix (NotFound for an id the model holds) must show in
// Stats().prefix_evictions.

#include <algorithm>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vattn/backend.h"
#if __has_include("vattn/fault_injection.h")
#include "vattn/fault_injection.h"  // Split out of backend.h (issue 9).
#endif
#include "vattn/kv_cache.h"
#include "vattn/options.h"

#ifndef VATTN_FUZZ_ISSUE9
#define VATTN_FUZZ_ISSUE9 1
#endif
// One bit per switch below, in their order, to try them one at a time:
// -DVATTN_FUZZ_ISSUE9_MASK=0x10 turns on kValidateRejectsOverflow alone.
#ifndef VATTN_FUZZ_ISSUE9_MASK
#define VATTN_FUZZ_ISSUE9_MASK (VATTN_FUZZ_ISSUE9 ? 0x7f : 0)
#endif

namespace {

// ---- Issue 9 semantics (see the file comment) --------------------------------
// §4.8: Step rejects a token count below the slot's length, and a slot listed
// twice, with InvalidArgument, changing nothing.
constexpr bool kStepRejectsBelowLength = (VATTN_FUZZ_ISSUE9_MASK >> 0) & 1;
constexpr bool kStepRejectsDuplicates = (VATTN_FUZZ_ISSUE9_MASK >> 1) & 1;
// §4.2: a failed background map does not poison the cache: once the faults
// stop, every call behaves as without them.
constexpr bool kBackgroundFaultsNotSticky = (VATTN_FUZZ_ISSUE9_MASK >> 2) & 1;
// §4.4: zero_on_reuse also covers the tokens AllocSlot's hint backed, when a
// request wrote them and was freed before its first Grow or Step.
constexpr bool kZeroCoversAllocBacked = (VATTN_FUZZ_ISSUE9_MASK >> 3) & 1;
// §4.6: Validate rejects options whose products overflow (today they reach
// signed overflow in Create: UBSan aborts). Runs the inputs that start with
// kOverflowMagic (RunOverflowOptions); without the switch they do nothing.
constexpr bool kValidateRejectsOverflow = (VATTN_FUZZ_ISSUE9_MASK >> 4) & 1;
// §4.1: after faults the cache's books still match the backend (physical =
// mapped + pooled + whatever the cache reports as quarantined).
constexpr bool kBooksMatchAfterFaults = (VATTN_FUZZ_ISSUE9_MASK >> 5) & 1;
// §4.3: a destructor that meets failing Unmaps still returns every extent it
// can: what stays mapped is at most one extent per injected failure.
constexpr bool kDestructorReturnsEverything = (VATTN_FUZZ_ISSUE9_MASK >> 6) & 1;

// Prefix mode: AllocSlotWithPrefix backs max(tokens, expected_tokens)
// (kv_cache.h), also when the prefix's whole extents cover `tokens` (no
// tail to copy); before the fix expected_tokens was then ignored (found by
// this fuzzer, seed prefix-alloc-expected-no-tail).
constexpr bool kAllocWithPrefixBacksExpected = true;
// Prefix mode: two faults in a row (a failed call and its failed rollback)
// leave the books exact. Off until fixed: the tail at a prefix's home is
// then left mapped or half-unmapped without being quarantined (KeepPrefix,
// DropPrefix, eviction), and an access change KeepPrefix or Fork could not
// undo leaves the slot's extent read-only. With it off, once a cache that
// kept a prefix has met two faults its books are not compared, and a slot
// whose KeepPrefix or Fork failed under two faults never writes below the
// prefix again.
constexpr bool kPrefixDoubleFaultsClean = false;
// Prefix mode: KeepPrefix and Fork reclaim the slot's own surplus (memory an
// earlier request left, mapped past what the request backs) when the budget
// is short. Before the fix the slot, marked busy for the call, was skipped
// by reclamation and the call could fail with ResourceExhausted though that
// surplus would have been enough (found by this fuzzer, seed
// prefix-fork-source-surplus).
constexpr bool kPrefixReclaimsOwnSurplus = true;

constexpr int kMaxOps = 96;
constexpr std::int64_t kMiB = std::int64_t{1} << 20;

// ---- Input decoding ----------------------------------------------------------
// Reads the input front to back; past its end every read returns 0, so any
// prefix of a valid input is valid (libFuzzer shrinks inputs that way).
class Reader {
 public:
  Reader(const std::uint8_t* data, std::size_t size)
      : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  std::uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  std::uint32_t U16() {
    const std::uint32_t lo = Byte();
    return lo | (std::uint32_t{Byte()} << 8);
  }
  // A value in [lo, hi].
  std::int64_t Range(std::int64_t lo, std::int64_t hi) {
    const std::uint64_t span = static_cast<std::uint64_t>(hi - lo) + 1;
    std::uint64_t v = span <= 256 ? Byte() : U16();
    if (span > 65536) v = (v << 16) | U16();
    return lo + static_cast<std::int64_t>(v % span);
  }
  bool Bool() { return (Byte() & 1) != 0; }
  // True with probability about n/256.
  bool Chance(int n) { return Byte() < n; }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

const char* CodeName(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk: return "OK";
    case absl::StatusCode::kInvalidArgument: return "InvalidArgument";
    case absl::StatusCode::kOutOfRange: return "OutOfRange";
    case absl::StatusCode::kFailedPrecondition: return "FailedPrecondition";
    case absl::StatusCode::kResourceExhausted: return "ResourceExhausted";
    case absl::StatusCode::kUnavailable: return "Unavailable";
    case absl::StatusCode::kInternal: return "Internal";
    default: return "other";
  }
}

// ---- The model -----------------------------------------------------------------
struct ModelSlot {
  bool active = false;
  std::int64_t length = 0;
  std::int64_t hint = 0;
  // This request grew or stepped successfully (the library's "used").
  bool grown = false;
  // Tokens this request wrote its markers into.
  std::set<std::int64_t> written;
  // The slot's memory may hold an earlier request's data that the library
  // does not promise to zero yet (kZeroCoversAllocBacked off).
  bool tainted = false;
  // Prefix mode. Tokens [0, frozen) are shared (or kept as a prefix): never
  // written again, their data came from the prefix or the forked request.
  std::int64_t frozen = 0;
  // The K and V marker bytes last written at each token (both modes; only
  // prefix mode checks them).
  std::map<std::int64_t, std::pair<std::uint8_t, std::uint8_t>> values;
};

// A cached prefix, as the model knows it (prefix mode).
struct ModelPrefix {
  std::int64_t tokens = 0;
  std::map<std::int64_t, std::pair<std::uint8_t, std::uint8_t>> values;
};

struct Config {
  vattn::KVCacheOptions opts;
  vattn::HostBackendOptions host;
  bool fault_in_destructor = false;
  vattn::FaultPlan destructor_plan;
  bool expect_create_error = false;  // Options the model knows are invalid.
  absl::StatusCode create_error = absl::StatusCode::kOk;
};

class Harness {
 public:
  Harness(Reader& in, bool prefix_mode) : in_(in), prefix_mode_(prefix_mode) {}
  void Run();

 private:
  // Decoding.
  void DecodeConfig();
  vattn::FaultPlan DecodePlan();
  int PickSlot(bool mostly_active);
  std::int64_t PickTokens(std::int64_t around);

  // Geometry the headers document (options.h, kv_cache.h).
  int Regions() const {
    return cfg_.opts.layout == vattn::Layout::kTokenMajor
               ? 1
               : 2 * cfg_.opts.num_layers;
  }
  std::int64_t TokenBytesPerRegion() const {
    const std::int64_t row = std::int64_t{cfg_.opts.num_kv_heads} *
                             cfg_.opts.head_dim *
                             static_cast<std::int64_t>(
                                 vattn::DTypeSize(cfg_.opts.dtype));
    return cfg_.opts.layout == vattn::Layout::kTokenMajor
               ? row * 2 * cfg_.opts.num_layers
               : row;
  }
  std::int64_t Granularity() const {
    return static_cast<std::int64_t>(cfg_.host.granularity);
  }
  // Bytes, all regions, that back `tokens` of one slot.
  std::int64_t NeedBytes(std::int64_t tokens) const {
    const std::int64_t g = Granularity();
    const std::int64_t stride =
        (cfg_.opts.max_tokens * TokenBytesPerRegion() + g - 1) / g * g;
    const std::int64_t per_region =
        std::min(stride, (tokens * TokenBytesPerRegion() + g - 1) / g * g);
    return per_region * Regions();
  }
  // The cap in force: the option, or with 0 the cache's default, which is
  // at most the backend's physical memory (the host limit here) and is read
  // from Stats() once the cache exists (issue 11 may lower the default).
  std::int64_t Budget() const {
    if (cfg_.opts.memory_budget_bytes != 0) {
      return static_cast<std::int64_t>(cfg_.opts.memory_budget_bytes);
    }
    return default_budget_ > 0
               ? default_budget_
               : static_cast<std::int64_t>(cfg_.host.physical_limit_bytes);
  }
  bool Worker() const {
    return cfg_.opts.map_ahead_tokens > 0 || cfg_.opts.pool_high_water > 0;
  }
  bool PlanActive() const { return !plan_.rules.empty(); }

  // Calls.
  bool CreateCache();
  void DestroyCache(bool with_faults);
  void OpAlloc();
  void OpGrow();
  void OpShrink();
  void OpFree();
  void OpStep();
  void OpWrite();
  void OpCheckZero(int slot);
  void OpSetPlan();
  void OpWaitIdle();
  void OpViews();
  void OpRecreate();
  // Prefix mode.
  void OpKeepPrefix();
  void OpAllocWithPrefix();
  void OpFork();
  void OpDropPrefix();
  void OpCheckValues(int slot);
  std::uint64_t PickPrefixId() { return in_.Byte() % 6; }
  // A NotFound for a prefix the model holds: the cache must count an
  // eviction the model has not seen yet.
  void NoteEvicted(std::uint64_t id, const absl::Status& status);

  // Checks.
  void CheckInvariants();
  std::int64_t Injected() const { return faulty_->injected(); }
  // The backend's live objects less those an earlier cache of this input
  // left behind (after faults the model tolerates).
  vattn::BackendCounters Counters() const {
    vattn::BackendCounters c = faulty_->counters();
    c.reservations -= base_.reservations;
    c.reserved_bytes -= base_.reserved_bytes;
    c.handles -= base_.handles;
    c.physical_bytes -= base_.physical_bytes;
    c.mappings -= base_.mappings;
    c.mapped_bytes -= base_.mapped_bytes;
    c.fences -= base_.fences;
    return c;
  }
  // May a call that saw `injected_before` injected faults at its start fail
  // with a fault's error?
  bool FaultMayExplain(std::int64_t injected_before) const {
    if (sticky_possible_ || !BooksExact()) return true;
    if (!PlanActive()) return false;
    if (Worker()) return Injected() > 0;
    return Injected() > injected_before;
  }
  // May Grow/Step of `slot` to `tokens` fail with ResourceExhausted?
  // `extra`: more bytes the call cannot reclaim (prefix mode).
  bool ExhaustionPossible(int slot, std::int64_t tokens, std::int64_t extra = 0);
  // Today a fault the background thread met is returned by every later
  // call, before its own checks (kBackgroundFaultsNotSticky off); such a
  // call changes nothing.
  // Likewise two faults in a row may leave the cache inconsistent today
  // (issue 9 §4.1: kBooksMatchAfterFaults off).
  bool StickyExplains(absl::StatusCode got) const {
    return (sticky_possible_ || !BooksExact()) && got != absl::StatusCode::kOk;
  }
  void NoteFaultSeen() {
    if (Injected() > 0) {
      faults_seen_ = true;
      if (Worker() && !kBackgroundFaultsNotSticky) sticky_possible_ = true;
    }
  }
  // Faults injected into this cache so far (SetPlan restarts the backend's
  // count; earlier plans' faults are in faults_before_plan_).
  std::int64_t TotalFaults() const { return faults_before_plan_ + Injected(); }
  // Two faults in a row may corrupt the books today (issue 9 §4.1); one
  // never may.
  bool BooksExact() const {
    if (prefix_mode_ && !kPrefixDoubleFaultsClean && kept_any_ &&
        TotalFaults() >= 2) {
      return false;
    }
    return TotalFaults() <= 1 || kBooksMatchAfterFaults;
  }
  unsigned char* TokenByte(int slot, std::int64_t token, bool k_side) const;

  [[noreturn]] void Fail(const std::string& what);
  void Log(std::string line) {
    // VATTN_FUZZ_TRACE=1 prints every call as it is made (to see what a
    // seed input exercises, or where it crashed).
    static const bool trace = std::getenv("VATTN_FUZZ_TRACE") != nullptr;
    if (trace) std::fprintf(stderr, "  %s\n", line.c_str());
    log_.push_back(std::move(line));
    if (log_.size() > 200) log_.erase(log_.begin());
  }

  Reader& in_;
  const bool prefix_mode_;
  std::map<std::uint64_t, ModelPrefix> prefixes_;
  std::int64_t evictions_seen_ = 0;
  std::uint8_t next_value_ = 1;  // Marker bytes of prefix mode's writes.
  bool kept_any_ = false;        // KeepPrefix or Fork succeeded once.
  Config cfg_;
  std::shared_ptr<vattn::FaultInjectionBackend> faulty_;
  std::unique_ptr<vattn::KVCache> cache_;
  std::vector<ModelSlot> slots_;
  vattn::FaultPlan plan_;
  bool faults_seen_ = false;      // Some fault was injected since Create.
  bool sticky_possible_ = false;  // A background fault may poison the cache.
  std::int64_t faults_before_plan_ = 0;
  // TotalFaults() at the last WaitForBackgroundIdle, which reports the
  // thread's last failure since the previous one, under any plan.
  std::int64_t faults_at_last_wait_ = 0;
  vattn::BackendCounters base_;  // The backend before this cache.
  std::int64_t default_budget_ = 0;  // Stats().budget_bytes with option 0.
  std::vector<std::string> log_;
};

void Harness::Fail(const std::string& what) {
  std::fprintf(stderr, "\n==== kv_cache_fuzzer: model mismatch: %s\n",
               what.c_str());
  const vattn::KVCacheOptions& o = cfg_.opts;
  std::fprintf(
      stderr,
      "config: layout=%s dtype=%s layers=%d heads=%d dim=%d slots=%d "
      "max_tokens=%" PRId64 " granularity=%zu budget=%zu host_limit=%zu "
      "min_extent=%zu max_extent_tokens=%" PRId64 " max_extent_bytes=%zu "
      "prealloc=%dx%zu defer=%d zero=%d map_ahead=%" PRId64
      " pool=%d..%d\n",
      vattn::LayoutName(o.layout), vattn::DTypeName(o.dtype), o.num_layers,
      o.num_kv_heads, o.head_dim, o.max_slots, o.max_tokens,
      cfg_.host.granularity, o.memory_budget_bytes,
      cfg_.host.physical_limit_bytes, o.min_extent_bytes, o.max_extent_tokens,
      o.max_extent_bytes, o.prealloc_handles, o.prealloc_handle_bytes,
      o.defer_reclaim, o.zero_on_reuse, o.map_ahead_tokens, o.pool_low_water,
      o.pool_high_water);
  std::fprintf(stderr, "calls (latest last):\n");
  for (const std::string& line : log_) {
    std::fprintf(stderr, "  %s\n", line.c_str());
  }
  std::fflush(stderr);
  std::abort();
}

// ---- Configuration -------------------------------------------------------------

vattn::FaultPlan Harness::DecodePlan() {
  vattn::FaultPlan plan;
  const int rules = static_cast<int>(in_.Range(1, 3));
  for (int i = 0; i < rules; ++i) {
    vattn::FaultRule rule;
    // Ordinary inputs decode as when there were six ops (kSetAccess came
    // later): op 6 is "any op" for them.
    const int num_ops = prefix_mode_ ? vattn::kNumBackendOps : 6;
    const int op = static_cast<int>(in_.Range(0, num_ops));
    if (op < num_ops) rule.op = static_cast<vattn::BackendOp>(op);
    rule.nth = in_.Range(1, 24);
    rule.and_after = in_.Chance(40);
    static constexpr absl::StatusCode kCodes[] = {
        absl::StatusCode::kInternal, absl::StatusCode::kResourceExhausted,
        absl::StatusCode::kUnavailable};
    rule.code = kCodes[in_.Range(0, 2)];
    plan.rules.push_back(rule);
  }
  return plan;
}

void Harness::DecodeConfig() {
  vattn::KVCacheOptions& o = cfg_.opts;
  static constexpr std::size_t kGranularities[] = {4096, 16384, 65536,
                                                   std::size_t{2} << 20};
  const std::uint8_t g = in_.Byte();
  cfg_.host.granularity = kGranularities[g % 8 < 6 ? 0 : (g % 8 == 6 ? 1 : 2 + g / 128)];
  o.layout = in_.Bool() ? vattn::Layout::kLayerMajor : vattn::Layout::kTokenMajor;
  static constexpr vattn::DType kDTypes[] = {
      vattn::DType::kFloat16, vattn::DType::kBFloat16, vattn::DType::kFloat32,
      vattn::DType::kFloat8E4M3, vattn::DType::kInt8};
  o.dtype = kDTypes[in_.Range(0, 4)];
  o.num_layers = static_cast<int>(in_.Range(1, 4));
  o.num_kv_heads = static_cast<int>(in_.Range(1, 4));
  static constexpr int kDims[] = {1, 8, 16, 64, 128, 3};
  o.head_dim = kDims[in_.Range(0, 5)];
  o.max_slots = static_cast<int>(in_.Range(1, 12));
  static constexpr std::int64_t kTokens[] = {1, 7, 64, 256, 1000, 2048};
  o.max_tokens = kTokens[in_.Range(0, 5)];

  // Budget: none (the host limit), or a few granules to a few MiB, which
  // makes reclamation and exhaustion common.
  cfg_.host.physical_limit_bytes = static_cast<std::size_t>(64 * kMiB);
  const std::uint8_t b = in_.Byte();
  if (b < 96) {
    o.memory_budget_bytes = 0;
  } else {
    const std::int64_t granules = in_.Range(1, 64) * (b < 200 ? 1 : 8);
    o.memory_budget_bytes =
        static_cast<std::size_t>(granules) * cfg_.host.granularity;
    if (static_cast<std::int64_t>(o.memory_budget_bytes) > 64 * kMiB) {
      o.memory_budget_bytes = static_cast<std::size_t>(64 * kMiB);
    }
  }

  const std::uint8_t ext = in_.Byte();
  o.min_extent_bytes = (ext & 3) == 0 ? cfg_.host.granularity *
                                            static_cast<std::size_t>(in_.Range(1, 4))
                                      : 0;
  o.max_extent_tokens = in_.Range(1, 128);
  o.max_extent_bytes = (ext & 12) == 0 ? cfg_.host.granularity *
                                             static_cast<std::size_t>(in_.Range(1, 8))
                                       : 0;
  if (o.max_extent_bytes != 0 && o.min_extent_bytes > o.max_extent_bytes) {
    o.max_extent_bytes = o.min_extent_bytes;
  }
  if (in_.Chance(48)) {
    o.prealloc_handles = static_cast<int>(in_.Range(1, 4));
    o.prealloc_handle_bytes =
        in_.Bool() ? 0 : cfg_.host.granularity * static_cast<std::size_t>(in_.Range(1, 4));
  }
  o.defer_reclaim = !in_.Chance(64);
  o.zero_on_reuse = in_.Chance(96);
  const std::uint8_t ma = in_.Byte();
  o.map_ahead_tokens = ma < 192 ? 0 : in_.Range(1, 96);
  if (in_.Chance(32)) {
    o.pool_low_water = static_cast<int>(in_.Range(0, 2));
    o.pool_high_water = o.pool_low_water + static_cast<int>(in_.Range(0, 2));
  }

  // Initial fault plan (active from Create on).
  if (in_.Chance(80)) plan_ = DecodePlan();
  cfg_.fault_in_destructor = in_.Chance(24);
  if (cfg_.fault_in_destructor) cfg_.destructor_plan = DecodePlan();

  // Now and then, options the model knows Create must refuse.
  const std::uint8_t bad = in_.Byte();
  if (bad >= 240) {
    cfg_.expect_create_error = true;
    cfg_.create_error = absl::StatusCode::kInvalidArgument;
    switch (bad - 240) {
      case 0: o.num_layers = 0; break;
      case 1: o.head_dim = -static_cast<int>(in_.Range(1, 9)); break;
      case 2: o.max_tokens = 0; break;
      case 3: o.max_slots = -1; break;
      case 4: o.dtype = static_cast<vattn::DType>(in_.Range(5, 200)); break;
      case 5: o.layout = static_cast<vattn::Layout>(in_.Range(2, 9)); break;
      case 6: o.map_ahead_tokens = -in_.Range(1, 5); break;
      case 7: o.pool_low_water = 3; o.pool_high_water = 1; break;
      case 8: o.prealloc_handles = -2; break;
      case 9:
        o.min_extent_bytes = cfg_.host.granularity * 4;
        o.max_extent_bytes = cfg_.host.granularity;
        break;
      case 10:  // Cannot hold one extent of every tensor.
        o.memory_budget_bytes = cfg_.host.granularity *
                                    static_cast<std::size_t>(Regions()) - 1;
        break;
      case 11:  // More pre-created handles than the budget holds.
        o.memory_budget_bytes =
            cfg_.host.granularity * static_cast<std::size_t>(Regions());
        o.prealloc_handles = 64;
        o.prealloc_handle_bytes = cfg_.host.granularity * 2;
        break;
      case 12:  // More virtual space than the backend reserves.
        cfg_.host.max_reservation_bytes = cfg_.host.granularity;
        o.max_tokens = 2048;
        o.max_slots = 2;
        break;
      case 13: o.max_extent_tokens = 0; break;
      default:  // Valid options (14, 15): the fuzzer decides the rest.
        cfg_.expect_create_error = false;
        break;
    }
    if (cfg_.expect_create_error) plan_ = {};
  }
  // Valid options Create still refuses (kv_cache.h, options.h): a budget
  // below one extent of every tensor, pre-created handles beyond it.
  if (!cfg_.expect_create_error) {
    const std::int64_t gran = Granularity();
    const std::int64_t budget = Budget();
    const std::int64_t min_extent = std::max<std::int64_t>(
        gran, (static_cast<std::int64_t>(o.min_extent_bytes) + gran - 1) / gran * gran);
    const std::int64_t handle =
        o.prealloc_handle_bytes == 0
            ? min_extent
            : (static_cast<std::int64_t>(o.prealloc_handle_bytes) + gran - 1) / gran * gran;
    if (budget < gran * Regions() ||
        (o.prealloc_handles > 0 && handle * o.prealloc_handles > budget)) {
      cfg_.expect_create_error = true;
      cfg_.create_error = absl::StatusCode::kInvalidArgument;
      plan_ = {};
    }
  }
}

// ---- Cache life ------------------------------------------------------------------

bool Harness::CreateCache() {
  base_ = faulty_->counters();
  const std::int64_t injected_before = Injected();
  absl::StatusOr<std::unique_ptr<vattn::KVCache>> made =
      vattn::KVCache::Create(cfg_.opts, faulty_);
  Log(absl::StrFormat("Create -> %s", made.status().ToString()));
  if (cfg_.expect_create_error) {
    if (made.ok() || made.status().code() != cfg_.create_error) {
      Fail(absl::StrCat("Create of invalid options returned ",
                        made.status().ToString(), ", expected ",
                        CodeName(cfg_.create_error)));
    }
  } else if (!made.ok()) {
    // Only an injected fault (Reserve, or Create of pre-allocated handles)
    // may refuse valid options.
    if (!(PlanActive() && Injected() > injected_before)) {
      Fail(absl::StrCat("Create failed without a fault: ",
                        made.status().ToString()));
    }
  }
  if (!made.ok()) {
    // "Nothing is left behind" - unless the clean-up met faults too: then
    // each failed call may leave its object (kDestructorReturnsEverything),
    // or, today, whatever the clean-up had not reached yet.
    const vattn::BackendCounters after = Counters();
    const std::int64_t faults = Injected() - injected_before;
    const std::int64_t later_faults =
        cfg_.expect_create_error ? faults : std::max<std::int64_t>(0, faults - 1);
    const std::int64_t left = after.reservations + after.handles + after.mappings;
    if (later_faults == 0 ? !after.Empty()
                          : (kDestructorReturnsEverything && left > later_faults)) {
      Fail(absl::StrFormat(
          "a failed Create left %d reservations, %d handles, %d mappings "
          "(%d faults in its clean-up)",
          after.reservations, after.handles, after.mappings, later_faults));
    }
    return false;
  }
  cache_ = std::move(*made);
  default_budget_ = 0;
  if (cfg_.opts.memory_budget_bytes == 0) {
    const std::int64_t b = cache_->Stats().budget_bytes;
    if (b <= 0 || b > static_cast<std::int64_t>(cfg_.host.physical_limit_bytes)) {
      Fail(absl::StrFormat("default budget %d: not in (0, physical memory %d]",
                           b, cfg_.host.physical_limit_bytes));
    }
    default_budget_ = b;
  }
  slots_.assign(static_cast<std::size_t>(cfg_.opts.max_slots), ModelSlot{});
  prefixes_.clear();
  evictions_seen_ = 0;
  kept_any_ = false;
  faults_seen_ = Injected() > 0;
  faults_before_plan_ = 0;
  faults_at_last_wait_ = 0;
  sticky_possible_ = false;
  NoteFaultSeen();
  CheckInvariants();
  return true;
}

void Harness::DestroyCache(bool with_faults) {
  if (cache_ == nullptr) return;
  vattn::BackendCounters before = Counters();
  NoteFaultSeen();
  const bool books_exact = BooksExact();
  faults_before_plan_ += Injected();
  if (with_faults) {
    faulty_->SetPlan(cfg_.destructor_plan);
  } else {
    faulty_->SetPlan({});
  }
  plan_ = {};
  cache_.reset();
  const vattn::BackendCounters after = Counters();
  const std::int64_t injected = Injected();
  Log(absl::StrFormat("~KVCache (injected %d) -> reservations %d handles %d "
                      "mappings %d physical %d",
                      injected, after.reservations, after.handles,
                      after.mappings, after.physical_bytes));
  faulty_->SetPlan({});
  if ((!with_faults || injected == 0) && books_exact) {
    if (!after.Empty() || after.physical_bytes != 0 || after.mapped_bytes != 0 ||
        after.reserved_bytes != 0) {
      Fail(absl::StrFormat(
          "destroying the cache leaked: %d reservations, %d handles (%d "
          "bytes), %d mappings (%d bytes), %d fences (before: %d handles, "
          "%d mappings)",
          after.reservations, after.handles, after.physical_bytes,
          after.mappings, after.mapped_bytes, after.fences, before.handles,
          before.mappings));
    }
  } else if (kDestructorReturnsEverything && books_exact && with_faults) {
    // Faults in the destructor itself (the books were right before it).
    // Prefix mode: the prefixes' tails have a reservation of their own.
    if (after.mappings > injected * Regions() ||
        after.reservations > (prefix_mode_ ? 2 : 1)) {
      Fail(absl::StrFormat(
          "the destructor gave up: %d mappings left after %d injected "
          "failures (at most %d expected)",
          after.mappings, injected, injected * Regions()));
    }
  }
}

// ---- Picking arguments -------------------------------------------------------------

int Harness::PickSlot(bool mostly_active) {
  const std::uint8_t b = in_.Byte();
  const int n = cfg_.opts.max_slots;
  if (b >= 250) return b == 250 ? -1 : (b == 251 ? n : (b == 252 ? -1000 : n + 7));
  if (mostly_active && b < 200) {
    std::vector<int> active;
    for (int i = 0; i < n; ++i) {
      if (slots_[static_cast<std::size_t>(i)].active) active.push_back(i);
    }
    if (!active.empty()) return active[b % active.size()];
  }
  return b % n;
}

std::int64_t Harness::PickTokens(std::int64_t around) {
  const std::int64_t max = cfg_.opts.max_tokens;
  const std::uint8_t b = in_.Byte();
  if (b < 120) return std::min(max, around + in_.Range(0, 4));
  if (b < 200) return in_.Range(0, max);
  if (b < 230) return max;
  if (b < 240) return std::max<std::int64_t>(0, around - in_.Range(1, 8));
  if (b < 248) return max + in_.Range(1, 3);
  if (b < 252) return -in_.Range(1, 3);
  return b == 252 ? INT64_MAX : INT64_MIN;
}

// ---- Checks ---------------------------------------------------------------------------

unsigned char* Harness::TokenByte(int slot, std::int64_t token,
                                  bool k_side) const {
  // K of layer 0, first element; V of the last layer, last element.
  const vattn::TensorView view =
      k_side ? cache_->K(0) : cache_->V(cfg_.opts.num_layers - 1);
  const std::int64_t h = k_side ? 0 : cfg_.opts.num_kv_heads - 1;
  const std::int64_t d = k_side ? 0 : cfg_.opts.head_dim - 1;
  const std::uintptr_t addr = view.ElementAddress(slot, token, h, d) +
                              (k_side ? 0 : vattn::DTypeSize(view.dtype) - 1);
  return reinterpret_cast<unsigned char*>(addr);
}

bool Harness::ExhaustionPossible(int slot, std::int64_t tokens,
                                 std::int64_t extra) {
  const std::int64_t budget = Budget();
  // What the active requests other than `slot` must keep mapped, after the
  // call (the call may have grown earlier requests of a batch).
  std::int64_t pinned = 0;
  std::int64_t all_mapped = 0;
  for (int i = 0; i < cfg_.opts.max_slots; ++i) {
    absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(i);
    if (!info.ok()) Fail("GetSlot failed: " + info.status().ToString());
    all_mapped += info->mapped_bytes;
    if (i == slot || !info->active) continue;
    pinned += Worker() ? info->mapped_bytes : info->adopted_bytes;
  }
  const vattn::CacheStats stats = cache_->Stats();
  const vattn::BackendCounters counters = Counters();
  // Memory the books do not place (in flight, kept after a fault, or kept
  // by a cached prefix; a shared extent is mapped in several slots but is
  // physical memory once).
  const std::int64_t stuck = std::max<std::int64_t>(
      0, counters.physical_bytes - (all_mapped - stats.shared_saved_bytes) -
             stats.pooled_bytes);
  std::int64_t slack = stuck;
  if (Worker()) {
    // The thread may hold handles for a map, a reclamation or a pool refill
    // in flight at the time of the call: count the pool and one of the
    // largest extents it could be moving.
    slack += stats.pooled_bytes + NeedBytes(cfg_.opts.max_tokens);
  }
  return pinned + NeedBytes(tokens) + extra + slack > budget;
}

void Harness::CheckInvariants() {
  const vattn::CacheStats stats = cache_->Stats();
  const vattn::BackendCounters counters = Counters();
  const std::int64_t budget = Budget();
  if (stats.budget_bytes != budget) {
    Fail(absl::StrFormat("Stats().budget_bytes %d, expected %d",
                         stats.budget_bytes, budget));
  }
  if (counters.physical_bytes > budget || stats.physical_bytes > budget ||
      stats.peak_physical_bytes > budget) {
    Fail(absl::StrFormat(
        "over budget: backend holds %d bytes, cache %d (peak %d), budget %d",
        counters.physical_bytes, stats.physical_bytes,
        stats.peak_physical_bytes, budget));
  }
  // Prefix mode: the cached prefixes' tails have a reservation of their own.
  const std::int64_t reservations_max = prefix_mode_ ? 2 : 1;
  if (counters.reservations < 1 || counters.reservations > reservations_max ||
      counters.fences != 0) {
    Fail(absl::StrFormat("backend has %d reservations and %d fences",
                         counters.reservations, counters.fences));
  }
  std::int64_t active = 0;
  std::int64_t logical = 0;
  std::int64_t mapped = 0;
  for (int i = 0; i < cfg_.opts.max_slots; ++i) {
    const ModelSlot& m = slots_[static_cast<std::size_t>(i)];
    absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(i);
    if (!info.ok()) Fail("GetSlot failed: " + info.status().ToString());
    mapped += info->mapped_bytes;
    if (info->active != m.active) {
      Fail(absl::StrFormat("slot %d active=%d, model says %d", i, info->active,
                           m.active));
    }
    if (info->adopted_bytes > info->mapped_bytes || info->backed_tokens < 0 ||
        info->backed_tokens > cfg_.opts.max_tokens) {
      Fail(absl::StrFormat("slot %d: adopted %d of %d mapped bytes, %d tokens "
                           "backed",
                           i, info->adopted_bytes, info->mapped_bytes,
                           info->backed_tokens));
    }
    if (!m.active) continue;
    ++active;
    logical += m.length * cache_->bytes_per_token();
    if (info->length != m.length) {
      Fail(absl::StrFormat("slot %d length %d, model says %d", i, info->length,
                           m.length));
    }
    if (info->backed_tokens < m.length) {
      Fail(absl::StrFormat("slot %d: length %d but only %d tokens backed", i,
                           m.length, info->backed_tokens));
    }
  }
  if (prefix_mode_ && !sticky_possible_ &&
      stats.cached_prefixes + (stats.prefix_evictions - evictions_seen_) !=
          static_cast<std::int64_t>(prefixes_.size())) {
    Fail(absl::StrFormat("Stats: %d cached prefixes, %d evictions (%d seen); "
                         "the model holds %d",
                         stats.cached_prefixes, stats.prefix_evictions,
                         evictions_seen_, prefixes_.size()));
  }
  if (stats.active_slots != active || stats.logical_bytes != logical) {
    Fail(absl::StrFormat("Stats: %d active slots, %d logical bytes; model: %d, "
                         "%d",
                         stats.active_slots, stats.logical_bytes, active,
                         logical));
  }
  // The books against the backend: exact when nothing runs in the
  // background and no fault ever hit the cache.
  if (!Worker() && BooksExact()) {
    // A quarantined extent's mapping state is unknown to the cache (some of
    // its regions may still be mapped): its bytes are physical, neither
    // mapped nor pooled, and the backend's mapped bytes lie between what the
    // cache counts as mapped and that plus the quarantine.
    const std::int64_t q = stats.quarantined_bytes;
    // With prefix sharing, mapped_bytes counts every mapping: less
    // shared_saved_bytes it is physical memory; the cached prefixes may keep
    // memory no slot maps (their tails are mapped in their own reservation).
    // Without sharing both are 0 and the books are exact.
    const std::int64_t saved = stats.shared_saved_bytes;
    const std::int64_t kept = stats.cached_prefix_bytes;
    const std::int64_t placed = stats.mapped_bytes - saved + stats.pooled_bytes + q;
    if (stats.physical_bytes != counters.physical_bytes ||
        counters.mapped_bytes < stats.mapped_bytes ||
        counters.mapped_bytes > stats.mapped_bytes + q + kept ||
        stats.mapped_bytes != mapped || placed > stats.physical_bytes ||
        stats.physical_bytes > placed + kept) {
      Fail(absl::StrFormat(
          "books: cache physical %d mapped %d (slots %d) pooled %d "
          "quarantined %d shared_saved %d prefix-kept %d; backend physical "
          "%d mapped %d",
          stats.physical_bytes, stats.mapped_bytes, mapped, stats.pooled_bytes,
          q, saved, kept, counters.physical_bytes, counters.mapped_bytes));
    }
  } else if (stats.mapped_bytes - stats.shared_saved_bytes + stats.pooled_bytes >
                 stats.physical_bytes &&
             !Worker()) {
    Fail(absl::StrFormat("books: mapped %d + pooled %d > physical %d",
                         stats.mapped_bytes, stats.pooled_bytes,
                         stats.physical_bytes));
  }
}

// ---- Operations ---------------------------------------------------------------------------

void Harness::OpAlloc() {
  const std::uint8_t b = in_.Byte();
  std::int64_t hint = 0;
  if (b < 60) {
    hint = 0;
  } else if (b < 230) {
    hint = in_.Range(0, cfg_.opts.max_tokens);
  } else if (b < 240) {
    hint = cfg_.opts.max_tokens + in_.Range(1, 4);
  } else {
    hint = -in_.Range(1, 4);
  }
  const std::int64_t injected_before = Injected();
  absl::StatusOr<int> slot = cache_->AllocSlot(hint);
  Log(absl::StrFormat("AllocSlot(%d) -> %s", hint,
                      slot.ok() ? absl::StrCat(*slot) : slot.status().ToString()));
  NoteFaultSeen();
  absl::StatusCode want = absl::StatusCode::kOk;
  if (hint < 0) {
    want = absl::StatusCode::kInvalidArgument;
  } else if (hint > cfg_.opts.max_tokens) {
    want = absl::StatusCode::kOutOfRange;
  } else if (std::none_of(slots_.begin(), slots_.end(),
                          [](const ModelSlot& s) { return !s.active; })) {
    want = absl::StatusCode::kResourceExhausted;
  }
  const absl::StatusCode got = slot.status().code();
  if (got != want && !StickyExplains(got)) {
    if (!(want == absl::StatusCode::kOk && FaultMayExplain(injected_before))) {
      Fail(absl::StrFormat("AllocSlot(%d) returned %s, expected %s", hint,
                           slot.status().ToString(), CodeName(want)));
    }
  }
  if (!slot.ok()) return;
  if (*slot < 0 || *slot >= cfg_.opts.max_slots ||
      slots_[static_cast<std::size_t>(*slot)].active) {
    Fail(absl::StrFormat("AllocSlot returned slot %d, which is not free",
                         *slot));
  }
  ModelSlot& m = slots_[static_cast<std::size_t>(*slot)];
  const bool tainted = m.tainted;
  m = ModelSlot{};
  m.active = true;
  m.hint = hint;
  m.tainted = tainted;
  if (cfg_.opts.zero_on_reuse) OpCheckZero(*slot);
}

void Harness::OpGrow() {
  const int slot = PickSlot(true);
  const bool valid_slot = slot >= 0 && slot < cfg_.opts.max_slots;
  const std::int64_t length =
      valid_slot ? slots_[static_cast<std::size_t>(slot)].length : 0;
  const std::int64_t tokens = PickTokens(length + 1);
  const std::int64_t injected_before = Injected();
  const absl::Status status = cache_->Grow(slot, tokens);
  Log(absl::StrFormat("Grow(%d, %d) -> %s", slot, tokens, status.ToString()));
  NoteFaultSeen();
  absl::StatusCode want = absl::StatusCode::kOk;
  if (!valid_slot || tokens < 0) {
    want = absl::StatusCode::kInvalidArgument;
  } else if (tokens > cfg_.opts.max_tokens) {
    want = absl::StatusCode::kOutOfRange;
  } else if (!slots_[static_cast<std::size_t>(slot)].active) {
    want = absl::StatusCode::kFailedPrecondition;
  }
  const absl::StatusCode got = status.code();
  if (got != want && !StickyExplains(got)) {
    bool explained = false;
    if (want == absl::StatusCode::kOk) {
      explained = FaultMayExplain(injected_before) ||
                  (got == absl::StatusCode::kResourceExhausted &&
                   ExhaustionPossible(slot, tokens));
    }
    if (!explained) {
      Fail(absl::StrFormat("Grow(%d, %d) returned %s, expected %s", slot,
                           tokens, status.ToString(), CodeName(want)));
    }
  }
  if (!status.ok()) return;  // The slot is unchanged (checked below).
  ModelSlot& m = slots_[static_cast<std::size_t>(slot)];
  m.length = std::max(m.length, tokens);
  m.grown = true;
  absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(slot);
  if (!info.ok() || info->backed_tokens < tokens) {
    Fail(absl::StrFormat("Grow(%d, %d) returned OK but %d tokens are backed",
                         slot, tokens, info.ok() ? info->backed_tokens : -1));
  }
}

void Harness::OpShrink() {
  const int slot = PickSlot(true);
  const bool valid_slot = slot >= 0 && slot < cfg_.opts.max_slots;
  const std::int64_t length =
      valid_slot ? slots_[static_cast<std::size_t>(slot)].length : 0;
  const std::uint8_t b = in_.Byte();
  std::int64_t tokens = b < 200 ? in_.Range(0, std::max<std::int64_t>(length, 0))
                                : (b < 230 ? length + in_.Range(1, 3)
                                           : -in_.Range(1, 3));
  const absl::Status status = cache_->Shrink(slot, tokens);
  Log(absl::StrFormat("Shrink(%d, %d) -> %s", slot, tokens, status.ToString()));
  absl::StatusCode want = absl::StatusCode::kOk;
  if (!valid_slot) {
    want = absl::StatusCode::kInvalidArgument;
  } else if (!slots_[static_cast<std::size_t>(slot)].active) {
    want = absl::StatusCode::kFailedPrecondition;
  } else if (tokens < 0 || tokens > length) {
    want = absl::StatusCode::kInvalidArgument;
  }
  if (status.code() != want) {
    if (!StickyExplains(status.code())) {
      Fail(absl::StrFormat("Shrink(%d, %d) returned %s, expected %s", slot,
                           tokens, status.ToString(), CodeName(want)));
    }
  }
  if (status.ok()) slots_[static_cast<std::size_t>(slot)].length = tokens;
}

void Harness::OpFree() {
  const int slot = PickSlot(true);
  const bool valid_slot = slot >= 0 && slot < cfg_.opts.max_slots;
  const bool fence = in_.Bool();
  const std::int64_t injected_before = Injected();
  const absl::Status status =
      fence ? cache_->Free(slot, vattn::Stream{}) : cache_->Free(slot);
  Log(absl::StrFormat("Free(%d%s) -> %s", slot, fence ? ", stream" : "",
                      status.ToString()));
  NoteFaultSeen();
  absl::StatusCode want = absl::StatusCode::kOk;
  if (!valid_slot) {
    want = absl::StatusCode::kInvalidArgument;
  } else if (!slots_[static_cast<std::size_t>(slot)].active) {
    want = absl::StatusCode::kFailedPrecondition;
  }
  if (status.code() != want) {
    // Without deferral Free unmaps; a failed unmap is returned, and the
    // slot is freed all the same.
    const bool explained = want == absl::StatusCode::kOk &&
                           !cfg_.opts.defer_reclaim &&
                           FaultMayExplain(injected_before);
    if (!explained) {
      Fail(absl::StrFormat("Free(%d) returned %s, expected %s", slot,
                           status.ToString(), CodeName(want)));
    }
  }
  if (want != absl::StatusCode::kOk) return;
  ModelSlot& m = slots_[static_cast<std::size_t>(slot)];
  // Data a request wrote only into the tokens AllocSlot backed survives
  // into the next request until issue 9 §4.4 is fixed.
  if (!kZeroCoversAllocBacked && !m.grown && !m.written.empty()) {
    m.tainted = true;
  }
  const bool tainted = m.tainted;
  m = ModelSlot{};
  m.tainted = tainted;
}

void Harness::OpStep() {
  const int n = static_cast<int>(in_.Range(0, std::min(cfg_.opts.max_slots, 6)));
  std::vector<vattn::StepRequest> batch;
  std::set<int> seen;
  bool duplicate = false;
  for (int i = 0; i < n; ++i) {
    vattn::StepRequest r;
    r.slot = PickSlot(true);
    const bool valid_slot = r.slot >= 0 && r.slot < cfg_.opts.max_slots;
    const std::int64_t length =
        valid_slot ? slots_[static_cast<std::size_t>(r.slot)].length : 0;
    r.tokens = PickTokens(length + 1);
    if (!seen.insert(r.slot).second) duplicate = true;
    batch.push_back(r);
  }
  // Which codes may come back: the argument errors of every bad request
  // (issue 9 asks to name the request; the order of the checks is the
  // library's).
  std::set<absl::StatusCode> arg_errors;
  for (const vattn::StepRequest& r : batch) {
    if (r.slot < 0 || r.slot >= cfg_.opts.max_slots || r.tokens < 0) {
      arg_errors.insert(absl::StatusCode::kInvalidArgument);
    } else if (r.tokens > cfg_.opts.max_tokens) {
      arg_errors.insert(absl::StatusCode::kOutOfRange);
    } else if (!slots_[static_cast<std::size_t>(r.slot)].active) {
      arg_errors.insert(absl::StatusCode::kFailedPrecondition);
    } else if (kStepRejectsBelowLength &&
               r.tokens < slots_[static_cast<std::size_t>(r.slot)].length) {
      arg_errors.insert(absl::StatusCode::kInvalidArgument);
    }
  }
  if (kStepRejectsDuplicates && duplicate) {
    arg_errors.insert(absl::StatusCode::kInvalidArgument);
  }
  // With a switch off, the library may already implement the new rule (the
  // fix landed, the switch not flipped yet): both answers are accepted.
  bool new_rule_may_reject = !kStepRejectsDuplicates && duplicate;
  for (const vattn::StepRequest& r : batch) {
    if (!kStepRejectsBelowLength && r.slot >= 0 &&
        r.slot < cfg_.opts.max_slots &&
        r.tokens < slots_[static_cast<std::size_t>(r.slot)].length) {
      new_rule_may_reject = true;
    }
  }
  if (new_rule_may_reject && !arg_errors.empty()) {
    arg_errors.insert(absl::StatusCode::kInvalidArgument);
  }
  std::vector<std::int64_t> before(batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const int s = batch[i].slot;
    before[i] = s >= 0 && s < cfg_.opts.max_slots
                    ? slots_[static_cast<std::size_t>(s)].length
                    : 0;
  }
  const std::int64_t injected_before = Injected();
  absl::StatusOr<vattn::StepResult> result = cache_->Step(batch);
  std::string desc = "Step({";
  for (const vattn::StepRequest& r : batch) {
    absl::StrAppend(&desc, "{", r.slot, ", ", r.tokens, "} ");
  }
  Log(absl::StrCat(desc, "}) -> ", result.status().ToString()));
  NoteFaultSeen();
  const absl::StatusCode got = result.status().code();
  if (!arg_errors.empty()) {
    if (arg_errors.count(got) == 0 && !StickyExplains(got)) {
      Fail(absl::StrFormat("Step with bad requests returned %s",
                           result.status().ToString()));
    }
    return;  // Nothing changed (CheckInvariants compares the lengths).
  }
  if (new_rule_may_reject && got == absl::StatusCode::kInvalidArgument) {
    return;  // Nothing changed (CheckInvariants compares the lengths).
  }
  if (result.ok()) {
    if (result->misses < 0 || result->map_nanos < 0) {
      Fail(absl::StrFormat("StepResult misses %d, map_nanos %d",
                           result->misses, result->map_nanos));
    }
    for (const vattn::StepRequest& r : batch) {
      ModelSlot& m = slots_[static_cast<std::size_t>(r.slot)];
      m.length = std::max(m.length, r.tokens);
      m.grown = true;
    }
    return;
  }
  if (duplicate) {
    // A slot listed twice (kStepRejectsDuplicates off): requests run in
    // order, so take the lengths from the cache and check only the code.
    for (const vattn::StepRequest& r : batch) {
      absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(r.slot);
      if (!info.ok()) Fail("GetSlot failed: " + info.status().ToString());
      ModelSlot& m = slots_[static_cast<std::size_t>(r.slot)];
      if (info->length != m.length) {
        m.length = info->length;
        m.grown = true;
      }
    }
    if (!FaultMayExplain(injected_before) &&
        !(got == absl::StatusCode::kResourceExhausted &&
          ExhaustionPossible(-1, cfg_.opts.max_tokens))) {
      Fail("Step with a duplicate slot returned " + result.status().ToString());
    }
    return;
  }
  // Failed: the requests before the failing one stay grown, the rest are
  // unchanged. Find the failing one from the cache's lengths.
  std::size_t k = 0;
  for (; k < batch.size(); ++k) {
    absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(batch[k].slot);
    if (!info.ok()) Fail("GetSlot failed: " + info.status().ToString());
    const std::int64_t target = std::max(before[k], batch[k].tokens);
    if (info->length != target) break;
    ModelSlot& m = slots_[static_cast<std::size_t>(batch[k].slot)];
    m.length = target;
    m.grown = true;
  }
  if (k == batch.size()) {
    if (sticky_possible_) {
      // A sticky error is returned before anything is done: every length
      // already matching means none needed to grow.
      return;
    }
    Fail(absl::StrFormat("Step returned %s but every request was done",
                         result.status().ToString()));
  }
  bool explained = FaultMayExplain(injected_before);
  if (!explained && got == absl::StatusCode::kResourceExhausted) {
    explained = ExhaustionPossible(batch[k].slot, batch[k].tokens);
  }
  if (!explained) {
    Fail(absl::StrFormat("Step returned %s at request %d ({%d, %d})",
                         result.status().ToString(), k, batch[k].slot,
                         batch[k].tokens));
  }
}

void Harness::OpWrite() {
  const int slot = PickSlot(true);
  if (slot < 0 || slot >= cfg_.opts.max_slots) return;
  ModelSlot& m = slots_[static_cast<std::size_t>(slot)];
  if (!m.active) return;
  absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(slot);
  if (!info.ok() || info->backed_tokens == 0) return;
  const int count = static_cast<int>(in_.Range(1, 4));
  for (int i = 0; i < count; ++i) {
    const std::int64_t t = in_.Range(0, info->backed_tokens - 1);
    // A shared token is read-only (a write would fault): the request never
    // writes it again.
    if (t < m.frozen) continue;
    std::uint8_t k = 0xA5;
    std::uint8_t v = 0x5A;
    if (prefix_mode_) {
      k = next_value_;
      v = static_cast<std::uint8_t>(~next_value_);
      next_value_ = static_cast<std::uint8_t>(next_value_ % 250 + 1);
    }
    *TokenByte(slot, t, true) = k;
    *TokenByte(slot, t, false) = v;
    m.values[t] = {k, v};
    m.written.insert(t);
    Log(absl::StrFormat("write slot %d token %d (backed %d)", slot, t,
                        info->backed_tokens));
  }
}

void Harness::OpCheckZero(int slot) {
  if (!cfg_.opts.zero_on_reuse) return;
  const ModelSlot& m = slots_[static_cast<std::size_t>(slot)];
  if (!m.active || m.tainted) return;
  absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(slot);
  if (!info.ok()) Fail("GetSlot failed: " + info.status().ToString());
  const std::int64_t backed = info->backed_tokens;
  // The first tokens, the last backed ones, and a few in between.
  std::set<std::int64_t> probe;
  for (std::int64_t t = 0; t < std::min<std::int64_t>(backed, 4); ++t) {
    probe.insert(t);
  }
  for (std::int64_t t = std::max<std::int64_t>(0, backed - 2); t < backed; ++t) {
    probe.insert(t);
  }
  for (int i = 0; i < 3 && backed > 0; ++i) probe.insert(in_.Range(0, backed - 1));
  for (std::int64_t t : probe) {
    // Shared tokens hold the prefix's (or the forked request's) data.
    if (m.written.count(t) != 0 || t < m.frozen) continue;
    const unsigned k = *TokenByte(slot, t, true);
    const unsigned v = *TokenByte(slot, t, false);
    if (k != 0 || v != 0) {
      Fail(absl::StrFormat(
          "zero_on_reuse: slot %d token %d (backed %d) reads K %#x V %#x, "
          "data of an earlier request",
          slot, t, backed, k, v));
    }
  }
}

void Harness::OpSetPlan() {
  NoteFaultSeen();  // Faults the thread met since the last call.
  faults_before_plan_ += Injected();
  if (in_.Chance(110)) {
    plan_ = {};
  } else {
    plan_ = DecodePlan();
  }
  faulty_->SetPlan(plan_);
  Log(absl::StrFormat("SetPlan(%d rules)", plan_.rules.size()));
  if (!PlanActive() && kBackgroundFaultsNotSticky) {
    // Faults stop: with the thread, let it finish what it had started.
    if (Worker()) (void)cache_->WaitForBackgroundIdle();
  }
}

void Harness::OpWaitIdle() {
  const std::int64_t injected_before = Injected();
  const absl::Status status = cache_->WaitForBackgroundIdle();
  Log(absl::StrFormat("WaitForBackgroundIdle -> %s", status.ToString()));
  NoteFaultSeen();
  // The thread's failure may date from an earlier plan (SetPlan restarts
  // Injected()): any fault since the previous wait explains it.
  const bool fault_since_last_wait =
      Worker() && TotalFaults() > faults_at_last_wait_;
  faults_at_last_wait_ = TotalFaults();
  if (!status.ok() && !fault_since_last_wait &&
      !FaultMayExplain(injected_before)) {
    Fail("WaitForBackgroundIdle returned " + status.ToString());
  }
}

void Harness::OpViews() {
  const int layer = static_cast<int>(in_.Range(-2, cfg_.opts.num_layers + 1));
  const vattn::TensorView k = cache_->K(layer);
  const vattn::TensorView v = cache_->V(layer);
  const bool in_range = layer >= 0 && layer < cfg_.opts.num_layers;
  if ((k.data != nullptr) != in_range || (v.data != nullptr) != in_range) {
    Fail(absl::StrFormat("K/V(%d): data %p/%p", layer, k.data, v.data));
  }
  if (!in_range) return;
  const std::array<std::int64_t, 4> shape = {
      cfg_.opts.max_slots, cfg_.opts.max_tokens, cfg_.opts.num_kv_heads,
      cfg_.opts.head_dim};
  if (k.shape != shape || v.shape != shape || k.dtype != cfg_.opts.dtype ||
      k.data == v.data || k.strides[3] != 1) {
    Fail(absl::StrFormat("K/V(%d): bad views", layer));
  }
  absl::StatusOr<vattn::SlotInfo> bad = cache_->GetSlot(cfg_.opts.max_slots);
  if (bad.ok() || bad.status().code() != absl::StatusCode::kInvalidArgument) {
    Fail("GetSlot(max_slots) returned " + bad.status().ToString());
  }
}

void Harness::OpRecreate() {
  DestroyCache(/*with_faults=*/false);
  faulty_->SetPlan(plan_ = {});
  if (!CreateCache()) Fail("Create failed without faults");
}

// ---- Prefix sharing (prefix mode) --------------------------------------------

void Harness::NoteEvicted(std::uint64_t id, const absl::Status& status) {
  const vattn::CacheStats stats = cache_->Stats();
  if (stats.prefix_evictions <= evictions_seen_) {
    Fail(absl::StrFormat("prefix %d vanished (%s) without an eviction (%d "
                         "counted, %d seen)",
                         id, status.ToString(), stats.prefix_evictions,
                         evictions_seen_));
  }
  ++evictions_seen_;
  prefixes_.erase(id);
}

void Harness::OpKeepPrefix() {
  const int slot = PickSlot(true);
  const bool valid_slot = slot >= 0 && slot < cfg_.opts.max_slots;
  const std::int64_t length =
      valid_slot ? slots_[static_cast<std::size_t>(slot)].length : 0;
  const std::uint8_t b = in_.Byte();
  const std::int64_t tokens =
      b < 100 ? length
              : (b < 200 ? in_.Range(1, std::max<std::int64_t>(length, 1))
                         : PickTokens(length));
  const std::uint64_t id = PickPrefixId();
  const std::int64_t injected_before = Injected();
  const absl::Status status = cache_->KeepPrefix(slot, tokens, id);
  Log(absl::StrFormat("KeepPrefix(%d, %d, %d) -> %s", slot, tokens, id,
                      status.ToString()));
  NoteFaultSeen();
  const absl::StatusCode got = status.code();
  // Every applicable code (the order of the checks is the library's).
  std::set<absl::StatusCode> arg_errors;
  if (!valid_slot || tokens < 1) {
    arg_errors.insert(absl::StatusCode::kInvalidArgument);
  }
  if (tokens > cfg_.opts.max_tokens) {
    arg_errors.insert(absl::StatusCode::kOutOfRange);
  }
  if (valid_slot && !slots_[static_cast<std::size_t>(slot)].active) {
    arg_errors.insert(absl::StatusCode::kFailedPrecondition);
  } else if (valid_slot && tokens > length) {
    arg_errors.insert(absl::StatusCode::kOutOfRange);
  }
  const bool known = prefixes_.count(id) != 0;
  if (!arg_errors.empty()) {
    if (known) arg_errors.insert(absl::StatusCode::kAlreadyExists);
    if (arg_errors.count(got) == 0 && !StickyExplains(got)) {
      Fail(absl::StrFormat("KeepPrefix with bad arguments returned %s",
                           status.ToString()));
    }
    return;
  }
  if (known && got == absl::StatusCode::kAlreadyExists) return;
  if (known && status.ok()) NoteEvicted(id, status);  // The id was free.
  if (!status.ok() && !kPrefixDoubleFaultsClean &&
      Injected() - injected_before >= 2) {
    // Its extents may stay read-only (see kPrefixDoubleFaultsClean).
    ModelSlot& m = slots_[static_cast<std::size_t>(slot)];
    m.frozen = std::max(m.frozen, tokens);
    kept_any_ = true;
  }
  if (!status.ok()) {
    bool explained = FaultMayExplain(injected_before) || StickyExplains(got);
    if (!explained && got == absl::StatusCode::kResourceExhausted) {
      absl::StatusOr<vattn::SlotInfo> own = cache_->GetSlot(slot);
      const std::int64_t surplus =
          !kPrefixReclaimsOwnSurplus && own.ok()
              ? own->mapped_bytes - own->adopted_bytes
              : 0;
      explained = ExhaustionPossible(-1, tokens, surplus) ||
                  cache_->Stats().cached_prefixes >= cfg_.opts.max_prefixes;
    }
    if (!explained) {
      Fail(absl::StrFormat("KeepPrefix(%d, %d, %d) returned %s", slot, tokens,
                           id, status.ToString()));
    }
    return;
  }
  ModelSlot& m = slots_[static_cast<std::size_t>(slot)];
  ModelPrefix p;
  p.tokens = tokens;
  p.values.insert(m.values.begin(), m.values.lower_bound(tokens));
  prefixes_[id] = std::move(p);
  m.frozen = std::max(m.frozen, tokens);
  kept_any_ = true;
}

void Harness::OpAllocWithPrefix() {
  const std::uint64_t id = PickPrefixId();
  const auto it = prefixes_.find(id);
  const std::int64_t plen = it != prefixes_.end() ? it->second.tokens : 0;
  const std::uint8_t b = in_.Byte();
  const std::int64_t tokens =
      b < 100 ? std::max<std::int64_t>(plen, 1)
              : (b < 180 ? in_.Range(1, std::max<std::int64_t>(plen, 1))
                         : PickTokens(plen));
  const std::uint8_t e = in_.Byte();
  const std::int64_t expected =
      e < 128 ? 0 : (e < 240 ? in_.Range(0, cfg_.opts.max_tokens)
                             : (e < 250 ? -in_.Range(1, 3)
                                        : cfg_.opts.max_tokens + 1));
  const bool all_active =
      std::none_of(slots_.begin(), slots_.end(),
                   [](const ModelSlot& m) { return !m.active; });
  const std::int64_t injected_before = Injected();
  const absl::StatusOr<int> slot =
      cache_->AllocSlotWithPrefix(id, tokens, expected);
  Log(absl::StrFormat("AllocSlotWithPrefix(%d, %d, %d) -> %s", id, tokens,
                      expected,
                      slot.ok() ? absl::StrCat(*slot) : slot.status().ToString()));
  NoteFaultSeen();
  const absl::StatusCode got = slot.status().code();
  // Every applicable code (the order of the checks is the library's).
  std::set<absl::StatusCode> arg_errors;
  if (tokens < 1 || expected < 0) {
    arg_errors.insert(absl::StatusCode::kInvalidArgument);
  }
  if (tokens > cfg_.opts.max_tokens || expected > cfg_.opts.max_tokens) {
    arg_errors.insert(absl::StatusCode::kOutOfRange);
  }
  if (!arg_errors.empty()) {
    if (arg_errors.count(got) == 0 && !StickyExplains(got)) {
      Fail(absl::StrFormat("AllocSlotWithPrefix with bad arguments returned %s",
                           slot.status().ToString()));
    }
    return;
  }
  if (it == prefixes_.end()) {
    const bool fine = got == absl::StatusCode::kNotFound ||
                      (all_active && got == absl::StatusCode::kResourceExhausted) ||
                      (!slot.ok() && StickyExplains(got));
    if (!fine) {
      Fail(absl::StrFormat("AllocSlotWithPrefix of unknown prefix %d returned %s",
                           id, slot.status().ToString()));
    }
    return;
  }
  if (got == absl::StatusCode::kNotFound) {
    NoteEvicted(id, slot.status());
    return;
  }
  if (!slot.ok()) {
    bool explained = FaultMayExplain(injected_before) || StickyExplains(got);
    if (!explained && got == absl::StatusCode::kResourceExhausted) {
      explained = all_active ||
                  ExhaustionPossible(-1, std::max(tokens, expected));
    }
    if (!explained) {
      Fail(absl::StrFormat("AllocSlotWithPrefix(%d, %d, %d) returned %s", id,
                           tokens, expected, slot.status().ToString()));
    }
    return;
  }
  if (*slot < 0 || *slot >= cfg_.opts.max_slots ||
      slots_[static_cast<std::size_t>(*slot)].active) {
    Fail(absl::StrFormat("AllocSlotWithPrefix returned slot %d, which is not "
                         "free",
                         *slot));
  }
  ModelSlot& m = slots_[static_cast<std::size_t>(*slot)];
  const bool tainted = m.tainted;
  m = ModelSlot{};
  m.active = true;
  m.hint = expected;
  m.length = tokens;
  m.grown = true;
  m.tainted = tainted;
  m.frozen = std::min(tokens, plen);
  m.values.insert(it->second.values.begin(),
                  it->second.values.lower_bound(m.frozen));
  // Backed to `tokens`, and to expected_tokens unless the budget is short
  // (then the extent falls back to what `tokens` needs, as Grow's does).
  absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(*slot);
  if (!info.ok() || info->backed_tokens < tokens ||
      (kAllocWithPrefixBacksExpected && info->backed_tokens < expected &&
       !ExhaustionPossible(-1, expected))) {
    Fail(absl::StrFormat("AllocSlotWithPrefix(%d, %d, %d): %d tokens backed",
                         id, tokens, expected,
                         info.ok() ? info->backed_tokens : -1));
  }
  OpCheckValues(*slot);
  if (cfg_.opts.zero_on_reuse) OpCheckZero(*slot);
}

void Harness::OpFork() {
  const int src = PickSlot(true);
  const bool valid_slot = src >= 0 && src < cfg_.opts.max_slots;
  const bool all_active =
      std::none_of(slots_.begin(), slots_.end(),
                   [](const ModelSlot& m) { return !m.active; });
  const std::int64_t injected_before = Injected();
  const absl::StatusOr<int> child = cache_->Fork(src);
  Log(absl::StrFormat("Fork(%d) -> %s", src,
                      child.ok() ? absl::StrCat(*child)
                                 : child.status().ToString()));
  NoteFaultSeen();
  const absl::StatusCode got = child.status().code();
  absl::StatusCode want = absl::StatusCode::kOk;
  if (!valid_slot) {
    want = absl::StatusCode::kInvalidArgument;
  } else if (!slots_[static_cast<std::size_t>(src)].active) {
    want = absl::StatusCode::kFailedPrecondition;
  } else if (all_active) {
    want = absl::StatusCode::kResourceExhausted;
  }
  if (want != absl::StatusCode::kOk) {
    if (got != want && !StickyExplains(got)) {
      Fail(absl::StrFormat("Fork(%d) returned %s, expected %s", src,
                           child.status().ToString(), CodeName(want)));
    }
    return;
  }
  ModelSlot& s = slots_[static_cast<std::size_t>(src)];
  if (!child.ok() && !kPrefixDoubleFaultsClean &&
      Injected() - injected_before >= 2) {
    s.frozen = std::max(s.frozen, s.length);  // May stay read-only.
    kept_any_ = true;
  }
  if (!child.ok()) {
    bool explained = FaultMayExplain(injected_before) || StickyExplains(got);
    if (!explained && got == absl::StatusCode::kResourceExhausted) {
      absl::StatusOr<vattn::SlotInfo> own = cache_->GetSlot(src);
      const std::int64_t surplus =
          !kPrefixReclaimsOwnSurplus && own.ok()
              ? own->mapped_bytes - own->adopted_bytes
              : 0;
      explained = ExhaustionPossible(-1, s.length, surplus);
    }
    if (!explained) {
      Fail(absl::StrFormat("Fork(%d) returned %s", src,
                           child.status().ToString()));
    }
    return;
  }
  if (*child < 0 || *child >= cfg_.opts.max_slots || *child == src ||
      slots_[static_cast<std::size_t>(*child)].active) {
    Fail(absl::StrFormat("Fork returned slot %d, which is not free", *child));
  }
  ModelSlot& m = slots_[static_cast<std::size_t>(*child)];
  const bool tainted = m.tainted || s.tainted;
  m = ModelSlot{};
  m.active = true;
  m.length = s.length;
  m.grown = true;
  m.tainted = tainted;
  m.frozen = s.length;
  m.values.insert(s.values.begin(), s.values.lower_bound(s.length));
  // The copy of the source's last extent may carry what the source wrote
  // past its length: the fork's own family, not another request's data.
  m.written = s.written;
  s.frozen = std::max(s.frozen, s.length);
  kept_any_ = true;
  OpCheckValues(*child);
  OpCheckValues(src);
  if (cfg_.opts.zero_on_reuse) OpCheckZero(*child);
}

void Harness::OpDropPrefix() {
  const std::uint64_t id = PickPrefixId();
  const bool known = prefixes_.count(id) != 0;
  const std::int64_t injected_before = Injected();
  const absl::Status status = cache_->DropPrefix(id);
  Log(absl::StrFormat("DropPrefix(%d) -> %s", id, status.ToString()));
  NoteFaultSeen();
  const absl::StatusCode got = status.code();
  if (!known) {
    if (got != absl::StatusCode::kNotFound && !StickyExplains(got)) {
      Fail(absl::StrFormat("DropPrefix of unknown prefix %d returned %s", id,
                           status.ToString()));
    }
    return;
  }
  if (status.ok()) {
    prefixes_.erase(id);
    return;
  }
  if (got == absl::StatusCode::kNotFound) {
    NoteEvicted(id, status);
    return;
  }
  if (!FaultMayExplain(injected_before) && !StickyExplains(got)) {
    Fail(absl::StrFormat("DropPrefix(%d) returned %s", id, status.ToString()));
  }
  // Dropped or not: the cache says which.
  if (!cache_->GetPrefix(id).ok()) prefixes_.erase(id);
}

void Harness::OpCheckValues(int slot) {
  if (slot < 0 || slot >= cfg_.opts.max_slots) return;
  const ModelSlot& m = slots_[static_cast<std::size_t>(slot)];
  if (!m.active) return;
  absl::StatusOr<vattn::SlotInfo> info = cache_->GetSlot(slot);
  if (!info.ok()) Fail("GetSlot failed: " + info.status().ToString());
  for (const auto& [t, kv] : m.values) {
    if (t >= info->backed_tokens) break;
    const unsigned k = *TokenByte(slot, t, true);
    const unsigned v = *TokenByte(slot, t, false);
    if (k != kv.first || v != kv.second) {
      Fail(absl::StrFormat(
          "slot %d token %d (frozen below %d, backed %d) reads K %#x V %#x, "
          "expected K %#x V %#x",
          slot, t, m.frozen, info->backed_tokens, k, v, kv.first, kv.second));
    }
  }
}

void Harness::Run() {
  DecodeConfig();
  absl::StatusOr<std::shared_ptr<vattn::Backend>> host =
      vattn::MakeHostBackend(cfg_.host);
  if (!host.ok()) Fail("MakeHostBackend: " + host.status().ToString());
  absl::StatusOr<std::shared_ptr<vattn::FaultInjectionBackend>> faulty =
      vattn::FaultInjectionBackend::Create(*host, plan_);
  if (!faulty.ok()) Fail("FaultInjectionBackend: " + faulty.status().ToString());
  faulty_ = *faulty;
  if (!CreateCache()) return;
  for (int op = 0; op < kMaxOps && !in_.empty(); ++op) {
    // Prefix mode adds op codes 16-20 after the ordinary ones.
    switch (in_.Byte() % (prefix_mode_ ? 21 : 16)) {
      case 0: case 1: case 2: OpAlloc(); break;
      case 3: case 4: case 5: OpGrow(); break;
      case 6: case 7: case 8: OpStep(); break;
      case 9: case 10: OpFree(); break;
      case 11: OpShrink(); break;
      case 12: OpWrite(); break;
      case 13: {
        const int slot = PickSlot(true);
        if (slot >= 0 && slot < cfg_.opts.max_slots) OpCheckZero(slot);
        break;
      }
      case 14: OpSetPlan(); break;
      case 16: OpKeepPrefix(); break;
      case 17: OpAllocWithPrefix(); break;
      case 18: OpFork(); break;
      case 19: OpDropPrefix(); break;
      case 20: OpCheckValues(PickSlot(true)); break;
      case 15:
      default: {
        const std::uint8_t b = in_.Byte();
        if (b < 120) {
          OpWaitIdle();
        } else if (b < 240) {
          OpViews();
        } else {
          OpRecreate();
        }
        break;
      }
    }
    CheckInvariants();
  }
  DestroyCache(cfg_.fault_in_destructor);
}

}  // namespace

namespace {

// Inputs that start with kOverflowMagic test Validate on options whose
// products overflow (issue 9 §4.6), and nothing else. A separate input kind,
// so that the ordinary inputs decode the same whatever the switches say.
constexpr std::uint8_t kOverflowMagic[] = {0xFF, 0xFE, 'O'};
// Inputs that start with kPrefixMagic run with prefix sharing's ops (see the
// file comment); the rest of the input decodes as an ordinary one.
constexpr std::uint8_t kPrefixMagic[] = {0xFF, 0xFE, 'P'};

void RunOverflowOptions(Reader& in) {
  // Today these reach signed overflow in Create (UBSan aborts): only with
  // the switch on.
  if (!kValidateRejectsOverflow) return;
  vattn::KVCacheOptions o;
  o.num_layers = 2;
  o.num_kv_heads = 2;
  o.head_dim = 16;
  o.max_slots = 4;
  o.max_tokens = 256;
  const char* what = "";
  switch (in.Range(0, 2)) {
    case 0:
      o.prealloc_handle_bytes = std::size_t{1} << (60 - in.Range(0, 2));
      o.prealloc_handles = static_cast<int>(in.Range(8, 64));
      what = "prealloc_handle_bytes x prealloc_handles";
      break;
    case 1:
      o.max_extent_tokens = INT64_MAX - in.Range(0, 8);
      what = "max_extent_tokens x bytes per token";
      break;
    default:
      o.map_ahead_tokens = INT64_MAX - in.Range(0, 8);
      o.max_tokens = 1;
      what = "map_ahead_tokens near INT64_MAX";
      break;
  }
  absl::StatusOr<std::shared_ptr<vattn::Backend>> host = vattn::MakeHostBackend();
  if (!host.ok()) std::abort();
  absl::StatusOr<std::unique_ptr<vattn::KVCache>> cache =
      vattn::KVCache::Create(o, *host);
  if (cache.ok() ||
      cache.status().code() != absl::StatusCode::kInvalidArgument) {
    std::fprintf(stderr,
                 "\n==== kv_cache_fuzzer: model mismatch: Create with %s "
                 "overflowing returned %s, expected InvalidArgument\n",
                 what, cache.status().ToString().c_str());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data,
                                      std::size_t size) {
  if (size >= sizeof(kOverflowMagic) &&
      std::memcmp(data, kOverflowMagic, sizeof(kOverflowMagic)) == 0) {
    Reader in(data + sizeof(kOverflowMagic), size - sizeof(kOverflowMagic));
    RunOverflowOptions(in);
    return 0;
  }
  const bool prefix_mode =
      size >= sizeof(kPrefixMagic) &&
      std::memcmp(data, kPrefixMagic, sizeof(kPrefixMagic)) == 0;
  const std::size_t skip = prefix_mode ? sizeof(kPrefixMagic) : 0;
  Reader in(data + skip, size - skip);
  Harness harness(in, prefix_mode);
  harness.Run();
  return 0;
}
