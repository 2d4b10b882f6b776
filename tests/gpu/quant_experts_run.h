// The experts() harness shared by the quantized GPU suites (test_gpu_fp8_experts,
// test_gpu_nvfp4_experts): host tensors copied to the device or used as they are (the CPU
// oracle side, and the dry run), poisoned outputs, one workspace, the outputs fetched back.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/test_util.h"
#include "core/host_tensor.h"
#include "cuda/device/cuda_check.h"
#include "cuda/device/device_tensor.h"
#include "modmoe/experts.h"

namespace modmoe::test {

// The outputs of one run, on the host.
struct ExpertsHostOutputs {
  HostTensor out, g2, act, ew, e2p, offsets;
};

// Views of host tensors: device copies (kept alive here) when `gpu`, else the host tensors.
class Views {
 public:
  explicit Views(bool gpu) : gpu_(gpu) {}
  TensorView operator()(const HostTensor& h) {
    if (!gpu_ || h.numel() == 0) return h.view();
    keep_.push_back(std::make_unique<DeviceTensor>(DeviceTensor::from_host(h)));
    return keep_.back()->view();
  }
  bool gpu() const { return gpu_; }

 private:
  bool gpu_;
  std::vector<std::unique_ptr<DeviceTensor>> keep_;
};

// A layer's weights (host views, as a suite's Problem holds them) copied to the GPU; view()
// gives the whole layer, or the experts [first, first + count) as one EP rank holds them (every
// tensor sliced along its leading expert dimension). Tensors left undefined stay undefined.
class DeviceExpertWeights {
 public:
  explicit DeviceExpertWeights(const ExpertWeights& host) : base_(host) {
    for (size_t i = 0; i < kMembers.size(); ++i) {
      const TensorView& h = host.*kMembers[i];
      if (!h.defined() || h.numel() == 0) continue;
      const std::vector<int64_t> shape(h.shape.begin(), h.shape.begin() + h.ndim);
      copies_[i] = std::make_unique<DeviceTensor>(h.dtype, shape);
      MODMOE_CUDA_CHECK(
          cudaMemcpy(copies_[i]->view().data, h.data, h.nbytes(), cudaMemcpyHostToDevice));
    }
  }
  ExpertWeights view(int64_t first = 0, int64_t count = -1) const {
    ExpertWeights w = base_;
    for (size_t i = 0; i < kMembers.size(); ++i) {
      if (!copies_[i]) continue;
      TensorView v = copies_[i]->view();
      const int64_t per = v.nbytes() / v.shape[0];
      v.data = static_cast<char*>(v.data) + first * per;
      if (count >= 0) v.shape[0] = count;
      w.*kMembers[i] = v;
    }
    return w;
  }

 private:
  static constexpr std::array<TensorView ExpertWeights::*, 8> kMembers = {
      &ExpertWeights::w13,       &ExpertWeights::w2,       &ExpertWeights::w13_scale,
      &ExpertWeights::w2_scale,  &ExpertWeights::w13_bias, &ExpertWeights::w2_bias,
      &ExpertWeights::w13_global_scale, &ExpertWeights::w2_global_scale};
  ExpertWeights base_;
  std::array<std::unique_ptr<DeviceTensor>, 8> copies_;
};

// The sizes of a call, for its outputs.
struct ExpertsShape {
  bool batched = false;
  bool do_finalize = true;
  int64_t M = 0, H = 0, I = 0, k = 0, E_local = 0;
  int64_t rows = 0;  // the row space: M * k (standard) or E_local * M (batched)
};

// Every output a call can write, poisoned (0xFF) on the host and viewed through `views`.
inline ExpertsOutputs poisoned_outputs(const ExpertsShape& s, ExpertsHostOutputs& host,
                                       Views& views) {
  ExpertsOutputs out;
  auto make = [&](HostTensor& h, DType dt, std::vector<int64_t> shape) -> TensorView {
    h.reset(dt, shape);
    poison(h);
    return views(h);
  };
  if (s.batched) {
    out.gemm2_out = make(host.g2, DType::BF16, {s.E_local, s.M, s.H});
    return out;
  }
  if (s.do_finalize) {
    out.out = make(host.out, DType::BF16, {s.M, s.H});
  } else {
    out.gemm2_out = make(host.g2, DType::BF16, {s.rows, s.H});
    out.expert_weights = make(host.ew, DType::F32, {s.M, s.k});
    out.expanded_idx_to_permuted_idx = make(host.e2p, DType::I32, {s.M, s.k});
  }
  out.expert_first_token_offset = make(host.offsets, DType::I64, {s.E_local + 1});
  out.gemm1_activation_output = make(host.act, DType::BF16, {s.rows, s.I});
  return out;
}

// experts() `repeats` times (on the GPU with a 0xFF-filled workspace), then the outputs back
// into `host`.
inline void run_and_fetch(const ExpertsInputs& in, const ExpertWeights& w, const ExpertMap& map,
                          const ExpertsOptions& o, const ExpertsOutputs& out, bool gpu,
                          int repeats, ExpertsHostOutputs& host) {
  const size_t ws_bytes = experts_workspace_size(make_experts_desc(in, w, map, o, out));
  std::unique_ptr<DeviceTensor> ws;
  Workspace workspace;
  if (gpu && ws_bytes > 0) {
    ws = std::make_unique<DeviceTensor>(DType::U8,
                                        std::vector<int64_t>{static_cast<int64_t>(ws_bytes)});
    ws->fill_bytes(0xFF);
    workspace = {ws->view().data, ws_bytes};
  }
  for (int r = 0; r < repeats; ++r) experts(in, w, map, o, out, workspace);
  if (!gpu) return;
  MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
  auto back = [](HostTensor& h, const TensorView& v) {
    if (h.numel() == 0) return;
    MODMOE_CUDA_CHECK(cudaMemcpy(h.view().data, v.data, h.nbytes(), cudaMemcpyDeviceToHost));
  };
  back(host.out, out.out);
  back(host.g2, out.gemm2_out);
  back(host.act, out.gemm1_activation_output);
  back(host.ew, out.expert_weights);
  back(host.e2p, out.expanded_idx_to_permuted_idx);
  back(host.offsets, out.expert_first_token_offset);
}

// The call (do_finalize, `out` its only output) captured in a CUDA graph on a stream of its own
// and replayed over a poisoned `out`: every replay gives `want`'s bits.
inline void expect_graph_replays(const ExpertsInputs& in, const ExpertWeights& w,
                                 const ExpertMap& map, const ExpertsOptions& o,
                                 const DeviceTensor& out, const HostTensor& want,
                                 int replays = 2) {
  ExpertsOutputs eo;
  eo.out = out.view();
  const size_t ws_bytes = experts_workspace_size(make_experts_desc(in, w, map, o, eo));
  DeviceTensor ws(DType::U8, {static_cast<int64_t>(ws_bytes)});
  cudaStream_t stream;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  MODMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  experts(in, w, map, o, eo, {ws.view().data, ws_bytes}, stream);
  MODMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  MODMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int r = 0; r < replays; ++r) {
    MODMOE_CUDA_CHECK(cudaMemset(out.view().data, 0xFF, out.view().nbytes()));
    MODMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_TRUE(bitwise_equal(out.to_host(), want)) << "graph replay " << r;
  }
  MODMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MODMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  MODMOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

// The first `rows` rows of a [R, C] tensor as doubles.
inline std::vector<double> first_rows(const HostTensor& t, int64_t rows) {
  std::vector<double> v = to_double(t);
  const int64_t cols = t.view().shape[t.view().ndim - 1];
  v.resize(static_cast<size_t>(rows * cols));
  return v;
}

// The share of equal elements.
inline double bitwise_fraction(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.empty()) return 1.0;
  int64_t same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
  return static_cast<double>(same) / static_cast<double>(a.size());
}

}  // namespace modmoe::test
