// NVFP4 weights with bf16 activations (W4A16, QuantScheme::Nvfp4) through the public entry
// points on CPU tensors: modmoe::experts and modmoe::fused_moe (docs/nvfp4.md, "Through the
// API").
//   - experts() == reference::experts_nvfp4, bit for bit, on every output, both formats, both
//     do_finalize modes, canonical and prepared weights;
//   - fused_moe() == route() -> experts(), bit for bit (the bf16 hidden passes straight
//     through), at EP = 1 and on one rank of EP = 2, with the caller's workspace or the CPU
//     scratch;
//   - parity: one caller function runs bf16, Fp8Block128 and NVFP4; only the weights (scheme,
//     tensors) and hidden (+ scale) differ; each against float64 over its own decoded weights;
//   - expert parallelism: a rank's gemm2 rows are the single run's rows of its experts, bit for
//     bit; per-rank slices summed == single within the bf16 rounding of the partial sums; non-
//     local ids contribute exactly nothing;
//   - CUDA tensors: refused before anything runs (CPU-only build: no CUDA backend; CUDA build:
//     the GPU path's checks, here the missing workspace; tests/gpu/test_gpu_nvfp4_experts.cpp
//     runs it);
//   - bad arguments, each with the words of its message.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "core/fp8.h"
#include "cpu/experts_outputs.h"
#include "cpu/fp8_weights.h"
#include "modmoe/modmoe.h"
#include "reference/nvfp4.h"
#include "reference/quantize_weights.h"

namespace modmoe {
namespace {

constexpr auto kNone = QuantScheme::None;
constexpr auto kBlk = QuantScheme::Fp8Block128;
constexpr auto kFp4 = QuantScheme::Nvfp4;

// Bounds (docs/nvfp4.md "Experts", docs/fp8.md "Experts", docs/contract.md "Numerics"):
constexpr double kBf16Tol = 6e-3;  // a bf16 pipeline (and W4A16: same numbers) vs float64
constexpr double kFp8Tol = 0.04;   // FP8 vs float64 with no intermediate rounding
constexpr double kEpTol = 5e-3;    // EP partial sums rounded to bf16 before the combine

// The e2m1 values of codes 0..15, written out (decode is tested in test_nvfp4.cpp).
constexpr double kE2m1[16] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0};

using test::expect_same;
using test::poison;
using test::StdOutputs;

std::vector<int64_t> shape_of(const HostTensor& t) {
  const TensorView& v = t.view();
  return std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim);
}

// ---------------------------------------------------------------------------------------
// One MoE layer: float master weights, bf16 hidden states, routing. Every scheme's tensors
// are made from the same masters.
// ---------------------------------------------------------------------------------------

struct Layer {
  int64_t M = 32, H = 256, I = 256;
  int E = 8, k = 3;
  Activation act = Activation::Swiglu;
  std::vector<float> w13, w2;  // [E, 2I (or I), H], [E, H, I] float, canonical GateUp
  HostTensor hidden;           // [M, H] bf16
  HostTensor ids, wts;         // [M, k] int32 global ids (some -1 / E), fp32 weights
  HostTensor logits;           // [M, E] fp32, for fused_moe
  HostTensor b13, b2;          // [E, 2I (or I)], [E, H] fp32
  int64_t rows13() const { return is_gated(act) ? 2 * I : I; }
};

Layer make_layer(uint64_t salt, Activation act = Activation::Swiglu, double junk = 0.1) {
  std::mt19937_64 rng(test::seed(salt));
  Layer L;
  L.act = act;
  const int64_t M = L.M, H = L.H;
  L.hidden.reset(DType::BF16, {M, H});
  test::fill_normal(L.hidden, rng, 1.0f);
  L.ids.reset(DType::I32, {M, L.k});
  L.wts.reset(DType::F32, {M, L.k});
  std::uniform_real_distribution<float> uw(0.2f, 1.0f);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<int> perm(static_cast<size_t>(L.E));
  for (int64_t m = 0; m < M; ++m) {
    for (size_t i = 0; i < perm.size(); ++i) perm[i] = static_cast<int>(i);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < L.k; ++j) {
      int id = perm[j];
      if (u01(rng) < junk) id = (rng() % 2) ? -1 : L.E;
      L.ids.data<int32_t>()[m * L.k + j] = id;
      L.wts.data<float>()[m * L.k + j] = uw(rng);
    }
  }
  L.logits.reset(DType::F32, {M, L.E});
  test::fill_normal(L.logits, rng, 1.0f);
  L.w13 = test::block_varied(rng, L.E, L.rows13(), H, 1.0f / std::sqrt(float(H)));
  L.w2 = test::block_varied(rng, L.E, H, L.I, 1.0f / std::sqrt(float(L.I)));
  L.b13.reset(DType::F32, {L.E, L.rows13()});
  test::fill_normal(L.b13, rng, 0.05f);
  L.b2.reset(DType::F32, {L.E, H});
  test::fill_normal(L.b2, rng, 0.05f);
  return L;
}

HostTensor to_bf16(const std::vector<float>& v, std::vector<int64_t> shape) {
  HostTensor t(DType::BF16, shape);
  for (size_t i = 0; i < v.size(); ++i) t.data<uint16_t>()[i] = float_to_bf16_bits(v[i]);
  return t;
}

// [E, R, C] float -> NVFP4 as a ModelOpt checkpoint holds it, one expert at a time through
// the quantizer (dynamic global per expert).
//   q: [E, R, C/2] E2M1x2; s: [E, R, C/16] E4M3; g: [E] fp32
void quantize_nvfp4_weights(const std::vector<float>& w, int64_t E, int64_t R, int64_t C,
                            HostTensor& q, HostTensor& s, HostTensor& g) {
  q.reset(DType::E2M1x2, {E, R, C / 2});
  s.reset(DType::E4M3, {E, R, C / kNvfp4BlockSize});
  g.reset(DType::F32, {E});
  reference::quantize_nvfp4_weights(to_bf16(w, {E, R, C}), q, s, g);
}

// The weight tensors of one scheme, canonical layout: bf16 (None), e4m3 with 128x128 block
// scales (Fp8Block128), or NVFP4 (packed codes, e4m3 block scales, fp32 globals).
struct SchemeWeights {
  QuantScheme scheme = kNone;
  HostTensor w13, w2;  // bf16, e4m3 or E2M1x2
  HostTensor s13, s2;  // quantized only
  HostTensor g13, g2;  // NVFP4 only: [E] fp32

  ExpertWeights view(const Layer& L) const {
    ExpertWeights w;
    w.scheme = scheme;
    w.w13 = w13;
    w.w2 = w2;
    if (scheme != kNone) {
      w.w13_scale = s13;
      w.w2_scale = s2;
    }
    if (scheme == kFp4) {
      w.w13_global_scale = g13;
      w.w2_global_scale = g2;
    }
    w.w13_bias = L.b13;
    w.w2_bias = L.b2;
    return w;
  }
};

SchemeWeights make_weights(const Layer& L, QuantScheme scheme) {
  SchemeWeights s;
  s.scheme = scheme;
  if (scheme == kNone) {
    s.w13 = to_bf16(L.w13, {L.E, L.rows13(), L.H});
    s.w2 = to_bf16(L.w2, {L.E, L.H, L.I});
  } else if (scheme == kBlk) {
    test::quantize_weights(L.w13, L.E, L.rows13(), L.H, scheme, s.w13, s.s13);
    test::quantize_weights(L.w2, L.E, L.H, L.I, scheme, s.w2, s.s2);
  } else {
    quantize_nvfp4_weights(L.w13, L.E, L.rows13(), L.H, s.w13, s.s13, s.g13);
    quantize_nvfp4_weights(L.w2, L.E, L.H, L.I, s.w2, s.s2, s.g2);
  }
  return s;
}

// The activations of one scheme: the bf16 hidden itself (None, NVFP4 = W4A16), or its e4m3
// quantization with 1x128 groups through the public quantizer (Fp8Block128).
struct Activations {
  HostTensor q, scale;  // FP8 only
  TensorView hidden, hidden_scale;
};

Activations make_activations(const Layer& L, QuantScheme scheme) {
  Activations a;
  if (scheme != kBlk) {
    a.hidden = L.hidden;
    return a;
  }
  a.q.reset(DType::E4M3, {L.M, L.H});
  a.scale.reset(DType::F32, {L.M, L.H / kFp8BlockSize});
  quantize_activations(L.hidden, scheme, a.q, a.scale);
  a.hidden = a.q;
  a.hidden_scale = a.scale;
  return a;
}

// A view of experts [first, first + count) of a per-expert tensor.
TensorView slice_experts(const TensorView& t, int64_t first, int64_t count) {
  TensorView v = t;
  v.data = static_cast<char*>(t.data) +
           first * t.strides[0] * static_cast<int64_t>(dtype_bytes(t.dtype));
  v.shape[0] = count;
  return v;
}

ExpertWeights slice_weights(const ExpertWeights& w, const ExpertMap& map) {
  const int64_t first = map.local_expert_offset, count = map.num_local_experts;
  ExpertWeights s = w;
  for (TensorView* t : {&s.w13, &s.w2, &s.w13_scale, &s.w2_scale, &s.w13_global_scale,
                        &s.w2_global_scale, &s.w13_bias, &s.w2_bias}) {
    if (t->defined()) *t = slice_experts(*t, first, count);
  }
  return s;
}

// ---------------------------------------------------------------------------------------
// The caller's code. The same for every scheme: only `w` (scheme and tensors) and
// hidden / hidden_scale differ (docs/contract.md, "Quantized parity").
// ---------------------------------------------------------------------------------------

RoutingParams routing_of(const Layer& L) {
  RoutingParams rp;
  rp.method = RoutingMethod::Renormalize;
  rp.num_experts = L.E;
  rp.top_k = L.k;
  return rp;
}

ExpertsOptions options_of(const Layer& L, bool do_finalize = true) {
  ExpertsOptions o;
  o.activation.kind = L.act;
  o.do_finalize = do_finalize;
  return o;
}

// The experts stage, finalized: out [M, H] bf16, with a workspace sized by the library.
HostTensor run_experts_stage(const TensorView& hidden, const TensorView& hidden_scale,
                             const TensorView& ids, const TensorView& wts,
                             const ExpertWeights& w, const ExpertMap& map,
                             const ExpertsOptions& opt) {
  ExpertsInputs in;
  in.hidden = hidden;
  in.hidden_scale = hidden_scale;
  in.topk_ids = ids;
  in.topk_weights = wts;
  HostTensor out(DType::BF16, {ids.size(0), w.hidden()});
  poison(out);
  ExpertsOutputs outs;
  outs.out = out;
  const size_t ws_bytes = experts_workspace_size(make_experts_desc(in, w, map, opt, outs));
  HostTensor ws(DType::U8, {static_cast<int64_t>(ws_bytes)});
  experts(in, w, map, opt, outs, {ws.view().data, ws_bytes});
  return out;
}

// The monolithic layer from bf16 hidden states: out [M, H] bf16 (and the routing result).
HostTensor run_fused_layer(const Layer& L, const ExpertWeights& w, const ExpertMap& map,
                           const ExpertsOptions& opt, HostTensor* ids = nullptr,
                           HostTensor* wts = nullptr) {
  const RoutingParams rp = routing_of(L);
  const size_t ws_bytes = fused_moe_workspace_size(L.M, w, rp, map, opt);
  HostTensor ws(DType::U8, {static_cast<int64_t>(ws_bytes)});
  poison(ws);
  HostTensor out(DType::BF16, {L.M, L.H});
  poison(out);
  fused_moe(L.logits, {}, L.hidden, w, rp, map, opt, out, {ws.view().data, ws_bytes}, nullptr,
            ids ? TensorView(*ids) : TensorView{}, wts ? TensorView(*wts) : TensorView{});
  return out;
}

// The modular and the monolithic result of one layer for one scheme.
struct CallerResult {
  HostTensor modular, fused;
};

// The one caller function of the parity test: route, run the experts stage, and run the
// fused layer. Nothing in it depends on the scheme.
CallerResult run_caller(const Layer& L, const TensorView& hidden, const TensorView& hidden_scale,
                        const ExpertWeights& w, const ExpertMap& map, const ExpertsOptions& opt) {
  HostTensor ids(DType::I32, {L.M, L.k}), wts(DType::F32, {L.M, L.k});
  route(L.logits, {}, routing_of(L), ids, wts);
  CallerResult r;
  r.modular = run_experts_stage(hidden, hidden_scale, ids, wts, w, map, opt);
  r.fused = run_fused_layer(L, w, map, opt);
  return r;
}

// ---------------------------------------------------------------------------------------
// float64 reference over the decoded values, independent of src/
// ---------------------------------------------------------------------------------------

// [E, R, C] as float64: bf16 values; e4m3 * its 128x128 block scale; or e2m1 * e4m3 block
// scale * global.
std::vector<double> decode_weights(const SchemeWeights& s, int64_t E, int64_t R, int64_t C,
                                   bool w13) {
  const HostTensor& q = w13 ? s.w13 : s.w2;
  const HostTensor& sc = w13 ? s.s13 : s.s2;
  const HostTensor& g = w13 ? s.g13 : s.g2;
  constexpr int64_t kB = kFp8BlockSize, kF = kNvfp4BlockSize;
  std::vector<double> out(static_cast<size_t>(E * R * C));
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t x = (e * R + r) * C + c;
        if (s.scheme == kNone) {
          out[x] = bf16_bits_to_float(q.data<uint16_t>()[x]);
        } else if (s.scheme == kBlk) {
          const double f = sc.data<float>()[(e * (R / kB) + r / kB) * (C / kB) + c / kB];
          out[x] = double(fp8::e4m3_to_float(q.data<uint8_t>()[x])) * f;
        } else {
          const uint8_t b = q.data<uint8_t>()[x / 2];
          const double v = kE2m1[c % 2 ? b >> 4 : b & 0xf];
          const uint8_t bs = sc.data<uint8_t>()[(e * R + r) * (C / kF) + c / kF];
          out[x] = v * double(fp8::e4m3_to_float(bs)) * double(g.data<float>()[e]);
        }
      }
    }
  }
  return out;
}

std::vector<double> decode_hidden(const Layer& L, const Activations& a, QuantScheme scheme) {
  constexpr int64_t kB = kFp8BlockSize;
  std::vector<double> x(static_cast<size_t>(L.M * L.H));
  for (int64_t m = 0; m < L.M; ++m) {
    for (int64_t c = 0; c < L.H; ++c) {
      const int64_t i = m * L.H + c;
      x[i] = scheme != kBlk ? double(bf16_bits_to_float(L.hidden.data<uint16_t>()[i]))
                            : double(fp8::e4m3_to_float(a.q.data<uint8_t>()[i])) *
                                  a.scale.data<float>()[m * (L.H / kB) + c / kB];
    }
  }
  return x;
}

double act_f64(Activation kind, double g, double u) {
  switch (kind) {
    case Activation::Swiglu: return g / (1.0 + std::exp(-g)) * u;
    case Activation::Relu2: return g > 0 ? g * g : 0.0;
    default: ADD_FAILURE() << "act_f64: unexpected activation"; return NAN;
  }
}

// out [M, H] = sum over local j of w_j * (act(x W13^T + b13) W2^T + b2), float64, nothing
// rounded.
std::vector<double> dense_f64(const Layer& L, const SchemeWeights& sw, const Activations& a,
                              const TensorView& ids, const TensorView& wts,
                              const ExpertMap& map) {
  const int64_t M = L.M, H = L.H, I = L.I, rows = L.rows13();
  const int k = L.k;
  const bool gated = is_gated(L.act);
  const std::vector<double> x = decode_hidden(L, a, sw.scheme);
  const std::vector<double> w13 = decode_weights(sw, L.E, rows, H, true);
  const std::vector<double> w2 = decode_weights(sw, L.E, H, I, false);
  std::vector<double> out(static_cast<size_t>(M * H), 0.0), act(static_cast<size_t>(I));
  for (int64_t m = 0; m < M; ++m) {
    for (int j = 0; j < k; ++j) {
      const int id = ids.ptr<const int32_t>()[m * k + j];
      if (!map.is_local(id)) continue;
      const double wj = wts.ptr<const float>()[m * k + j];
      for (int64_t i = 0; i < I; ++i) {
        double g = L.b13.data<float>()[id * rows + i];
        double u = gated ? L.b13.data<float>()[id * rows + I + i] : 0.0;
        for (int64_t c = 0; c < H; ++c) {
          g += x[m * H + c] * w13[(id * rows + i) * H + c];
          if (gated) u += x[m * H + c] * w13[(id * rows + I + i) * H + c];
        }
        act[i] = act_f64(L.act, g, u);
      }
      for (int64_t h = 0; h < H; ++h) {
        double y = L.b2.data<float>()[id * H + h];
        for (int64_t i = 0; i < I; ++i) y += act[i] * w2[(id * H + h) * I + i];
        out[m * H + h] += wj * y;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// experts() == the oracle
// ---------------------------------------------------------------------------------------

struct Case {
  Activation act;
  bool prepared;  // GateUpInterleaved, G = 8
};

std::string case_name(const Case& c) {
  return std::string(activation_name(c.act)) + (c.prepared ? "_prepared" : "_canonical");
}

class Nvfp4Api : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const Case c = GetParam();
    L = make_layer(4000, c.act);
    sw = make_weights(L, kFp4);
    w = sw.view(L);
    if (c.prepared) {
      p13.reset(DType::E2M1x2, shape_of(sw.w13));
      p2.reset(DType::E2M1x2, shape_of(sw.w2));
      ps13.reset(DType::E4M3, shape_of(sw.s13));
      ps2.reset(DType::E4M3, shape_of(sw.s2));
      pg13.reset(DType::F32, {L.E});
      pg2.reset(DType::F32, {L.E});
      pb13.reset(DType::F32, {L.E, L.rows13()});
      pb2.reset(DType::F32, {L.E, L.H});
      ExpertWeights dst;
      dst.w13 = p13;
      dst.w2 = p2;
      dst.w13_scale = ps13;
      dst.w2_scale = ps2;
      dst.w13_global_scale = pg13;
      dst.w2_global_scale = pg2;
      dst.w13_bias = pb13;
      dst.w2_bias = pb2;
      prepare_weights(w, dst);
      w = dst;
    }
  }
  ExpertsInputs inputs() const {
    ExpertsInputs in;
    in.hidden = L.hidden;
    in.topk_ids = L.ids;
    in.topk_weights = L.wts;
    return in;
  }

  Layer L;
  SchemeWeights sw;
  ExpertWeights w;
  HostTensor p13, p2, ps13, ps2, pg13, pg2, pb13, pb2;
};



TEST_P(Nvfp4Api, ExpertsEqualsOracle) {
  const ExpertMap map = ExpertMap::single(L.E);
  for (bool fin : {true, false}) {
    SCOPED_TRACE(fin ? "do_finalize = true" : "do_finalize = false");
    StdOutputs api(L, fin), oracle(L, fin);
    experts(inputs(), w, map, options_of(L, fin), api.views());
    reference::experts_nvfp4(inputs(), w, map, options_of(L, fin), oracle.views());
    expect_same(api, oracle);
  }
}

TEST_P(Nvfp4Api, BatchedEqualsOracle) {
  // Each expert's rows of the permuted order, as a low-latency dispatch delivers them.
  const ExpertMap map = ExpertMap::single(L.E);
  StdOutputs ref(L, false);
  experts(inputs(), w, map, options_of(L, false), ref.views());
  const int64_t* offs = ref.off.data<int64_t>();
  int64_t max_m = 1;
  for (int e = 0; e < L.E; ++e) max_m = std::max(max_m, offs[e + 1] - offs[e]);
  HostTensor bx(DType::BF16, {L.E, max_m, L.H}), cnt(DType::I32, {L.E});
  poison(bx);  // rows past a count are never read
  std::vector<int64_t> slot(static_cast<size_t>(L.M * L.k), -1);
  for (int64_t s = 0; s < L.M * L.k; ++s) {
    if (ref.e2p.data<int32_t>()[s] >= 0) slot[ref.e2p.data<int32_t>()[s]] = s;
  }
  for (int e = 0; e < L.E; ++e) {
    cnt.data<int32_t>()[e] = static_cast<int32_t>(offs[e + 1] - offs[e]);
    for (int64_t r = 0; r < offs[e + 1] - offs[e]; ++r) {
      const int64_t m = slot[offs[e] + r] / L.k;
      std::memcpy(bx.data<uint16_t>() + (e * max_m + r) * L.H,
                  L.hidden.data<uint16_t>() + m * L.H, L.H * 2);
    }
  }
  ExpertsInputs bin;
  bin.hidden = bx;
  bin.expert_num_tokens = cnt;
  HostTensor y_api(DType::BF16, {L.E, max_m, L.H}), y_oracle(DType::BF16, {L.E, max_m, L.H});
  poison(y_api);
  poison(y_oracle);
  ExpertsOutputs o_api, o_oracle;
  o_api.gemm2_out = y_api;
  o_oracle.gemm2_out = y_oracle;
  experts(bin, w, map, options_of(L, false), o_api);
  reference::experts_nvfp4(bin, w, map, options_of(L, false), o_oracle);
  EXPECT_TRUE(test::bitwise_equal(y_api, y_oracle));
  for (int e = 0; e < L.E; ++e) {  // and the batched rows are the standard call's rows
    const int64_t bytes = (offs[e + 1] - offs[e]) * L.H * 2;
    ASSERT_EQ(std::memcmp(y_api.data<uint16_t>() + e * max_m * L.H,
                          ref.g2.data<uint16_t>() + offs[e] * L.H, bytes),
              0)
        << "expert " << e;
  }
}

TEST_P(Nvfp4Api, UnfinalizedPlusFinalizeIsFinalized) {
  const ExpertMap map = ExpertMap::single(L.E);
  StdOutputs fin(L, true), unfin(L, false);
  experts(inputs(), w, map, options_of(L, true), fin.views());
  experts(inputs(), w, map, options_of(L, false), unfin.views());
  HostTensor out(DType::BF16, {L.M, L.H});
  poison(out);
  finalize(unfin.g2, unfin.ew, unfin.e2p, out);
  EXPECT_TRUE(test::bitwise_equal(out, fin.out));
}

INSTANTIATE_TEST_SUITE_P(Cases, Nvfp4Api,
                         ::testing::Values(Case{Activation::Swiglu, false},
                                           Case{Activation::Swiglu, true},
                                           Case{Activation::Relu2, false}),
                         [](const auto& info) { return case_name(info.param); });

// ---------------------------------------------------------------------------------------
// fused_moe == route -> experts
// ---------------------------------------------------------------------------------------

TEST(Nvfp4ApiFused, EqualsRouteExperts) {
  const Layer L = make_layer(4100);
  const SchemeWeights sw = make_weights(L, kFp4);
  const ExpertsOptions opt = options_of(L);
  for (const ExpertMap& map : {ExpertMap::single(L.E), ExpertMap::for_rank(L.E, 2, 1)}) {
    SCOPED_TRACE(::testing::Message() << "experts [" << map.local_expert_offset << ", "
                                      << map.local_expert_offset + map.num_local_experts << ")");
    const ExpertWeights w = slice_weights(sw.view(L), map);

    // The stages one by one; the bf16 hidden goes to experts() as it is.
    HostTensor ids(DType::I32, {L.M, L.k}), wts(DType::F32, {L.M, L.k});
    route(L.logits, {}, routing_of(L), ids, wts);
    const HostTensor staged = run_experts_stage(L.hidden, {}, ids, wts, w, map, opt);
    HostTensor oracle(DType::BF16, {L.M, L.H});
    poison(oracle);
    ExpertsInputs in;
    in.hidden = L.hidden;
    in.topk_ids = ids;
    in.topk_weights = wts;
    ExpertsOutputs o;
    o.out = oracle;
    reference::experts_nvfp4(in, w, map, opt, o);
    EXPECT_TRUE(test::bitwise_equal(staged, oracle));

    // Monolithic, with the caller's (poisoned) workspace and with the CPU scratch.
    HostTensor ids1(DType::I32, {L.M, L.k}), wts1(DType::F32, {L.M, L.k});
    poison(ids1);
    poison(wts1);
    const HostTensor fused = run_fused_layer(L, w, map, opt, &ids1, &wts1);
    EXPECT_TRUE(test::bitwise_equal(fused, staged));
    EXPECT_TRUE(test::bitwise_equal(ids1, ids));
    EXPECT_TRUE(test::bitwise_equal(wts1, wts));
    HostTensor out2(DType::BF16, {L.M, L.H});
    poison(out2);
    fused_moe(L.logits, {}, L.hidden, w, routing_of(L), map, opt, out2);
    EXPECT_TRUE(test::bitwise_equal(out2, staged));
  }
}

TEST(Nvfp4ApiFused, WorkspaceIsRoutingPlusExperts) {
  // No quantized copy of hidden: the routing result plus what experts() needs.
  const Layer L = make_layer(4110);
  const ExpertMap map = ExpertMap::single(L.E);
  const SchemeWeights sw = make_weights(L, kFp4);
  ExpertsDesc desc;
  desc.num_tokens = L.M;
  desc.hidden = L.H;
  desc.intermediate = L.I;
  desc.top_k = L.k;
  desc.expert_map = map;
  desc.scheme = kFp4;
  const size_t ids_bytes = (L.M * L.k * 4 + 255) / 256 * 256;
  EXPECT_EQ(fused_moe_workspace_size(L.M, sw.view(L), routing_of(L), map, options_of(L)),
            2 * ids_bytes + experts_workspace_size(desc));
}

TEST(Nvfp4ApiFused, ZeroTokens) {
  Layer L = make_layer(4120);
  L.M = 0;
  L.hidden.reset(DType::BF16, {0, L.H});
  L.logits.reset(DType::F32, {0, L.E});
  const SchemeWeights sw = make_weights(L, kFp4);
  EXPECT_NO_THROW(run_fused_layer(L, sw.view(L), ExpertMap::single(L.E), options_of(L)));
}

// ---------------------------------------------------------------------------------------
// Parity: the caller's code does not change with the scheme
// ---------------------------------------------------------------------------------------

TEST(Nvfp4ApiParity, OneCallerCodePathForEveryScheme) {
  const Layer L = make_layer(4200);
  const ExpertMap map = ExpertMap::single(L.E);
  const ExpertsOptions opt = options_of(L);
  HostTensor ids(DType::I32, {L.M, L.k}), wts(DType::F32, {L.M, L.k});
  route(L.logits, {}, routing_of(L), ids, wts);  // what run_caller routes too

  std::vector<double> bf16_out;
  for (QuantScheme scheme : {kNone, kBlk, kFp4}) {
    SCOPED_TRACE(quant_scheme_name(scheme));
    // What changes with the scheme: the weights (scheme, tensors) and hidden (+ its scale).
    const SchemeWeights sw = make_weights(L, scheme);
    const Activations x = make_activations(L, scheme);

    // What does not: one caller function, the same routing, options and outputs.
    const CallerResult r = run_caller(L, x.hidden, x.hidden_scale, sw.view(L), map, opt);
    EXPECT_TRUE(test::bitwise_equal(r.fused, r.modular));

    const std::vector<double> got = test::to_double(r.modular);
    const double err = test::rel_l2(got, dense_f64(L, sw, x, ids, wts, map));
    if (scheme == kNone) bf16_out = got;
    const double err_vs_bf16 = test::rel_l2(got, bf16_out);
    std::printf("[ rel_l2   ] %s: vs float64 over its decoded weights %.5f, vs the bf16 layer "
                "%.5f\n",
                quant_scheme_name(scheme), err, err_vs_bf16);
    // W4A16 computes on exactly the decoded weights, so only the bf16 pipeline's roundings
    // remain: the bf16 bound. FP8 also re-quantizes the intermediate (docs/fp8.md).
    EXPECT_LT(err, scheme == kBlk ? kFp8Tol : kBf16Tol);
    if (scheme == kFp4) {
      // Against the bf16 layer: the e2m1 grid's own error, about 0.10 relative RMS per
      // weight (docs/nvfp4.md, "Quantization"), enters three times independently (the gate
      // rows, the up rows, w2), so about sqrt(3) x 0.10 = 0.17 on the output. Measured 0.16
      // to 0.175 over seeds 1-5; bounded at 0.25.
      EXPECT_LT(err_vs_bf16, 0.25);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Expert parallelism
// ---------------------------------------------------------------------------------------

TEST(Nvfp4ApiEp, SlicesSumToSingle) {
  const Layer L = make_layer(4300, Activation::Swiglu, 0.15);  // -1 and E padding ids
  const int ep = 4;
  const int64_t M = L.M, H = L.H, k = L.k;
  const SchemeWeights sw = make_weights(L, kFp4);
  const ExpertMap single_map = ExpertMap::single(L.E);
  StdOutputs single(L, true);
  ExpertsInputs in;
  in.hidden = L.hidden;
  in.topk_ids = L.ids;
  in.topk_weights = L.wts;
  experts(in, sw.view(L), single_map, options_of(L), single.views());
  const int64_t* single_off = single.off.data<int64_t>();

  std::vector<float> sum(static_cast<size_t>(M * H), 0.0f);
  for (int r = 0; r < ep; ++r) {
    SCOPED_TRACE(::testing::Message() << "rank " << r);
    const ExpertMap map = ExpertMap::for_rank(L.E, ep, r);
    const ExpertWeights w = slice_weights(sw.view(L), map);
    const HostTensor o = run_experts_stage(L.hidden, {}, L.ids, L.wts, w, map, options_of(L));
    for (int64_t i = 0; i < M * H; ++i) sum[i] += bf16_bits_to_float(o.data<uint16_t>()[i]);

    // The rank's gemm2 rows are the single run's rows of its experts, bit for bit (W4A16
    // has no per-batch scale: a row depends on its token and its expert only).
    StdOutputs part(L, false, map.num_local_experts);
    experts(in, w, map, options_of(L, false), part.views());
    const int64_t first = single_off[map.local_expert_offset];
    const int64_t rows = single_off[map.local_expert_offset + map.num_local_experts] - first;
    ASSERT_EQ(part.off.data<int64_t>()[map.num_local_experts], rows);
    EXPECT_EQ(std::memcmp(part.g2.data<uint16_t>(), single.g2.data<uint16_t>() + first * H,
                          rows * H * 2),
              0);

    // Non-local ids contribute exactly nothing: other ranks' ids rewritten to -1 or E with
    // NaN weights change no bit; rows with no local id are exact zeros.
    HostTensor ids2(DType::I32, {M, k}), wts2(DType::F32, {M, k});
    for (int64_t s = 0; s < M * k; ++s) {
      const int32_t id = L.ids.data<int32_t>()[s];
      const bool local = map.is_local(id);
      ids2.data<int32_t>()[s] = local ? id : (s % 2 ? -1 : L.E);
      wts2.data<float>()[s] = local ? L.wts.data<float>()[s] : std::nanf("");
    }
    const HostTensor o2 = run_experts_stage(L.hidden, {}, ids2, wts2, w, map, options_of(L));
    EXPECT_TRUE(test::bitwise_equal(o, o2));
    for (int64_t m = 0; m < M; ++m) {
      bool any_local = false;
      for (int64_t j = 0; j < k; ++j) any_local |= map.is_local(L.ids.data<int32_t>()[m * k + j]);
      if (any_local) continue;
      for (int64_t h = 0; h < H; ++h) {
        ASSERT_EQ(o.data<uint16_t>()[m * H + h], 0) << "token " << m << " has no local expert";
      }
    }
  }
  // Each rank's partial sum is rounded to bf16 before the combine (2^-8 / sqrt(3) = 0.0023
  // relative RMS), and the combined sum once more.
  std::vector<double> combined(sum.size());
  for (size_t i = 0; i < sum.size(); ++i) combined[i] = round_to_bf16(sum[i]);
  const double err_single = test::rel_l2(combined, test::to_double(single.out));
  const double err_dense = test::rel_l2(
      combined, dense_f64(L, sw, make_activations(L, kFp4), L.ids, L.wts, single_map));
  std::printf("[ rel_l2   ] EP sum vs single %.6f, vs float64 %.6f\n", err_single, err_dense);
  EXPECT_LT(err_single, kEpTol);
  EXPECT_LT(err_dense, kBf16Tol);
}

// ---------------------------------------------------------------------------------------
// Bad arguments
// ---------------------------------------------------------------------------------------

// A valid NVFP4 call (M = 32, H = I = 256, E = 8, k = 3) that each test breaks in one place.
class Nvfp4ApiBad : public ::testing::Test {
 protected:
  void SetUp() override {
    L = make_layer(4400);
    sw = make_weights(L, kFp4);
    w = sw.view(L);
    in.hidden = L.hidden;
    in.topk_ids = L.ids;
    in.topk_weights = L.wts;
    out_buf.reset(DType::BF16, {L.M, L.H});
    out.out = out_buf;
    hidden = L.hidden;
  }
  void run() { experts(in, w, map, options_of(L), out); }
  void fused(const Workspace& ws = {}) {
    fused_moe(L.logits, {}, hidden, w, routing_of(L), map, options_of(L), out_buf, ws);
  }

  Layer L;
  SchemeWeights sw;
  ExpertWeights w;
  ExpertMap map = ExpertMap::single(8);
  ExpertsInputs in;
  ExpertsOutputs out;
  TensorView hidden;  // fused_moe's bf16 hidden
  HostTensor out_buf, extra, extra2;
};

TEST_F(Nvfp4ApiBad, ValidCallsPass) {
  EXPECT_NO_THROW(run());
  EXPECT_NO_THROW(fused());
}

TEST_F(Nvfp4ApiBad, CudaTensorsCheckedBeforeAnythingRuns) {
  // Views that claim CUDA memory; the refusal comes before anything dereferences them: a
  // CPU-only build has no CUDA backend, a CUDA build's GPU path wants its workspace first.
  const auto cuda = [](TensorView v) {
    v.device = Device::cuda(0);
    return v;
  };
  for (TensorView* t : {&in.hidden, &in.topk_ids, &in.topk_weights, &w.w13, &w.w2, &w.w13_scale,
                        &w.w2_scale, &w.w13_global_scale, &w.w2_global_scale, &w.w13_bias,
                        &w.w2_bias, &out.out}) {
    *t = cuda(*t);
  }
  const TensorView logits = cuda(L.logits);
#ifdef MODMOE_WITH_CUDA
  EXPECT_MODMOE_ERROR(run(), "experts: argument 'workspace' has 0 bytes", "expected at least");
  EXPECT_MODMOE_ERROR(fused_moe(logits, {}, cuda(L.hidden), w, routing_of(L), map,
                                options_of(L), cuda(out_buf)),
                      "fused_moe: argument 'workspace' has 0 bytes");
#else
  EXPECT_MODMOE_ERROR(run(), "experts: the tensors are on cuda:0", "no CUDA backend");
  EXPECT_MODMOE_ERROR(fused_moe(logits, {}, cuda(L.hidden), w, routing_of(L), map,
                                options_of(L), cuda(out_buf)),
                      "fused_moe: the tensors are on cuda:0", "no CUDA backend");
#endif
}

TEST_F(Nvfp4ApiBad, HiddenNotBf16) {
  extra.reset(DType::E4M3, {L.M, L.H});
  in.hidden = extra;
  EXPECT_MODMOE_ERROR(run(), "'hidden' has dtype e4m3", "expected bf16");
  hidden = extra;
  EXPECT_MODMOE_ERROR(fused(), "'hidden' has dtype e4m3", "expected bf16");
}

TEST_F(Nvfp4ApiBad, Nvfp4ActivationsNotSupportedYet) {
  extra.reset(DType::E2M1x2, {L.M, L.H / 2});
  in.hidden = extra;
  EXPECT_MODMOE_ERROR(run(), "not supported yet", "W4A4", "W4A16");
}

TEST_F(Nvfp4ApiBad, HiddenScaleGiven) {
  extra.reset(DType::F32, {L.M, L.H / kNvfp4BlockSize});
  in.hidden_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'hidden_scale' of shape [32, 16] is given", "W4A16");
}

TEST_F(Nvfp4ApiBad, WeightsNotE2m1) {
  const SchemeWeights b = make_weights(L, kNone);
  w.w2 = b.w2;
  EXPECT_MODMOE_ERROR(run(), "'weights.w2' has dtype bf16", "expected e2m1x2");
}

TEST_F(Nvfp4ApiBad, BlockScaleShape) {
  extra.reset(DType::E4M3, {L.E, 2 * L.I, L.H / 32});  // one scale per 32 values
  w.w13_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'weights.w13_scale' has shape [8, 512, 8]",
                      "[E_local, w13 rows, H/16]", "[8, 512, 16]");
}

TEST_F(Nvfp4ApiBad, GlobalScaleMissing) {
  w.w13_global_scale = {};
  EXPECT_MODMOE_ERROR(run(), "'weights.w13_global_scale' is missing");
}

TEST_F(Nvfp4ApiBad, GlobalScaleNotPositive) {
  extra.reset(DType::F32, {L.E});
  std::memcpy(extra.view().data, sw.g2.view().data, extra.nbytes());
  extra.data<float>()[3] = 0.0f;
  w.w2_global_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'weights.w2_global_scale'[3] = 0", "finite positive");
  EXPECT_MODMOE_ERROR(fused(), "'weights.w2_global_scale'[3] = 0", "finite positive");
}

TEST_F(Nvfp4ApiBad, HiddenNotMultipleOf32) {
  // H = 80 packs into whole bytes but not whole 16-byte vectors.
  extra.reset(DType::E2M1x2, {L.E, 2 * L.I, 40});
  extra2.reset(DType::E2M1x2, {L.E, 80, L.I / 2});
  w.w13 = extra;
  w.w2 = extra2;
  EXPECT_MODMOE_ERROR(run(), "'hidden' = 80", "multiple of 32");
}

TEST_F(Nvfp4ApiBad, SharedChecksRunOnTheShadow) {
  // H = 96: an NVFP4 multiple of 32, but not of 64, the GEMM tile every scheme shares.
  HostTensor s13(DType::E4M3, {L.E, 2 * L.I, 96 / 16}), s2(DType::E4M3, {L.E, 96, L.I / 16});
  HostTensor b2(DType::F32, {L.E, 96}), x(DType::BF16, {L.M, 96}), y(DType::BF16, {L.M, 96});
  extra.reset(DType::E2M1x2, {L.E, 2 * L.I, 48});
  extra2.reset(DType::E2M1x2, {L.E, 96, L.I / 2});
  w.w13 = extra;
  w.w2 = extra2;
  w.w13_scale = s13;
  w.w2_scale = s2;
  w.w2_bias = b2;
  in.hidden = x;
  out.out = y;
  EXPECT_MODMOE_ERROR(run(), "'hidden' = 96", "multiple of 64");
  in.hidden = L.hidden;
  out.out = out_buf;
  // And the routing tensors, as for bf16.
  w = sw.view(L);
  extra.reset(DType::I32, {L.M, L.k + 1});
  in.topk_ids = extra;
  EXPECT_MODMOE_ERROR(run(), "'topk_weights'");
}

TEST_F(Nvfp4ApiBad, DescAcceptsNvfp4) {
  ExpertsDesc desc;
  desc.num_tokens = 4;
  desc.hidden = 256;
  desc.intermediate = 256;
  desc.top_k = 2;
  desc.expert_map = map;
  desc.scheme = kFp4;
  EXPECT_NO_THROW(experts_workspace_size(desc));
  desc.hidden = 96;
  EXPECT_MODMOE_ERROR(experts_workspace_size(desc), "'hidden' = 96", "multiple of 64");
  desc.hidden = 256;
  desc.scheme = QuantScheme::Mxfp8;
  EXPECT_MODMOE_ERROR(experts_workspace_size(desc), "not supported yet", "quant scheme mxfp8");
}

TEST_F(Nvfp4ApiBad, FusedWorkspaceTooSmall) {
  const size_t need = fused_moe_workspace_size(L.M, w, routing_of(L), map, options_of(L));
  extra.reset(DType::U8, {static_cast<int64_t>(need)});
  const std::string want = "expected at least " + std::to_string(need) + " bytes";
  EXPECT_MODMOE_ERROR(fused({extra.view().data, need - 1}), "'workspace'", want.c_str());
  EXPECT_NO_THROW(fused({extra.view().data, need}));
}

TEST_F(Nvfp4ApiBad, FusedNothingRunsBeforeValidation) {
  // A bad experts argument (here a block scale) is reported before route() writes ids.
  HostTensor ids(DType::I32, {L.M, L.k}), wts(DType::F32, {L.M, L.k});
  poison(ids);
  poison(wts);
  extra.reset(DType::E4M3, {L.E, L.H, L.I / 32});
  w.w2_scale = extra;
  EXPECT_MODMOE_ERROR(fused_moe(L.logits, {}, L.hidden, w, routing_of(L), map, options_of(L),
                                out_buf, {}, nullptr, ids, wts),
                      "'weights.w2_scale' has shape");
  for (int64_t s = 0; s < ids.numel(); ++s) ASSERT_EQ(ids.data<int32_t>()[s], -1);
}

}  // namespace
}  // namespace modmoe
