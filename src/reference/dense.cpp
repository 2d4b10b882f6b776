// Float64 dense reference of the experts stage (see dense.h). Deliberately written apart from
// experts.cpp: canonical weight rows read directly, float64 throughout, its own activation
// formulas. Slots are grouped by expert only so that each weight row is widened once.
#include "reference/dense.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "core/fp8.h"
#include "core/nvfp4.h"
#include "modmoe/error.h"

namespace modmoe::reference {
namespace {

double bf16_value(uint16_t bits) { return static_cast<double>(bf16_bits_to_float(bits)); }

double round_bf16(double x) { return static_cast<double>(round_to_bf16(static_cast<float>(x))); }

double activation_f64(Activation kind, double gate, double up, double alpha, double beta,
                      double limit) {
  switch (kind) {
    case Activation::Swiglu: return gate / (1.0 + std::exp(-gate)) * up;
    case Activation::SwigluOai: {
      const double g = gate > limit ? limit : gate;
      const double u = up > limit ? limit : (up < -limit ? -limit : up);
      return g / (1.0 + std::exp(-alpha * g)) * (u + beta);
    }
    case Activation::Geglu: return 0.5 * gate * (1.0 + std::erf(gate / std::sqrt(2.0))) * up;
    case Activation::Relu2: {
      const double r = gate < 0.0 ? 0.0 : gate;
      return r * r;
    }
  }
  MODMOE_FAIL("dense_moe_f64: unknown activation ", static_cast<int>(kind));
}

bool is_fp8(QuantScheme s) { return s == QuantScheme::Fp8PerTensor || s == QuantScheme::Fp8Block128; }

// The rows of one weight tensor (w13 or w2) as float64: bf16 values, or the dequantized values
// of a quantized scheme, which are exact in float64 (an e4m3 or e2m1 * e4m3 value times an
// fp32 scale): FP8 float(q) * scale of the row's 128x128 block or expert (docs/fp8.md), NVFP4
// e2m1 * block scale * global (docs/nvfp4.md).
struct WeightRows {
  QuantScheme scheme = QuantScheme::None;
  TensorView q, scale, global;  // [E, rows, cols] (NVFP4: cols/2 bytes), scales, [E] globals
  int64_t rows = 0, cols = 0;   // per expert, in values

  void widen(int64_t e, int64_t r, double* dst) const {
    const int64_t row = e * rows + r;
    if (scheme == QuantScheme::None) {
      const auto* p = q.ptr<const uint16_t>() + row * cols;
      for (int64_t c = 0; c < cols; ++c) dst[c] = bf16_value(p[c]);
    } else if (scheme == QuantScheme::Nvfp4) {
      const auto* p = q.ptr<const uint8_t>() + row * cols / 2;
      const auto* s = scale.ptr<const uint8_t>() + row * (cols / nvfp4::kBlock);
      const double g = global.ptr<const float>()[e];
      for (int64_t c = 0; c < cols; ++c) {
        const uint8_t code = c % 2 ? nvfp4::e2m1x2_second(p[c / 2]) : nvfp4::e2m1x2_first(p[c / 2]);
        dst[c] = static_cast<double>(nvfp4::e2m1_to_float(code)) *
                 static_cast<double>(fp8::e4m3_to_float(s[c / nvfp4::kBlock])) * g;
      }
    } else {
      const auto* p = q.ptr<const uint8_t>() + row * cols;
      const float* s = scale.ptr<const float>();
      const int64_t kB = fp8::kBlock;
      for (int64_t c = 0; c < cols; ++c) {
        const float sc = scheme == QuantScheme::Fp8Block128
                             ? s[(e * (rows / kB) + r / kB) * (cols / kB) + c / kB]
                             : s[e];
        dst[c] = static_cast<double>(fp8::e4m3_to_float(p[c])) * static_cast<double>(sc);
      }
    }
  }
};

// The rows of hidden as float64: bf16, or e4m3 times its scale (Fp8Block128: one per 1x128
// group of a row; Fp8PerTensor: [1], or one per row).
struct HiddenRows {
  TensorView x, scale;  // [rows, H] (batched [E_local, max_m, H]); FP8 only: the scales
  int64_t H = 0;

  double value(int64_t row, int64_t h) const {
    if (x.dtype == DType::BF16) return bf16_value(x.ptr<const uint16_t>()[row * H + h]);
    const int64_t groups = H / fp8::kBlock;
    const float* s = scale.ptr<const float>();
    const float sc = scale.numel() == 1                   ? s[0]
                     : scale.numel() == x.numel() / H ? s[row]
                                                          : s[row * groups + h / fp8::kBlock];
    return static_cast<double>(fp8::e4m3_to_float(x.ptr<const uint8_t>()[row * H + h])) *
           static_cast<double>(sc);
  }
};

// The GEMM2 input of an FP8 kernel (docs/fp8.md, "Experts"): each row's bf16 activation
// re-quantized to e4m3 with dynamic 1x128 groups, as float64. a: [n, I], bf16 values.
void requantize_groups(double* a, int64_t n, int64_t I) {
  for (int64_t g = 0; g < n * I / fp8::kBlock; ++g) {
    double* v = a + g * fp8::kBlock;
    float amax = 0.0f;
    for (int i = 0; i < fp8::kBlock; ++i) amax = std::max(amax, std::fabs(static_cast<float>(v[i])));
    const float s = fp8::e4m3_scale_from_amax(amax);
    for (int i = 0; i < fp8::kBlock; ++i) {
      v[i] = static_cast<double>(fp8::e4m3_to_float(fp8::quantize_e4m3(static_cast<float>(v[i]), s))) *
             static_cast<double>(s);
    }
  }
}

struct DenseProblem {
  const ExpertWeights& w;
  const ActivationParams& act;
  WeightRows w13 = {}, w2 = {};  // set by dense_moe_f64
  bool round = false;
  int64_t H = 0, I = 0, rows = 0;
  bool gated = true;
  bool gate_first = true;

  // Canonical w13 row (and LoRA column) of gate / up column i.
  int64_t gate_row(int64_t i) const { return (gated && !gate_first) ? I + i : i; }
  int64_t up_row(int64_t i) const { return gate_first ? I + i : i; }

  // y[n, H] = Expert_e(x[n, H]) for n rows of one expert; x already scaled by the router
  // weight where asked; lora[r] is the row's LoRA delta [rows] or null. Each weight row is
  // widened to double once and used for all n rows.
  void expert(int64_t e, int64_t n, const double* x, const std::vector<const uint16_t*>& lora,
              double* y) const {
    const float* b13 = w.w13_bias.defined() ? w.w13_bias.ptr<const float>() + e * rows : nullptr;
    const float* b2 = w.w2_bias.defined() ? w.w2_bias.ptr<const float>() + e * H : nullptr;
    const double alpha = act.alpha_per_expert.defined() ? act.alpha_per_expert.ptr<const float>()[e]
                                                        : act.alpha;
    const double beta =
        act.beta_per_expert.defined() ? act.beta_per_expert.ptr<const float>()[e] : act.beta;
    const double limit =
        act.limit_per_expert.defined() ? act.limit_per_expert.ptr<const float>()[e] : act.limit;

    std::vector<double> wg(static_cast<size_t>(H)), wu(static_cast<size_t>(H));
    std::vector<double> a(static_cast<size_t>(n * I));  // [n, I] activations
    for (int64_t i = 0; i < I; ++i) {
      const int64_t gr = gate_row(i), ur = up_row(i);
      w13.widen(e, gr, wg.data());
      if (gated) w13.widen(e, ur, wu.data());
      for (int64_t r = 0; r < n; ++r) {
        double gate = dot(x + r * H, wg.data(), H);
        double up = gated ? dot(x + r * H, wu.data(), H) : 0.0;
        if (b13) {
          gate += b13[gr];
          if (gated) up += b13[ur];
        }
        if (lora[r]) {
          gate += bf16_value(lora[r][gr]);
          if (gated) up += bf16_value(lora[r][ur]);
        }
        double v = activation_f64(act.kind, gate, up, alpha, beta, limit);
        a[r * I + i] = round ? round_bf16(v) : v;
      }
    }
    if (round && is_fp8(w.scheme)) requantize_groups(a.data(), n, I);
    std::vector<double> w2row(static_cast<size_t>(I));
    for (int64_t h = 0; h < H; ++h) {
      w2.widen(e, h, w2row.data());
      for (int64_t r = 0; r < n; ++r) {
        y[r * H + h] = dot(a.data() + r * I, w2row.data(), I) + (b2 ? b2[h] : 0.0);
      }
    }
  }

  // float64 dot product; four partial sums so that the compiler can vectorise it.
  static double dot(const double* a, const double* b, int64_t n) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      for (int l = 0; l < 4; ++l) acc[l] += a[i + l] * b[i + l];
    }
    for (; i < n; ++i) acc[0] += a[i] * b[i];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
};

double routing_weight(const ExpertsInputs& in, int64_t x, bool to_bf16) {
  double w;
  if (!in.topk_weights.defined()) {
    w = bf16_value(static_cast<uint16_t>(static_cast<uint32_t>(in.topk_ids.ptr<const int32_t>()[x])));
  } else if (in.topk_weights.dtype == DType::BF16) {
    w = bf16_value(in.topk_weights.ptr<const uint16_t>()[x]);
  } else {
    w = in.topk_weights.ptr<const float>()[x];
  }
  return to_bf16 ? round_bf16(w) : w;
}

// One full pass; fills out (and per_slot when non-null).
void dense_pass(const ExpertsInputs& in, const ExpertMap& map, const ExpertsOptions& options,
                const DenseProblem& prob, std::vector<double>& out, std::vector<double>* per_slot) {
  const int64_t H = prob.H;
  const HiddenRows hidden{in.hidden, in.hidden_scale, H};
  const bool quantized_input = in.hidden.dtype != DType::BF16;

  if (in.format() == InputFormat::Batched) {
    const int64_t max_m = in.hidden.size(1);
    out.assign(static_cast<size_t>(map.num_local_experts * max_m * H), 0.0);
    for (int64_t e = 0; e < map.num_local_experts; ++e) {
      const int64_t n = std::min<int64_t>(in.expert_num_tokens.ptr<const int32_t>()[e], max_m);
      if (n <= 0) continue;
      std::vector<double> x(static_cast<size_t>(n * H));
      for (int64_t i = 0; i < n * H; ++i) x[i] = hidden.value(e * max_m + i / H, i % H);
      prob.expert(e, n, x.data(), std::vector<const uint16_t*>(n, nullptr),
                  out.data() + e * max_m * H);
    }
    return;
  }

  const int64_t M = in.hidden.size(0);
  const int64_t k = in.topk_ids.size(1);
  const bool packed = !in.topk_weights.defined();
  const auto* ids = in.topk_ids.ptr<const int32_t>();
  const auto* lora = in.gemm1_lora_delta.defined() ? in.gemm1_lora_delta.ptr<const uint16_t>()
                                                   : nullptr;
  out.assign(static_cast<size_t>(M * H), 0.0);
  if (per_slot) per_slot->assign(static_cast<size_t>(M * k * H), 0.0);

  // The (token, slot) pairs of each local expert, so that its weights are widened once.
  std::vector<std::vector<int64_t>> slots(static_cast<size_t>(map.num_local_experts));
  for (int64_t xi = 0; xi < M * k; ++xi) {
    const int32_t id =
        packed ? static_cast<int16_t>(static_cast<uint32_t>(ids[xi]) >> 16) : ids[xi];
    if (map.is_local(id)) slots[id - map.local_expert_offset].push_back(xi);
  }
  // y of every slot: [M * k, H]; the weighted sum is taken afterwards in (token, j) order.
  std::vector<double> y(static_cast<size_t>(M * k * H), 0.0);
  std::vector<double> out_w(static_cast<size_t>(M * k), 0.0);
  for (int64_t e = 0; e < map.num_local_experts; ++e) {
    const auto& list = slots[e];
    const int64_t n = static_cast<int64_t>(list.size());
    if (n == 0) continue;
    std::vector<double> x(static_cast<size_t>(n * H)), ye(static_cast<size_t>(n * H));
    std::vector<const uint16_t*> lora_rows(static_cast<size_t>(n), nullptr);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t xi = list[r];
      const double w = routing_weight(in, xi, options.bf16_routing_weights);
      out_w[xi] = options.apply_router_weight_on_input ? 1.0 : w;
      for (int64_t h = 0; h < H; ++h) {
        double v = hidden.value(xi / k, h);
        if (options.apply_router_weight_on_input) {
          v *= w;
          // NOTE: FP8 kernels scale the activation scales instead (docs/fp8.md): no bf16 here.
          if (prob.round && !quantized_input) v = round_bf16(v);
        }
        x[r * H + h] = v;
      }
      if (lora) lora_rows[r] = lora + xi * prob.rows;
    }
    prob.expert(e, n, x.data(), lora_rows, ye.data());
    for (int64_t r = 0; r < n; ++r) {
      std::memcpy(y.data() + list[r] * H, ye.data() + r * H, H * sizeof(double));
    }
  }
  for (int64_t xi = 0; xi < M * k; ++xi) {
    if (out_w[xi] == 0.0) continue;
    for (int64_t h = 0; h < H; ++h) out[(xi / k) * H + h] += out_w[xi] * y[xi * H + h];
  }
  if (per_slot) *per_slot = std::move(y);
}

}  // namespace

DenseResult dense_moe_f64(const ExpertsInputs& in, const ExpertWeights& weights,
                          const ExpertMap& map, const ExpertsOptions& options,
                          const DenseOptions& dense) {
  MODMOE_CHECK(weights.layout == WeightLayout::Canonical,
               "dense_moe_f64: weights.layout must be Canonical: the dense reference reads the "
               "checkpoint layout, never a prepared one");
  MODMOE_CHECK(!in.hidden.device.is_cuda() && !weights.w13.device.is_cuda(),
               "dense_moe_f64: expected host tensors, got hidden on ", in.hidden.device.to_string());
  DenseProblem prob{weights, options.activation};
  prob.H = weights.hidden();
  prob.I = weights.intermediate();
  prob.gated = is_gated(options.activation.kind);
  prob.rows = prob.gated ? 2 * prob.I : prob.I;
  prob.gate_first = weights.order == GateUpOrder::GateUp;
  MODMOE_CHECK(weights.w13.ndim == 3 && weights.w13.size(1) == prob.rows,
               "dense_moe_f64: weights.w13 has shape ", weights.w13.shape_string(),
               ": expected [E_local, ", prob.rows, ", ", prob.H, "]");
  const QuantScheme scheme = weights.scheme;
  const bool fp8 = is_fp8(scheme), fp4 = scheme == QuantScheme::Nvfp4;
  const DType wtype = fp8 ? DType::E4M3 : fp4 ? DType::E2M1x2 : DType::BF16;
  MODMOE_CHECK((scheme == QuantScheme::None || fp8 || fp4) && weights.w13.dtype == wtype &&
                   weights.w2.dtype == wtype &&
                   (scheme == QuantScheme::None ||
                    (weights.w13_scale.defined() && weights.w2_scale.defined())) &&
                   (!fp4 || (weights.w13_global_scale.defined() && weights.w2_global_scale.defined())),
               "dense_moe_f64: weights of scheme ", quant_scheme_name(scheme), " with w13 ",
               dtype_name(weights.w13.dtype), " and w2 ", dtype_name(weights.w2.dtype),
               ": expected bf16 (none), e4m3 + scales (fp8-tensor, fp8-block) or E2M1x2 + "
               "scales + global scales (nvfp4)");
  MODMOE_CHECK(fp8 ? in.hidden.dtype == DType::E4M3 && in.hidden_scale.defined()
                   : in.hidden.dtype == DType::BF16,
               "dense_moe_f64: hidden is ", dtype_name(in.hidden.dtype), " with weights of scheme ",
               quant_scheme_name(scheme), ": expected e4m3 + hidden_scale for FP8, else bf16");
  prob.w13 = {scheme, weights.w13, weights.w13_scale, weights.w13_global_scale, prob.rows, prob.H};
  prob.w2 = {scheme, weights.w2, weights.w2_scale, weights.w2_global_scale, prob.H, prob.I};

  DenseResult res;
  prob.round = dense.round_intermediate;
  dense_pass(in, map, options, prob, res.out, dense.per_slot ? &res.per_slot : nullptr);
  if (dense.keep_unrounded) {
    prob.round = false;
    dense_pass(in, map, options, prob, res.out_unrounded, nullptr);
  }
  return res;
}

}  // namespace modmoe::reference
