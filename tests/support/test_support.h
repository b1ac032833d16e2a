// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Assertion helpers shared by vattn's tests.
#ifndef VATTN_TESTS_SUPPORT_TEST_SUPPORT_H_
#define VATTN_TESTS_SUPPORT_TEST_SUPPORT_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace vattn::testing {

// "CODE: message", for assertion output.
std::string Describe(const absl::Status& status);

template <typename T>
std::string Describe(const absl::StatusOr<T>& status_or) {
  return Describe(status_or.status());
}

}  // namespace vattn::testing

#define VATTN_TEST_CONCAT_INNER_(a, b) a##b
#define VATTN_TEST_CONCAT_(a, b) VATTN_TEST_CONCAT_INNER_(a, b)

#define VATTN_ASSERT_OK(expr)                                       \
  do {                                                              \
    const auto& vattn_test_s_ = (expr);                             \
    ASSERT_TRUE(vattn_test_s_.ok())                                 \
        << #expr << " -> " << ::vattn::testing::Describe(vattn_test_s_); \
  } while (false)

#define VATTN_EXPECT_OK(expr)                                       \
  do {                                                              \
    const auto& vattn_test_s_ = (expr);                             \
    EXPECT_TRUE(vattn_test_s_.ok())                                 \
        << #expr << " -> " << ::vattn::testing::Describe(vattn_test_s_); \
  } while (false)

// Asserts that `rexpr` (a StatusOr) is OK and moves its value into `lhs`.
#define VATTN_ASSERT_OK_AND_ASSIGN(lhs, rexpr)                         \
  VATTN_ASSERT_OK_AND_ASSIGN_IMPL_(                                    \
      VATTN_TEST_CONCAT_(vattn_test_so_, __LINE__), lhs, rexpr)
#define VATTN_ASSERT_OK_AND_ASSIGN_IMPL_(so, lhs, rexpr)               \
  auto so = (rexpr);                                                   \
  ASSERT_TRUE(so.ok()) << #rexpr << " -> " << ::vattn::testing::Describe(so); \
  lhs = std::move(so).value()

// Expects `expr` (a Status or StatusOr) to fail with `code`.
// (The parameter is not named `code`: that would rewrite the `.code()` call.)
#define VATTN_EXPECT_CODE(expr, expected_code)                         \
  do {                                                                 \
    const auto& vattn_test_s_ = (expr);                                \
    EXPECT_EQ(::vattn::testing::StatusOf(vattn_test_s_).code(),        \
              (expected_code))                                         \
        << #expr << " -> " << ::vattn::testing::Describe(vattn_test_s_); \
  } while (false)

namespace vattn::testing {
inline const absl::Status& StatusOf(const absl::Status& s) { return s; }
template <typename T>
absl::Status StatusOf(const absl::StatusOr<T>& s) {
  return s.status();
}
}  // namespace vattn::testing

#endif  // VATTN_TESTS_SUPPORT_TEST_SUPPORT_H_
