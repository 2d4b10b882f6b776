// Device copies shared by the prepare_weights of every scheme (bf16: gemm/prepare_weights.cu,
// FP8: quant/prepare_fp8.cu, NVFP4: quant/nvfp4.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "modmoe/tensor.h"

namespace modmoe::cuda {

// w13-shaped rows [E_local, 2 * half, row_bytes] from the canonical order (gate rows 0..half-1
// then up, or up first with `up_first`) into GateUpInterleaved with groups of `group_rows`
// (G gate rows, then the matching G up rows), asynchronously on `stream`. Rows are moved in
// the widest unit (16 .. 1 bytes) that the row size and both pointers allow.
void interleave_gate_up_rows(const void* src, void* dst, int64_t num_experts, int64_t half,
                             int64_t group_rows, bool up_first, int64_t row_bytes,
                             cudaStream_t stream);

// dst = src (device to device, asynchronously); nothing when src is undefined or empty.
void copy_device(const TensorView& dst, const TensorView& src, cudaStream_t stream);

}  // namespace modmoe::cuda
