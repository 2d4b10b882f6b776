// `modmoe demo`: one MoE layer of a preset, stage by stage, then the monolithic path, a
// bitwise parity check between the two and a float64 accuracy check of sampled tokens.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstring>
#include <iostream>

#include "args.h"
#include "check.h"
#include "layer.h"
#include "timing.h"

namespace modmoe::app {
namespace {

struct StageRow {
  std::string stage, result;
  double ms = 0.0;
};

// Why the GPU path is not taken, or "" when it is.
std::string no_gpu_reason(bool force_cpu) {
  if (force_cpu) return "--cpu was given";
  if (!built_with_cuda()) return "this build has no CUDA backend (nvcc was not found at build time)";
  const auto gpus = list_gpus();
  if (gpus.empty()) return "no GPU was found (CUDA reports no device)";
  if (gpus[0].sm_major < 9) {
    return "GPU 0 (" + gpus[0].name + ") is sm_" + std::to_string(gpus[0].sm_major) +
           std::to_string(gpus[0].sm_minor) + "; the kernels are built for sm_90a";
  }
  return "";
}

int64_t count_differing(const HostTensor& a, const HostTensor& b) {
  int64_t n = 0;
  const auto* pa = a.data<uint16_t>();
  const auto* pb = b.data<uint16_t>();
  for (int64_t i = 0; i < a.numel(); ++i) n += pa[i] != pb[i];
  return n;
}

}  // namespace

int run_demo(const std::vector<std::string>& argv) {
  const Args args(argv, {"--preset", "--tokens", "--seed"}, {"--json", "--cpu"});
  const std::string reason = no_gpu_reason(args.has("--cpu"));
  const bool gpu = reason.empty();
  const bool json = args.has("--json");
  const Preset& full = find_preset(args.get("--preset", "deepseek-v3"));
  const Preset preset = gpu ? full : full.scaled_down();
  const int64_t tokens = args.get_int("--tokens", 64, 0, 1 << 20);
  const uint64_t seed = static_cast<uint64_t>(args.get_int("--seed", 1234, 0, 1ll << 62));
  const Device device = gpu ? Device::cuda(0) : Device::cpu();

  if (!json) {
    std::printf("modmoe demo: %s (%s), routing %s, %s, T=%lld, seed %llu\n", full.name.c_str(),
                full.shape_string().c_str(), routing_method_name(full.routing.method),
                activation_name(full.activation), static_cast<long long>(tokens),
                static_cast<unsigned long long>(seed));
    if (gpu) {
      std::printf("device: GPU 0, %s\n", list_gpus()[0].name.c_str());
    } else {
      std::printf("device: CPU. %s, so this runs the CPU reference backend on a scaled-down "
                  "version of the preset instead: %s\n",
                  reason.c_str(), preset.shape_string().c_str());
    }
  }

  const ExpertMap map = ExpertMap::single(preset.num_experts);
  RoutingParams routing = preset.routing;
  const Layer layer(preset, map, device, seed, !json);
  const Batch batch(layer, tokens, seed + 1);
  const int k = preset.top_k;

  Buffer ids(DType::I32, {tokens, k}, device), wts(DType::F32, {tokens, k}, device);
  Buffer out_mod(DType::BF16, {tokens, preset.hidden}, device);
  Buffer out_mono(DType::BF16, {tokens, preset.hidden}, device);
  Buffer offsets(DType::I64, {map.num_local_experts + 1}, device);
  Buffer e2p(DType::I32, {tokens, k}, device), p2e(DType::I32, {tokens * k}, device);
  const PermuteMetadata meta{offsets, e2p, p2e};

  ExpertsInputs in;
  in.hidden = batch.hidden;
  in.topk_ids = ids;
  in.topk_weights = wts;
  ExpertsOutputs outs;
  outs.out = out_mod;
  const ExpertsDesc desc = make_experts_desc(in, layer.weights, map, layer.options, outs);
  const size_t ws_bytes = std::max({experts_workspace_size(desc),
                                    fused_moe_workspace_size(tokens, layer.weights, routing, map, layer.options),
                                    permute_workspace_size(tokens, k, map.num_local_experts)});
  Buffer ws_buf(DType::U8, {static_cast<int64_t>(ws_bytes) + 1}, device);
  const Workspace ws{ws_buf.view().data, ws_bytes};

  const int warmup = gpu ? 3 : 0, reps = gpu ? 10 : 1;
  std::vector<StageRow> rows;
  auto run_route = [&] { route(batch.logits, layer.route_bias, routing, ids, wts); };
  rows.push_back({"routing", "", time_ms(device, run_route, warmup, reps)});
  auto run_permute = [&] { permute(ids, false, map, meta, ws); };
  rows.push_back({"permute", "", time_ms(device, run_permute, warmup, reps)});
  auto run_experts = [&] { experts(in, layer.weights, map, layer.options, outs, ws); };
  rows.push_back({"experts (modular)", "", time_ms(device, run_experts, warmup, reps)});
  auto run_fused = [&] {
    fused_moe(batch.logits, layer.route_bias, batch.hidden, layer.weights, routing, map,
              layer.options, out_mono, ws);
  };
  rows.push_back({"fused_moe (monolithic)", "", time_ms(device, run_fused, warmup, reps)});

  // Results of the last runs.
  const HostTensor h_ids = to_host(ids), h_off = to_host(offsets);
  const int64_t permuted_rows = h_off.data<int64_t>()[map.num_local_experts];
  std::vector<int> load(static_cast<size_t>(preset.num_experts), 0);
  for (int64_t i = 0; i < h_ids.numel(); ++i) load[h_ids.data<int32_t>()[i]]++;
  int touched = 0, max_load = 0;
  for (int l : load) {
    touched += l > 0;
    max_load = std::max(max_load, l);
  }
  rows[0].result = std::to_string(tokens) + "x" + std::to_string(k) + " ids; " +
                   std::to_string(touched) + "/" + std::to_string(preset.num_experts) +
                   " experts touched, busiest gets " + std::to_string(max_load) + " rows";
  rows[1].result = "P = " + std::to_string(permuted_rows) + " permuted rows";
  rows[2].result = "out " + out_mod.view().shape_string() + " bf16, do_finalize";
  rows[3].result = "out " + out_mono.view().shape_string() + " bf16";

  const HostTensor a = to_host(out_mod), b = to_host(out_mono);
  const int64_t differing = count_differing(a, b);
  const int max_samples = gpu ? 4 : 16;
  const SampleCheck check = check_sampled_tokens(layer, batch.hidden, ids, wts, out_mod, max_samples);
  const double bound = 1e-2;
  const bool ok = differing == 0 && check.rel_l2 <= bound;

  if (json) {
    nlohmann::json j;
    j["preset"] = full.name;
    j["ran"] = preset.shape_string();
    j["device"] = gpu ? list_gpus()[0].name : std::string("cpu");
    j["no_gpu_reason"] = reason;
    j["tokens"] = tokens;
    j["seed"] = seed;
    for (const auto& r : rows) j["stages"].push_back({{"stage", r.stage}, {"result", r.result}, {"ms", r.ms}});
    j["parity"] = {{"bitwise_equal", differing == 0}, {"differing_elements", differing}};
    j["accuracy"] = {{"sampled_tokens", check.num_tokens}, {"rel_l2_vs_float64", check.rel_l2}, {"bound", bound}};
    j["ok"] = ok;
    std::cout << j.dump(2) << std::endl;
  } else {
    std::printf("\n%-24s %-58s %10s\n", "stage", "result", gpu ? "ms (median)" : "ms");
    for (const auto& r : rows) std::printf("%-24s %-58s %10.3f\n", r.stage.c_str(), r.result.c_str(), r.ms);
    std::printf("\nparity    modular == monolithic: %s (%lld of %lld elements differ)\n",
                differing == 0 ? "bitwise equal" : "DIFFERENT", static_cast<long long>(differing),
                static_cast<long long>(a.numel()));
    std::printf("accuracy  %d sampled tokens (%d experts) against a float64 reference: rel L2 %.2e (bound %.0e) %s\n",
                check.num_tokens, check.num_experts, check.rel_l2, bound, check.rel_l2 <= bound ? "ok" : "FAILED");
  }
  return ok ? 0 : 1;
}

}  // namespace modmoe::app
