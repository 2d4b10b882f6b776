#include "bench_cell.h"

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <random>

#include "core/synth_fill.h"
#ifdef MODMOE_WITH_CUDA
#include "bench_common.h"
#endif

namespace modmoe::app {
namespace {

// k distinct experts per token: uniform, or Zipf-like popularity (p ~ 1/rank) over a
// shuffled expert order.
void make_routing(HostTensor& ids, HostTensor& wts, int e, int k, bool zipf, std::mt19937_64& rng) {
  const int64_t t_count = ids.view().size(0);
  std::vector<int> order(static_cast<size_t>(e));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<double> p(static_cast<size_t>(e));
  for (int i = 0; i < e; ++i) p[i] = zipf ? 1.0 / (i + 1) : 1.0;
  std::uniform_real_distribution<float> u01(0.1f, 1.0f);
  for (int64_t t = 0; t < t_count; ++t) {
    std::vector<double> left = p;
    float sum = 0;
    for (int j = 0; j < k; ++j) {
      std::discrete_distribution<int> pick(left.begin(), left.end());
      const int r = pick(rng);
      left[r] = 0.0;
      ids.data<int32_t>()[t * k + j] = order[r];
      const float w = u01(rng);
      wts.data<float>()[t * k + j] = w;
      sum += w;
    }
    for (int j = 0; j < k; ++j) wts.data<float>()[t * k + j] /= sum;
  }
}

// One --ab variant: an environment variable the experts stage reads at every call
// (MODMOE_GEMM_TAIL=1, MODMOE_FUSED_PERMUTE=1, MODMOE_GEMM_CONFIG=...), set while the same
// cell is captured and timed again.
class EnvVariant {
 public:
  explicit EnvVariant(const std::string& assignment) {
    const size_t eq = assignment.find('=');
    MODMOE_CHECK(eq != std::string::npos && eq > 0, "option '--ab': '", assignment,
                 "': expected NAME=VALUE");
    name_ = assignment.substr(0, eq);
    const char* old = std::getenv(name_.c_str());
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(name_.c_str(), assignment.substr(eq + 1).c_str(), 1);
  }
  ~EnvVariant() {
    if (had_) {
      setenv(name_.c_str(), old_.c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }
  EnvVariant(const EnvVariant&) = delete;
  EnvVariant& operator=(const EnvVariant&) = delete;

 private:
  std::string name_, old_;
  bool had_ = false;
};

}  // namespace

ExpertsInputs CellInputs::inputs(int r, BenchDtype dtype) const {
  ExpertsInputs in;
  in.hidden = hidden[r];
  if (is_fp8(dtype)) {
    in.hidden = hidden_q[r];
    in.hidden_scale = hidden_scale[r];
  }
  in.topk_ids = ids[r];
  in.topk_weights = wts[r];
  return in;
}

ExpertsOutputs CellInputs::outputs(int r) const {
  ExpertsOutputs o;
  o.out = out[r];
  return o;
}

CellInputs make_cell_inputs(const Layer& layer, int64_t tokens, bool zipf, uint64_t seed,
                            BenchDtype dtype) {
  const Preset& p = layer.preset;
  const int e = p.num_experts, k = p.top_k;
  const int64_t h = p.hidden;
  const Device dev = layer.device;
  CellInputs c;
  // Rotated inputs: R batches whose activations together pass 2x L2 where that is cheap.
  const double batch_bytes = static_cast<double>(tokens) * h * 2 * 2;
  c.rotations = static_cast<int>(std::clamp(256e6 / std::max(batch_bytes, 1.0), 2.0, 8.0));
  std::mt19937_64 rng(seed + tokens);
  int touched_sum = 0;
  for (int r = 0; r < c.rotations; ++r) {
    HostTensor hi(DType::I32, {tokens, k}), hw(DType::F32, {tokens, k});
    make_routing(hi, hw, e, k, zipf, rng);
    std::vector<char> hit(static_cast<size_t>(e), 0);
    for (int64_t i = 0; i < hi.numel(); ++i) hit[hi.data<int32_t>()[i]] = 1;
    touched_sum += static_cast<int>(std::count(hit.begin(), hit.end(), 1));
    c.hidden.emplace_back(DType::BF16, std::vector<int64_t>{tokens, h}, dev);
    synth::fill(c.hidden.back(), seed + 100 + r, kHidden, 0.1f);
    c.ids.emplace_back(DType::I32, std::vector<int64_t>{tokens, k}, dev);
    c.wts.emplace_back(DType::F32, std::vector<int64_t>{tokens, k}, dev);
    c.out.emplace_back(DType::BF16, std::vector<int64_t>{tokens, h}, dev);
    copy_from_host(hi, c.ids.back());
    copy_from_host(hw, c.wts.back());
    if (is_fp8(dtype)) {
      const bool block = dtype == BenchDtype::Fp8Block;
      c.hidden_q.emplace_back(DType::E4M3, std::vector<int64_t>{tokens, h}, dev);
      c.hidden_scale.emplace_back(DType::F32, block ? std::vector<int64_t>{tokens, h / kFp8BlockSize}
                                                    : std::vector<int64_t>{1}, dev);
      quantize_activations(c.hidden.back(), bench_scheme(dtype), c.hidden_q.back(),
                           c.hidden_scale.back());
    }
  }
  c.experts_touched = touched_sum / c.rotations;
  synchronize(dev);
  return c;
}

DtypeRun run_dtype(const Layer& layer, const BenchWeights& weights, const CellInputs& in,
                   int samples, bool timed, const std::vector<std::string>& ab,
                   bool fp8_fast_accum) {
  const BenchDtype dtype = weights.dtype;
  const int64_t tokens = in.hidden[0].view().size(0);
  MODMOE_CHECK(!fp8_fast_accum || dtype == BenchDtype::Fp8Tensor, "run_dtype: fp8_fast_accum ",
               "with ", bench_dtype_name(dtype), " weights: expected fp8-tensor");
  ExpertsOptions options = layer.options;
  options.fp8_fast_accum = fp8_fast_accum;
  try {
    const ExpertsDesc desc = make_experts_desc(in.inputs(0, dtype), weights.prepared, layer.map,
                                               options, in.outputs(0));
    const size_t ws_bytes = experts_workspace_size(desc);
    const Buffer ws_buf(DType::U8, {static_cast<int64_t>(ws_bytes) + 256}, layer.device);
    const Workspace ws{ws_buf.view().data, ws_bytes + 256};

    // Validate first: poisoned output, one run, sampled float64 check.
    DtypeRun run;
    poison(in.out[0]);
    experts(in.inputs(0, dtype), weights.prepared, layer.map, options, in.outputs(0), ws);
    synchronize(layer.device);
    auto subset = [&](const std::vector<int>& experts, std::vector<HostTensor>& keep) {
      return weights.subset(layer, experts, keep);
    };
    const CheckBounds bound = check_bounds(dtype, fp8_fast_accum);
    run.check = check_sampled_tokens(in.inputs(0, dtype), layer.map, options, subset,
                                     in.out[0], samples, bound.emulated > 0);
    run.correct = run.check.rel_l2 <= bound.rel_l2 &&
                  (bound.emulated == 0 || run.check.rel_l2_emulated <= bound.emulated);
    if (!timed) return run;
#ifdef MODMOE_WITH_CUDA
    auto time_us = [&] {
      return 1e3 * time_graph_ms(in.rotations, [&](int r, cudaStream_t s) {
        experts(in.inputs(r, dtype), weights.prepared, layer.map, options, in.outputs(r), ws, s);
      });
    };
    run.us = time_us();
    for (const std::string& v : ab) {
      const EnvVariant env(v);
      run.ab_us.push_back(time_us());
    }
#else
    (void)ab;
    MODMOE_FAIL("timing needs a CUDA build");
#endif
    return run;
  } catch (const Error& e) {
    MODMOE_FAIL("cell ", layer.preset.name, " T=", tokens, " with ", bench_dtype_name(dtype),
                " weights: ", e.what());
  }
}

}  // namespace modmoe::app
