// The e4m3fn and ue8m0 conversions of src/core/fp8.h against independent definitions:
// every e4m3 code decoded, every finite code round-tripped, every bf16 and dense sweeps of
// fp32 around every rounding boundary encoded and compared with a brute-force nearest-even
// search in double, saturation, NaN and signed zeros (docs/fp8.md, "Conversions").
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "common/test_util.h"
#include "core/fp8.h"

namespace modmoe {
namespace {

using fp8::e4m3_to_float;
using fp8::float_to_e4m3;

// Compile-time spot checks: the functions are constexpr on the host.
static_assert(float_to_e4m3(448.0f, true) == 0x7e);
static_assert(float_to_e4m3(1.0f, true) == 0x38);
static_assert(float_to_e4m3(-2.0f, false) == 0xc0);
static_assert(float_to_e4m3(0.001953125f, true) == 0x01);  // 2^-9
static_assert(e4m3_to_float(0x7e) == 448.0f);
static_assert(e4m3_to_float(0x08) == 0.015625f);  // 2^-6
static_assert(fp8::ue8m0_to_float(127) == 1.0f);

uint32_t bits(float x) { return std::bit_cast<uint32_t>(x); }
float from_bits(uint32_t u) { return std::bit_cast<float>(u); }

// The e4m3fn value of a code from its definition, in double; NaN for 0x7f / 0xff.
double e4m3_value(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -mag : mag;
}

// Brute force: the code nearest to x on the e4m3 grid, ties to the even code, with the
// overflow rule of `saturate` (docs/fp8.md): satfinite clamps to +-448; the non-saturating
// (PyTorch) conversion gives NaN (0x7f | sign) past the midpoint 464 between 448 and the
// missing 480.
uint8_t e4m3_oracle(float xf, bool saturate) {
  const double x = xf;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  if (std::isnan(x)) return saturate ? 0x7f : static_cast<uint8_t>(0x7f | sign);
  const double a = std::fabs(x);
  if (a > 464.0) return saturate ? (0x7e | sign) : (0x7f | sign);
  int best = 0;
  double best_d = std::numeric_limits<double>::infinity();
  for (int c = 0; c <= 0x7e; ++c) {
    const double d = std::fabs(e4m3_value(c) - a);
    if (d < best_d || (d == best_d && (c & 1) == 0)) {
      best = c;
      best_d = d;
    }
  }
  return static_cast<uint8_t>(best | sign);
}

// Both modes agree with the oracle on x; reports x on failure.
::testing::AssertionResult encodes_like_oracle(float x) {
  for (bool sat : {true, false}) {
    const uint8_t got = float_to_e4m3(x, sat), want = e4m3_oracle(x, sat);
    if (got != want) {
      return ::testing::AssertionFailure()
             << "float_to_e4m3(" << x << " = 0x" << std::hex << bits(x) << ", saturate=" << sat
             << ") = 0x" << int(got) << ", expected 0x" << int(want) << std::dec;
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(Fp8E4m3, DecodesEveryCode) {
  int nan_count = 0;
  for (int c = 0; c < 256; ++c) {
    const double want = e4m3_value(c);
    const float got = e4m3_to_float(static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      ++nan_count;
      EXPECT_TRUE(std::isnan(got)) << "code 0x" << std::hex << c;
      EXPECT_EQ(std::signbit(got), c >= 0x80) << "NaN keeps the sign, code 0x" << std::hex << c;
      continue;
    }
    EXPECT_EQ(static_cast<double>(got), want) << "code 0x" << std::hex << c;
    EXPECT_EQ(std::signbit(got), c >= 0x80) << "code 0x" << std::hex << c;  // -0 for 0x80
  }
  EXPECT_EQ(nan_count, 2);
  // The positive codes 0..0x7e are strictly increasing: the grid has no gap or duplicate.
  for (int c = 1; c <= 0x7e; ++c) {
    EXPECT_LT(e4m3_to_float(static_cast<uint8_t>(c - 1)), e4m3_to_float(static_cast<uint8_t>(c)));
  }
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(e4m3_to_float(0x08), std::ldexp(1.0f, -6));
}

TEST(Fp8E4m3, RoundTripsEveryFiniteCode) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    const float v = e4m3_to_float(static_cast<uint8_t>(c));
    EXPECT_EQ(float_to_e4m3(v, true), c) << "code 0x" << std::hex << c;
    EXPECT_EQ(float_to_e4m3(v, false), c) << "code 0x" << std::hex << c;
  }
}

TEST(Fp8E4m3, EncodesEveryBf16LikeTheOracle) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float x = from_bits(b << 16);
    ASSERT_TRUE(encodes_like_oracle(x));
  }
}

// Every fp32 within 64 ulps of every midpoint between neighbouring e4m3 values (where the
// rounding decides), of every e4m3 value itself, and of the overflow points 448, 464, 480.
TEST(Fp8E4m3, EncodesAroundEveryBoundaryLikeTheOracle) {
  std::vector<float> centres;
  for (int c = 0; c <= 0x7e; ++c) {
    const float v = e4m3_to_float(static_cast<uint8_t>(c));
    centres.push_back(v);
    if (c < 0x7e) {
      centres.push_back(static_cast<float>((v + e4m3_to_float(static_cast<uint8_t>(c + 1))) / 2));
    }
  }
  centres.push_back(464.0f);
  centres.push_back(480.0f);
  centres.push_back(std::ldexp(1.0f, -10));  // half the smallest subnormal
  int64_t checked = 0;
  for (float centre : centres) {
    for (int d = -64; d <= 64; ++d) {
      const int64_t u = static_cast<int64_t>(bits(centre)) + d;
      if (u < 0) continue;
      const float x = from_bits(static_cast<uint32_t>(u));
      ASSERT_TRUE(encodes_like_oracle(x));
      ASSERT_TRUE(encodes_like_oracle(-x));
      checked += 2;
    }
  }
  EXPECT_GT(checked, 60000);
}

TEST(Fp8E4m3, EncodesRandomFloatsLikeTheOracle) {
  std::mt19937_64 rng(test::seed(81));
  std::uniform_int_distribution<uint32_t> any_bits;
  std::uniform_real_distribution<float> in_range(-600.0f, 600.0f);
  for (int i = 0; i < 200000; ++i) {
    ASSERT_TRUE(encodes_like_oracle(from_bits(any_bits(rng))));
    ASSERT_TRUE(encodes_like_oracle(in_range(rng)));
  }
}

TEST(Fp8E4m3, TiesToEven) {
  // Normal: 1 + 1/16 is halfway between 1 (0x38, even) and 1.125 (0x39).
  EXPECT_EQ(float_to_e4m3(1.0625f, true), 0x38);
  EXPECT_EQ(float_to_e4m3(1.1875f, true), 0x3a);  // halfway 1.125 / 1.25 -> 1.25 (even)
  EXPECT_EQ(float_to_e4m3(-1.0625f, true), 0xb8);
  // Subnormal: k.5 * 2^-9 goes to the even k.
  const float q = std::ldexp(1.0f, -9);
  EXPECT_EQ(float_to_e4m3(0.5f * q, true), 0x00);
  EXPECT_EQ(float_to_e4m3(1.5f * q, true), 0x02);
  EXPECT_EQ(float_to_e4m3(2.5f * q, true), 0x02);
  EXPECT_EQ(float_to_e4m3(6.5f * q, true), 0x06);
  EXPECT_EQ(float_to_e4m3(7.5f * q, true), 0x08);  // into the smallest normal 2^-6
  // Just off the midpoints.
  EXPECT_EQ(float_to_e4m3(std::nextafter(1.0625f, 2.0f), true), 0x39);
  EXPECT_EQ(float_to_e4m3(std::nextafter(0.5f * q, 1.0f), true), 0x01);
}

TEST(Fp8E4m3, Subnormals) {
  const float q = std::ldexp(1.0f, -9);
  for (int m = 0; m < 8; ++m) {
    EXPECT_EQ(float_to_e4m3(m * q, true), m);
    EXPECT_EQ(float_to_e4m3(-(m * q), true), 0x80 | m);
  }
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -6), true), 0x08);
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -12), true), 0x00);  // underflow to +0
  EXPECT_EQ(float_to_e4m3(from_bits(0x00000001u), true), 0x00);  // fp32 subnormal
}

TEST(Fp8E4m3, SignedZerosAreKept) {
  EXPECT_EQ(float_to_e4m3(0.0f, true), 0x00);
  EXPECT_EQ(float_to_e4m3(-0.0f, true), 0x80);
  EXPECT_EQ(float_to_e4m3(-0.0f, false), 0x80);
  EXPECT_EQ(float_to_e4m3(-1e-30f, true), 0x80);  // rounds to zero, keeps the sign
  EXPECT_TRUE(std::signbit(e4m3_to_float(0x80)));
  EXPECT_EQ(e4m3_to_float(0x80), 0.0f);
}

TEST(Fp8E4m3, Saturation) {
  const float inf = std::numeric_limits<float>::infinity();
  // satfinite: everything past 448 is +-448.
  for (float x : {449.0f, 464.0f, std::nextafter(464.0f, inf), 480.0f, 1e6f, 3e38f, inf}) {
    EXPECT_EQ(float_to_e4m3(x, true), 0x7e) << x;
    EXPECT_EQ(float_to_e4m3(-x, true), 0xfe) << -x;
  }
  // Non-saturating (PyTorch): up to 464 (the midpoint, ties to even 448) -> 448; beyond -> NaN
  // with the sign.
  EXPECT_EQ(float_to_e4m3(449.0f, false), 0x7e);
  EXPECT_EQ(float_to_e4m3(464.0f, false), 0x7e);
  EXPECT_EQ(float_to_e4m3(-464.0f, false), 0xfe);
  for (float x : {std::nextafter(464.0f, inf), 470.0f, 480.0f, 1e6f, inf}) {
    EXPECT_EQ(float_to_e4m3(x, false), 0x7f) << x;
    EXPECT_EQ(float_to_e4m3(-x, false), 0xff) << -x;
  }
}

TEST(Fp8E4m3, NaN) {
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  const float neg_nan = -qnan;
  const float snan = from_bits(0x7f800001u);
  EXPECT_EQ(float_to_e4m3(qnan, true), 0x7f);
  EXPECT_EQ(float_to_e4m3(neg_nan, true), 0x7f);  // satfinite: one NaN, like the hardware
  EXPECT_EQ(float_to_e4m3(snan, true), 0x7f);
  EXPECT_EQ(float_to_e4m3(qnan, false), 0x7f);
  EXPECT_EQ(float_to_e4m3(neg_nan, false), 0xff);  // PyTorch keeps the sign
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xff)));
}

TEST(Fp8Ue8m0, DecodesEveryCode) {
  for (int c = 0; c < 255; ++c) {
    EXPECT_EQ(static_cast<double>(fp8::ue8m0_to_float(static_cast<uint8_t>(c))),
              std::ldexp(1.0, c - 127))
        << c;
  }
  EXPECT_TRUE(std::isnan(fp8::ue8m0_to_float(0xff)));
}

TEST(Fp8Ue8m0, Encodes) {
  for (int c = 0; c < 255; ++c) {  // powers of two are exact in both directions
    const float v = fp8::ue8m0_to_float(static_cast<uint8_t>(c));
    EXPECT_EQ(fp8::float_to_ue8m0(v, true), c) << c;
    EXPECT_EQ(fp8::float_to_ue8m0(v, false), c) << c;
    EXPECT_EQ(fp8::float_to_ue8m0(-v, true), c) << "sign ignored, " << c;
  }
  EXPECT_EQ(fp8::float_to_ue8m0(3.0f, true), 129);   // 4
  EXPECT_EQ(fp8::float_to_ue8m0(3.0f, false), 128);  // 2
  EXPECT_EQ(fp8::float_to_ue8m0(std::nextafter(1.0f, 2.0f), true), 128);
  EXPECT_EQ(fp8::float_to_ue8m0(0.0f, true), 0);
  EXPECT_EQ(fp8::float_to_ue8m0(from_bits(0x00400001u), true), 1);  // just above 2^-127
  EXPECT_EQ(fp8::float_to_ue8m0(3e38f, true), 254);                  // clamped to 2^127
  EXPECT_EQ(fp8::float_to_ue8m0(std::numeric_limits<float>::infinity(), true), 255);
  EXPECT_EQ(fp8::float_to_ue8m0(std::numeric_limits<float>::quiet_NaN(), false), 255);
}

TEST(Fp8Quantize, ScaleFromAmax) {
  EXPECT_EQ(fp8::e4m3_scale_from_amax(448.0f), 1.0f);
  EXPECT_EQ(fp8::e4m3_scale_from_amax(896.0f), 2.0f);
  EXPECT_EQ(fp8::e4m3_scale_from_amax(3.0f), 3.0f / 448.0f);
  EXPECT_EQ(fp8::e4m3_scale_from_amax(0.0f), 1e-10f / 448.0f);  // the floor, never 0
  EXPECT_EQ(fp8::e4m3_scale_from_amax(1e-20f), 1e-10f / 448.0f);
  EXPECT_EQ(bits(fp8::e4m3_scale_from_amax(std::numeric_limits<float>::quiet_NaN())),
            fp8::kCanonicalNaNBits);
  EXPECT_EQ(bits(fp8::e4m3_scale_from_amax(from_bits(0x7fa12345u))), fp8::kCanonicalNaNBits);
  EXPECT_TRUE(std::isinf(fp8::e4m3_scale_from_amax(std::numeric_limits<float>::infinity())));
}

TEST(Fp8Quantize, QuantizeIsDivideThenSatfinite) {
  std::mt19937_64 rng(test::seed(82));
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (int i = 0; i < 100000; ++i) {
    const float x = nd(rng), s = std::fabs(nd(rng)) * 0.01f + 1e-3f;
    ASSERT_EQ(fp8::quantize_e4m3(x, s), float_to_e4m3(x / s, true)) << x << " / " << s;
  }
  // The group maximum lands on +-448 exactly: |x| / (|x| / 448) rounds to within an ulp of 448.
  for (int i = 0; i < 10000; ++i) {
    const float amax = std::fabs(nd(rng)) + 1e-6f;
    const float s = fp8::e4m3_scale_from_amax(amax);
    ASSERT_EQ(fp8::quantize_e4m3(amax, s), 0x7e) << amax;
    ASSERT_EQ(fp8::quantize_e4m3(-amax, s), 0xfe) << amax;
  }
}

}  // namespace
}  // namespace modmoe
