// Host side of the sm90 grouped GEMM: the weight tensor map, the persistent grid, the launch
// with programmatic dependent launch, and the explicit instantiations of
// sm90_wgmma_grouped_gemm.cuh.
//
// Instantiations: bf16 2 tiles x 2 stages (GEMM1, GEMM2) = 4 kernels, FP8 2 tiles x 2 stages =
// 4 more, and the FP8 fast-accumulation 256-token tile for GEMM1 only = 9. The per-tile wgmma
// width is a run-time switch inside each (4 widths for the narrow tiles, 8 for the wide ones
// and 4 for the FP8 128-token one, plus the tail variant of the bf16 tiles). Fast accumulation
// is a compile-time property of its tile (Sm90Tile::kFastAccum): the other 8 kernels compile
// none of it.
#include <cuda.h>

#include <mutex>

#include "cuda/device/cuda_check.h"
#include "cuda/device/launch.h"
#include "cuda/gemm/grouped_gemm.h"
#include "cuda/gemm/sm90_wgmma_grouped_gemm.cuh"

namespace modmoe::cuda::gemm {

// Narrow: up to 64 tokens per tile (80 with the tail rows), N in steps of 16, 8 stages of 16 KB
// of weights + 10 KB of tokens: decode and few tokens per expert, where every SM must keep
// many weight loads in flight (8 x 16 KB).
using Sm90Narrow = Sm90Tile<64, 8, 32>;
// Wide: up to 256 tokens per tile (288 with the tail rows), N in steps of 32, 4 stages of
// 16 KB + 36 KB: prefill and the middle, where the tile must be large for the tensor cores
// (128 x 256 per CTA).
using Sm90Wide = Sm90Tile<256, 4, 32>;

// FP8 (docs/fp8.md): two accumulator sets per thread (the k-block's wgmma result and the
// scaled sum), so at most 128 tokens per tile; no tail rows. Both promote every 128 of K, also
// for a GEMM with GemmDesc::fp8_fast_accum (select_config gives such a GEMM the fast tile below
// past 128 rows per group only).
// Narrow: up to 64 tokens, 8 stages of 16 KB of weights (128 rows x 128 e4m3) + 8 KB of tokens.
using Sm90Fp8Narrow = Sm90Tile<64, 8, 32, true>;
// 128 tokens, 6 stages of 16 + 16 KB: the middle and prefill.
using Sm90Fp8Mid = Sm90Tile<128, 6, 32, true>;
// 256 tokens, 4 stages of 16 + 32 KB: FP8 fast accumulation (Sm90Tile::kFastAccum: no
// promotion, one accumulator set, the scales in the epilogue), the fp8-tensor GEMM1 with
// GemmDesc::fp8_fast_accum only; GEMM1 only (GEMM2's scales change along K).
using Sm90Fp8Wide = Sm90Tile<256, 4, 32, true>;

GemmConfig sm90_narrow_config() { return Sm90Narrow::config(); }
GemmConfig sm90_wide_config() { return Sm90Wide::config(); }
GemmConfig sm90_fp8_narrow_config() { return Sm90Fp8Narrow::config(); }
GemmConfig sm90_fp8_mid_config() { return Sm90Fp8Mid::config(); }
GemmConfig sm90_fp8_wide_config() { return Sm90Fp8Wide::config(); }
int sm90_w4a16_tail_rows();  // sm90_w4a16_grouped_gemm.cu

int sm90_tail_rows(const GemmConfig& config) {
  if (config.nvfp4) return config.arch == 90 ? sm90_w4a16_tail_rows() : 0;
  if (is_fp8_config(config)) return 0;
  return config.block_m == Sm90Wide::kBlockM ? Sm90Wide::kTail : Sm90Narrow::kTail;
}

namespace {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    MODMOE_CUDA_CHECK(
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    MODMOE_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr,
                 "sm90 grouped GEMM: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<EncodeTiledFn>(p);
  }();
  return fn;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The weights of all experts as one tensor map: dims (k, b_rows, E_local), strides in bytes
// (ldb * e, b_expert_stride * e; e = 2 bf16, 1 e4m3), box (128 bytes of k, 128, 1), 128-byte
// swizzle, zero fill outside.
CUtensorMap weight_map(const GemmDesc& desc, const GemmArgs& args) {
  CUtensorMap map;
  const cuuint64_t elem = desc.fp8 ? 1 : 2;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(desc.k),
                              static_cast<cuuint64_t>(desc.b_rows()),
                              static_cast<cuuint64_t>(desc.num_experts)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(args.ldb) * elem,
                                 static_cast<cuuint64_t>(args.b_expert_stride) * elem};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(128 / elem), 128, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode_tiled()(
      &map, desc.fp8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3,
      const_cast<__nv_bfloat16*>(args.b), dims,
      strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MODMOE_CHECK(r == CUDA_SUCCESS, "sm90 grouped GEMM: cuTensorMapEncodeTiled failed (", int(r),
               ") for weights of ", desc.num_experts, " x ", desc.b_rows(), " x ", desc.k,
               ", strides ", args.ldb, ", ", args.b_expert_stride);
  return map;
}

// The token rows of the row space as one tensor map: dims (k, rows), stride lda * 2 bytes,
// box (64, box_rows), 128-byte swizzle (the layout the consumers' descriptors expect).
CUtensorMap token_map(const GemmDesc& desc, const GemmArgs& args, int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(desc.k),
                              static_cast<cuuint64_t>(desc.max_rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(args.lda) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16*>(args.a), dims,
      strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MODMOE_CHECK(r == CUDA_SUCCESS, "sm90 grouped GEMM: cuTensorMapEncodeTiled failed (", int(r),
               ") for token rows ", desc.max_rows, " x ", desc.k, ", stride ", args.lda);
  return map;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

CUtensorMap sm90_token_map(const GemmDesc& desc, const GemmArgs& args, int box_rows) {
  return token_map(desc, args, box_rows);
}

// NVFP4 packed weights of all experts: dims (k / 2 bytes, b_rows, E_local), strides (ldb,
// b_expert_stride) in bytes (multiples of 16: k % 64 == 0 and the caller's checks), box
// (box_bytes, 128, 1), no swizzle (the consumers read rows of box_bytes with ld.shared), zero
// fill outside (rows past b_rows decode to 0).
CUtensorMap sm90_packed_weight_map(const GemmDesc& desc, const GemmArgs& args, int box_bytes) {
  CUtensorMap map;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(desc.k / 2),
                              static_cast<cuuint64_t>(desc.b_rows()),
                              static_cast<cuuint64_t>(desc.num_experts)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(args.ldb),
                                 static_cast<cuuint64_t>(args.b_expert_stride)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_bytes), 128, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode_tiled()(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<__nv_bfloat16*>(args.b), dims, strides,
      box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MODMOE_CHECK(r == CUDA_SUCCESS, "sm90 W4A16 grouped GEMM: cuTensorMapEncodeTiled failed (",
               int(r), ") for packed weights of ", desc.num_experts, " x ", desc.b_rows(), " x ",
               desc.k / 2, " bytes, strides ", args.ldb, ", ", args.b_expert_stride);
  return map;
}

namespace {

template <class Tile, bool kGemm1>
void launch_tile(const GemmDesc& desc, const GemmConfig& config, const GemmArgs& args,
                 cudaStream_t stream) {
  const auto kernel = sm90_grouped_gemm_kernel<Tile, kGemm1>;
  static DynamicSmemOptIn smem_opt_in;
  const int device = smem_opt_in.ensure(kernel, Tile::kSmemBytes);
  const DeviceProps props = DeviceProps::query(device);

  const int64_t n_tiles = ceil_div(desc.b_rows(), Tile::kBlockN);
  const int64_t m_tiles = desc.max_m_tiles(Tile::kBlockM);
  const int64_t units = m_tiles * n_tiles * config.split_k;
  if (units == 0) return;
  MODMOE_CHECK(units < INT32_MAX, "sm90 grouped GEMM: ", units, " work units: expected < 2^31");
  if (config.split_k > 1) {
    const SplitKCapacity cap = split_k_capacity(desc);
    MODMOE_CHECK(Tile::kNStep == 16 && config.split_k <= cap.max_split &&
                     m_tiles * n_tiles <= cap.max_tiles && args.split_partials != nullptr &&
                     args.split_counters != nullptr,
                 "sm90 grouped GEMM: split_k = ", config.split_k, " with ", config.to_string(),
                 ": the problem allows at most ", cap.max_split, " (and needs the scratch)");
  }
  MODMOE_CHECK(config.tail_m == 0 || (config.tail_m == Tile::kTail && config.split_k == 1),
               "sm90 grouped GEMM: tail_m = ", config.tail_m, " with ", config.to_string(),
               ": expected 0 or ", Tile::kTail, " (and no split-K)");

  MODMOE_CHECK(Tile::kFp8 == desc.fp8, "sm90 grouped GEMM: ", config.to_string(), " is ",
               Tile::kFp8 ? "an FP8" : "a bf16", " config");
  if constexpr (Tile::kFp8) {
    MODMOE_CHECK(args.a_scale != nullptr && args.b_scale != nullptr,
                 "sm90 FP8 grouped GEMM: a_scale and b_scale are required");
  }
  Sm90Params params{};
  params.tmap_w = weight_map(desc, args);
  // Contiguous token rows (no gather) come by TMA; gathered ones by cp.async. FP8 rows always
  // by cp.async, which copies their scales with them.
  params.x_tma = args.a_gather == nullptr && !Tile::kFp8 ? 1 : 0;
  if (params.x_tma) params.tmap_x = token_map(desc, args, Tile::kNStep);
  sm90_fill_params(params, desc, config, args, n_tiles);
  // FP8 fast accumulation (Tile::kFastAccum): the full-K sum in the tensor cores'
  // accumulator, multiplied by the scales once in the epilogue, which needs scales constant
  // along K (the Fp8PerTensor GEMM1) and the caller's consent (desc.fp8_fast_accum, opt-in:
  // ExpertsOptions::fp8_fast_accum). The other FP8 tiles promote every 128 of K whatever the
  // desc says.
  if constexpr (Tile::kFastAccum) {
    MODMOE_CHECK(desc.fp8_fast_accum,
                 "sm90 FP8 grouped GEMM: ", config.to_string(), " runs FP8 fast accumulation "
                 "only (GemmDesc::fp8_fast_accum, the fp8-tensor GEMM1); expected another tile "
                 "for this call");
    MODMOE_CHECK(args.a_scale_kb == 0 && args.b_scale_kb == 0,
                 "sm90 FP8 grouped GEMM: fp8_fast_accum needs scales constant along K (the "
                 "fp8-tensor GEMM1: a_scale_kb = b_scale_kb = 0), got a_scale_kb = ",
                 args.a_scale_kb, ", b_scale_kb = ", args.b_scale_kb);
  }

  const int sms = props.sm_count > 0 ? props.sm_count : 132;
  const unsigned grid = static_cast<unsigned>(units < sms ? units : sms);
  launch_kernel(kernel, dim3(grid), Tile::kThreads, Tile::kSmemBytes, stream, use_pdl(), params);
}

template <class Tile>
void launch_stage(const GemmDesc& desc, const GemmConfig& config, const GemmArgs& args,
                  cudaStream_t stream) {
  switch (desc.stage) {
    case GemmStage::Gemm1: return launch_tile<Tile, true>(desc, config, args, stream);
    case GemmStage::Gemm2: return launch_tile<Tile, false>(desc, config, args, stream);
  }
  MODMOE_FAIL("sm90 grouped GEMM: unknown stage ", static_cast<int>(desc.stage));
}

}  // namespace

void launch_sm90_grouped_gemm(const GemmDesc& desc, const GemmConfig& config,
                              const GemmArgs& args, cudaStream_t stream) {
  MODMOE_CHECK(desc.sm90_supported(), "sm90 grouped GEMM: ", config.to_string(),
               " cannot run this problem (gated layout other than GateUpInterleaved G = 8, or "
               "unaligned pointers)");
  MODMOE_CHECK(aligned16(args.a) && aligned16(args.b) && aligned16(args.c) && args.lda % 8 == 0 &&
                   args.ldb % 8 == 0 && args.b_expert_stride % 8 == 0 && args.ldc % 8 == 0,
               "sm90 grouped GEMM: pointers and row strides must be 16-byte aligned (lda ",
               args.lda, ", ldb ", args.ldb, ", expert stride ", args.b_expert_stride, ", ldc ",
               args.ldc, ")");
  MODMOE_CHECK(!desc.fp8 || (args.lda % 16 == 0 && args.ldb % 16 == 0 &&
                             args.b_expert_stride % 16 == 0),
               "sm90 FP8 grouped GEMM: e4m3 row strides must be multiples of 16 bytes (lda ",
               args.lda, ", ldb ", args.ldb, ", expert stride ", args.b_expert_stride, ")");
  const GemmConfig base = config.compiled_base();
  if (base == Sm90Narrow::config()) return launch_stage<Sm90Narrow>(desc, config, args, stream);
  if (base == Sm90Wide::config()) return launch_stage<Sm90Wide>(desc, config, args, stream);
  if (base == Sm90Fp8Narrow::config()) return launch_stage<Sm90Fp8Narrow>(desc, config, args, stream);
  if (base == Sm90Fp8Mid::config()) return launch_stage<Sm90Fp8Mid>(desc, config, args, stream);
  if (base == Sm90Fp8Wide::config()) {
    MODMOE_CHECK(desc.stage == GemmStage::Gemm1, "sm90 grouped GEMM: ", config.to_string(),
                 " runs GEMM1 only (fp8-tensor with fast accumulation)");
    return launch_tile<Sm90Fp8Wide, true>(desc, config, args, stream);
  }
  MODMOE_FAIL("sm90 grouped GEMM: config ", config.to_string(), " is not compiled");
}

}  // namespace modmoe::cuda::gemm
