// NVFP4 numerics (src/core/nvfp4.h, docs/nvfp4.md) and the public NVFP4 entry points on the
// CPU: quantize_nvfp4, dequantize_nvfp4, prepare_weights with QuantScheme::Nvfp4.
//   - e2m1: the 16 codes decoded bit-exactly against a literal table; encode round trip, ties
//     to even, saturation, NaN (-> +6, the hardware rule), signed zeros; a brute-force nearest
//     search over 2^24 spread inputs; CUDA's own host emulation (__nv_cvt_float_to_fp4) over
//     the same inputs where the toolkit is there;
//   - e2m1 * e4m3 is exact in bf16 for every pair of codes (what the W4A16 path relies on);
//   - the scale formulas on hand-made blocks: zero block, saturated block scale, subnormal and
//     underflowing e4m3 scales, an e4m3 tie, NaN and inf;
//   - the quantizer on random data: every code is the nearest, a hard per-element bound, and
//     the relative RMS error the e2m1 grid implies (derived at QuantizerRoundTripError);
//   - prepare_weights: prepared vs canonical element by element, for G, orders, biases;
//   - bad arguments, each with its message.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/test_util.h"
#include "core/fp8.h"
#include "core/nvfp4.h"
#include "modmoe/modmoe.h"
#include "reference/nvfp4.h"

#ifdef MODMOE_WITH_CUDA
#include <cuda_fp16.h>
#include <cuda_fp4.h>
#endif

namespace modmoe {
namespace {

// The e2m1 values of codes 0..15, written out (OCP FP4 E2M1).
constexpr float kE2m1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

uint32_t bits(float x) { return std::bit_cast<uint32_t>(x); }

// ---- compile-time checks: the header is constexpr on the host ----
static_assert(nvfp4::e2m1_to_float(0x7) == 6.0f && nvfp4::e2m1_to_float(0x1) == 0.5f);
static_assert(nvfp4::e2m1_to_float(0xd) == -3.0f);
static_assert(nvfp4::float_to_e2m1(0.25f) == 0x0 && nvfp4::float_to_e2m1(0.75f) == 0x2);
static_assert(nvfp4::float_to_e2m1(5.0f) == 0x6 && nvfp4::float_to_e2m1(-7.0f) == 0xf);
static_assert(nvfp4::pack_e2m1x2(0x3, 0xc) == 0xc3);
static_assert(nvfp4::kGlobalDivisor == 2688.0f);
static_assert(nvfp4::global_scale_from_amax(2688.0f) == 1.0f);
static_assert(nvfp4::block_scale_e4m3(12.0f, 1.0f) == 0x40);  // 2.0
static_assert(nvfp4::dequantize(0x7, 0x7e, 1.0f) == 2688.0f);

// ---- e2m1 ----

TEST(Nvfp4E2m1, DecodeAll16Codes) {
  for (int c = 0; c < 16; ++c) {
    EXPECT_EQ(bits(nvfp4::e2m1_to_float(static_cast<uint8_t>(c))), bits(kE2m1[c])) << "code " << c;
    // Only the low nibble is read.
    EXPECT_EQ(bits(nvfp4::e2m1_to_float(static_cast<uint8_t>(c | 0xa0))), bits(kE2m1[c]));
  }
}

TEST(Nvfp4E2m1, EncodeRoundTripsEveryCode) {
  for (int c = 0; c < 16; ++c) {
    EXPECT_EQ(nvfp4::float_to_e2m1(kE2m1[c]), c) << "code " << c;
  }
}

TEST(Nvfp4E2m1, TiesGoToTheEvenCode) {
  // midpoint -> code (the even one of its two neighbours)
  const struct {
    float x;
    uint8_t code;
  } ties[] = {{0.25f, 0x0}, {0.75f, 0x2}, {1.25f, 0x2}, {1.75f, 0x4},
              {2.5f, 0x4},  {3.5f, 0x6},  {5.0f, 0x6}};
  for (const auto& t : ties) {
    EXPECT_EQ(nvfp4::float_to_e2m1(t.x), t.code) << t.x;
    EXPECT_EQ(nvfp4::float_to_e2m1(-t.x), t.code | 0x8) << -t.x;
    // One ulp either side goes to the nearer neighbour.
    const float below = std::nextafter(t.x, 0.0f), above = std::nextafter(t.x, 10.0f);
    const uint8_t lo = nvfp4::float_to_e2m1(below), hi = nvfp4::float_to_e2m1(above);
    EXPECT_EQ(hi, lo + 1) << "around " << t.x;
    EXPECT_LT(kE2m1[lo], t.x);
    EXPECT_GT(kE2m1[hi], t.x);
  }
}

TEST(Nvfp4E2m1, SaturatesToSix) {
  const float big[] = {std::nextafter(5.0f, 6.0f), 6.0f, 6.5f, 7.0f, 1e30f,
                       std::numeric_limits<float>::max(), INFINITY};
  for (float x : big) {
    EXPECT_EQ(nvfp4::float_to_e2m1(x), 0x7) << x;
    EXPECT_EQ(nvfp4::float_to_e2m1(-x), 0xf) << -x;
  }
}

TEST(Nvfp4E2m1, NaNBecomesPlusSix) {
  // The hardware rule (cvt.rn.satfinite.e2m1x2.f32; CUDA documents "NaN input values result in
  // positive MAXNORM"), whatever the sign or payload.
  for (uint32_t u : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu}) {
    EXPECT_EQ(nvfp4::float_to_e2m1(std::bit_cast<float>(u)), 0x7) << std::hex << u;
  }
}

TEST(Nvfp4E2m1, SignedZerosAndTinyValues) {
  EXPECT_EQ(nvfp4::float_to_e2m1(0.0f), 0x0);
  EXPECT_EQ(nvfp4::float_to_e2m1(-0.0f), 0x8);
  EXPECT_EQ(nvfp4::float_to_e2m1(-0.1f), 0x8);
  EXPECT_EQ(nvfp4::float_to_e2m1(0.1f), 0x0);
  EXPECT_EQ(nvfp4::float_to_e2m1(std::numeric_limits<float>::denorm_min()), 0x0);
  EXPECT_EQ(nvfp4::float_to_e2m1(-std::numeric_limits<float>::denorm_min()), 0x8);
}

// Inputs spread over every exponent and sign: 2^24 patterns (bits = i * 256 + a fixed tail),
// plus every float within 64 ulps of each midpoint and grid value.
std::vector<float> sweep_inputs() {
  std::vector<float> xs;
  xs.reserve((1u << 24) + 16 * 15 * 129);
  for (uint32_t i = 0; i < (1u << 24); ++i) xs.push_back(std::bit_cast<float>(i * 256u + 0x5bu));
  const float anchors[] = {0.25f, 0.5f, 0.75f, 1.0f, 1.25f, 1.5f, 1.75f, 2.0f,
                           2.5f,  3.0f, 3.5f,  4.0f, 5.0f,  6.0f, 1e-38f};
  for (float a : anchors) {
    for (int s = 0; s < 2; ++s) {
      for (int d = -64; d <= 64; ++d) {
        const uint32_t u = bits(a) + static_cast<uint32_t>(d);
        xs.push_back(std::bit_cast<float>(s ? u | 0x80000000u : u));
      }
    }
  }
  return xs;
}

// The nearest e2m1 value by brute force in double: smallest distance, ties to the even code,
// everything past 6 saturated, the sign kept; NaN -> +6.
uint8_t nearest_e2m1(float x) {
  if (std::isnan(x)) return 0x7;
  const double a = std::fabs(static_cast<double>(x));
  const uint8_t sign = std::signbit(x) ? 0x8 : 0;
  if (a >= 6.0) return static_cast<uint8_t>(0x7 | sign);  // (distances to 4 and 6 may tie)
  int best = 0;
  for (int c = 1; c < 8; ++c) {
    const double dc = std::fabs(a - kE2m1[c]), db = std::fabs(a - kE2m1[best]);
    if (dc < db || (dc == db && c % 2 == 0)) best = c;
  }
  return static_cast<uint8_t>(best | sign);
}

TEST(Nvfp4E2m1, EncodeIsTheNearestValue) {
  const std::vector<float> xs = sweep_inputs();
  int64_t bad = 0;
  for (float x : xs) {
    const uint8_t got = nvfp4::float_to_e2m1(x), want = nearest_e2m1(x);
    if (got != want && ++bad <= 8) {
      ADD_FAILURE() << "x = " << x << " (0x" << std::hex << bits(x) << std::dec << "): got 0x"
                    << std::hex << int(got) << ", expected 0x" << int(want);
    }
  }
  EXPECT_EQ(bad, 0) << "of " << xs.size() << " inputs";
}

#ifdef MODMOE_WITH_CUDA
// CUDA's conversion, compiled for the host: its emulation of cvt.rn.satfinite.e2m1x2.f32.
TEST(Nvfp4E2m1, MatchesCudaConversion) {
  const std::vector<float> xs = sweep_inputs();
  int64_t bad = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i];
    const uint8_t cuda = __nv_cvt_float_to_fp4(x, __NV_E2M1, cudaRoundNearest);
    if (cuda != nvfp4::float_to_e2m1(x) && ++bad <= 8) {
      ADD_FAILURE() << "x = " << x << " (0x" << std::hex << bits(x) << "): cuda 0x" << int(cuda)
                    << ", modmoe 0x" << int(nvfp4::float_to_e2m1(x));
    }
  }
  EXPECT_EQ(bad, 0) << "of " << xs.size() << " inputs";
  // The pair conversion puts .x (the first element) in the low nibble.
  const __nv_fp4x2_storage_t pair =
      __nv_cvt_float2_to_fp4x2(make_float2(1.5f, -4.0f), __NV_E2M1, cudaRoundNearest);
  EXPECT_EQ(pair, nvfp4::pack_e2m1x2(nvfp4::float_to_e2m1(1.5f), nvfp4::float_to_e2m1(-4.0f)));
  // Decode, through CUDA's fp4 -> half.
  for (int c = 0; c < 16; ++c) {
    const __half_raw h = __nv_cvt_fp4_to_halfraw(static_cast<__nv_fp4_storage_t>(c), __NV_E2M1);
    EXPECT_EQ(bits(__half2float(__half(h))), bits(nvfp4::e2m1_to_float(static_cast<uint8_t>(c))))
        << "code " << c;
  }
}
#endif

TEST(Nvfp4E2m1, Packing) {
  for (int a = 0; a < 16; ++a) {
    for (int b = 0; b < 16; ++b) {
      const uint8_t byte = nvfp4::pack_e2m1x2(static_cast<uint8_t>(a), static_cast<uint8_t>(b));
      EXPECT_EQ(byte, a | (b << 4));
      EXPECT_EQ(nvfp4::e2m1x2_first(byte), a);
      EXPECT_EQ(nvfp4::e2m1x2_second(byte), b);
    }
  }
}

// e2m1 * e4m3 has at most 6 significant bits and lies in [2^-10, 2688]: exact in fp32, and
// representable in bf16, for every pair of codes (NaN scales aside). The W4A16 kernels feed
// this product to a bf16 MMA, so this is what makes their weights exact.
TEST(Nvfp4Scale, BlockValueIsExactInBf16) {
  for (int c = 0; c < 16; ++c) {
    for (int s = 0; s < 256; ++s) {
      if ((s & 0x7f) == 0x7f) continue;  // NaN scale
      const float v = nvfp4::block_value(static_cast<uint8_t>(c), static_cast<uint8_t>(s));
      const double exact = double(kE2m1[c]) * double(fp8::e4m3_to_float(static_cast<uint8_t>(s)));
      ASSERT_EQ(double(v), exact) << "code " << c << " scale 0x" << std::hex << s;
      ASSERT_EQ(bits(round_to_bf16(v)), bits(v)) << "code " << c << " scale 0x" << std::hex << s;
    }
  }
  EXPECT_TRUE(std::isnan(nvfp4::block_value(0x2, 0x7f)));
  EXPECT_TRUE(std::isnan(nvfp4::block_value(0x0, 0xff)));
}

// The W4A16 kernel's decode (nvfp4::e2m1_pair_bf16_bits, then a bf16 multiply by
// bf16(scale * 2^119)): for every word position j, every pair of nibbles and every non-NaN
// scale, the bits are e2m1 * 2^-126 as a bf16, and the product is block_value * 2^-7 exactly
// (so the bf16 multiply's rounding never acts), whatever the word's other nibbles hold.
TEST(Nvfp4Scale, KernelDecodeIsExact) {
  std::mt19937_64 rng(test::seed(214));
  auto bf16_value = [](uint32_t half) { return double(bf16_bits_to_float(uint16_t(half))); };
  for (int j = 0; j < 4; ++j) {
    for (int lo = 0; lo < 16; ++lo) {
      for (int hi = 0; hi < 16; ++hi) {
        // Nibble j = lo, nibble j + 4 = hi, the other six random.
        uint32_t word = static_cast<uint32_t>(rng());
        word &= ~((0xfu << (4 * j)) | (0xfu << (4 * (j + 4))));
        word |= (uint32_t(lo) << (4 * j)) | (uint32_t(hi) << (4 * (j + 4)));
        const uint32_t b = nvfp4::e2m1_pair_bf16_bits(word, j);
        const double v_lo = bf16_value(b & 0xffffu), v_hi = bf16_value(b >> 16);
        ASSERT_EQ(v_lo, std::ldexp(double(kE2m1[lo]), -126)) << "j " << j << " code " << lo;
        ASSERT_EQ(v_hi, std::ldexp(double(kE2m1[hi]), -126)) << "j " << j << " code " << hi;
        // Signs of zero: 0x8 is -0, as a bf16 too.
        ASSERT_EQ((b >> 15) & 1u, uint32_t(lo >> 3));
        ASSERT_EQ(b >> 31, uint32_t(hi >> 3));
        for (int s = 0; s < 256; ++s) {
          if ((s & 0x7f) == 0x7f) continue;
          const float k = fp8::e4m3_to_float(uint8_t(s)) * nvfp4::kDecodeScaleBias;
          ASSERT_EQ(bits(round_to_bf16(k)), bits(k)) << "scale 0x" << std::hex << s;
          for (const auto& [v, c] : {std::pair{v_lo, lo}, std::pair{v_hi, hi}}) {
            const double prod = v * double(k);  // exact in double
            const double want =
                double(nvfp4::block_value(uint8_t(c), uint8_t(s))) / nvfp4::kDecodeUnscale;
            ASSERT_EQ(prod, want) << "code " << c << " scale 0x" << std::hex << s;
            ASSERT_EQ(double(round_to_bf16(float(prod))), prod) << "not exact in bf16";
          }
        }
      }
    }
  }
}

// The wgmma W4A16 kernel's A fragment (src/cuda/gemm/sm90_wgmma_grouped_gemm.cuh,
// sm90_mainloop_w4a16 with w4a16_decode.cuh's decode_natural_pairs), replayed on the host: for
// every lane quad position q and k16 step s of a 64-K stage, the four bf16 pairs are the row's
// values in natural K order (16s + 2q, + 1 and 16s + 2q + 8, + 9), each e2m1 * 2^-126 exactly,
// whatever the other bytes of the words hold. Every byte value is tried in both positions.
TEST(Nvfp4Scale, WgmmaFragmentIsInNaturalKOrder) {
  std::mt19937_64 rng(test::seed(215));
  auto bf16_value = [](uint32_t half) { return double(bf16_bits_to_float(uint16_t(half))); };
  // value k of the 32-byte row: nibble k % 2 of byte k / 2 (element 2i in the low nibble)
  auto value_of = [](const uint8_t* row, int k) {
    return double(kE2m1[(row[k / 2] >> (4 * (k % 2))) & 0xf]);
  };
  int checked = 0;
  for (int rep = 0; rep < 256; ++rep) {
    uint8_t row[32];
    for (uint8_t& b : row) b = static_cast<uint8_t>(rng());
    for (int s = 0; s < 4; ++s) {
      for (int q = 0; q < 4; ++q) {
        // Bytes 8s + q and 8s + q + 4 take every value over the repetitions.
        row[8 * s + q] = static_cast<uint8_t>(rep);
        row[8 * s + q + 4] = static_cast<uint8_t>(255 - rep);
        uint32_t w[8];
        std::memcpy(w, row, sizeof(w));  // little endian: byte i of the row is byte i % 4 of w[i / 4]
        const uint32_t x = w[2 * s], y = w[2 * s + 1];
        // The kernel: __byte_perm(x, y, q | (q + 4) << 4); its high bytes are not read.
        const uint32_t pair = nvfp4::select_byte_pair(x, y, q) | (static_cast<uint32_t>(rng()) << 16);
        const uint32_t spread = nvfp4::e2m1_byte_pairs_spread(pair);
        const uint32_t r_k = nvfp4::e2m1_pair_bf16_bits(spread, 0);
        const uint32_t r_k8 = nvfp4::e2m1_pair_bf16_bits(spread, 2);
        const int k0 = 16 * s + 2 * q;
        ASSERT_EQ(bf16_value(r_k & 0xffffu), std::ldexp(value_of(row, k0), -126)) << s << q;
        ASSERT_EQ(bf16_value(r_k >> 16), std::ldexp(value_of(row, k0 + 1), -126)) << s << q;
        ASSERT_EQ(bf16_value(r_k8 & 0xffffu), std::ldexp(value_of(row, k0 + 8), -126)) << s << q;
        ASSERT_EQ(bf16_value(r_k8 >> 16), std::ldexp(value_of(row, k0 + 9), -126)) << s << q;
        // Signs (0x8 is -0): bit 15 of each half is the nibble's bit 3.
        ASSERT_EQ((r_k >> 15) & 1u, uint32_t(row[8 * s + q] >> 3) & 1u);
        ASSERT_EQ(r_k >> 31, uint32_t(row[8 * s + q] >> 7));
        ASSERT_EQ((r_k8 >> 15) & 1u, uint32_t(row[8 * s + q + 4] >> 3) & 1u);
        ASSERT_EQ(r_k8 >> 31, uint32_t(row[8 * s + q + 4] >> 7));
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 256 * 16);
}

TEST(Nvfp4Scale, GlobalScaleFormula) {
  // amax / (6 * 448), one IEEE division; 1e-10 floor; NaN stays NaN.
  EXPECT_EQ(nvfp4::global_scale_from_amax(2688.0f), 1.0f);
  EXPECT_EQ(nvfp4::global_scale_from_amax(5.25f), 5.25f / 2688.0f);
  EXPECT_EQ(nvfp4::global_scale_from_amax(0.0f), 1e-10f / 2688.0f);
  EXPECT_GT(nvfp4::global_scale_from_amax(0.0f), 0.0f);
  EXPECT_EQ(bits(nvfp4::global_scale_from_amax(NAN)), fp8::kCanonicalNaNBits);
  EXPECT_EQ(nvfp4::global_scale_from_amax(INFINITY), INFINITY);
  // The block holding the tensor amax gets the largest scale, 448, and its amax maps onto 6.
  for (float amax : {1.0f, 0.0371f, 3.3e4f, 1e-6f}) {
    const float g = nvfp4::global_scale_from_amax(amax);
    EXPECT_EQ(nvfp4::block_scale_e4m3(amax, g), fp8::kE4m3MaxCode) << amax;
    EXPECT_EQ(nvfp4::quantize_e2m1(amax, nvfp4::block_divisor(0x7e, g)), 0x7) << amax;
  }
}

TEST(Nvfp4Scale, BlockScaleFormula) {
  // e4m3_satfinite((amax / 6) / g): the divisions in this order, both IEEE.
  std::mt19937_64 rng(test::seed(1));
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> ex(-20, 20);
  for (int i = 0; i < 10000; ++i) {
    const float amax = std::ldexp(mant(rng), ex(rng)), g = std::ldexp(mant(rng), ex(rng) / 2);
    const float want = (amax / 6.0f) / g;
    EXPECT_EQ(nvfp4::block_scale_e4m3(amax, g), fp8::float_to_e4m3(want, true));
  }
  EXPECT_EQ(nvfp4::block_scale_e4m3(0.0f, 1.0f), 0x00);                 // zero block
  EXPECT_EQ(nvfp4::block_scale_e4m3(6.0f * 1000.0f, 1.0f), 0x7e);       // saturated: 448
  EXPECT_EQ(nvfp4::block_scale_e4m3(INFINITY, 1.0f), 0x7e);             // saturated too
  EXPECT_EQ(nvfp4::block_scale_e4m3(NAN, 1.0f), fp8::kE4m3NaN);         // NaN block
  EXPECT_EQ(nvfp4::block_scale_e4m3(6.0f * 0x1p-8f, 1.0f), 0x02);       // subnormal: 2 * 2^-9
  EXPECT_EQ(nvfp4::block_scale_e4m3(6.0f * 0x1p-10f, 1.0f), 0x00);      // tie 0 / 2^-9: even 0
  EXPECT_EQ(nvfp4::block_scale_e4m3(6.0f * 1.0625f, 1.0f), 0x38);       // tie 1 / 1.125: even 1
  // A zero divisor quantizes every value to +0.
  EXPECT_EQ(nvfp4::quantize_e2m1(-3.0f, 0.0f), 0x0);
  EXPECT_EQ(nvfp4::quantize_e2m1(3.0f, nvfp4::block_divisor(0x00, 1.0f)), 0x0);
}

// ---- the public quantizer on hand-made blocks: [1, 32] bf16 = two blocks of 16 ----

struct Quantized {
  HostTensor q, scale, global, deq;
  uint8_t code(int i) const {
    const uint8_t b = q.data<uint8_t>()[i / 2];
    return i % 2 ? nvfp4::e2m1x2_second(b) : nvfp4::e2m1x2_first(b);
  }
  float value(int i) const { return deq.data<float>()[i]; }
};

Quantized quantize(const std::vector<float>& x, int64_t H, float static_global = 0.0f) {
  const int64_t T = static_cast<int64_t>(x.size()) / H;
  const HostTensor xb = test::host_values(x, {T, H}, DType::BF16);
  Quantized r;
  r.q.reset(DType::E2M1x2, {T, H / 2});
  r.scale.reset(DType::E4M3, {T, H / 16});
  r.global.reset(DType::F32, {1});
  r.deq.reset(DType::F32, {T, H});
  Nvfp4QuantizeOptions opt;
  if (static_global > 0.0f) {
    r.global.data<float>()[0] = static_global;
    opt.static_global_scale = true;
  }
  quantize_nvfp4(xb, r.q, r.scale, r.global, opt);
  dequantize_nvfp4(r.q, r.scale, r.global, r.deq);
  return r;
}

// Block 0 holds `block`, block 1 holds the tensor amax 2688 (so the dynamic global is 1).
std::vector<float> with_anchor(const std::vector<float>& block) {
  std::vector<float> x(block);
  for (int i = 0; i < 16; ++i) x.push_back(i == 3 ? 2688.0f : 1.0f);
  return x;
}

TEST(Nvfp4Quantize, ZeroBlock) {
  const Quantized r = quantize(with_anchor(std::vector<float>(16, 0.0f)), 32);
  EXPECT_EQ(r.global.data<float>()[0], 1.0f);
  EXPECT_EQ(r.scale.data<uint8_t>()[0], 0x00);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(r.code(i), 0x0) << i;
    EXPECT_EQ(bits(r.value(i)), 0u) << i;
  }
  // The anchor block: scale 448, its amax on 6.
  EXPECT_EQ(r.scale.data<uint8_t>()[1], 0x7e);
  EXPECT_EQ(r.code(16 + 3), 0x7);
  EXPECT_EQ(r.value(16 + 3), 2688.0f);
}

TEST(Nvfp4Quantize, AllZeroTensor) {
  const Quantized r = quantize(std::vector<float>(64, 0.0f), 32);
  EXPECT_EQ(r.global.data<float>()[0], 1e-10f / 2688.0f);
  for (int b = 0; b < 4; ++b) EXPECT_EQ(r.scale.data<uint8_t>()[b], 0x00);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(r.value(i), 0.0f);
}

TEST(Nvfp4Quantize, GridValuesRoundTripExactly) {
  // Block amax 12 with global 1: scale exactly 2, every value k * 2 for k on the e2m1 grid.
  std::vector<float> block;
  for (int i = 0; i < 16; ++i) block.push_back(2.0f * kE2m1[i]);
  const Quantized r = quantize(with_anchor(block), 32);
  EXPECT_EQ(r.scale.data<uint8_t>()[0], fp8::float_to_e4m3(2.0f, true));
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(r.code(i), i) << i;
    EXPECT_EQ(bits(r.value(i)), bits(block[i])) << i;
  }
}

TEST(Nvfp4Quantize, SubnormalBlockScales) {
  // Scale 2^-8 = e4m3 subnormal 0x02 (2 * 2^-9), and 3 * 2^-9 = 0x03; global 1. Values on the
  // grid round-trip exactly.
  for (const auto& [unit, code] :
       {std::pair{0x1p-8f, uint8_t{0x02}}, std::pair{3 * 0x1p-9f, uint8_t{0x03}}}) {
    std::vector<float> block;
    for (int i = 0; i < 16; ++i) block.push_back(unit * kE2m1[(i * 5) % 16]);
    block[0] = 6.0f * unit;
    const Quantized r = quantize(with_anchor(block), 32);
    EXPECT_EQ(r.scale.data<uint8_t>()[0], code) << unit;
    for (int i = 0; i < 16; ++i) EXPECT_EQ(r.value(i), block[i]) << unit << " element " << i;
  }
  // amax / 6 = 2^-10 is the midpoint of 0 and 2^-9: ties to the even code 0, and the whole block
  // quantizes to zero (documented loss: it sits 2^-19 below the tensor's largest scale).
  std::vector<float> tiny(16, 0x1p-12f);
  tiny[5] = 6.0f * 0x1p-10f;
  const Quantized r = quantize(with_anchor(tiny), 32);
  EXPECT_EQ(r.scale.data<uint8_t>()[0], 0x00);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(r.value(i), 0.0f) << i;
}

TEST(Nvfp4Quantize, SaturatedBlockScaleWithStaticGlobal) {
  // Static global 1 and a block of amax 10752: (10752 / 6) / 1 = 1792 > 448, the scale
  // saturates to 448, and the values past 6 * 448 saturate to 6.
  std::vector<float> x(32, 896.0f);
  x[0] = 10752.0f;
  x[1] = -10752.0f;
  x[2] = 2688.0f;
  const Quantized r = quantize(x, 32, 1.0f);
  EXPECT_EQ(r.global.data<float>()[0], 1.0f);  // static: only read
  EXPECT_EQ(r.scale.data<uint8_t>()[0], 0x7e);
  EXPECT_EQ(r.code(0), 0x7);
  EXPECT_EQ(r.code(1), 0xf);
  EXPECT_EQ(r.code(2), 0x7);
  EXPECT_EQ(r.value(0), 2688.0f);
  EXPECT_EQ(r.value(1), -2688.0f);
  EXPECT_EQ(r.code(3), 0x4);  // 896 / 448 = 2
  EXPECT_EQ(r.value(3), 896.0f);
  // Block 1 (amax 896) fits: scale 896 / 6 = 149.33 -> e4m3 144, 896 / 144 = 6.2 -> 6.
  EXPECT_EQ(r.scale.data<uint8_t>()[1], fp8::float_to_e4m3(896.0f / 6.0f, true));
}

TEST(Nvfp4Quantize, BlockScaleTieRoundsDownAndTheAmaxSaturates) {
  // amax / 6 = 1.0625, the midpoint of e4m3 1.0 and 1.125: the scale ties to 1.0, so the amax
  // element maps to 6.375 and saturates to 6 (error 0.375, inside the per-element bound).
  std::vector<float> block(16, 1.0f);
  block[7] = 6.375f;
  const Quantized r = quantize(with_anchor(block), 32);
  EXPECT_EQ(r.scale.data<uint8_t>()[0], 0x38);
  EXPECT_EQ(r.code(7), 0x7);
  EXPECT_EQ(r.value(7), 6.0f);
}

TEST(Nvfp4Quantize, NaNAndInf) {
  // Static global: a NaN makes its block's scale NaN (the block decodes to NaN, the other
  // block is untouched); an inf saturates its block (scale 448, the inf -> 6).
  std::vector<float> x(32, 1.0f);
  x[4] = NAN;
  x[20] = INFINITY;
  const Quantized r = quantize(x, 32, 1.0f);
  EXPECT_EQ(r.scale.data<uint8_t>()[0], fp8::kE4m3NaN);
  for (int i = 0; i < 16; ++i) EXPECT_TRUE(std::isnan(r.value(i))) << i;
  EXPECT_EQ(r.scale.data<uint8_t>()[1], 0x7e);
  EXPECT_EQ(r.code(20), 0x7);
  // Dynamic global: the NaN reaches the global scale and every value decodes to NaN.
  std::vector<float> y(32, 1.0f);
  y[9] = NAN;
  const Quantized d = quantize(y, 32);
  EXPECT_EQ(bits(d.global.data<float>()[0]), fp8::kCanonicalNaNBits);
  for (int i = 0; i < 32; ++i) EXPECT_TRUE(std::isnan(d.value(i))) << i;
}

// Random bf16 data whose 16-blocks differ in magnitude by 2^[-12, 3]: every e4m3 scale range is
// used, subnormal scales included.
std::vector<float> random_blocks(std::mt19937_64& rng, int64_t n) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-12, 3);
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t b = 0; b < n / 16; ++b) {
    const float f = std::ldexp(1.0f, ex(rng));
    for (int64_t i = b * 16; i < b * 16 + 16; ++i) x[i] = round_to_bf16(nd(rng) * f);
  }
  return x;
}

// Every code is the nearest e2m1 value to x / d (d = float(scale) * global), and
//   |x - x_hat| <= max(d, amax_block - 6 d)
// with x_hat the decoded value: inside [-6, 6] the e2m1 spacing is at most 2, so rounding moves
// a value by at most d; past 6 (when the e4m3 scale rounded down) the error is |x| - 6d.
TEST(Nvfp4Quantize, EveryCodeIsNearestAndWithinTheBound) {
  std::mt19937_64 rng(test::seed(2));
  const int64_t T = 64, H = 512;
  const std::vector<float> x = random_blocks(rng, T * H);
  const Quantized r = quantize(x, H);
  const float g = r.global.data<float>()[0];
  int64_t bad = 0;
  for (int64_t b = 0; b < T * H / 16; ++b) {
    const uint8_t sc = r.scale.data<uint8_t>()[b];
    const float d = nvfp4::block_divisor(sc, g);
    double amax = 0;
    for (int64_t i = b * 16; i < b * 16 + 16; ++i) amax = std::max(amax, std::fabs(double(x[i])));
    const double bound = std::max(double(d), amax - 6.0 * d) * (1 + 1e-6);
    for (int64_t i = b * 16; i < b * 16 + 16; ++i) {
      const int ii = static_cast<int>(i);
      const uint8_t want = d == 0.0f ? 0 : nearest_e2m1(x[i] / d);
      const double err = std::fabs(double(x[i]) - double(r.value(ii)));
      if ((r.code(ii) != want || err > bound) && ++bad <= 8) {
        ADD_FAILURE() << "element " << i << ": x = " << x[i] << ", d = " << d << ", code 0x"
                      << std::hex << int(r.code(ii)) << " (nearest 0x" << int(want) << std::dec
                      << "), error " << err << " > bound " << bound;
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

// Relative RMS error of a round trip on N(0, 1) blocks (global from the tensor amax).
// Derivation, in units of d = amax_block / 6: the amax of 16 normal values is about 2.0 sigma
// (the median of max|z| over 16 draws is 2.03), so y = x / d ~ N(0, 3^2). The e2m1 spacing is 0.5 on
// |y| < 2 (P = 0.50), 1 on [2, 4) (P = 0.32) and 2 on [4, 6] (P = 0.18); a rounding error
// uniform over a spacing s has variance s^2 / 12, so the error variance is
// (0.50 * 0.25 + 0.32 * 1 + 0.18 * 4) / 12 = 0.097 against a signal variance of 9:
// relative RMS sqrt(0.097 / 9) = 0.104. The e4m3 rounding of the scale moves d by up to
// 2^-4 either way and the amax element itself lands near 6, so the measured value sits a
// little below (0.09 to 0.10); the bound is the derivation plus 20%.
// NOTE: that is the e2m1 grid's own error (1 mantissa bit); NVFP4's scales only keep it from
// growing with the dynamic range of the data.
TEST(Nvfp4Quantize, QuantizerRoundTripError) {
  std::mt19937_64 rng(test::seed(3));
  const int64_t T = 128, H = 1024;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(T * H));
  for (float& v : x) v = round_to_bf16(nd(rng));
  const Quantized r = quantize(x, H);
  double num = 0, den = 0;
  for (int64_t i = 0; i < T * H; ++i) {
    const double e = double(x[i]) - r.value(static_cast<int>(i));
    num += e * e;
    den += double(x[i]) * x[i];
  }
  const double rel = std::sqrt(num / den);
  std::printf("[ rel_rms  ] NVFP4 round trip of N(0, 1): %.4f (derived 0.104)\n", rel);
  EXPECT_LT(rel, 0.125);
  EXPECT_GT(rel, 0.06);  // a lossless "quantizer" would be a bug too
}

TEST(Nvfp4Quantize, StaticGlobalEqualToDynamicGivesTheSameBytes) {
  std::mt19937_64 rng(test::seed(4));
  const std::vector<float> x = random_blocks(rng, 8 * 256);
  const Quantized dyn = quantize(x, 256);
  const Quantized sta = quantize(x, 256, dyn.global.data<float>()[0]);
  EXPECT_TRUE(test::bitwise_equal(dyn.q, sta.q));
  EXPECT_TRUE(test::bitwise_equal(dyn.scale, sta.scale));
}

TEST(Nvfp4Quantize, BatchedShapeAndBf16Dequantize) {
  std::mt19937_64 rng(test::seed(5));
  const std::vector<float> x = random_blocks(rng, 2 * 3 * 64);
  const Quantized flat = quantize(x, 64);
  const HostTensor xb = test::host_values(x, {2, 3, 64}, DType::BF16);
  HostTensor q(DType::E2M1x2, {2, 3, 32}), s(DType::E4M3, {2, 3, 4}), g(DType::F32, {1}),
      deq(DType::BF16, {2, 3, 64});
  quantize_nvfp4(xb, q, s, g);
  EXPECT_TRUE(test::bitwise_equal(q, flat.q));
  EXPECT_TRUE(test::bitwise_equal(s, flat.scale));
  EXPECT_EQ(g.data<float>()[0], flat.global.data<float>()[0]);
  dequantize_nvfp4(q, s, g, deq);
  for (int64_t i = 0; i < deq.numel(); ++i) {
    ASSERT_EQ(deq.data<uint16_t>()[i], float_to_bf16_bits(flat.value(static_cast<int>(i)))) << i;
  }
}

// ---- prepare_weights ----

struct Nvfp4Weights {
  int64_t E = 0, H = 0, I = 0, rows = 0;
  GateUpOrder order = GateUpOrder::GateUp;
  HostTensor w13, w2, s13, s2, g13, g2, b13, b2;

  ExpertWeights view(bool biases) const {
    ExpertWeights w;
    w.scheme = QuantScheme::Nvfp4;
    w.order = order;
    w.w13 = w13;
    w.w2 = w2;
    w.w13_scale = s13;
    w.w2_scale = s2;
    w.w13_global_scale = g13;
    w.w2_global_scale = g2;
    if (biases) {
      w.w13_bias = b13;
      w.w2_bias = b2;
    }
    return w;
  }
  // Destination tensors shaped like these, and an ExpertWeights over them.
  Nvfp4Weights like() const {
    Nvfp4Weights d;
    d.E = E, d.H = H, d.I = I, d.rows = rows, d.order = order;
    d.w13.reset(DType::E2M1x2, {E, rows, H / 2});
    d.w2.reset(DType::E2M1x2, {E, H, I / 2});
    d.s13.reset(DType::E4M3, {E, rows, H / 16});
    d.s2.reset(DType::E4M3, {E, H, I / 16});
    d.g13.reset(DType::F32, {E});
    d.g2.reset(DType::F32, {E});
    d.b13.reset(DType::F32, {E, rows});
    d.b2.reset(DType::F32, {E, H});
    for (HostTensor* t : {&d.w13, &d.w2, &d.s13, &d.s2, &d.g13, &d.g2, &d.b13, &d.b2}) {
      std::memset(t->view().data, 0xA5, t->nbytes());
    }
    return d;
  }
};

// Random NVFP4 weights, quantized one expert at a time with the public quantizer.
Nvfp4Weights make_weights(int64_t E, int64_t H, int64_t I, bool gated, GateUpOrder order,
                          uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  Nvfp4Weights w;
  w.E = E, w.H = H, w.I = I, w.rows = gated ? 2 * I : I, w.order = order;
  w = w.like();
  for (int64_t e = 0; e < E; ++e) {
    for (const auto& [q, s, g, R, K] :
         {std::tuple{&w.w13, &w.s13, &w.g13, w.rows, H}, std::tuple{&w.w2, &w.s2, &w.g2, H, I}}) {
      const HostTensor x = test::host_values(random_blocks(rng, R * K), {R, K}, DType::BF16);
      HostTensor gs(DType::F32, {1});
      quantize_nvfp4(x, q->view().select0(e), s->view().select0(e), gs);
      g->data<float>()[e] = gs.data<float>()[0];
    }
  }
  test::fill_normal(w.b13, rng, 0.05f);
  test::fill_normal(w.b2, rng, 0.05f);
  return w;
}

uint8_t code_at(const HostTensor& q, int64_t row, int64_t k, int64_t K) {
  const uint8_t b = q.data<uint8_t>()[(row * K + k) / 2];
  return k % 2 ? nvfp4::e2m1x2_second(b) : nvfp4::e2m1x2_first(b);
}

void expect_prepared_matches(const Nvfp4Weights& src, const Nvfp4Weights& dst,
                             const ExpertWeights& dw, bool biases) {
  const int64_t E = src.E, H = src.H, I = src.I, rows = src.rows;
  const bool gated = rows == 2 * I;
  const bool gate_first = src.order == GateUpOrder::GateUp;
  int64_t bad = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < I; ++i) {
      for (int half = 0; half < (gated ? 2 : 1); ++half) {
        const bool up = half == 1;
        // Canonical row of gate/up column i, and where the prepared layout says it is.
        const int64_t c_row = e * rows + (gated ? ((up == gate_first) ? I + i : i) : i);
        const int64_t p_row = e * rows + (up ? dw.up_row(i) : dw.gate_row(i));
        for (int64_t k = 0; k < H; ++k) {
          if (code_at(dst.w13, p_row, k, H) != code_at(src.w13, c_row, k, H) && ++bad <= 5) {
            ADD_FAILURE() << "w13 code: expert " << e << (up ? " up" : " gate") << " column " << i
                          << " k " << k;
          }
        }
        for (int64_t kb = 0; kb < H / 16; ++kb) {
          if (dst.s13.data<uint8_t>()[p_row * (H / 16) + kb] !=
                  src.s13.data<uint8_t>()[c_row * (H / 16) + kb] &&
              ++bad <= 5) {
            ADD_FAILURE() << "w13 scale: expert " << e << (up ? " up" : " gate") << " column "
                          << i << " block " << kb;
          }
        }
        if (biases && dst.b13.data<float>()[p_row] != src.b13.data<float>()[c_row] && ++bad <= 5) {
          ADD_FAILURE() << "w13 bias: expert " << e << " column " << i;
        }
      }
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_TRUE(test::bitwise_equal(dst.w2, src.w2));
  EXPECT_TRUE(test::bitwise_equal(dst.s2, src.s2));
  EXPECT_TRUE(test::bitwise_equal(dst.g13, src.g13));
  EXPECT_TRUE(test::bitwise_equal(dst.g2, src.g2));
  if (biases) EXPECT_TRUE(test::bitwise_equal(dst.b2, src.b2));
}

// The Blackwell 128x4 scale layout (nvfp4::scale_tile_offset, reference::tile_block_scales_128x4)
// against its definition as vLLM writes it for `weight_scale_interleaved`: pad to [R, C]
// (multiples of 128 and 4, zeros), view as [R / 128, 4, 32, C / 4, 4] and permute to
// [R / 128, C / 4, 32, 4, 4]. The offsets are a bijection onto the padded bytes; the padding is 0.
TEST(Nvfp4ScaleLayout, TiledLayoutIsThe128x4Permutation) {
  std::mt19937 rng(20261127);
  const int64_t shapes[][2] = {{1, 1}, {128, 4}, {130, 5}, {256, 180}, {300, 7}, {33, 448}};
  for (const auto& shape : shapes) {
    const int64_t rows = shape[0], cols = shape[1], ld = cols + 3;
    SCOPED_TRACE(testing::Message() << "rows " << rows << " cols " << cols);
    std::vector<uint8_t> linear(static_cast<size_t>(rows * ld));
    for (auto& b : linear) b = static_cast<uint8_t>(1 + rng() % 0x7e);  // never 0
    const int64_t pr = nvfp4::scale_tile_padded_rows(rows);
    const int64_t pc = nvfp4::scale_tile_padded_cols(cols);
    EXPECT_EQ(pr % 128, 0);
    EXPECT_EQ(pc % 4, 0);
    EXPECT_LT(pr - rows, 128);
    EXPECT_LT(pc - cols, 4);
    std::vector<uint8_t> expect(static_cast<size_t>(pr * pc), 0);
    const int64_t kt_count = pc / 4;
    for (int64_t mt = 0; mt < pr / 128; ++mt) {
      for (int64_t kt = 0; kt < kt_count; ++kt) {
        for (int64_t r0 = 0; r0 < 32; ++r0) {
          for (int64_t r1 = 0; r1 < 4; ++r1) {
            for (int64_t c0 = 0; c0 < 4; ++c0) {
              const int64_t r = mt * 128 + r1 * 32 + r0, c = kt * 4 + c0;
              const int64_t at = (((mt * kt_count + kt) * 32 + r0) * 4 + r1) * 4 + c0;
              expect[static_cast<size_t>(at)] = r < rows && c < cols ? linear[r * ld + c] : 0;
            }
          }
        }
      }
    }
    std::vector<uint8_t> tiled(expect.size(), 0xAB);  // poisoned: the padding must be written
    reference::tile_block_scales_128x4(linear.data(), rows, cols, ld, tiled.data());
    EXPECT_EQ(tiled, expect);
    std::vector<int> hits(expect.size(), 0);
    for (int64_t r = 0; r < pr; ++r) {
      for (int64_t c = 0; c < pc; ++c) {
        const int64_t at = nvfp4::scale_tile_offset(r, c, cols);
        ASSERT_GE(at, 0);
        ASSERT_LT(at, pr * pc);
        ++hits[static_cast<size_t>(at)];
      }
    }
    EXPECT_TRUE(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
  }
  // Spot values of the formula: row 33, column 6 of K / 16 = 8 columns is in tile (0, 1) at
  // (33 % 32) * 16 + (33 / 32) * 4 + 6 % 4 = 22; row 130 starts the second row band.
  static_assert(nvfp4::scale_tile_offset(33, 6, 8) == 512 + 22);
  static_assert(nvfp4::scale_tile_offset(130, 0, 8) == 2 * 512 + 2 * 16);
}

TEST(Nvfp4Prepare, InterleavedMatchesCanonicalElementByElement) {
  for (GateUpOrder order : {GateUpOrder::GateUp, GateUpOrder::UpGate}) {
    for (int g : {8, 16, 32, 64}) {
      for (bool biases : {false, true}) {
        SCOPED_TRACE(std::string(order == GateUpOrder::GateUp ? "GateUp" : "UpGate") + " G = " +
                     std::to_string(g) + (biases ? " biases" : ""));
        const Nvfp4Weights src = make_weights(3, 64, 64, true, order, 10 + g);
        Nvfp4Weights dst = src.like();
        ExpertWeights dw = dst.view(biases);
        PrepareWeightsOptions opt;
        opt.interleave_rows = g;
        prepare_weights(src.view(biases), dw, opt);
        EXPECT_EQ(dw.scheme, QuantScheme::Nvfp4);
        EXPECT_EQ(dw.layout, WeightLayout::GateUpInterleaved);
        EXPECT_EQ(dw.interleave_rows, g);
        EXPECT_EQ(dw.order, order);
        EXPECT_EQ(dw.intermediate(), 64);  // counted in values, not packed bytes
        expect_prepared_matches(src, dst, dw, biases);
      }
    }
  }
}

TEST(Nvfp4Prepare, CanonicalAndNonGatedAreCopies) {
  for (bool gated : {true, false}) {
    const Nvfp4Weights src = make_weights(2, 96, 64, gated, GateUpOrder::UpGate, 20);
    Nvfp4Weights dst = src.like();
    ExpertWeights dw = dst.view(true);
    PrepareWeightsOptions opt;
    opt.layout = gated ? WeightLayout::Canonical : WeightLayout::GateUpInterleaved;
    prepare_weights(src.view(true), dw, opt);
    EXPECT_EQ(dw.layout, WeightLayout::Canonical);
    using P = std::pair<const HostTensor*, const HostTensor*>;
    for (const auto& [a, b] : {P{&dst.w13, &src.w13}, P{&dst.s13, &src.s13},
                               P{&dst.b13, &src.b13}, P{&dst.w2, &src.w2}, P{&dst.s2, &src.s2}}) {
      EXPECT_TRUE(test::bitwise_equal(*a, *b)) << (gated ? "gated" : "non-gated");
    }
  }
}

// ---- bad arguments ----

class Nvfp4Bad : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937_64 rng(test::seed(30));
    x = test::host_values(random_blocks(rng, 24 * 64), {24, 64}, DType::BF16);
    q.reset(DType::E2M1x2, {24, 32});
    s.reset(DType::E4M3, {24, 4});
    g.reset(DType::F32, {1});
    src = make_weights(2, 64, 64, true, GateUpOrder::GateUp, 31);
    dst = src.like();
    dw = dst.view(false);
  }
  void quant(const Nvfp4QuantizeOptions& o = {}) { quantize_nvfp4(x, q, s, g, o); }
  void prepare(const ExpertWeights& w) { prepare_weights(w, dw, popt); }
  HostTensor x, q, s, g, extra;
  Nvfp4Weights src, dst;
  ExpertWeights dw;
  PrepareWeightsOptions popt;
};

TEST_F(Nvfp4Bad, ValidCallsPass) {
  EXPECT_NO_THROW(quant());
  EXPECT_NO_THROW(prepare(src.view(false)));
}

TEST_F(Nvfp4Bad, QuantizeHiddenNotMultipleOf32) {
  x.reset(DType::BF16, {24, 48});
  EXPECT_MODMOE_ERROR(quant(), "'hidden' = 48", "multiple of 32");
}

TEST_F(Nvfp4Bad, QuantizeWrongDtypes) {
  extra.reset(DType::U8, {24, 32});
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, extra, s, g), "'q' has dtype u8", "expected e2m1x2");
  extra.reset(DType::F32, {24, 4});
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, q, extra, g), "'scale' has dtype f32", "expected e4m3");
  extra.reset(DType::F32, {24, 64});
  EXPECT_MODMOE_ERROR(quantize_nvfp4(extra, q, s, g), "'x' has dtype f32", "expected bf16");
}

TEST_F(Nvfp4Bad, QuantizeScaleTransposed) {
  extra.reset(DType::E4M3, {4, 24});
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, q, extra, g), "'scale' has shape [4, 24]",
                      "[T, H/16] (one e4m3 scale per 16 values, token-major) = [24, 4]");
}

TEST_F(Nvfp4Bad, QuantizeUnpackedQ) {
  extra.reset(DType::E2M1x2, {24, 64});
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, extra, s, g), "'q' has shape [24, 64]", "= [24, 32]");
}

TEST_F(Nvfp4Bad, QuantizeGlobalScale) {
  extra.reset(DType::F32, {2});
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, q, s, extra), "'global_scale' has shape [2]", "[1]");
  Nvfp4QuantizeOptions o;
  o.static_global_scale = true;
  g.data<float>()[0] = 0.0f;
  EXPECT_MODMOE_ERROR(quant(o), "'global_scale'[0] = 0", "finite positive");
  g.data<float>()[0] = NAN;
  EXPECT_MODMOE_ERROR(quant(o), "'global_scale'[0] = nan", "finite positive");
}

TEST_F(Nvfp4Bad, QuantizeOverlap) {
  EXPECT_MODMOE_ERROR(quantize_nvfp4(x, q, s, make_view(s.view().data, DType::F32, {1})),
                      "'global_scale' overlaps 'scale'");
}

// CUDA tensors: the GPU twins (src/cuda/quant/nvfp4.cu) are tested bit for bit against these
// functions in tests/gpu/test_gpu_nvfp4_experts.cpp; a CPU-only build says it has no CUDA
// backend, after the argument checks and before anything dereferences the views.
TEST_F(Nvfp4Bad, CudaTensorsNeedTheCudaBackend) {
#ifdef MODMOE_WITH_CUDA
  GTEST_SKIP() << "CUDA build: the GPU path runs (tests/gpu/test_gpu_nvfp4_experts.cpp)";
#endif
  const Device dev = Device::cuda(0);
  const TensorView cx = make_view(x.view().data, DType::BF16, {24, 64}, dev);
  const TensorView cq = make_view(q.view().data, DType::E2M1x2, {24, 32}, dev);
  const TensorView cs = make_view(s.view().data, DType::E4M3, {24, 4}, dev);
  const TensorView cg = make_view(g.view().data, DType::F32, {1}, dev);
  EXPECT_MODMOE_ERROR(quantize_nvfp4(cx, cq, cs, cg), "quantize_nvfp4: the tensors are on cuda:0",
                      "no CUDA backend");
  extra.reset(DType::F32, {24, 64});
  EXPECT_MODMOE_ERROR(
      dequantize_nvfp4(cq, cs, cg, make_view(extra.view().data, DType::F32, {24, 64}, dev)),
      "dequantize_nvfp4: the tensors are on cuda:0", "no CUDA backend");
}

TEST_F(Nvfp4Bad, DequantizeOutShape) {
  extra.reset(DType::F32, {24, 32});
  EXPECT_MODMOE_ERROR(dequantize_nvfp4(q, s, g, extra), "'out' has shape [24, 32]", "= [24, 64]");
}

TEST_F(Nvfp4Bad, PrepareWeightDtype) {
  ExpertWeights w = src.view(false);
  extra.reset(DType::E4M3, {2, 64, 64});
  w.w2 = extra;
  EXPECT_MODMOE_ERROR(prepare(w), "'src.w2' has dtype e4m3", "expected e2m1x2");
}

TEST_F(Nvfp4Bad, PrepareKNotMultipleOf32) {
  ExpertWeights w = src.view(false);
  extra.reset(DType::E2M1x2, {2, 48, 32});
  w.w2 = extra;
  EXPECT_MODMOE_ERROR(prepare(w), "'hidden' = 48 (src.w2.size(1))", "multiple of 32");
  extra.reset(DType::E2M1x2, {2, 64, 8});
  w.w2 = extra;
  EXPECT_MODMOE_ERROR(prepare(w), "'intermediate' = 16 (2 * src.w2.size(2))", "multiple of 32");
}

TEST_F(Nvfp4Bad, PrepareScaleShapes) {
  ExpertWeights w = src.view(false);
  extra.reset(DType::E4M3, {2, 128, 2});  // one scale per 32: the MXFP4 block
  w.w13_scale = extra;
  EXPECT_MODMOE_ERROR(prepare(w), "'src.w13_scale' has shape [2, 128, 2]",
                      "[E_local, w13 rows, H/16]", "= [2, 128, 4]");
  w = src.view(false);
  extra.reset(DType::F32, {2, 64, 4});
  w.w2_scale = extra;
  EXPECT_MODMOE_ERROR(prepare(w), "'src.w2_scale' has dtype f32", "expected e4m3");
}

TEST_F(Nvfp4Bad, PrepareGlobalScales) {
  ExpertWeights w = src.view(false);
  w.w13_global_scale = {};
  EXPECT_MODMOE_ERROR(prepare(w), "'src.w13_global_scale' is missing");
  w = src.view(false);
  extra.reset(DType::F32, {2, 2});  // separate w1 / w3 scales
  w.w13_global_scale = extra;
  EXPECT_MODMOE_ERROR(prepare(w), "'src.w13_global_scale' has shape [2, 2]",
                      "one fp32 dequantization scale per expert; gate and up share it");
  w = src.view(false);
  src.g2.data<float>()[1] = -1.0f;
  EXPECT_MODMOE_ERROR(prepare(w), "'src.w2_global_scale'[1] = -1", "finite positive");
}

TEST_F(Nvfp4Bad, PrepareInterleaveAndDestination) {
  popt.interleave_rows = 12;
  EXPECT_MODMOE_ERROR(prepare(src.view(false)), "'options.interleave_rows' = 12",
                      "divides intermediate = 64");
  popt.interleave_rows = 8;
  dw.w13_scale = {};
  EXPECT_MODMOE_ERROR(prepare(src.view(false)), "'dst.w13_scale' is missing");
  dw = dst.view(false);
  dw.w2_global_scale = src.g2;
  EXPECT_MODMOE_ERROR(prepare(src.view(false)), "'dst.w2_global_scale' overlaps");
}

TEST_F(Nvfp4Bad, PrepareOnCudaNeedsTheCudaBackend) {
#ifdef MODMOE_WITH_CUDA
  GTEST_SKIP() << "CUDA build: the GPU path runs (tests/gpu/test_gpu_nvfp4_experts.cpp)";
#endif
  const Device dev = Device::cuda(0);
  ExpertWeights w = src.view(false), d = dw;
  for (TensorView* t : {&w.w13, &w.w2, &w.w13_scale, &w.w2_scale, &w.w13_global_scale,
                        &w.w2_global_scale, &d.w13, &d.w2, &d.w13_scale, &d.w2_scale,
                        &d.w13_global_scale, &d.w2_global_scale}) {
    t->device = dev;
  }
  EXPECT_MODMOE_ERROR(prepare_weights(w, d, popt), "prepare_weights: the tensors are on cuda:0",
                      "no CUDA backend");
}

}  // namespace
}  // namespace modmoe
