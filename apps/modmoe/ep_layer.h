// One expert-parallel MoE layer on one rank: route -> dispatch -> modular experts (this
// rank's slice, ExpertMap::for_rank, do_finalize, written straight into combine_buffer())
// -> combine. Shared by `modmoe ep-demo` (per-stage events, checks) and `modmoe bench
// all-to-all` (CUDA-graph replay of the whole layer), together with the single-GPU fused_moe
// reference over the same global batch. CUDA builds only.
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
  bool identity = false;  // identity "experts": a copy of the received hidden rows
  uint64_t seed = 1234;   // weights; Batch(layer(), n*T, seed + 1) is the global batch
};

// [rows first, first + count) of a [rows, ...] view.
TensorView rows_of(const TensorView& t, int64_t first, int64_t count);
// [a, b, c] -> [a*b, c]
TensorView flatten01(const TensorView& t);
double median_us(std::vector<float> ms);

class EpLayer {
 public:
  EpLayer(const Preset& preset, int ep_size, int ep_rank, ncclComm* comm, const EpLayerOptions& o);
  // Enqueues the layer for this rank's T <= max_tokens tokens (hidden [T,H], logits [T,E]);
  // the output [T,H] bf16 goes to out(). `ev`, when given, gets 5 events recorded on `s`:
  // before route, dispatch, experts, combine and after combine. Capturable in a CUDA graph.
  void run(const TensorView& hidden, const TensorView& logits, int t, cudaStream_t s, cudaEvent_t* ev = nullptr);

  const Layer& layer() const { return *mine_; }
  AllToAll& a2a() { return *a2a_; }
  const ExpertMap& map() const { return map_; }
  TensorView ids(int t) const { return rows_of(ids_, 0, t); }      // [T,k] routing of the last run
  TensorView weights(int t) const { return rows_of(wts_, 0, t); }  // [T,k]
  TensorView out(int t) const { return rows_of(out_, 0, t); }      // [T,H]
  const DispatchResult& last_dispatch() const { return res_; }

 private:
  const Preset& preset_;
  int n_, rank_;
  EpLayerOptions o_;
  ExpertMap map_;
  std::unique_ptr<Layer> mine_;
  std::unique_ptr<AllToAll> a2a_;
  Buffer ids_, wts_, out_, ws_buf_;
  size_t ws_bytes_ = 0;
  DispatchResult res_;
};

// fused_moe on one GPU over a global batch with all E experts: the reference of the EP layer.
class FusedReference {
 public:
  FusedReference(const Preset& preset, Device dev, uint64_t seed);
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
  int64_t cap_ = -1, cur_ = 0;
  size_t ws_bytes_ = 0;
};

// Relative L2 of two [T,H] bf16 device views (downloads both).
double rel_l2_bf16(const TensorView& got, const TensorView& want);

}  // namespace modmoe::app
#endif
