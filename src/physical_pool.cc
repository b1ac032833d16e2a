// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
#include "src/physical_pool.h"

#include <algorithm>
#include <chrono>
#include <iterator>
#include <utility>

#include "absl/strings/str_format.h"
#include "src/memory_arbiter.h"

namespace vattn {

using internal::MutexLock;

namespace {

int Log2Ceil(std::int64_t x) {
  int k = 0;
  while ((std::int64_t{1} << k) < x && k < 62) ++k;
  return k;
}

int Log2Floor(std::int64_t x) {
  int k = 0;
  while (k < 62 && (std::int64_t{2} << k) <= x) ++k;
  return k;
}

}  // namespace

// ---- SizeClasses --------------------------------------------------------------

SizeClasses::SizeClasses(std::int64_t granularity, int steps_per_doubling)
    : granularity_(std::int64_t{1} << Log2Ceil(std::max<std::int64_t>(1, granularity))),
      log2_granularity_(Log2Ceil(std::max<std::int64_t>(1, granularity))),
      log2_steps_(Log2Ceil(std::max(1, steps_per_doubling))) {}

std::int64_t SizeClasses::Round(std::int64_t bytes) const {
  if (bytes <= 0) return 0;
  // Granules, rounded up (a mask and a shift: the granularity is 2^k).
  const std::int64_t n = (bytes + granularity_ - 1) >> log2_granularity_;
  const std::int64_t steps = std::int64_t{1} << log2_steps_;
  if (n <= steps) return n << log2_granularity_;
  // n in [2^k, 2^(k+1)), k >= log2_steps: round up to a multiple of
  // 2^(k - log2_steps).
  const int shift = Log2Floor(n) - log2_steps_;
  const std::int64_t mask = (std::int64_t{1} << shift) - 1;
  return ((n + mask) & ~mask) << log2_granularity_;
}

int SizeClasses::CountUpTo(std::int64_t max_bytes) const {
  const std::int64_t n = max_bytes >> log2_granularity_;
  const std::int64_t steps = std::int64_t{1} << log2_steps_;
  if (n <= steps) return static_cast<int>(std::max<std::int64_t>(0, n));
  int count = static_cast<int>(steps);
  // Each doubling [2^k, 2^(k+1)) above `steps` holds `steps` classes.
  for (int k = log2_steps_;; ++k) {
    const std::int64_t lo = std::int64_t{1} << k;  // A class (counted).
    const std::int64_t step = std::int64_t{1} << (k - log2_steps_);
    const std::int64_t hi = lo << 1;
    if (n >= hi) {
      count += static_cast<int>(steps);
      continue;
    }
    count += static_cast<int>((n - lo) / step);
    return count;
  }
}

double SizeClasses::MaxWasteFraction() const {
  return 1.0 / static_cast<double>((1 << log2_steps_) + 1);
}

// ---- PhysicalPool -------------------------------------------------------------

PhysicalPool::PhysicalPool(std::shared_ptr<Backend> backend,
                           std::int64_t budget_bytes)
    : PhysicalPool(std::move(backend), budget_bytes, Options()) {}

PhysicalPool::PhysicalPool(std::shared_ptr<Backend> backend,
                           std::int64_t budget_bytes, const Options& options)
    : backend_(std::move(backend)),
      options_(options),
      classes_(static_cast<std::int64_t>(backend_->capabilities().granularity),
               options.size_class_steps),
      budget_bytes_(budget_bytes) {}

PhysicalPool::~PhysicalPool() { (void)DestroyIdle(); }

std::int64_t PhysicalPool::HeadroomLocked() const {
  const std::int64_t own =
      budget_bytes_ - counters_.physical_bytes - pending_bytes_;
  if (member_ == nullptr) return own;
  return std::min(own, member_->Room());
}

std::int64_t PhysicalPool::Headroom() const {
  MutexLock lock(&mu_);
  return HeadroomLocked();
}

std::int64_t PhysicalPool::OwnHeadroom() const {
  MutexLock lock(&mu_);
  return budget_bytes_ - counters_.physical_bytes - pending_bytes_;
}

std::int64_t PhysicalPool::budget_bytes() const {
  MutexLock lock(&mu_);
  return budget_bytes_;
}

void PhysicalPool::SetBudget(std::int64_t budget_bytes) {
  MutexLock lock(&mu_);
  budget_bytes_ = budget_bytes;
}

void PhysicalPool::SetArbiter(std::shared_ptr<internal::ArbiterMember> member) {
  MutexLock lock(&mu_);
  member_ = std::move(member);
}

void PhysicalPool::HoldRefill() {
  MutexLock lock(&mu_);
  refill_hold_ = counters_.physical_bytes + pending_bytes_;
}

bool PhysicalPool::refill_held() const {
  MutexLock lock(&mu_);
  return refill_hold_ != kNoRefillHold;
}

PhysicalPool::Counters PhysicalPool::counters() const {
  MutexLock lock(&mu_);
  return counters_;
}

int PhysicalPool::IdleCountLocked(std::size_t bytes) const {
  auto it = idle_.find(bytes);
  return it == idle_.end() ? 0 : static_cast<int>(it->second.size());
}

int PhysicalPool::IdleCount(std::size_t bytes) const {
  MutexLock lock(&mu_);
  return IdleCountLocked(bytes);
}

absl::StatusOr<std::int64_t> PhysicalPool::DestroyIdleLocked(
    std::size_t keep, std::int64_t bytes, std::int64_t keep_bytes) {
  // Take the victims off the idle lists, largest first (the map's order):
  // the most bytes per driver call, and no scan per handle.
  struct Victim {
    std::size_t size;
    PhysicalHandle handle;
  };
  std::vector<Victim> victims;
  std::int64_t chosen = 0;
  const std::int64_t held = counters_.physical_bytes + pending_bytes_;
  for (auto it = idle_.begin(); it != idle_.end() && (bytes < 0 || chosen < bytes);) {
    if (it->first == keep) {
      ++it;
      continue;
    }
    std::vector<PhysicalHandle>& list = it->second;
    const std::int64_t size = static_cast<std::int64_t>(it->first);
    while (!list.empty() && (bytes < 0 || chosen < bytes) &&
           held - chosen - size >= keep_bytes) {
      victims.push_back({it->first, list.back()});
      list.pop_back();
      chosen += static_cast<std::int64_t>(it->first);
    }
    it = list.empty() ? idle_.erase(it) : std::next(it);
  }
  if (victims.empty()) return 0;
  counters_.idle_bytes -= chosen;
  // One unlock for the whole batch. The victims' bytes stay counted as
  // physical until destroyed, so nobody creates into them meanwhile.
  std::vector<absl::Status> results(victims.size());
  mu_.Unlock();
  for (std::size_t i = 0; i < victims.size(); ++i) {
    results[i] = backend_->Destroy(victims[i].handle);
  }
  mu_.Lock();
  ++counters_.destroy_batches;
  absl::Status first_error;
  std::int64_t freed = 0;
  for (std::size_t i = 0; i < victims.size(); ++i) {
    const std::int64_t size = static_cast<std::int64_t>(victims[i].size);
    if (results[i].ok()) {
      freed += size;
      ++counters_.destroy_calls;
    } else {
      // Still live: back into the pool, to be tried again later.
      idle_[victims[i].size].push_back(victims[i].handle);
      counters_.idle_bytes += size;
      first_error.Update(results[i]);
    }
  }
  counters_.physical_bytes -= freed;
  if (member_ != nullptr) member_->Refund(freed);
  if (!first_error.ok()) return first_error;
  return freed;
}

absl::Status PhysicalPool::CreateLocked(std::size_t bytes, int count,
                                       std::vector<PhysicalHandle>* created) {
  const std::int64_t need = static_cast<std::int64_t>(bytes) * count;
  // The shared budget first: charged under mu_, so no two pools can both
  // take the same room.
  if (member_ != nullptr && !member_->TryCharge(need)) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "shared budget exhausted: the arbiter has room for %d more bytes for "
        "this cache, %d needed",
        member_->Room(), need));
  }
  pending_bytes_ += need;  // Counted against the budget while unlocked.
  absl::Status status;
  mu_.Unlock();
  for (int i = 0; i < count; ++i) {
    absl::StatusOr<PhysicalHandle> handle = backend_->Create(bytes);
    if (!handle.ok()) {
      status = handle.status();
      break;
    }
    created->push_back(*handle);
  }
  mu_.Lock();
  pending_bytes_ -= need;
  counters_.physical_bytes +=
      static_cast<std::int64_t>(created->size() * bytes);
  counters_.create_calls += static_cast<std::int64_t>(created->size());
  counters_.peak_physical_bytes =
      std::max(counters_.peak_physical_bytes, counters_.physical_bytes);
  if (member_ != nullptr) {
    member_->Refund(need - static_cast<std::int64_t>(created->size() * bytes));
  }
  return status;
}

absl::StatusOr<std::vector<PhysicalHandle>> PhysicalPool::Acquire(
    std::size_t bytes, int count, bool quiet) {
  std::vector<PhysicalHandle> out;
  out.reserve(static_cast<std::size_t>(count));
  int created_here = 0;
  MutexLock lock(&mu_);
  for (;;) {
    // Idle handles of the right size first: no driver call at all.
    if (auto it = idle_.find(bytes); it != idle_.end()) {
      std::vector<PhysicalHandle>& list = it->second;
      while (!list.empty() && static_cast<int>(out.size()) < count) {
        out.push_back(list.back());
        list.pop_back();
        counters_.idle_bytes -= static_cast<std::int64_t>(bytes);
      }
      if (list.empty()) idle_.erase(it);
    }
    const int from_idle = static_cast<int>(out.size());
    const int missing = count - from_idle;
    if (missing == 0) break;

    const std::int64_t need = static_cast<std::int64_t>(bytes) * missing;
    // Destroy idle handles of other sizes only if that makes enough room:
    // a destroy that still leaves too little would be undone by a create.
    // (No idle handle of `bytes` is left: the loop above took them.)
    if (HeadroomLocked() < need &&
        HeadroomLocked() + counters_.idle_bytes >= need) {
      absl::StatusOr<std::int64_t> freed =
          DestroyIdleLocked(bytes, need - HeadroomLocked());
      if (!freed.ok()) {
        ReleaseLocked(&out, bytes);
        return freed.status();
      }
    }
    if (HeadroomLocked() < need) {
      ReleaseLocked(&out, bytes);
      if (quiet) {
        // A caller that tries sizes in turn: no message to format.
        static const absl::Status* const kExhausted = new absl::Status(
            absl::ResourceExhaustedError("physical budget exhausted"));
        return *kExhausted;
      }
      if (member_ != nullptr &&
          budget_bytes_ - counters_.physical_bytes - pending_bytes_ >= need) {
        return absl::ResourceExhaustedError(absl::StrFormat(
            "shared budget exhausted: %d more handle(s) of %d bytes need %d "
            "bytes, but the arbiter's %d-byte budget has room for %d more "
            "for this cache (%d bytes held here)",
            missing, bytes, need, member_->budget(), member_->Room(),
            counters_.physical_bytes + pending_bytes_));
      }
      return absl::ResourceExhaustedError(absl::StrFormat(
          "physical budget exhausted: %d more handle(s) of %d bytes need %d "
          "bytes, but %d of the %d-byte budget are in use",
          missing, bytes, need, counters_.physical_bytes + pending_bytes_,
          budget_bytes_));
    }

    std::vector<PhysicalHandle> created;
    absl::Status status = CreateLocked(bytes, missing, &created);
    out.insert(out.end(), created.begin(), created.end());
    if (status.ok()) {
      created_here = missing;
      // Demand needed memory the pool did not hold: a trim's hold on the
      // refill ends.
      refill_hold_ = kNoRefillHold;
      break;
    }

    // The device refused (out of memory, say). If idle handles of other sizes
    // can go, free one and try again; otherwise keep what was made idle.
    ReleaseLocked(&out, bytes);
    if (status.code() != absl::StatusCode::kResourceExhausted) return status;
    absl::StatusOr<std::int64_t> freed = DestroyIdleLocked(bytes, 1);
    if (!freed.ok()) return freed.status();
    if (*freed == 0) return status;
  }
  counters_.idle_hits += count - created_here;
  counters_.idle_misses += created_here;
  // Handed out: demand of this period for this size.
  Demand& d = demand_[bytes];
  const std::int64_t period = NowPeriod();
  const std::size_t i = static_cast<std::size_t>(period) % d.count.size();
  if (d.period[i] != period) {
    d.period[i] = period;
    d.count[i] = 0;
  }
  d.count[i] += count;
  d.seen = true;
  return out;
}

void PhysicalPool::ReleaseLocked(std::vector<PhysicalHandle>* handles,
                                 std::size_t bytes) {
  if (handles->empty()) return;
  std::vector<PhysicalHandle>& list = idle_[bytes];
  list.insert(list.end(), handles->begin(), handles->end());
  counters_.idle_bytes += static_cast<std::int64_t>(handles->size() * bytes);
  handles->clear();
}

void PhysicalPool::Release(std::vector<PhysicalHandle> handles,
                           std::size_t bytes) {
  MutexLock lock(&mu_);
  ReleaseLocked(&handles, bytes);
}

absl::StatusOr<int> PhysicalPool::Fill(std::size_t bytes, int count) {
  MutexLock lock(&mu_);
  const int idle = IdleCountLocked(bytes);
  const std::int64_t affordable =
      std::max<std::int64_t>(0, RefillRoomLocked()) /
      static_cast<std::int64_t>(bytes);
  const int missing = static_cast<int>(
      std::min<std::int64_t>(std::max(0, count - idle), affordable));
  if (missing == 0) return 0;
  std::vector<PhysicalHandle> created;
  absl::Status status = CreateLocked(bytes, missing, &created);
  const int made = static_cast<int>(created.size());
  ReleaseLocked(&created, bytes);
  if (!status.ok()) return status;
  return made;
}

std::int64_t PhysicalPool::NowPeriod() const {
  const std::int64_t now =
      options_.now_nanos
          ? options_.now_nanos()
          : std::chrono::duration_cast<std::chrono::nanoseconds>(
                std::chrono::steady_clock::now().time_since_epoch())
                .count();
  return now / std::max<std::int64_t>(1, options_.demand_period_nanos);
}

int PhysicalPool::RefillTargetLocked(std::size_t bytes, int max_count) const {
  auto it = demand_.find(bytes);
  if (it == demand_.end() || !it->second.seen || max_count <= 0) return 0;
  const Demand& d = it->second;
  const std::int64_t window = std::clamp<std::int64_t>(
      options_.demand_window, 1, static_cast<std::int64_t>(d.count.size()));
  const std::int64_t now = NowPeriod();
  int peak = 1;
  for (std::size_t i = 0; i < d.count.size(); ++i) {
    if (d.period[i] > now - window) peak = std::max(peak, d.count[i]);
  }
  // Within the budget's pooled share, counting idle handles of other sizes.
  const std::int64_t budget =
      member_ == nullptr ? budget_bytes_
                         : std::min(budget_bytes_, member_->budget());
  const std::int64_t cap = static_cast<std::int64_t>(
      options_.max_pooled_fraction * static_cast<double>(budget));
  const std::int64_t size = static_cast<std::int64_t>(bytes);
  const std::int64_t other =
      counters_.idle_bytes - size * IdleCountLocked(bytes);
  const std::int64_t by_budget = std::max<std::int64_t>(0, cap - other) / size;
  return static_cast<int>(
      std::min<std::int64_t>({peak, max_count, by_budget}));
}

int PhysicalPool::RefillTarget(std::size_t bytes, int max_count) const {
  MutexLock lock(&mu_);
  return RefillTargetLocked(bytes, max_count);
}

bool PhysicalPool::BelowLowWater(std::size_t bytes, int max_count) const {
  MutexLock lock(&mu_);
  const int target = RefillTargetLocked(bytes, max_count);
  return IdleCountLocked(bytes) < (target + 1) / 2;
}

absl::StatusOr<int> PhysicalPool::Replenish(std::size_t bytes, int max_count,
                                            int max_create) {
  MutexLock lock(&mu_);
  const int target = RefillTargetLocked(bytes, max_count);
  const int idle = IdleCountLocked(bytes);
  const std::int64_t affordable =
      std::max<std::int64_t>(0, RefillRoomLocked()) /
      static_cast<std::int64_t>(bytes);
  const int missing = static_cast<int>(std::min<std::int64_t>(
      {std::max(0, target - idle), affordable,
       static_cast<std::int64_t>(std::max(0, max_create))}));
  if (missing == 0) return 0;
  std::vector<PhysicalHandle> created;
  absl::Status status = CreateLocked(bytes, missing, &created);
  const int made = static_cast<int>(created.size());
  ReleaseLocked(&created, bytes);
  if (!status.ok()) return status;
  return made;
}

absl::Status PhysicalPool::DestroyHandedOut(std::vector<PhysicalHandle> handles,
                                            std::size_t bytes) {
  std::vector<std::pair<PhysicalHandle, std::size_t>> doomed;
  doomed.reserve(handles.size());
  for (PhysicalHandle h : handles) doomed.emplace_back(h, bytes);
  return DestroyDoomed(std::move(doomed));
}

absl::Status PhysicalPool::DestroyDoomed(
    std::vector<std::pair<PhysicalHandle, std::size_t>> doomed) {
  if (doomed.empty()) return absl::OkStatus();
  std::vector<absl::Status> results(doomed.size());
  for (std::size_t i = 0; i < doomed.size(); ++i) {
    results[i] = backend_->Destroy(doomed[i].first);
  }
  MutexLock lock(&mu_);
  absl::Status first_error;
  std::int64_t freed = 0;
  for (std::size_t i = 0; i < doomed.size(); ++i) {
    if (results[i].ok()) {
      counters_.physical_bytes -= static_cast<std::int64_t>(doomed[i].second);
      freed += static_cast<std::int64_t>(doomed[i].second);
      ++counters_.destroy_calls;
    } else {
      doomed_.push_back(doomed[i]);
      first_error.Update(results[i]);
    }
  }
  if (member_ != nullptr) member_->Refund(freed);
  return first_error;
}

absl::Status PhysicalPool::DestroyIdle() {
  std::vector<std::pair<PhysicalHandle, std::size_t>> doomed;
  absl::Status first_error;
  {
    MutexLock lock(&mu_);
    // keep = 0 is no size: every idle handle goes.
    first_error = DestroyIdleLocked(0, -1).status();
    doomed.swap(doomed_);
  }
  first_error.Update(DestroyDoomed(std::move(doomed)));
  return first_error;
}

absl::StatusOr<std::int64_t> PhysicalPool::DestroyIdleBytes(
    std::int64_t bytes, std::int64_t keep_bytes) {
  if (bytes == 0) return 0;
  MutexLock lock(&mu_);
  return DestroyIdleLocked(0, bytes, keep_bytes);
}

std::int64_t PhysicalPool::RefillRoomLocked() const {
  const std::int64_t room = HeadroomLocked();
  if (refill_hold_ == kNoRefillHold) return room;
  return std::min(room,
                  refill_hold_ - counters_.physical_bytes - pending_bytes_);
}

}  // namespace vattn
