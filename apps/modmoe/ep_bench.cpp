// `modmoe bench all-to-all --gpus N`: dispatch and combine of the expert-parallel all-to-all
// (H=7168 bf16, E=256, k=8, topk_ids + hidden + fp32 weights dispatched), NvLink and NCCL
// backends, and plain NCCL send/recv with exact uneven splits (the all_to_all_single baseline
// of ANCHORS.md, which leaves out the host round trip for the split sizes), in one run.
//
// Every cell is validated before it is timed, and again after: the received rows against the
// CPU plan (reference::ep_plan: counts, source order, ids, rows), the combine of an identity
// "experts" against hidden * (number of destination ranks), exactly. Times are medians of
// CUDA-graph replays (one graph for dispatch, one for combine, replayed alternately), CUDA
// events on each rank; the table shows the slowest rank. GB/s counts the bytes that leave
// that rank's GPU (rows for other ranks) over its median time.
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
#include "modmoe/modmoe.h"
#ifdef MODMOE_WITH_CUDA
#include "core/host_tensor.h"
#include "core/synth_fill.h"
#include "cuda/comm/multiprocess.h"
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

struct Variant {
  std::string backend;  // nvlink | nccl | nccl_a2a_uneven
  int num_sms = 0;
  bool pull = true;
};

struct Cell {
  double d_us, c_us, d_bytes, c_bytes;
  int correct, valid;
};

struct Shared {
  comm::mp::Rendezvous rv;
  char gpu[96];
  int nccl_version;
  Cell cells[kMaxCells][kMaxRanksBench];
};

struct BenchOptions {
  int gpus = 2;
  std::vector<int> tokens;
  std::vector<Variant> variants;
  int warmup = 5, iters = 30;
  uint64_t seed = 7;
};

double median_us(std::vector<float> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return 1000.0 * v[v.size() / 2];
}

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
};

AllInputs make_inputs(int n, int tmax, uint64_t seed) {
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
  }
  return a;
}

// Received rows against the plan; "" when right.
std::string check_dispatch(const reference::EpPlan& plan, const AllInputs& in, const DispatchResult& res, int me,
                           int t) {
  const HostTensor counts = download(res.recv_counts), ids = download(res.topk_ids),
                   hid = download(res.payloads[0]), w = download(res.payloads[1]);
  const int n = plan.ep_size;
  for (int s = 0; s < n; ++s) {
    const auto& sent = plan.sent[s][me];
    if (counts.data<int32_t>()[s] != static_cast<int>(sent.size())) {
      return "count from rank " + std::to_string(s) + " = " + std::to_string(counts.data<int32_t>()[s]) +
             ", expected " + std::to_string(sent.size());
    }
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
      if (std::memcmp(gi, in.ids[s].data<int32_t>() + src * kK, kK * 4) != 0 ||
          std::memcmp(w.data<float>() + row * kK, in.weights[s].data<float>() + src * kK, kK * 4) != 0 ||
          std::memcmp(hid.data<uint16_t>() + row * kH, in.hidden[s].data<uint16_t>() + src * kH, kH * 2) != 0) {
        return "row [" + std::to_string(s) + ", " + std::to_string(i) + "] differs from token " + std::to_string(src) +
               " of rank " + std::to_string(s);
      }
    }
  }
  return "";
}

// Identity experts: out[t] = bf16(#destinations * x[t]).
std::string check_combine(const reference::EpPlan& plan, const AllInputs& in, const HostTensor& out, int me, int t) {
  for (int64_t i = 0; i < t; ++i) {
    int dests = 0;
    for (int r = 0; r < plan.ep_size; ++r) dests += plan.slot[me][r][i] >= 0;
    for (int64_t c = 0; c < kH; ++c) {
      const uint16_t want = float_to_bf16_bits(static_cast<float>(dests) *
                                               bf16_bits_to_float(in.hidden[me].data<uint16_t>()[i * kH + c]));
      if (out.data<uint16_t>()[i * kH + c] != want) {
        return "combine out[" + std::to_string(i) + ", " + std::to_string(c) + "] differs";
      }
    }
  }
  return "";
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
  const AllInputs in = make_inputs(n, tmax, o.seed);
  const DeviceTensor d_hidden = DeviceTensor::from_host(in.hidden[rank], rank);
  const DeviceTensor d_ids = DeviceTensor::from_host(in.ids[rank], rank);
  const DeviceTensor d_w = DeviceTensor::from_host(in.weights[rank], rank);
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
      cfg.max_payload_bytes_per_token = kH * 2 + kK * 4;
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
        const TensorView ids = prefix(d_ids, t), hid = prefix(d_hidden, t), w = prefix(d_w, t);
        const TensorView o_t = prefix(out, t);
        const TensorView cb = a2a->combine_buffer(t);
        DispatchResult res = a2a->dispatch(ids, {hid, w}, t, s);
        MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        a2a->check();
        err = check_dispatch(plan, in, res, rank, t);
        MODMOE_CUDA_CHECK(cudaMemcpyAsync(cb.data, res.payloads[0].data, cb.nbytes(), cudaMemcpyDeviceToDevice, s));
        out.fill_bytes(0xff, s);
        a2a->combine(cb, o_t, t, s);
        MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        a2a->check();
        if (err.empty()) err = check_combine(plan, in, download(o_t), rank, t);
        cudaGraphExec_t gd = capture(s, [&] { res = a2a->dispatch(ids, {hid, w}, t, s); });
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
        cell.d_bytes = to_others * (kH * 2 + kK * 4 + kK * 4);
        cell.c_bytes = from_others * kH * 2;
      } else {
        // NCCL send/recv with exact, host-known splits of the hidden rows, packed by
        // destination (what all_to_all_single moves), then the same rows back.
        std::vector<size_t> off_to(n + 1, 0), off_from(n + 1, 0);
        for (int r = 0; r < n; ++r) {
          off_to[r + 1] = off_to[r] + plan.sent[rank][r].size();
          off_from[r + 1] = off_from[r] + plan.sent[r][rank].size();
        }
        HostTensor pack(DType::BF16, {static_cast<int64_t>(std::max<size_t>(off_to[n], 1)), kH});
        for (int r = 0; r < n; ++r) {
          for (size_t i = 0; i < plan.sent[rank][r].size(); ++i) {
            std::memcpy(pack.data<uint16_t>() + (off_to[r] + i) * kH,
                        in.hidden[rank].data<uint16_t>() + static_cast<size_t>(plan.sent[rank][r][i]) * kH, kH * 2);
          }
        }
        const DeviceTensor send = DeviceTensor::from_host(pack, rank);
        DeviceTensor back(DType::BF16, {static_cast<int64_t>(std::max<size_t>(off_to[n], 1)), kH}, rank);
        DeviceTensor recv(DType::BF16, {static_cast<int64_t>(std::max<size_t>(off_from[n], 1)), kH}, rank);
        const comm::NcclLib& nl = comm::nccl();
        const size_t row = kH * 2;
        auto exchange = [&](const uint8_t* src, const std::vector<size_t>& so, uint8_t* dst, const std::vector<size_t>& ro) {
          MODMOE_NCCL_CHECK(nl.GroupStart());
          for (int r = 0; r < n; ++r) {
            if (so[r + 1] > so[r]) MODMOE_NCCL_CHECK(nl.Send(src + so[r] * row, (so[r + 1] - so[r]) * row, ncclUint8, r, c.get(), s));
            if (ro[r + 1] > ro[r]) MODMOE_NCCL_CHECK(nl.Recv(dst + ro[r] * row, (ro[r + 1] - ro[r]) * row, ncclUint8, r, c.get(), s));
          }
          MODMOE_NCCL_CHECK(nl.GroupEnd());
        };
        auto d_fn = [&] { exchange(send.data<uint8_t>(), off_to, recv.data<uint8_t>(), off_from); };
        auto c_fn = [&] { exchange(recv.data<uint8_t>(), off_from, back.data<uint8_t>(), off_to); };
        auto verify = [&]() -> std::string {
          const HostTensor got = recv.to_host();
          for (int r = 0; r < n; ++r) {
            for (size_t i = 0; i < plan.sent[r][rank].size(); ++i) {
              if (std::memcmp(got.data<uint16_t>() + (off_from[r] + i) * kH,
                              in.hidden[r].data<uint16_t>() + static_cast<size_t>(plan.sent[r][rank][i]) * kH, row) != 0) {
                return "baseline: received row differs";
              }
            }
          }
          const HostTensor b = back.to_host();
          if (std::memcmp(b.view().data, pack.view().data, off_to[n] * row) != 0) return "baseline: rows back differ";
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
        cell.d_bytes = to_others * kH * 2;
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
  MODMOE_CUDA_CHECK(cudaStreamDestroy(s));
  return 0;
}

}  // namespace

int run_ep_bench(const std::vector<std::string>& argv) {
  const Args args(argv, {"--gpus", "--tokens", "--sms", "--backends", "--combine", "--iters", "--warmup", "--out", "--seed"}, {});
  BenchOptions o;
  o.gpus = static_cast<int>(args.get_int("--gpus", 2, 1, kMaxRanksBench));
  o.tokens = parse_int_list(args.get("--tokens", "1,16,128,512,2048,4096"), "--tokens", 1, 1 << 16);
  const std::vector<int> sms = parse_int_list(args.get("--sms", "24"), "--sms", 1, 1024);
  const std::vector<std::string> backends = split_list(args.get("--backends", "nvlink,nccl,nccl_a2a_uneven"));
  const std::vector<std::string> modes = split_list(args.get("--combine", "pull"));
  o.iters = static_cast<int>(args.get_int("--iters", 30, 1, 100000));
  o.warmup = static_cast<int>(args.get_int("--warmup", 5, 0, 100000));
  o.seed = static_cast<uint64_t>(args.get_int("--seed", 7, 0, 1ll << 40));
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
  MODMOE_CHECK(o.variants.size() * o.tokens.size() <= static_cast<size_t>(kMaxCells), "too many cells (",
               o.variants.size() * o.tokens.size(), "): expected at most ", kMaxCells);
  MODMOE_CHECK(kE % o.gpus == 0, "option '--gpus' = ", o.gpus, ": expected a divisor of E = ", kE);
  const int have = comm::mp::probe_gpu_count();
  MODMOE_CHECK(have >= o.gpus, "option '--gpus' = ", o.gpus, ": this machine has ", have, " GPUs");

  std::printf("modmoe bench all-to-all: %d GPUs, H=%lld bf16, E=%d, k=%d, tokens per rank", o.gpus,
              static_cast<long long>(kH), kE, kK);
  for (int t : o.tokens) std::printf(" %d", t);
  std::printf("; CUDA-graph replay medians of %d runs, slowest rank\n", o.iters);
  std::fflush(stdout);

  comm::mp::SharedMemory shm(sizeof(Shared));
  auto* sh = new (shm.data()) Shared();
  sh->rv.state.store(0);
  const std::vector<int> codes = comm::mp::run_ranks(o.gpus, 1800.0, [&](int rank) { return bench_rank(o, rank, sh); });
  bool ok = true;
  for (int r = 0; r < o.gpus; ++r) {
    if (codes[r] != 0) {
      std::fprintf(stderr, "rank %d exited with %d\n", r, codes[r]);
      ok = false;
    }
  }

  nlohmann::json j;
  j["benchmark"] = "all_to_all";
  j["gpu"] = sh->gpu;
  j["gpu_count"] = o.gpus;
  j["commit"] = commit_id();
  j["ep_size"] = o.gpus;
  j["nccl_version"] = sh->nccl_version;
  j["hidden"] = kH;
  j["num_experts"] = kE;
  j["top_k"] = kK;
  j["iters"] = o.iters;
  j["dispatch_payload"] = "topk_ids int32 [T,8] + hidden bf16 [T,7168] + topk_weights fp32 [T,8]";
  j["gbps_counts"] = "bytes of rows sent to other ranks by the slowest rank / its median time";
  j["timing"] = "CUDA-graph replays of dispatch and combine, alternately, CUDA events, median per rank";
  {
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    j["date"] = date;
  }
  std::printf("\n%-16s %4s %5s %7s %12s %12s %14s %14s %8s\n", "backend", "sms", "comb", "tokens", "dispatch us",
              "combine us", "dispatch GB/s", "combine GB/s", "correct");
  const int nt = static_cast<int>(o.tokens.size());
  for (size_t vi = 0; vi < o.variants.size(); ++vi) {
    const Variant& v = o.variants[vi];
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
        per.push_back({{"rank", r}, {"dispatch_us", row[r].d_us}, {"combine_us", row[r].c_us},
                       {"dispatch_bytes", row[r].d_bytes}, {"combine_bytes", row[r].c_bytes}});
      }
      correct = correct && valid;
      ok = ok && correct;
      const double dg = row[sd].d_us > 0 ? row[sd].d_bytes / (row[sd].d_us * 1e3) : 0.0;
      const double cg = row[sc].c_us > 0 ? row[sc].c_bytes / (row[sc].c_us * 1e3) : 0.0;
      const char* mode = v.backend == "nvlink" ? (v.pull ? "pull" : "push") : "-";
      std::printf("%-16s %4d %5s %7d %12.1f %12.1f %14.1f %14.1f %8s\n", v.backend.c_str(),
                  v.backend == "nccl_a2a_uneven" ? 0 : v.num_sms, mode, o.tokens[ti], row[sd].d_us, row[sc].c_us, dg,
                  cg, correct ? "yes" : "NO");
      j["rows"].push_back({{"ep_size", o.gpus}, {"backend", v.backend}, {"num_sms", v.backend == "nccl_a2a_uneven" ? 0 : v.num_sms},
                           {"combine_mode", mode}, {"tokens_per_rank", o.tokens[ti]},
                           {"dispatch_us", row[sd].d_us}, {"combine_us", row[sc].c_us}, {"dispatch_GBps", dg},
                           {"combine_GBps", cg}, {"slowest_rank_dispatch", sd}, {"slowest_rank_combine", sc},
                           {"correct", correct}, {"per_rank", per}});
    }
  }
  // Ratios against NCCL's all-to-all measured in this run, at the same tokens per rank.
  for (auto& row : j["rows"]) {
    for (const auto& base : j["rows"]) {
      if (base["backend"] == "nccl_a2a_uneven" && base["tokens_per_rank"] == row["tokens_per_rank"] &&
          row["dispatch_us"].get<double>() > 0 && row["combine_us"].get<double>() > 0) {
        row["dispatch_speedup_vs_nccl_a2a"] = base["dispatch_us"].get<double>() / row["dispatch_us"].get<double>();
        row["combine_speedup_vs_nccl_a2a"] = base["combine_us"].get<double>() / row["combine_us"].get<double>();
      }
    }
  }
  write_bench_json(j, args.get("--out", ""), "all_to_all.json");
  return ok ? 0 : 1;
}

#else

int run_ep_bench(const std::vector<std::string>&) {
  MODMOE_FAIL("modmoe bench all-to-all: this build has no CUDA backend (nvcc was not found at build time)");
}

#endif

}  // namespace modmoe::app
