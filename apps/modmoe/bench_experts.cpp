// `modmoe bench experts`: the ANCHORS.md grid for the modular experts stage, in bf16 or a
// quantized dtype (--dtype). Every cell is validated against a float64 reference before it is
// timed; times are medians of CUDA-graph replays over rotated inputs; floors come from
// ceilings measured in the same run. A quantized dtype also times each cell in bf16, on the
// same inputs and the same master weights; nvfp4 also times fp8-block where H and I are
// multiples of 128. --cpu validates every cell on the CPU reference
// backend instead (each model scaled down), untimed. --fp8-fast-accum (fp8-tensor only) runs
// the cells with ExpertsOptions::fp8_fast_accum (docs/fp8.md "FP8 fast accumulation"): its
// emulated bound is check_bounds' fast one, and its JSON file is its own.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "args.h"
#include "bench_cell.h"
#include "bench_common.h"
#include "bench_report.h"

namespace modmoe::app {
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

// Every option, parsed and checked before anything runs.
struct Options {
  BenchDtype dtype = BenchDtype::Bf16;
  bool fp8_fast_accum = false;  // --fp8-fast-accum: ExpertsOptions::fp8_fast_accum
  bool cpu = false;
  std::vector<std::string> models, ab;
  std::vector<std::pair<int64_t, bool>> runs;  // (T, zipf) per model
  uint64_t seed = 0;
  std::string out;
  nlohmann::json torch_base = nlohmann::json::object();  // bench/compare.py's file
};

std::vector<std::string> split(const std::string& csv) {
  std::vector<std::string> out;
  for (std::string rest = csv; !rest.empty();) {
    const size_t comma = rest.find(',');
    out.push_back(rest.substr(0, comma));
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
  }
  return out;
}

Options parse_options(const std::vector<std::string>& argv) {
  const Args args(argv, {"--models", "--tokens", "--out", "--torch-baseline", "--seed", "--ab", "--dtype"},
                  {"--skew", "--cpu", "--fp8-fast-accum"});
  Options o;
  o.dtype = parse_bench_dtype(args.get("--dtype", "bf16"));
  o.fp8_fast_accum = args.has("--fp8-fast-accum");
  MODMOE_CHECK(!o.fp8_fast_accum || o.dtype == BenchDtype::Fp8Tensor, "option ",
               "'--fp8-fast-accum' with --dtype ", bench_dtype_name(o.dtype),
               ": expected --dtype fp8-tensor (FP8 fast accumulation is an fp8-tensor mode)");
  o.cpu = args.has("--cpu");
  MODMOE_CHECK(!o.cpu || !(args.has("--ab") || args.has("--out") || args.has("--torch-baseline")),
               "option '--cpu' validates every cell untimed: '--ab', '--out' and "
               "'--torch-baseline' do not apply to it");
  // --ab NAME=VALUE[,NAME=VALUE...]: each cell is timed again with each variable set (A/B
  // of a run-time option in the same process, after the default's validation).
  o.ab = split(args.get("--ab", ""));
  o.models = split(args.get("--models", "mixtral,qwen3,deepseek-ep8,gpt-oss"));
  for (const std::string& name : o.models) {
    bool known = false;
    for (const Model& m : grid_models()) known = known || m.name == name;
    MODMOE_CHECK(known, "option '--models': unknown model '", name,
                 "': expected names from mixtral, qwen3, deepseek-ep8, gpt-oss");
  }
  for (int64_t t : parse_int_list(args.get("--tokens", "1,16,128,1024,4096,16384"), "--tokens")) {
    o.runs.push_back({t, false});
  }
  if (args.has("--skew")) {
    o.runs.insert(o.runs.end(), {{1024, true}, {4096, true}, {77, false}, {3000, false}});
  }
  o.seed = static_cast<uint64_t>(args.get_int("--seed", 7, 0, 1ll << 40));
  o.out = args.get("--out", "");
  if (args.has("--torch-baseline")) {
    const std::string path = args.get("--torch-baseline", "");
    std::ifstream f(path);
    MODMOE_CHECK(f.good(), "option '--torch-baseline' = '", path,
                 "': expected a readable JSON file written by bench/compare.py");
    f >> o.torch_base;
    // compare.py's bf16 file is a plain {cell: us} map; the others name their dtype.
    const std::string base_dtype = o.torch_base.value("dtype", "bf16");
    MODMOE_CHECK(base_dtype == bench_dtype_name(o.dtype), "option '--torch-baseline' = '", path,
                 "': the baseline was measured for dtype ", base_dtype, ", this run is --dtype ",
                 bench_dtype_name(o.dtype), " (bench/compare.py --dtype ", bench_dtype_name(o.dtype),
                 " writes the matching one)");
  }
  return o;
}

// The grid's cells, model by model: each model's weights are made once, in the run's dtype
// and, for a quantized dtype, in bf16 too (same master weights). `bf16` is null for bf16 runs;
// `fp8` (fp8-block from the same masters) is set for nvfp4 runs of models whose H and I are
// multiples of 128.
using CellFn = std::function<void(const Model&, const Layer&, const BenchWeights& weights,
                                  const BenchWeights* bf16, const BenchWeights* fp8,
                                  int64_t tokens, bool zipf)>;

// FP8 needs H and I multiples of 128 (the scale block and the GEMM K block): a model without
// them (gpt-oss, H = I = 2880) is skipped with a note, returned.
std::vector<std::string> for_each_cell(const Options& o, Device device, const CellFn& fn) {
  std::vector<std::string> skipped;
  for (const Model& m : grid_models()) {
    if (std::find(o.models.begin(), o.models.end(), m.name) == o.models.end()) continue;
    const Preset p = device.is_cuda() ? m.preset : m.preset.scaled_down();
    if (is_fp8(o.dtype) && (p.hidden % kFp8BlockSize != 0 || p.intermediate % kFp8BlockSize != 0)) {
      skipped.push_back(m.name + ": H = " + std::to_string(p.hidden) + ", I = " +
                        std::to_string(p.intermediate) + " are not multiples of 128, which " +
                        bench_dtype_name(o.dtype) + " needs (the scale block and the GEMM K block)");
      std::printf("  skipped %s\n", skipped.back().c_str());
      continue;
    }
    const Layer layer(p, ExpertMap::single(p.num_experts), device, o.seed, false);
    const BenchWeights weights = make_bench_weights(layer, o.dtype);
    std::optional<BenchWeights> bf16;
    if (o.dtype != BenchDtype::Bf16) bf16 = make_bench_weights(layer, BenchDtype::Bf16);
    std::optional<BenchWeights> fp8;
    if (o.dtype == BenchDtype::Nvfp4 && p.hidden % kFp8BlockSize == 0 &&
        p.intermediate % kFp8BlockSize == 0) {
      fp8 = make_bench_weights(layer, BenchDtype::Fp8Block);
    }
    for (auto [t, zipf] : o.runs) {
      fn(m, layer, weights, bf16 ? &*bf16 : nullptr, fp8 ? &*fp8 : nullptr, t, zipf);
    }
  }
  return skipped;
}

// The sampled tokens checked per cell: 4 for the dtype under test, 1 for the bf16 comparison
// (the bf16 stage has its own benchmark; here it only has to be right).
constexpr int kSamples = 4, kBf16Samples = 1;

// --cpu: every cell validated on the CPU reference backend; exit status 1 if any fails.
int run_cpu_check(const Options& o) {
  std::printf("modmoe bench experts --cpu --dtype %s%s: every cell validated on the CPU "
              "reference backend (models scaled down), untimed\n", bench_dtype_name(o.dtype),
              o.fp8_fast_accum ? " --fp8-fast-accum" : "");
  int cells = 0, failed = 0;
  for_each_cell(o, Device::cpu(), [&](const Model& m, const Layer& layer, const BenchWeights& w,
                                      const BenchWeights* bf16, const BenchWeights* fp8,
                                      int64_t t, bool zipf) {
    // With an fp8-block comparison the inputs carry the fp8-block activations too.
    const CellInputs in =
        make_cell_inputs(layer, t, zipf, o.seed, fp8 ? BenchDtype::Fp8Block : o.dtype);
    const DtypeRun run = run_dtype(layer, w, in, kSamples, false, {}, o.fp8_fast_accum);
    const bool bf16_ok = !bf16 || run_dtype(layer, *bf16, in, kBf16Samples, false, {}).correct;
    const bool fp8_ok = !fp8 || run_dtype(layer, *fp8, in, kBf16Samples, false, {}).correct;
    ++cells;
    failed += !(run.correct && bf16_ok && fp8_ok);
    std::printf("%-13s %-7s T=%-6lld %s rel L2 %.2e", m.name.c_str(), zipf ? "zipf" : "uniform",
                static_cast<long long>(t), bench_dtype_name(o.dtype), run.check.rel_l2);
    if (run.check.rel_l2_emulated >= 0) std::printf(" (emulated %.2e)", run.check.rel_l2_emulated);
    std::printf("%s%s: %s\n", bf16 ? (bf16_ok ? ", bf16 ok" : ", bf16 WRONG") : "",
                fp8 ? (fp8_ok ? ", fp8-block ok" : ", fp8-block WRONG") : "",
                run.correct && bf16_ok && fp8_ok ? "ok" : "FAILED");
  });
  std::printf("%d cells, %d failed\n", cells, failed);
  return failed ? 1 : 0;
}

#ifdef MODMOE_WITH_CUDA
int run_gpu(const Options& o) {
  const Ceilings ceil = measure_ceilings(is_fp8(o.dtype));
  Report report(o.dtype, ceil, o.ab, o.torch_base);
  report.print_header(gpu_name());
  const CheckBounds bounds = check_bounds(o.dtype, o.fp8_fast_accum);
  if (o.fp8_fast_accum) {
    std::printf("FP8 fast accumulation (ExpertsOptions::fp8_fast_accum): rel L2 bound %.3g vs "
                "float64, emulated bound %.3g (docs/fp8.md \"FP8 fast accumulation\")\n",
                bounds.rel_l2, bounds.emulated);
  }
  const std::vector<std::string> skipped = for_each_cell(o, Device::cuda(0), [&](const Model& m, const Layer& layer, const BenchWeights& w,
                                        const BenchWeights* bf16, const BenchWeights* fp8,
                                        int64_t t, bool zipf) {
    const CellInputs in =
        make_cell_inputs(layer, t, zipf, o.seed, fp8 ? BenchDtype::Fp8Block : o.dtype);
    CellResult c;
    c.model = m.name;
    c.zipf = zipf;
    c.shape = {t, layer.preset.hidden, layer.preset.intermediate, layer.preset.top_k,
               static_cast<double>(in.experts_touched)};
    c.run = run_dtype(layer, w, in, kSamples, true, o.ab, o.fp8_fast_accum);
    if (bf16) c.bf16 = run_dtype(layer, *bf16, in, kBf16Samples, true, {});
    if (fp8) c.fp8 = run_dtype(layer, *fp8, in, kBf16Samples, true, {});
    report.add(c);
  });
  nlohmann::json out = report.finish(bench_header("experts", ceil));
  if (!skipped.empty()) out["skipped_models"] = skipped;
  if (o.dtype == BenchDtype::Fp8Tensor) out["fp8_fast_accum"] = o.fp8_fast_accum;
  out["check_bounds"] = {{"rel_l2", bounds.rel_l2}, {"rel_l2_emulated", bounds.emulated}};
  write_bench_json(out, o.out, bench_json_name(o.dtype, o.fp8_fast_accum));
  return 0;
}
#endif

}  // namespace

int run_bench_experts(const std::vector<std::string>& argv) {
  const Options o = parse_options(argv);
  if (o.cpu) return run_cpu_check(o);
#ifdef MODMOE_WITH_CUDA
  return run_gpu(o);
#else
  MODMOE_FAIL("`modmoe bench experts` needs a GPU build: this build has no CUDA backend "
              "(--cpu validates the cells on the CPU reference backend)");
#endif
}

}  // namespace modmoe::app
