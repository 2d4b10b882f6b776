// Finalize on the GPU: out[m] = sum over j (in order, local picks only) of
// w[m, j] * float(gemm2_out[expanded_idx_to_permuted_idx[m, j]]), fp32, cast once to bf16.
//
// One block per token; each thread owns kVec consecutive columns (8 bf16 = one 16-byte load
// per term) and walks j = 0..k-1 in order, so the sum is the same on every run and equal to
// the CPU reference bit for bit. The multiply and the add are explicit round-to-nearest
// intrinsics: nvcc would otherwise fuse them into an FMA, which the host reference does not
// do. Rows with no local pick get +0.
//
// Launched with programmatic dependent launch where the experts stage uses it: the blocks
// start while the GEMM before them drains and wait (griddepcontrol.wait) before any read.
#include <cuda_bf16.h>

#include <cstdint>

#include "backend.h"
#include "cuda/device/cuda_check.h"
#include "cuda/device/launch.h"
#include "cuda/device/sm90_ptx.cuh"
#include "cuda/gemm/grouped_gemm.h"

namespace modmoe::cuda {
namespace {

constexpr int kMaxThreads = 256;

struct FinalizeArgs {
  const __nv_bfloat16* gemm2_out;       // [>= P, H] bf16, row stride gemm2_stride
  const float* expert_weights;          // [M, k] fp32
  const int32_t* expanded_to_permuted;  // [M, k] int32, -1 = not local
  __nv_bfloat16* out;                   // [M, H] bf16, row stride out_stride
  int64_t gemm2_stride;
  int64_t out_stride;
  int hidden;  // H
  int top_k;   // k
};

template <int kVec>
struct alignas(2 * kVec) BF16Vec {
  __nv_bfloat16 v[kVec];
};

template <int kVec>
__global__ void finalize_kernel(const FinalizeArgs a) {
  sm90::grid_dependency_wait();  // gemm2_out and the metadata come from the kernels before
  sm90::grid_launch_dependents();
  const int64_t m = blockIdx.x;
  // NOTE: every thread reads the token's k slots itself (one broadcast load per warp, cached).
  // A shared-memory copy of them let ptxas read four slots at once (LDS.128) also when fewer
  // than four remained: compute-sanitizer memcheck reported those reads past the k entries.
  const int32_t* rows = a.expanded_to_permuted + m * a.top_k;  // [k]
  const float* weights = a.expert_weights + m * a.top_k;       // [k]
  for (int c = threadIdx.x * kVec; c < a.hidden; c += blockDim.x * kVec) {
    float acc[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] = 0.0f;
    for (int j = 0; j < a.top_k; ++j) {
      const int32_t row = __ldg(rows + j);
      if (row < 0) continue;
      const float w = __ldg(weights + j);
      const auto x =
          *reinterpret_cast<const BF16Vec<kVec>*>(a.gemm2_out + row * a.gemm2_stride + c);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        acc[v] = __fadd_rn(acc[v], __fmul_rn(w, __bfloat162float(x.v[v])));
      }
    }
    BF16Vec<kVec> y;
#pragma unroll
    for (int v = 0; v < kVec; ++v) y.v[v] = __float2bfloat16_rn(acc[v]);
    *reinterpret_cast<BF16Vec<kVec>*>(a.out + m * a.out_stride + c) = y;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void finalize(const TensorView& gemm2_out, const TensorView& expert_weights,
              const TensorView& expanded_idx_to_permuted_idx, const TensorView& out,
              Stream stream) {
  const int64_t M = out.size(0);
  const int64_t H = out.size(1);
  const int k = static_cast<int>(expert_weights.size(1));
  MODMOE_CHECK(expert_weights.is_contiguous() && expanded_idx_to_permuted_idx.is_contiguous(),
               "cuda::finalize: expert_weights and expanded_idx_to_permuted_idx must be "
               "contiguous");
  MODMOE_CHECK(gemm2_out.stride(1) == 1 && out.stride(1) == 1,
               "cuda::finalize: gemm2_out and out rows must be contiguous");
  MODMOE_CHECK(H < INT32_MAX && k >= 1, "cuda::finalize: hidden = ", H, ", top_k = ", k);
  if (M == 0 || H == 0) return;

  const FinalizeArgs args{gemm2_out.ptr<const __nv_bfloat16>(),
                          expert_weights.ptr<const float>(),
                          expanded_idx_to_permuted_idx.ptr<const int32_t>(),
                          out.ptr<__nv_bfloat16>(),
                          gemm2_out.stride(0),
                          out.stride(0),
                          static_cast<int>(H),
                          k};
  // 16-byte vectors when every row start is 16-byte aligned, else one element at a time.
  const bool vec8 = H % 8 == 0 && args.gemm2_stride % 8 == 0 && args.out_stride % 8 == 0 &&
                    aligned16(args.gemm2_out) && aligned16(args.out);
  const int vec = vec8 ? 8 : 1;
  const int64_t chunks = (H + vec - 1) / vec;
  const int threads =
      static_cast<int>(chunks >= kMaxThreads ? kMaxThreads : (chunks + 31) / 32 * 32);
  MODMOE_CHECK(M <= INT32_MAX, "cuda::finalize: num_tokens = ", M, ": expected < 2^31");
  launch_kernel(vec8 ? finalize_kernel<8> : finalize_kernel<1>, dim3(static_cast<unsigned>(M)),
                static_cast<unsigned>(threads), 0, stream, gemm::use_stage_pdl(), args);
}

}  // namespace modmoe::cuda
