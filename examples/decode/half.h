// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// fp16 and bf16 <-> float conversions for the CPU side (kernels, reference,
// prefill), written out so no compiler extension or intrinsic is needed.
// Rounding to the narrow types is round-to-nearest-even; NaN stays NaN.
#ifndef VATTN_EXAMPLES_DECODE_HALF_H_
#define VATTN_EXAMPLES_DECODE_HALF_H_

#include <cstdint>
#include <cstring>

namespace vdecode {

inline std::uint32_t FloatBits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float BitsToFloat(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> float, exact (subnormals, infinities and NaN included).
inline float HalfToFloat(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return BitsToFloat(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return BitsToFloat(sign);
  // Subnormal: normalize.
  std::uint32_t e = 113;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return BitsToFloat(sign | (e << 23) | ((mant & 0x3ffu) << 13));
}

// float -> IEEE binary16, round-to-nearest-even, overflow to infinity.
inline std::uint16_t FloatToHalf(float f) {
  const std::uint32_t u = FloatBits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // Inf or NaN.
    return static_cast<std::uint16_t>(sign | 0x7c00u |
                                      (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) {  // Rounds to >= 65520: infinity.
    return static_cast<std::uint16_t>(sign | 0x7c00u);
  }
  if (abs < 0x38800000u) {  // Below the smallest normal: subnormal or zero.
    if (abs < 0x33000000u) return static_cast<std::uint16_t>(sign);
    const std::uint32_t e = abs >> 23;
    const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - e;  // 14..24
    std::uint32_t r = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1);
    const std::uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t r = ((abs >> 13) - (112u << 10));
  const std::uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<std::uint16_t>(sign | r);
}

inline float Bf16ToFloat(std::uint16_t b) {
  return BitsToFloat(static_cast<std::uint32_t>(b) << 16);
}

inline std::uint16_t FloatToBf16(float f) {
  const std::uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it quiet.
    return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  }
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}

// All 65536 fp16 values as floats (built once, thread-safe): the CPU
// kernel's fast path.
const float* HalfToFloatTable();

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_HALF_H_
