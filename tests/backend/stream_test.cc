// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// vattn::Stream: the three kinds, FromHandle's reading of the special and
// null handles, equality, and that nothing converts to it implicitly.

#include "vattn/stream.h"

#include <type_traits>

#include "gtest/gtest.h"

namespace vattn {
namespace {

// No implicit conversion from a pointer (or anything else but a Stream).
static_assert(!std::is_convertible_v<void*, Stream>);
static_assert(!std::is_convertible_v<std::nullptr_t, Stream>);
static_assert(!std::is_constructible_v<Stream, void*>);
static_assert(!std::is_constructible_v<Stream, std::nullptr_t>);
static_assert(std::is_trivially_copyable_v<Stream>);
static_assert(sizeof(Stream) == sizeof(void*));
// Stream{} is the legacy default stream, usable in constant expressions.
static_assert(Stream{} == Stream::Legacy());
static_assert(Stream{}.is_legacy() && Stream{}.is_default());
static_assert(Stream::PerThread().is_per_thread());
static_assert(Stream::PerThread() != Stream::Legacy());

void* AsHandle(std::uintptr_t v) { return reinterpret_cast<void*>(v); }

TEST(StreamTest, DefaultIsLegacy) {
  const Stream s;
  EXPECT_EQ(s.kind(), Stream::Kind::kLegacy);
  EXPECT_TRUE(s.is_legacy());
  EXPECT_FALSE(s.is_per_thread());
  EXPECT_EQ(s.value(), AsHandle(Stream::kLegacyHandle));
  EXPECT_NE(s.value(), nullptr) << "the driver would read null by its build";
}

TEST(StreamTest, PerThread) {
  const Stream s = Stream::PerThread();
  EXPECT_EQ(s.kind(), Stream::Kind::kPerThread);
  EXPECT_TRUE(s.is_default());
  EXPECT_EQ(s.value(), AsHandle(Stream::kPerThreadHandle));
}

TEST(StreamTest, FromHandleKeepsTheHandle) {
  int object = 0;  // Any address stands for a CUstream here.
  const Stream s = Stream::FromHandle(&object);
  EXPECT_EQ(s.kind(), Stream::Kind::kHandle);
  EXPECT_FALSE(s.is_default());
  EXPECT_EQ(s.value(), static_cast<void*>(&object));
  EXPECT_EQ(s, Stream::FromHandle(&object));
  int other = 0;
  EXPECT_NE(s, Stream::FromHandle(&other));
  EXPECT_NE(s, Stream::Legacy());
}

TEST(StreamTest, FromHandleReadsNullAndTheSpecialHandles) {
  EXPECT_EQ(Stream::FromHandle(nullptr), Stream::Legacy());
  EXPECT_EQ(Stream::FromHandle(AsHandle(Stream::kLegacyHandle)),
            Stream::Legacy());
  EXPECT_EQ(Stream::FromHandle(AsHandle(Stream::kPerThreadHandle)),
            Stream::PerThread());
}

}  // namespace
}  // namespace vattn
