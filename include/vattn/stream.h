// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn::Stream: a non-owning view of one stream of a backend's device, the
// argument of Backend::RecordFence and KVCache::Free (modelled on rmm's
// cuda_stream_view). A Stream is a small value: copy it freely; it never
// creates, destroys or synchronizes a stream. It names one of three things:
//
//   Stream{} / Stream::Legacy()  the legacy default stream (CU_STREAM_LEGACY:
//                                synchronizes with every blocking stream of
//                                the context);
//   Stream::PerThread()          the calling thread's per-thread default
//                                stream (CU_STREAM_PER_THREAD);
//   Stream::FromHandle(s)        a stream the caller created (a CUstream or
//                                cudaStream_t, passed as void*).
//
// There is deliberately no implicit conversion from void*: a null pointer
// that silently meant "the legacy stream" was easy to pass by mistake.
// Thread safety: a Stream is immutable; use it from any thread. Which thread
// uses a per-thread stream matters: Stream::PerThread() names the stream of
// the thread that makes the backend call with it.
// Backends without streams (Host) ignore the stream they are given.
#ifndef VATTN_STREAM_H_
#define VATTN_STREAM_H_

#include <cstdint>

namespace vattn {

class Stream {
 public:
  enum class Kind : std::uint8_t {
    kLegacy,     // The legacy default stream.
    kPerThread,  // The calling thread's per-thread default stream.
    kHandle,     // A stream the caller created.
  };

  // The driver's special handles, as cuda.h defines them (CU_STREAM_LEGACY
  // and CU_STREAM_PER_THREAD; the runtime's cudaStreamLegacy and
  // cudaStreamPerThread have the same values); a CPU test compiled with cuda.h
  // checks that they agree.
  static constexpr std::uintptr_t kLegacyHandle = 0x1;
  static constexpr std::uintptr_t kPerThreadHandle = 0x2;

  // The legacy default stream; other code relies on Stream{} meaning it.
  constexpr Stream() noexcept = default;

  static constexpr Stream Legacy() noexcept { return Stream(); }
  static constexpr Stream PerThread() noexcept {
    return Stream(kPerThreadHandle);
  }
  // A view of `cu_stream`, a CUstream (or cudaStream_t) of the backend's
  // device that outlives every call made with this view. A null handle is
  // the legacy default stream (as the driver reads a null CUstream when the
  // per-thread default stream is not compiled in, which vattn never does),
  // and so are CU_STREAM_LEGACY and CU_STREAM_PER_THREAD read as what they
  // name: FromHandle(nullptr) == Legacy(), FromHandle(CU_STREAM_PER_THREAD)
  // == PerThread().
  static Stream FromHandle(void* cu_stream) noexcept {
    const auto value = reinterpret_cast<std::uintptr_t>(cu_stream);
    return Stream(value == 0 ? kLegacyHandle : value);
  }

  constexpr Kind kind() const noexcept {
    return value_ == kLegacyHandle      ? Kind::kLegacy
           : value_ == kPerThreadHandle ? Kind::kPerThread
                                        : Kind::kHandle;
  }
  constexpr bool is_legacy() const noexcept { return kind() == Kind::kLegacy; }
  constexpr bool is_per_thread() const noexcept {
    return kind() == Kind::kPerThread;
  }
  // True for either default stream (legacy or per-thread).
  constexpr bool is_default() const noexcept {
    return kind() != Kind::kHandle;
  }
  // What to hand the driver as the CUstream: CU_STREAM_LEGACY (0x1),
  // CU_STREAM_PER_THREAD (0x2), or the caller's handle. Never null, so the
  // meaning does not depend on how the receiving code was compiled.
  void* value() const noexcept { return reinterpret_cast<void*>(value_); }

  friend constexpr bool operator==(Stream a, Stream b) noexcept {
    return a.value_ == b.value_;
  }
  friend constexpr bool operator!=(Stream a, Stream b) noexcept {
    return !(a == b);
  }

 private:
  constexpr explicit Stream(std::uintptr_t value) noexcept : value_(value) {}

  std::uintptr_t value_ = kLegacyHandle;  // Never 0.
};

}  // namespace vattn

#endif  // VATTN_STREAM_H_
