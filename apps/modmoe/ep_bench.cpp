// `modmoe bench all-to-all --gpus 2,4`: for every listed ep size (one launch of ep_size
// processes each, rows of all of them in one JSON), dispatch and combine of the expert-parallel all-to-all
// (H=7168, E=256, k=8, topk_ids + hidden + fp32 weights dispatched), NvLink and NCCL
// backends, and plain NCCL send/recv with exact uneven splits (the all_to_all_single baseline
// of ANCHORS.md, which leaves out the host round trip for the split sizes), in one run.
// `--dtype fp8-block|fp8-tensor`: the dispatch carries e4m3 hidden rows plus their fp32 scales
// (H + 4H/128 or H + 4 bytes per token instead of 2H; docs/fp8.md "Quantize before dispatch"),
// the combine stays bf16, and the EP layer runs FP8 weights; rows carry "dtype". `--dtype
// nvfp4`: packed e2m1 rows, e4m3 block scales and one fp32 global per token (H/2 + H/16 + 4
// bytes; docs/nvfp4.md "Quantize before dispatch"), dequantized to bf16 by the receiver; the
// EP layer runs NVFP4 (W4A16) weights.
//
// Every cell is validated before it is timed, and again after: the received rows against the
// CPU plan (reference::ep_plan: counts, source order, ids, rows), the combine of an identity
// "experts" against hidden * (number of destination ranks), exactly. Times are medians of
// CUDA-graph replays (one graph for dispatch, one for combine, replayed alternately), CUDA
// events on each rank; the table shows the slowest rank. GB/s counts the bytes that leave
// that rank's GPU (rows for other ranks) over its median time.
//
// Then the end-to-end EP layer (ep_layer.h, the code `modmoe ep-demo` runs: route, dispatch,
// experts, combine) at every tokens-per-rank on the nvlink and nccl backends, one CUDA graph
// per layer, checked against the single-GPU fused_moe over the same global batch (timed too,
// when it fits in memory); its figures go into the rows of the same backend and settings.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "args.h"
#include "bench_common.h"
#include "ep_common.h"
#include "ep_layer.h"
#include "modmoe/modmoe.h"
#ifdef MODMOE_WITH_CUDA
#include "core/host_tensor.h"
#include "core/synth_fill.h"
#include "cuda/comm/multiprocess.h"
#include "core/presets.h"
#include "cuda/device/device_tensor.h"
#include "reference/ep_sim.h"
#endif

namespace modmoe::app {

#ifdef MODMOE_WITH_CUDA
namespace {

constexpr int kE = 256, kK = 8;
constexpr int64_t kH = 7168;
constexpr int kMaxCells = 96;
constexpr int kMaxRanksBench = 64;
constexpr int kMaxTokenCounts = 16;
constexpr int kMaxLayerVariants = 2;

struct Variant {
  std::string backend;  // nvlink | nccl | nccl_a2a_uneven
  int num_sms = 0;
  bool pull = true;
};

struct Cell {
  double d_us, c_us, d_bytes, c_bytes;
  int correct, valid;
};

// The whole EP layer (route, dispatch, experts, combine) at one tokens-per-rank, one rank.
struct LayerCell {
  double layer_us;     // CUDA-graph replay median (eager-run median when capture failed)
  double fused_us;     // single-GPU fused_moe over the global batch, graph replay median; 0 = not run
  double rel_l2;       // this rank's output vs fused_moe's rows of this rank; -1 = not checked
  int fused_fits;      // the reference fitted in this GPU's free memory
  int repeat_equal;    // output after the timed replays bitwise equal to the first run's
  int graph;           // timed as a CUDA graph
  int valid;
};

struct Shared {
  comm::mp::Rendezvous rv;
  char gpu[96];
  int nccl_version;
  Cell cells[kMaxCells][kMaxRanksBench];
  LayerCell layer[kMaxLayerVariants][kMaxTokenCounts][kMaxRanksBench];
  char layer_skipped[512];  // why the EP layer did not run (rank 0's words), "" when it ran
};

struct BenchOptions {
  int gpus = 2;  // ep_size of the current launch
  std::vector<int> tokens;
  std::vector<Variant> variants;
  std::vector<Variant> layer_variants;  // EP layer runs (nvlink and/or nccl)
  int warmup = 5, iters = 30;
  uint64_t seed = 7;
  QuantScheme dtype = QuantScheme::None;
};

TensorView prefix(const TensorView& t, int64_t rows) {
  TensorView v = t;
  v.shape[0] = rows;
  return v;
}

HostTensor download(const TensorView& v) {
  HostTensor h(v.dtype, std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim));
  if (h.nbytes()) MODMOE_CUDA_CHECK(cudaMemcpy(h.view().data, v.data, h.nbytes(), cudaMemcpyDeviceToHost));
  return h;
}

// Times `dispatch` then `combine` graphs replayed alternately; medians in microseconds.
void time_pair(cudaGraphExec_t gd, cudaGraphExec_t gc, cudaStream_t s, int warmup, int iters,
               double* d_us, double* c_us) {
  const int total = warmup + iters;
  std::vector<cudaEvent_t> ev(static_cast<size_t>(3 * total));
  for (auto& e : ev) MODMOE_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < total; ++i) {
    MODMOE_CUDA_CHECK(cudaEventRecord(ev[3 * i], s));
    MODMOE_CUDA_CHECK(cudaGraphLaunch(gd, s));
    MODMOE_CUDA_CHECK(cudaEventRecord(ev[3 * i + 1], s));
    MODMOE_CUDA_CHECK(cudaGraphLaunch(gc, s));
    MODMOE_CUDA_CHECK(cudaEventRecord(ev[3 * i + 2], s));
  }
  MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<float> d, c;
  for (int i = warmup; i < total; ++i) {
    float a = 0, b = 0;
    MODMOE_CUDA_CHECK(cudaEventElapsedTime(&a, ev[3 * i], ev[3 * i + 1]));
    MODMOE_CUDA_CHECK(cudaEventElapsedTime(&b, ev[3 * i + 1], ev[3 * i + 2]));
    d.push_back(a);
    c.push_back(b);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  *d_us = median_us(d);
  *c_us = median_us(c);
}

template <class F>
cudaGraphExec_t capture(cudaStream_t s, F&& fn) {
  cudaGraph_t g;
  MODMOE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
  fn();
  MODMOE_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  cudaGraphExec_t exec;
  MODMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
  MODMOE_CUDA_CHECK(cudaGraphDestroy(g));
  return exec;
}

struct AllInputs {
  std::vector<HostTensor> hidden, ids, weights;  // per rank, [Tmax, ...]
  // FP8 and NVFP4 only: hidden quantized once over each rank's Tmax tokens (quantize before
  // dispatch): FP8 e4m3 [Tmax, H], scales [Tmax, H/128] or [Tmax] (the rank's per-tensor scale
  // per token); NVFP4 E2M1x2 [Tmax, H/2], e4m3 scales [Tmax, H/16], qg: globals [Tmax] fp32
  // (one per token, so a prefix of the tokens has the same bytes as the prefix alone).
  std::vector<HostTensor> q, qs, qg, dequantized;  // dequantized: the decoded rows, bf16 [Tmax, H]
  // What identity "experts" return for a token of rank r: its bf16 row or dequantized row.
  const HostTensor& back(int r) const { return q.empty() ? hidden[r] : dequantized[r]; }
  // The dispatch payloads of rank r in order: {hidden, weights}, {q, scales, weights} or
  // {q, scales, globals, weights}.
  std::vector<const HostTensor*> payloads(int r) const {
    if (q.empty()) return {&hidden[r], &weights[r]};
    if (!qg.empty()) return {&q[r], &qs[r], &qg[r], &weights[r]};
    return {&q[r], &qs[r], &weights[r]};
  }
};

AllInputs make_inputs(int n, int tmax, uint64_t seed, QuantScheme dtype) {
  AllInputs a;
  for (int r = 0; r < n; ++r) {
    a.hidden.emplace_back(DType::BF16, std::vector<int64_t>{tmax, kH});
    a.ids.emplace_back(DType::I32, std::vector<int64_t>{tmax, kK});
    a.weights.emplace_back(DType::F32, std::vector<int64_t>{tmax, kK});
    synth::fill_host(a.hidden.back(), seed, 100 + r, 1.0f);
    std::mt19937_64 rng(seed * 1000 + r);
    std::vector<int> perm(kE);
    for (int t = 0; t < tmax; ++t) {  // uniform random top-k, k distinct experts
      std::iota(perm.begin(), perm.end(), 0);
      for (int j = 0; j < kK; ++j) {
        std::swap(perm[j], perm[j + rng() % (kE - j)]);
        a.ids.back().data<int32_t>()[t * kK + j] = perm[j];
        a.weights.back().data<float>()[t * kK + j] = static_cast<float>(rng() % 1000) / 1000.0f;
      }
    }
    if (dtype == QuantScheme::None) continue;
    reference::EpQuantized x = reference::ep_quantize(a.hidden.back(), dtype);
    a.dequantized.emplace_back(DType::BF16, std::vector<int64_t>{tmax, kH});
    if (dtype == QuantScheme::Nvfp4) {
      dequantize_nvfp4(x.hidden, x.hidden_scale, x.hidden_global, a.dequantized.back());
      a.qg.push_back(std::move(x.hidden_global));
    } else {
      dequantize_activations(x.hidden, dtype, x.hidden_scale, a.dequantized.back());
    }
    a.q.push_back(std::move(x.hidden));
    a.qs.push_back(std::move(x.hidden_scale));
  }
  return a;
}

// Row t of a [T, ...] host tensor, as bytes.
const uint8_t* row_ptr(const HostTensor& h, int64_t t) {
  const int64_t rows = h.view().size(0);
  return static_cast<const uint8_t*>(h.view().data) + static_cast<size_t>(t) * (h.nbytes() / static_cast<size_t>(rows));
}

size_t row_bytes(const HostTensor& h) { return h.nbytes() / static_cast<size_t>(h.view().size(0)); }

// Received rows against the plan; "" when right.
std::string check_dispatch(const reference::EpPlan& plan, const AllInputs& in, const DispatchResult& res, int me,
                           int t) {
  const HostTensor counts = download(res.recv_counts), ids = download(res.topk_ids);
  std::vector<HostTensor> got;
  for (const TensorView& p : res.payloads) got.push_back(download(flatten01(p)));  // [n*t, ...]
  const int n = plan.ep_size;
  for (int s = 0; s < n; ++s) {
    const auto& sent = plan.sent[s][me];
    if (counts.data<int32_t>()[s] != static_cast<int>(sent.size())) {
      return "count from rank " + std::to_string(s) + " = " + std::to_string(counts.data<int32_t>()[s]) +
             ", expected " + std::to_string(sent.size());
    }
    const std::vector<const HostTensor*> want = in.payloads(s);
    for (int64_t i = 0; i < t; ++i) {
      const int64_t row = static_cast<int64_t>(s) * t + i;
      const int32_t* gi = ids.data<int32_t>() + row * kK;
      if (i >= static_cast<int64_t>(sent.size())) {
        for (int j = 0; j < kK; ++j) {
          if (gi[j] != -1) return "padding row [" + std::to_string(s) + ", " + std::to_string(i) + "] id != -1";
        }
        continue;
      }
      const int64_t src = sent[i];
      bool same = std::memcmp(gi, in.ids[s].data<int32_t>() + src * kK, kK * 4) == 0;
      for (size_t p = 0; same && p < want.size(); ++p) {
        same = std::memcmp(row_ptr(got[p], row), row_ptr(*want[p], src), row_bytes(*want[p])) == 0;
      }
      if (!same) {
        return "row [" + std::to_string(s) + ", " + std::to_string(i) + "] differs from token " + std::to_string(src) +
               " of rank " + std::to_string(s);
      }
    }
  }
  return "";
}

// The identity experts' rows in the combine buffer [n, t, H]: row [s, i] is token
// plan.sent[s][me][i] of rank s as back(s) holds it (the bf16 row, or the CPU's dequantize of
// the quantized row); "" when right. Separates the receiver's dequantize from the combine.
std::string check_expert_rows(const reference::EpPlan& plan, const AllInputs& in, const HostTensor& cb, int me,
                              int t) {
  for (int s = 0; s < plan.ep_size; ++s) {
    const auto& sent = plan.sent[s][me];
    for (size_t i = 0; i < sent.size(); ++i) {
      const uint16_t* got = cb.data<uint16_t>() + (static_cast<int64_t>(s) * t + static_cast<int64_t>(i)) * kH;
      const uint16_t* want = in.back(s).data<uint16_t>() + static_cast<int64_t>(sent[i]) * kH;
      for (int64_t c = 0; c < kH; ++c) {
        if (got[c] != want[c]) {
          return "expert row [" + std::to_string(s) + ", " + std::to_string(i) + "] (token " +
                 std::to_string(sent[i]) + " of rank " + std::to_string(s) + ") column " + std::to_string(c) +
                 " = " + std::to_string(bf16_bits_to_float(got[c])) + ", expected " +
                 std::to_string(bf16_bits_to_float(want[c]));
        }
      }
    }
  }
  return "";
}

// Identity experts: out[t] = bf16(#destinations * x[t]), x the row the experts returned. A
// zero compares equal whatever its sign: the combine's fp32 sum starts from +0, so rows of -0
// (NVFP4 and FP8 dequantize small negative values to -0) sum to +0.
std::string check_combine(const reference::EpPlan& plan, const AllInputs& in, const HostTensor& out, int me, int t) {
  for (int64_t i = 0; i < t; ++i) {
    int dests = 0;
    for (int r = 0; r < plan.ep_size; ++r) dests += plan.slot[me][r][i] >= 0;
    for (int64_t c = 0; c < kH; ++c) {
      const uint16_t want = float_to_bf16_bits(static_cast<float>(dests) *
                                               bf16_bits_to_float(in.back(me).data<uint16_t>()[i * kH + c]));
      const uint16_t got = out.data<uint16_t>()[i * kH + c];
      const bool both_zero = ((got | want) & 0x7fff) == 0;
      if (got != want && !both_zero) {
        return "combine out[" + std::to_string(i) + ", " + std::to_string(c) + "] = " +
               std::to_string(bf16_bits_to_float(got)) + ", expected " + std::to_string(dests) + " x " +
               std::to_string(bf16_bits_to_float(in.back(me).data<uint16_t>()[i * kH + c]));
      }
    }
  }
  return "";
}

// The rows of `parts` (each [T, ...], concatenated per token) of the listed tokens, packed:
// [tokens, sum of the parts' row bytes]. The plain-NCCL baseline's send and expected buffers.
HostTensor pack_rows(const std::vector<const HostTensor*>& parts, const std::vector<std::vector<int>>& lists) {
  size_t row = 0, count = 0;
  for (const HostTensor* p : parts) row += row_bytes(*p);
  for (const auto& l : lists) count += l.size();
  HostTensor out(DType::U8, {static_cast<int64_t>(std::max<size_t>(count, 1)), static_cast<int64_t>(row)});
  uint8_t* dst = out.data<uint8_t>();
  for (const auto& l : lists) {
    for (int t : l) {
      for (const HostTensor* p : parts) {
        std::memcpy(dst, row_ptr(*p, t), row_bytes(*p));
        dst += row_bytes(*p);
      }
    }
  }
  return out;
}

// Median microseconds of `iters` launches of `exec` (after `warmup`), CUDA events.
double time_graph_us(cudaGraphExec_t exec, cudaStream_t s, int warmup, int iters) {
  const int total = warmup + iters;
  std::vector<cudaEvent_t> ev(static_cast<size_t>(2 * total));
  for (auto& e : ev) MODMOE_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < total; ++i) {
    MODMOE_CUDA_CHECK(cudaEventRecord(ev[2 * i], s));
    MODMOE_CUDA_CHECK(cudaGraphLaunch(exec, s));
    MODMOE_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], s));
  }
  MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<float> ms;
  for (int i = warmup; i < total; ++i) {
    float a = 0;
    MODMOE_CUDA_CHECK(cudaEventElapsedTime(&a, ev[2 * i], ev[2 * i + 1]));
    ms.push_back(a);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return median_us(ms);
}

// The end-to-end EP layer of DeepSeek-V3 (the same shape as the all-to-all cells: H=7168,
// E=256, k=8, but real routing of synthetic logits instead of uniform top-8) at every
// tokens-per-rank, through the EpLayer that `modmoe ep-demo` runs. Each cell: one eager run,
// checked against fused_moe on this GPU over the same global batch (all ranks' tokens, all E
// experts) when it fits in memory; then the layer captured as one CUDA graph and replayed;
// then the output compared bitwise with the eager run's. fused_moe is timed the same way.
void layer_phase(const BenchOptions& o, int rank, comm::mp::RankComm& c, Shared* sh, cudaStream_t s) {
  const int n = o.gpus;
  const Preset& preset = find_preset("deepseek-v3");
  MODMOE_CHECK(preset.hidden == kH && preset.num_experts == kE && preset.top_k == kK,
               "bench all-to-all: the deepseek-v3 preset is not H=7168, E=256, k=8");
  const int tmax = *std::max_element(o.tokens.begin(), o.tokens.end());
  const int nt = static_cast<int>(o.tokens.size());
  std::unique_ptr<FusedReference> ref;
  bool ref_decided = false;
  for (size_t li = 0; li < o.layer_variants.size(); ++li) {
    const Variant& v = o.layer_variants[li];
    EpLayerOptions lo;
    lo.backend = parse_backend(v.backend);
    lo.max_tokens = tmax;
    lo.num_sms = v.num_sms;
    lo.combine_pull = v.pull;
    lo.seed = o.seed;
    lo.dtype = o.dtype;
    EpLayer layer(preset, n, rank, c.get(), lo);
    if (!ref_decided) {  // the first layer is the largest allocation the reference shares the GPU with
      ref_decided = true;
      size_t free_b = 0, total_b = 0;
      MODMOE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
      const size_t need = FusedReference::bytes_needed(layer.layer(), static_cast<int64_t>(n) * tmax) +
                          static_cast<size_t>(n) * tmax * (kH * 2 + kE * 4) + (size_t{2} << 30);
      if (need <= free_b) {
        ref = std::make_unique<FusedReference>(preset, Device::cuda(rank), o.seed, o.dtype);
      } else {
        std::fprintf(stderr, "[rank %d] ep layer: fused_moe reference skipped: needs %.1f GB, %.1f GB free\n", rank,
                     need / 1e9, free_b / 1e9);
      }
    }
    for (int ti = 0; ti < nt; ++ti) {
      const int t = o.tokens[ti];
      LayerCell& cell = sh->layer[li][ti][rank];
      cell = LayerCell{};
      cell.rel_l2 = -1;
      cell.fused_fits = ref != nullptr;
      // The global batch, the same on every rank; my tokens are rows [rank*T, (rank+1)*T).
      const Batch global(layer.layer(), static_cast<int64_t>(n) * t, o.seed + 1);
      MODMOE_CUDA_CHECK(cudaDeviceSynchronize());  // the fills ran on the legacy stream
      const TensorView hidden = rows_of(global.hidden, static_cast<int64_t>(rank) * t, t);
      const TensorView logits = rows_of(global.logits, static_cast<int64_t>(rank) * t, t);
      c.barrier();
      layer.run(hidden, logits, t, s);
      MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
      layer.a2a().check();
      const HostTensor first = download(layer.out(t));
      if (ref) {
        ref->run(global, s);  // eager first: sizes the buffers outside the capture
        MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        cell.rel_l2 = rel_l2_bf16(layer.out(t), rows_of(ref->out(), static_cast<int64_t>(rank) * t, t));
        cudaGraphExec_t gf = capture(s, [&] { ref->run(global, s); });
        cell.fused_us = time_graph_us(gf, s, o.warmup, o.iters);
        cudaGraphExecDestroy(gf);
      }
      cudaGraphExec_t gl = capture(s, [&] { layer.run(hidden, logits, t, s); });
      cell.graph = 1;
      c.barrier();
      cell.layer_us = time_graph_us(gl, s, o.warmup, o.iters);
      cudaGraphExecDestroy(gl);
      layer.a2a().check();
      const HostTensor again = download(layer.out(t));
      cell.repeat_equal = std::memcmp(first.view().data, again.view().data, first.nbytes()) == 0;
      if (!cell.repeat_equal) std::fprintf(stderr, "[rank %d] ep layer %s T=%d: replay output differs from the first run\n", rank, v.backend.c_str(), t);
      cell.valid = 1;
    }
    c.barrier();
  }
}

int bench_rank(const BenchOptions& o, int rank, Shared* sh) {
  const int n = o.gpus;
  comm::mp::RankComm c(&sh->rv, rank, n, rank);
  if (rank == 0) {
    cudaDeviceProp prop{};
    MODMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::snprintf(sh->gpu, sizeof(sh->gpu), "%s", prop.name);
    sh->nccl_version = comm::nccl().version;
  }
  cudaStream_t s;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const int tmax = *std::max_element(o.tokens.begin(), o.tokens.end());
  const AllInputs in = make_inputs(n, tmax, o.seed, o.dtype);
  const bool fp4 = o.dtype == QuantScheme::Nvfp4;
  const bool fp8 = o.dtype != QuantScheme::None && !fp4;
  const DeviceTensor d_ids = DeviceTensor::from_host(in.ids[rank], rank);
  std::vector<DeviceTensor> d_payloads;  // {hidden, weights} or {q, scales, weights}, [Tmax, ...]
  for (const HostTensor* p : in.payloads(rank)) d_payloads.push_back(DeviceTensor::from_host(*p, rank));
  // Bytes per token: the payloads; plus topk_ids for our all-to-all; the plain-NCCL baseline
  // moves only the hidden rows (and their scales).
  const size_t payload_bytes = reference::ep_payload_bytes_per_token(o.dtype, kH, kK);
  const size_t baseline_row = payload_bytes - kK * 4;
  DeviceTensor out(DType::BF16, {tmax, kH}, rank);
  const int nt = static_cast<int>(o.tokens.size());

  for (size_t vi = 0; vi < o.variants.size(); ++vi) {
    const Variant& v = o.variants[vi];
    std::unique_ptr<AllToAll> a2a;
    if (v.backend != "nccl_a2a_uneven") {
      AllToAllConfig cfg;
      cfg.backend = parse_backend(v.backend);
      cfg.ep_size = n;
      cfg.ep_rank = rank;
      cfg.num_experts = kE;
      cfg.top_k = kK;
      cfg.max_tokens_per_rank = tmax;
      cfg.max_payload_bytes_per_token = payload_bytes;
      cfg.hidden = kH;
      cfg.num_sms = v.num_sms;
      cfg.combine_pull = v.pull;
      a2a = create_all_to_all(cfg, c.get());
    }
    for (int ti = 0; ti < nt; ++ti) {
      const int t = o.tokens[ti];
      Cell& cell = sh->cells[vi * nt + ti][rank];
      cell = Cell{};
      std::vector<reference::EpRankTokens> views;
      for (int r = 0; r < n; ++r) {
        views.push_back({prefix(in.hidden[r], t), prefix(in.ids[r], t), prefix(in.weights[r], t)});
      }
      const reference::EpPlan plan = reference::ep_plan(views, kE, n, t);
      double to_others = 0, from_others = 0;
      for (int r = 0; r < n; ++r) {
        if (r == rank) continue;
        to_others += static_cast<double>(plan.sent[rank][r].size());
        from_others += static_cast<double>(plan.sent[r][rank].size());
      }
      std::string err;
      c.barrier();
      if (a2a) {
        const TensorView ids = prefix(d_ids, t), o_t = prefix(out, t);
        std::vector<TensorView> payloads;
        for (const DeviceTensor& d : d_payloads) payloads.push_back(prefix(d, t));
        const TensorView cb = a2a->combine_buffer(t);
        DispatchResult res = a2a->dispatch(ids, payloads, t, s);
        MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        a2a->check();
        err = check_dispatch(plan, in, res, rank, t);
        // Identity "experts" (not timed): the received rows, dequantized for FP8 and NVFP4.
        if (fp8) {
          dequantize_activations(flatten01(res.payloads[0]), o.dtype, flatten01(res.payloads[1]), flatten01(cb), s);
        } else if (fp4) {
          dequantize_nvfp4(flatten01(res.payloads[0]), flatten01(res.payloads[1]), flatten01(res.payloads[2]),
                           flatten01(cb), s);
        } else {
          MODMOE_CUDA_CHECK(cudaMemcpyAsync(cb.data, res.payloads[0].data, cb.nbytes(), cudaMemcpyDeviceToDevice, s));
        }
        MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        if (err.empty()) err = check_expert_rows(plan, in, download(cb), rank, t);
        out.fill_bytes(0xff, s);
        a2a->combine(cb, o_t, t, s);
        MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        a2a->check();
        if (err.empty()) err = check_combine(plan, in, download(o_t), rank, t);
        cudaGraphExec_t gd = capture(s, [&] { res = a2a->dispatch(ids, payloads, t, s); });
        cudaGraphExec_t gc = capture(s, [&] { a2a->combine(cb, o_t, t, s); });
        out.fill_bytes(0xff, s);
        MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        c.barrier();
        time_pair(gd, gc, s, o.warmup, o.iters, &cell.d_us, &cell.c_us);
        a2a->check();
        if (err.empty()) err = check_dispatch(plan, in, res, rank, t);
        if (err.empty()) err = check_combine(plan, in, download(o_t), rank, t);
        cudaGraphExecDestroy(gd);
        cudaGraphExecDestroy(gc);
        cell.d_bytes = to_others * static_cast<double>(payload_bytes + kK * 4);
        cell.c_bytes = from_others * kH * 2;
      } else {
        // NCCL send/recv with exact, host-known splits of the hidden rows (FP8: e4m3 rows and
        // their scales; NVFP4: e2m1 rows, scales and globals), packed by destination (what all_to_all_single moves); then bf16 rows
        // back (what identity experts return: the bf16 or dequantized rows).
        std::vector<size_t> off_to(n + 1, 0), off_from(n + 1, 0);
        for (int r = 0; r < n; ++r) {
          off_to[r + 1] = off_to[r] + plan.sent[rank][r].size();
          off_from[r + 1] = off_from[r] + plan.sent[r][rank].size();
        }
        std::vector<const HostTensor*> mine = in.payloads(rank);
        mine.pop_back();  // no topk_weights
        const HostTensor send_d = pack_rows(mine, plan.sent[rank]);  // [to, baseline_row]
        const HostTensor back_want = pack_rows({&in.back(rank)}, plan.sent[rank]);  // [to, 2H]
        HostTensor recv_want(DType::U8, {static_cast<int64_t>(std::max<size_t>(off_from[n], 1)),
                                         static_cast<int64_t>(baseline_row)});
        HostTensor send_c_host(DType::U8, {static_cast<int64_t>(std::max<size_t>(off_from[n], 1)), kH * 2});
        for (int r = 0; r < n; ++r) {
          std::vector<const HostTensor*> theirs = in.payloads(r);
          theirs.pop_back();
          const HostTensor d = pack_rows(theirs, {plan.sent[r][rank]}), b = pack_rows({&in.back(r)}, {plan.sent[r][rank]});
          std::memcpy(recv_want.data<uint8_t>() + off_from[r] * baseline_row, d.view().data, plan.sent[r][rank].size() * baseline_row);
          std::memcpy(send_c_host.data<uint8_t>() + off_from[r] * kH * 2, b.view().data, plan.sent[r][rank].size() * kH * 2);
        }
        const DeviceTensor send = DeviceTensor::from_host(send_d, rank);
        const DeviceTensor send_c = DeviceTensor::from_host(send_c_host, rank);
        DeviceTensor back(DType::U8, {std::max<int64_t>(static_cast<int64_t>(off_to[n]), 1), kH * 2}, rank);
        DeviceTensor recv(DType::U8, {std::max<int64_t>(static_cast<int64_t>(off_from[n]), 1),
                                      static_cast<int64_t>(baseline_row)}, rank);
        const comm::NcclLib& nl = comm::nccl();
        auto exchange = [&](const uint8_t* src, const std::vector<size_t>& so, uint8_t* dst,
                            const std::vector<size_t>& ro, size_t row) {
          MODMOE_NCCL_CHECK(nl.GroupStart());
          for (int r = 0; r < n; ++r) {
            if (so[r + 1] > so[r]) MODMOE_NCCL_CHECK(nl.Send(src + so[r] * row, (so[r + 1] - so[r]) * row, ncclUint8, r, c.get(), s));
            if (ro[r + 1] > ro[r]) MODMOE_NCCL_CHECK(nl.Recv(dst + ro[r] * row, (ro[r + 1] - ro[r]) * row, ncclUint8, r, c.get(), s));
          }
          MODMOE_NCCL_CHECK(nl.GroupEnd());
        };
        auto d_fn = [&] { exchange(send.data<uint8_t>(), off_to, recv.data<uint8_t>(), off_from, baseline_row); };
        auto c_fn = [&] { exchange(send_c.data<uint8_t>(), off_from, back.data<uint8_t>(), off_to, kH * 2); };
        auto verify = [&]() -> std::string {
          if (std::memcmp(recv.to_host().view().data, recv_want.view().data, off_from[n] * baseline_row) != 0) {
            return "baseline: received rows differ";
          }
          if (std::memcmp(back.to_host().view().data, back_want.view().data, off_to[n] * kH * 2) != 0) {
            return "baseline: rows back differ";
          }
          return "";
        };
        d_fn();
        c_fn();
        MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        err = verify();
        cudaGraphExec_t gd = capture(s, d_fn);
        cudaGraphExec_t gc = capture(s, c_fn);
        c.barrier();
        time_pair(gd, gc, s, o.warmup, o.iters, &cell.d_us, &cell.c_us);
        if (err.empty()) err = verify();
        cudaGraphExecDestroy(gd);
        cudaGraphExecDestroy(gc);
        cell.d_bytes = to_others * static_cast<double>(baseline_row);
        cell.c_bytes = from_others * kH * 2;
      }
      if (!err.empty()) {
        std::fprintf(stderr, "[rank %d] %s T=%d: WRONG: %s\n", rank, v.backend.c_str(), t, err.c_str());
      }
      cell.correct = err.empty();
      cell.valid = 1;
    }
    a2a.reset();
    c.barrier();
  }
  if (!o.layer_variants.empty()) {
    // The same answer on every rank: all run the layer phase, or none does.
    const std::string why = experts_not_supported_on_gpu(o.dtype, rank);
    if (why.empty()) {
      layer_phase(o, rank, c, sh, s);
    } else if (rank == 0) {
      std::snprintf(sh->layer_skipped, sizeof(sh->layer_skipped), "%s", why.c_str());
    }
  }
  MODMOE_CUDA_CHECK(cudaStreamDestroy(s));
  return 0;
}

}  // namespace

int run_ep_bench(const std::vector<std::string>& argv) {
  const Args args(argv, {"--gpus", "--tokens", "--sms", "--backends", "--combine", "--layer", "--iters", "--warmup",
                         "--out", "--seed", "--time-limit", "--dtype"}, {});
  BenchOptions o;
  o.dtype = parse_dtype(args.get("--dtype", "bf16"));
  const std::string dtype = dtype_option_name(o.dtype);
  const std::vector<int> ep_sizes = parse_int_list(args.get("--gpus", "2"), "--gpus", 1, kMaxRanksBench);
  o.tokens = parse_int_list(args.get("--tokens", "1,16,128,512,2048,4096"), "--tokens", 1, 1 << 16);
  // Default: the library's own CTA count (kDefaultNumSms, a2a_layout.h), what a caller gets
  // without setting AllToAllConfig::num_sms; ANCHORS.md's bandwidth target allows at most 32.
  const std::vector<int> sms = parse_int_list(args.get("--sms", "32"), "--sms", 1, 1024);
  const std::vector<std::string> backends = split_list(args.get("--backends", "nvlink,nccl,nccl_a2a_uneven"));
  const std::vector<std::string> modes = split_list(args.get("--combine", "pull"));
  // The EP layer runs on these backends (each with the first --sms and --combine); "none" = off.
  const std::string layer_arg = args.get("--layer", "nvlink,nccl");
  o.iters = static_cast<int>(args.get_int("--iters", 30, 1, 100000));
  o.warmup = static_cast<int>(args.get_int("--warmup", 5, 0, 100000));
  o.seed = static_cast<uint64_t>(args.get_int("--seed", 7, 0, 1ll << 40));
  // Wall-clock limit of all launches together, split evenly between the ep sizes: a rank that
  // hangs is killed and the rows measured so far are still written.
  const double time_limit = static_cast<double>(args.get_int("--time-limit", 1800, 10, 86400));
  for (const auto& b : backends) {
    MODMOE_CHECK(b == "nvlink" || b == "nccl" || b == "nccl_a2a_uneven", "option '--backends': '", b,
                 "': expected nvlink, nccl or nccl_a2a_uneven");
    if (b == "nvlink") {
      for (int sm : sms) {
        for (const auto& m : modes) {
          MODMOE_CHECK(m == "pull" || m == "push", "option '--combine': '", m, "': expected pull or push");
          o.variants.push_back({b, sm, m == "pull"});
        }
      }
    } else {
      o.variants.push_back({b, sms[0], true});
    }
  }
  if (layer_arg != "none") {
    for (const auto& b : split_list(layer_arg)) {
      MODMOE_CHECK(b == "nvlink" || b == "nccl", "option '--layer': '", b, "': expected nvlink, nccl or none");
      o.layer_variants.push_back({b, sms[0], b == "nccl" || modes[0] == "pull"});
    }
  }
  MODMOE_CHECK(o.layer_variants.size() <= static_cast<size_t>(kMaxLayerVariants), "option '--layer': at most ",
               kMaxLayerVariants, " backends");
  MODMOE_CHECK(o.tokens.size() <= static_cast<size_t>(kMaxTokenCounts), "option '--tokens': at most ",
               kMaxTokenCounts, " values");
  MODMOE_CHECK(o.variants.size() * o.tokens.size() <= static_cast<size_t>(kMaxCells), "too many cells (",
               o.variants.size() * o.tokens.size(), "): expected at most ", kMaxCells);
  const int have = comm::mp::probe_gpu_count();
  for (int g : ep_sizes) {
    MODMOE_CHECK(kE % g == 0, "option '--gpus' = ", g, ": expected a divisor of E = ", kE);
    MODMOE_CHECK(have >= g, "option '--gpus' = ", g, ": this machine has ", have, " GPUs");
  }
  const int max_ep = *std::max_element(ep_sizes.begin(), ep_sizes.end());

  nlohmann::json j;
  j["benchmark"] = "all_to_all";
  j["gpu_count"] = max_ep;  // the GPUs of the machine used; the folder is <gpu>x<gpu_count>
  j["commit"] = commit_id();
  j["ep_sizes"] = ep_sizes;
  j["hidden"] = kH;
  j["num_experts"] = kE;
  j["top_k"] = kK;
  j["iters"] = o.iters;
  j["dtype"] = dtype;
  j["dispatch_payload"] =
      o.dtype == QuantScheme::None ? "topk_ids int32 [T,8] + hidden bf16 [T,7168] + topk_weights fp32 [T,8]"
      : o.dtype == QuantScheme::Fp8Block128
          ? "topk_ids int32 [T,8] + hidden e4m3 [T,7168] + scales fp32 [T,56] + topk_weights fp32 [T,8]"
      : o.dtype == QuantScheme::Nvfp4
          ? "topk_ids int32 [T,8] + hidden e2m1x2 [T,3584] + block scales e4m3 [T,448] + per-token global fp32 [T] + "
            "topk_weights fp32 [T,8]"
          : "topk_ids int32 [T,8] + hidden e4m3 [T,7168] + the rank's per-tensor scale fp32 [T] + topk_weights fp32 [T,8]";
  j["dispatch_bytes_per_token_bf16"] = reference::ep_payload_bytes_per_token(QuantScheme::None, kH, kK) + kK * 4;
  j["dispatch_bytes_per_token"] = reference::ep_payload_bytes_per_token(o.dtype, kH, kK) + kK * 4;
  j["combine"] = "bf16 [T,7168]";
  j["gbps_counts"] = "bytes of rows sent to other ranks by the slowest rank / its median time";
  j["timing"] = "CUDA-graph replays of dispatch and combine, alternately, CUDA events, median per rank";
  j["ep_layer"] =
      "ep_layer_us: the whole DeepSeek-V3 EP layer per rank (modmoe::route of synthetic logits, dispatch, "
      "modmoe::experts on the rank's E/ep experts writing into combine_buffer(), combine), one CUDA graph, "
      "replay median, slowest rank; same EpLayer as `modmoe ep-demo`, on the backend of the row with the "
      "row's num_sms and combine mode. single_gpu_fused_moe_us: fused_moe on one GPU over the same global "
      "batch (ep_size * tokens_per_rank tokens, all 256 experts), graph replay median. ep_layer_rel_l2: "
      "largest over ranks of the rank's output vs fused_moe's rows; ep_layer_correct: rel L2 <= 1e-2 (0.1 for "
      "fp8-tensor: fused_moe's per-tensor scale is over the global batch, each rank's over its own tokens) and "
      "the output after the replays bitwise equal to the first run's. FP8 dtypes: FP8 weights quantized from the "
      "same bf16 numbers, every rank quantizes its hidden before the dispatch (inside the layer's time). nvfp4: "
      "NVFP4 weights (W4A16) quantized from the same bf16 numbers, every rank quantizes its hidden to NVFP4 with one "
      "global per token before the dispatch and the receiver dequantizes it (both inside the layer's time); "
      "fused_moe runs on the global batch quantized per row and dequantized (the same rows; its time includes "
      "that quantize and dequantize), bound 1e-2";
  {
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    j["date"] = date;
  }
  j["rows"] = nlohmann::json::array();
  bool ok = true;
  const int nt = static_cast<int>(o.tokens.size());
  for (const int ep : ep_sizes) {
    o.gpus = ep;
    std::printf("modmoe bench all-to-all: ep_size %d, H=%lld, dtype %s (%zu dispatch bytes per token), E=%d, k=%d, "
                "tokens per rank", o.gpus, static_cast<long long>(kH), dtype.c_str(),
                reference::ep_payload_bytes_per_token(o.dtype, kH, kK) + kK * 4, kE, kK);
    for (int t : o.tokens) std::printf(" %d", t);
    std::printf("; CUDA-graph replay medians of %d runs, slowest rank\n", o.iters);
    std::fflush(stdout);

    comm::mp::SharedMemory shm(sizeof(Shared));
    auto* sh = new (shm.data()) Shared();
    sh->rv.state.store(0);
    const std::vector<int> codes = comm::mp::run_ranks(o.gpus, time_limit / static_cast<double>(ep_sizes.size()),
                                                       [&](int rank) { return bench_rank(o, rank, sh); });
    for (int r = 0; r < o.gpus; ++r) {
      if (codes[r] != 0) {
        std::fprintf(stderr, "ep_size %d: rank %d exited with %d\n", ep, r, codes[r]);
        ok = false;
      }
    }
    if (sh->gpu[0]) j["gpu"] = sh->gpu;
    // The EP layer's rows: none when it was skipped (FP8 experts not on the GPU yet).
    const std::vector<Variant> layers = sh->layer_skipped[0] ? std::vector<Variant>{} : o.layer_variants;
    if (sh->layer_skipped[0]) {
      std::fprintf(stderr, "ep_size %d: the EP layer was skipped: %s\n", ep, sh->layer_skipped);
      j["ep_layer_skipped"] = sh->layer_skipped;
    }
    if (sh->nccl_version) j["nccl_version"] = sh->nccl_version;

    // The EP layer per (layer variant, tokens): slowest rank, worst error, fused_moe of rank 0.
    struct LayerRow {
      bool valid = true, correct = true, checked = true, graph = true;
      double us = 0, rel = 0, fused = 0;
    };
    std::vector<std::vector<LayerRow>> lrows(layers.size(), std::vector<LayerRow>(nt));
    for (size_t li = 0; li < layers.size(); ++li) {
      for (int ti = 0; ti < nt; ++ti) {
        LayerRow& lr = lrows[li][ti];
        for (int r = 0; r < o.gpus; ++r) {
          const LayerCell& x = sh->layer[li][ti][r];
          lr.valid = lr.valid && x.valid;
          lr.checked = lr.checked && x.fused_fits && x.rel_l2 >= 0;
          lr.graph = lr.graph && x.graph;
          lr.us = std::max(lr.us, x.layer_us);
          lr.rel = std::max(lr.rel, x.rel_l2);
          lr.correct = lr.correct && x.repeat_equal &&
                       (!x.fused_fits || (std::isfinite(x.rel_l2) && x.rel_l2 >= 0 && x.rel_l2 <= ep_reference_bound(o.dtype)));
        }
        lr.correct = lr.correct && lr.valid;
        lr.fused = sh->layer[li][ti][0].fused_fits ? sh->layer[li][ti][0].fused_us : 0.0;
        ok = ok && lr.correct;
      }
    }
    // fused_moe does not depend on the backend: the first layer variant that ran it.
    auto fused_at = [&](int ti) {
      for (size_t li = 0; li < lrows.size(); ++li) {
        if (lrows[li][ti].fused > 0) return lrows[li][ti].fused;
      }
      return 0.0;
    };

    std::printf("\n%-16s %4s %5s %7s %12s %12s %14s %14s %8s %12s %12s\n", "backend", "sms", "comb", "tokens",
                "dispatch us", "combine us", "dispatch GB/s", "combine GB/s", "correct", "ep layer us", "fused_moe us");
    const size_t first_row = j["rows"].size();
    for (size_t vi = 0; vi < o.variants.size(); ++vi) {
      const Variant& v = o.variants[vi];
      int li = -1;  // the EP layer measured with this variant's settings
      for (size_t x = 0; x < layers.size(); ++x) {
        const Variant& lv = layers[x];
        if (lv.backend == v.backend && lv.num_sms == v.num_sms && (v.backend != "nvlink" || lv.pull == v.pull)) li = static_cast<int>(x);
      }
      for (int ti = 0; ti < nt; ++ti) {
        const Cell* row = sh->cells[vi * nt + ti];
        int sd = 0, sc = 0;
        bool correct = true, valid = true;
        nlohmann::json per;
        for (int r = 0; r < o.gpus; ++r) {
          valid = valid && row[r].valid;
          correct = correct && row[r].correct;
          if (row[r].d_us > row[sd].d_us) sd = r;
          if (row[r].c_us > row[sc].c_us) sc = r;
          nlohmann::json pr = {{"rank", r}, {"dispatch_us", row[r].d_us}, {"combine_us", row[r].c_us},
                               {"dispatch_bytes", row[r].d_bytes}, {"combine_bytes", row[r].c_bytes}};
          if (li >= 0) {
            pr["ep_layer_us"] = sh->layer[li][ti][r].layer_us;
            pr["ep_layer_rel_l2"] = sh->layer[li][ti][r].rel_l2;
          }
          per.push_back(pr);
        }
        correct = correct && valid;
        ok = ok && correct;
        const double dg = row[sd].d_us > 0 ? row[sd].d_bytes / (row[sd].d_us * 1e3) : 0.0;
        const double cg = row[sc].c_us > 0 ? row[sc].c_bytes / (row[sc].c_us * 1e3) : 0.0;
        const char* mode = v.backend == "nvlink" ? (v.pull ? "pull" : "push") : "-";
        const double fused = fused_at(ti);
        const double lus = li >= 0 && lrows[li][ti].valid ? lrows[li][ti].us : 0.0;
        char lbuf[32] = "-", fbuf[32] = "-";
        if (li >= 0) std::snprintf(lbuf, sizeof(lbuf), "%.1f%s", lus, lrows[li][ti].correct ? "" : " NO");
        if (fused > 0) std::snprintf(fbuf, sizeof(fbuf), "%.1f", fused);
        std::printf("%-16s %4d %5s %7d %12.1f %12.1f %14.1f %14.1f %8s %12s %12s\n", v.backend.c_str(),
                    v.backend == "nccl_a2a_uneven" ? 0 : v.num_sms, mode, o.tokens[ti], row[sd].d_us, row[sc].c_us, dg,
                    cg, correct ? "yes" : "NO", lbuf, fbuf);
        nlohmann::json jr = {{"ep_size", o.gpus}, {"dtype", dtype}, {"backend", v.backend},
                             {"num_sms", v.backend == "nccl_a2a_uneven" ? 0 : v.num_sms}, {"combine_mode", mode},
                             {"tokens_per_rank", o.tokens[ti]}, {"dispatch_us", row[sd].d_us},
                             {"combine_us", row[sc].c_us}, {"dispatch_GBps", dg}, {"combine_GBps", cg},
                             {"slowest_rank_dispatch", sd}, {"slowest_rank_combine", sc}, {"correct", correct}};
        if (li >= 0) {
          const LayerRow& lr = lrows[li][ti];
          jr["ep_layer_us"] = lr.valid ? nlohmann::json(lr.us) : nlohmann::json(nullptr);
          jr["ep_layer_correct"] = lr.correct;
          jr["ep_layer_rel_l2"] = lr.checked ? nlohmann::json(lr.rel) : nlohmann::json(nullptr);
          if (!lr.graph) jr["ep_layer_note"] = "not timed as a CUDA graph";
        }
        if (fused > 0) {
          jr["single_gpu_fused_moe_us"] = fused;
          if (li >= 0 && lrows[li][ti].valid && lrows[li][ti].us > 0) jr["ep_layer_speedup_vs_single_gpu"] = fused / lrows[li][ti].us;
        } else if (!layers.empty()) {
          jr["single_gpu_fused_moe_us"] = nullptr;
          jr["single_gpu_fused_moe_note"] =
              "not run: all 256 experts' weights and the workspace for the global batch did not fit in one GPU's "
              "free memory next to the rank's own layer (or the layer phase did not finish; see the log)";
        }
        jr["per_rank"] = per;
        j["rows"].push_back(jr);
      }
    }
    // Ratios against NCCL's all-to-all measured in this run, at the same ep_size and tokens per rank.
    for (size_t ri = first_row; ri < j["rows"].size(); ++ri) {
      auto& row = j["rows"][ri];
      for (size_t bi = first_row; bi < j["rows"].size(); ++bi) {
        const auto& base = j["rows"][bi];
        if (base["backend"] == "nccl_a2a_uneven" && base["tokens_per_rank"] == row["tokens_per_rank"] &&
            row["dispatch_us"].get<double>() > 0 && row["combine_us"].get<double>() > 0) {
          row["dispatch_speedup_vs_nccl_a2a"] = base["dispatch_us"].get<double>() / row["dispatch_us"].get<double>();
          row["combine_speedup_vs_nccl_a2a"] = base["combine_us"].get<double>() / row["combine_us"].get<double>();
        }
      }
    }
    std::printf("\n");
    // Written after every ep size, so the rows measured so far survive a later failure.
    write_bench_json(j, args.get("--out", ""), o.dtype == QuantScheme::None ? "all_to_all.json" : "all_to_all_" + dtype + ".json");
  }
  return ok ? 0 : 1;
}

#else

int run_ep_bench(const std::vector<std::string>&) {
  MODMOE_FAIL("modmoe bench all-to-all: this build has no CUDA backend (nvcc was not found at build time)");
}

#endif

}  // namespace modmoe::app
