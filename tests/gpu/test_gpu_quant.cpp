// FP8 quantization on the GPU against the CPU reference, bit for bit (docs/fp8.md):
// quantize_activations (Fp8Block128; Fp8PerTensor dynamic and static) on shapes from one
// group to DeepSeek-sized [4096, 7168], with edge values (NaN, inf, zero groups, bf16
// subnormals and maxima); dequantize_activations; prepare_weights for FP8 weights; run-to-run
// equality with poisoned outputs; capture in a CUDA graph replayed over new inputs; a
// non-default stream; device mismatches rejected.
#include <gtest/gtest.h>

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

std::vector<int64_t> shape_of(const TensorView& v) {
  return std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim);
}

std::vector<int64_t> scale_shape(const std::vector<int64_t>& x, QuantScheme scheme) {
  if (scheme == kTen) return {1};
  std::vector<int64_t> s = x;
  s.back() /= kB;
  return s;
}

using test::make_x;

struct Result {
  HostTensor q, s;
};

Result run_cpu(const HostTensor& x, QuantScheme scheme, const QuantizeOptions& opt,
               float static_scale) {
  Result r{HostTensor(DType::E4M3, shape_of(x.view())),
           HostTensor(DType::F32, scale_shape(shape_of(x.view()), scheme))};
  if (opt.static_scale) r.s.data<float>()[0] = static_scale;
  quantize_activations(x, scheme, r.q, r.s, opt);
  return r;
}

struct Case {
  std::vector<int64_t> shape;
  bool edges;
};

std::string case_name(const Case& c) {
  std::string n;
  for (int64_t d : c.shape) n += (n.empty() ? "" : "x") + std::to_string(d);
  return n + (c.edges ? "_edges" : "");
}

void PrintTo(const Case& c, std::ostream* os) { *os << case_name(c); }

class GpuQuantize : public test::GpuTestWithParam<Case> {};

TEST_P(GpuQuantize, BitwiseEqualToReference) {
  const Case c = GetParam();
  const HostTensor x = make_x(c.shape, 860 + c.shape.size(), c.edges);
  const DeviceTensor dx = DeviceTensor::from_host(x);
  struct Mode {
    QuantScheme scheme;
    bool static_scale;
  };
  for (const Mode mode : {Mode{kBlk, false}, Mode{kTen, false}, Mode{kTen, true}}) {
    SCOPED_TRACE(std::string(quant_scheme_name(mode.scheme)) +
                 (mode.static_scale ? " static" : " dynamic"));
    QuantizeOptions opt;
    opt.static_scale = mode.static_scale;
    const float static_scale = 0.0078125f;  // past 448 * s the values saturate
    const Result want = run_cpu(x, mode.scheme, opt, static_scale);
    DeviceTensor dq(DType::E4M3, c.shape), ds(DType::F32, scale_shape(c.shape, mode.scheme));
    for (int run = 0; run < 2; ++run) {  // run-to-run: poisoned outputs, same bits
      test::poison(dq);
      test::poison(ds);
      if (mode.static_scale) {
        MODMOE_CUDA_CHECK(cudaMemcpy(ds.data<float>(), &static_scale, 4, cudaMemcpyHostToDevice));
      }
      quantize_activations(dx, mode.scheme, dq, ds, opt);
      test::sync();
      ASSERT_TRUE(test::bitwise_equal(dq.to_host(), want.q)) << "q, run " << run;
      ASSERT_TRUE(test::bitwise_equal(ds.to_host(), want.s)) << "scale, run " << run;
    }
  }
}

TEST_P(GpuQuantize, DequantizeEqualsReference) {
  const Case c = GetParam();
  if (c.edges) GTEST_SKIP() << "NaN payloads of fp32 products differ between CPU and GPU";
  const HostTensor x = make_x(c.shape, 870, false);
  for (QuantScheme scheme : {kBlk, kTen}) {
    const Result r = run_cpu(x, scheme, {}, 0.0f);
    const DeviceTensor dq = DeviceTensor::from_host(r.q), ds = DeviceTensor::from_host(r.s);
    for (DType dt : {DType::F32, DType::BF16}) {
      HostTensor want(dt, c.shape);
      dequantize_activations(r.q, scheme, r.s, want);
      DeviceTensor got(dt, c.shape);
      test::poison(got);
      dequantize_activations(dq, scheme, ds, got);
      test::sync();
      EXPECT_TRUE(test::bitwise_equal(got.to_host(), want))
          << quant_scheme_name(scheme) << " " << dtype_name(dt);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuQuantize,
    ::testing::Values(Case{{1, 128}, false}, Case{{7, 384}, false},  // 21 groups: a lone half-warp
                      Case{{33, 1024}, true}, Case{{3, 5, 256}, true},  // batched
                      Case{{257, 2880 + 64}, true},                   // odd group count per row
                      Case{{4096, 7168}, false}),                     // DeepSeek prefill
    [](const auto& info) { return case_name(info.param); });

// Captured once, replayed over new inputs written into the same buffer: the per-tensor path
// (memset, amax, quantize, scale; also with the scale written once per row, as the EP layer
// captures it) and the block path.
class GpuQuantizeGraph : public test::GpuTest {};

TEST_F(GpuQuantizeGraph, CaptureAndReplay) {
  const std::vector<int64_t> shape{96, 2048};
  struct Mode {
    QuantScheme scheme;
    std::vector<int64_t> scale;
  };
  for (const Mode& m : {Mode{kBlk, scale_shape(shape, kBlk)}, Mode{kTen, {1}}, Mode{kTen, {96}}}) {
    const QuantScheme scheme = m.scheme;
    SCOPED_TRACE(std::string(quant_scheme_name(scheme)) + " scale " + std::to_string(m.scale[0]));
    DeviceTensor dx(DType::BF16, shape), dq(DType::E4M3, shape), ds(DType::F32, m.scale);
    cudaStream_t stream;
    MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    MODMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    quantize_activations(dx, scheme, dq, ds, {}, stream);
    MODMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    MODMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 3; ++replay) {
      const HostTensor x = make_x(shape, 880 + replay, replay == 2);
      MODMOE_CUDA_CHECK(cudaMemcpyAsync(dx.data<uint16_t>(), x.view().data, x.nbytes(),
                                        cudaMemcpyHostToDevice, stream));
      MODMOE_CUDA_CHECK(cudaMemsetAsync(dq.view().data, 0xFF, dq.view().nbytes(), stream));
      MODMOE_CUDA_CHECK(cudaMemsetAsync(ds.view().data, 0xFF, ds.view().nbytes(), stream));
      MODMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      MODMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
      HostTensor want_q(DType::E4M3, shape), want_s(DType::F32, m.scale);
      quantize_activations(x, scheme, want_q, want_s);
      EXPECT_TRUE(test::bitwise_equal(dq.to_host(), want_q)) << "q, replay " << replay;
      EXPECT_TRUE(test::bitwise_equal(ds.to_host(), want_s)) << "scale, replay " << replay;
    }
    MODMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
    MODMOE_CUDA_CHECK(cudaGraphDestroy(graph));
    MODMOE_CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

TEST_F(GpuQuantizeGraph, DeviceMismatchIsRejected) {
  const std::vector<int64_t> shape{4, 256};
  DeviceTensor dx(DType::BF16, shape), dq(DType::E4M3, shape);
  HostTensor hs(DType::F32, {4, 2});
  try {
    quantize_activations(dx, kBlk, dq, hs);
    ADD_FAILURE() << "expected a modmoe::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'scale' is on cpu"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------
// prepare_weights with FP8 weights: GPU == CPU, bit for bit
// ---------------------------------------------------------------------------------------

struct WCase {
  QuantScheme scheme;
  GateUpOrder order;
  int64_t hidden, inter;
  int interleave_rows;  // 0: Canonical
  bool gated, biases;
};

std::string wcase_name(const WCase& c) {
  return std::string(c.scheme == kBlk ? "Block" : "Tensor") +
         (c.order == GateUpOrder::GateUp ? "_GateUp" : "_UpGate") + "_H" +
         std::to_string(c.hidden) + "_I" + std::to_string(c.inter) +
         (c.interleave_rows ? "_G" + std::to_string(c.interleave_rows) : "_canonical") +
         (c.gated ? "" : "_relu2") + (c.biases ? "_bias" : "");
}

void PrintTo(const WCase& c, std::ostream* os) { *os << wcase_name(c); }

struct HostW {
  HostTensor w13, w2, s13, s2, b13, b2;
};

HostW make_w(const WCase& c, int64_t E, std::mt19937_64* rng) {
  HostW w;
  const int64_t H = c.hidden, I = c.inter, rows = c.gated ? 2 * I : I;
  w.w13.reset(DType::E4M3, {E, rows, H});
  w.w2.reset(DType::E4M3, {E, H, I});
  if (c.scheme == kBlk) {
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
  if (rng == nullptr) return w;
  for (HostTensor* t : {&w.w13, &w.w2, &w.s13, &w.s2, &w.b13, &w.b2}) {
    auto* p = static_cast<unsigned char*>(t->view().data);
    for (size_t i = 0; i < t->nbytes(); ++i) p[i] = static_cast<unsigned char>((*rng)() % 251);
  }
  return w;
}

template <class T>
ExpertWeights describe(const WCase& c, const T& w13, const T& w2, const T& s13, const T& s2,
                       const T& b13, const T& b2) {
  ExpertWeights w;
  w.scheme = c.scheme;
  w.order = c.order;
  w.w13 = w13;
  w.w2 = w2;
  w.w13_scale = s13;
  w.w2_scale = s2;
  if (c.biases) {
    w.w13_bias = b13;
    w.w2_bias = b2;
  }
  return w;
}

class GpuPrepareFp8 : public test::GpuTestWithParam<WCase> {};

TEST_P(GpuPrepareFp8, BitwiseEqualToReference) {
  const WCase c = GetParam();
  const int64_t E = 3;
  std::mt19937_64 rng(test::seed(890 + c.hidden + c.interleave_rows));
  const HostW src = make_w(c, E, &rng);
  HostW ref = make_w(c, E, nullptr);
  PrepareWeightsOptions opt;
  opt.layout = c.interleave_rows ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
  opt.interleave_rows = c.interleave_rows ? c.interleave_rows : 8;
  const ExpertWeights s_cpu =
      describe<HostTensor>(c, src.w13, src.w2, src.s13, src.s2, src.b13, src.b2);
  ExpertWeights d_cpu = describe<HostTensor>(c, ref.w13, ref.w2, ref.s13, ref.s2, ref.b13, ref.b2);
  prepare_weights(s_cpu, d_cpu, opt);

  auto up = [](const HostTensor& h) {
    return h.view().defined() ? DeviceTensor::from_host(h) : DeviceTensor();
  };
  const DeviceTensor sw13 = up(src.w13), sw2 = up(src.w2), ss13 = up(src.s13), ss2 = up(src.s2),
                     sb13 = up(src.b13), sb2 = up(src.b2);
  const DeviceTensor dw13 = up(ref.w13), dw2 = up(ref.w2), ds13 = up(ref.s13), ds2 = up(ref.s2),
                     db13 = up(ref.b13), db2 = up(ref.b2);
  const ExpertWeights s_gpu = describe<DeviceTensor>(c, sw13, sw2, ss13, ss2, sb13, sb2);
  ExpertWeights d_gpu = describe<DeviceTensor>(c, dw13, dw2, ds13, ds2, db13, db2);
  for (int run = 0; run < 2; ++run) {
    for (const DeviceTensor* t : {&dw13, &dw2, &ds13, &ds2, &db13, &db2}) test::poison(*t);
    prepare_weights(s_gpu, d_gpu, opt);
    test::sync();
    EXPECT_TRUE(test::bitwise_equal(dw13.to_host(), ref.w13)) << "w13, run " << run;
    EXPECT_TRUE(test::bitwise_equal(dw2.to_host(), ref.w2)) << "w2";
    EXPECT_TRUE(test::bitwise_equal(ds13.to_host(), ref.s13)) << "w13_scale";
    EXPECT_TRUE(test::bitwise_equal(ds2.to_host(), ref.s2)) << "w2_scale";
    if (c.biases) {
      EXPECT_TRUE(test::bitwise_equal(db13.to_host(), ref.b13)) << "w13_bias";
      EXPECT_TRUE(test::bitwise_equal(db2.to_host(), ref.b2)) << "w2_bias";
    }
  }
  EXPECT_EQ(d_gpu.scheme, d_cpu.scheme);
  EXPECT_EQ(d_gpu.layout, d_cpu.layout);
  EXPECT_EQ(d_gpu.order, d_cpu.order);
  EXPECT_EQ(d_gpu.interleave_rows, d_cpu.interleave_rows);
}

constexpr auto kGU = GateUpOrder::GateUp;
constexpr auto kUG = GateUpOrder::UpGate;

INSTANTIATE_TEST_SUITE_P(
    Layouts, GpuPrepareFp8,
    ::testing::Values(WCase{kBlk, kGU, 128, 128, 8, true, false},   // 4-byte scale rows
                      WCase{kBlk, kUG, 256, 256, 8, true, true},    // 8-byte scale rows
                      WCase{kBlk, kGU, 512, 384, 16, true, true},   // 16-byte scale rows
                      WCase{kBlk, kUG, 7168, 256, 128, true, false},  // DeepSeek-V3 H
                      WCase{kBlk, kGU, 256, 256, 0, true, true},
                      WCase{kBlk, kGU, 256, 256, 8, false, true},   // Relu2: copies
                      WCase{kTen, kUG, 384, 256, 8, true, true},
                      WCase{kTen, kGU, 256, 128, 64, true, false}),
    [](const auto& info) { return wcase_name(info.param); });

}  // namespace
}  // namespace modmoe
