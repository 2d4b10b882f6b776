// Float64 dense reference of the experts stage (see dense.h). Deliberately written apart from
// experts.cpp: canonical weight rows read directly, float64 throughout, its own activation
// formulas. Slots are grouped by expert only so that each weight row is widened once.
#include "reference/dense.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

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

struct DenseProblem {
  const ExpertWeights& w;
  const ActivationParams& act;
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
    const auto* w13 = w.w13.ptr<const uint16_t>() + e * rows * H;
    const auto* w2 = w.w2.ptr<const uint16_t>() + e * H * I;
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
      widen(w13 + gr * H, H, wg.data());
      if (gated) widen(w13 + ur * H, H, wu.data());
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
    std::vector<double> w2row(static_cast<size_t>(I));
    for (int64_t h = 0; h < H; ++h) {
      widen(w2 + h * I, I, w2row.data());
      for (int64_t r = 0; r < n; ++r) {
        y[r * H + h] = dot(a.data() + r * I, w2row.data(), I) + (b2 ? b2[h] : 0.0);
      }
    }
  }

  static void widen(const uint16_t* src, int64_t n, double* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_value(src[i]);
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
  const auto* hidden = in.hidden.ptr<const uint16_t>();

  if (in.format() == InputFormat::Batched) {
    const int64_t max_m = in.hidden.size(1);
    out.assign(static_cast<size_t>(map.num_local_experts * max_m * H), 0.0);
    for (int64_t e = 0; e < map.num_local_experts; ++e) {
      const int64_t n = std::min<int64_t>(in.expert_num_tokens.ptr<const int32_t>()[e], max_m);
      if (n <= 0) continue;
      std::vector<double> x(static_cast<size_t>(n * H));
      for (int64_t i = 0; i < n * H; ++i) x[i] = bf16_value(hidden[e * max_m * H + i]);
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
        double v = bf16_value(hidden[(xi / k) * H + h]);
        if (options.apply_router_weight_on_input) {
          v *= w;
          if (prob.round) v = round_bf16(v);
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
