// FP8 (Fp8PerTensor, Fp8Block128) through the public entry points on CPU tensors:
// modmoe::experts and modmoe::fused_moe (docs/fp8.md, "Through the API").
//   - experts() == reference::experts_fp8, bit for bit, on every output, both formats, both
//     do_finalize modes, canonical and prepared weights;
//   - fused_moe() == route() -> quantize_activations() -> experts(), bit for bit, at EP = 1
//     and on one rank of EP = 2, with the caller's workspace or the CPU scratch;
//   - accuracy against float64 over the dequantized weights, with the bounds of docs/fp8.md
//     (0.04 without intermediate rounding; 5e-3 with the intermediate rounded as defined);
//   - parity: one caller function runs the experts stage for bf16 and both FP8 schemes, and
//     one runs fused_moe; only the weights (scheme, tensors) and hidden (+ scale) differ;
//   - expert parallelism: per-rank slices summed == single within the bf16 rounding of the
//     partial sums, and non-local ids (-1, E, other ranks') contribute exactly nothing;
//   - FP8 fast accumulation (fp8-tensor, ExpertsOptions::fp8_fast_accum): experts() and
//     fused_moe() carry it to the oracle bit for bit, the same float64 bounds, the same
//     workspace; every other scheme refused;
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
#include "reference/quant.h"

namespace modmoe {
namespace {

constexpr int64_t kB = kFp8BlockSize;
constexpr auto kNone = QuantScheme::None;
constexpr auto kTen = QuantScheme::Fp8PerTensor;
constexpr auto kBlk = QuantScheme::Fp8Block128;

// Bounds (docs/fp8.md, "Experts", and docs/contract.md "Numerics"):
constexpr double kBf16Tol = 6e-3;     // a bf16 pipeline against float64 (contract)
constexpr double kFp8Tol = 0.04;      // FP8 against float64 with no intermediate rounding
constexpr double kFp8EmulTol = 5e-3;  // FP8 against float64 with the intermediate as defined

using test::expect_same;
using test::poison;
using test::StdOutputs;

// ---------------------------------------------------------------------------------------
// One MoE layer: float master weights, bf16 hidden states, routing. Every scheme's tensors
// are made from the same masters.
// ---------------------------------------------------------------------------------------

struct Layer {
  int64_t M = 32, H = 256, I = 256;
  int E = 8, k = 3;
  Activation act = Activation::Swiglu;
  bool biases = true;
  std::vector<float> w13, w2;  // [E, 2I (or I), H], [E, H, I] float, canonical GateUp
  HostTensor hidden;           // [M, H] bf16, 1x128 groups of magnitudes 2^-3 .. 2^3
  HostTensor ids, wts;         // [M, k] int32 global ids (some -1 / E), fp32 weights
  HostTensor logits;           // [M, E] fp32, for fused_moe
  HostTensor b13, b2;          // [E, 2I (or I)], [E, H] fp32
  int64_t rows13() const { return is_gated(act) ? 2 * I : I; }
};

Layer make_layer(uint64_t salt, Activation act = Activation::Swiglu, double junk = 0.1) {
  std::mt19937_64 rng(test::seed(salt));
  Layer L;
  L.act = act;
  const int64_t M = L.M, H = L.H, I = L.I;
  L.hidden.reset(DType::BF16, {M, H});
  test::fill_normal(L.hidden, rng, 1.0f);
  std::uniform_int_distribution<int> ex(-3, 3);
  for (int64_t g = 0; g < M * H / kB; ++g) {
    const float f = std::ldexp(1.0f, ex(rng));
    for (int64_t i = g * kB; i < (g + 1) * kB; ++i) {
      auto& b = L.hidden.data<uint16_t>()[i];
      b = float_to_bf16_bits(bf16_bits_to_float(b) * f);
    }
  }
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
  L.w2 = test::block_varied(rng, L.E, H, I, 1.0f / std::sqrt(float(I)));
  L.b13.reset(DType::F32, {L.E, L.rows13()});
  test::fill_normal(L.b13, rng, 0.05f);
  L.b2.reset(DType::F32, {L.E, H});
  test::fill_normal(L.b2, rng, 0.05f);
  return L;
}

// The weight tensors of one scheme, as its checkpoint holds them: bf16 (None) or e4m3 with
// fp32 dequantization scales, canonical layout.
struct SchemeWeights {
  QuantScheme scheme = kNone;
  HostTensor w13, w2;  // bf16 or e4m3
  HostTensor s13, s2;  // FP8 only: [E] or [E, R/128, C/128] fp32

  ExpertWeights view(const Layer& L) const {
    ExpertWeights w;
    w.scheme = scheme;
    w.w13 = w13;
    w.w2 = w2;
    if (scheme != kNone) {
      w.w13_scale = s13;
      w.w2_scale = s2;
    }
    if (L.biases) {
      w.w13_bias = L.b13;
      w.w2_bias = L.b2;
    }
    return w;
  }
};

HostTensor to_bf16(const std::vector<float>& v, std::vector<int64_t> shape) {
  HostTensor t(DType::BF16, shape);
  for (size_t i = 0; i < v.size(); ++i) t.data<uint16_t>()[i] = float_to_bf16_bits(v[i]);
  return t;
}

SchemeWeights make_weights(const Layer& L, QuantScheme scheme) {
  SchemeWeights s;
  s.scheme = scheme;
  if (scheme == kNone) {
    s.w13 = to_bf16(L.w13, {L.E, L.rows13(), L.H});
    s.w2 = to_bf16(L.w2, {L.E, L.H, L.I});
  } else {
    test::quantize_weights(L.w13, L.E, L.rows13(), L.H, scheme, s.w13, s.s13);
    test::quantize_weights(L.w2, L.E, L.H, L.I, scheme, s.w2, s.s2);
  }
  return s;
}

// The activations of one scheme: the bf16 hidden itself, or its e4m3 quantization (dynamic
// scale) through the public quantizer.
struct Activations {
  HostTensor q, scale;  // FP8 only
  TensorView hidden, hidden_scale;
};

Activations make_activations(const Layer& L, QuantScheme scheme) {
  Activations a;
  if (scheme == kNone) {
    a.hidden = L.hidden;
    return a;
  }
  a.q.reset(DType::E4M3, {L.M, L.H});
  if (scheme == kBlk) {
    a.scale.reset(DType::F32, {L.M, L.H / kB});
  } else {
    a.scale.reset(DType::F32, {1});
  }
  quantize_activations(L.hidden, scheme, a.q, a.scale);
  a.hidden = a.q;
  a.hidden_scale = a.scale;
  return a;
}

// A view of experts [first, first + count) of a per-expert tensor (weights, scales, biases).
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
  for (TensorView* t : {&s.w13, &s.w2, &s.w13_scale, &s.w2_scale, &s.w13_bias, &s.w2_bias}) {
    if (t->defined()) *t = slice_experts(*t, first, count);
  }
  return s;
}

// ---------------------------------------------------------------------------------------
// The caller's code. The same for every scheme: only `w` (scheme and tensors) and
// hidden / hidden_scale differ (docs/contract.md, "Quantized parity").
// ---------------------------------------------------------------------------------------

// The experts stage, finalized: out [M, H] bf16, with a workspace sized by the library.
ExpertsInputs inputs_of(const TensorView& hidden, const TensorView& hidden_scale,
                        const TensorView& ids, const TensorView& wts) {
  ExpertsInputs in;
  in.hidden = hidden;
  in.hidden_scale = hidden_scale;
  in.topk_ids = ids;
  in.topk_weights = wts;
  return in;
}

HostTensor run_experts_stage(const TensorView& hidden, const TensorView& hidden_scale,
                             const TensorView& ids, const TensorView& wts,
                             const ExpertWeights& w, const ExpertMap& map,
                             const ExpertsOptions& opt) {
  const ExpertsInputs in = inputs_of(hidden, hidden_scale, ids, wts);
  HostTensor out(DType::BF16, {ids.size(0), w.hidden()});
  poison(out);
  ExpertsOutputs outs;
  outs.out = out;
  const size_t ws_bytes = experts_workspace_size(make_experts_desc(in, w, map, opt, outs));
  HostTensor ws(DType::U8, {static_cast<int64_t>(ws_bytes)});
  experts(in, w, map, opt, outs, {ws.view().data, ws_bytes});
  return out;
}

// reference::experts_fp8 on the same inputs as run_experts_stage: the finalized output.
HostTensor run_oracle(const TensorView& hidden, const TensorView& hidden_scale,
                      const TensorView& ids, const TensorView& wts, const ExpertWeights& w,
                      const ExpertMap& map, const ExpertsOptions& opt) {
  HostTensor out(DType::BF16, {ids.size(0), w.hidden()});
  poison(out);
  ExpertsOutputs outs;
  outs.out = out;
  reference::experts_fp8(inputs_of(hidden, hidden_scale, ids, wts), w, map, opt, outs);
  return out;
}

// The sizes part of the ExpertsDesc of layer L (what the workspace queries read).
ExpertsDesc desc_of(const Layer& L, const ExpertMap& map, QuantScheme scheme) {
  ExpertsDesc desc;
  desc.num_tokens = L.M;
  desc.hidden = L.H;
  desc.intermediate = L.I;
  desc.top_k = L.k;
  desc.expert_map = map;
  desc.scheme = scheme;
  return desc;
}

RoutingParams routing_of(const Layer& L) {
  RoutingParams rp;
  rp.method = RoutingMethod::Renormalize;
  rp.num_experts = L.E;
  rp.top_k = L.k;
  return rp;
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

ExpertsOptions options_of(const Layer& L, bool do_finalize = true) {
  ExpertsOptions o;
  o.activation.kind = L.act;
  o.do_finalize = do_finalize;
  return o;
}

// ---------------------------------------------------------------------------------------
// float64 reference over the dequantized values, independent of src/
// ---------------------------------------------------------------------------------------

// [E, R, C] as float64: bf16 values, or float(q) * scale of the element's block (expert).
std::vector<double> dequantize_weights(const SchemeWeights& s, int64_t E, int64_t R,
                                       int64_t C, bool w13) {
  const HostTensor& q = w13 ? s.w13 : s.w2;
  const HostTensor& sc = w13 ? s.s13 : s.s2;
  std::vector<double> out(static_cast<size_t>(E * R * C));
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t x = (e * R + r) * C + c;
        if (s.scheme == kNone) {
          out[x] = bf16_bits_to_float(q.data<uint16_t>()[x]);
          continue;
        }
        const double f = s.scheme == kBlk
                             ? sc.data<float>()[(e * (R / kB) + r / kB) * (C / kB) + c / kB]
                             : sc.data<float>()[e];
        out[x] = double(fp8::e4m3_to_float(q.data<uint8_t>()[x])) * f;
      }
    }
  }
  return out;
}

std::vector<double> dequantize_hidden(const Layer& L, const Activations& a, QuantScheme scheme) {
  std::vector<double> x(static_cast<size_t>(L.M * L.H));
  for (int64_t m = 0; m < L.M; ++m) {
    for (int64_t c = 0; c < L.H; ++c) {
      const int64_t i = m * L.H + c;
      if (scheme == kNone) {
        x[i] = bf16_bits_to_float(L.hidden.data<uint16_t>()[i]);
        continue;
      }
      const float* s = a.scale.data<float>();
      const double f = scheme == kBlk ? s[m * (L.H / kB) + c / kB] : s[0];
      x[i] = double(fp8::e4m3_to_float(a.q.data<uint8_t>()[i])) * f;
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

// out [M, H] = sum over local j of w_j * (act(x W13^T + b13) W2^T + b2), float64. With
// `emulate`, the activation is rounded to bf16, and for FP8 then re-quantized with 1x128
// groups, as docs/fp8.md defines the GEMM2 input.
std::vector<double> dense_f64(const Layer& L, QuantScheme scheme, const std::vector<double>& x,
                              const std::vector<double>& w13, const std::vector<double>& w2,
                              const TensorView& ids, const TensorView& wts,
                              const ExpertMap& map, bool emulate) {
  const int64_t M = L.M, H = L.H, I = L.I, rows = L.rows13();
  const int k = L.k;
  const bool gated = is_gated(L.act);
  std::vector<double> out(static_cast<size_t>(M * H), 0.0), a(static_cast<size_t>(I));
  std::vector<float> af(static_cast<size_t>(I));
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
        a[i] = act_f64(L.act, g, u);
      }
      if (emulate) {
        for (int64_t i = 0; i < I; ++i) af[i] = round_to_bf16(static_cast<float>(a[i]));
        for (int64_t g = 0; g < I / kB; ++g) {
          float amax = 0.0f;
          for (int64_t i = g * kB; i < (g + 1) * kB; ++i) amax = std::max(amax, std::fabs(af[i]));
          const float sc = std::max(amax, 1e-10f) / 448.0f;
          for (int64_t i = g * kB; i < (g + 1) * kB; ++i) {
            a[i] = scheme == kNone
                       ? double(af[i])
                       : double(fp8::e4m3_to_float(fp8::float_to_e4m3(af[i] / sc, true))) * sc;
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        double y = L.b2.data<float>()[id * H + h];
        for (int64_t i = 0; i < I; ++i) y += a[i] * w2[(id * H + h) * I + i];
        out[m * H + h] += wj * y;
      }
    }
  }
  return out;
}

struct Dense {
  std::vector<double> pure, emulated;
};

Dense dense_of(const Layer& L, const SchemeWeights& sw, const Activations& a,
               const TensorView& ids, const TensorView& wts, const ExpertMap& map) {
  const std::vector<double> x = dequantize_hidden(L, a, sw.scheme);
  const std::vector<double> w13 = dequantize_weights(sw, L.E, L.rows13(), L.H, true);
  const std::vector<double> w2 = dequantize_weights(sw, L.E, L.H, L.I, false);
  return {dense_f64(L, sw.scheme, x, w13, w2, ids, wts, map, false),
          dense_f64(L, sw.scheme, x, w13, w2, ids, wts, map, true)};
}

// ---------------------------------------------------------------------------------------
// experts() == the oracle
// ---------------------------------------------------------------------------------------

struct Case {
  QuantScheme scheme;
  Activation act;
  bool prepared;  // GateUpInterleaved, G = 8
};

std::string case_name(const Case& c) {
  return std::string(c.scheme == kBlk ? "Block" : "Tensor") + "_" + activation_name(c.act) +
         (c.prepared ? "_prepared" : "_canonical");
}

class Fp8Api : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const Case c = GetParam();
    L = make_layer(3000, c.act);
    sw = make_weights(L, c.scheme);
    x = make_activations(L, c.scheme);
    w = sw.view(L);
    if (c.prepared) {
      const auto shape_of = [](const HostTensor& t) {
        return std::vector<int64_t>(t.view().shape.begin(), t.view().shape.begin() + t.view().ndim);
      };
      p13.reset(DType::E4M3, shape_of(sw.w13));
      p2.reset(DType::E4M3, shape_of(sw.w2));
      ps13.reset(DType::F32, shape_of(sw.s13));
      ps2.reset(DType::F32, shape_of(sw.s2));
      pb13.reset(DType::F32, {L.E, L.rows13()});
      pb2.reset(DType::F32, {L.E, L.H});
      ExpertWeights dst;
      dst.w13 = p13;
      dst.w2 = p2;
      dst.w13_scale = ps13;
      dst.w2_scale = ps2;
      dst.w13_bias = pb13;
      dst.w2_bias = pb2;
      prepare_weights(w, dst);
      w = dst;
    }
  }
  ExpertsInputs inputs() const {
    ExpertsInputs in;
    in.hidden = x.hidden;
    in.hidden_scale = x.hidden_scale;
    in.topk_ids = L.ids;
    in.topk_weights = L.wts;
    return in;
  }

  Layer L;
  SchemeWeights sw;
  Activations x;
  ExpertWeights w;
  HostTensor p13, p2, ps13, ps2, pb13, pb2;
};



TEST_P(Fp8Api, ExpertsEqualsOracle) {
  const ExpertMap map = ExpertMap::single(L.E);
  for (bool fin : {true, false}) {
    SCOPED_TRACE(fin ? "do_finalize = true" : "do_finalize = false");
    StdOutputs api(L, fin), oracle(L, fin);
    experts(inputs(), w, map, options_of(L, fin), api.views());
    reference::experts_fp8(inputs(), w, map, options_of(L, fin), oracle.views());
    expect_same(api, oracle);
  }
}

TEST_P(Fp8Api, BatchedEqualsOracle) {
  // Each expert's rows of the permuted order, as a low-latency dispatch delivers them.
  const ExpertMap map = ExpertMap::single(L.E);
  StdOutputs ref(L, false);
  experts(inputs(), w, map, options_of(L, false), ref.views());
  const int64_t* offs = ref.off.data<int64_t>();
  int64_t max_m = 1;
  for (int e = 0; e < L.E; ++e) max_m = std::max(max_m, offs[e + 1] - offs[e]);
  const bool block = GetParam().scheme == kBlk;
  HostTensor bx(DType::E4M3, {L.E, max_m, L.H}), cnt(DType::I32, {L.E});
  HostTensor bs = block ? HostTensor(DType::F32, {L.E, max_m, L.H / kB})
                        : HostTensor(DType::F32, {1});
  if (!block) bs.data<float>()[0] = x.scale.data<float>()[0];
  std::vector<int64_t> slot(static_cast<size_t>(L.M * L.k), -1);
  for (int64_t s = 0; s < L.M * L.k; ++s) {
    if (ref.e2p.data<int32_t>()[s] >= 0) slot[ref.e2p.data<int32_t>()[s]] = s;
  }
  for (int e = 0; e < L.E; ++e) {
    cnt.data<int32_t>()[e] = static_cast<int32_t>(offs[e + 1] - offs[e]);
    for (int64_t r = 0; r < offs[e + 1] - offs[e]; ++r) {
      const int64_t m = slot[offs[e] + r] / L.k;
      std::memcpy(bx.data<uint8_t>() + (e * max_m + r) * L.H, x.q.data<uint8_t>() + m * L.H, L.H);
      if (block) {
        std::memcpy(bs.data<float>() + (e * max_m + r) * (L.H / kB),
                    x.scale.data<float>() + m * (L.H / kB), L.H / kB * sizeof(float));
      }
    }
  }
  ExpertsInputs bin;
  bin.hidden = bx;
  bin.hidden_scale = bs;
  bin.expert_num_tokens = cnt;
  HostTensor y_api(DType::BF16, {L.E, max_m, L.H}), y_oracle(DType::BF16, {L.E, max_m, L.H});
  poison(y_api);
  poison(y_oracle);
  ExpertsOutputs o_api, o_oracle;
  o_api.gemm2_out = y_api;
  o_oracle.gemm2_out = y_oracle;
  experts(bin, w, map, options_of(L, false), o_api);
  reference::experts_fp8(bin, w, map, options_of(L, false), o_oracle);
  EXPECT_TRUE(test::bitwise_equal(y_api, y_oracle));
  for (int e = 0; e < L.E; ++e) {  // and the batched rows are the standard call's rows
    const int64_t bytes = (offs[e + 1] - offs[e]) * L.H * 2;
    ASSERT_EQ(std::memcmp(y_api.data<uint16_t>() + e * max_m * L.H,
                          ref.g2.data<uint16_t>() + offs[e] * L.H, bytes),
              0)
        << "expert " << e;
  }
}

TEST_P(Fp8Api, UnfinalizedPlusFinalizeIsFinalized) {
  const ExpertMap map = ExpertMap::single(L.E);
  StdOutputs fin(L, true), unfin(L, false);
  experts(inputs(), w, map, options_of(L, true), fin.views());
  experts(inputs(), w, map, options_of(L, false), unfin.views());
  HostTensor out(DType::BF16, {L.M, L.H});
  poison(out);
  finalize(unfin.g2, unfin.ew, unfin.e2p, out);
  EXPECT_TRUE(test::bitwise_equal(out, fin.out));
}

TEST_P(Fp8Api, MatchesFloat64Dense) {
  const ExpertMap map = ExpertMap::single(L.E);
  StdOutputs o(L, true);
  experts(inputs(), w, map, options_of(L), o.views());
  const Dense d = dense_of(L, sw, x, L.ids, L.wts, map);
  const std::vector<double> got = test::to_double(o.out);
  const double err_pure = test::rel_l2(got, d.pure), err_emul = test::rel_l2(got, d.emulated);
  std::printf("[ rel_l2   ] vs float64 %.5f, vs float64 with the intermediate re-quantized %.6f\n",
              err_pure, err_emul);
  EXPECT_LT(err_pure, kFp8Tol);
  EXPECT_LT(err_emul, kFp8EmulTol);
}

INSTANTIATE_TEST_SUITE_P(Cases, Fp8Api,
                         ::testing::Values(Case{kBlk, Activation::Swiglu, false},
                                           Case{kBlk, Activation::Swiglu, true},
                                           Case{kBlk, Activation::Relu2, false},
                                           Case{kTen, Activation::Swiglu, false},
                                           Case{kTen, Activation::Swiglu, true},
                                           Case{kTen, Activation::Relu2, false}),
                         [](const auto& info) { return case_name(info.param); });

// ---------------------------------------------------------------------------------------
// fused_moe == route -> quantize_activations -> experts
// ---------------------------------------------------------------------------------------

TEST(Fp8ApiFused, EqualsRouteQuantizeExperts) {
  const Layer L = make_layer(3100);
  for (QuantScheme scheme : {kBlk, kTen}) {
    for (const ExpertMap& map : {ExpertMap::single(L.E), ExpertMap::for_rank(L.E, 2, 1)}) {
      SCOPED_TRACE(::testing::Message() << quant_scheme_name(scheme) << " experts ["
                                        << map.local_expert_offset << ", "
                                        << map.local_expert_offset + map.num_local_experts << ")");
      const SchemeWeights sw = make_weights(L, scheme);
      const ExpertWeights w = slice_weights(sw.view(L), map);
      const ExpertsOptions opt = options_of(L);

      // The stages one by one.
      HostTensor ids(DType::I32, {L.M, L.k}), wts(DType::F32, {L.M, L.k});
      route(L.logits, {}, routing_of(L), ids, wts);
      const Activations x = make_activations(L, scheme);
      const HostTensor staged = run_experts_stage(x.hidden, x.hidden_scale, ids, wts, w, map, opt);
      const HostTensor oracle = run_oracle(x.hidden, x.hidden_scale, ids, wts, w, map, opt);
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
}

TEST(Fp8ApiFused, WorkspaceCarriesTheQuantizedHidden) {
  // fused_moe's workspace grows by the e4m3 hidden and its scales, 256-byte aligned each.
  const Layer L = make_layer(3110);
  const ExpertMap map = ExpertMap::single(L.E);
  const RoutingParams rp = routing_of(L);
  const ExpertsOptions opt = options_of(L);
  const auto align = [](size_t b) { return (b + 255) / 256 * 256; };
  for (QuantScheme scheme : {kBlk, kTen}) {
    const SchemeWeights sw = make_weights(L, scheme);
    const ExpertWeights w = sw.view(L);
    const ExpertsDesc desc = desc_of(L, map, scheme);
    const size_t scale_bytes = scheme == kBlk ? align(L.M * (L.H / kB) * 4) : align(4);
    EXPECT_EQ(fused_moe_workspace_size(L.M, w, rp, map, opt),
              2 * align(L.M * L.k * 4) + align(L.M * L.H) + scale_bytes +
                  experts_workspace_size(desc))
        << quant_scheme_name(scheme);
  }
}

TEST(Fp8ApiFused, ZeroTokens) {
  Layer L = make_layer(3120);
  L.M = 0;
  L.hidden.reset(DType::BF16, {0, L.H});
  L.logits.reset(DType::F32, {0, L.E});
  for (QuantScheme scheme : {kBlk, kTen}) {
    const SchemeWeights sw = make_weights(L, scheme);
    EXPECT_NO_THROW(run_fused_layer(L, sw.view(L), ExpertMap::single(L.E), options_of(L)))
        << quant_scheme_name(scheme);
  }
}

// ---------------------------------------------------------------------------------------
// FP8 fast accumulation (ExpertsOptions::fp8_fast_accum, docs/fp8.md "FP8 fast accumulation")
// ---------------------------------------------------------------------------------------

// fp8-tensor with the option, through both entry points: experts() == the oracle with the
// option, bit for bit (its GEMM1 definition: the fp32 dot over all of K, one scale multiply);
// fused_moe() == route -> quantize_activations -> experts() with the option, bit for bit; the
// accuracy bounds against float64 are those of the default (the oracle's full-K sum is fp32;
// the kernel's fewer accumulator bits are measured by test_gpu_fp8_experts); the workspace
// does not depend on the option.
TEST(Fp8ApiFastAccum, ExpertsAndFusedCarryTheOption) {
  const Layer L = make_layer(3130);
  const ExpertMap map = ExpertMap::single(L.E);
  const SchemeWeights sw = make_weights(L, kTen);
  const ExpertWeights w = sw.view(L);
  ExpertsOptions fast = options_of(L);
  fast.fp8_fast_accum = true;

  HostTensor ids(DType::I32, {L.M, L.k}), wts(DType::F32, {L.M, L.k});
  route(L.logits, {}, routing_of(L), ids, wts);
  const Activations x = make_activations(L, kTen);
  const HostTensor staged = run_experts_stage(x.hidden, x.hidden_scale, ids, wts, w, map, fast);
  const HostTensor oracle = run_oracle(x.hidden, x.hidden_scale, ids, wts, w, map, fast);
  EXPECT_TRUE(test::bitwise_equal(staged, oracle));
  EXPECT_TRUE(test::bitwise_equal(run_fused_layer(L, w, map, fast), staged));

  const Dense d = dense_of(L, sw, x, ids, wts, map);
  const std::vector<double> got = test::to_double(staged);
  const double err_pure = test::rel_l2(got, d.pure), err_emul = test::rel_l2(got, d.emulated);
  std::printf("[ rel_l2   ] fp8_fast_accum: vs float64 %.5f, vs float64 with the intermediate "
              "re-quantized %.6f\n", err_pure, err_emul);
  EXPECT_LT(err_pure, kFp8Tol);
  EXPECT_LT(err_emul, kFp8EmulTol);

  const ExpertsInputs in = inputs_of(x.hidden, x.hidden_scale, ids, wts);
  HostTensor out(DType::BF16, {L.M, L.H});
  ExpertsOutputs outs;
  outs.out = out;
  const ExpertsDesc desc_fast = make_experts_desc(in, w, map, fast, outs);
  EXPECT_TRUE(desc_fast.fp8_fast_accum);
  const ExpertsDesc desc_default = make_experts_desc(in, w, map, options_of(L), outs);
  EXPECT_FALSE(desc_default.fp8_fast_accum);
  EXPECT_EQ(experts_workspace_size(desc_fast), experts_workspace_size(desc_default));
  EXPECT_EQ(fused_moe_workspace_size(L.M, w, routing_of(L), map, fast),
            fused_moe_workspace_size(L.M, w, routing_of(L), map, options_of(L)));
}

// The option is an fp8-tensor one: any other scheme is refused, by experts(), fused_moe(),
// the workspace queries and ExpertsDesc::validate(), with the scheme named.
TEST(Fp8ApiFastAccum, OtherSchemesAreRefused) {
  const Layer L = make_layer(3140);
  const ExpertMap map = ExpertMap::single(L.E);
  ExpertsOptions fast = options_of(L);
  fast.fp8_fast_accum = true;
  for (QuantScheme scheme : {kBlk, kNone}) {
    SCOPED_TRACE(quant_scheme_name(scheme));
    const SchemeWeights sw = make_weights(L, scheme);
    const ExpertWeights w = sw.view(L);
    const Activations x = make_activations(L, scheme);
    const std::string named = std::string("quant scheme ") + quant_scheme_name(scheme);
    EXPECT_MODMOE_ERROR(run_experts_stage(x.hidden, x.hidden_scale, L.ids, L.wts, w, map, fast),
                        "'options.fp8_fast_accum' = true", named.c_str(),
                        "expected quant scheme fp8-tensor", "fp8_fast_accum = false");
    HostTensor out(DType::BF16, {L.M, L.H});
    EXPECT_MODMOE_ERROR(fused_moe(L.logits, {}, L.hidden, w, routing_of(L), map, fast, out),
                        "'fp8_fast_accum' = true", named.c_str(),
                        "expected quant scheme fp8-tensor");
    EXPECT_MODMOE_ERROR(fused_moe_workspace_size(L.M, w, routing_of(L), map, fast),
                        "'fp8_fast_accum' = true", named.c_str());
  }
  ExpertsDesc desc = desc_of(L, map, kNone);
  desc.fp8_fast_accum = true;
  for (QuantScheme scheme : {kNone, kBlk, QuantScheme::Nvfp4}) {
    desc.scheme = scheme;
    const std::string named = std::string("quant scheme ") + quant_scheme_name(scheme);
    EXPECT_MODMOE_ERROR(desc.validate(), "'fp8_fast_accum' = true", named.c_str(),
                        "expected quant scheme fp8-tensor");
    EXPECT_MODMOE_ERROR(experts_workspace_size(desc), "'fp8_fast_accum' = true");
  }
  desc.scheme = kTen;
  EXPECT_NO_THROW(desc.validate());
  EXPECT_NO_THROW(experts_workspace_size(desc));
}

// ---------------------------------------------------------------------------------------
// Parity: the caller's code does not change with the scheme
// ---------------------------------------------------------------------------------------

TEST(Fp8ApiParity, OneCallerCodePathForEveryScheme) {
  const Layer L = make_layer(3200);
  const ExpertMap map = ExpertMap::single(L.E);
  const ExpertsOptions opt = options_of(L);
  HostTensor ids(DType::I32, {L.M, L.k}), wts(DType::F32, {L.M, L.k});
  route(L.logits, {}, routing_of(L), ids, wts);

  std::vector<double> bf16_out;
  for (QuantScheme scheme : {kNone, kTen, kBlk}) {
    SCOPED_TRACE(quant_scheme_name(scheme));
    // What changes with the scheme: the weights (scheme, tensors) and hidden (+ its scale).
    const SchemeWeights sw = make_weights(L, scheme);
    const Activations x = make_activations(L, scheme);

    // What does not: the same two functions, the same routing, options and outputs.
    const HostTensor modular =
        run_experts_stage(x.hidden, x.hidden_scale, ids, wts, sw.view(L), map, opt);
    const HostTensor fused = run_fused_layer(L, sw.view(L), map, opt);
    EXPECT_TRUE(test::bitwise_equal(fused, modular));

    const Dense d = dense_of(L, sw, x, ids, wts, map);
    const std::vector<double> got = test::to_double(modular);
    const double err_pure = test::rel_l2(got, d.pure), err_emul = test::rel_l2(got, d.emulated);
    if (scheme == kNone) {
      bf16_out = got;
      std::printf("[ rel_l2   ] none: vs float64 %.5f\n", err_pure);
      EXPECT_LT(err_pure, kBf16Tol);
      continue;
    }
    // Against the bf16 layer on the same inputs (bf16 weights and hidden, not dequantized
    // ones): four e4m3 roundings apart (hidden, w13, intermediate, w2), each up to
    // u / sqrt(3) = 0.036 relative RMS (u = 2^-4) and independent, so about
    // sqrt(4) x 0.036 = 0.072. Measured 0.06 to 0.07; reported, bounded at 0.1.
    const double err_vs_bf16 = test::rel_l2(got, bf16_out);
    std::printf("[ rel_l2   ] %s: vs float64 %.5f, emulated %.6f, vs the bf16 layer %.5f\n",
                quant_scheme_name(scheme), err_pure, err_emul, err_vs_bf16);
    EXPECT_LT(err_pure, kFp8Tol);
    EXPECT_LT(err_emul, kFp8EmulTol);
    EXPECT_LT(err_vs_bf16, 0.1);
  }
}

// ---------------------------------------------------------------------------------------
// Expert parallelism
// ---------------------------------------------------------------------------------------

TEST(Fp8ApiEp, SlicesSumToSingle) {
  const Layer L = make_layer(3300, Activation::Swiglu, 0.15);  // -1 and E padding ids
  const int ep = 4;
  const int64_t M = L.M, H = L.H, k = L.k;
  const ExpertsOptions opt = options_of(L);
  for (QuantScheme scheme : {kBlk, kTen}) {
    SCOPED_TRACE(quant_scheme_name(scheme));
    const SchemeWeights sw = make_weights(L, scheme);
    // Every rank receives the same quantized rows (one dynamic scale for the whole batch).
    const Activations x = make_activations(L, scheme);
    const ExpertMap single_map = ExpertMap::single(L.E);
    const HostTensor single =
        run_experts_stage(x.hidden, x.hidden_scale, L.ids, L.wts, sw.view(L), single_map, opt);

    std::vector<float> sum(static_cast<size_t>(M * H), 0.0f);
    for (int r = 0; r < ep; ++r) {
      SCOPED_TRACE(::testing::Message() << "rank " << r);
      const ExpertMap map = ExpertMap::for_rank(L.E, ep, r);
      const ExpertWeights w = slice_weights(sw.view(L), map);
      const HostTensor o = run_experts_stage(x.hidden, x.hidden_scale, L.ids, L.wts, w, map, opt);
      for (int64_t i = 0; i < M * H; ++i) sum[i] += bf16_bits_to_float(o.data<uint16_t>()[i]);

      // Non-local ids contribute exactly nothing: other ranks' ids rewritten to -1 or E with
      // NaN weights change no bit; rows with no local id are exact zeros.
      HostTensor ids2(DType::I32, {M, k}), wts2(DType::F32, {M, k});
      for (int64_t s = 0; s < M * k; ++s) {
        const int32_t id = L.ids.data<int32_t>()[s];
        const bool local = map.is_local(id);
        ids2.data<int32_t>()[s] = local ? id : (s % 2 ? -1 : L.E);
        wts2.data<float>()[s] = local ? L.wts.data<float>()[s] : std::nanf("");
      }
      const HostTensor o2 = run_experts_stage(x.hidden, x.hidden_scale, ids2, wts2, w, map, opt);
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
    // The gemm2 rows are the same on every rank (the intermediate's 1x128 groups belong to
    // one row); what differs is that each rank's partial sum is rounded to bf16 before the
    // combine (2^-8 / sqrt(3) = 0.0023 relative RMS), and the combined sum once more.
    // Measured 0.002 to 0.003 over seeds 1-5; bound 5e-3, as for the emulated float64.
    std::vector<double> combined(sum.size());
    for (size_t i = 0; i < sum.size(); ++i) combined[i] = round_to_bf16(sum[i]);
    const double err_single = test::rel_l2(combined, test::to_double(single));
    const double err_dense =
        test::rel_l2(combined, dense_of(L, sw, x, L.ids, L.wts, single_map).emulated);
    std::printf("[ rel_l2   ] %s: EP sum vs single %.6f, vs float64 (emulated) %.6f\n",
                quant_scheme_name(scheme), err_single, err_dense);
    EXPECT_LT(err_single, kFp8EmulTol);
    EXPECT_LT(err_dense, kFp8EmulTol);
  }
}

// ---------------------------------------------------------------------------------------
// Bad arguments
// ---------------------------------------------------------------------------------------

// A valid FP8 call (M = 32, H = I = 256, E = 8, k = 3, Fp8Block128) that each test breaks in
// one place.
class Fp8ApiBad : public ::testing::Test {
 protected:
  void SetUp() override {
    L = make_layer(3400);
    sw = make_weights(L, kBlk);
    x = make_activations(L, kBlk);
    w = sw.view(L);
    in.hidden = x.hidden;
    in.hidden_scale = x.hidden_scale;
    in.topk_ids = L.ids;
    in.topk_weights = L.wts;
    out_buf.reset(DType::BF16, {L.M, L.H});
    out.out = out_buf;
  }
  void run() { experts(in, w, map, options_of(L), out); }
  void fused(const Workspace& ws = {}) {
    fused_moe(L.logits, {}, hidden, w, routing_of(L), map, options_of(L), out_buf, ws);
  }
  // The same call with the weights and scales of another H (or I).
  void reshape(int64_t H, int64_t I, QuantScheme scheme) {
    w.scheme = scheme;
    b13.reset(DType::E4M3, {L.E, 2 * I, H});
    b2.reset(DType::E4M3, {L.E, H, I});
    w.w13 = b13;
    w.w2 = b2;
    w.w13_bias = {};
    w.w2_bias = {};
    extra.reset(DType::E4M3, {L.M, H});
    in.hidden = extra;
  }

  Layer L;
  SchemeWeights sw;
  Activations x;
  ExpertWeights w;
  ExpertMap map = ExpertMap::single(8);
  ExpertsInputs in;
  ExpertsOutputs out;
  TensorView hidden;  // fused_moe's bf16 hidden (L.hidden unless a test changes it)
  HostTensor out_buf, extra, b13, b2;
};

TEST_F(Fp8ApiBad, ValidCallsPass) {
  EXPECT_NO_THROW(run());
  hidden = L.hidden;
  EXPECT_NO_THROW(fused());
}

TEST_F(Fp8ApiBad, HiddenNotE4m3) {
  in.hidden = L.hidden;
  EXPECT_MODMOE_ERROR(run(), "'hidden' has dtype bf16 with FP8 weights",
                      "quant scheme fp8-block", "expected e4m3", "hidden_scale");
}

TEST_F(Fp8ApiBad, HiddenScaleShape) {
  extra.reset(DType::F32, {L.M, L.H / 64});
  in.hidden_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'hidden_scale' has shape [32, 4]", "[T, H/128] = [32, 2]");
}

TEST_F(Fp8ApiBad, HiddenScaleDtype) {
  extra.reset(DType::BF16, {L.M, L.H / kB});
  in.hidden_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'hidden_scale' has dtype bf16", "expected f32");
}

TEST_F(Fp8ApiBad, HiddenScaleMissing) {
  in.hidden_scale = {};
  EXPECT_MODMOE_ERROR(run(), "'hidden_scale' is missing");
}

TEST_F(Fp8ApiBad, PerTensorHiddenScaleShape) {
  const SchemeWeights t = make_weights(L, kTen);
  const Activations xt = make_activations(L, kTen);
  w = t.view(L);
  in.hidden = xt.hidden;
  extra.reset(DType::F32, {2});
  in.hidden_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'hidden_scale' has shape [2]",
                      "expected [1] or one scale per row of hidden");
}

TEST_F(Fp8ApiBad, BlockWeightScaleTransposed) {
  extra.reset(DType::F32, {L.E, L.H / kB, 2 * L.I / kB});
  w.w13_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'weights.w13_scale' has shape [8, 2, 4]", "[8, 4, 2]");
}

TEST_F(Fp8ApiBad, PerTensorWeightScaleShape) {
  const SchemeWeights t = make_weights(L, kTen);
  const Activations xt = make_activations(L, kTen);
  w = t.view(L);
  in.hidden = xt.hidden;
  in.hidden_scale = xt.hidden_scale;
  extra.reset(DType::F32, {L.E, 2});  // separate w1 / w3 scales: re-quantize to one first
  w.w13_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'weights.w13_scale' has shape [8, 2]", "[8]");
}

TEST_F(Fp8ApiBad, WeightScaleDtype) {
  extra.reset(DType::BF16, {L.E, L.H / kB, L.I / kB});
  w.w2_scale = extra;
  EXPECT_MODMOE_ERROR(run(), "'weights.w2_scale' has dtype bf16", "expected f32");
}

TEST_F(Fp8ApiBad, WeightsNotE4m3) {
  const SchemeWeights b = make_weights(L, kNone);
  w.w2 = b.w2;
  EXPECT_MODMOE_ERROR(run(), "'weights.w2' has dtype bf16", "expected e4m3");
}

TEST_F(Fp8ApiBad, BlockHiddenNotMultipleOf128) {
  reshape(192, 256, kBlk);
  EXPECT_MODMOE_ERROR(run(), "'hidden' = 192", "multiple of 128");
}

TEST_F(Fp8ApiBad, BlockIntermediateNotMultipleOf128) {
  reshape(256, 192, kBlk);
  EXPECT_MODMOE_ERROR(run(), "'intermediate' = 192", "multiple of 128");
}

TEST_F(Fp8ApiBad, PerTensorIntermediateNotMultipleOf128) {
  reshape(256, 192, kTen);
  EXPECT_MODMOE_ERROR(run(), "'intermediate' = 192", "multiple of 128");
}

TEST_F(Fp8ApiBad, DescNotMultipleOf128) {
  ExpertsDesc desc;
  desc.num_tokens = 4;
  desc.hidden = 192;
  desc.intermediate = 256;
  desc.top_k = 2;
  desc.expert_map = map;
  desc.scheme = kBlk;
  EXPECT_MODMOE_ERROR(experts_workspace_size(desc), "'hidden' = 192",
                      "quant scheme fp8-block", "multiples of 128");
  desc.hidden = 256;
  EXPECT_NO_THROW(experts_workspace_size(desc));
  desc.scheme = QuantScheme::Mxfp8;
  EXPECT_MODMOE_ERROR(experts_workspace_size(desc), "not supported yet", "quant scheme mxfp8");
}

TEST_F(Fp8ApiBad, OtherSchemesNamed) {
  // Mxfp8 is not in the experts stage yet (NVFP4 is: tests/cpu/test_nvfp4_api.cpp).
  w.scheme = QuantScheme::Mxfp8;
  EXPECT_MODMOE_ERROR(run(), "not supported yet", "quant scheme mxfp8");
  hidden = L.hidden;
  EXPECT_MODMOE_ERROR(fused(), "not supported yet", "quant scheme mxfp8");
}

TEST_F(Fp8ApiBad, CudaTensorsNeedThePreparedLayout) {
  // Views that claim CUDA memory, with w13 as a checkpoint stores it (Canonical): the GPU path
  // reads prepare_weights' layout only, and says so before anything dereferences the views.
  ASSERT_EQ(w.layout, WeightLayout::Canonical);
  const auto cuda = [](TensorView v) {
    v.device = Device::cuda(0);
    return v;
  };
  for (TensorView* t : {&in.hidden, &in.hidden_scale, &in.topk_ids, &in.topk_weights, &w.w13,
                        &w.w2, &w.w13_scale, &w.w2_scale, &w.w13_bias, &w.w2_bias, &out.out}) {
    *t = cuda(*t);
  }
  EXPECT_MODMOE_ERROR(run(), "not supported yet", "FP8 experts on the GPU", "experts",
                      "fp8-block", "cuda:0", "prepare_weights", "Canonical");
  hidden = cuda(L.hidden);
  TensorView logits = cuda(L.logits);
  EXPECT_MODMOE_ERROR(fused_moe(logits, {}, hidden, w, routing_of(L), map, options_of(L),
                                cuda(out_buf)),
                      "not supported yet", "FP8 experts on the GPU", "fused_moe",
                      "prepare_weights");
}

TEST_F(Fp8ApiBad, FusedHiddenMustBeBf16) {
  hidden = x.hidden;  // already e4m3: fused_moe quantizes itself
  EXPECT_MODMOE_ERROR(fused(), "'hidden' has dtype e4m3 with FP8 weights", "expected bf16",
                      "route() then experts()");
}

TEST_F(Fp8ApiBad, FusedWorkspaceTooSmall) {
  hidden = L.hidden;
  const size_t need = fused_moe_workspace_size(L.M, w, routing_of(L), map, options_of(L));
  extra.reset(DType::U8, {static_cast<int64_t>(need)});
  const std::string want = "expected at least " + std::to_string(need) + " bytes";
  EXPECT_MODMOE_ERROR(fused({extra.view().data, need - 1}), "'workspace'", want.c_str());
  EXPECT_NO_THROW(fused({extra.view().data, need}));
}

TEST_F(Fp8ApiBad, FusedNothingRunsBeforeValidation) {
  // A bad experts argument (here a weight scale) is reported before route() writes ids.
  HostTensor ids(DType::I32, {L.M, L.k}), wts(DType::F32, {L.M, L.k});
  poison(ids);
  poison(wts);
  extra.reset(DType::F32, {L.E, L.H / kB, 2 * L.I / kB});
  w.w13_scale = extra;
  EXPECT_MODMOE_ERROR(fused_moe(L.logits, {}, L.hidden, w, routing_of(L), map, options_of(L),
                                out_buf, {}, nullptr, ids, wts),
                      "'weights.w13_scale' has shape");
  for (int64_t s = 0; s < ids.numel(); ++s) ASSERT_EQ(ids.data<int32_t>()[s], -1);
}

}  // namespace
}  // namespace modmoe
