// The FP8 dense ceiling: a cuBLASLt e4m3 x e4m3 -> bf16 GEMM, the FP8 counterpart of the bf16
// cuBLAS GEMM of measure_ceilings(). cuBLASLt's FP8 kernels need the "TN" form (A transposed,
// B not; column-major, so both operands are K-major), fp32 compute and scale types.
#ifdef MODMOE_WITH_CUDA
#include <cublasLt.h>

#include "bench_common.h"
#include "core/synth_fill.h"
#include "cuda/device/device_tensor.h"
#include "modmoe/quant.h"
#include "timing.h"

namespace modmoe::app {
namespace {

void lt_check(cublasStatus_t status, const char* what) {
  MODMOE_CHECK(status == CUBLAS_STATUS_SUCCESS, "cuBLASLt: ", what, " failed with status ",
               static_cast<int>(status));
}

// The handles of one GEMM, released on every path.
struct LtGemm {
  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtGemm() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
    if (handle) cublasLtDestroy(handle);
  }
};

// [n, n] e4m3 random values: N(0, 1) bf16 quantized with one dynamic scale.
void fill_e4m3(const DeviceTensor& q, int64_t n, uint64_t stream) {
  DeviceTensor x(DType::BF16, {n, n}), scale(DType::F32, {1});
  synth::fill(x, 1, stream, 1.0f);
  quantize_activations(x, QuantScheme::Fp8PerTensor, q, scale);
  MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace

double measure_dense_fp8_TFLOPs(int n) {
  DeviceTensor a(DType::E4M3, {n, n}), b(DType::E4M3, {n, n}), d(DType::BF16, {n, n});
  fill_e4m3(a, n, 1);
  fill_e4m3(b, n, 2);
  const size_t ws_bytes = size_t{32} << 20;
  DeviceTensor ws(DType::U8, {static_cast<int64_t>(ws_bytes)});

  LtGemm g;
  lt_check(cublasLtCreate(&g.handle), "cublasLtCreate");
  lt_check(cublasLtMatmulDescCreate(&g.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  // NOTE: fast accumulation is the fastest FP8 mode; a ceiling must not be beaten by any kernel.
  const int8_t fast_accum = 1;
  lt_check(cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof trans_a), "TRANSA");
  lt_check(cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof trans_b), "TRANSB");
  lt_check(cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast_accum, sizeof fast_accum),
           "FAST_ACCUM");
  // Column-major: A is stored [k, m] (op T), B [k, n], D [m, n]; all 8192 here.
  lt_check(cublasLtMatrixLayoutCreate(&g.a, CUDA_R_8F_E4M3, n, n, n), "layout A");
  lt_check(cublasLtMatrixLayoutCreate(&g.b, CUDA_R_8F_E4M3, n, n, n), "layout B");
  lt_check(cublasLtMatrixLayoutCreate(&g.d, CUDA_R_16BF, n, n, n), "layout D");
  lt_check(cublasLtMatmulPreferenceCreate(&g.pref), "cublasLtMatmulPreferenceCreate");
  lt_check(cublasLtMatmulPreferenceSetAttribute(g.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &ws_bytes, sizeof ws_bytes), "MAX_WORKSPACE_BYTES");
  cublasLtMatmulHeuristicResult_t algo{};
  int found = 0;
  lt_check(cublasLtMatmulAlgoGetHeuristic(g.handle, g.op, g.a, g.b, g.d, g.d, g.pref, 1, &algo, &found),
           "cublasLtMatmulAlgoGetHeuristic");
  MODMOE_CHECK(found > 0, "cuBLASLt: no algorithm for an e4m3 x e4m3 -> bf16 GEMM of ", n, "^3");

  const float alpha = 1.0f, beta = 0.0f;
  auto gemm = [&] {
    lt_check(cublasLtMatmul(g.handle, g.op, &alpha, a.view().data, g.a, b.view().data, g.b, &beta,
                            d.view().data, g.d, d.view().data, g.d, &algo.algo, ws.view().data,
                            ws_bytes, nullptr),
             "cublasLtMatmul");
  };
  const double ms = time_ms(Device::cuda(0), gemm, 3, 9);
  return 2.0 * n * static_cast<double>(n) * n / (ms * 1e9);
}

}  // namespace modmoe::app
#endif  // MODMOE_WITH_CUDA
