#include "reference/ep_sim.h"

#include <algorithm>
#include <cstring>

#include "modmoe/error.h"
#include "modmoe/quant.h"

namespace modmoe::reference {
namespace {

// A view of rows [first, first + count) along dimension 0.
TensorView rows(const TensorView& t, int64_t first, int64_t count) {
  TensorView v = t;
  v.data = static_cast<char*>(t.data) + first * t.strides[0] * static_cast<int64_t>(dtype_bytes(t.dtype));
  v.shape[0] = count;
  return v;
}

}  // namespace

ExpertWeights slice_experts(const ExpertWeights& w, int64_t first, int64_t count) {
  ExpertWeights s = w;
  for (TensorView* t : {&s.w13, &s.w2, &s.w13_bias, &s.w2_bias, &s.w13_scale, &s.w2_scale,
                        &s.w13_global_scale, &s.w2_global_scale}) {
    if (t->defined()) *t = rows(*t, first, count);
  }
  return s;
}

int64_t ep_scales_per_token(QuantScheme scheme, int64_t hidden) {
  switch (scheme) {
    case QuantScheme::None: return 0;
    case QuantScheme::Fp8Block128: return hidden / kFp8BlockSize;
    case QuantScheme::Fp8PerTensor: return 1;
    case QuantScheme::Nvfp4: return hidden / kNvfp4BlockSize;
    default: break;
  }
  MODMOE_NOT_SUPPORTED("quantize before dispatch with quant scheme ", quant_scheme_name(scheme),
                       ": expected none (bf16), fp8-block, fp8-tensor or nvfp4");
}

size_t ep_payload_bytes_per_token(QuantScheme scheme, int64_t hidden, int top_k) {
  const size_t h = static_cast<size_t>(hidden), k = static_cast<size_t>(top_k);
  const size_t scales = static_cast<size_t>(ep_scales_per_token(scheme, hidden));
  switch (scheme) {
    case QuantScheme::None: return 2 * h + 4 * k;
    // packed e2m1 H/2, e4m3 block scales 1 byte each, the token's fp32 global
    case QuantScheme::Nvfp4: return h / 2 + scales + 4 + 4 * k;
    default: return h + 4 * scales + 4 * k;  // e4m3 H, fp32 scales
  }
}

EpQuantized ep_quantize(const TensorView& hidden, QuantScheme scheme) {
  MODMOE_CHECK(scheme == QuantScheme::Fp8Block128 || scheme == QuantScheme::Fp8PerTensor ||
                   scheme == QuantScheme::Nvfp4,
               "ep_quantize: quant scheme ", quant_scheme_name(scheme),
               ": expected fp8-block, fp8-tensor or nvfp4 (bf16 tokens are dispatched as they are)");
  MODMOE_CHECK(hidden.ndim == 2, "argument 'hidden' has shape ", hidden.shape_string(),
               ": expected [T, H]");
  const int64_t t = hidden.size(0), h = hidden.size(1);
  EpQuantized out;
  if (scheme == QuantScheme::Nvfp4) {
    out.hidden.reset(DType::E2M1x2, {t, h / 2});
    out.hidden_scale.reset(DType::E4M3, {t, h / kNvfp4BlockSize});
    out.hidden_global.reset(DType::F32, {t});
    // One global per row: each token quantized as a tensor of its own (docs/nvfp4.md).
    modmoe::quantize_nvfp4(hidden, out.hidden, out.hidden_scale, out.hidden_global);
    return out;
  }
  out.hidden.reset(DType::E4M3, {t, h});
  if (scheme == QuantScheme::Fp8Block128) {
    out.hidden_scale.reset(DType::F32, {t, h / kFp8BlockSize});
  } else {
    out.hidden_scale.reset(DType::F32, {t});
  }
  modmoe::quantize_activations(hidden, scheme, out.hidden, out.hidden_scale);
  return out;
}

EpPlan ep_plan(const std::vector<EpRankTokens>& ranks, int num_experts, int ep_size, int max_tokens) {
  MODMOE_CHECK(ep_size >= 1 && static_cast<int>(ranks.size()) == ep_size, "ep_plan: ",
               ranks.size(), " ranks given: expected ep_size = ", ep_size);
  MODMOE_CHECK(num_experts % ep_size == 0, "argument 'num_experts' = ", num_experts,
               ": expected a multiple of ep_size (", ep_size, ")");
  EpPlan p;
  p.ep_size = ep_size;
  p.num_experts = num_experts;
  p.max_tokens = max_tokens;
  p.sent.assign(ep_size, std::vector<std::vector<int>>(ep_size));
  p.slot.assign(ep_size, std::vector<std::vector<int>>(ep_size));
  for (int s = 0; s < ep_size; ++s) {
    const TensorView& ids = ranks[s].topk_ids;
    const int64_t t_count = ids.size(0), k = ids.size(1);
    for (int r = 0; r < ep_size; ++r) p.slot[s][r].assign(static_cast<size_t>(t_count), -1);
    for (int64_t t = 0; t < t_count; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int id = ids.ptr<int32_t>()[t * k + j];
        if (id < 0 || id >= num_experts) continue;  // padding or invalid ids go nowhere
        const int r = p.owner(id);
        if (p.slot[s][r][t] >= 0) continue;  // once per distinct rank
        p.slot[s][r][t] = static_cast<int>(p.sent[s][r].size());
        p.sent[s][r].push_back(static_cast<int>(t));
      }
    }
    for (int r = 0; r < ep_size; ++r) {
      MODMOE_CHECK(static_cast<int>(p.sent[s][r].size()) <= max_tokens, "all-to-all overflow: rank ",
                   s, " sends ", p.sent[s][r].size(), " tokens to rank ", r,
                   ": expected at most max_tokens = ", max_tokens);
    }
  }
  return p;
}

std::vector<EpReceived> ep_dispatch(const EpPlan& plan, const std::vector<EpRankTokens>& ranks) {
  const int ep = plan.ep_size;
  const TensorView& first = ranks[0].hidden;
  const int64_t h = first.size(1), k = ranks[0].topk_ids.size(1), m = plan.max_tokens;
  const int64_t row = h * static_cast<int64_t>(dtype_bytes(first.dtype));  // hidden row bytes
  // Scales per token: [T, S] or [T] (S = 1); 0 without scales. Their dtype: fp32 (FP8) or
  // e4m3 (NVFP4 block scales).
  const TensorView& first_scale = ranks[0].hidden_scale;
  const int64_t sc = !first_scale.defined() ? 0 : first_scale.ndim == 1 ? 1 : first_scale.size(1);
  const DType sc_dtype = first_scale.defined() ? first_scale.dtype : DType::F32;
  const int64_t sc_row = sc * static_cast<int64_t>(dtype_bytes(sc_dtype));  // scale row bytes
  const bool global = ranks[0].hidden_global.defined();  // NVFP4: one fp32 global per token
  for (int s = 0; s < ep; ++s) {
    MODMOE_CHECK(ranks[s].hidden.dtype == first.dtype && ranks[s].hidden_scale.defined() == (sc > 0) &&
                     ranks[s].hidden_global.defined() == global,
                 "ep_dispatch: rank ", s, " has hidden of dtype ", dtype_name(ranks[s].hidden.dtype),
                 (ranks[s].hidden_scale.defined() ? " with" : " without"), " scales",
                 (ranks[s].hidden_global.defined() ? " and per-token globals" : ""), ": expected ",
                 dtype_name(first.dtype), (sc > 0 ? " with" : " without"), " scales",
                 (global ? " and per-token globals" : ""),
                 ", as rank 0 (every rank dispatches the same payloads)");
  }
  std::vector<EpReceived> out(static_cast<size_t>(ep));
  for (int r = 0; r < ep; ++r) {
    EpReceived& rx = out[r];
    rx.hidden.reset(first.dtype, {ep, m, h});
    if (sc > 0) {
      rx.hidden_scale.reset(sc_dtype, first_scale.ndim == 1 ? std::vector<int64_t>{ep, m}
                                                            : std::vector<int64_t>{ep, m, sc});
    }
    if (global) rx.hidden_global.reset(DType::F32, {ep, m});
    rx.topk_ids.reset(DType::I32, {ep, m, k});
    rx.topk_weights.reset(DType::F32, {ep, m, k});
    std::fill_n(rx.topk_ids.data<int32_t>(), rx.topk_ids.numel(), -1);
    rx.recv_counts.assign(static_cast<size_t>(ep), 0);
    for (int s = 0; s < ep; ++s) {
      const auto& list = plan.sent[s][r];
      rx.recv_counts[s] = static_cast<int>(list.size());
      for (size_t i = 0; i < list.size(); ++i) {
        const int64_t t = list[i], dst = s * m + static_cast<int64_t>(i);
        std::memcpy(rx.hidden.data<uint8_t>() + dst * row, ranks[s].hidden.ptr<uint8_t>() + t * row, row);
        if (sc > 0) {
          std::memcpy(rx.hidden_scale.data<uint8_t>() + dst * sc_row,
                      ranks[s].hidden_scale.ptr<uint8_t>() + t * sc_row, sc_row);
        }
        if (global) rx.hidden_global.data<float>()[dst] = ranks[s].hidden_global.ptr<float>()[t];
        std::memcpy(rx.topk_ids.data<int32_t>() + dst * k, ranks[s].topk_ids.ptr<int32_t>() + t * k, k * 4);
        std::memcpy(rx.topk_weights.data<float>() + dst * k, ranks[s].topk_weights.ptr<float>() + t * k, k * 4);
      }
    }
  }
  return out;
}

HostTensor ep_dequantize_received(const EpReceived& rx) {
  MODMOE_CHECK(rx.hidden.view().dtype == DType::E2M1x2 && rx.hidden_scale.view().defined() &&
                   rx.hidden_global.view().defined(),
               "ep_dequantize_received: expected an NVFP4 dispatch (E2M1x2 rows, e4m3 block scales, "
               "per-token globals), got ", dtype_name(rx.hidden.view().dtype), " rows");
  const TensorView& q = rx.hidden.view();
  const int64_t rows = q.size(0) * q.size(1), bytes = q.size(2);
  HostTensor out(DType::BF16, {rows, 2 * bytes});
  const TensorView& s = rx.hidden_scale.view();
  modmoe::dequantize_nvfp4(make_view(q.data, DType::E2M1x2, {rows, bytes}),
                           make_view(s.data, DType::E4M3, {rows, s.size(2)}),
                           make_view(rx.hidden_global.view().data, DType::F32, {rows}), out);
  return out;
}

std::vector<HostTensor> ep_combine(const EpPlan& plan, const std::vector<EpRankTokens>& ranks,
                                   const std::vector<HostTensor>& payloads) {
  const int ep = plan.ep_size;
  const int64_t m = plan.max_tokens;
  std::vector<HostTensor> out;
  for (int s = 0; s < ep; ++s) {
    // H from the payloads: ranks[s].hidden may be the packed NVFP4 rows (H/2 bytes).
    const int64_t t_count = ranks[s].topk_ids.size(0), h = payloads[0].view().size(2);
    out.emplace_back(DType::BF16, std::vector<int64_t>{t_count, h});
    std::vector<float> acc(static_cast<size_t>(h));
    for (int64_t t = 0; t < t_count; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int r = 0; r < ep; ++r) {
        const int slot = plan.slot[s][r][t];
        if (slot < 0) continue;
        const uint16_t* row = payloads[r].data<uint16_t>() + (s * m + slot) * h;
        for (int64_t c = 0; c < h; ++c) acc[c] += bf16_bits_to_float(row[c]);
      }
      uint16_t* dst = out.back().data<uint16_t>() + t * h;
      for (int64_t c = 0; c < h; ++c) dst[c] = float_to_bf16_bits(acc[c]);
    }
  }
  return out;
}

std::vector<HostTensor> ep_moe_layer(const std::vector<EpRankTokens>& ranks,
                                     const ExpertWeights& all_weights, int num_experts,
                                     int ep_size, int max_tokens, const ExpertsOptions& options,
                                     bool identity) {
  // Quantize before dispatch, every rank its own tokens: FP8 weights take the e4m3 rows and
  // their scales; NVFP4 (W4A16) weights take bf16, so the NVFP4 rows are dequantized on arrival.
  const QuantScheme scheme = all_weights.scheme;
  const bool fp8 = scheme == QuantScheme::Fp8Block128 || scheme == QuantScheme::Fp8PerTensor;
  const bool fp4 = scheme == QuantScheme::Nvfp4;
  std::vector<EpQuantized> quantized;
  std::vector<EpRankTokens> sent = ranks;
  for (size_t r = 0; (fp8 || fp4) && r < ranks.size(); ++r) {
    quantized.push_back(ep_quantize(ranks[r].hidden, scheme));
    sent[r].hidden = quantized.back().hidden;
    sent[r].hidden_scale = quantized.back().hidden_scale;
    if (fp4) sent[r].hidden_global = quantized.back().hidden_global;
  }
  const EpPlan plan = ep_plan(sent, num_experts, ep_size, max_tokens);
  const std::vector<EpReceived> rx = ep_dispatch(plan, sent);
  const int64_t h = ranks[0].hidden.size(1), k = ranks[0].topk_ids.size(1);
  const int64_t rows_total = static_cast<int64_t>(ep_size) * max_tokens;
  std::vector<HostTensor> payloads;
  for (int r = 0; r < ep_size; ++r) {
    const ExpertMap map = ExpertMap::for_rank(num_experts, ep_size, r);
    payloads.emplace_back(DType::BF16, std::vector<int64_t>{ep_size, max_tokens, h});
    HostTensor dequantized;  // NVFP4: [ep * max, H] bf16, what the W4A16 experts read
    if (fp4) dequantized = ep_dequantize_received(rx[r]);
    ExpertsInputs in;
    in.hidden = fp4 ? dequantized.view()
                    : make_view(rx[r].hidden.view().data, rx[r].hidden.view().dtype, {rows_total, h});
    if (fp8) {  // [ep, max(, S)] -> [ep * max(, S)]
      const TensorView& sc = rx[r].hidden_scale.view();
      in.hidden_scale = sc.ndim == 2 ? make_view(sc.data, DType::F32, {rows_total})
                                     : make_view(sc.data, DType::F32, {rows_total, sc.size(2)});
    }
    // Zero copy: the experts write straight into the combine payload.
    const TensorView out_rows = make_view(payloads.back().view().data, DType::BF16, {rows_total, h});
    if (identity) {  // the experts' input rows, bf16 (dequantized for FP8 and NVFP4)
      if (fp8) {
        dequantize_activations(in.hidden, scheme, in.hidden_scale, out_rows);
      } else {
        std::memcpy(out_rows.data, in.hidden.data, out_rows.nbytes());
      }
      continue;
    }
    in.topk_ids = make_view(rx[r].topk_ids.view().data, DType::I32, {rows_total, k});
    in.topk_weights = make_view(rx[r].topk_weights.view().data, DType::F32, {rows_total, k});
    ExpertsOutputs out;
    out.out = out_rows;
    ExpertsOptions opts = options;
    opts.do_finalize = true;
    experts(in, slice_experts(all_weights, map.local_expert_offset, map.num_local_experts), map,
            opts, out);
  }
  return ep_combine(plan, ranks, payloads);
}

}  // namespace modmoe::reference
