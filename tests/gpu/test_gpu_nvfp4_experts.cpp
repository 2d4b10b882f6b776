// NVFP4 on the GPU (docs/nvfp4.md): the CUDA twins of quantize_nvfp4 / dequantize_nvfp4 /
// prepare_weights bit for bit against the CPU reference, and the W4A16 experts (the W4A16
// grouped GEMM, src/cuda/gemm/sm80_w4a16_grouped_gemm.cuh) through modmoe::experts and
// modmoe::fused_moe against the CPU oracle (reference::experts_nvfp4 through modmoe::experts
// on host tensors) on the same bf16 inputs and NVFP4 weights:
//   - small-integer inputs, power-of-two block and global scales (every GEMM1 partial sum
//     exact): GEMM1 (gemm1_activation_output) and the metadata bitwise equal; the outputs
//     within 2e-3 (GEMM2 reads a bf16 intermediate whose fp32 sums need not be exact; the
//     MMA sums in its own order);
//   - random inputs and weights quantized from bf16 masters: relative L2 against the oracle,
//     and against float64 over the decoded weights (the contract's bf16 bound, 6e-3);
//   - decode (T = 1, 16) and prefill-like shapes, the three tiles (the deep 256-K decode tile,
//     the 64-K one, the prefill one; forced too), split-K on the deep tile (forced through
//     MODMOE_GEMM_SPLIT_K, with K tails of 64), the n tail of a tile, a K shorter than the
//     pipeline and than one 256-K stage, prepared (G = 8, 16) and Canonical (GateUp, UpGate)
//     weights, every activation, biases, LoRA, apply_router_weight_on_input, both formats, both
//     do_finalize modes, an EP slice with -1 / E / other ranks' ids;
//   - repeated runs and a CUDA graph replay bitwise (split-K too); fused_moe == route -> experts
//     bitwise; EP slices summed == the single call;
//   - the deep decode tile without split-K == the 64-K decode tile, bit for bit (the same MMAs
//     in the same order per accumulator, sm80_w4a16_grouped_gemm.cuh);
//   - the wgmma W4A16 prefill tile (sm90_wgmma_grouped_gemm.cuh, Sm90W4a16Tile; sm_90 only)
//     forced: the oracle cases above for its paths (gather / TMA token rows, tail rows, K and n
//     tails, empty experts, every activation, LoRA, bias), against the mma.sync prefill tile,
//     repeated and graph replay bitwise, and an error where it cannot run.
// Outputs are poisoned before every run; inputs are fresh random draws (never all zero).
// Without a GPU the suite skips. MODMOE_GPU_TEST_DRYRUN=1 runs the MatchesTheOracle cases on
// such a machine with the CPU oracle on both sides, to check the harness itself.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "core/fp8.h"
#include "core/nvfp4.h"
#include "gpu_test_util.h"
#include "quant_experts_run.h"
#include "quant_inputs.h"
#include "modmoe/modmoe.h"

namespace modmoe {
namespace {

constexpr int64_t kB = kNvfp4BlockSize;
constexpr const char* kDeepTile = "w4a16_16x128x256_s8";  // the decode tile on an H100
constexpr const char* kDecode64Tile = "w4a16_16x128x64_s6";
constexpr const char* kWideTile = "w4a16_16x256x256_s4";  // 256 rows, 16 warps (opt-in)
constexpr const char* kPrefillTile = "w4a16_64x128x64_s4";
// The wgmma W4A16 tile (sm_90a only: Hopper prefill from 128 rows per expert).
constexpr const char* kWgmmaTile = "w4a16_wgmma_256x128x64_s5";

bool is_wgmma_name(const char* name) { return std::strncmp(name, "w4a16_wgmma_", 12) == 0; }

// Whether device 0 is an sm_90 (the wgmma tile's only target).
bool device_is_sm90() {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0;
}

using test::ScopedEnv;

bool dry_run() {
  int count = 0;
  const bool gpu = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  (void)cudaGetLastError();
  const char* v = std::getenv("MODMOE_GPU_TEST_DRYRUN");
  return !gpu && v != nullptr && v[0] == '1';
}

std::vector<int64_t> shape_of(const TensorView& v) {
  return std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim);
}

struct Case {
  std::string name;
  int E = 8, k = 2;
  int64_t M = 16, H = 256, I = 256;
  Activation act = Activation::Swiglu;
  bool small_int = false;
  bool batched = false;
  bool finalize = true;
  int ep_size = 1, ep_rank = 0;
  bool on_input = false;  // k == 1
  bool lora = false;
  bool bias = true;
  // Weight layout: 0 Canonical, else GateUpInterleaved with this G.
  int interleave = 8;
  GateUpOrder order = GateUpOrder::GateUp;
  const char* force = "";  // MODMOE_GEMM_CONFIG
  const char* split = "";  // MODMOE_GEMM_SPLIT_K (clamped to each GEMM's capacity)
  const char* tail = "";   // MODMOE_GEMM_TAIL (tail rows of the sm90 tiles, wgmma W4A16 too)
};

// NVFP4 weights [E, R, C] (C values per row): packed codes [E, R, C/2], block scales
// [E, R, C/16], globals [E].
struct Nvfp4Tensor {
  HostTensor q, s, g;
};

Nvfp4Tensor make_weight(const Case& c, std::mt19937_64& rng, int64_t E, int64_t R, int64_t C) {
  Nvfp4Tensor t;
  t.q.reset(DType::E2M1x2, {E, R, C / 2});
  t.s.reset(DType::E4M3, {E, R, C / kB});
  t.g.reset(DType::F32, {E});
  if (c.small_int) {
    // Codes 0.5 .. 3 of either sign, block scales 2^-2 .. 2^1, globals 2^-2 .. 2^0: every
    // product with a small-integer input is a multiple of 2^-3 and every GEMM1 sum is exact.
    std::uniform_int_distribution<int> code(1, 10), ex(-2, 1), gx(-2, 0);
    for (int64_t i = 0; i < t.q.numel(); ++i) {
      auto pick = [&] {
        const int v = code(rng);
        return static_cast<uint8_t>(v <= 5 ? v : 0x8 | (v - 5));
      };
      t.q.data<uint8_t>()[i] = nvfp4::pack_e2m1x2(pick(), pick());
    }
    for (int64_t i = 0; i < t.s.numel(); ++i) {
      t.s.data<uint8_t>()[i] = fp8::float_to_e4m3(std::ldexp(1.0f, ex(rng)), true);
    }
    for (int64_t e = 0; e < E; ++e) t.g.data<float>()[e] = std::ldexp(1.0f, gx(rng));
    return t;
  }
  // bf16 masters ~ N(0, 1/C) whose 16-blocks differ in magnitude, quantized per expert with
  // its own dynamic global scale (the CPU quantizer).
  HostTensor m(DType::BF16, {E, R, C});
  test::fill_normal(m, rng, 1.0f / std::sqrt(static_cast<float>(C)));
  std::uniform_int_distribution<int> ex(-3, 2);
  for (int64_t b = 0; b < m.numel() / kB; ++b) {
    const float f = std::ldexp(1.0f, ex(rng));
    for (int64_t i = b * kB; i < (b + 1) * kB; ++i) {
      auto& v = m.data<uint16_t>()[i];
      v = float_to_bf16_bits(bf16_bits_to_float(v) * f);
    }
  }
  for (int64_t e = 0; e < E; ++e) {
    quantize_nvfp4(make_view(m.data<uint16_t>() + e * R * C, DType::BF16, {R, C}),
                   make_view(t.q.data<uint8_t>() + e * R * C / 2, DType::E2M1x2, {R, C / 2}),
                   make_view(t.s.data<uint8_t>() + e * R * C / kB, DType::E4M3, {R, C / kB}),
                   make_view(t.g.data<float>() + e, DType::F32, {1}));
  }
  return t;
}

// All host tensors of one problem: canonical NVFP4 weights, the layout the case asks for
// (prepared by the CPU prepare_weights), inputs and routing.
struct Problem {
  Case c;
  ExpertMap map;
  int E_local = 0;
  Nvfp4Tensor w13, w2;
  HostTensor b13, b2;                    // canonical biases
  HostTensor p13, ps13, pg13, pb13;      // w13 in the case's layout
  HostTensor p2, ps2, pg2, pb2;          // w2 (copied)
  ExpertWeights weights;                 // views of the p* tensors
  HostTensor x, ids, wts, counts, lora;
  int64_t rows13() const { return is_gated(c.act) ? 2 * c.I : c.I; }
  int64_t rows() const { return c.batched ? E_local * c.M : c.M * c.k; }
};

Problem make_problem(const Case& c, uint64_t salt) {
  std::mt19937_64 rng(test::seed(salt));
  Problem p;
  p.c = c;
  const int E_global = c.E * c.ep_size;
  p.map = ExpertMap::for_rank(E_global, c.ep_size, c.ep_rank);
  p.E_local = p.map.num_local_experts;
  const int64_t E = p.E_local;
  p.w13 = make_weight(c, rng, E, p.rows13(), c.H);
  p.w2 = make_weight(c, rng, E, c.H, c.I);
  p.b13.reset(DType::F32, {E, p.rows13()});
  p.b2.reset(DType::F32, {E, c.H});
  std::uniform_int_distribution<int> bi(-4, 4);
  for (HostTensor* b : {&p.b13, &p.b2}) {
    for (int64_t i = 0; i < b->numel(); ++i) b->data<float>()[i] = 0.25f * bi(rng);
  }
  ExpertWeights canon;
  canon.scheme = QuantScheme::Nvfp4;
  canon.order = c.order;
  canon.w13 = p.w13.q;
  canon.w2 = p.w2.q;
  canon.w13_scale = p.w13.s;
  canon.w2_scale = p.w2.s;
  canon.w13_global_scale = p.w13.g;
  canon.w2_global_scale = p.w2.g;
  if (c.bias) {
    canon.w13_bias = p.b13;
    canon.w2_bias = p.b2;
  }
  p.p13.reset(DType::E2M1x2, shape_of(p.w13.q.view()));
  p.ps13.reset(DType::E4M3, shape_of(p.w13.s.view()));
  p.pg13.reset(DType::F32, {E});
  p.pb13.reset(DType::F32, {E, p.rows13()});
  p.p2.reset(DType::E2M1x2, shape_of(p.w2.q.view()));
  p.ps2.reset(DType::E4M3, shape_of(p.w2.s.view()));
  p.pg2.reset(DType::F32, {E});
  p.pb2.reset(DType::F32, {E, c.H});
  p.weights.w13 = p.p13;
  p.weights.w13_scale = p.ps13;
  p.weights.w13_global_scale = p.pg13;
  p.weights.w2 = p.p2;
  p.weights.w2_scale = p.ps2;
  p.weights.w2_global_scale = p.pg2;
  if (c.bias) {
    p.weights.w13_bias = p.pb13;
    p.weights.w2_bias = p.pb2;
  }
  PrepareWeightsOptions po;
  po.layout = c.interleave > 0 ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
  po.interleave_rows = c.interleave > 0 ? c.interleave : 8;
  prepare_weights(canon, p.weights, po);

  auto fill_hidden = [&](HostTensor& x, std::vector<int64_t> shape) {
    x.reset(DType::BF16, shape);
    if (c.small_int) {
      test::fill_small_int(x, rng, 4);
    } else {
      test::fill_normal(x, rng, 1.0f);
    }
  };
  if (c.batched) {
    fill_hidden(p.x, {E, c.M, c.H});
    p.counts.reset(DType::I32, {E});
    std::uniform_int_distribution<int> cnt(0, static_cast<int>(c.M));
    for (int64_t e = 0; e < E; ++e) p.counts.data<int32_t>()[e] = cnt(rng);
    p.counts.data<int32_t>()[0] = static_cast<int32_t>(c.M);  // one full expert
    return p;
  }
  fill_hidden(p.x, {c.M, c.H});
  p.ids.reset(DType::I32, {c.M, c.k});
  p.wts.reset(DType::F32, {c.M, c.k});
  std::uniform_real_distribution<float> uw(0.1f, 1.0f);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<int> perm(static_cast<size_t>(E_global));
  for (int64_t m = 0; m < c.M; ++m) {
    for (size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<int>(i);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < c.k; ++j) {
      int id = perm[j];
      if (u01(rng) < 0.05) id = (rng() % 2) ? -1 : E_global;  // never local
      p.ids.data<int32_t>()[m * c.k + j] = id;
      p.wts.data<float>()[m * c.k + j] =
          c.small_int ? 0.25f * static_cast<float>(1 + rng() % 4) : uw(rng);
    }
  }
  if (c.lora) {
    p.lora.reset(DType::BF16, {c.M, c.k, p.rows13()});
    if (c.small_int) {
      test::fill_small_int(p.lora, rng, 2);
    } else {
      test::fill_normal(p.lora, rng, 0.5f);
    }
  }
  return p;
}

using Outputs = test::ExpertsHostOutputs;
using test::bitwise_fraction;
using test::first_rows;

ExpertsOptions options_of(const Case& c) {
  ExpertsOptions o;
  o.activation.kind = c.act;
  o.do_finalize = c.finalize && !c.batched;
  o.apply_router_weight_on_input = c.on_input;
  return o;
}

// Runs experts() on the CPU (host tensors) or the GPU (device copies), outputs poisoned first.
Outputs run_experts(const Problem& p, bool gpu, int repeats = 1) {
  gpu = gpu && !dry_run();
  const Case& c = p.c;
  const ExpertsOptions o = options_of(c);
  test::Views dev(gpu);
  Outputs host;
  const ExpertsOutputs out = test::poisoned_outputs(
      {c.batched, o.do_finalize, c.M, c.H, c.I, c.k, p.E_local, p.rows()}, host, dev);
  ExpertsInputs in;
  in.hidden = dev(p.x);
  if (c.batched) {
    in.expert_num_tokens = dev(p.counts);
  } else {
    in.topk_ids = dev(p.ids);
    in.topk_weights = dev(p.wts);
    if (c.lora) in.gemm1_lora_delta = dev(p.lora);
  }
  ExpertWeights w = p.weights;
  w.w13 = dev(p.p13);
  w.w2 = dev(p.p2);
  w.w13_scale = dev(p.ps13);
  w.w2_scale = dev(p.ps2);
  w.w13_global_scale = dev(p.pg13);
  w.w2_global_scale = dev(p.pg2);
  if (c.bias) {
    w.w13_bias = dev(p.pb13);
    w.w2_bias = dev(p.pb2);
  }
  test::run_and_fetch(in, w, p.map, o, out, gpu, repeats, host);
  return host;
}

// Largest distance in bf16 ulps between two tensors of bf16 values held as doubles (1000 for a
// sign difference).
int64_t max_bf16_ulps(const std::vector<double>& a, const std::vector<double>& b) {
  int64_t worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == b[i]) continue;
    uint32_t ua, ub;
    const float fa = static_cast<float>(a[i]), fb = static_cast<float>(b[i]);
    std::memcpy(&ua, &fa, 4);
    std::memcpy(&ub, &fb, 4);
    const bool same_sign = (ua >> 31) == (ub >> 31);
    const int64_t d = same_sign ? std::abs(int64_t((ua >> 16) & 0x7FFF) - int64_t((ub >> 16) & 0x7FFF))
                                : 1000;
    worst = std::max(worst, d);
  }
  return worst;
}

// Decoded weight (block value * global) of row r, column col of expert e, in float64.
double decoded(const HostTensor& q, const HostTensor& s, const HostTensor& g, int64_t e,
               int64_t r, int64_t col) {
  const int64_t rows = q.view().shape[1], half = q.view().shape[2], nb = s.view().shape[2];
  const uint8_t byte = q.data<uint8_t>()[(e * rows + r) * half + col / 2];
  const uint8_t code = col % 2 ? nvfp4::e2m1x2_second(byte) : nvfp4::e2m1x2_first(byte);
  const uint8_t sc = s.data<uint8_t>()[(e * rows + r) * nb + col / kB];
  return double(nvfp4::block_value(code, sc)) * double(g.data<float>()[e]);
}

// float64 of the layer over the decoded prepared weights, no intermediate rounding (standard
// format, do_finalize, Swiglu, no LoRA, weights on the output): out[m] = sum_j w_j y_j.
std::vector<double> dense_f64(const Problem& p) {
  const Case& c = p.c;
  const int64_t H = c.H, I = c.I;
  std::vector<double> out(static_cast<size_t>(c.M * H), 0.0);
  std::vector<double> a(static_cast<size_t>(I));
  const float* b13 = c.bias ? p.pb13.data<float>() : nullptr;
  const float* b2 = c.bias ? p.pb2.data<float>() : nullptr;
  for (int64_t m = 0; m < c.M; ++m) {
    for (int j = 0; j < c.k; ++j) {
      const int id = p.ids.data<int32_t>()[m * c.k + j];
      if (!p.map.is_local(id)) continue;
      const int64_t e = id - p.map.local_expert_offset;
      for (int64_t i = 0; i < I; ++i) {
        const int64_t gr = p.weights.gate_row(i), ur = p.weights.up_row(i);
        double g = b13 ? b13[e * 2 * I + gr] : 0.0, u = b13 ? b13[e * 2 * I + ur] : 0.0;
        for (int64_t h = 0; h < H; ++h) {
          const double xv = bf16_bits_to_float(p.x.data<uint16_t>()[m * H + h]);
          g += xv * decoded(p.p13, p.ps13, p.pg13, e, gr, h);
          u += xv * decoded(p.p13, p.ps13, p.pg13, e, ur, h);
        }
        a[i] = g / (1.0 + std::exp(-g)) * u;
      }
      const double wj = p.wts.data<float>()[m * c.k + j];
      for (int64_t h = 0; h < H; ++h) {
        double y = b2 ? b2[e * H + h] : 0.0;
        for (int64_t i = 0; i < I; ++i) y += a[i] * decoded(p.p2, p.ps2, p.pg2, e, h, i);
        out[m * H + h] += wj * y;
      }
    }
  }
  return out;
}

class GpuNvfp4Experts : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (dry_run()) return;
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      (void)cudaGetLastError();
      GTEST_SKIP() << "no CUDA device";
    }
    MODMOE_CUDA_CHECK(cudaSetDevice(0));
  }
};

TEST_P(GpuNvfp4Experts, MatchesTheOracle) {
  const Case& c = GetParam();
  std::unique_ptr<ScopedEnv> force;
  if (c.force[0] != '\0') force = std::make_unique<ScopedEnv>("MODMOE_GEMM_CONFIG", c.force);
  std::unique_ptr<ScopedEnv> split;
  if (c.split[0] != '\0') split = std::make_unique<ScopedEnv>("MODMOE_GEMM_SPLIT_K", c.split);
  std::unique_ptr<ScopedEnv> tail;
  if (c.tail[0] != '\0') tail = std::make_unique<ScopedEnv>("MODMOE_GEMM_TAIL", c.tail);
  if (is_wgmma_name(c.force) && !dry_run() && !device_is_sm90()) {
    GTEST_SKIP() << c.force << " runs on sm_90 only";
  }
  const Problem p = make_problem(c, 9000 + std::hash<std::string>{}(c.name) % 1000);
  const Outputs ref = run_experts(p, false);
  const Outputs gpu = run_experts(p, true);

  int64_t valid = p.rows();  // rows of the row space written (standard: P)
  if (!c.batched) {
    ASSERT_TRUE(test::bitwise_equal(gpu.offsets, ref.offsets)) << "expert_first_token_offset";
    valid = ref.offsets.data<int64_t>()[p.E_local];
    const auto a = first_rows(gpu.act, valid), b = first_rows(ref.act, valid);
    const double e = test::rel_l2(a, b);
    std::printf("%s: GEMM1 output rel L2 %.3g, %.4f bitwise, %lld rows\n", c.name.c_str(), e,
                bitwise_fraction(a, b), static_cast<long long>(valid));
    if (c.small_int && c.act != Activation::Geglu) {
      // Exact partial sums: the pre-activation values are the oracle's to the bit; the
      // activation's expf may differ from the host's by an ulp, which moves a bf16 output by
      // one ulp now and then (an H100 run: 1-2 of ~80k outputs differed; Sm90Gated in
      // test_gpu_experts allows the same for the bf16 kernels).
      EXPECT_LE(max_bf16_ulps(a, b), 1) << "first mismatch: "
                                         << test::bitwise_equal(gpu.act, ref.act).message();
      EXPECT_GE(bitwise_fraction(a, b), 0.999);
    } else if (c.small_int) {
      EXPECT_LE(e, 1e-6);  // GeGLU: erff is not correctly rounded on either side
    } else {
      EXPECT_LE(e, 2e-3);
    }
  }
  if (!c.batched && !c.finalize) {
    EXPECT_TRUE(test::bitwise_equal(gpu.ew, ref.ew)) << "expert_weights";
    EXPECT_TRUE(test::bitwise_equal(gpu.e2p, ref.e2p)) << "expanded_idx_to_permuted_idx";
  }
  const bool fin = !c.batched && c.finalize;
  const auto a = fin ? test::to_double(gpu.out) : first_rows(gpu.g2, valid);
  const auto b = fin ? test::to_double(ref.out) : first_rows(ref.g2, valid);
  if (c.batched) {  // every row, the zeroed tails too
    EXPECT_EQ(test::rel_l2(test::to_double(gpu.g2), test::to_double(ref.g2)),
              test::rel_l2(a, b));
  }
  const double e = test::rel_l2(a, b);
  std::printf("%s: %s rel L2 vs the oracle %.3g, %.4f bitwise\n", c.name.c_str(),
              fin ? "out" : "gemm2_out", e, bitwise_fraction(a, b));
  // Same weights, same bf16 rounding points on both sides: only the fp32 summation order
  // differs, so a bf16 output now and then sits an ulp (2^-8 relative) away.
  EXPECT_LE(e, c.small_int ? 2e-3 : 4e-3);
  if (fin && c.act == Activation::Swiglu && !c.on_input && !c.lora) {
    const double e64 = test::rel_l2(a, dense_f64(p));
    std::printf("%s: out rel L2 vs float64 over the decoded weights %.3g\n", c.name.c_str(), e64);
    EXPECT_LE(e64, 6e-3);  // docs/contract.md: the bf16 bound (docs/nvfp4.md: CPU 0.0027-0.0034)
  }
}

std::vector<Case> cases() {
  std::vector<Case> v;
  auto add = [&](const Case& c) { v.push_back(c); };
  Case s;  // small integers, decode
  s.small_int = true;
  s.name = "int_decode_t1";
  s.M = 1;
  add(s);
  s.name = "int_decode_t16";
  s.M = 16;
  s.E = 16;
  s.k = 4;
  s.H = 512;
  add(s);
  s.name = "int_decode_t16_unfinalized";
  s.finalize = false;
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_canonical_gateup";
  s.interleave = 0;
  add(s);
  s.name = "int_canonical_upgate";
  s.order = GateUpOrder::UpGate;
  add(s);
  s.name = "int_interleave16_upgate";
  s.interleave = 16;
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_n_tail_short_k";  // GEMM2 n = 320 (2.5 tiles), GEMM2 K = 192 (3 stages)
  s.H = 320;
  s.I = 192;
  s.M = 12;
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_prefill_tile";  // ~80 rows per expert: the 64-token tile, 2 tiles per expert
  s.M = 160;
  s.E = 4;
  s.k = 2;
  add(s);
  s.name = "int_prefill_tile_unfinalized";
  s.finalize = false;
  add(s);
  s.name = "int_decode_tile_forced_many_rows";  // 5 token tiles of the 16-token tile per expert
  s.finalize = true;
  s.force = kDeepTile;
  add(s);
  s.name = "int_wide_tile_forced_many_rows";
  s.force = kWideTile;
  add(s);
  s.name = "int_decode64_tile_forced_many_rows";
  s.force = kDecode64Tile;
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_decode64_tile_t16";  // the 64-K decode tile (A/B and devices < 208 KB)
  s.M = 16;
  s.E = 16;
  s.k = 4;
  s.H = 512;
  s.force = kDecode64Tile;
  add(s);
  // Split-K on the deep tile. GEMM1 K = 1344 (5 stages of 256 and a tail of 64: 6 k-tiles,
  // split 3), GEMM2 K = 1088 (4 + 64: 5 k-tiles, split 2), GEMM2 n = 1344 (10.5 tiles).
  s = Case{};
  s.small_int = true;
  s.name = "int_split3_k_tails_t3";
  s.M = 3;
  s.E = 4;
  s.H = 1344;
  s.I = 1088;
  s.split = "3";
  add(s);
  s.name = "int_split3_k_tails_t16_unfinalized";
  s.M = 16;
  s.finalize = false;
  add(s);
  s.name = "int_split2_canonical_upgate_lora";
  s.M = 6;
  s.finalize = true;
  s.interleave = 0;
  s.order = GateUpOrder::UpGate;
  s.lora = true;
  s.split = "2";
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_split2_batched";
  s.batched = true;
  s.M = 5;
  s.H = 1024;
  s.I = 1024;
  s.split = "2";
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_split8_clamped_relu2";  // asks 8: GEMM1 K = 2048 allows 4, GEMM2 K = 512 none
  s.act = Activation::Relu2;
  s.M = 2;
  s.H = 2048;
  s.I = 512;
  s.split = "8";
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_prefill_tile_forced_t3";
  s.M = 3;
  s.force = kPrefillTile;
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_batched";
  s.batched = true;
  s.M = 24;
  add(s);
  s.name = "int_batched_decode";
  s.M = 5;
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_on_input";
  s.k = 1;
  s.on_input = true;
  s.M = 33;
  add(s);
  s = Case{};
  s.small_int = true;
  s.name = "int_lora";
  s.lora = true;
  s.M = 10;
  add(s);
  s.name = "int_no_bias";
  s.lora = false;
  s.bias = false;
  add(s);
  for (Activation act : {Activation::SwigluOai, Activation::Geglu, Activation::Relu2}) {
    s = Case{};
    s.small_int = true;
    s.act = act;
    s.M = 20;
    s.name = std::string("int_") + (act == Activation::SwigluOai ? "swiglu_oai"
                                    : act == Activation::Geglu   ? "geglu"
                                                                 : "relu2");
    add(s);
  }
  // Random inputs, weights quantized from bf16 masters.
  Case r;
  r.name = "rand_decode_t1";
  r.M = 1;
  r.E = 32;
  r.k = 8;
  r.H = 1024;
  r.I = 512;
  add(r);
  r.name = "rand_decode_t16";
  r.M = 16;
  add(r);
  r.name = "rand_decode_t16_decode64_tile";
  r.force = kDecode64Tile;
  add(r);
  r.force = "";
  r.name = "rand_decode_t1_split4";  // GEMM1 K = 2048: split 4; GEMM2 K = 1024: split 2
  r.M = 1;
  r.H = 2048;
  r.I = 1024;
  r.split = "4";
  add(r);
  // T = 16 with 8 experts: 16 x 16 tiles per GEMM, within the 8 MiB scratch (with 32 experts
  // the grid's upper bound, 40 x 16 tiles, leaves no room for a split).
  r.name = "rand_decode_t16_split2";
  r.M = 16;
  r.E = 8;
  r.split = "2";
  add(r);
  r.split = "";
  r.H = 1024;
  r.I = 512;
  r.name = "rand_decode_t16_ep4_rank2";  // an EP slice: local_expert_offset = 16
  r.ep_size = 4;
  r.ep_rank = 2;
  r.E = 8;
  add(r);
  r = Case{};
  r.name = "rand_prefill";
  r.M = 384;
  r.E = 8;
  r.k = 2;
  r.H = 512;
  r.I = 768;
  add(r);
  r.name = "rand_prefill_unfinalized";
  r.finalize = false;
  add(r);
  r = Case{};
  r.name = "rand_canonical_upgate_lora";
  r.interleave = 0;
  r.order = GateUpOrder::UpGate;
  r.lora = true;
  r.M = 40;
  add(r);

  // The wgmma W4A16 tile (256 tokens x 128 weight rows, A decoded into registers; sm_90 only,
  // skipped elsewhere), forced on both GEMMs. GEMM1 of the standard format gathers its token
  // rows (cp.async), GEMM2 and the batched format load them by TMA.
  Case w;
  w.small_int = true;
  w.force = kWgmmaTile;
  w.name = "int_wgmma_prefill";  // ~192 rows per expert: one tile, N variants below 256
  w.M = 384;
  w.E = 4;
  w.k = 2;
  add(w);
  w.name = "int_wgmma_prefill_unfinalized";
  w.finalize = false;
  add(w);
  w = Case{};
  w.small_int = true;
  w.force = kWgmmaTile;
  w.name = "int_wgmma_tail_rows";  // ~272 rows per expert: one tile of 256 + up to 32 tail rows
  w.M = 272;
  w.E = 2;
  w.k = 2;
  w.tail = "1";
  add(w);
  w.name = "int_wgmma_no_tail_rows";  // the same rows without: a second, nearly empty tile
  w.tail = "0";
  add(w);
  w = Case{};
  w.small_int = true;
  w.force = kWgmmaTile;
  w.name = "int_wgmma_many_experts_empty";  // 64 experts, <= 48 rows: most experts have none
  w.M = 24;
  w.E = 64;
  w.k = 2;
  add(w);
  w = Case{};
  w.small_int = true;
  w.force = kWgmmaTile;
  w.name = "int_wgmma_k_n_tails_odd_t";  // K = 1344 / 1088 (21 / 17 k-blocks of 64),
  w.M = 333;                             // GEMM2 n = 1344 (10.5 tiles), an odd token count
  w.E = 4;
  w.k = 2;
  w.H = 1344;
  w.I = 1088;
  w.tail = "1";
  add(w);
  w = Case{};
  w.small_int = true;
  w.force = kWgmmaTile;
  w.name = "int_wgmma_short_k";  // GEMM2 K = 64: one k-block, fewer than the 5 stages
  w.M = 300;
  w.E = 2;
  w.I = 64;
  add(w);
  w = Case{};
  w.small_int = true;
  w.force = kWgmmaTile;
  w.name = "int_wgmma_batched";  // token rows by TMA in both GEMMs
  w.batched = true;
  w.M = 300;
  w.E = 4;
  add(w);
  w = Case{};
  w.small_int = true;
  w.force = kWgmmaTile;
  w.name = "int_wgmma_lora";
  w.lora = true;
  w.M = 200;
  add(w);
  w.name = "int_wgmma_no_bias";
  w.lora = false;
  w.bias = false;
  add(w);
  w.name = "int_wgmma_interleave8_upgate";  // G = 8 with UpGate order: still rows g, g + 8
  w.bias = true;
  w.order = GateUpOrder::UpGate;
  add(w);
  for (Activation act : {Activation::SwigluOai, Activation::Geglu, Activation::Relu2}) {
    w = Case{};
    w.small_int = true;
    w.force = kWgmmaTile;
    w.act = act;
    w.M = 260;
    w.name = std::string("int_wgmma_") + (act == Activation::SwigluOai ? "swiglu_oai"
                                          : act == Activation::Geglu   ? "geglu"
                                                                       : "relu2");
    add(w);
  }
  w = Case{};
  w.force = kWgmmaTile;
  w.name = "rand_wgmma_prefill";
  w.M = 512;
  w.E = 8;
  w.k = 2;
  w.H = 1024;
  w.I = 768;
  w.tail = "1";
  add(w);
  w.name = "rand_wgmma_ep4_rank1";
  w.ep_size = 4;
  w.ep_rank = 1;
  w.E = 4;
  add(w);
  // Not forced: what select_config picks for 512 rows per expert (the wgmma tile on a Hopper
  // by default, the mma.sync prefill tile with MODMOE_W4A16_WGMMA=0 and elsewhere).
  w = Case{};
  w.name = "rand_prefill_selected";
  w.M = 1024;
  w.E = 4;
  w.k = 2;
  w.H = 512;
  w.I = 512;
  add(w);
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuNvfp4Experts, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// ---------------------------------------------------------------------------------------
// quantize / dequantize / prepare_weights on CUDA tensors == the CPU reference, bitwise
// ---------------------------------------------------------------------------------------

class GpuNvfp4Quant : public test::GpuTest {};

// Both sides NaN, or the same bits.
::testing::AssertionResult same_values(const HostTensor& a, const HostTensor& b) {
  const auto x = test::to_double(a), y = test::to_double(b);
  if (x.size() != y.size()) return ::testing::AssertionFailure() << "sizes differ";
  for (size_t i = 0; i < x.size(); ++i) {
    const bool nan = std::isnan(x[i]) && std::isnan(y[i]);
    if (!nan && std::memcmp(&x[i], &y[i], sizeof(double)) != 0) {
      return ::testing::AssertionFailure() << "first mismatch at element " << i << ": " << x[i]
                                           << " vs " << y[i];
    }
  }
  return ::testing::AssertionSuccess();
}

TEST_F(GpuNvfp4Quant, QuantizeAndDequantizeMatchTheCpuBitwise) {
  const std::vector<std::vector<int64_t>> shapes = {
      {1, 128}, {7, 256}, {33, 512}, {3, 5, 384}, {256, 7168}};
  int salt = 0;
  for (const auto& shape : shapes) {
    for (bool edges : {false, true}) {
      for (bool fixed : {false, true}) {
        const HostTensor x = test::make_x(shape, 9500 + salt++, edges);
        std::vector<int64_t> qs = shape, ss = shape;
        qs.back() /= 2;
        ss.back() /= kB;
        Nvfp4QuantizeOptions opt;
        opt.static_global_scale = fixed;
        // Static: a calibrated scale half of the dynamic one, so the largest blocks saturate.
        HostTensor cq(DType::E2M1x2, qs), cs(DType::E4M3, ss), cg(DType::F32, {1});
        cg.data<float>()[0] = std::ldexp(1.0f, -3) * 0.37f;
        quantize_nvfp4(x, cq, cs, cg, opt);
        const DeviceTensor dx = DeviceTensor::from_host(x);
        DeviceTensor dq(DType::E2M1x2, qs), ds(DType::E4M3, ss);
        HostTensor g0(DType::F32, {1});
        g0.data<float>()[0] = fixed ? std::ldexp(1.0f, -3) * 0.37f : NAN;
        DeviceTensor dg = DeviceTensor::from_host(g0);
        test::poison(dq);
        test::poison(ds);
        quantize_nvfp4(dx, dq, ds, dg, opt);
        test::sync();
        const std::string what = "shape " + std::to_string(shape[0]) + "x.. edges " +
                                 std::to_string(edges) + " static " + std::to_string(fixed);
        EXPECT_TRUE(test::bitwise_equal(dq.to_host(), cq)) << "codes, " << what;
        EXPECT_TRUE(test::bitwise_equal(ds.to_host(), cs)) << "scales, " << what;
        const HostTensor gg = dg.to_host();
        const bool g_same = std::memcmp(gg.view().data, cg.view().data, 4) == 0;
        EXPECT_TRUE(g_same) << "global scale " << gg.data<float>()[0] << " vs "
                            << cg.data<float>()[0] << ", " << what;
        // Dequantize the CPU's bytes on both sides, fp32 and bf16.
        const DeviceTensor eq = DeviceTensor::from_host(cq), es = DeviceTensor::from_host(cs),
                           eg = DeviceTensor::from_host(cg);
        for (DType dt : {DType::F32, DType::BF16}) {
          HostTensor co(dt, shape);
          dequantize_nvfp4(cq, cs, cg, co);
          DeviceTensor dout(dt, shape);
          test::poison(dout);
          dequantize_nvfp4(eq, es, eg, dout);
          test::sync();
          EXPECT_TRUE(same_values(dout.to_host(), co))
              << "dequantize to " << dtype_name(dt) << ", " << what;
        }
      }
    }
  }
}

TEST_F(GpuNvfp4Quant, QuantizeInAGraphOnAStream) {
  const HostTensor x1 = test::make_x({64, 512}, 9601, false);
  const HostTensor x2 = test::make_x({64, 512}, 9602, true);
  const DeviceTensor dx = DeviceTensor::from_host(x1);
  DeviceTensor dq(DType::E2M1x2, {64, 256}), ds(DType::E4M3, {64, 32}), dg(DType::F32, {1});
  cudaStream_t stream;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  MODMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  quantize_nvfp4(dx, dq, ds, dg, {}, stream);
  MODMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  MODMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (const HostTensor* x : {&x1, &x2}) {
    MODMOE_CUDA_CHECK(cudaMemcpy(dx.view().data, x->view().data, x->nbytes(),
                                 cudaMemcpyHostToDevice));
    test::poison(dq);
    test::poison(ds);
    MODMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    HostTensor cq(DType::E2M1x2, {64, 256}), cs(DType::E4M3, {64, 32}), cg(DType::F32, {1});
    quantize_nvfp4(*x, cq, cs, cg);
    EXPECT_TRUE(test::bitwise_equal(dq.to_host(), cq));
    EXPECT_TRUE(test::bitwise_equal(ds.to_host(), cs));
    EXPECT_TRUE(test::bitwise_equal(dg.to_host(), cg));
  }
  MODMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MODMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  MODMOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST_F(GpuNvfp4Quant, PrepareWeightsMatchesTheCpuBitwise) {
  for (int G : {0, 8, 16, 32}) {
    for (GateUpOrder order : {GateUpOrder::GateUp, GateUpOrder::UpGate}) {
      for (bool bias : {false, true}) {
        Case c;
        c.name = "prepare";
        c.E = 3;
        c.H = 256;
        c.I = 128;
        c.interleave = G;
        c.order = order;
        c.bias = bias;
        const Problem p = make_problem(c, 9700 + G + (order == GateUpOrder::UpGate) * 100 + bias);
        // The canonical tensors on the device, prepared there; p.weights is the CPU's result.
        std::vector<std::unique_ptr<DeviceTensor>> keep;
        auto up = [&](const HostTensor& h) {
          keep.push_back(std::make_unique<DeviceTensor>(DeviceTensor::from_host(h)));
          return keep.back()->view();
        };
        auto out = [&](const HostTensor& like) {
          keep.push_back(std::make_unique<DeviceTensor>(like.view().dtype, shape_of(like.view())));
          test::poison(*keep.back());
          return keep.back()->view();
        };
        ExpertWeights src;
        src.scheme = QuantScheme::Nvfp4;
        src.order = order;
        src.w13 = up(p.w13.q);
        src.w2 = up(p.w2.q);
        src.w13_scale = up(p.w13.s);
        src.w2_scale = up(p.w2.s);
        src.w13_global_scale = up(p.w13.g);
        src.w2_global_scale = up(p.w2.g);
        if (bias) {
          src.w13_bias = up(p.b13);
          src.w2_bias = up(p.b2);
        }
        ExpertWeights dst;
        dst.w13 = out(p.p13);
        dst.w2 = out(p.p2);
        dst.w13_scale = out(p.ps13);
        dst.w2_scale = out(p.ps2);
        dst.w13_global_scale = out(p.pg13);
        dst.w2_global_scale = out(p.pg2);
        if (bias) {
          dst.w13_bias = out(p.pb13);
          dst.w2_bias = out(p.pb2);
        }
        PrepareWeightsOptions po;
        po.layout = G > 0 ? WeightLayout::GateUpInterleaved : WeightLayout::Canonical;
        po.interleave_rows = G > 0 ? G : 8;
        prepare_weights(src, dst, po);
        test::sync();
        EXPECT_EQ(dst.layout, p.weights.layout);
        EXPECT_EQ(dst.interleave_rows, p.weights.interleave_rows);
        auto host = [](const TensorView& v) {
          HostTensor h(v.dtype, shape_of(v));
          MODMOE_CUDA_CHECK(cudaMemcpy(h.view().data, v.data, h.nbytes(), cudaMemcpyDeviceToHost));
          return h;
        };
        const std::string what = "G " + std::to_string(G) + " order " +
                                 std::to_string(static_cast<int>(order)) + " bias " +
                                 std::to_string(bias);
        EXPECT_TRUE(test::bitwise_equal(host(dst.w13), p.p13)) << "w13, " << what;
        EXPECT_TRUE(test::bitwise_equal(host(dst.w13_scale), p.ps13)) << "w13_scale, " << what;
        EXPECT_TRUE(test::bitwise_equal(host(dst.w2), p.p2)) << "w2, " << what;
        EXPECT_TRUE(test::bitwise_equal(host(dst.w2_scale), p.ps2)) << "w2_scale, " << what;
        EXPECT_TRUE(test::bitwise_equal(host(dst.w13_global_scale), p.pg13)) << what;
        EXPECT_TRUE(test::bitwise_equal(host(dst.w2_global_scale), p.pg2)) << what;
        if (bias) {
          EXPECT_TRUE(test::bitwise_equal(host(dst.w13_bias), p.pb13)) << "w13_bias, " << what;
          EXPECT_TRUE(test::bitwise_equal(host(dst.w2_bias), p.pb2)) << "w2_bias, " << what;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The stage: determinism, graphs, fused == modular, EP slices
// ---------------------------------------------------------------------------------------

class GpuNvfp4Stage : public test::GpuTest {};

// The same call three times, and captured in a CUDA graph and replayed: the same bits. The
// deep decode tile with and without split-K (GEMM1 K = 1024: 4 k-tiles, split 2; the
// arrival counters are zeroed by the work-list kernel inside the graph), then the prefill tile.
TEST_F(GpuNvfp4Stage, RepeatedAndGraphReplayBitwise) {
  struct Variant {
    int64_t M;
    const char* split;
    const char* force;
  };
  for (const Variant& v : {Variant{9, "", ""}, Variant{9, "2", ""}, Variant{200, "", ""},
                           Variant{333, "", kWgmmaTile}}) {
    const int64_t M = v.M;
    if (is_wgmma_name(v.force) && !device_is_sm90()) continue;  // sm_90 only
    std::unique_ptr<ScopedEnv> split;
    if (v.split[0] != '\0') split = std::make_unique<ScopedEnv>("MODMOE_GEMM_SPLIT_K", v.split);
    std::unique_ptr<ScopedEnv> force;
    if (v.force[0] != '\0') force = std::make_unique<ScopedEnv>("MODMOE_GEMM_CONFIG", v.force);
    SCOPED_TRACE(std::string("split ") + v.split + " config " + v.force);
    Case c;
    c.name = "determinism";
    c.M = M;
    c.k = 4;
    c.E = 16;
    c.H = 1024;
    c.I = 512;
    const Problem p = make_problem(c, 9801 + M);
    const Outputs once = run_experts(p, true, 1);
    const Outputs thrice = run_experts(p, true, 3);
    EXPECT_TRUE(test::bitwise_equal(once.out, thrice.out)) << "M " << M;
    const ExpertsOptions o = options_of(c);
    DeviceTensor x = DeviceTensor::from_host(p.x);
    DeviceTensor ids = DeviceTensor::from_host(p.ids), wts = DeviceTensor::from_host(p.wts);
    const test::DeviceExpertWeights dw(p.weights);
    const ExpertWeights w = dw.view();
    DeviceTensor out(DType::BF16, {c.M, c.H});
    ExpertsInputs in;
    in.hidden = x;
    in.topk_ids = ids;
    in.topk_weights = wts;
    test::expect_graph_replays(in, w, p.map, o, out, once.out);
  }
}

// fused_moe with NVFP4 weights on the GPU == route -> experts bitwise (the bf16 hidden goes to
// experts() as it is); EP slices of the modular call summed == the single call.
TEST_F(GpuNvfp4Stage, ModularEqualsMonolithicAndEpSlicesSum) {
  for (int64_t M : {int64_t{4}, int64_t{300}}) {
    Case c;
    c.name = "fused";
    c.M = M;
    c.E = 16;
    c.k = 4;
    c.H = 512;
    c.I = 256;
    const Problem p = make_problem(c, 9900 + M);
    std::mt19937_64 rng(test::seed(9950 + M));
    HostTensor logits(DType::F32, {c.M, c.E});
    test::fill_normal(logits, rng, 1.0f);
    DeviceTensor d_hidden = DeviceTensor::from_host(p.x);
    DeviceTensor d_logits = DeviceTensor::from_host(logits);
    const test::DeviceExpertWeights dw(p.weights);
    const ExpertWeights w = dw.view();
    RoutingParams rp;
    rp.num_experts = c.E;
    rp.top_k = c.k;
    const ExpertsOptions o = options_of(c);
    DeviceTensor fused_out(DType::BF16, {c.M, c.H});
    test::poison(fused_out);
    const size_t fws = fused_moe_workspace_size(c.M, w, rp, p.map, o);
    DeviceTensor fws_buf(DType::U8, {static_cast<int64_t>(fws)});
    fused_moe(d_logits, {}, d_hidden, w, rp, p.map, o, fused_out, {fws_buf.view().data, fws});
    DeviceTensor ids(DType::I32, {c.M, c.k}), wts(DType::F32, {c.M, c.k});
    route(d_logits, {}, rp, ids, wts);
    ExpertsInputs in;
    in.hidden = d_hidden;
    in.topk_ids = ids;
    in.topk_weights = wts;
    DeviceTensor out(DType::BF16, {c.M, c.H});
    test::poison(out);
    ExpertsOutputs eo;
    eo.out = out;
    const size_t ews = experts_workspace_size(make_experts_desc(in, w, p.map, o, eo));
    DeviceTensor ews_buf(DType::U8, {static_cast<int64_t>(ews)});
    experts(in, w, p.map, o, eo, {ews_buf.view().data, ews});
    test::sync();
    const HostTensor single = out.to_host();
    EXPECT_TRUE(test::bitwise_equal(fused_out.to_host(), single)) << "M " << M;
    std::vector<double> sum(static_cast<size_t>(c.M * c.H), 0.0);
    for (int rank = 0; rank < 4; ++rank) {
      const ExpertMap m = ExpertMap::for_rank(c.E, 4, rank);
      const ExpertWeights wr = dw.view(m.local_expert_offset, m.num_local_experts);
      test::poison(out);
      experts(in, wr, m, o, eo, {ews_buf.view().data, ews});
      test::sync();
      const auto part = test::to_double(out.to_host());
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
    }
    const double e = test::rel_l2(sum, test::to_double(single));
    std::printf("fused M=%lld: EP=4 slices summed vs the single call, rel L2 %.3g\n",
                static_cast<long long>(M), e);
    EXPECT_LE(e, 5e-3);
  }
}

// The deep decode tile (256 of K per stage, 8 warps) without split-K, its 256-row 16-warp
// variant (the wide tile), and the 64-K decode tile
// issue the same MMAs on the same fragments in the same order for every accumulator, so on
// random inputs (inexact fp32 sums) every output is the same to the bit; split-K regroups the
// sums (within the oracle bounds: MatchesTheOracle's split cases), and is checked here for
// being deterministic only. K tails (GEMM1 K = 1344, GEMM2 K = 1088: 6 and 5 k-tiles, both
// split 2), the n tail of GEMM2 (1344 = 10.5 tiles), T = 1, 5, 16.
TEST_F(GpuNvfp4Stage, DeepTileEqualsThe64KTileBitwise) {
  for (int64_t M : {int64_t{1}, int64_t{5}, int64_t{16}}) {
    for (int interleave : {8, 0}) {
      Case c;
      c.name = "deep_vs_64k";
      c.M = M;
      c.E = 8;
      c.k = 2;
      c.H = 1344;
      c.I = 1088;
      c.interleave = interleave;
      c.lora = interleave == 0;
      c.finalize = false;  // gemm2_out: the GEMM2 rows themselves
      const Problem p = make_problem(c, 9960 + M + interleave);
      Outputs deep, narrow, wide;
      {
        const ScopedEnv env("MODMOE_GEMM_CONFIG", kDeepTile);
        const ScopedEnv off("MODMOE_GEMM_SPLIT_K", "1");
        deep = run_experts(p, true);
      }
      {
        const ScopedEnv env("MODMOE_GEMM_CONFIG", kWideTile);
        wide = run_experts(p, true);
      }
      {
        const ScopedEnv env("MODMOE_GEMM_CONFIG", kDecode64Tile);
        narrow = run_experts(p, true);
      }
      const std::string what =
          "M " + std::to_string(M) + " interleave " + std::to_string(interleave);
      ASSERT_TRUE(test::bitwise_equal(deep.offsets, narrow.offsets)) << what;
      EXPECT_TRUE(test::bitwise_equal(deep.e2p, narrow.e2p)) << what;
      // The rows the stage writes (the others stay poisoned); NaN counts as a mismatch.
      const int64_t valid = narrow.offsets.data<int64_t>()[p.E_local];
      auto same = [&](const HostTensor& x, const HostTensor& y) {
        return bitwise_fraction(first_rows(x, valid), first_rows(y, valid));
      };
      EXPECT_EQ(same(deep.act, narrow.act), 1.0) << "GEMM1, " << what;
      EXPECT_EQ(same(deep.g2, narrow.g2), 1.0) << "GEMM2, " << what;
      EXPECT_EQ(same(wide.act, narrow.act), 1.0) << "wide tile GEMM1, " << what;
      EXPECT_EQ(same(wide.g2, narrow.g2), 1.0) << "wide tile GEMM2, " << what;
      const ScopedEnv env("MODMOE_GEMM_CONFIG", kDeepTile);
      const ScopedEnv on("MODMOE_GEMM_SPLIT_K", "2");
      const Outputs a = run_experts(p, true), b = run_experts(p, true, 2);
      EXPECT_EQ(same(a.act, b.act), 1.0) << "split-K GEMM1 twice, " << what;
      EXPECT_EQ(same(a.g2, b.g2), 1.0) << "split-K GEMM2 twice, " << what;
      const double e = test::rel_l2(first_rows(a.g2, valid), first_rows(narrow.g2, valid));
      std::printf("%s: split-K 2 vs no split, gemm2_out rel L2 %.3g, %lld rows\n", what.c_str(),
                  e, static_cast<long long>(valid));
      EXPECT_LE(e, 4e-3) << what;
    }
  }
}

// The wgmma W4A16 tile against the mma.sync prefill tile on random inputs (the same weights
// decoded to the same bf16 values; only the fp32 summation order differs): within the
// oracle's bound, and each deterministic (two calls, the same bits). Prepared G = 8 weights,
// tail rows on and off, GEMM1 K = 1344 / GEMM2 K = 1088.
TEST_F(GpuNvfp4Stage, WgmmaTileAgreesWithTheMmaSyncTile) {
  if (!device_is_sm90()) GTEST_SKIP() << kWgmmaTile << " runs on sm_90 only";
  for (const char* tail : {"0", "1"}) {
    const ScopedEnv t("MODMOE_GEMM_TAIL", tail);
    Case c;
    c.name = "wgmma_vs_mma_sync";
    c.M = 777;
    c.E = 8;
    c.k = 3;
    c.H = 1344;
    c.I = 1088;
    c.finalize = false;  // gemm2_out: the GEMM2 rows themselves
    const Problem p = make_problem(c, 9975);
    Outputs wg, wg2, ms;
    {
      const ScopedEnv env("MODMOE_GEMM_CONFIG", kWgmmaTile);
      wg = run_experts(p, true);
      wg2 = run_experts(p, true, 2);
    }
    {
      const ScopedEnv env("MODMOE_GEMM_CONFIG", kPrefillTile);
      ms = run_experts(p, true);
    }
    const int64_t valid = ms.offsets.data<int64_t>()[p.E_local];
    auto rows = [&](const HostTensor& x) { return first_rows(x, valid); };
    EXPECT_EQ(bitwise_fraction(rows(wg.act), rows(wg2.act)), 1.0) << "GEMM1 twice, tail " << tail;
    EXPECT_EQ(bitwise_fraction(rows(wg.g2), rows(wg2.g2)), 1.0) << "GEMM2 twice, tail " << tail;
    const double e1 = test::rel_l2(rows(wg.act), rows(ms.act));
    const double e2 = test::rel_l2(rows(wg.g2), rows(ms.g2));
    std::printf("wgmma vs mma.sync (tail %s): GEMM1 rel L2 %.3g, GEMM2 %.3g, %lld rows\n", tail,
                e1, e2, static_cast<long long>(valid));
    EXPECT_LE(e1, 2e-3) << "tail " << tail;
    EXPECT_LE(e2, 4e-3) << "tail " << tail;
  }
}

// Forcing the wgmma W4A16 tile where it cannot run (gated weights not GateUpInterleaved with
// G = 8) fails with an error naming the layout, instead of silently running another tile.
TEST_F(GpuNvfp4Stage, ForcedWgmmaTileOnAnotherLayoutFails) {
  Case c;
  c.name = "forced_wgmma_canonical";
  c.small_int = true;
  c.M = 300;
  c.interleave = 0;
  const Problem p = make_problem(c, 9991);
  const ScopedEnv env("MODMOE_GEMM_CONFIG", kWgmmaTile);
  EXPECT_MODMOE_ERROR(run_experts(p, true), "MODMOE_GEMM_CONFIG=w4a16_wgmma_256x128x64_s5",
                      "GateUpInterleaved layout with G = 8");
  c.interleave = 16;
  const Problem p16 = make_problem(c, 9992);
  EXPECT_MODMOE_ERROR(run_experts(p16, true), "cannot run this NVFP4 GEMM1");
}

// The config hook: an NVFP4 problem never takes a bf16 or FP8 tile, even when forced.
TEST_F(GpuNvfp4Stage, ForcedBf16TileIsIgnored) {
  Case c;
  c.name = "forced_bf16";
  c.small_int = true;
  c.M = 8;
  const Problem p = make_problem(c, 9990);
  const Outputs ref = run_experts(p, false);
  for (const char* name : {"sm80", "64x128x32_s4_w2x2", "sm90_64x128x64_s8"}) {
    const ScopedEnv env("MODMOE_GEMM_CONFIG", name);
    const Outputs gpu = run_experts(p, true);
    EXPECT_TRUE(test::bitwise_equal(gpu.act, ref.act)) << name;
  }
}

}  // namespace
}  // namespace modmoe
