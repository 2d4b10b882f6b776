// The `modmoe` command: demo, info (and, as they land, bench and ep-demo).
#include <cstdio>
#include <string>
#include <vector>

#include "core/presets.h"
#include "modmoe/modmoe.h"

namespace modmoe::app {
int run_demo(const std::vector<std::string>& argv);
int run_info(const std::vector<std::string>& argv);
int run_bench_experts(const std::vector<std::string>& argv);
int run_ep_demo(const std::vector<std::string>& argv);
int run_ep_bench(const std::vector<std::string>& argv);
}  // namespace modmoe::app

namespace {

void usage() {
  std::printf(
      "modmoe %s: Mixture-of-Experts kernels\n\n"
      "usage:\n"
      "  modmoe demo [--preset NAME] [--tokens T] [--seed S] [--json] [--cpu]\n"
      "      one MoE layer of a preset with seeded synthetic weights: routing, permute, the\n"
      "      modular experts and the monolithic fused_moe, with times, a parity check and an\n"
      "      accuracy check. Without a GPU it runs the CPU reference on a scaled-down preset.\n"
      "  modmoe bench experts [--dtype bf16|fp8-block|fp8-tensor|nvfp4] [--models m1,m2]\n"
      "                      [--tokens 1,16,...] [--skew] [--torch-baseline F] [--out F]\n"
      "                      [--ab NAME=VALUE,...] [--cpu] [--fp8-fast-accum]\n"
      "      the ANCHORS.md grid of the experts stage, validated then timed (GPU build);\n"
      "      a quantized --dtype also times each cell in bf16 (same master weights);\n"
      "      --fp8-fast-accum (with --dtype fp8-tensor): ExpertsOptions::fp8_fast_accum, its\n"
      "      own JSON file (experts_fp8_tensor_fast_accum.json);\n"
      "      --ab times every cell again with each environment variable set (A/B columns);\n"
      "      --cpu only validates every cell on the CPU reference (models scaled down)\n"
      "  modmoe info\n"
      "      the build, the compiled architectures and the GPUs\n"
      "  modmoe ep-demo --gpus N [--preset NAME] [--backend nvlink|nccl] [--tokens T]\n"
      "                 [--experts real|identity] [--dtype bf16|fp8-block|fp8-tensor|nvfp4]\n"
      "                 [--reps R] [--num-sms S] [--seed S]\n"
      "      one expert-parallel layer on N GPUs (a process each): routing, dispatch, the\n"
      "      modular experts, combine; checked against the single-GPU fused_moe, timed.\n"
      "      --dtype fp8-*: FP8 weights, each rank quantizes its tokens before the dispatch\n"
      "      (e4m3 rows + fp32 scales travel), combine stays bf16; --dtype nvfp4: NVFP4\n"
      "      weights (W4A16), e2m1 rows + e4m3 scales + one fp32 global per token travel,\n"
      "      dequantized to bf16 on arrival\n"
      "  modmoe bench all-to-all --gpus N [--tokens 1,16,...] [--sms 32,...] [--combine pull,push]\n"
      "                 [--backends nvlink,nccl,nccl_a2a_uneven] [--layer nvlink,nccl|none]\n"
      "                 [--dtype bf16|fp8-block|fp8-tensor|nvfp4] [--iters I] [--out PATH]\n"
      "      dispatch/combine times and GB/s (H=7168, E=256, k=8), validated first, then the\n"
      "      whole EP layer; writes bench/results/<gpu>/all_to_all.json (FP8, NVFP4:\n"
      "      all_to_all_<dtype>.json; rows carry \"dtype\")\n\n"
      "presets:",
      modmoe::version());
  for (const auto& p : modmoe::presets()) std::printf(" %s", p.name.c_str());
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" ||
      std::string(argv[1]) == "help") {
    usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> rest(argv + 2, argv + argc);
  // `modmoe <command> [...] --help`: the usage, which lists every command's options.
  for (const std::string& a : rest) {
    if (a == "--help" || a == "-h") {
      usage();
      return 0;
    }
  }
  try {
    if (cmd == "demo") return modmoe::app::run_demo(rest);
    if (cmd == "info") return modmoe::app::run_info(rest);
    if (cmd == "ep-demo") return modmoe::app::run_ep_demo(rest);
    if (cmd == "bench" && !rest.empty() && rest[0] == "all-to-all") {
      return modmoe::app::run_ep_bench(std::vector<std::string>(rest.begin() + 1, rest.end()));
    }
    if (cmd == "bench") {
      const std::string what = rest.empty() ? "" : rest[0];
      const std::vector<std::string> bench_args(rest.begin() + (rest.empty() ? 0 : 1), rest.end());
      if (what == "experts") return modmoe::app::run_bench_experts(bench_args);
      std::fprintf(stderr, "modmoe: unknown benchmark '%s'\n\n", what.c_str());
      usage();
      return 2;
    }
    std::fprintf(stderr, "modmoe: unknown command '%s'\n\n", cmd.c_str());
    usage();
    return 2;
  } catch (const modmoe::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
