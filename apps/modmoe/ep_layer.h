// One expert-parallel MoE layer on one rank: route -> [FP8: quantize] -> dispatch -> modular
// experts (this rank's slice, ExpertMap::for_rank, do_finalize, written straight into
// combine_buffer()) -> combine. Shared by `modmoe ep-demo` (per-stage events, checks) and
// `modmoe bench all-to-all` (CUDA-graph replay of the whole layer), together with the
// single-GPU fused_moe reference over the same global batch. CUDA builds only.
//
// dtype bf16: the bf16 hidden rows travel. fp8-block / fp8-tensor (docs/fp8.md, "Quantize
// before dispatch"): FP8 weights, and each rank quantizes its hidden with quantize_activations
// before the dispatch; the payloads are the e4m3 rows, their fp32 scales ([T, H/128], or the
// rank's per-tensor scale once per token, [T]) and topk_weights; the experts get the received
// e4m3 rows and scales; combine stays bf16. nvfp4 (docs/nvfp4.md, "Quantize before dispatch"):
// NVFP4 weights (W4A16), and each rank quantizes its hidden with quantize_nvfp4 with one global
// per token; the payloads are the packed e2m1 rows [T, H/2], their e4m3 block scales [T, H/16],
// the per-token fp32 globals [T] and topk_weights; the receiver dequantizes the rows to bf16
// ([ep*T, H], dequantize_nvfp4 with each row's global) for the experts; combine stays bf16.
#pragma once

#ifdef MODMOE_WITH_CUDA
#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "layer.h"
#include "modmoe/modmoe.h"

struct ncclComm;

namespace modmoe::app {

struct EpLayerOptions {
  AllToAllBackend backend = AllToAllBackend::NvLink;
  int max_tokens = 128;   // per rank: the all-to-all's max_tokens_per_rank
  int num_sms = 0;        // 0 = the all-to-all's default
  bool combine_pull = true;
  bool identity = false;  // identity "experts": the received hidden rows (FP8, NVFP4: dequantized)
  uint64_t seed = 1234;   // weights; Batch(layer(), n*T, seed + 1) is the global batch
  QuantScheme dtype = QuantScheme::None;  // None (bf16), Fp8Block128, Fp8PerTensor or Nvfp4
};

// The bound on rel L2 between a rank's EP output and fused_moe's rows of that rank, for ep-demo
// and the bench. bf16 and fp8-block: 1e-2 (the experts see the same rows: 1x128 groups belong
// to one token; each rank's partial sum is rounded to bf16 before the combine, 0.0022-0.0032
// on the CPU oracle). fp8-tensor: 0.1, because fused_moe's one dynamic scale is over the global
// batch and each rank's over its own tokens, so the rows are other e4m3 roundings of the same
// hidden (0.040-0.076 on the CPU oracle, EpReference.Fp8Tensor*; docs/fp8.md). nvfp4: 1e-2,
// because the reference (FusedReference) runs fused_moe on the global batch quantized per row
// and dequantized, which are the rows the ranks' experts get bit for bit (a token's NVFP4
// bytes do not depend on its batch); only the combine rounding differs (EpReference.Nvfp4*).
double ep_reference_bound(QuantScheme dtype);

// "" when modmoe::experts runs `dtype` weights on CUDA device `device`; else the library's
// "not supported yet: ..." message (FP8 until the FP8 grouped GEMM lands; NVFP4 on a device or
// build without the W4A16 kernel). One tiny call (one token, one expert, H = I = 128, or 64 for
// NVFP4) that the library refuses before anything runs.
std::string experts_not_supported_on_gpu(QuantScheme dtype, int device);

// Stages of EpLayer::run, timed by the events it records (kEpStages + 1 of them).
// route, quantize (FP8, NVFP4; empty for bf16), dispatch, experts (NVFP4: the dequantize
// first), combine
constexpr int kEpStages = 5;

// [rows first, first + count) of a [rows, ...] view.
TensorView rows_of(const TensorView& t, int64_t first, int64_t count);
// [a, b, ...] -> [a*b, ...] of a contiguous view of 2 or more dimensions.
TensorView flatten01(const TensorView& t);
double median_us(std::vector<float> ms);

class EpLayer {
 public:
  EpLayer(const Preset& preset, int ep_size, int ep_rank, ncclComm* comm, const EpLayerOptions& o);
  // Enqueues the layer for this rank's T <= max_tokens tokens (hidden [T,H] bf16, logits
  // [T,E]); the output [T,H] bf16 goes to out(). `ev`, when given, gets kEpStages + 1 events
  // recorded on `s`: before each stage and after the last. Capturable in a CUDA graph.
  void run(const TensorView& hidden, const TensorView& logits, int t, cudaStream_t s, cudaEvent_t* ev = nullptr);

  const Layer& layer() const { return *mine_; }
  AllToAll& a2a() { return *a2a_; }
  const ExpertMap& map() const { return map_; }
  TensorView ids(int t) const { return rows_of(ids_, 0, t); }      // [T,k] routing of the last run
  TensorView weights(int t) const { return rows_of(wts_, 0, t); }  // [T,k]
  TensorView out(int t) const { return rows_of(out_, 0, t); }      // [T,H]
  // FP8: what this rank dispatched in the last run: e4m3 [T,H] and scales [T,H/128] or [T].
  // NVFP4: E2M1x2 [T,H/2], e4m3 block scales [T,H/16] and the per-token globals [T] fp32.
  TensorView hidden_q(int t) const { return rows_of(q_, 0, t); }
  TensorView hidden_scale(int t) const { return rows_of(qs_, 0, t); }
  TensorView hidden_global(int t) const { return rows_of(qg_, 0, t); }
  const DispatchResult& last_dispatch() const { return res_; }

 private:
  const Preset& preset_;
  int n_, rank_;
  EpLayerOptions o_;
  ExpertMap map_;
  std::unique_ptr<Layer> mine_;
  std::unique_ptr<AllToAll> a2a_;
  Buffer ids_, wts_, out_, ws_buf_;
  // FP8: [max_tokens, H] e4m3, [max_tokens, H/128] or [max_tokens] fp32. NVFP4: [max_tokens,
  // H/2] E2M1x2, [max_tokens, H/16] e4m3, qg_ [max_tokens] fp32, and dq_ [ep*max_tokens, H]
  // bf16: the received rows dequantized, what the W4A16 experts read.
  Buffer q_, qs_, qg_, dq_;
  size_t ws_bytes_ = 0;
  DispatchResult res_;
};

// fused_moe on one GPU over a global batch with all E experts: the reference of the EP layer.
class FusedReference {
 public:
  // dtype: the weights (FP8, NVFP4: the same quantized weights as the EP layers'). FP8:
  // fused_moe quantizes the bf16 hidden itself, with dynamic scales over the global batch.
  // NVFP4: run() first quantizes the batch's hidden per row and dequantizes it (what the EP
  // layer's experts receive), then fused_moe on those bf16 rows (W4A16 takes bf16 hidden).
  FusedReference(const Preset& preset, Device dev, uint64_t seed, QuantScheme dtype = QuantScheme::None);
  // Bytes the reference needs (weights of all E experts + the workspace at `num_tokens`),
  // estimated from a rank's layer holding a slice of the experts.
  static size_t bytes_needed(const Layer& slice, int64_t num_tokens);
  // Enqueues fused_moe over `batch` (T tokens); results in out(T), ids(T), weights(T).
  void run(const Batch& batch, cudaStream_t s);
  const Layer& layer() const { return full_; }
  TensorView out() const;      // [T,H] of the last run
  TensorView ids() const;      // [T,k]
  TensorView weights() const;  // [T,k]

 private:
  const Preset& preset_;
  Device dev_;
  ExpertMap all_;
  Layer full_;
  Buffer out_, ids_, wts_, ws_buf_;
  Buffer q_, qs_, qg_, dq_;  // NVFP4: the batch quantized per row and dequantized ([T, H] bf16)
  int64_t cap_ = -1, cur_ = 0;
  size_t ws_bytes_ = 0;
};

// Relative L2 of two [T,H] bf16 device views (downloads both).
double rel_l2_bf16(const TensorView& got, const TensorView& want);

}  // namespace modmoe::app
#endif
