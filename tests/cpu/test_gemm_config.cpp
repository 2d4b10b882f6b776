// The grouped GEMM's tile choice (src/cuda/gemm/grouped_gemm.cu, select_config) is a pure
// host function: it runs here without a GPU. Over a sweep of shapes, layouts and devices it
// must return compiled configs only, the same config for the same input, a split-K within what
// the workspace was sized for, and the sm90 kernel only where that kernel can run.
// Built in CUDA builds only (the function lives in the CUDA backend).
#include <gtest/gtest.h>

#ifdef MODMOE_WITH_CUDA

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "common/test_util.h"
#include "cuda/gemm/grouped_gemm.h"

namespace modmoe {
namespace {

using cuda::gemm::DeviceProps;
using cuda::gemm::GemmConfig;
using cuda::gemm::GemmDesc;
using cuda::gemm::GemmStage;

DeviceProps hopper() {
  DeviceProps p;
  p.sm_count = 132;
  p.cc_major = 9;
  p.cc_minor = 0;
  p.max_smem_per_block = 227 * 1024;
  return p;
}

DeviceProps ampere() {
  DeviceProps p;
  p.sm_count = 108;
  p.cc_major = 8;
  p.cc_minor = 0;
  p.max_smem_per_block = 163 * 1024;
  return p;
}

// The two GEMMs of the experts stage as src/cuda/experts.cu describes them.
GemmDesc gemm_desc(bool gemm1, int experts_local, int experts, int top_k, int64_t tokens,
                   int64_t hidden, int64_t inter, int64_t gate_up_group) {
  GemmDesc d;
  d.stage = gemm1 ? GemmStage::Gemm1 : GemmStage::Gemm2;
  d.num_experts = experts_local;
  d.max_rows = tokens * top_k;
  d.max_rows_per_expert = tokens * top_k;
  d.expected_rows = (tokens * top_k * experts_local + experts - 1) / experts;
  d.n = gemm1 ? inter : hidden;
  d.k = gemm1 ? hidden : inter;
  d.gated = gemm1 && gate_up_group != 0;
  d.gate_up_group = d.gated ? gate_up_group : 0;
  return d;
}

TEST(GemmConfig, SelectOnlyReturnsCompiledConfigs) {
  const auto compiled = cuda::gemm::compiled_configs();
  ASSERT_FALSE(compiled.empty());
  int checked = 0, sm90 = 0, split = 0, tail = 0;
  for (const DeviceProps& props : {hopper(), ampere()}) {
    for (int stage = 0; stage < 2; ++stage) {
      for (int64_t rows : {1, 2, 7, 16, 64, 100, 1000, 8192, 65536, 1 << 20}) {
        for (int E : {1, 8, 32, 128, 256}) {
          for (int64_t n : {64, 768, 2048, 2880, 7168, 14336}) {
            for (int64_t group : {int64_t{0}, int64_t{8}, int64_t{16}, n}) {
              for (bool aligned : {true, false}) {
                GemmDesc d;
                d.stage = stage == 0 ? GemmStage::Gemm1 : GemmStage::Gemm2;
                d.num_experts = E;
                d.max_rows = rows;
                d.max_rows_per_expert = rows;
                d.n = n;
                d.k = 2048;
                d.gated = stage == 0 && group != 0;
                d.gate_up_group = d.gated ? group : 0;
                d.aligned16 = aligned;
                d.validate();
                const GemmConfig c = cuda::gemm::select_config(d, props);
                ASSERT_TRUE(cuda::gemm::is_compiled(c))
                    << c.to_string() << " for rows " << rows << " E " << E << " n " << n;
                EXPECT_EQ(c, cuda::gemm::select_config(d, props)) << "not a pure function";
                if (c.arch == 90) {
                  ++sm90;
                  EXPECT_EQ(props.cc_major, 9) << c.to_string() << " on sm_" << props.cc_major;
                  EXPECT_TRUE(d.sm90_supported()) << c.to_string() << " group " << group;
                  EXPECT_TRUE(!d.gated || group == 8);
                }
                // Tail rows (rule 3): sm90, never with split-K, the tile's own count.
                if (c.tail_m != 0) {
                  ++tail;
                  EXPECT_EQ(c.arch, 90) << c.to_string();
                  EXPECT_EQ(c.split_k, 1) << c.to_string();
                  EXPECT_EQ(c.tail_m, cuda::gemm::sm90_tail_rows(c)) << c.to_string();
                }
                if (c.split_k > 1) {
                  ++split;
                  const auto cap = cuda::gemm::split_k_capacity(d);
                  EXPECT_LE(c.split_k, cap.max_split) << c.to_string();
                  EXPECT_EQ(c.block_m, 64) << "split-K is for the narrow tile only";
                  EXPECT_LE(d.max_rows_per_expert, 16);
                  EXPECT_LE(cap.partial_floats * 4, int64_t{32} << 20);
                }
                ++checked;
              }
            }
          }
        }
      }
    }
  }
  std::printf("checked %d descs (%d on sm90, %d split, %d tail rows); compiled:", checked, sm90,
              split, tail);
  for (const auto& c : compiled) std::printf(" %s", c.to_string().c_str());
  std::printf("\n");
  EXPECT_GT(sm90, 0);
  EXPECT_EQ(split, 0) << "split-K only through MODMOE_GEMM_SPLIT_K (select_sm90, rule 2)";
  EXPECT_GT(tail, 0);
}

// FP8 problems (desc.fp8) get the FP8 tiles (block_k 128: e4m3 k-blocks) on Hopper and only
// there; bf16 problems never do.
TEST(GemmConfig, Fp8ProblemsGetTheFp8Tiles) {
  int checked = 0, split = 0, narrow = 0, mid = 0;
  for (int stage = 0; stage < 2; ++stage) {
    for (int64_t rows : {1, 7, 16, 64, 100, 1000, 8192, 65536}) {
      for (int E : {1, 8, 32, 128, 256}) {
        for (int64_t n : {768, 2048, 2944, 7168}) {
          GemmDesc d;
          d.stage = stage == 0 ? GemmStage::Gemm1 : GemmStage::Gemm2;
          d.num_experts = E;
          d.max_rows = rows;
          d.max_rows_per_expert = rows;
          d.n = n;
          d.k = 2048;
          d.gated = stage == 0;
          d.gate_up_group = d.gated ? 8 : 0;
          d.fp8 = true;
          d.validate();
          const GemmConfig c = cuda::gemm::select_config(d, hopper());
          ASSERT_TRUE(cuda::gemm::is_compiled(c)) << c.to_string();
          EXPECT_TRUE(cuda::gemm::config_runs(d, c)) << c.to_string();
          EXPECT_EQ(c.arch, 90) << c.to_string();
          EXPECT_EQ(c.block_k, 128) << c.to_string();
          EXPECT_EQ(c.tail_m, 0) << c.to_string();
          EXPECT_LE(c.block_m, 128) << c.to_string();
          (c.block_m == 64 ? narrow : mid) += 1;
          if (c.split_k > 1) {
            ++split;
            EXPECT_EQ(c.block_m, 64);
            EXPECT_LE(d.max_rows_per_expert, 16);
            EXPECT_LE(c.split_k, cuda::gemm::split_k_capacity(d).max_split);
          }
          // The same problem in bf16 never gets an FP8 tile, and no bf16 tile runs FP8.
          GemmDesc b = d;
          b.fp8 = false;
          const GemmConfig cb = cuda::gemm::select_config(b, hopper());
          EXPECT_NE(cb.block_k, 128) << cb.to_string();
          EXPECT_FALSE(cuda::gemm::config_runs(d, cb)) << cb.to_string();
          EXPECT_FALSE(cuda::gemm::config_runs(b, c)) << c.to_string();
          ++checked;
        }
      }
    }
  }
  EXPECT_EQ(split, 0) << "FP8: split-K only through MODMOE_GEMM_SPLIT_K (select_sm90, rule 2)";
  EXPECT_GT(narrow, 0);
  EXPECT_GT(mid, 0);
  std::printf("checked %d FP8 descs (%d narrow, %d mid, %d split)\n", checked, narrow, mid, split);
  // Off Hopper, or with weights the FP8 kernels cannot read, a clear refusal.
  GemmDesc d;
  d.num_experts = 8;
  d.max_rows = d.max_rows_per_expert = 64;
  d.n = 2048;
  d.k = 2048;
  d.gated = true;
  d.gate_up_group = 8;
  d.fp8 = true;
  EXPECT_MODMOE_ERROR(cuda::gemm::select_config(d, ampere()), "not supported yet",
                      "FP8 grouped GEMM on sm_80", "sm_90 (Hopper)");
  d.gate_up_group = -1;
  EXPECT_MODMOE_ERROR(cuda::gemm::select_config(d, hopper()), "not supported yet",
                      "GateUpInterleaved with G = 8");
  d.gate_up_group = 8;
  d.k = 2000;
  EXPECT_MODMOE_ERROR(d.validate(), "FP8 with k = 2000", "multiples of 128");
}

// fp8-tensor GEMM1 with FP8 fast accumulation allowed (desc.fp8_fast_accum, ExpertsOptions::
// fp8_fast_accum) past 128 rows per group gets the 256-token fast-accumulation tile
// (select_sm90, rule 1b: no per-k-block promotion); up to 128 rows it keeps the promoted
// narrow or 128-token tile, as without the option (the default), as do its GEMM2 and every
// Fp8Block128 GEMM; the 256-token tile runs nothing else, never splits, and the flag is
// refused off FP8 GEMM1.
TEST(GemmConfig, Fp8FastAccumGemm1PrefillGetsThe256TokenTile) {
  const std::string kWide = "sm90_256x128x128_s4", kMid = "sm90_128x128x128_s6",
                    kNarrow = "sm90_64x128x128_s8";
  GemmConfig wide;
  for (const GemmConfig& c : cuda::gemm::compiled_configs()) {
    if (c.to_string() == kWide) wide = c;
  }
  ASSERT_EQ(wide.to_string(), kWide) << "the 256-token FP8 tile is compiled";
  EXPECT_TRUE(cuda::gemm::is_fp8_config(wide));
  EXPECT_EQ(cuda::gemm::sm90_tail_rows(wide), 0);
  int checked = 0, on_wide = 0;
  for (int stage = 0; stage < 2; ++stage) {
    for (bool fast : {false, true}) {
      if (fast && stage == 1) continue;  // validate() refuses it (below)
      for (int64_t rows : {1, 16, 64, 100, 128, 129, 200, 1000, 8192, 65536}) {
        for (int E : {1, 8, 32, 128}) {
          GemmDesc d;
          d.stage = stage == 0 ? GemmStage::Gemm1 : GemmStage::Gemm2;
          d.num_experts = E;
          d.max_rows = rows;
          d.max_rows_per_expert = rows;
          d.n = 2048;
          d.k = 4096;
          d.gated = stage == 0;
          d.gate_up_group = d.gated ? 8 : 0;
          d.fp8 = true;
          d.fp8_fast_accum = fast;
          d.validate();
          const GemmConfig c = cuda::gemm::select_config(d, hopper());
          ASSERT_TRUE(cuda::gemm::is_compiled(c)) << c.to_string();
          EXPECT_TRUE(cuda::gemm::config_runs(d, c)) << c.to_string();
          EXPECT_EQ(c, cuda::gemm::select_config(d, hopper())) << "not a pure function";
          // Rows per touched group as select_sm90 computes them (uniform routing).
          const double touched =
              E <= 1 ? 1.0
                     : std::max(1.0, E * (1.0 - std::exp(double(rows) * std::log1p(-1.0 / E))));
          const double per_group = double(rows) / std::min(touched, double(rows));
          const std::string want = per_group <= 64.0                    ? kNarrow
                                   : fast && per_group > 128.0 ? kWide
                                                                          : kMid;
          EXPECT_EQ(c.to_string(), want) << "rows " << rows << " E " << E << " stage " << stage
                                         << " fast " << fast;
          on_wide += c.to_string() == kWide;
          // The 256-token tile runs fast-accumulation GEMM1 only.
          EXPECT_EQ(cuda::gemm::config_runs(d, wide), fast && stage == 0) << d.max_rows;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(on_wide, 0);
  std::printf("checked %d FP8 descs, %d on the 256-token fp8-tensor tile\n", checked, on_wide);
  // Not with split-K, not for bf16.
  GemmDesc d;
  d.num_experts = 8;
  d.max_rows = d.max_rows_per_expert = 8192;
  d.n = 2048;
  d.k = 4096;
  d.gated = true;
  d.gate_up_group = 8;
  d.fp8 = true;
  d.fp8_fast_accum = true;
  GemmConfig split = wide;
  split.split_k = 2;
  EXPECT_FALSE(cuda::gemm::config_runs(d, split));
  GemmDesc b = d;
  b.fp8 = false;
  b.fp8_fast_accum = false;
  EXPECT_FALSE(cuda::gemm::config_runs(b, wide));
  EXPECT_NE(cuda::gemm::select_config(b, hopper()).block_k, 128);
  // The flag is an FP8 GEMM1 option.
  GemmDesc bad = d;
  bad.fp8 = false;
  EXPECT_MODMOE_ERROR(bad.validate(), "fp8_fast_accum", "FP8 GEMM1 option");
  bad = d;
  bad.stage = GemmStage::Gemm2;
  bad.gated = false;
  bad.gate_up_group = 0;
  EXPECT_MODMOE_ERROR(bad.validate(), "fp8_fast_accum", "FP8 GEMM1 option");
}

// NVFP4 problems (desc.nvfp4, W4A16) get the W4A16 tiles on every sm_80+ device: at decode
// sizes a 16-token one (the deep 256-K tile where its shared memory fits, else the 64-K tile),
// split-K only on the deep tile, within the capacity, and only when the expected tiles fill
// fewer than half the SMs; from 64 rows per touched group on a Hopper the wgmma tile (where
// the problem allows it and desc.allow_w4a16_wgmma), else the 64-token mma.sync tile; no other
// problem gets them, and no other tile runs NVFP4.
TEST(GemmConfig, Nvfp4ProblemsGetTheW4a16Tiles) {
  int checked = 0, decode = 0, deep = 0, split = 0, prefill = 0, wgmma = 0;
  for (const DeviceProps& props : {hopper(), ampere()}) {
    for (int stage = 0; stage < 2; ++stage) {
      for (int64_t rows : {1, 2, 7, 16, 64, 100, 1000, 8192, 65536}) {
        for (int E : {1, 2, 8, 32, 128, 256}) {
          for (int64_t n : {192, 768, 2048, 2880, 7168}) {
            for (int64_t k : {192, 1344, 2048, 14336}) {
              GemmDesc d;
              d.stage = stage == 0 ? GemmStage::Gemm1 : GemmStage::Gemm2;
              d.num_experts = E;
              d.max_rows = rows;
              d.max_rows_per_expert = rows;
              d.n = n;
              d.k = k;
              d.gated = stage == 0;
              d.gate_up_group = d.gated ? 8 : 0;
              d.nvfp4 = true;
              d.validate();
              EXPECT_FALSE(d.sm90_supported());
              const auto cap = cuda::gemm::split_k_capacity(d);
              EXPECT_LE(cap.partial_floats * 4, int64_t{8} << 20);
              EXPECT_LE(cap.max_split, cuda::gemm::max_split_k());
              if (cap.max_split > 1) {
                EXPECT_GE((k + 255) / 256, 2 * cap.max_split) << "a slice keeps >= 2 k-tiles";
            }
            const GemmConfig c = cuda::gemm::select_config(d, props);
            ASSERT_TRUE(cuda::gemm::is_compiled(c)) << c.to_string();
            EXPECT_TRUE(cuda::gemm::config_runs(d, c)) << c.to_string();
            EXPECT_TRUE(c.nvfp4) << c.to_string();
            EXPECT_EQ(c, cuda::gemm::select_config(d, props)) << "not a pure function";
            // The wgmma tile: Hopper only, >= 64 rows per touched group (E >= rows: 1).
            GemmDesc off = d;
            off.allow_w4a16_wgmma = false;
            const GemmConfig c_off = cuda::gemm::select_config(off, props);
            EXPECT_FALSE(c_off.arch == 90) << c_off.to_string();
            GemmDesc canon = d;
            canon.gate_up_group = -1;  // a gated layout other than G = 8
            if (canon.gated) {
              EXPECT_FALSE(canon.sm90_w4a16_supported());
              EXPECT_EQ(cuda::gemm::select_config(canon, props).arch, 80);
            }
            GemmDesc sm80 = d;
            sm80.allow_sm90 = false;  // MODMOE_GEMM_CONFIG=sm80
            EXPECT_EQ(cuda::gemm::select_config(sm80, props).arch, 80);
            if (c.arch == 90) {
              ++wgmma;
              EXPECT_EQ(c.to_string().rfind("w4a16_wgmma_256x128x64_s5", 0), 0u) << c.to_string();
              EXPECT_EQ(props.cc_major, 9);
              EXPECT_GE(rows, 64);
              EXPECT_TRUE(d.sm90_w4a16_supported());
              EXPECT_EQ(c.split_k, 1);
              EXPECT_TRUE(c.tail_m == 0 || c.tail_m == cuda::gemm::sm90_tail_rows(c));
              EXPECT_EQ(cuda::gemm::sm90_tail_rows(c), 32);
              EXPECT_EQ(c_off.to_string(), "w4a16_64x128x64_s4") << "the mma.sync prefill tile";
              ++checked;
              continue;
            }
            EXPECT_EQ(c, c_off) << "the switch changes the wgmma choice only";
            EXPECT_EQ(c.tail_m, 0);
            const bool is_deep = c.block_k == 256;
            (c.block_m == 16 ? decode : prefill) += 1;
            deep += is_deep;
            if (is_deep) {
              EXPECT_EQ(c.block_m, 16);
              EXPECT_EQ(props.max_smem_per_block, hopper().max_smem_per_block)
                  << "the deep tile's 208 KB fit a Hopper, not an A100";
            } else if (c.block_m == 16) {
              EXPECT_EQ(c.to_string(), "w4a16_16x128x64_s6");
              if (props.max_smem_per_block == hopper().max_smem_per_block) {
                // Rule 2b: a Hopper leaves the deep tile only for short main loops past one wave.
                EXPECT_LT((k + 255) / 256, 16) << "K = " << k << " keeps the deep tile";
                const int64_t n_tiles = (n + (d.gated ? 63 : 127)) / (d.gated ? 64 : 128);
                EXPECT_GT(std::min<int64_t>(E, rows) * n_tiles, props.sm_count)
                    << "one wave keeps the deep tile";
              }
            }
            if (c.split_k > 1) {
              ++split;
              EXPECT_TRUE(is_deep) << c.to_string();
              EXPECT_LE(c.split_k, cap.max_split) << c.to_string();
              // Fewer expected tiles than SMs / 2: at most min(E, rows) experts x column tiles.
              const int64_t n_tiles = (n + (d.gated ? 63 : 127)) / (d.gated ? 64 : 128);
              EXPECT_LE(2 * n_tiles, props.sm_count) << c.to_string();
              EXPECT_LE(c.split_k * n_tiles, 2 * props.sm_count) << c.to_string();
            }
            if (E >= rows) EXPECT_EQ(c.block_m, 16) << "one row per expert is decode";
            GemmDesc b = d;
            b.nvfp4 = false;
            const GemmConfig cb = cuda::gemm::select_config(b, props);
            EXPECT_FALSE(cb.nvfp4) << cb.to_string();
            EXPECT_FALSE(cuda::gemm::config_runs(d, cb)) << cb.to_string();
            EXPECT_FALSE(cuda::gemm::config_runs(b, c)) << c.to_string();
            ++checked;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(deep, 0);
  EXPECT_GT(split, 0);
  std::printf("checked %d NVFP4 descs (%d decode tile, %d of them deep, %d split, %d prefill, "
              "%d wgmma)\n",
              checked, decode, deep, split, prefill, wgmma);
  EXPECT_GT(decode, 0);
  EXPECT_GT(prefill, 0);
  EXPECT_GT(wgmma, 0);
  DeviceProps old = ampere();
  old.cc_major = 7;
  GemmDesc d;
  d.num_experts = 8;
  d.max_rows = d.max_rows_per_expert = 64;
  d.n = 2048;
  d.k = 2048;
  d.nvfp4 = true;
  EXPECT_MODMOE_ERROR(cuda::gemm::select_config(d, old), "not supported yet",
                      "NVFP4 (W4A16) grouped GEMM on sm_70", "sm_80 or newer");
  d.k = 2080;
  EXPECT_MODMOE_ERROR(d.validate(), "NVFP4 with k = 2080", "multiple of 64");
}

// The split-K that tests/gpu/test_gpu_nvfp4_experts.cpp forces (MODMOE_GEMM_SPLIT_K, clamped to
// the capacity) really splits there: the capacity of each of its problems, GEMM1 and GEMM2.
TEST(GemmConfig, Nvfp4SplitCapacityOfTheGpuTestCases) {
  struct Case {
    int e, k;
    int64_t m, h, i;
    bool gated;
    int split1, split2;  // the capacity expected (1: none)
  };
  const Case cases[] = {
      {4, 2, 3, 1344, 1088, true, 3, 2},   // int_split3_k_tails_t3 (and _t16, split2_canonical)
      {4, 2, 16, 1344, 1088, true, 3, 2},
      {8, 2, 2, 2048, 512, false, 4, 1},   // int_split8_clamped_relu2
      {32, 8, 1, 2048, 1024, true, 4, 2},  // rand_decode_t1_split4
      {8, 8, 16, 2048, 1024, true, 4, 2},  // rand_decode_t16_split2
      {16, 4, 9, 1024, 512, true, 2, 1},   // RepeatedAndGraphReplayBitwise
      {8, 2, 16, 1344, 1088, true, 3, 2},  // DeepTileEqualsThe64KTileBitwise
      {8, 2, 1, 1344, 1088, true, 3, 2},
  };
  for (const Case& c : cases) {
    GemmDesc d1 = gemm_desc(true, c.e, c.e, c.k, c.m, c.h, c.i, c.gated ? 8 : 0);
    GemmDesc d2 = gemm_desc(false, c.e, c.e, c.k, c.m, c.h, c.i, 0);
    d1.nvfp4 = d2.nvfp4 = true;
    d1.validate();
    d2.validate();
    EXPECT_EQ(cuda::gemm::split_k_capacity(d1).max_split, c.split1)
        << "E " << c.e << " k " << c.k << " M " << c.m << " H " << c.h;
    EXPECT_EQ(cuda::gemm::split_k_capacity(d2).max_split, c.split2)
        << "E " << c.e << " k " << c.k << " M " << c.m << " I " << c.i;
  }
}

// The wgmma W4A16 tile: its name (what MODMOE_GEMM_CONFIG takes), what it can run (NVFP4
// only; aligned; gated only with GateUpInterleaved G = 8; not with MODMOE_GEMM_CONFIG=sm80),
// tail rows of 32 and no split-K.
TEST(GemmConfig, W4a16WgmmaTileNameAndSupport) {
  const GemmConfig* tile = nullptr;
  for (const GemmConfig& c : cuda::gemm::compiled_configs()) {
    if (c.nvfp4 && c.arch == 90) {
      EXPECT_EQ(tile, nullptr) << "one wgmma W4A16 tile";
      tile = &c;
    }
  }
  ASSERT_NE(tile, nullptr);
  EXPECT_EQ(tile->to_string(), "w4a16_wgmma_256x128x64_s5");
  EXPECT_EQ(tile->threads(), 384);
  GemmConfig t = *tile;
  t.tail_m = cuda::gemm::sm90_tail_rows(t);
  EXPECT_EQ(t.tail_m, 32);
  EXPECT_EQ(t.to_string(), "w4a16_wgmma_256x128x64_s5_t32");
  EXPECT_TRUE(cuda::gemm::is_compiled(t));
  t.split_k = 2;
  EXPECT_FALSE(cuda::gemm::is_compiled(t)) << "no split-K";
  EXPECT_FALSE(cuda::gemm::is_fp8_config(*tile));

  GemmDesc d = gemm_desc(true, 8, 8, 2, 4096, 4096, 14336, 8);
  d.nvfp4 = true;
  d.validate();
  EXPECT_TRUE(d.sm90_w4a16_supported());
  EXPECT_TRUE(cuda::gemm::config_runs(d, *tile));
  GemmDesc g2 = gemm_desc(false, 8, 8, 2, 4096, 4096, 14336, 8);
  g2.nvfp4 = true;
  EXPECT_TRUE(g2.sm90_w4a16_supported()) << "GEMM2: no gate/up layout";
  GemmDesc relu2 = d;
  relu2.gated = false;
  relu2.gate_up_group = 0;
  EXPECT_TRUE(cuda::gemm::config_runs(relu2, *tile)) << "non-gated GEMM1";
  GemmDesc x = d;
  x.gate_up_group = -1;  // canonical, or G != 8
  EXPECT_FALSE(x.sm90_w4a16_supported());
  EXPECT_FALSE(cuda::gemm::config_runs(x, *tile));
  x = d;
  x.aligned16 = false;
  EXPECT_FALSE(cuda::gemm::config_runs(x, *tile));
  x = d;
  x.allow_sm90 = false;  // MODMOE_GEMM_CONFIG=sm80
  EXPECT_FALSE(cuda::gemm::config_runs(x, *tile));
  x = d;
  x.allow_w4a16_wgmma = false;  // only the default choice; a forced tile still runs
  EXPECT_TRUE(cuda::gemm::config_runs(x, *tile));
  x = d;
  x.nvfp4 = false;  // bf16
  EXPECT_FALSE(x.sm90_w4a16_supported());
  EXPECT_FALSE(cuda::gemm::config_runs(x, *tile));
  x.fp8 = true;
  EXPECT_FALSE(cuda::gemm::config_runs(x, *tile));
  // Selection: Hopper only; a device whose opt-in shared memory is smaller keeps mma.sync.
  EXPECT_EQ(cuda::gemm::select_config(d, hopper()).to_string(), "w4a16_wgmma_256x128x64_s5_t32");
  DeviceProps small = hopper();
  small.max_smem_per_block = 200 * 1024;
  EXPECT_EQ(cuda::gemm::select_config(d, small).to_string(), "w4a16_64x128x64_s4");
  DeviceProps blackwell = hopper();
  blackwell.cc_major = 10;
  EXPECT_EQ(cuda::gemm::select_config(d, blackwell).to_string(), "w4a16_64x128x64_s4");
  // Rule 0's threshold: 64 rows per touched expert (8 experts: 512 rows in all).
  GemmDesc edge = gemm_desc(true, 8, 8, 1, 512, 4096, 14336, 8);
  edge.nvfp4 = true;
  EXPECT_EQ(cuda::gemm::select_config(edge, hopper()).arch, 90);
  edge = gemm_desc(true, 8, 8, 1, 500, 4096, 14336, 8);
  edge.nvfp4 = true;
  EXPECT_EQ(cuda::gemm::select_config(edge, hopper()).to_string(), "w4a16_64x128x64_s4");
  // Past 2048 rows per expert no tail rows (as the bf16 sm90 tiles).
  GemmDesc big = gemm_desc(true, 8, 8, 2, 16384, 4096, 14336, 8);
  big.nvfp4 = true;
  EXPECT_EQ(cuda::gemm::select_config(big, hopper()).to_string(), "w4a16_wgmma_256x128x64_s5");
}

TEST(GemmConfig, UncompiledConfigsAreRecognised) {
  GemmConfig bad{96, 96, 32, 3, 2, 2};
  EXPECT_FALSE(cuda::gemm::is_compiled(bad));
  for (const auto& c : cuda::gemm::compiled_configs()) {
    EXPECT_TRUE(cuda::gemm::is_compiled(c)) << c.to_string();
    GemmConfig s = c;
    s.split_k = 2;
    // sm90 (not the wgmma W4A16 tile), and the W4A16 deep tile (not its wide variant)
    const bool splits =
        (c.arch == 90 && !c.nvfp4) || (c.nvfp4 && c.block_k == 256 && c.block_n == 128);
    EXPECT_EQ(cuda::gemm::is_compiled(s), splits) << s.to_string();
    s.split_k = cuda::gemm::max_split_k() + 1;
    EXPECT_FALSE(cuda::gemm::is_compiled(s)) << s.to_string();
    // Tail rows: the tile's own count, sm90 only, never with split-K; none on the FP8 tiles.
    GemmConfig t = c;
    if (c.arch == 90 && cuda::gemm::sm90_tail_rows(c) == 0) {
      EXPECT_EQ(c.block_k, 128) << c.to_string() << ": only the FP8 tiles have no tail rows";
      t.tail_m = 16;
      EXPECT_FALSE(cuda::gemm::is_compiled(t)) << t.to_string();
      continue;
    }
    t.tail_m = c.arch == 90 ? cuda::gemm::sm90_tail_rows(c) : 16;
    EXPECT_EQ(cuda::gemm::is_compiled(t), c.arch == 90) << t.to_string();
    t.split_k = 2;
    EXPECT_FALSE(cuda::gemm::is_compiled(t)) << t.to_string();
    t.split_k = 1;
    t.tail_m = 8;
    EXPECT_FALSE(cuda::gemm::is_compiled(t)) << t.to_string();
  }
}

// row_tiles: every tile but the last has block_m rows, the last 1..block_m (+ tail_m) rows;
// without tail rows it is ceil(count / block_m). The sm90 kernel decodes tiles this way.
TEST(GemmConfig, RowTilesCoverEveryRowOnce) {
  for (int bm : {64, 256}) {
    for (int tail : {0, bm == 64 ? 16 : 32}) {
      for (int32_t count = 0; count <= 1200; ++count) {
        const int32_t tiles = cuda::gemm::row_tiles(count, bm, tail);
        if (count == 0) {
          EXPECT_EQ(tiles, 0);
          continue;
        }
        ASSERT_GE(tiles, 1);
        const int32_t last = count - (tiles - 1) * bm;
        EXPECT_GE(last, 1) << "count " << count << " bm " << bm << " tail " << tail;
        EXPECT_LE(last, bm + tail) << "count " << count << " bm " << bm << " tail " << tail;
        if (tail == 0) EXPECT_EQ(tiles, (count + bm - 1) / bm);
        // The tail never adds a tile, and takes one away where the rest fits in it.
        EXPECT_EQ(tiles, std::max(1, (count - tail + bm - 1) / bm)) << count;
      }
    }
  }
  EXPECT_EQ(cuda::gemm::row_tiles(288, 256, 32), 1);
  EXPECT_EQ(cuda::gemm::row_tiles(289, 256, 32), 2);
  EXPECT_EQ(cuda::gemm::row_tiles(544, 256, 32), 2);
  EXPECT_EQ(cuda::gemm::row_tiles(80, 64, 16), 1);
  EXPECT_EQ(cuda::gemm::row_tiles(81, 64, 16), 2);
}

// What a Hopper gets on the ANCHORS.md grid (GateUpInterleaved G = 8 weights, as `modmoe
// bench experts` prepares them): printed for the notes, checked for the rules that the
// comments in select_config state.
TEST(GemmConfig, AnchorGridChoices) {
  struct Model {
    const char* name;
    int e, k;
    int64_t h, i;
  };
  const Model models[] = {{"mixtral", 8, 2, 4096, 14336},
                          {"qwen3", 128, 8, 2048, 768},
                          {"deepseek-ep8", 32, 8, 7168, 2048},
                          {"gpt-oss", 128, 4, 2880, 2880}};
  for (const Model& m : models) {
    for (int64_t t : {1, 16, 128, 1024, 4096, 16384}) {
      const GemmDesc d1 = gemm_desc(true, m.e, m.e, m.k, t, m.h, m.i, 8);
      const GemmDesc d2 = gemm_desc(false, m.e, m.e, m.k, t, m.h, m.i, 8);
      const GemmConfig c1 = cuda::gemm::select_config(d1, hopper());
      const GemmConfig c2 = cuda::gemm::select_config(d2, hopper());
      std::printf("%-13s T=%-6lld GEMM1 %-22s GEMM2 %s\n", m.name, static_cast<long long>(t),
                  c1.to_string().c_str(), c2.to_string().c_str());
      EXPECT_EQ(c1.arch, 90);
      EXPECT_EQ(c2.arch, 90);
      if (t == 1) {
        EXPECT_EQ(c1.block_m, 64);  // decode: the narrow tile
        EXPECT_EQ(c2.block_m, 64);
      }
      if (t == 16384 && m.e <= 32) {
        EXPECT_EQ(c1.block_m, 256);  // prefill with large experts: the wide tile
      }
    }
  }
  // FP8 on the same grid: fp8-tensor GEMM1 with fast accumulation of the large experts at
  // prefill on the 256-token FP8 tile (rule 1b); its GEMM2, the default (promoted) fp8-tensor
  // and fp8-block on the 128-token one (the GEMM descs of both default schemes are the same),
  // decode on the narrow one.
  for (const Model& m : models) {
    if (m.h % 128 != 0 || m.i % 128 != 0) continue;  // gpt-oss: H = I = 2880
    for (int64_t t : {1, 16, 128, 1024, 4096, 16384}) {
      for (bool fast : {true, false}) {
        GemmDesc d1 = gemm_desc(true, m.e, m.e, m.k, t, m.h, m.i, 8);
        GemmDesc d2 = gemm_desc(false, m.e, m.e, m.k, t, m.h, m.i, 8);
        d1.fp8 = d2.fp8 = true;
        d1.fp8_fast_accum = fast;
        const GemmConfig c1 = cuda::gemm::select_config(d1, hopper());
        const GemmConfig c2 = cuda::gemm::select_config(d2, hopper());
        std::printf("%s %-13s T=%-6lld GEMM1 %-22s GEMM2 %s\n",
                    fast ? "fp8 fast accum" : "fp8 default   ", m.name, static_cast<long long>(t),
                    c1.to_string().c_str(), c2.to_string().c_str());
        EXPECT_LE(c2.block_m, 128);
        if (!fast) EXPECT_LE(c1.block_m, 128);
        if (t == 1) EXPECT_EQ(c1.block_m, 64);
        if (fast && t == 16384 && m.e <= 32) {
          EXPECT_EQ(c1.to_string(), "sm90_256x128x128_s4") << m.name;
        }
      }
    }
  }
  // NVFP4 (W4A16) on the same grid: decode on a 16-token tile (deep or 64-K), split-K only where a GEMM's
  // expected tiles fill fewer than half of the 132 SMs (mixtral T = 1 GEMM2: 2 experts x 32
  // tiles), prefill on the 64-token tile.
  for (const Model& m : models) {
    for (int64_t t : {1, 16, 128, 4096}) {
      GemmDesc d1 = gemm_desc(true, m.e, m.e, m.k, t, m.h, m.i, 8);
      GemmDesc d2 = gemm_desc(false, m.e, m.e, m.k, t, m.h, m.i, 8);
      d1.nvfp4 = d2.nvfp4 = true;
      const GemmConfig c1 = cuda::gemm::select_config(d1, hopper());
      const GemmConfig c2 = cuda::gemm::select_config(d2, hopper());
      std::printf("nvfp4 %-13s T=%-6lld GEMM1 %-22s GEMM2 %s\n", m.name,
                  static_cast<long long>(t), c1.to_string().c_str(), c2.to_string().c_str());
      if (t <= 16) {
        // Rule 2b (the deep tile within one wave or for K >= 4096), as measured on an H200:
        // GEMM1 tiles (touched x I / 64, K = H) and GEMM2 tiles (touched x H / 128, K = I).
        // Rule 2a first (the wide tile: its grid >= SMs / 2 and >= 10 k-tiles of 256).
        const std::string name = m.name;
        const char* kDeep = "w4a16_16x128x256_s8";
        const char* kWide = "w4a16_16x256x256_s4";
        const char* k64 = "w4a16_16x128x64_s6";
        const char* want1 = name == "qwen3" ? (t == 1 ? kDeep : k64) : kWide;
        const char* want2 = name == "mixtral"   ? (t == 1 ? kDeep : kWide)
                            : name == "qwen3"   ? (t == 1 ? kDeep : k64)
                            : name == "gpt-oss" ? (t == 1 ? kDeep : kWide)
                                                : k64;  // deepseek-ep8: K = 2048, 224+ tiles
        GemmConfig b1 = c1, b2 = c2;
        b1.split_k = b2.split_k = 1;
        EXPECT_EQ(b1.to_string(), want1) << m.name << " T=" << t;
        EXPECT_EQ(b2.to_string(), want2) << m.name << " T=" << t;
      }
      const bool mixtral_t1 = std::string(m.name) == "mixtral" && t == 1;
      EXPECT_EQ(c1.split_k, 1) << m.name << " T=" << t;
      EXPECT_EQ(c2.split_k, mixtral_t1 ? 2 : 1) << m.name << " T=" << t;
      if (t == 4096) {
        // >= 64 rows per expert everywhere (gpt-oss: 128): the wgmma tile, with tail rows
        // (<= 2048 rows per expert) where allowed (the experts stage's default); the mma.sync
        // one otherwise (MODMOE_W4A16_WGMMA=0, or not a Hopper).
        EXPECT_EQ(c1.to_string(), "w4a16_wgmma_256x128x64_s5_t32") << m.name;
        EXPECT_EQ(c2.to_string(), "w4a16_wgmma_256x128x64_s5_t32") << m.name;
        GemmDesc o1 = d1;
        o1.allow_w4a16_wgmma = false;
        EXPECT_EQ(cuda::gemm::select_config(o1, hopper()).to_string(), "w4a16_64x128x64_s4");
        EXPECT_EQ(cuda::gemm::select_config(d1, ampere()).to_string(), "w4a16_64x128x64_s4");
      }
      if (t == 128) EXPECT_NE(c1.arch, 90) << m.name << ": < 64 rows per expert";
    }
  }
  // An EP slice with one expert touched at T = 1 (DeepSeek-V3 at EP 8: 32 of 256 experts, 8
  // picks, about one local): both GEMMs split (32 and 56 column tiles).
  GemmDesc e1 = gemm_desc(true, 32, 256, 8, 1, 7168, 2048, 8);
  GemmDesc e2 = gemm_desc(false, 32, 256, 8, 1, 7168, 2048, 8);
  e1.nvfp4 = e2.nvfp4 = true;
  EXPECT_EQ(cuda::gemm::select_config(e1, hopper()).to_string(), "w4a16_16x128x256_s8_k4");
  EXPECT_EQ(cuda::gemm::select_config(e2, hopper()).to_string(), "w4a16_16x128x256_s8_k2");
  EXPECT_EQ(cuda::gemm::select_config(e2, ampere()).to_string(), "w4a16_16x128x64_s6");
  // A canonical (non-interleaved) gated layout stays on the mma.sync kernel for GEMM1.
  const GemmDesc canon = gemm_desc(true, 8, 8, 2, 4096, 4096, 14336, 14336);
  EXPECT_EQ(cuda::gemm::select_config(canon, hopper()).arch, 80);
  // Ampere never gets the sm90 kernel.
  const GemmDesc g8 = gemm_desc(true, 8, 8, 2, 4096, 4096, 14336, 8);
  EXPECT_EQ(cuda::gemm::select_config(g8, ampere()).arch, 80);
}

}  // namespace
}  // namespace modmoe

#else

TEST(GemmConfig, NeedsTheCudaBackend) { GTEST_SKIP() << "CPU-only build: no grouped GEMM"; }

#endif
