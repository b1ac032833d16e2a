// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// The memory arbiter: the shared budget's books and cross-cache
// reclamation (src/memory_arbiter.h describes the rule, the LRU order and
// the locking).
#include "src/memory_arbiter.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_format.h"
#include "vattn/status.h"

namespace vattn {

using internal::ArbiterClient;
using internal::ArbiterMember;
using internal::MutexLock;

namespace {

constexpr std::int64_t kMaxBytes = std::int64_t{1} << 60;

}  // namespace

// ---- The books ------------------------------------------------------------

absl::StatusOr<std::unique_ptr<ArbiterMember>> MemoryArbiter::Impl::Attach(
    const std::shared_ptr<Impl>& self, std::string name, std::int64_t floor,
    std::int64_t cap, ArbiterClient* client) {
  MutexLock lock(&mu);
  if (floors + floor > budget) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KVCacheOptions.arbiter_floor_bytes (%d) does not fit the arbiter's "
        "%d-byte budget beside the attached caches' floors (%d bytes)",
        floor, budget, floors));
  }
  const std::uint64_t id = next_id++;
  Book& b = books[id];
  b.name = name.empty() ? absl::StrFormat("cache-%d", id) : std::move(name);
  b.client = client;
  b.floor = floor;
  b.cap = cap;
  floors += floor;
  effective += Effective(b);
  return std::make_unique<ArbiterMember>(self, id);
}

absl::Status MemoryArbiter::Impl::Reclaim(std::uint64_t requester,
                                          bool consider_self,
                                          std::int64_t want, std::int64_t goal,
                                          bool trim,
                                          ArbiterMember::Reclaimed* outcome,
                                          std::int64_t* freed) {
  *freed = 0;
  if (outcome != nullptr) *outcome = ArbiterMember::Reclaimed::kNothing;
  std::set<std::uint64_t> excluded;  // Gave nothing (or failed) this call.
  absl::Status first_error;
  struct Candidate {
    std::uint64_t id;
    ArbiterClient* client;
  };
  std::vector<Candidate> candidates;
  // A trim (or a budget cut) first destroys only what keeps the caches at
  // or above the goal, so that it lands on it exactly when idle memory
  // comes in pieces that fit; once nobody can give that way, a second
  // round may land below it by less than one extent. A Grow needs at
  // least its shortfall: one round, no such care.
  bool exact = requester == 0;
  for (;;) {
    candidates.clear();
    std::int64_t shortfall = 0;
    {
      MutexLock lock(&mu);
      if (requester != 0) {
        auto it = books.find(requester);
        if (it == books.end()) return first_error;
        shortfall = want - RoomLocked(it->second);
      } else {
        shortfall = charged - goal;
      }
      if (shortfall <= 0) break;
      for (auto& [id, b] : books) {
        if (b.client == nullptr || excluded.count(id) != 0) continue;
        if (id == requester ? !consider_self : b.charged <= b.floor) continue;
        ++b.in_flight;
        candidates.push_back({id, b.client});
      }
    }
    // The oldest idle memory across the caches (asked without mu).
    std::size_t best = candidates.size();
    std::uint64_t best_seq = ArbiterClient::kNoIdleSeq;
    for (std::size_t i = 0; i < candidates.size(); ++i) {
      const ArbiterClient::Idle idle = candidates[i].client->IdleInfo();
      // The requester's own pooled handles were already weighed by its
      // pool (they are used when they make enough room): its age is its
      // oldest extent's.
      const std::uint64_t seq = candidates[i].id == requester
                                    ? idle.oldest_extent_seq
                                    : idle.oldest_seq;
      if (seq < best_seq) {
        best_seq = seq;
        best = i;
      }
    }
    const auto done_with = [&](std::size_t keep) {
      MutexLock lock(&mu);
      for (std::size_t i = 0; i < candidates.size(); ++i) {
        if (i == keep) continue;
        --books[candidates[i].id].in_flight;
      }
      calls_done.SignalAll();
    };
    if (best == candidates.size()) {
      done_with(candidates.size());
      if (exact) {
        exact = false;
        excluded.clear();
        continue;
      }
      break;
    }
    if (candidates[best].id == requester) {
      done_with(candidates.size());
      if (outcome != nullptr && *freed == 0) {
        *outcome = ArbiterMember::Reclaimed::kOwnOldest;
      }
      break;
    }
    done_with(best);
    const Candidate victim = candidates[best];
    std::int64_t keep = 0;
    {
      MutexLock lock(&mu);
      const Book& v = books[victim.id];
      keep = exact ? std::max(v.floor, v.charged - shortfall) : v.floor;
    }
    absl::StatusOr<std::int64_t> gave = victim.client->GiveBack(shortfall, keep);
    MutexLock lock(&mu);
    Book& v = books[victim.id];
    --v.in_flight;
    calls_done.SignalAll();
    if (!gave.ok() || *gave <= 0) {
      excluded.insert(victim.id);
      if (!gave.ok()) first_error.Update(gave.status());
      continue;
    }
    *freed += *gave;
    v.reclaimed_from += *gave;
    if (requester != 0) {
      if (auto it = books.find(requester); it != books.end()) {
        it->second.reclaimed_for += *gave;
      }
      ++cross_reclaims;
      cross_reclaimed += *gave;
    }
    if (trim) {
      v.trimmed += *gave;
      trimmed += *gave;
    }
  }
  if (outcome != nullptr && *freed > 0) {
    *outcome = ArbiterMember::Reclaimed::kFreedElsewhere;
  }
  return first_error;
}

// ---- ArbiterMember ----------------------------------------------------------

namespace internal {

ArbiterMember::~ArbiterMember() {
  MemoryArbiter::Impl& a = *arbiter_;
  MutexLock lock(&a.mu);
  auto it = a.books.find(id_);
  if (it == a.books.end()) return;
  it->second.client = nullptr;  // Close(), if the cache did not.
  while (it->second.in_flight > 0) a.calls_done.Wait(&a.mu);
  const MemoryArbiter::Impl::Book& b = it->second;
  a.charged -= b.charged;
  a.effective -= MemoryArbiter::Impl::Effective(b);
  a.floors -= b.floor;
  a.books.erase(it);
}

bool ArbiterMember::TryCharge(std::int64_t bytes) {
  MemoryArbiter::Impl& a = *arbiter_;
  MutexLock lock(&a.mu);
  MemoryArbiter::Impl::Book& b = a.books[id_];
  if (bytes > a.RoomLocked(b)) {
    ++a.refused;
    return false;
  }
  a.effective -= MemoryArbiter::Impl::Effective(b);
  b.charged += bytes;
  a.effective += MemoryArbiter::Impl::Effective(b);
  a.charged += bytes;
  b.peak = std::max(b.peak, b.charged);
  a.peak = std::max(a.peak, a.charged);
  return true;
}

void ArbiterMember::Refund(std::int64_t bytes) {
  if (bytes == 0) return;
  MemoryArbiter::Impl& a = *arbiter_;
  MutexLock lock(&a.mu);
  MemoryArbiter::Impl::Book& b = a.books[id_];
  a.effective -= MemoryArbiter::Impl::Effective(b);
  b.charged -= bytes;
  a.effective += MemoryArbiter::Impl::Effective(b);
  a.charged -= bytes;
}

std::int64_t ArbiterMember::Room() const {
  MemoryArbiter::Impl& a = *arbiter_;
  MutexLock lock(&a.mu);
  return a.RoomLocked(a.books[id_]);
}

std::int64_t ArbiterMember::budget() const {
  MemoryArbiter::Impl& a = *arbiter_;
  MutexLock lock(&a.mu);
  return a.budget;
}

ArbiterMember::Reclaimed ArbiterMember::ReclaimFor(std::int64_t bytes,
                                                   bool consider_self) {
  Reclaimed outcome = Reclaimed::kNothing;
  std::int64_t freed = 0;
  // A victim's backend error is not the requester's: it is counted by the
  // victim's own calls; the requester just finds less memory.
  (void)arbiter_->Reclaim(id_, consider_self, bytes, 0, /*trim=*/false,
                          &outcome, &freed);
  return outcome;
}

void ArbiterMember::SetCap(std::int64_t cap_bytes) {
  MemoryArbiter::Impl& a = *arbiter_;
  MutexLock lock(&a.mu);
  a.books[id_].cap = cap_bytes;
}

void ArbiterMember::NoteTrimmed(std::int64_t bytes) {
  MemoryArbiter::Impl& a = *arbiter_;
  MutexLock lock(&a.mu);
  a.books[id_].trimmed += bytes;
}

void ArbiterMember::Close() {
  MemoryArbiter::Impl& a = *arbiter_;
  MutexLock lock(&a.mu);
  MemoryArbiter::Impl::Book& b = a.books[id_];
  b.client = nullptr;
  while (b.in_flight > 0) a.calls_done.Wait(&a.mu);
}

}  // namespace internal

// ---- MemoryArbiter ------------------------------------------------------------

MemoryArbiter::MemoryArbiter(std::shared_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

MemoryArbiter::~MemoryArbiter() = default;

absl::StatusOr<std::shared_ptr<MemoryArbiter>> MemoryArbiter::Create(
    std::shared_ptr<Backend> backend, std::size_t budget_bytes) {
  if (backend == nullptr) {
    return absl::InvalidArgumentError("MemoryArbiter::Create: backend is null");
  }
  if (budget_bytes == 0 || budget_bytes > static_cast<std::size_t>(kMaxBytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MemoryArbiter::Create: budget_bytes (%d) must be in [1, 2^60]",
        budget_bytes));
  }
  auto impl = std::make_shared<Impl>(std::move(backend),
                                     static_cast<std::int64_t>(budget_bytes));
  return std::shared_ptr<MemoryArbiter>(new MemoryArbiter(std::move(impl)));
}

absl::Status MemoryArbiter::SetBudget(std::size_t bytes) {
  Impl& a = *impl_;
  MutexLock resize(&a.resize_mu);
  std::int64_t held = 0;
  {
    MutexLock lock(&a.mu);
    if (bytes == 0 || bytes > static_cast<std::size_t>(kMaxBytes)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "MemoryArbiter::SetBudget: bytes (%d) must be in [1, 2^60]", bytes));
    }
    if (static_cast<std::int64_t>(bytes) < a.floors) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "MemoryArbiter::SetBudget: %d bytes are below the attached caches' "
          "floors (%d bytes together)",
          bytes, a.floors));
    }
    a.budget = static_cast<std::int64_t>(bytes);
    held = a.charged;
  }
  if (held <= static_cast<std::int64_t>(bytes)) return absl::OkStatus();
  std::int64_t freed = 0;
  VATTN_RETURN_IF_ERROR(a.Reclaim(0, false, 0,
                                  static_cast<std::int64_t>(bytes),
                                  /*trim=*/true, nullptr, &freed));
  const ArbiterStats now = Stats();
  if (now.physical_bytes <= static_cast<std::int64_t>(bytes)) {
    return absl::OkStatus();
  }
  std::int64_t active = 0;
  std::int64_t reclaimable = 0;
  for (const ArbiterCacheStats& c : now.caches) {
    active += c.active_bytes;
    reclaimable += c.reclaimable_bytes;
  }
  return absl::ResourceExhaustedError(absl::StrFormat(
      "MemoryArbiter::SetBudget(%d): the caches still hold %d bytes after "
      "%d idle bytes were destroyed: %d active, %d idle but within the "
      "caches' floors; the new budget stands and creations are refused until "
      "%d bytes are freed",
      bytes, now.physical_bytes, freed, active, reclaimable,
      now.physical_bytes - static_cast<std::int64_t>(bytes)));
}

absl::StatusOr<std::size_t> MemoryArbiter::Trim(std::size_t target_bytes) {
  Impl& a = *impl_;
  MutexLock resize(&a.resize_mu);
  const std::int64_t goal = static_cast<std::int64_t>(
      std::min<std::size_t>(target_bytes, static_cast<std::size_t>(kMaxBytes)));
  std::int64_t freed = 0;
  VATTN_RETURN_IF_ERROR(
      a.Reclaim(0, false, 0, goal, /*trim=*/true, nullptr, &freed));
  return static_cast<std::size_t>(freed);
}

ArbiterStats MemoryArbiter::Stats() const {
  Impl& a = *impl_;
  ArbiterStats out;
  std::vector<ArbiterClient*> clients;
  {
    MutexLock lock(&a.mu);
    out.budget_bytes = a.budget;
    out.physical_bytes = a.charged;
    out.peak_physical_bytes = a.peak;
    out.floors_bytes = a.floors;
    out.cross_reclaims = a.cross_reclaims;
    out.cross_reclaimed_bytes = a.cross_reclaimed;
    out.refused_charges = a.refused;
    out.trimmed_bytes = a.trimmed;
    for (auto& [id, b] : a.books) {
      ArbiterCacheStats c;
      c.id = id;
      c.name = b.name;
      c.physical_bytes = b.charged;
      c.floor_bytes = b.floor;
      c.cap_bytes = b.cap;
      c.peak_physical_bytes = b.peak;
      c.reclaimed_from_bytes = b.reclaimed_from;
      c.reclaimed_for_bytes = b.reclaimed_for;
      c.trimmed_bytes = b.trimmed;
      out.caches.push_back(std::move(c));
      clients.push_back(b.client);
      if (b.client != nullptr) ++b.in_flight;
    }
  }
  for (std::size_t i = 0; i < clients.size(); ++i) {
    if (clients[i] == nullptr) continue;
    const ArbiterClient::Idle idle = clients[i]->IdleInfo();
    ArbiterCacheStats& c = out.caches[i];
    c.reclaimable_bytes = std::min(idle.reclaimable_bytes, c.physical_bytes);
    c.pooled_bytes = idle.pooled_bytes;
  }
  {
    MutexLock lock(&a.mu);
    for (std::size_t i = 0; i < clients.size(); ++i) {
      if (clients[i] == nullptr) continue;
      if (auto it = a.books.find(out.caches[i].id); it != a.books.end()) {
        --it->second.in_flight;
      }
    }
    a.calls_done.SignalAll();
  }
  for (ArbiterCacheStats& c : out.caches) {
    c.active_bytes = c.physical_bytes - c.reclaimable_bytes;
  }
  return out;
}

std::size_t MemoryArbiter::budget_bytes() const {
  MutexLock lock(&impl_->mu);
  return static_cast<std::size_t>(impl_->budget);
}

const std::shared_ptr<Backend>& MemoryArbiter::backend() const {
  return impl_->backend;
}

}  // namespace vattn
