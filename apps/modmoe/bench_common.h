// Shared pieces of the benchmarks: ceilings measured in the same run, CUDA-graph timing,
// and the JSON header (GPU, commit, ceilings) every results file carries.
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <string>
#include <vector>

#include "core/host_tensor.h"
#include "modmoe/tensor.h"
#ifdef MODMOE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace modmoe::app {

std::vector<int64_t> parse_int_list(const std::string& csv, const char* option);
std::string format_ratio(double r);  // "1.23x"
std::string commit_id();  // MODMOE_COMMIT from the environment, else the build's
// "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": the folder name under bench/results.
std::string gpu_folder_name(const std::string& name);

#ifdef MODMOE_WITH_CUDA
struct Ceilings {
  double copy_GBps = 0;     // device-to-device copy, bytes read + written
  double dense_TFLOPs = 0;  // cuBLAS bf16 GEMM 8192^3, fp32 accumulate, random data
  double dense_fp8_TFLOPs = 0;  // with_fp8 only: cuBLASLt e4m3 GEMM 8192^3, or 2x bf16
  std::string fp8_how;          // how dense_fp8_TFLOPs was obtained
};
// with_fp8: also the FP8 dense ceiling; when cuBLASLt cannot run the FP8 GEMM, 2x the bf16
// ceiling, and fp8_how says so and why.
Ceilings measure_ceilings(bool with_fp8 = false);
// cuBLASLt e4m3 x e4m3 -> bf16 GEMM n^3 (fp32 compute, fast accumulation), random data;
// throws modmoe::Error naming the failing cuBLASLt call (fp8_ceiling.cpp).
double measure_dense_fp8_TFLOPs(int n = 8192);
std::string gpu_name();
// Milliseconds per call: a graph of `calls` calls (call(i, stream) for i in [0, calls)) is
// captured once, replayed after warm-up, and the median replay time is divided by `calls`.
double time_graph_ms(int calls, const std::function<void(int, cudaStream_t)>& call, int reps = 10);
nlohmann::json bench_header(const std::string& name, const Ceilings& ceil);
#endif

// Writes `out` to `path`, or to bench/results/<gpu>/<file> when path is empty; prints where.
void write_bench_json(const nlohmann::json& out, const std::string& path, const std::string& file);

}  // namespace modmoe::app
