// CUDA backend of FP8 quantization (docs/fp8.md): the twins of src/reference/quant.h,
// called by src/api/quant.cpp after validation. Kept out of src/backend.h on purpose.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "modmoe/quant.h"

namespace modmoe::cuda {

// Per-tensor dynamic: memset + amax + quantize + scale kernels on `stream`; Block128: one
// kernel. No allocation, no host synchronisation, graph-capturable.
void quantize_activations(const TensorView& x, QuantScheme scheme, const TensorView& q,
                          const TensorView& scale, const QuantizeOptions& options,
                          Stream stream);
// Fp8Block128 quantization of the rows of x [rows, cols] bf16 (contiguous) into q [rows, cols]
// e4m3 and scale [rows, cols/128], the formulas of quantize_activations; with valid_rows (a
// count on the device) only the first *valid_rows rows. The experts stage's GEMM2 input.
void quantize_rows_block128(const __nv_bfloat16* x, uint8_t* q, float* scale, int64_t rows,
                            int64_t cols, const int64_t* valid_rows, cudaStream_t stream);
void dequantize_activations(const TensorView& q, QuantScheme scheme, const TensorView& scale,
                            const TensorView& out, Stream stream);
void quantize_weights(const TensorView& w, QuantScheme scheme, const TensorView& q,
                      const TensorView& scale, Stream stream);
void prepare_weights_fp8(const ExpertWeights& src, ExpertWeights& dst,
                         const PrepareWeightsOptions& options, Stream stream);

// NVFP4 (docs/nvfp4.md; src/cuda/quant/nvfp4.cu): the twins of src/reference/nvfp4.h, bit for
// bit, asynchronous on `stream`, graph-capturable. Arguments validated by src/api/nvfp4.cpp.
void quantize_nvfp4(const TensorView& x, const TensorView& q, const TensorView& scale,
                    const TensorView& global_scale, const Nvfp4QuantizeOptions& options,
                    Stream stream);
void dequantize_nvfp4(const TensorView& q, const TensorView& scale,
                      const TensorView& global_scale, const TensorView& out, Stream stream);
void prepare_weights_nvfp4(const ExpertWeights& src, ExpertWeights& dst,
                           const PrepareWeightsOptions& options, Stream stream);

}  // namespace modmoe::cuda
