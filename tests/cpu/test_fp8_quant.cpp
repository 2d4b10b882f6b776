// FP8 quantization through the public API on the CPU (docs/fp8.md): quantize_activations
// (Fp8Block128 and Fp8PerTensor, dynamic and static) against independent properties,
// dequantize_activations, prepare_weights for FP8 weights checked element by element through
// the layout accessors against the canonical tensors, and bad inputs with their messages.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "core/fp8.h"
#include "modmoe/modmoe.h"

namespace modmoe {
namespace {


constexpr int64_t kB = kFp8BlockSize;

float bf16(const HostTensor& t, int64_t i) { return bf16_bits_to_float(t.data<uint16_t>()[i]); }

// bf16 activations [rows, H] whose 1x128 groups span 2^-12 .. 2^12 in magnitude (so a scale
// taken from the wrong group shows), never zero.
HostTensor make_activations(std::vector<int64_t> shape, uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  HostTensor x(DType::BF16, shape);
  test::fill_normal(x, rng, 1.0f);
  std::uniform_int_distribution<int> exp_dist(-12, 12);
  for (int64_t g = 0; g < x.numel() / kB; ++g) {
    const float f = std::ldexp(1.0f, exp_dist(rng));
    for (int64_t i = g * kB; i < (g + 1) * kB; ++i) {
      x.data<uint16_t>()[i] = float_to_bf16_bits(bf16(x, i) * f);
    }
  }
  return x;
}

std::vector<int64_t> scale_shape(const HostTensor& x, QuantScheme scheme) {
  if (scheme == QuantScheme::Fp8PerTensor) return {1};
  std::vector<int64_t> s(x.view().shape.begin(), x.view().shape.begin() + x.view().ndim);
  s.back() /= kB;
  return s;
}

// Checks q / scale of one group (or the whole tensor) against the definition:
// s = max(amax, 1e-10) / 448 in fp32; q = the e4m3 code nearest x / s (ties even, satfinite),
// which also means |x - float(q) * s| <= half an e4m3 ulp of x / s, times s.
void expect_group(const HostTensor& x, const HostTensor& q, int64_t begin, int64_t end, float s,
                  bool dynamic) {
  if (dynamic) {
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(bf16(x, i)));
    ASSERT_EQ(s, std::max(amax, 1e-10f) / 448.0f) << "group at element " << begin;
  }
  for (int64_t i = begin; i < end; ++i) {
    const float v = bf16(x, i) / s;
    const uint8_t code = q.data<uint8_t>()[i];
    ASSERT_EQ(code, fp8::float_to_e4m3(v, true)) << "element " << i;
    const float back = fp8::e4m3_to_float(code);
    const float av = std::min(std::fabs(v), 448.0f);
    // Half an ulp: 2^(floor(log2 av) - 4) for normals, 2^-10 for subnormals.
    const float half_ulp =
        av < std::ldexp(1.0f, -6) ? std::ldexp(1.0f, -10) : std::ldexp(1.0f, std::ilogb(av) - 4);
    ASSERT_LE(std::fabs(back - (std::fabs(v) > 448.0f ? std::copysign(448.0f, v) : v)), half_ulp)
        << "element " << i;
  }
}

class Fp8Activations : public ::testing::TestWithParam<std::vector<int64_t>> {};

TEST_P(Fp8Activations, Block128MatchesDefinition) {
  const HostTensor x = make_activations(GetParam(), 801);
  HostTensor q(DType::E4M3, GetParam()), s(DType::F32, scale_shape(x, QuantScheme::Fp8Block128));
  std::memset(q.view().data, 0xAB, q.nbytes());
  quantize_activations(x, QuantScheme::Fp8Block128, q, s);
  for (int64_t g = 0; g < x.numel() / kB; ++g) {
    expect_group(x, q, g * kB, (g + 1) * kB, s.data<float>()[g], true);
    // The group's largest |x| is exactly +-448.
    int64_t arg = g * kB;
    for (int64_t i = g * kB; i < (g + 1) * kB; ++i) {
      if (std::fabs(bf16(x, i)) > std::fabs(bf16(x, arg))) arg = i;
    }
    ASSERT_EQ(q.data<uint8_t>()[arg] & 0x7f, 0x7e) << "group " << g;
  }
}

TEST_P(Fp8Activations, PerTensorDynamicAndStatic) {
  const HostTensor x = make_activations(GetParam(), 802);
  HostTensor q(DType::E4M3, GetParam()), s(DType::F32, {1});
  s.data<float>()[0] = NAN;  // written by the dynamic call
  quantize_activations(x, QuantScheme::Fp8PerTensor, q, s);
  expect_group(x, q, 0, x.numel(), s.data<float>()[0], true);

  // Static: the caller's scale, only read; values past 448 * s saturate.
  QuantizeOptions opt;
  opt.static_scale = true;
  s.data<float>()[0] = 0.0625f;
  quantize_activations(x, QuantScheme::Fp8PerTensor, q, s, opt);
  EXPECT_EQ(s.data<float>()[0], 0.0625f);
  expect_group(x, q, 0, x.numel(), 0.0625f, false);
}

TEST_P(Fp8Activations, DequantizeIsDecodeTimesScale) {
  const HostTensor x = make_activations(GetParam(), 803);
  for (QuantScheme scheme : {QuantScheme::Fp8Block128, QuantScheme::Fp8PerTensor}) {
    HostTensor q(DType::E4M3, GetParam()), s(DType::F32, scale_shape(x, scheme));
    quantize_activations(x, scheme, q, s);
    HostTensor f32(DType::F32, GetParam()), b16(DType::BF16, GetParam());
    dequantize_activations(q, scheme, s, f32);
    dequantize_activations(q, scheme, s, b16);
    const bool block = scheme == QuantScheme::Fp8Block128;
    for (int64_t i = 0; i < x.numel(); ++i) {
      const float want =
          fp8::e4m3_to_float(q.data<uint8_t>()[i]) * s.data<float>()[block ? i / kB : 0];
      ASSERT_EQ(f32.data<float>()[i], want) << i;
      ASSERT_EQ(b16.data<uint16_t>()[i], float_to_bf16_bits(want)) << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, Fp8Activations,
                         ::testing::Values(std::vector<int64_t>{1, 128},
                                           std::vector<int64_t>{7, 384},
                                           std::vector<int64_t>{33, 1024},
                                           std::vector<int64_t>{3, 5, 256}),  // batched
                         [](const auto& info) {
                           std::string n;
                           for (int64_t d : info.param)
                             n += (n.empty() ? "" : "x") + std::to_string(d);
                           return n;
                         });

TEST(Fp8ActivationsEdge, ZeroGroupsNaNAndInf) {
  HostTensor x(DType::BF16, {2, 256});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<uint16_t>()[i] = float_to_bf16_bits(0.5f);
  for (int64_t i = 0; i < kB; ++i) x.data<uint16_t>()[i] = (i % 2) ? 0x8000 : 0x0000;  // +-0
  x.data<uint16_t>()[kB + 5] = 0x7fc1;                                              // NaN
  x.data<uint16_t>()[2 * kB + 9] = float_to_bf16_bits(-INFINITY);
  HostTensor q(DType::E4M3, {2, 256}), s(DType::F32, {2, 2});
  quantize_activations(x, QuantScheme::Fp8Block128, q, s);
  // All-zero group: the floored scale, signed zeros kept.
  EXPECT_EQ(s.data<float>()[0], 1e-10f / 448.0f);
  for (int64_t i = 0; i < kB; ++i) EXPECT_EQ(q.data<uint8_t>()[i], (i % 2) ? 0x80 : 0x00) << i;
  // NaN group: canonical NaN scale, every element NaN (x / NaN).
  uint32_t sb;
  std::memcpy(&sb, s.data<float>() + 1, 4);
  EXPECT_EQ(sb, fp8::kCanonicalNaNBits);
  for (int64_t i = kB; i < 2 * kB; ++i) EXPECT_EQ(q.data<uint8_t>()[i], 0x7f) << i;
  // inf group: scale inf, finite elements -> +-0, the inf itself inf / inf = NaN.
  EXPECT_TRUE(std::isinf(s.data<float>()[2]));
  EXPECT_EQ(q.data<uint8_t>()[2 * kB], 0x00);
  EXPECT_EQ(q.data<uint8_t>()[2 * kB + 9], 0x7f);
  // Untouched group.
  EXPECT_EQ(s.data<float>()[3], 0.5f / 448.0f);
  EXPECT_EQ(q.data<uint8_t>()[3 * kB], 0x7e);

  // Per tensor: one NaN poisons everything, visibly.
  HostTensor s1(DType::F32, {1});
  quantize_activations(x, QuantScheme::Fp8PerTensor, q, s1);
  std::memcpy(&sb, s1.data<float>(), 4);
  EXPECT_EQ(sb, fp8::kCanonicalNaNBits);
  // No rows: the dynamic scale is the floor's.
  HostTensor x0(DType::BF16, {0, 128}), q0(DType::E4M3, {0, 128});
  quantize_activations(x0, QuantScheme::Fp8PerTensor, q0, s1);
  EXPECT_EQ(s1.data<float>()[0], 1e-10f / 448.0f);
}

// ---------------------------------------------------------------------------------------
// prepare_weights with FP8 weights
// ---------------------------------------------------------------------------------------

struct WCase {
  QuantScheme scheme;
  GateUpOrder order;
  int interleave_rows;  // 0: Canonical layout
  bool gated;
  bool biases;
};

std::string wcase_name(const WCase& c) {
  return std::string(c.scheme == QuantScheme::Fp8Block128 ? "Block" : "Tensor") +
         (c.order == GateUpOrder::GateUp ? "_GateUp" : "_UpGate") +
         (c.interleave_rows ? "_G" + std::to_string(c.interleave_rows) : "_canonical") +
         (c.gated ? "" : "_relu2") + (c.biases ? "_bias" : "");
}

void PrintTo(const WCase& c, std::ostream* os) { *os << wcase_name(c); }

// Canonical FP8 weights: random e4m3 codes (no NaN) and positive scales, all distinct.
struct Fp8Weights {
  HostTensor w13, w2, s13, s2, b13, b2;
  ExpertWeights view(QuantScheme scheme, GateUpOrder order) const {
    ExpertWeights w;
    w.scheme = scheme;
    w.order = order;
    w.w13 = w13;
    w.w2 = w2;
    w.w13_scale = s13;
    w.w2_scale = s2;
    if (b13.view().defined()) w.w13_bias = b13;
    if (b2.view().defined()) w.w2_bias = b2;
    return w;
  }
};

Fp8Weights make_fp8_weights(const WCase& c, int64_t E, int64_t H, int64_t I, bool fill,
                            std::mt19937_64& rng) {
  Fp8Weights w;
  const int64_t rows = c.gated ? 2 * I : I;
  w.w13.reset(DType::E4M3, {E, rows, H});
  w.w2.reset(DType::E4M3, {E, H, I});
  if (c.scheme == QuantScheme::Fp8Block128) {
    w.s13.reset(DType::F32, {E, rows / kB, H / kB});
    w.s2.reset(DType::F32, {E, H / kB, I / kB});
  } else {
    w.s13.reset(DType::F32, {E});
    w.s2.reset(DType::F32, {E});
  }
  if (c.biases) {
    w.b13.reset(DType::F32, {E, rows});
    w.b2.reset(DType::F32, {E, H});
  }
  if (!fill) return w;
  std::uniform_int_distribution<int> code(0, 255);
  for (HostTensor* t : {&w.w13, &w.w2}) {
    for (int64_t i = 0; i < t->numel(); ++i) {
      int v = code(rng);
      if ((v & 0x7f) == 0x7f) v = 0x11;
      t->data<uint8_t>()[i] = static_cast<uint8_t>(v);
    }
  }
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  for (HostTensor* t : {&w.s13, &w.s2, &w.b13, &w.b2}) {
    for (int64_t i = 0; i < t->numel(); ++i) t->data<float>()[i] = u(rng) * (1 + i % 7);
  }
  return w;
}

// The dequantized value of element (row, k) of expert e's w13, read through the layout.
float w13_value(const ExpertWeights& w, int64_t e, int64_t row, int64_t k) {
  const int64_t rows = w.w13.size(1), H = w.w13.size(2);
  const float q = fp8::e4m3_to_float(w.w13.ptr<const uint8_t>()[(e * rows + row) * H + k]);
  const float* s = w.w13_scale.ptr<const float>();
  if (w.scheme == QuantScheme::Fp8PerTensor) return q * s[e];
  return q * s[(e * (rows / kB) + w13_scale_row_block(w, row)) * (H / kB) + k / kB];
}

class Fp8Prepare : public ::testing::TestWithParam<WCase> {};

TEST_P(Fp8Prepare, EveryElementKeepsItsValue) {
  const WCase c = GetParam();
  const int64_t E = 3, H = 256, I = 384;
  std::mt19937_64 rng(test::seed(810 + c.interleave_rows));
  const Fp8Weights src = make_fp8_weights(c, E, H, I, true, rng);
  Fp8Weights dstw = make_fp8_weights(c, E, H, I, false, rng);
  const ExpertWeights s = src.view(c.scheme, c.order);
  ExpertWeights d = dstw.view(c.scheme, c.order);
  for (HostTensor* t : {&dstw.w13, &dstw.w2, &dstw.s13, &dstw.s2, &dstw.b13, &dstw.b2}) {
    if (t->nbytes()) std::memset(t->view().data, 0xFF, t->nbytes());
  }
  PrepareWeightsOptions opt;
  opt.layout = c.interleave_rows ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
  opt.interleave_rows = c.interleave_rows ? c.interleave_rows : 8;
  prepare_weights(s, d, opt);

  const bool interleaved = c.gated && c.interleave_rows;
  EXPECT_EQ(d.scheme, c.scheme);
  EXPECT_EQ(d.order, c.order);
  EXPECT_EQ(d.layout, interleaved ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical);
  EXPECT_EQ(d.interleave_rows, interleaved ? c.interleave_rows : 0);
  EXPECT_TRUE(test::bitwise_equal(dstw.w2, src.w2));
  EXPECT_TRUE(test::bitwise_equal(dstw.s2, src.s2));
  if (c.biases) EXPECT_TRUE(test::bitwise_equal(dstw.b2, src.b2));

  // Gate (and up) row i of the prepared weights dequantizes to the canonical row i, element
  // by element: this checks the row interleave and the scale permutation together.
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < I; ++i) {
      const int64_t rows_src[2] = {c.gated ? s.gate_row(i) : i, c.gated ? s.up_row(i) : i};
      const int64_t rows_dst[2] = {c.gated ? d.gate_row(i) : i, c.gated ? d.up_row(i) : i};
      for (int half = 0; half < (c.gated ? 2 : 1); ++half) {
        for (int64_t k = 0; k < H; ++k) {
          ASSERT_EQ(w13_value(d, e, rows_dst[half], k), w13_value(s, e, rows_src[half], k))
              << "expert " << e << (half ? " up" : " gate") << " column " << i << " k " << k;
        }
        if (c.biases) {
          const int64_t rows = dstw.b13.view().shape[1];
          ASSERT_EQ(dstw.b13.data<float>()[e * rows + rows_dst[half]],
                    src.b13.data<float>()[e * rows + rows_src[half]]);
        }
      }
    }
  }
}

constexpr auto kBlk = QuantScheme::Fp8Block128;
constexpr auto kTen = QuantScheme::Fp8PerTensor;
constexpr auto kGU = GateUpOrder::GateUp;
constexpr auto kUG = GateUpOrder::UpGate;

INSTANTIATE_TEST_SUITE_P(
    Layouts, Fp8Prepare,
    ::testing::Values(WCase{kBlk, kGU, 8, true, false}, WCase{kBlk, kUG, 8, true, true},
                      WCase{kBlk, kGU, 16, true, false}, WCase{kBlk, kUG, 64, true, false},
                      WCase{kBlk, kUG, 128, true, true}, WCase{kBlk, kGU, 0, true, false},
                      WCase{kBlk, kGU, 8, false, true}, WCase{kTen, kGU, 8, true, true},
                      WCase{kTen, kUG, 32, true, false}, WCase{kTen, kUG, 0, true, false}),
    [](const auto& info) { return wcase_name(info.param); });

TEST(Fp8Prepare, ScaleRowBlockFormula) {
  ExpertWeights w;
  HostTensor w13(DType::E4M3, {1, 512, 128}), w2(DType::E4M3, {1, 128, 256});
  w.w13 = w13;
  w.w2 = w2;
  w.layout = WeightLayout::GateUpInterleaved;
  w.interleave_rows = 8;
  // Rows 0-7 gate 0-7 (gate block 0 -> block row 0), 8-15 up 0-7 (up block 0 -> 1), ...,
  // rows 256-263 gate 128-135 (gate block 1 -> 2), 264-271 up 128-135 (-> 3).
  EXPECT_EQ(w13_scale_row_block(w, 0), 0);
  EXPECT_EQ(w13_scale_row_block(w, 8), 1);
  EXPECT_EQ(w13_scale_row_block(w, 255), 1);
  EXPECT_EQ(w13_scale_row_block(w, 256), 2);
  EXPECT_EQ(w13_scale_row_block(w, 271), 3);
  w.interleave_rows = 128;
  EXPECT_EQ(w13_scale_row_block(w, 127), 0);
  EXPECT_EQ(w13_scale_row_block(w, 128), 1);
  EXPECT_EQ(w13_scale_row_block(w, 300), 2);
  w.layout = WeightLayout::Canonical;
  EXPECT_EQ(w13_scale_row_block(w, 300), 2);
  EXPECT_MODMOE_ERROR(w13_scale_row_block(w, 512), "'row' = 512");
  w.layout = WeightLayout::GateUpInterleaved;
  w.interleave_rows = 24;
  EXPECT_MODMOE_ERROR(w13_scale_row_block(w, 3), "'weights.interleave_rows' = 24");
}

// ---------------------------------------------------------------------------------------
// Bad inputs
// ---------------------------------------------------------------------------------------

class Fp8BadInputs : public ::testing::Test {
 protected:
  void SetUp() override {
    x = make_activations({4, 256}, 820);
    q.reset(DType::E4M3, {4, 256});
    s.reset(DType::F32, {4, 2});
    s1.reset(DType::F32, {1});
    std::mt19937_64 rng(test::seed(821));
    const WCase c{kBlk, kGU, 8, true, false};
    src = make_fp8_weights(c, 2, 256, 128, true, rng);
    dst = make_fp8_weights(c, 2, 256, 128, false, rng);
    sv = src.view(kBlk, kGU);
    dv = dst.view(kBlk, kGU);
  }
  void quantize(QuantScheme scheme = kBlk) { quantize_activations(x, scheme, q, s); }
  void prepare() { prepare_weights(sv, dv, opt); }

  HostTensor x, q, s, s1, extra;
  Fp8Weights src, dst;
  ExpertWeights sv, dv;
  PrepareWeightsOptions opt;
};

TEST_F(Fp8BadInputs, ValidCallsPass) {
  EXPECT_NO_THROW(quantize());
  EXPECT_NO_THROW(prepare());
}

TEST_F(Fp8BadInputs, ActivationDtype) {
  extra.reset(DType::F32, {4, 256});
  EXPECT_MODMOE_ERROR(quantize_activations(extra, kBlk, q, s), "'x'", "f32", "expected bf16");
}

TEST_F(Fp8BadInputs, QuantizedDtype) {
  extra.reset(DType::BF16, {4, 256});
  EXPECT_MODMOE_ERROR(quantize_activations(x, kBlk, extra, s), "'q'", "expected e4m3");
}

TEST_F(Fp8BadInputs, HiddenNotMultipleOf128) {
  HostTensor xs(DType::BF16, {4, 192}), qs(DType::E4M3, {4, 192});
  EXPECT_MODMOE_ERROR(quantize_activations(xs, kBlk, qs, s), "'x'", "[4, 192]", "multiple of 128");
}

TEST_F(Fp8BadInputs, QuantizedShape) {
  extra.reset(DType::E4M3, {4, 128});
  EXPECT_MODMOE_ERROR(quantize_activations(x, kBlk, extra, s), "'q' has shape [4, 128]",
                      "expected [4, 256]");
}

TEST_F(Fp8BadInputs, BlockScaleShape) {
  extra.reset(DType::F32, {2, 4});  // transposed [H/128, T]
  EXPECT_MODMOE_ERROR(quantize_activations(x, kBlk, q, extra), "'scale' has shape [2, 4]",
                      "[T, H/128] = [4, 2]", "token-major");
}

TEST_F(Fp8BadInputs, PerTensorScaleShape) {
  EXPECT_MODMOE_ERROR(quantize_activations(x, kTen, q, s), "'scale' has shape [4, 2]",
                      "expected [1]");
}

TEST_F(Fp8BadInputs, ScaleDtype) {
  extra.reset(DType::BF16, {4, 2});
  EXPECT_MODMOE_ERROR(quantize_activations(x, kBlk, q, extra), "'scale'", "expected f32");
}

TEST_F(Fp8BadInputs, SchemeNone) {
  EXPECT_MODMOE_ERROR(quantize(QuantScheme::None), "'scheme' = none",
                      "expected Fp8PerTensor (fp8-tensor) or Fp8Block128");
}

TEST_F(Fp8BadInputs, SchemeNotImplemented) {
  EXPECT_MODMOE_ERROR(quantize(QuantScheme::Mxfp8), "not supported yet", "mxfp8");
}

TEST_F(Fp8BadInputs, StaticScaleWithBlocks) {
  QuantizeOptions o;
  o.static_scale = true;
  EXPECT_MODMOE_ERROR(quantize_activations(x, kBlk, q, s, o), "'options.static_scale' = true",
                      "fp8-block");
}

TEST_F(Fp8BadInputs, StaticScaleValue) {
  QuantizeOptions o;
  o.static_scale = true;
  s1.data<float>()[0] = 0.0f;
  EXPECT_MODMOE_ERROR(quantize_activations(x, kTen, q, s1, o), "'scale'[0] = 0",
                      "finite positive");
}

TEST_F(Fp8BadInputs, OverlappingOutput) {
  const TensorView alias = make_view(x.view().data, DType::E4M3, {4, 256});
  EXPECT_MODMOE_ERROR(quantize_activations(x, kBlk, alias, s), "'q' overlaps 'x'");
}

TEST_F(Fp8BadInputs, DequantizeOutDtype) {
  extra.reset(DType::I32, {4, 256});
  EXPECT_MODMOE_ERROR(dequantize_activations(q, kBlk, s, extra), "'out'", "expected f32 or bf16");
}

TEST_F(Fp8BadInputs, WeightsDtype) {
  extra.reset(DType::BF16, {2, 256, 256});
  sv.w13 = extra;
  EXPECT_MODMOE_ERROR(prepare(), "'src.w13'", "bf16", "expected e4m3");
}

TEST_F(Fp8BadInputs, WeightScaleRows) {
  extra.reset(DType::F32, {2, 3, 2});
  sv.w13_scale = extra;
  EXPECT_MODMOE_ERROR(prepare(), "'src.w13_scale' has shape [2, 3, 2]", "expected [2, 2, 2]");
}

TEST_F(Fp8BadInputs, PerTensorWeightScaleShape) {
  sv.scheme = kTen;
  EXPECT_MODMOE_ERROR(prepare(), "'src.w13_scale' has shape [2, 2, 2]", "expected [2]");
}

TEST_F(Fp8BadInputs, WeightScaleMissing) {
  sv.w2_scale = {};
  EXPECT_MODMOE_ERROR(prepare(), "'src.w2_scale' is missing");
}

TEST_F(Fp8BadInputs, DestinationScaleMissing) {
  dv.w13_scale = {};
  EXPECT_MODMOE_ERROR(prepare(), "'dst.w13_scale' is missing");
}

TEST_F(Fp8BadInputs, InterleaveCrossesScaleBlock) {
  opt.interleave_rows = 256;
  EXPECT_MODMOE_ERROR(prepare(), "'options.interleave_rows' = 256", "divides the 128-row");
  opt.interleave_rows = 24;
  EXPECT_MODMOE_ERROR(prepare(), "'options.interleave_rows' = 24");
}

TEST_F(Fp8BadInputs, IntermediateNotMultipleOf128) {
  std::mt19937_64 rng(test::seed(822));
  Fp8Weights w = make_fp8_weights(WCase{kTen, kGU, 8, true, false}, 2, 256, 64, true, rng);
  Fp8Weights d = make_fp8_weights(WCase{kTen, kGU, 8, true, false}, 2, 256, 64, false, rng);
  ExpertWeights ws = w.view(kTen, kGU), wd = d.view(kTen, kGU);
  EXPECT_MODMOE_ERROR(prepare_weights(ws, wd, opt), "'intermediate' = 64", "multiple of 128");
}

TEST_F(Fp8BadInputs, GlobalScaleGiven) {
  sv.w13_global_scale = s1;
  EXPECT_MODMOE_ERROR(prepare(), "'src.w13_global_scale'", "NVFP4");
}

}  // namespace
}  // namespace modmoe
