// The FP8 quantization pieces of "quantize before dispatch" on the GPU against the CPU
// reference, bit for bit (docs/fp8.md): a dynamic per-tensor scale written once per row
// ([T], the all-to-all payload form; its graph capture is in test_gpu_quant), dequantize with one scale
// per row, and quantize_weights (one scale per expert, or per 128x128 block) up to DeepSeek-V3
// sizes, with NaN, inf and all-zero blocks. NVFP4 (docs/nvfp4.md, "Quantize before dispatch"):
// quantize_nvfp4 with one global per row (each row its own dynamic global, or the caller's per
// row), and dequantize_nvfp4 with each row's global, the receiver's step, against the CPU bit
// for bit, eager and captured in a graph. Outputs poisoned before each run; two runs each.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "gpu_test_util.h"
#include "quant_inputs.h"
#include "modmoe/modmoe.h"

namespace modmoe {
namespace {

constexpr int64_t kB = kFp8BlockSize;
constexpr auto kBlk = QuantScheme::Fp8Block128;
constexpr auto kTen = QuantScheme::Fp8PerTensor;

std::string shape_name(const std::vector<int64_t>& shape) {
  std::string n;
  for (int64_t d : shape) n += (n.empty() ? "" : "x") + std::to_string(d);
  return n;
}

using test::make_x;

std::vector<int64_t> rows_shape(const std::vector<int64_t>& shape) {
  return std::vector<int64_t>(shape.begin(), shape.end() - 1);
}

class GpuPerRowScale : public test::GpuTestWithParam<std::vector<int64_t>> {};

TEST_P(GpuPerRowScale, QuantizeAndDequantizeEqualReference) {
  const std::vector<int64_t> shape = GetParam();
  const HostTensor x = make_x(shape, 940, false);
  HostTensor want_q(DType::E4M3, shape), want_s(DType::F32, rows_shape(shape));
  quantize_activations(x, kTen, want_q, want_s);
  const DeviceTensor dx = DeviceTensor::from_host(x);
  DeviceTensor dq(DType::E4M3, shape), ds(DType::F32, rows_shape(shape));
  for (int run = 0; run < 2; ++run) {
    test::poison(dq);
    test::poison(ds);
    quantize_activations(dx, kTen, dq, ds);
    test::sync();
    ASSERT_TRUE(test::bitwise_equal(dq.to_host(), want_q)) << "q, run " << run;
    ASSERT_TRUE(test::bitwise_equal(ds.to_host(), want_s)) << "scale, run " << run;
  }
  // Dequantize with a different scale per row.
  for (int64_t r = 0; r < want_s.numel(); ++r) want_s.data<float>()[r] = 0.125f * static_cast<float>(1 + r % 13);
  const DeviceTensor rs = DeviceTensor::from_host(want_s);
  for (DType dt : {DType::F32, DType::BF16}) {
    HostTensor want(dt, shape);
    dequantize_activations(want_q, kTen, want_s, want);
    DeviceTensor got(dt, shape);
    test::poison(got);
    dequantize_activations(dq, kTen, rs, got);
    test::sync();
    EXPECT_TRUE(test::bitwise_equal(got.to_host(), want)) << dtype_name(dt);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuPerRowScale,
                         ::testing::Values(std::vector<int64_t>{1, 128}, std::vector<int64_t>{300, 384},
                                           std::vector<int64_t>{3, 5, 256},  // batched
                                           std::vector<int64_t>{4096, 7168}),
                         [](const auto& info) { return shape_name(info.param); });

class GpuPerRowScaleEdge : public test::GpuTest {};

TEST_F(GpuPerRowScaleEdge, NoRows) {
  DeviceTensor dx(DType::BF16, {0, 128}), dq(DType::E4M3, {0, 128}), ds(DType::F32, {0});
  EXPECT_NO_THROW(quantize_activations(dx, kTen, dq, ds));
  test::sync();
}

// ---------------------------------------------------------------------------------------
// quantize_weights
// ---------------------------------------------------------------------------------------

struct WeightCase {
  QuantScheme scheme;
  std::vector<int64_t> shape;  // [E, R, C]
  bool edges;
};

std::string weight_case_name(const WeightCase& c) {
  return std::string(c.scheme == kBlk ? "Block_" : "Tensor_") + shape_name(c.shape) + (c.edges ? "_edges" : "");
}

void PrintTo(const WeightCase& c, std::ostream* os) { *os << weight_case_name(c); }

class GpuQuantizeWeights : public test::GpuTestWithParam<WeightCase> {};

TEST_P(GpuQuantizeWeights, BitwiseEqualToReference) {
  const WeightCase c = GetParam();
  const HostTensor w = make_x(c.shape, 960 + c.shape[1], c.edges);
  const std::vector<int64_t> s_shape =
      c.scheme == kBlk ? std::vector<int64_t>{c.shape[0], c.shape[1] / kB, c.shape[2] / kB}
                       : std::vector<int64_t>{c.shape[0]};
  HostTensor want_q(DType::E4M3, c.shape), want_s(DType::F32, s_shape);
  quantize_weights(w, c.scheme, want_q, want_s);
  const DeviceTensor dw = DeviceTensor::from_host(w);
  DeviceTensor dq(DType::E4M3, c.shape), ds(DType::F32, s_shape);
  for (int run = 0; run < 2; ++run) {
    test::poison(dq);
    test::poison(ds);
    quantize_weights(dw, c.scheme, dq, ds);
    test::sync();
    ASSERT_TRUE(test::bitwise_equal(dq.to_host(), want_q)) << "q, run " << run;
    ASSERT_TRUE(test::bitwise_equal(ds.to_host(), want_s)) << "scale, run " << run;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuQuantizeWeights,
    ::testing::Values(WeightCase{kBlk, {1, 128, 128}, false}, WeightCase{kBlk, {3, 256, 384}, true},
                      WeightCase{kBlk, {2, 4096, 7168}, false},  // DeepSeek-V3 w13
                      WeightCase{kBlk, {2, 7168, 2048}, true},   // DeepSeek-V3 w2
                      WeightCase{kTen, {1, 128, 128}, false}, WeightCase{kTen, {3, 384, 256}, true},
                      WeightCase{kTen, {2, 4096, 7168}, false}),
    [](const auto& info) { return weight_case_name(info.param); });

// ---------------------------------------------------------------------------------------
// NVFP4 with one global per row (the all-to-all payload form)
// ---------------------------------------------------------------------------------------

constexpr int64_t kB4 = kNvfp4BlockSize;

// Equal values, NaN equal to NaN whatever its payload (a dequantized NaN's bits are the
// conversion's, not part of the definition); every other value bit for bit.
::testing::AssertionResult same_values(const HostTensor& a, const HostTensor& b) {
  if (a.view().dtype != b.view().dtype || a.numel() != b.numel()) return ::testing::AssertionFailure() << "shapes differ";
  for (int64_t i = 0; i < a.numel(); ++i) {
    double x, y;
    bool same;
    if (a.view().dtype == DType::BF16) {
      const uint16_t p = a.data<uint16_t>()[i], q = b.data<uint16_t>()[i];
      x = bf16_bits_to_float(p);
      y = bf16_bits_to_float(q);
      same = p == q;
    } else {
      const float p = a.data<float>()[i], q = b.data<float>()[i];
      x = p;
      y = q;
      same = std::memcmp(&p, &q, 4) == 0;
    }
    if (!same && !(std::isnan(x) && std::isnan(y))) {
      return ::testing::AssertionFailure() << "first mismatch at element " << i << ": " << x << " vs " << y;
    }
  }
  return ::testing::AssertionSuccess();
}

struct RowCase {
  std::vector<int64_t> shape;
  bool edges;  // NaN, inf, zero and subnormal groups (quant_inputs.h)
};

std::string row_case_name(const RowCase& c) { return shape_name(c.shape) + (c.edges ? "_edges" : ""); }
void PrintTo(const RowCase& c, std::ostream* os) { *os << row_case_name(c); }

class GpuNvfp4PerRowGlobal : public test::GpuTestWithParam<RowCase> {};

TEST_P(GpuNvfp4PerRowGlobal, QuantizeAndDequantizeEqualReference) {
  const RowCase c = GetParam();
  const std::vector<int64_t> shape = c.shape;
  std::vector<int64_t> qs = shape, ss = shape;
  qs.back() /= 2;
  ss.back() /= kB4;
  const HostTensor x = make_x(shape, 970 + shape.back(), c.edges);
  const DeviceTensor dx = DeviceTensor::from_host(x);
  for (bool fixed : {false, true}) {
    SCOPED_TRACE(fixed ? "static per-row globals" : "dynamic per-row globals");
    Nvfp4QuantizeOptions opt;
    opt.static_global_scale = fixed;
    HostTensor want_q(DType::E2M1x2, qs), want_s(DType::E4M3, ss), want_g(DType::F32, rows_shape(shape));
    // Static: per row a calibrated-looking value, some too small for their row (saturation).
    for (int64_t r = 0; r < want_g.numel(); ++r) want_g.data<float>()[r] = 1e-3f * static_cast<float>(1 + r % 7);
    const HostTensor g_in = [&] {
      HostTensor t(DType::F32, rows_shape(shape));
      std::memcpy(t.view().data, want_g.view().data, want_g.nbytes());
      return t;
    }();
    quantize_nvfp4(x, want_q, want_s, want_g, opt);
    DeviceTensor dq(DType::E2M1x2, qs), ds(DType::E4M3, ss);
    DeviceTensor dg = DeviceTensor::from_host(g_in);
    for (int run = 0; run < 2; ++run) {
      test::poison(dq);
      test::poison(ds);
      if (!fixed) test::poison(dg);
      quantize_nvfp4(dx, dq, ds, dg, opt);
      test::sync();
      ASSERT_TRUE(test::bitwise_equal(dq.to_host(), want_q)) << "codes, run " << run;
      ASSERT_TRUE(test::bitwise_equal(ds.to_host(), want_s)) << "scales, run " << run;
      ASSERT_TRUE(test::bitwise_equal(dg.to_host(), want_g)) << "globals, run " << run;
    }
    // Dequantize the CPU's bytes with each row's global on both sides.
    const DeviceTensor eq = DeviceTensor::from_host(want_q), es = DeviceTensor::from_host(want_s),
                       eg = DeviceTensor::from_host(want_g);
    for (DType dt : {DType::F32, DType::BF16}) {
      HostTensor want(dt, shape);
      dequantize_nvfp4(want_q, want_s, want_g, want);
      DeviceTensor got(dt, shape);
      test::poison(got);
      dequantize_nvfp4(eq, es, eg, got);
      test::sync();
      EXPECT_TRUE(same_values(got.to_host(), want)) << dtype_name(dt);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GpuNvfp4PerRowGlobal,
                         ::testing::Values(RowCase{{1, 128}, false}, RowCase{{300, 384}, false},
                                           RowCase{{300, 384}, true}, RowCase{{3, 5, 256}, true},  // batched
                                           RowCase{{9000, 256}, false},  // more rows than the grid
                                           RowCase{{4096, 7168}, false}, RowCase{{128, 7168}, true}),
                         [](const auto& info) { return row_case_name(info.param); });

// The EP layer's sender and receiver steps captured in one graph on a stream (as `ep-demo` and
// the benchmark replay them): quantize per row, then dequantize to bf16; replayed on new inputs.
TEST_F(GpuPerRowScaleEdge, Nvfp4PerRowQuantizeDequantizeInAGraph) {
  const int64_t t = 64, h = 7168;
  const HostTensor x1 = make_x({t, h}, 981, false), x2 = make_x({t, h}, 982, true);
  const DeviceTensor dx = DeviceTensor::from_host(x1);
  DeviceTensor dq(DType::E2M1x2, {t, h / 2}), ds(DType::E4M3, {t, h / kB4}), dg(DType::F32, {t});
  DeviceTensor dout(DType::BF16, {t, h});
  cudaStream_t stream;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  MODMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  quantize_nvfp4(dx, dq, ds, dg, {}, stream);
  dequantize_nvfp4(dq, ds, dg, dout, stream);
  MODMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  MODMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (const HostTensor* x : {&x1, &x2}) {
    MODMOE_CUDA_CHECK(cudaMemcpy(dx.view().data, x->view().data, x->nbytes(), cudaMemcpyHostToDevice));
    test::poison(dq);
    test::poison(ds);
    test::poison(dg);
    test::poison(dout);
    MODMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    HostTensor cq(DType::E2M1x2, {t, h / 2}), cs(DType::E4M3, {t, h / kB4}), cg(DType::F32, {t});
    HostTensor co(DType::BF16, {t, h});
    quantize_nvfp4(*x, cq, cs, cg);
    dequantize_nvfp4(cq, cs, cg, co);
    EXPECT_TRUE(test::bitwise_equal(dq.to_host(), cq));
    EXPECT_TRUE(test::bitwise_equal(ds.to_host(), cs));
    EXPECT_TRUE(test::bitwise_equal(dg.to_host(), cg));
    EXPECT_TRUE(same_values(dout.to_host(), co));
  }
  MODMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MODMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  MODMOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST_F(GpuPerRowScaleEdge, Nvfp4NoRows) {
  DeviceTensor dx(DType::BF16, {0, 128}), dq(DType::E2M1x2, {0, 64}), ds(DType::E4M3, {0, 8}), dg(DType::F32, {0});
  DeviceTensor dout(DType::BF16, {0, 128});
  EXPECT_NO_THROW(quantize_nvfp4(dx, dq, ds, dg));
  EXPECT_NO_THROW(dequantize_nvfp4(dq, ds, dg, dout));
  test::sync();
}

}  // namespace
}  // namespace modmoe
