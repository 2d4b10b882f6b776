// `modmoe ep-demo --gpus N`: one expert-parallel MoE layer over N GPUs, one process each.
// Every rank routes its T tokens, dispatches them, runs the modular experts on the rows it
// received (its own slice of the experts, ExpertMap::for_rank, do_finalize, written straight
// into combine_buffer()) and combines. Each rank's output is checked against the single-GPU
// fused_moe over the same global batch (N*T tokens, all E experts, run on every rank), and
// every stage is timed (CUDA events, median). `--dtype fp8-block|fp8-tensor`: FP8 weights, and
// every rank quantizes its tokens before the dispatch (docs/fp8.md, "Quantize before dispatch").
// `--dtype nvfp4`: NVFP4 weights (W4A16), every rank quantizes its tokens to NVFP4 with one
// global per token before the dispatch, the receiver dequantizes them to bf16 for the experts
// (docs/nvfp4.md, "Quantize before dispatch").
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "args.h"
#include "check.h"
#include "ep_common.h"
#include "ep_layer.h"
#include "layer.h"
#include "modmoe/modmoe.h"
#ifdef MODMOE_WITH_CUDA
#include "cuda/comm/multiprocess.h"
#include "reference/ep_sim.h"
#endif

namespace modmoe::app {

#ifdef MODMOE_WITH_CUDA
namespace {

struct RankReport {
  int finished = 0;
  int ok = 0;
  double stage_us[kEpStages] = {};  // route, quantize, dispatch, experts, combine
  double layer_us = 0, fused_us = 0;
  double rel_l2 = 0;
  double sliced_vs_fused = -1, ep_vs_sliced = -1;  // diagnostics, -1 = not run
  double ep_vs_f64 = -1, fused_vs_f64 = -1;
  int ids_equal = -1;
  int64_t received = 0;  // rows this rank received (all sources)
  char gpu[96] = {};
};

struct DemoOptions {
  int gpus = 2;
  std::string preset = "deepseek-v3";
  AllToAllBackend backend = AllToAllBackend::NvLink;
  int64_t tokens = 128;
  uint64_t seed = 1234;
  bool identity = false;
  int reps = 10;
  int num_sms = 0;
  QuantScheme dtype = QuantScheme::None;
};

int demo_rank(const DemoOptions& o, int rank, comm::mp::Rendezvous* rv, RankReport* rep) {
  const int n = o.gpus;
  if (!o.identity) {  // before any rank builds its weights: the same answer on every rank
    const std::string why = experts_not_supported_on_gpu(o.dtype, rank);
    MODMOE_CHECK(why.empty(), "ep-demo --dtype ", dtype_option_name(o.dtype), ": ", why,
                 " [--experts identity runs the quantize, dispatch, dequantize and combine without it]");
  }
  comm::mp::RankComm c(rv, rank, n, rank);
  const Preset& preset = find_preset(o.preset);
  const int e = preset.num_experts, k = preset.top_k;
  const int64_t h = preset.hidden, t = o.tokens;
  const Device dev = Device::cuda(rank);
  cudaDeviceProp prop{};
  MODMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, rank));
  std::snprintf(rep->gpu, sizeof(rep->gpu), "%s", prop.name);
  cudaStream_t s;
  MODMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  EpLayerOptions lo;
  lo.backend = o.backend;
  lo.max_tokens = static_cast<int>(t);
  lo.num_sms = o.num_sms;
  lo.identity = o.identity;
  lo.seed = o.seed;
  lo.dtype = o.dtype;
  EpLayer layer(preset, n, rank, c.get(), lo);
  const Layer& mine = layer.layer();
  // The global batch, the same on every rank; my tokens are rows [rank*T, (rank+1)*T).
  const Batch global(mine, n * t, o.seed + 1);
  const TensorView hidden = rows_of(global.hidden, rank * t, t);
  const TensorView logits = rows_of(global.logits, rank * t, t);
  MODMOE_CUDA_CHECK(cudaDeviceSynchronize());  // the fills ran on the legacy stream
  const int rm = static_cast<int>(t);
  const TensorView ids = layer.ids(rm), wts = layer.weights(rm), out = layer.out(rm);

  cudaEvent_t ev[kEpStages + 1];
  for (auto& x : ev) MODMOE_CUDA_CHECK(cudaEventCreate(&x));
  std::vector<float> st[kEpStages], total;
  c.barrier();
  for (int it = 0; it < o.reps + 2; ++it) {
    layer.run(hidden, logits, rm, s, ev);
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
    layer.a2a().check();
    if (it < 2) continue;  // warm-up
    for (int i = 0; i < kEpStages; ++i) {
      float ms = 0;
      MODMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[i], ev[i + 1]));
      st[i].push_back(ms);
    }
    float ms = 0;
    MODMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[kEpStages]));
    total.push_back(ms);
  }
  for (int i = 0; i < kEpStages; ++i) rep->stage_us[i] = median_us(st[i]);
  rep->layer_us = median_us(total);
  {
    const HostTensor counts = to_host(layer.last_dispatch().recv_counts);
    for (int r = 0; r < n; ++r) rep->received += counts.data<int32_t>()[r];
  }
  const HostTensor got = to_host(out);

  // The check.
  double err2 = 0, ref2 = 0;
  const bool fp4 = o.dtype == QuantScheme::Nvfp4;
  const bool fp8 = o.dtype != QuantScheme::None && !fp4;
  // NVFP4: my rows as the receivers' experts get them: what I dispatched, dequantized on the
  // CPU (each row with its own global), [T, H] bf16.
  HostTensor mine_dq;
  if (fp4) {
    mine_dq = HostTensor(DType::BF16, {t, h});
    dequantize_nvfp4(to_host(layer.hidden_q(rm)), to_host(layer.hidden_scale(rm)), to_host(layer.hidden_global(rm)),
                     mine_dq);
  }
  if (o.identity) {
    // Identity experts: each token comes back once per distinct destination rank. FP8: the
    // rows that came back are the dequantized e4m3 rows (bf16(float(q) * s)); NVFP4: the
    // dequantized e2m1 rows (bf16((e2m1 * scale) * global)), the GPU's dequantize against the
    // CPU's, bit for bit.
    HostTensor hid = to_host(hidden);
    const HostTensor id = to_host(ids);
    if (fp8) dequantize_activations(to_host(layer.hidden_q(rm)), o.dtype, to_host(layer.hidden_scale(rm)), hid);
    if (fp4) std::memcpy(hid.view().data, mine_dq.view().data, hid.nbytes());
    for (int64_t i = 0; i < t; ++i) {
      uint64_t mask = 0;
      for (int j = 0; j < k; ++j) {
        const int x = id.data<int32_t>()[i * k + j];
        if (x >= 0 && x < e) mask |= 1ull << (x / (e / n));
      }
      const float mult = static_cast<float>(__builtin_popcountll(mask));
      for (int64_t col = 0; col < h; ++col) {
        const double want = bf16_bits_to_float(float_to_bf16_bits(mult * bf16_bits_to_float(hid.data<uint16_t>()[i * h + col])));
        const double d = bf16_bits_to_float(got.data<uint16_t>()[i * h + col]) - want;
        err2 += d * d;
        ref2 += want * want;
      }
    }
  } else {
    // The single-GPU reference: fused_moe over the whole batch with all E experts.
    FusedReference ref(preset, dev, o.seed, o.dtype);
    const Layer& full = ref.layer();
    auto run_fused = [&] { ref.run(global, s); };
    std::vector<float> fms;
    for (int it = 0; it < o.reps + 2; ++it) {
      MODMOE_CUDA_CHECK(cudaEventRecord(ev[0], s));
      run_fused();
      MODMOE_CUDA_CHECK(cudaEventRecord(ev[1], s));
      MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
      float ms = 0;
      MODMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
      if (it >= 2) fms.push_back(ms);
    }
    rep->fused_us = median_us(fms);
    // Diagnostics: the routing of my rows agrees; the sum over the ranks' expert slices of
    // experts() on my own tokens (expert parallelism without the all-to-all) agrees with
    // fused_moe and with the all-to-all path; one sampled token of each against float64.
    {
      const TensorView fused = ref.out(), fids = ref.ids(), fwts = ref.weights();
      const HostTensor a = to_host(ids), b = to_host(rows_of(fids, rank * t, t));
      rep->ids_equal = std::memcmp(a.view().data, b.view().data, a.nbytes()) == 0;
      ExpertsDesc d1;
      d1.num_tokens = t;
      d1.hidden = h;
      d1.intermediate = preset.intermediate;
      d1.top_k = k;
      d1.activation = full.options.activation.kind;
      d1.scheme = full.weights.scheme;
      d1.do_finalize = true;
      d1.fp8_fast_accum = full.options.fp8_fast_accum;
      std::vector<double> sum(static_cast<size_t>(t * h), 0.0);
      Buffer part(DType::BF16, {t, h}, dev);
      Buffer mine_rows;  // NVFP4: my dequantized rows on the device
      if (fp4) {
        mine_rows = Buffer(DType::BF16, {t, h}, dev);
        copy_from_host(mine_dq, mine_rows);
      }
      for (int r = 0; r < n; ++r) {
        const ExpertMap mr = ExpertMap::for_rank(e, n, r);
        d1.expert_map = mr;
        const size_t wsb = experts_workspace_size(d1);
        Buffer wsr(DType::U8, {static_cast<int64_t>(wsb) + 256}, dev);
        ExpertsInputs li;  // FP8: the rows this rank quantized and dispatched; NVFP4: dequantized
        li.hidden = fp8 ? layer.hidden_q(rm) : fp4 ? mine_rows.view() : hidden;
        li.hidden_scale = fp8 ? layer.hidden_scale(rm) : TensorView{};
        li.topk_ids = ids;
        li.topk_weights = wts;
        ExpertsOutputs lo;
        lo.out = part;
        experts(li, reference::slice_experts(full.weights, mr.local_expert_offset, mr.num_local_experts), mr,
                full.options, lo, Workspace{wsr.view().data, wsb}, s);
        MODMOE_CUDA_CHECK(cudaStreamSynchronize(s));
        const HostTensor ph = to_host(part);
        for (int64_t i = 0; i < t * h; ++i) sum[i] += bf16_bits_to_float(ph.data<uint16_t>()[i]);
      }
      const HostTensor fr = to_host(rows_of(fused, rank * t, t));
      double e1 = 0, r1 = 0, e2 = 0, r2 = 0;
      for (int64_t i = 0; i < t * h; ++i) {
        const double f = bf16_bits_to_float(fr.data<uint16_t>()[i]);
        const double g = bf16_bits_to_float(got.data<uint16_t>()[i]);
        const double sl = bf16_bits_to_float(float_to_bf16_bits(static_cast<float>(sum[i])));
        e1 += (sl - f) * (sl - f);
        r1 += f * f;
        e2 += (g - sl) * (g - sl);
        r2 += sl * sl;
      }
      rep->sliced_vs_fused = r1 > 0 ? std::sqrt(e1 / r1) : std::sqrt(e1);
      rep->ep_vs_sliced = r2 > 0 ? std::sqrt(e2 / r2) : std::sqrt(e2);
      rep->ep_vs_f64 = check_sampled_tokens(full, hidden, ids, wts, out, 1).rel_l2;
      rep->fused_vs_f64 = check_sampled_tokens(full, rows_of(global.hidden, rank * t, t), rows_of(fids, rank * t, t),
                                               rows_of(fwts, rank * t, t), rows_of(fused, rank * t, t), 1).rel_l2;
    }
    const HostTensor want_t = to_host(rows_of(ref.out(), rank * t, t));
    for (int64_t i = 0; i < t * h; ++i) {
      const double want = bf16_bits_to_float(want_t.data<uint16_t>()[i]);
      const double d = bf16_bits_to_float(got.data<uint16_t>()[i]) - want;
      err2 += d * d;
      ref2 += want * want;
    }
  }
  rep->rel_l2 = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  const double bound = o.identity ? 0.0 : ep_reference_bound(o.dtype);
  rep->ok = std::isfinite(rep->rel_l2) && rep->rel_l2 <= bound;
  // fp8-tensor: the bound against fused_moe allows for its other scale; the same rows summed
  // over the ranks' expert slices without the all-to-all must agree tightly.
  if (!o.identity && o.dtype == QuantScheme::Fp8PerTensor) rep->ok = rep->ok && rep->ep_vs_sliced <= 1e-2;
  rep->finished = 1;
  for (auto& x : ev) cudaEventDestroy(x);
  c.barrier();
  MODMOE_CUDA_CHECK(cudaStreamDestroy(s));
  return rep->ok ? 0 : 3;
}

}  // namespace

// The float64 diagnostics compare with the bf16 masters; how far a quantized layer is from them.
static const char* quant_note(QuantScheme dtype) {
  switch (dtype) {
    case QuantScheme::Fp8Block128:
    case QuantScheme::Fp8PerTensor:
      return " over the bf16 masters (FP8 is\nabout 0.06 from them: four e4m3 roundings, docs/fp8.md)";
    case QuantScheme::Nvfp4:
      return " over the bf16 masters (NVFP4 is\nabout 0.2 from them: five e2m1 roundings, hidden and weights, docs/nvfp4.md)";
    default: return "";
  }
}

int run_ep_demo(const std::vector<std::string>& argv) {
  const Args args(argv, {"--gpus", "--preset", "--backend", "--tokens", "--seed", "--experts", "--reps", "--num-sms",
                         "--dtype"}, {});
  DemoOptions o;
  o.gpus = static_cast<int>(args.get_int("--gpus", 2, 1, 64));
  o.preset = args.get("--preset", "deepseek-v3");
  o.backend = parse_backend(args.get("--backend", "nvlink"));
  o.tokens = args.get_int("--tokens", 128, 1, 1 << 16);
  o.seed = static_cast<uint64_t>(args.get_int("--seed", 1234, 0, 1ll << 62));
  o.reps = static_cast<int>(args.get_int("--reps", 10, 1, 10000));
  o.num_sms = static_cast<int>(args.get_int("--num-sms", 0, 0, 1024));
  o.dtype = parse_dtype(args.get("--dtype", "bf16"));
  const std::string ex = args.get("--experts", "real");
  MODMOE_CHECK(ex == "real" || ex == "identity", "option '--experts' = '", ex, "': expected real or identity");
  o.identity = ex == "identity";
  const Preset& preset = find_preset(o.preset);
  MODMOE_CHECK(preset.num_experts % o.gpus == 0, "option '--gpus' = ", o.gpus, ": expected a divisor of the ",
               preset.num_experts, " experts of ", preset.name);
  const std::string shape_problem = dtype_shape_problem(o.dtype, preset.hidden, preset.intermediate);
  MODMOE_CHECK(shape_problem.empty(), "option '--dtype' = ", dtype_option_name(o.dtype), " with preset ", preset.name,
               " (H = ", preset.hidden, ", I = ", preset.intermediate, "): ", shape_problem,
               "; pick another preset or --dtype bf16");
  const int have = comm::mp::probe_gpu_count();
  MODMOE_CHECK(have >= o.gpus, "option '--gpus' = ", o.gpus, ": this machine has ", have, " GPUs");

  const size_t payload = reference::ep_payload_bytes_per_token(o.dtype, preset.hidden, preset.top_k);
  const size_t bf16_payload = reference::ep_payload_bytes_per_token(QuantScheme::None, preset.hidden, preset.top_k);
  std::printf("modmoe ep-demo: %s (%s), %d GPUs, backend %s, %lld tokens per rank, experts %s, dtype %s (%zu "
              "dispatch payload bytes per token, %zu with topk_ids; bf16 %zu: %.3fx), seed %llu\n",
              preset.name.c_str(), preset.shape_string().c_str(), o.gpus, all_to_all_backend_name(o.backend),
              static_cast<long long>(o.tokens), ex.c_str(), dtype_option_name(o.dtype), payload,
              payload + 4 * static_cast<size_t>(preset.top_k), bf16_payload + 4 * static_cast<size_t>(preset.top_k),
              static_cast<double>(payload + 4 * preset.top_k) / static_cast<double>(bf16_payload + 4 * preset.top_k),
              static_cast<unsigned long long>(o.seed));
  std::fflush(stdout);
  comm::mp::SharedMemory shm(sizeof(comm::mp::Rendezvous) + sizeof(RankReport) * o.gpus);
  auto* rv = new (shm.data()) comm::mp::Rendezvous();
  rv->state.store(0);
  auto* reps = reinterpret_cast<RankReport*>(static_cast<char*>(shm.data()) + sizeof(comm::mp::Rendezvous));
  for (int r = 0; r < o.gpus; ++r) new (&reps[r]) RankReport();
  const std::vector<int> codes = comm::mp::run_ranks(o.gpus, 900.0, [&](int rank) { return demo_rank(o, rank, rv, &reps[rank]); });

  std::printf("\n%-5s %-24s %9s %9s %9s %9s %9s %9s %10s %14s %10s %s\n", "rank", "gpu", "route us", "quantize",
              "dispatch", "experts", "combine", "layer us", "recv rows", "fused_moe us", "rel L2", "result");
  bool ok = true;
  double worst[kEpStages + 1] = {};  // the stages, then the layer
  for (int r = 0; r < o.gpus; ++r) {
    const RankReport& x = reps[r];
    const bool good = codes[r] == 0 && x.finished && x.ok;
    ok = ok && good;
    std::printf("%-5d %-24s %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %10lld %14.1f %10.2e %s (exit %d)\n", r, x.gpu,
                x.stage_us[0], x.stage_us[1], x.stage_us[2], x.stage_us[3], x.stage_us[4], x.layer_us,
                static_cast<long long>(x.received), x.fused_us, x.rel_l2, good ? "ok" : "FAILED", codes[r]);
    for (int i = 0; i < kEpStages; ++i) worst[i] = std::max(worst[i], x.stage_us[i]);
    worst[kEpStages] = std::max(worst[kEpStages], x.layer_us);
  }
  if (!o.identity) {
    std::printf("\ndiagnostics per rank: routing ids equal to fused_moe's; rel L2 of the sum of experts() over\n"
                "the ranks' slices on the rank's own tokens (no all-to-all) vs fused_moe, of the all-to-all path\n"
                "vs that sum, and of one sampled token of each against float64%s\n",
                quant_note(o.dtype));
    for (int r = 0; r < o.gpus; ++r) {
      const RankReport& x = reps[r];
      std::printf("rank %d: ids equal %d, sliced vs fused %.2e, ep vs sliced %.2e, ep vs f64 %.2e, fused vs f64 %.2e\n",
                  r, x.ids_equal, x.sliced_vs_fused, x.ep_vs_sliced, x.ep_vs_f64, x.fused_vs_f64);
    }
  }
  std::printf("%-5s %-24s %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f\n", "max", "(slowest rank per stage)", worst[0],
              worst[1], worst[2], worst[3], worst[4], worst[5]);
  char bound[160];
  if (o.identity) {
    std::snprintf(bound, sizeof(bound), "0 (exact)");
  } else {
    std::snprintf(bound, sizeof(bound), "%g%s", ep_reference_bound(o.dtype),
                  o.dtype == QuantScheme::Fp8PerTensor
                      ? ": fused_moe's per-tensor scale is over the global batch; ep vs sliced <= 1e-2"
                  : o.dtype == QuantScheme::Nvfp4
                      ? ": fused_moe on the global batch quantized per row and dequantized, the rows the ranks' "
                        "experts get"
                      : "");
  }
  std::printf("\ncheck (%s): each rank's output against the single-GPU %s over the same %lld-token batch: %s "
              "(bound rel L2 %s)\n", dtype_option_name(o.dtype), o.identity ? "identity" : "fused_moe",
              static_cast<long long>(o.tokens * o.gpus), ok ? "ok" : "FAILED", bound);
  return ok ? 0 : 1;
}

#else

int run_ep_demo(const std::vector<std::string>&) {
  MODMOE_FAIL("modmoe ep-demo: this build has no CUDA backend (nvcc was not found at build time)");
}

#endif

}  // namespace modmoe::app
