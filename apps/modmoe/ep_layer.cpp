// See ep_layer.h.
#ifdef MODMOE_WITH_CUDA
#include "ep_layer.h"

#include <algorithm>
#include <cmath>

#include "cuda/device/cuda_check.h"
#include "reference/ep_sim.h"

namespace modmoe::app {

TensorView rows_of(const TensorView& t, int64_t first, int64_t count) {
  TensorView v = t;
  v.data = static_cast<char*>(t.data) + first * t.strides[0] * static_cast<int64_t>(dtype_bytes(t.dtype));
  v.shape[0] = count;
  return v;
}

TensorView flatten01(const TensorView& t) {
  MODMOE_CHECK(t.ndim >= 2 && t.is_contiguous(), "flatten01: shape ", t.shape_string(),
               ": expected a contiguous view of 2 or more dimensions");
  int64_t shape[TensorView::kMaxDims];
  shape[0] = t.size(0) * t.size(1);
  for (int d = 2; d < t.ndim; ++d) shape[d - 1] = t.size(d);
  return make_view(t.data, t.dtype, shape, t.ndim - 1, t.device);
}

double ep_reference_bound(QuantScheme dtype) { return dtype == QuantScheme::Fp8PerTensor ? 0.1 : 1e-2; }

namespace {

// NVFP4, quantize before dispatch: hidden [T, H] bf16 -> q [T, H/2], scale [T, H/16], one
// global per row [T] (quantize_nvfp4, dynamic), on `s`.
void quantize_rows_nvfp4(const TensorView& hidden, const TensorView& q, const TensorView& scale,
                         const TensorView& global, cudaStream_t s) {
  quantize_nvfp4(hidden, q, scale, global, {}, s);
}

}  // namespace

double median_us(std::vector<float> ms) {
  std::sort(ms.begin(), ms.end());
  return ms.empty() ? 0.0 : 1000.0 * ms[ms.size() / 2];
}

namespace {

ExpertsDesc experts_desc(const Preset& preset, const Layer& l, const ExpertMap& map, int64_t rows) {
  ExpertsDesc d;
  d.format = InputFormat::Standard;
  d.num_tokens = rows;
  d.hidden = preset.hidden;
  d.intermediate = preset.intermediate;
  d.top_k = preset.top_k;
  d.expert_map = map;
  d.activation = l.options.activation.kind;
  d.scheme = l.weights.scheme;
  d.do_finalize = true;
  d.fp8_fast_accum = l.options.fp8_fast_accum;
  return d;
}

}  // namespace

namespace {

// One experts() call on one expert whose only token has id -1 (nothing to compute), on weights
// w (scheme, tensors and scales set; the layout is prepare_weights' GateUpInterleaved, G = 8):
// "" where the scheme runs on this GPU, else the library's "not supported yet" message.
std::string probe_experts(ExpertWeights w, const TensorView& hidden, const TensorView& hidden_scale,
                          const Device& dev) {
  const Buffer ids(DType::I32, {1, 1}, dev), wts(DType::F32, {1, 1}, dev);
  const Buffer out(DType::BF16, {1, w.hidden()}, dev);
  MODMOE_CUDA_CHECK(cudaMemset(ids.view().data, 0xff, 4));  // id -1: nothing to compute
  w.layout = WeightLayout::GateUpInterleaved;  // what prepare_weights gives, as the layer has
  w.interleave_rows = 8;
  ExpertsInputs in;
  in.hidden = hidden;
  in.hidden_scale = hidden_scale;
  in.topk_ids = ids;
  in.topk_weights = wts;
  ExpertsOutputs o;
  o.out = out;
  ExpertsOptions opt;
  opt.do_finalize = true;
  const ExpertMap map = ExpertMap::single(1);
  const size_t ws_bytes = experts_workspace_size(make_experts_desc(in, w, map, opt, o));
  const Buffer ws(DType::U8, {static_cast<int64_t>(ws_bytes) + 256}, dev);
  try {
    experts(in, w, map, opt, o, Workspace{ws.view().data, ws_bytes}, nullptr);
    MODMOE_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.find("not supported yet") == std::string::npos) throw;
    return what;
  }
  return "";
}

}  // namespace

std::string experts_not_supported_on_gpu(QuantScheme dtype, int device) {
  if (dtype == QuantScheme::None) return "";
  // Each rank's process probes its own GPU (it may run before the rank's communicator sets
  // the device): the cudaMemset of the probe works on the current device.
  MODMOE_CUDA_CHECK(cudaSetDevice(device));
  const Device dev = Device::cuda(device);
  ExpertWeights w;
  w.scheme = dtype;
  if (dtype == QuantScheme::Nvfp4) {  // W4A16: H = I = 64
    const int64_t b = 64, sb = kNvfp4BlockSize;
    const Buffer w13(DType::E2M1x2, {1, 2 * b, b / 2}, dev), w2(DType::E2M1x2, {1, b, b / 2}, dev);
    const Buffer s13(DType::E4M3, {1, 2 * b, b / sb}, dev), s2(DType::E4M3, {1, b, b / sb}, dev);
    const Buffer g13(DType::F32, {1}, dev), g2(DType::F32, {1}, dev);
    const Buffer hid(DType::BF16, {1, b}, dev);
    w.w13 = w13;
    w.w2 = w2;
    w.w13_scale = s13;
    w.w2_scale = s2;
    w.w13_global_scale = g13;
    w.w2_global_scale = g2;
    return probe_experts(w, hid, {}, dev);
  }
  const int64_t b = kFp8BlockSize;  // FP8: H = I = 128
  const bool block = dtype == QuantScheme::Fp8Block128;
  const Buffer w13(DType::E4M3, {1, 2 * b, b}, dev), w2(DType::E4M3, {1, b, b}, dev);
  const Buffer s13(DType::F32, block ? std::vector<int64_t>{1, 2, 1} : std::vector<int64_t>{1}, dev);
  const Buffer s2(DType::F32, block ? std::vector<int64_t>{1, 1, 1} : std::vector<int64_t>{1}, dev);
  const Buffer hid(DType::E4M3, {1, b}, dev), hs(DType::F32, block ? std::vector<int64_t>{1, 1} : std::vector<int64_t>{1}, dev);
  w.w13 = w13;
  w.w2 = w2;
  w.w13_scale = s13;
  w.w2_scale = s2;
  return probe_experts(w, hid, hs, dev);
}

EpLayer::EpLayer(const Preset& preset, int ep_size, int ep_rank, ncclComm* comm, const EpLayerOptions& o)
    : preset_(preset), n_(ep_size), rank_(ep_rank), o_(o), map_(ExpertMap::for_rank(preset.num_experts, ep_size, ep_rank)) {
  const Device dev = Device::cuda(ep_rank);
  const int e = preset.num_experts, k = preset.top_k;
  const int64_t h = preset.hidden, tm = o.max_tokens;
  // My experts only, filled by global id: the same numbers the full layer has.
  mine_ = std::make_unique<Layer>(preset, map_, dev, o.seed, false, o.dtype);
  ids_ = Buffer(DType::I32, {tm, k}, dev);
  wts_ = Buffer(DType::F32, {tm, k}, dev);
  out_ = Buffer(DType::BF16, {tm, h}, dev);
  if (o.dtype == QuantScheme::Nvfp4) {
    // Payload rows: H/2 packed bytes (H % 64 == 0: whole 16-byte vectors), H/16 scale bytes
    // (even: 2-byte or wider vectors), one fp32 global; each region of the receive buffer
    // starts on 128 bytes (a2a_layout.h), and the dequantize reads bytes, so any row works.
    q_ = Buffer(DType::E2M1x2, {tm, h / 2}, dev);
    qs_ = Buffer(DType::E4M3, {tm, reference::ep_scales_per_token(o.dtype, h)}, dev);
    qg_ = Buffer(DType::F32, {tm}, dev);
    if (!o.identity) dq_ = Buffer(DType::BF16, {n_ * tm, h}, dev);
  } else if (o.dtype != QuantScheme::None) {
    const int64_t scales = reference::ep_scales_per_token(o.dtype, h);
    q_ = Buffer(DType::E4M3, {tm, h}, dev);
    qs_ = o.dtype == QuantScheme::Fp8PerTensor ? Buffer(DType::F32, {tm}, dev) : Buffer(DType::F32, {tm, scales}, dev);
  }
  AllToAllConfig cfg;
  cfg.backend = o.backend;
  cfg.ep_size = n_;
  cfg.ep_rank = rank_;
  cfg.num_experts = e;
  cfg.top_k = k;
  cfg.max_tokens_per_rank = o.max_tokens;
  cfg.max_payload_bytes_per_token = reference::ep_payload_bytes_per_token(o.dtype, h, k);
  cfg.hidden = h;
  cfg.num_sms = o.num_sms;
  cfg.combine_pull = o.combine_pull;
  a2a_ = create_all_to_all(cfg, comm);
  // The experts' problem is fixed by the shapes: [n*T] received rows; sized for T = max.
  if (!o.identity) ws_bytes_ = experts_workspace_size(experts_desc(preset_, *mine_, map_, n_ * tm));
  ws_buf_ = Buffer(DType::U8, {static_cast<int64_t>(ws_bytes_) + 256}, dev);
  MODMOE_CUDA_CHECK(cudaDeviceSynchronize());  // the fills ran on the legacy stream
}

void EpLayer::run(const TensorView& hidden, const TensorView& logits, int t, cudaStream_t s, cudaEvent_t* ev) {
  MODMOE_CHECK(t >= 1 && t <= o_.max_tokens, "EpLayer::run: T = ", t, ", expected 1..", o_.max_tokens);
  const bool fp4 = o_.dtype == QuantScheme::Nvfp4;
  const bool fp8 = o_.dtype != QuantScheme::None && !fp4;
  const TensorView ids = this->ids(t), wts = weights(t), out = this->out(t);
  const TensorView cb = a2a_->combine_buffer(t);
  auto mark = [&](int i) {
    if (ev) MODMOE_CUDA_CHECK(cudaEventRecord(ev[i], s));
  };
  mark(0);
  route(logits, mine_->route_bias, preset_.routing, ids, wts, s);
  mark(1);
  // Payloads: {hidden, topk_weights}, {e4m3 hidden, its scales, topk_weights}, or {e2m1
  // hidden, its e4m3 block scales, its per-token globals, topk_weights}.
  std::vector<TensorView> payloads{hidden, wts};
  if (fp8) {
    payloads = {hidden_q(t), hidden_scale(t), wts};
    quantize_activations(hidden, o_.dtype, payloads[0], payloads[1], {}, s);
  } else if (fp4) {
    payloads = {hidden_q(t), hidden_scale(t), hidden_global(t), wts};
    quantize_rows_nvfp4(hidden, payloads[0], payloads[1], payloads[2], s);
  }
  mark(2);
  res_ = a2a_->dispatch(ids, payloads, t, s);
  mark(3);
  // [n*t, H] bf16 or e4m3, or [n*t, H/2] E2M1x2
  TensorView rx_hidden = flatten01(res_.payloads[0]);
  // [n*t, H/128] or [n*t] fp32 (FP8); [n*t, H/16] e4m3 (NVFP4)
  const TensorView rx_scale = fp8 || fp4 ? flatten01(res_.payloads[1]) : TensorView{};
  if (fp4) {
    // The receiver's step: every received row (padding rows too: their experts' ids are -1,
    // and identity's combine reads only rows that were sent) to bf16 with its own global.
    const TensorView rx_global = flatten01(res_.payloads[2]);  // [n*t] fp32
    const TensorView dst = o_.identity ? flatten01(cb) : rows_of(dq_, 0, static_cast<int64_t>(n_) * t);
    dequantize_nvfp4(rx_hidden, rx_scale, rx_global, dst, s);
    rx_hidden = dst;  // [n*t, H] bf16
  }
  if (o_.identity && fp8) {
    dequantize_activations(rx_hidden, o_.dtype, rx_scale, flatten01(cb), s);
  } else if (o_.identity && fp4) {
    // the dequantized rows are already in the combine buffer
  } else if (o_.identity) {
    MODMOE_CUDA_CHECK(cudaMemcpyAsync(cb.data, rx_hidden.data, cb.nbytes(), cudaMemcpyDeviceToDevice, s));
  } else {
    const int64_t rows = static_cast<int64_t>(n_) * t;
    const size_t need = experts_workspace_size(experts_desc(preset_, *mine_, map_, rows));
    MODMOE_CHECK(need <= ws_bytes_, "EpLayer::run: experts workspace ", need, " > ", ws_bytes_);
    ExpertsInputs ein;
    ein.hidden = rx_hidden;
    ein.hidden_scale = fp8 ? rx_scale : TensorView{};
    ein.topk_ids = flatten01(res_.topk_ids);
    ein.topk_weights = flatten01(res_.payloads.back());
    ExpertsOutputs eout;
    eout.out = flatten01(cb);
    experts(ein, mine_->weights, map_, mine_->options, eout, Workspace{ws_buf_.view().data, ws_bytes_}, s);
  }
  mark(4);
  a2a_->combine(cb, out, t, s);
  mark(5);
}

FusedReference::FusedReference(const Preset& preset, Device dev, uint64_t seed, QuantScheme dtype)
    : preset_(preset), dev_(dev), all_(ExpertMap::single(preset.num_experts)), full_(preset, all_, dev, seed, false, dtype) {
  MODMOE_CUDA_CHECK(cudaDeviceSynchronize());  // the fills ran on the legacy stream
}

size_t FusedReference::bytes_needed(const Layer& slice, int64_t num_tokens) {
  const Preset& p = slice.preset;
  size_t w = 0;
  for (const Buffer* b : {&slice.w13, &slice.w2, &slice.w13_bias, &slice.w2_bias, &slice.w13_scale, &slice.w2_scale,
                          &slice.w13_global, &slice.w2_global}) {
    if (b->view().data) w += b->view().nbytes();
  }
  const int local = std::max(1, slice.map.num_local_experts);
  const size_t weights = w / static_cast<size_t>(local) * static_cast<size_t>(p.num_experts);
  const size_t ws = fused_moe_workspace_size(num_tokens, slice.weights, p.routing, ExpertMap::single(p.num_experts),
                                             slice.options);
  // hidden in and out bf16, ids and weights; NVFP4: + its quantized and dequantized copy
  const size_t nvfp4_copy = slice.scheme == QuantScheme::Nvfp4 ? static_cast<size_t>(p.hidden) * 2 + p.hidden / 2 + p.hidden / 16 + 4 : 0;
  const size_t io = static_cast<size_t>(num_tokens) * (static_cast<size_t>(p.hidden) * 2 + static_cast<size_t>(p.top_k) * 8 + nvfp4_copy);
  return weights + ws + io;
}

void FusedReference::run(const Batch& batch, cudaStream_t s) {
  const int64_t t = batch.hidden.view().size(0);
  const int64_t h = preset_.hidden, k = preset_.top_k;
  if (t > cap_) {  // grow the buffers (never inside a capture: the first call of a size is eager)
    cap_ = t;
    out_ = Buffer(DType::BF16, {t, h}, dev_);
    ids_ = Buffer(DType::I32, {t, k}, dev_);
    wts_ = Buffer(DType::F32, {t, k}, dev_);
    ws_bytes_ = fused_moe_workspace_size(t, full_.weights, preset_.routing, all_, full_.options);
    ws_buf_ = Buffer(DType::U8, {static_cast<int64_t>(ws_bytes_) + 256}, dev_);
    if (full_.scheme == QuantScheme::Nvfp4) {
      q_ = Buffer(DType::E2M1x2, {t, h / 2}, dev_);
      qs_ = Buffer(DType::E4M3, {t, h / kNvfp4BlockSize}, dev_);
      qg_ = Buffer(DType::F32, {t}, dev_);
      dq_ = Buffer(DType::BF16, {t, h}, dev_);
    }
  }
  cur_ = t;
  TensorView hidden = batch.hidden;
  if (full_.scheme == QuantScheme::Nvfp4) {  // the rows the EP layer's experts get
    const TensorView q = rows_of(q_, 0, t), qs = rows_of(qs_, 0, t), qg = rows_of(qg_, 0, t);
    hidden = rows_of(dq_, 0, t);
    quantize_rows_nvfp4(batch.hidden, q, qs, qg, s);
    dequantize_nvfp4(q, qs, qg, hidden, s);
  }
  fused_moe(batch.logits, full_.route_bias, hidden, full_.weights, preset_.routing, all_, full_.options,
            out(), Workspace{ws_buf_.view().data, ws_bytes_}, s, ids(), weights());
}

TensorView FusedReference::out() const { return rows_of(out_, 0, cur_); }
TensorView FusedReference::ids() const { return rows_of(ids_, 0, cur_); }
TensorView FusedReference::weights() const { return rows_of(wts_, 0, cur_); }

double rel_l2_bf16(const TensorView& got, const TensorView& want) {
  const HostTensor g = to_host(got), w = to_host(want);
  MODMOE_CHECK(g.numel() == w.numel(), "rel_l2_bf16: sizes differ");
  double e2 = 0, r2 = 0;
  for (int64_t i = 0; i < g.numel(); ++i) {
    const double a = bf16_bits_to_float(g.data<uint16_t>()[i]), b = bf16_bits_to_float(w.data<uint16_t>()[i]);
    e2 += (a - b) * (a - b);
    r2 += b * b;
  }
  return r2 > 0 ? std::sqrt(e2 / r2) : std::sqrt(e2);
}

}  // namespace modmoe::app
#endif
