#include "bench_common.h"

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>

#include "core/synth_fill.h"
#include "modmoe/error.h"
#include "modmoe/version.h"
#include "timing.h"
#ifdef MODMOE_WITH_CUDA
#include <cublas_v2.h>

#include "cuda/device/device_tensor.h"
#endif

#ifndef MODMOE_GIT_COMMIT
#define MODMOE_GIT_COMMIT "unknown"
#endif

namespace modmoe::app {

std::vector<int64_t> parse_int_list(const std::string& csv, const char* option) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos <= csv.size()) {
    const size_t end = csv.find(',', pos) == std::string::npos ? csv.size() : csv.find(',', pos);
    const std::string item = csv.substr(pos, end - pos);
    char* stop = nullptr;
    const long long v = std::strtoll(item.c_str(), &stop, 10);
    MODMOE_CHECK(!item.empty() && *stop == '\0' && v >= 0, "option '", option, "' = '", csv,
                 "': expected comma-separated non-negative integers");
    out.push_back(v);
    pos = end + 1;
  }
  return out;
}

std::string format_ratio(double r) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2fx", r);
  return buf;
}

std::string commit_id() {
  const char* env = std::getenv("MODMOE_COMMIT");
  return env && *env ? env : MODMOE_GIT_COMMIT;
}

// "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": the folder name under bench/results.
std::string gpu_folder_name(const std::string& name) {
  std::string out;
  for (char c : name) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (std::isalnum(u)) {
      out += static_cast<char>(std::tolower(u));
    } else if (!out.empty() && out.back() != '-') {
      out += '-';
    }
  }
  while (!out.empty() && out.back() == '-') out.pop_back();
  return out.empty() ? std::string("unknown-gpu") : out;
}


#ifdef MODMOE_WITH_CUDA

std::string gpu_name() {
  cudaDeviceProp prop{};
  MODMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  return prop.name;
}

double time_graph_ms(int calls, const std::function<void(int, cudaStream_t)>& call, int reps) {
  cudaStream_t s;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (int i = 0; i < calls; ++i) call(i, s);  // eager warm-up
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  MODMOE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) call(i, s);
  MODMOE_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  MODMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  MODMOE_CUDA_CHECK(cudaEventCreate(&a));
  MODMOE_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> t;
  for (int i = 0; i < reps + 2; ++i) {
    MODMOE_CUDA_CHECK(cudaEventRecord(a, s));
    MODMOE_CUDA_CHECK(cudaGraphLaunch(exec, s));
    MODMOE_CUDA_CHECK(cudaEventRecord(b, s));
    MODMOE_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    MODMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    if (i >= 2) t.push_back(ms / calls);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
  return median(t);
}

Ceilings measure_ceilings(bool with_fp8) {
  Ceilings c;
  {
    const int64_t bytes = int64_t{2} << 30;
    DeviceTensor src(DType::U8, {bytes}), dst(DType::U8, {bytes});
    MODMOE_CUDA_CHECK(cudaMemset(src.view().data, 1, bytes));
    const double ms = time_ms(Device::cuda(0), [&] {
      MODMOE_CUDA_CHECK(cudaMemcpyAsync(dst.view().data, src.view().data, bytes, cudaMemcpyDeviceToDevice));
    }, 2, 9);
    c.copy_GBps = 2.0 * bytes / (ms * 1e6);
  }
  {
    const int n = 8192;
    DeviceTensor a(DType::BF16, {n, n}), b(DType::BF16, {n, n}), d(DType::BF16, {n, n});
    synth::fill(a, 1, 1, 1.0f);
    synth::fill(b, 1, 2, 1.0f);
    cublasHandle_t h;
    MODMOE_CHECK(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS, "cublasCreate failed");
    const float alpha = 1.0f, beta = 0.0f;
    auto gemm = [&] {
      const cublasStatus_t st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a.view().data,
                                             CUDA_R_16BF, n, b.view().data, CUDA_R_16BF, n, &beta,
                                             d.view().data, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT);
      MODMOE_CHECK(st == CUBLAS_STATUS_SUCCESS, "cublasGemmEx failed: status ", static_cast<int>(st));
    };
    const double ms = time_ms(Device::cuda(0), gemm, 3, 9);
    c.dense_TFLOPs = 2.0 * n * static_cast<double>(n) * n / (ms * 1e9);
    cublasDestroy(h);
  }
  if (with_fp8) {
    try {
      c.dense_fp8_TFLOPs = measure_dense_fp8_TFLOPs();
      c.fp8_how = "cuBLASLt FP8 GEMM 8192^3, e4m3 x e4m3 -> bf16, TN, fp32 compute, fast accumulation, random data";
    } catch (const Error& e) {
      c.dense_fp8_TFLOPs = 2.0 * c.dense_TFLOPs;
      c.fp8_how = std::string("2x the bf16 ceiling: the cuBLASLt FP8 GEMM failed: ") + e.what();
    }
  }
  return c;
}

nlohmann::json bench_header(const std::string& name, const Ceilings& ceil) {
  nlohmann::json j;
  j["benchmark"] = name;
  j["gpu"] = gpu_name();
  j["commit"] = commit_id();
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  j["date"] = date;
  j["modmoe_version"] = version();
  j["ceilings"] = {{"copy_GBps", ceil.copy_GBps}, {"dense_bf16_TFLOPs", ceil.dense_TFLOPs},
                   {"how", "2 GiB device-to-device copy (read + write bytes); cuBLAS bf16 GEMM 8192^3, random data"}};
  if (ceil.dense_fp8_TFLOPs > 0) {
    j["ceilings"]["dense_fp8_TFLOPs"] = ceil.dense_fp8_TFLOPs;
    j["ceilings"]["dense_fp8_how"] = ceil.fp8_how;
  }
  return j;
}

#endif

void write_bench_json(const nlohmann::json& out, const std::string& path, const std::string& file) {
  std::string target = path;
  if (target.empty()) {
    const std::string gpu = out.contains("gpu") ? out["gpu"].get<std::string>() : "cpu";
    const std::string gpus = out.contains("gpu_count") && out["gpu_count"].get<int>() > 1
                                 ? "x" + std::to_string(out["gpu_count"].get<int>())
                                 : "";
    target = "bench/results/" + gpu_folder_name(gpu) + gpus + "/" + file;
  }
  std::filesystem::create_directories(std::filesystem::path(target).parent_path());
  std::ofstream f(target);
  MODMOE_CHECK(f.good(), "cannot write '", target, "'");
  f << out.dump(2) << "\n";
  std::printf("wrote %s\n", target.c_str());
}

}  // namespace modmoe::app
