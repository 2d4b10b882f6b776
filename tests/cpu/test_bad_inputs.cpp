// Every entry point of the experts stage rejects bad arguments with a modmoe::Error whose
// message names the argument and what was expected (docs/contract.md, "Errors").
#include <gtest/gtest.h>

#include "common/test_util.h"

#include <cstring>
#include <string>
#include <vector>

#include "cpu/experts_problem.h"

namespace modmoe {
namespace {

using test::make_problem;
using test::Problem;
using test::ProblemSpec;


// A valid call (M = 24, H = 128, I = 64, E = 8, k = 2) that each test breaks in one place.
class BadInputs : public ::testing::Test {
 protected:
  void SetUp() override {
    p = make_problem(ProblemSpec{}, 2000);
    in = p.inputs();
    w = p.weights();
    map = p.spec.map;
    opt = p.options();
    out_buf.reset(DType::BF16, {24, 128});
    out.out = out_buf;
  }
  void run() { experts(in, w, map, opt, out); }
  // The unfinalized outputs, all present.
  void use_unfinalized() {
    opt.do_finalize = false;
    g2_buf.reset(DType::BF16, {48, 128});
    ew_buf.reset(DType::F32, {24, 2});
    e2p_buf.reset(DType::I32, {24, 2});
    off_buf.reset(DType::I64, {9});
    out = {};
    out.gemm2_out = g2_buf;
    out.expert_weights = ew_buf;
    out.expanded_idx_to_permuted_idx = e2p_buf;
    out.expert_first_token_offset = off_buf;
  }

  Problem p;
  ExpertsInputs in;
  ExpertWeights w;
  ExpertMap map;
  ExpertsOptions opt;
  ExpertsOutputs out;
  HostTensor out_buf, g2_buf, ew_buf, e2p_buf, off_buf, extra;
};

TEST_F(BadInputs, ValidCallPasses) { EXPECT_NO_THROW(run()); }

// ---- experts: inputs ----

TEST_F(BadInputs, HiddenDtype) {
  extra.reset(DType::F32, {24, 128});
  in.hidden = extra;
  EXPECT_MODMOE_ERROR(run(), "'hidden'", "f32", "expected bf16");
}

TEST_F(BadInputs, HiddenWidth) {
  extra.reset(DType::BF16, {24, 192});
  in.hidden = extra;
  EXPECT_MODMOE_ERROR(run(), "'hidden'", "[24, 192]", "expected [M, 128]");
}

TEST_F(BadInputs, HiddenNotContiguous) {
  extra.reset(DType::BF16, {24, 256});
  in.hidden = make_view(extra.view().data, DType::BF16, {24, 128});
  in.hidden.strides[0] = 256;
  EXPECT_MODMOE_ERROR(run(), "'hidden'", "not contiguous");
}

TEST_F(BadInputs, HiddenMisaligned) {
  extra.reset(DType::BF16, {24 * 128 + 8});
  in.hidden = make_view(extra.data<uint16_t>() + 1, DType::BF16, {24, 128});
  EXPECT_MODMOE_ERROR(run(), "'hidden'", "16-byte aligned");
}

TEST_F(BadInputs, TensorOnAnotherDevice) {
  in.topk_ids.device = Device::cuda(0);
  EXPECT_MODMOE_ERROR(run(), "'topk_ids'", "cuda:0", "expected cpu");
}

TEST_F(BadInputs, TopkIdsDtype) {
  in.topk_ids = p.wts;
  EXPECT_MODMOE_ERROR(run(), "'topk_ids'", "f32", "expected i32");
}

TEST_F(BadInputs, TopkIdsRows) {
  extra.reset(DType::I32, {23, 2});
  in.topk_ids = extra;
  EXPECT_MODMOE_ERROR(run(), "'topk_ids'", "[23, 2]", "M = 24");
}

TEST_F(BadInputs, TopKAboveNumExperts) {
  extra.reset(DType::I32, {24, 9});
  in.topk_ids = extra;
  in.topk_weights = {};
  EXPECT_MODMOE_ERROR(run(), "'topk_ids'", "top_k", "num_experts = 8");
}

TEST_F(BadInputs, TopkWeightsShape) {
  extra.reset(DType::F32, {24, 3});
  in.topk_weights = extra;
  EXPECT_MODMOE_ERROR(run(), "'topk_weights'", "[24, 3]", "expected [24, 2]");
}

TEST_F(BadInputs, PackedNeedsSixteenBitIds) {
  map = ExpertMap::for_rank(40000, 10000, 0);  // E_local = 4
  extra.reset(DType::BF16, {4, 128, 64});
  HostTensor w13(DType::BF16, {4, 128, 128});
  w.w13 = w13;
  w.w2 = extra;
  in.topk_weights = {};
  EXPECT_MODMOE_ERROR(run(), "'topk_ids'", "packed", "num_experts <= 32767");
}

TEST_F(BadInputs, RouterWeightOnInputNeedsTopOne) {
  opt.apply_router_weight_on_input = true;
  EXPECT_MODMOE_ERROR(run(), "apply_router_weight_on_input", "top_k = 2", "expected top_k = 1");
}

TEST_F(BadInputs, LoraDeltaShape) {
  extra.reset(DType::BF16, {24, 2, 64});
  in.gemm1_lora_delta = extra;
  EXPECT_MODMOE_ERROR(run(), "'gemm1_lora_delta'", "[24, 2, 64]", "expected [24, 2, 128]");
}

// ---- experts: weights and sizes ----

TEST_F(BadInputs, WeightsExpertCount) {
  map = ExpertMap::for_rank(8, 2, 1);
  EXPECT_MODMOE_ERROR(run(), "'weights.w2'", "E_local = 8", "num_local_experts = 4");
}

TEST_F(BadInputs, GatedWeightsWithRelu2) {
  opt.activation.kind = Activation::Relu2;
  EXPECT_MODMOE_ERROR(run(), "'weights.w13'", "[8, 128, 128]", "expected [E_local, I, H]",
                      "[8, 64, 128]", "relu2");
}

TEST_F(BadInputs, IntermediateNotMultipleOf64) {
  HostTensor w13(DType::BF16, {8, 192, 128});
  extra.reset(DType::BF16, {8, 128, 96});
  w.w13 = w13;
  w.w2 = extra;
  EXPECT_MODMOE_ERROR(run(), "intermediate", "96", "expected a multiple of 64");
}

TEST_F(BadInputs, HiddenNotMultipleOf64) {
  HostTensor w13(DType::BF16, {8, 128, 96});
  HostTensor w2(DType::BF16, {8, 96, 64});
  extra.reset(DType::BF16, {24, 96});
  w.w13 = w13;
  w.w2 = w2;
  in.hidden = extra;
  out_buf.reset(DType::BF16, {24, 96});
  out.out = out_buf;
  EXPECT_MODMOE_ERROR(run(), "'hidden' = 96", "expected a multiple of 64");
}

TEST_F(BadInputs, QuantSchemeNotSupported) {
  w.scheme = QuantScheme::Mxfp8;
  EXPECT_MODMOE_ERROR(run(), "not supported yet", "quant scheme mxfp8 on cpu");
}

TEST_F(BadInputs, Nvfp4SchemeWithBf16Weights) {
  // Nvfp4 routes to the NVFP4 checks (tests/cpu/test_nvfp4_api.cpp), which name the bf16
  // weights as the wrong dtype.
  w.scheme = QuantScheme::Nvfp4;
  EXPECT_MODMOE_ERROR(run(), "'weights.w2' has dtype bf16", "expected e2m1x2");
}

TEST_F(BadInputs, Fp8SchemeWithBf16Tensors) {
  // An FP8 scheme routes to the FP8 checks, which name the bf16 hidden states first.
  w.scheme = QuantScheme::Fp8Block128;
  EXPECT_MODMOE_ERROR(run(), "'hidden' has dtype bf16 with FP8 weights",
                      "quant scheme fp8-block", "expected e4m3");
}

TEST_F(BadInputs, InterleaveRowsNotMultipleOf8) {
  w.layout = WeightLayout::GateUpInterleaved;
  w.interleave_rows = 12;
  EXPECT_MODMOE_ERROR(run(), "'weights.interleave_rows' = 12", "multiple of 8",
                      "intermediate = 64");
}

TEST_F(BadInputs, Bias13Shape) {
  extra.reset(DType::F32, {8, 64});
  w.w13_bias = extra;
  EXPECT_MODMOE_ERROR(run(), "'weights.w13_bias'", "[8, 64]", "expected [8, 128]");
}

TEST_F(BadInputs, PerExpertAlphaWithoutSwigluOai) {
  extra.reset(DType::F32, {8});
  opt.activation.alpha_per_expert = extra;
  EXPECT_MODMOE_ERROR(run(), "'options.activation.alpha_per_expert'", "swiglu",
                      "only with swiglu_oai");
}

// ---- experts: outputs and modes ----

TEST_F(BadInputs, FinalizedNeedsOut) {
  out = {};
  EXPECT_MODMOE_ERROR(run(), "'out' is missing");
}

TEST_F(BadInputs, OutShape) {
  extra.reset(DType::BF16, {24, 64});
  out.out = extra;
  EXPECT_MODMOE_ERROR(run(), "'out'", "[24, 64]", "expected [24, 128]");
}

TEST_F(BadInputs, UnfinalizedNeedsGemm2Out) {
  use_unfinalized();
  out.gemm2_out = {};
  EXPECT_MODMOE_ERROR(run(), "'gemm2_out' is missing");
}

TEST_F(BadInputs, UnfinalizedGemm2OutShape) {
  use_unfinalized();
  extra.reset(DType::BF16, {24, 128});
  out.gemm2_out = extra;
  EXPECT_MODMOE_ERROR(run(), "'gemm2_out'", "[24, 128]", "expected [48, 128]");
}

TEST_F(BadInputs, UnfinalizedOffsetsDtype) {
  use_unfinalized();
  extra.reset(DType::I32, {9});
  out.expert_first_token_offset = extra;
  EXPECT_MODMOE_ERROR(run(), "'expert_first_token_offset'", "i32", "expected i64");
}

TEST_F(BadInputs, BatchedWithFinalize) {
  extra.reset(DType::BF16, {8, 4, 128});
  HostTensor counts(DType::I32, {8});
  in = {};
  in.hidden = extra;
  in.expert_num_tokens = counts;
  EXPECT_MODMOE_ERROR(run(), "not supported yet", "do_finalize = true", "batched");
}

TEST_F(BadInputs, BatchedWithTopkIds) {
  extra.reset(DType::BF16, {8, 4, 128});
  HostTensor counts(DType::I32, {8}), g2(DType::BF16, {8, 4, 128});
  in.hidden = extra;
  in.expert_num_tokens = counts;
  in.topk_weights = {};
  opt.do_finalize = false;
  out = {};
  out.gemm2_out = g2;
  EXPECT_MODMOE_ERROR(run(), "'topk_ids'", "expected it undefined", "batched");
}

TEST_F(BadInputs, BatchedCountAboveMaxM) {
  extra.reset(DType::BF16, {8, 4, 128});
  HostTensor counts(DType::I32, {8}), g2(DType::BF16, {8, 4, 128});
  counts.data<int32_t>()[3] = 5;
  in = {};
  in.hidden = extra;
  in.expert_num_tokens = counts;
  opt.do_finalize = false;
  out = {};
  out.gemm2_out = g2;
  EXPECT_MODMOE_ERROR(run(), "'expert_num_tokens'[3] = 5", "max_m = 4");
}

#ifndef MODMOE_WITH_CUDA
TEST_F(BadInputs, CudaTensorsWithoutCudaBackend) {
  for (TensorView* t : {&in.hidden, &in.topk_ids, &in.topk_weights, &w.w13, &w.w2, &out.out}) {
    t->device = Device::cuda(0);
  }
  EXPECT_MODMOE_ERROR(run(), "cuda:0", "no CUDA backend");
}
#endif

TEST_F(BadInputs, WorkspaceSizeOfBadDesc) {
  ExpertsDesc desc;
  desc.num_tokens = 16;
  desc.hidden = 128;
  desc.intermediate = 100;
  desc.top_k = 2;
  desc.expert_map = ExpertMap::single(8);
  EXPECT_MODMOE_ERROR(experts_workspace_size(desc), "'intermediate' = 100",
                      "expected a multiple of 64");
}

// ---- ExpertMap ----

TEST(BadExpertMap, UnevenSplit) {
  EXPECT_MODMOE_ERROR(ExpertMap::for_rank(10, 4, 0), "'num_experts' = 10",
                      "multiple of ep_size = 4");
}

TEST(BadExpertMap, RankOutOfRange) {
  EXPECT_MODMOE_ERROR(ExpertMap::for_rank(8, 2, 2), "'ep_rank' = 2", "[0, ep_size = 2)");
}

TEST(BadExpertMap, SliceBeyondNumExperts) {
  const ExpertMap map{8, 6, 4};
  EXPECT_MODMOE_ERROR(map.validate(), "local_expert_offset (6)", "= 10",
                      "expected <= num_experts = 8");
}

TEST(BadExpertMap, OffsetNegative) {
  const ExpertMap map{8, -1, 4};
  EXPECT_MODMOE_ERROR(map.validate(), "'expert_map.local_expert_offset' = -1",
                      "[0, num_experts = 8)");
}

// ---- permute ----

TEST(BadPermute, OffsetsSize) {
  HostTensor ids(DType::I32, {4, 2}), off(DType::I64, {8}), e2p(DType::I32, {4, 2}),
      p2e(DType::I32, {8});
  EXPECT_MODMOE_ERROR(permute(ids, false, ExpertMap::single(8), {off, e2p, p2e}),
                      "'expert_first_token_offset'", "[8]", "expected [9]");
}

TEST(BadPermute, IdsDtype) {
  HostTensor ids(DType::I64, {4, 2}), off(DType::I64, {9}), e2p(DType::I32, {4, 2}),
      p2e(DType::I32, {8});
  EXPECT_MODMOE_ERROR(permute(ids, false, ExpertMap::single(8), {off, e2p, p2e}),
                      "'topk_ids'", "i64", "expected i32");
}

TEST(BadPermute, MissingInverse) {
  HostTensor ids(DType::I32, {4, 2}), off(DType::I64, {9}), e2p(DType::I32, {4, 2});
  EXPECT_MODMOE_ERROR(permute(ids, false, ExpertMap::single(8), {off, e2p, {}}),
                      "'permuted_idx_to_expanded_idx' is missing");
}

// ---- finalize ----

TEST(BadFinalize, WeightsRows) {
  HostTensor g2(DType::BF16, {8, 64}), ew(DType::F32, {3, 2}), e2p(DType::I32, {4, 2}),
      out(DType::BF16, {4, 64});
  EXPECT_MODMOE_ERROR(finalize(g2, ew, e2p, out), "'expert_weights'", "[3, 2]", "M = 4");
}

TEST(BadFinalize, OutWidth) {
  HostTensor g2(DType::BF16, {8, 64}), ew(DType::F32, {4, 2}), e2p(DType::I32, {4, 2}),
      out(DType::BF16, {4, 128});
  EXPECT_MODMOE_ERROR(finalize(g2, ew, e2p, out), "'out'", "[4, 128]", "expected [M, 64]");
}

TEST(BadFinalize, IndexShape) {
  HostTensor g2(DType::BF16, {8, 64}), ew(DType::F32, {4, 2}), e2p(DType::I32, {4, 3}),
      out(DType::BF16, {4, 64});
  EXPECT_MODMOE_ERROR(finalize(g2, ew, e2p, out), "'expanded_idx_to_permuted_idx'", "[4, 3]",
                      "expected [4, 2]");
}

// ---- prepare_weights ----

class BadPrepare : public BadInputs {
 protected:
  void SetUp() override {
    BadInputs::SetUp();
    d13.reset(DType::BF16, {8, 128, 128});
    d2.reset(DType::BF16, {8, 128, 64});
    dst.w13 = d13;
    dst.w2 = d2;
  }
  void prepare() { prepare_weights(w, dst, popt); }
  HostTensor d13, d2;
  ExpertWeights dst;
  PrepareWeightsOptions popt;
};

TEST_F(BadPrepare, ValidCallPasses) { EXPECT_NO_THROW(prepare()); }

TEST_F(BadPrepare, DstShape) {
  extra.reset(DType::BF16, {8, 64, 128});
  dst.w13 = extra;
  EXPECT_MODMOE_ERROR(prepare(), "'dst.w13'", "[8, 64, 128]", "expected [8, 128, 128]");
}

TEST_F(BadPrepare, DstOverlapsSrc) {
  dst.w13 = w.w13;
  EXPECT_MODMOE_ERROR(prepare(), "'dst.w13' overlaps src.w13", "separate memory");
}

TEST_F(BadPrepare, SrcAlreadyPrepared) {
  w.layout = WeightLayout::GateUpInterleaved;
  w.interleave_rows = 8;
  EXPECT_MODMOE_ERROR(prepare(), "'src.layout'", "expected Canonical");
}

TEST_F(BadPrepare, InterleaveRowsDoesNotDivide) {
  popt.interleave_rows = 48;
  EXPECT_MODMOE_ERROR(prepare(), "'options.interleave_rows' = 48", "divides intermediate = 64");
}

TEST_F(BadPrepare, MissingDstBias) {
  extra.reset(DType::F32, {8, 128});
  w.w13_bias = extra;
  EXPECT_MODMOE_ERROR(prepare(), "'dst.w13_bias' is missing");
}

TEST_F(BadPrepare, QuantScheme) {
  w.scheme = QuantScheme::Mxfp8;
  EXPECT_MODMOE_ERROR(prepare(), "not supported yet", "quant scheme mxfp8");
  // NVFP4 is prepared (tests/cpu/test_nvfp4.cpp): bf16 tensors are named as the wrong dtype.
  w.scheme = QuantScheme::Nvfp4;
  EXPECT_MODMOE_ERROR(prepare(), "'src.w2' has dtype bf16", "expected e2m1x2");
}

// ---- fused_moe ----

class BadFused : public BadInputs {
 protected:
  void SetUp() override {
    BadInputs::SetUp();
    logits.reset(DType::F32, {24, 8});
    std::mt19937_64 rng(test::seed(2100));
    test::fill_normal(logits, rng, 1.0f);
    rp.method = RoutingMethod::Renormalize;
    rp.num_experts = 8;
    rp.top_k = 2;
  }
  void fused(const Workspace& ws = {}) {
    fused_moe(logits, {}, p.hidden, w, rp, map, opt, out_buf, ws);
  }
  HostTensor logits;
  RoutingParams rp;
};

TEST_F(BadFused, ValidCallPasses) { EXPECT_NO_THROW(fused()); }

TEST_F(BadFused, NeedsFinalize) {
  opt.do_finalize = false;
  EXPECT_MODMOE_ERROR(fused(), "'options.do_finalize' = false", "expected true");
}

TEST_F(BadFused, LogitsShape) {
  extra.reset(DType::F32, {24, 7});
  logits = std::move(extra);
  EXPECT_MODMOE_ERROR(fused(), "'logits'", "[24, 7]", "expected [T, E] = [24, 8]");
}

TEST_F(BadFused, RoutingExpertsDiffer) {
  map = ExpertMap::single(16);
  EXPECT_MODMOE_ERROR(fused(), "'routing.num_experts' = 8", "expert_map.num_experts = 16");
}

TEST_F(BadFused, WorkspaceTooSmall) {
  const size_t need = fused_moe_workspace_size(24, w, rp, map, opt);
  extra.reset(DType::U8, {static_cast<int64_t>(need)});
  const std::string have = "has " + std::to_string(need - 1) + " bytes";
  const std::string want = "expected at least " + std::to_string(need) + " bytes";
  EXPECT_MODMOE_ERROR(fused({extra.view().data, need - 1}), "'workspace'", have.c_str(),
                      want.c_str());
}

TEST_F(BadFused, NothingRunsBeforeValidation) {
  // A bad experts argument is reported before route() writes the caller's topk views.
  HostTensor ids(DType::I32, {24, 2}), wts(DType::F32, {24, 2});
  test::poison(ids);
  test::poison(wts);
  extra.reset(DType::BF16, {24, 64});
  EXPECT_MODMOE_ERROR(fused_moe(logits, {}, p.hidden, w, rp, map, opt, extra, {}, nullptr, ids,
                                wts),
                      "'out'", "expected [24, 128]");
  for (int64_t x = 0; x < ids.numel(); ++x) ASSERT_EQ(ids.data<int32_t>()[x], -1);
}

}  // namespace
}  // namespace modmoe
