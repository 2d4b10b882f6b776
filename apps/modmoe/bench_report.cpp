#include "bench_report.h"

#ifdef MODMOE_WITH_CUDA
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <utility>

namespace modmoe::app {
namespace {

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

double geomean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += std::log(x);
  return v.empty() ? 0 : std::exp(s / static_cast<double>(v.size()));
}

// {"<cell>": value} of the grid cells that `pick` selects, and their minimum (null if none).
template <class Cell, class Pick, class Value>
std::pair<nlohmann::json, nlohmann::json> cells_min(const std::vector<Cell>& grid, Pick pick,
                                                    Value value) {
  nlohmann::json by_cell = nlohmann::json::object(), least = nullptr;
  for (const Cell& g : grid) {
    if (!pick(g)) continue;
    const double v = value(g);
    by_cell[g.key] = v;
    if (least.is_null() || v < least.template get<double>()) least = v;
  }
  return {by_cell, least};
}

}  // namespace

Report::Report(BenchDtype dtype, const Ceilings& ceil, std::vector<std::string> ab,
               nlohmann::json torch_base)
    : dtype_(dtype), ceil_(ceil), ab_(std::move(ab)), torch_base_(std::move(torch_base)) {}

void Report::print_header(const std::string& gpu) const {
  const bool quantized = dtype_ != BenchDtype::Bf16;
  if (!quantized) {
    std::printf("modmoe bench experts on %s: copy %.0f GB/s, dense bf16 %.0f TFLOP/s (measured now)\n",
                gpu.c_str(), ceil_.copy_GBps, ceil_.dense_TFLOPs);
  } else {
    std::printf("modmoe bench experts --dtype %s on %s: copy %.0f GB/s, dense bf16 %.0f TFLOP/s",
                bench_dtype_name(dtype_), gpu.c_str(), ceil_.copy_GBps, ceil_.dense_TFLOPs);
    if (is_fp8(dtype_)) std::printf(", dense fp8 %.0f TFLOP/s", ceil_.dense_fp8_TFLOPs);
    std::printf(" (measured now)\n");
    if (is_fp8(dtype_)) std::printf("  fp8 ceiling: %s\n", ceil_.fp8_how.c_str());
    for (const char* k : {"op", "note", "error"}) {
      if (torch_base_.contains(k)) {
        std::printf("  torch baseline %s: %s\n", k, torch_base_[k].get<std::string>().c_str());
      }
    }
  }
  std::printf("%-13s %-7s %6s %5s %10s %10s %7s %7s %8s", "model", "routing", "T", "exp", "us",
              "floor us", "t/floor", "TFLOP/s", "GB/s");
  if (quantized) {
    std::printf(" %7s %10s %8s %8s %s", "%copy w", "bf16 us", "vs bf16", "vs torch", "ok");
    if (dtype_ == BenchDtype::Nvfp4) std::printf(" %7s %10s %8s", "%copy p", "fp8b us", "vs fp8b");
  } else {
    std::printf(" %8s %8s %s", "vs trit", "vs t_gm", "ok");
  }
  for (size_t i = 0; i < ab_.size(); ++i) std::printf("  ab%zu us", i + 1);
  std::printf("\n");
  for (size_t i = 0; i < ab_.size(); ++i) std::printf("  (ab%zu: %s)\n", i + 1, ab_[i].c_str());
}

void Report::add(const CellResult& c) {
  const bool quantized = dtype_ != BenchDtype::Bf16;
  const double dense = is_fp8(dtype_) ? ceil_.dense_fp8_TFLOPs : ceil_.dense_TFLOPs;
  const Floor f = cell_floor(dtype_, c.shape, ceil_.copy_GBps, dense);
  const double us = c.run.us, ratio = us / f.us;
  const int64_t t = c.shape.tokens;
  const std::string routing = c.zipf ? "zipf" : "uniform";
  const Anchor* a = c.zipf ? nullptr : find_anchor(c.model, t);
  const std::string key = c.model + "/" + std::to_string(t) + "/" + routing;
  const double torch_us = torch_base_.contains(key) && torch_base_[key].is_number()
                              ? torch_base_[key].get<double>() : 0.0;
  nlohmann::json j = {{"model", c.model}, {"routing", routing}, {"tokens", t},
                      {"experts_touched", static_cast<int>(c.shape.experts_touched)}, {"us", us},
                      {"TFLOPs", f.flops / (us * 1e6)}, {"GBps", f.bytes / (us * 1e3)},
                      {"floor_us", f.us}, {"floor_kind", f.kind},
                      {"time_over_floor", ratio}, {"correct", c.run.correct},
                      {"rel_l2_sampled", c.run.check.rel_l2}};
  const double weight_GBps = cell_bytes(dtype_, c.shape).weight_total() / (us * 1e3);
  const double speedup = quantized ? c.bf16.us / us : 0.0;
  const bool correct =
      c.run.correct && (!quantized || c.bf16.correct) && (!c.fp8 || c.fp8->correct);
  // NVFP4: the share of the copy ceiling on the packed e2m1 bytes alone (no scales).
  const double packed_pct = 100.0 * cell_bytes(dtype_, c.shape).weights / (us * 1e3) / ceil_.copy_GBps;
  if (quantized) {
    j["dtype"] = bench_dtype_name(dtype_);
    j["weight_GBps"] = weight_GBps;
    j["pct_copy_ceiling_weight_bytes"] = 100.0 * weight_GBps / ceil_.copy_GBps;
    if (c.run.check.rel_l2_emulated >= 0) j["rel_l2_sampled_emulated"] = c.run.check.rel_l2_emulated;
    j["bf16_us"] = c.bf16.us;
    j["speedup_vs_bf16"] = speedup;
    j["bf16_correct"] = c.bf16.correct;
    j["bf16_rel_l2_sampled"] = c.bf16.check.rel_l2;
    if (dtype_ == BenchDtype::Nvfp4) j["pct_copy_ceiling_packed_bytes"] = packed_pct;
    if (c.fp8) {
      j["fp8_block_us"] = c.fp8->us;
      j["speedup_vs_fp8_block"] = c.fp8->us / us;
      j["fp8_block_correct"] = c.fp8->correct;
      j["fp8_block_rel_l2_sampled"] = c.fp8->check.rel_l2;
    }
    if (torch_us > 0) {
      j["torch_scaled_grouped_mm_us"] = torch_us;
      j["speedup_vs_torch_scaled_grouped_mm"] = torch_us / us;
    }
  } else {
    if (a) {
      j["anchor_triton_us_h100"] = a->triton_us;
      j["speedup_vs_anchor_triton"] = a->triton_us / us;
    }
    if (torch_us > 0) {
      j["torch_grouped_mm_us"] = torch_us;
      j["speedup_vs_torch_grouped_mm"] = torch_us / us;
    }
  }
  if (!ab_.empty()) {
    nlohmann::json v = nlohmann::json::object();
    for (size_t i = 0; i < ab_.size(); ++i) v[ab_[i]] = c.run.ab_us[i];
    j["ab_us"] = v;
  }
  cells_.push_back(j);
  if (a) {
    grid_.push_back({c.model + "/" + std::to_string(t), t, c.shape.intermediate, ratio, speedup,
                     weight_GBps / ceil_.copy_GBps, correct});
  }

  std::printf("%-13s %-7s %6lld %5d %10.1f %10.1f %7.2f %7.0f %8.0f", c.model.c_str(),
              routing.c_str(), static_cast<long long>(t), static_cast<int>(c.shape.experts_touched),
              us, f.us, ratio, f.flops / (us * 1e6), f.bytes / (us * 1e3));
  if (quantized) {
    std::printf(" %6.0f%% %10.1f %8s %8s %s", 100.0 * weight_GBps / ceil_.copy_GBps, c.bf16.us,
                format_ratio(speedup).c_str(), torch_us > 0 ? format_ratio(torch_us / us).c_str() : "-",
                correct ? "yes" : (c.run.correct ? "NO (bf16/fp8)" : "NO"));
    if (dtype_ == BenchDtype::Nvfp4) {
      std::printf(" %6.0f%% %10s %8s", packed_pct,
                  c.fp8 ? std::to_string(c.fp8->us).substr(0, 8).c_str() : "-",
                  c.fp8 ? format_ratio(c.fp8->us / us).c_str() : "-");
    }
  } else {
    std::printf(" %8s %8s %s", a ? format_ratio(a->triton_us / us).c_str() : "-",
                torch_us > 0 ? format_ratio(torch_us / us).c_str() : "-", c.run.correct ? "yes" : "NO");
  }
  for (double v : c.run.ab_us) std::printf(" %8.1f", v);
  std::printf("\n");
  std::fflush(stdout);
}

nlohmann::json Report::finish(nlohmann::json out) const {
  std::vector<double> ratios;
  for (const GridCell& g : grid_) ratios.push_back(g.time_over_floor);
  const double geo = geomean(ratios);
  const double worst = ratios.empty() ? 0 : *std::max_element(ratios.begin(), ratios.end());
  std::printf("grid cells: %zu, geomean time/floor %.3f, worst %.3f\n", ratios.size(), geo, worst);
  out["cells"] = cells_;
  out["summary"] = {{"grid_cells", ratios.size()}, {"geomean_time_over_floor", geo},
                    {"max_time_over_floor", worst}};
  if (dtype_ == BenchDtype::Bf16) return out;
  out["dtype"] = bench_dtype_name(dtype_);
  out["summary"] = finish_quantized(out["summary"]);
  nlohmann::json notes = nlohmann::json::object();
  for (const char* k : {"dtype", "op", "note", "error"}) {
    if (torch_base_.contains(k)) notes[k] = torch_base_[k];
  }
  if (!notes.empty()) out["torch_baseline"] = notes;
  return out;
}

nlohmann::json Report::finish_quantized(nlohmann::json s) const {
  const Targets target = targets(dtype_);
  std::vector<double> speedups;
  nlohmann::json least = nullptr;
  std::string slowest;
  bool all_correct = true;
  for (const GridCell& g : grid_) {
    speedups.push_back(g.speedup_vs_bf16);
    if (least.is_null() || g.speedup_vs_bf16 < least.get<double>()) {
      least = g.speedup_vs_bf16;
      slowest = g.key;
    }
    all_correct = all_correct && g.correct;
  }
  auto decode = [](const GridCell& g) { return is_decode(g.tokens); };
  auto prefill_large = [](const GridCell& g) {
    return is_prefill(g.tokens) && is_large_expert(g.intermediate);
  };
  auto speedup = [](const GridCell& g) { return g.speedup_vs_bf16; };
  const auto [copy, copy_min] =
      cells_min(grid_, decode, [](const GridCell& g) { return 100.0 * g.copy_fraction; });
  const auto [dec, dec_min] = cells_min(grid_, decode, speedup);
  const auto [pre, pre_min] = cells_min(grid_, prefill_large, speedup);
  auto met = [](const nlohmann::json& value, double goal) -> nlohmann::json {
    return value.is_null() ? nlohmann::json(nullptr) : nlohmann::json(value.get<double>() >= goal);
  };
  s["all_correct"] = all_correct;
  s["geomean_speedup_vs_bf16"] = geomean(speedups);
  s["min_speedup_vs_bf16"] = least;
  s["min_speedup_cell"] = slowest;
  s["decode_pct_copy_ceiling_weight_bytes"] = copy;
  s["min_decode_pct_copy_ceiling_weight_bytes"] = copy_min;
  s["decode_speedup_vs_bf16"] = dec;
  s["prefill_large_experts_speedup_vs_bf16"] = pre;
  s["min_prefill_large_experts_speedup_vs_bf16"] = pre_min;
  s["targets"] = {{"decode_pct_copy_ceiling_weight_bytes", 100.0 * target.decode_copy_fraction},
                  {"prefill_large_experts_speedup_vs_bf16", target.prefill_speedup},
                  {"min_speedup_vs_bf16", target.min_speedup}};
  s["targets_met"] = {
      {"decode_pct_copy_ceiling_weight_bytes", met(copy_min, 100.0 * target.decode_copy_fraction)},
      {"prefill_large_experts_speedup_vs_bf16", met(pre_min, target.prefill_speedup)},
      {"min_speedup_vs_bf16", met(least, target.min_speedup)}};
  if (target.decode_speedup > 0) {
    s["targets"]["decode_speedup_vs_bf16"] = target.decode_speedup;
    s["targets_met"]["decode_speedup_vs_bf16"] = met(dec_min, target.decode_speedup);
  }
  auto text = [](const nlohmann::json& v, bool percent) {
    if (v.is_null()) return std::string("-");
    return percent ? std::to_string(std::lround(v.get<double>())) + "%" : format_ratio(v.get<double>());
  };
  std::printf("vs bf16 (same run): geomean %s, min %s (%s)%s\n", format_ratio(geomean(speedups)).c_str(),
              text(least, false).c_str(), slowest.c_str(),
              all_correct ? "" : "; NOT every cell checked out");
  std::printf("decode: min %s of the copy ceiling on %s weight bytes (target %.0f%%); prefill, large "
              "experts: min %s vs bf16 (target %s)\n",
              text(copy_min, true).c_str(), bench_dtype_name(dtype_),
              100.0 * target.decode_copy_fraction, text(pre_min, false).c_str(),
              format_ratio(target.prefill_speedup).c_str());
  return s;
}

}  // namespace modmoe::app
#endif
