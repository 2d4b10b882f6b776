// `modmoe bench experts`: the ANCHORS.md grid for the modular BF16 experts stage. Every cell
// is validated against a float64 reference before it is timed; times are medians of CUDA-
// graph replays over rotated inputs; floors come from ceilings measured in the same run.
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "args.h"
#include "bench_common.h"
#include "check.h"
#include "core/synth_fill.h"
#include "layer.h"
#include "timing.h"

namespace modmoe::app {

#ifdef MODMOE_WITH_CUDA
namespace {

struct Model {
  std::string name;
  Preset preset;
};

Model model(const char* name, int e, int k, int64_t h, int64_t i) {
  return {name, make_preset(name, e, k, h, i, RoutingMethod::Renormalize, Activation::Swiglu)};
}

// The ANCHORS.md grid: gpt-oss runs plain SwiGLU here, DeepSeek-V3 is one of 8 EP ranks with
// every pick local.
std::vector<Model> grid_models() {
  return {model("mixtral", 8, 2, 4096, 14336), model("qwen3", 128, 8, 2048, 768),
          model("deepseek-ep8", 32, 8, 7168, 2048), model("gpt-oss", 128, 4, 2880, 2880)};
}

// ANCHORS.md, measured on an H100: (triton µs, torch_gm µs) per model and T.
struct Anchor {
  const char* model;
  int tokens;
  double triton_us, torch_gm_us;
};
constexpr Anchor kAnchors[] = {
    {"mixtral", 1, 246, 350},        {"mixtral", 16, 1002, 1147},     {"mixtral", 128, 1044, 1131},
    {"mixtral", 1024, 1618, 1885},   {"mixtral", 4096, 4854, 5558},   {"mixtral", 16384, 17700, 20536},
    {"qwen3", 1, 39, 86},            {"qwen3", 16, 318, 338},         {"qwen3", 128, 509, 537},
    {"qwen3", 1024, 647, 792},       {"qwen3", 4096, 936, 1761},      {"qwen3", 16384, 2744, 6047},
    {"deepseek-ep8", 1, 273, 333},   {"deepseek-ep8", 16, 998, 1109}, {"deepseek-ep8", 128, 1064, 1181},
    {"deepseek-ep8", 1024, 1836, 2361}, {"deepseek-ep8", 4096, 4890, 7513}, {"deepseek-ep8", 16384, 18737, 29700},
    {"gpt-oss", 1, 82, 144},         {"gpt-oss", 16, 916, 1051},      {"gpt-oss", 128, 2123, 2431},
    {"gpt-oss", 1024, 2378, 2698},   {"gpt-oss", 4096, 3090, 4279},   {"gpt-oss", 16384, 6910, 9441},
};

const Anchor* find_anchor(const std::string& m, int64_t t) {
  for (const Anchor& a : kAnchors) {
    if (m == a.model && t == a.tokens) return &a;
  }
  return nullptr;
}

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

struct Cell {
  std::string model, routing;
  int64_t tokens = 0;
  int touched = 0;
  double us = 0, flops = 0, bytes = 0, floor_us = 0, rel_l2 = 0;
  std::string floor_kind;
  bool correct = false;
  std::vector<double> ab_us;  // per --ab variant
};

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

Cell run_cell(const Model& m, int64_t tokens, bool zipf, const Ceilings& ceil, uint64_t seed,
              const std::vector<std::string>& ab) {
  const Preset& p = m.preset;
  const int e = p.num_experts, k = p.top_k;
  const int64_t h = p.hidden, inter = p.intermediate;
  const ExpertMap map = ExpertMap::single(e);
  Layer layer(p, map, Device::cuda(0), seed, false);
  // The kernel layout, prepared once as at load time.
  Buffer w13i(DType::BF16, {e, 2 * inter, h}, Device::cuda(0));
  Buffer w2i(DType::BF16, {e, h, inter}, Device::cuda(0));  // prepare_weights never works in place
  ExpertWeights prepared;
  prepared.w13 = w13i;
  prepared.w2 = w2i;
  prepare_weights(layer.weights, prepared);

  // Rotated inputs: R batches whose activations together pass 2x L2 where that is cheap.
  const double batch_bytes = static_cast<double>(tokens) * h * 2 * 2;
  const int rot = static_cast<int>(std::clamp(256e6 / std::max(batch_bytes, 1.0), 2.0, 8.0));
  std::mt19937_64 rng(seed + tokens);
  std::vector<Buffer> hid, ids, wts, outs;
  std::vector<int> touched_list;
  int touched_sum = 0;
  for (int r = 0; r < rot; ++r) {
    HostTensor hi(DType::I32, {tokens, k}), hw(DType::F32, {tokens, k});
    make_routing(hi, hw, e, k, zipf, rng);
    std::vector<char> hit(static_cast<size_t>(e), 0);
    for (int64_t i = 0; i < hi.numel(); ++i) hit[hi.data<int32_t>()[i]] = 1;
    touched_sum += static_cast<int>(std::count(hit.begin(), hit.end(), 1));
    hid.emplace_back(DType::BF16, std::vector<int64_t>{tokens, h}, Device::cuda(0));
    synth::fill(hid.back(), seed + 100 + r, kHidden, 0.1f);
    ids.emplace_back(DType::I32, std::vector<int64_t>{tokens, k}, Device::cuda(0));
    wts.emplace_back(DType::F32, std::vector<int64_t>{tokens, k}, Device::cuda(0));
    outs.emplace_back(DType::BF16, std::vector<int64_t>{tokens, h}, Device::cuda(0));
    copy_to_device(hi, ids.back());
    copy_to_device(hw, wts.back());
  }
  auto inputs = [&](int r) {
    ExpertsInputs in;
    in.hidden = hid[r];
    in.topk_ids = ids[r];
    in.topk_weights = wts[r];
    return in;
  };
  auto outputs = [&](int r) {
    ExpertsOutputs o;
    o.out = outs[r];
    return o;
  };
  const ExpertsDesc desc = make_experts_desc(inputs(0), prepared, map, layer.options, outputs(0));
  const size_t ws_bytes = experts_workspace_size(desc);
  Buffer ws_buf(DType::U8, {static_cast<int64_t>(ws_bytes) + 256}, Device::cuda(0));
  const Workspace ws{ws_buf.view().data, ws_bytes + 256};

  Cell c;
  c.model = m.name;
  c.routing = zipf ? "zipf" : "uniform";
  c.tokens = tokens;
  c.touched = touched_sum / rot;

  // Validate first: poisoned output, one run, sampled float64 check.
  poison(outs[0]);
  experts(inputs(0), prepared, map, layer.options, outputs(0), ws);
  MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
  const SampleCheck chk = check_sampled_tokens(layer, hid[0], ids[0], wts[0], outs[0], 4);
  c.rel_l2 = chk.rel_l2;
  c.correct = chk.rel_l2 <= 1e-2;

  auto time_us = [&] {
    return 1e3 * time_graph_ms(rot, [&](int r, cudaStream_t s) {
      experts(inputs(r), prepared, map, layer.options, outputs(r), ws, s);
    });
  };
  c.us = time_us();
  for (const std::string& v : ab) {
    const EnvVariant env(v);
    c.ab_us.push_back(time_us());
  }
  const double w_bytes_per_expert = static_cast<double>(3 * inter * h) * 2;
  c.bytes = c.touched * w_bytes_per_expert + static_cast<double>(tokens) * h * 2 * 2;
  c.flops = 2.0 * tokens * k * 3.0 * static_cast<double>(inter) * h;
  const double bytes_us = c.bytes / (ceil.copy_GBps * 1e3);
  const double flops_us = c.flops / (ceil.dense_TFLOPs * 1e6);
  c.floor_us = std::max(bytes_us, flops_us);
  c.floor_kind = bytes_us >= flops_us ? "bytes" : "flops";
  return c;
}

}  // namespace

int run_bench_experts(const std::vector<std::string>& argv) {
  const Args args(argv, {"--models", "--tokens", "--out", "--torch-baseline", "--seed", "--ab"},
                  {"--skew"});
  // --ab NAME=VALUE[,NAME=VALUE...]: each cell is timed again with each variable set (A/B
  // of a run-time option in the same process, after the default's validation).
  std::vector<std::string> ab;
  for (std::string rest = args.get("--ab", ""); !rest.empty();) {
    const size_t comma = rest.find(',');
    ab.push_back(rest.substr(0, comma));
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
  }
  const std::string models_arg = args.get("--models", "mixtral,qwen3,deepseek-ep8,gpt-oss");
  const std::string tokens_arg = args.get("--tokens", "1,16,128,1024,4096,16384");
  const uint64_t seed = static_cast<uint64_t>(args.get_int("--seed", 7, 0, 1ll << 40));
  const std::vector<int64_t> token_list = parse_int_list(tokens_arg, "--tokens");
  nlohmann::json torch_base = nlohmann::json::object();
  if (args.has("--torch-baseline")) {
    std::ifstream f(args.get("--torch-baseline", ""));
    MODMOE_CHECK(f.good(), "option '--torch-baseline' = '", args.get("--torch-baseline", ""),
                 "': expected a readable JSON file written by bench/compare.py");
    f >> torch_base;
  }

  const Ceilings ceil = measure_ceilings();
  std::printf("modmoe bench experts on %s: copy %.0f GB/s, dense bf16 %.0f TFLOP/s (measured now)\n",
              gpu_name().c_str(), ceil.copy_GBps, ceil.dense_TFLOPs);
  std::printf("%-13s %-7s %6s %5s %10s %10s %7s %7s %8s %8s %8s %s", "model", "routing", "T",
              "exp", "us", "floor us", "t/floor", "TFLOP/s", "GB/s", "vs trit", "vs t_gm", "ok");
  for (size_t i = 0; i < ab.size(); ++i) std::printf("  ab%zu us", i + 1);
  std::printf("\n");
  for (size_t i = 0; i < ab.size(); ++i) std::printf("  (ab%zu: %s)\n", i + 1, ab[i].c_str());

  nlohmann::json cells = nlohmann::json::array();
  std::vector<double> ratios;
  for (const Model& m : grid_models()) {
    if (models_arg.find(m.name) == std::string::npos) continue;
    std::vector<std::pair<int64_t, bool>> runs;
    for (int64_t t : token_list) runs.push_back({t, false});
    if (args.has("--skew")) {
      runs.push_back({1024, true});
      runs.push_back({4096, true});
      runs.push_back({77, false});
      runs.push_back({3000, false});
    }
    for (auto [t, zipf] : runs) {
      const Cell c = run_cell(m, t, zipf, ceil, seed, ab);
      const Anchor* a = zipf ? nullptr : find_anchor(m.name, t);
      const std::string key = m.name + "/" + std::to_string(t) + "/" + c.routing;
      const double tgm = torch_base.contains(key) ? torch_base[key].get<double>() : 0.0;
      const double ratio = c.us / c.floor_us;
      if (a) ratios.push_back(ratio);
      nlohmann::json j = {{"model", c.model}, {"routing", c.routing}, {"tokens", c.tokens},
                          {"experts_touched", c.touched}, {"us", c.us},
                          {"TFLOPs", c.flops / (c.us * 1e6)}, {"GBps", c.bytes / (c.us * 1e3)},
                          {"floor_us", c.floor_us}, {"floor_kind", c.floor_kind},
                          {"time_over_floor", ratio}, {"correct", c.correct},
                          {"rel_l2_sampled", c.rel_l2}};
      if (a) {
        j["anchor_triton_us_h100"] = a->triton_us;
        j["speedup_vs_anchor_triton"] = a->triton_us / c.us;
      }
      if (tgm > 0) {
        j["torch_grouped_mm_us"] = tgm;
        j["speedup_vs_torch_grouped_mm"] = tgm / c.us;
      }
      if (!ab.empty()) {
        nlohmann::json v = nlohmann::json::object();
        for (size_t i = 0; i < ab.size(); ++i) v[ab[i]] = c.ab_us[i];
        j["ab_us"] = v;
      }
      cells.push_back(j);
      std::printf("%-13s %-7s %6lld %5d %10.1f %10.1f %7.2f %7.0f %8.0f %8s %8s %s",
                  c.model.c_str(), c.routing.c_str(), static_cast<long long>(t), c.touched, c.us,
                  c.floor_us, ratio, c.flops / (c.us * 1e6), c.bytes / (c.us * 1e3),
                  a ? format_ratio(a->triton_us / c.us).c_str() : "-",
                  tgm > 0 ? format_ratio(tgm / c.us).c_str() : "-", c.correct ? "yes" : "NO");
      for (size_t i = 0; i < ab.size(); ++i) {
        std::printf(" %8.1f", c.ab_us[i]);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  double geo = 0, worst = 0;
  for (double r : ratios) {
    geo += std::log(r);
    worst = std::max(worst, r);
  }
  geo = ratios.empty() ? 0 : std::exp(geo / ratios.size());
  std::printf("grid cells: %zu, geomean time/floor %.3f, worst %.3f\n", ratios.size(), geo, worst);

  nlohmann::json out = bench_header("experts", ceil);
  out["cells"] = cells;
  out["summary"] = {{"grid_cells", ratios.size()}, {"geomean_time_over_floor", geo},
                    {"max_time_over_floor", worst}};
  write_bench_json(out, args.get("--out", ""), "experts.json");
  return 0;
}

#else
int run_bench_experts(const std::vector<std::string>&) {
  MODMOE_FAIL("`modmoe bench experts` needs a GPU build: this build has no CUDA backend");
}
#endif

}  // namespace modmoe::app
