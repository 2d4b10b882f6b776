// Core pieces: bf16 rounding, tensor views, argument checks, presets, synthetic data, and the
// README's promises (the two commands, the example that compiles as a test).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <fstream>
#include <sstream>

#include "common/test_util.h"
#include "core/check.h"
#include "core/presets.h"
#include "core/synth_fill.h"
#include "modmoe/modmoe.h"

namespace modmoe {
namespace {

using ::testing::HasSubstr;

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string repo_file(const std::string& rel) {
  return read_file(test::test_data_dir() + "/../../" + rel);
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error was thrown";
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16_bits(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties go to even (1 + 2^-6).
  EXPECT_EQ(float_to_bf16_bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_bits_to_float(float_to_bf16_bits(NAN))));
  EXPECT_EQ(float_to_bf16_bits(-INFINITY), 0xff80);
  EXPECT_EQ(round_to_bf16(3.0f), 3.0f);
}

TEST(TensorView, ShapesStridesAndSelect) {
  std::vector<float> buf(2 * 3 * 4);
  TensorView v = make_view(buf.data(), DType::F32, {2, 3, 4});
  EXPECT_EQ(v.numel(), 24);
  EXPECT_EQ(v.stride(0), 12);
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_EQ(v.shape_string(), "[2, 3, 4]");
  TensorView s = v.select0(1);
  EXPECT_EQ(s.ndim, 2);
  EXPECT_EQ(s.ptr<float>(), buf.data() + 12);
  v.strides[1] = 5;
  EXPECT_FALSE(v.is_contiguous());
  EXPECT_FALSE(TensorView{}.defined());
}

TEST(Checks, MessagesNameArgumentValueAndExpectation) {
  std::vector<float> buf(64);
  TensorView v = make_view(buf.data(), DType::F32, {4, 16});
  EXPECT_THAT(error_of([&] { check::dtype(v, "hidden", {DType::BF16}); }),
              HasSubstr("argument 'hidden' has dtype f32: expected bf16"));
  EXPECT_THAT(error_of([&] { check::shape(v, "topk_ids", {4, check::kAny, 2}); }),
              HasSubstr("argument 'topk_ids' has shape [4, 16]: expected [4, *, 2]"));
  EXPECT_THAT(error_of([&] { check::defined(TensorView{}, "w13"); }),
              HasSubstr("argument 'w13' is missing"));
  TensorView odd = make_view(buf.data() + 1, DType::F32, {4, 16});
  EXPECT_THAT(error_of([&] { check::rows_aligned16(odd, "hidden"); }),
              HasSubstr("expected a 16-byte aligned pointer"));
  TensorView rows = make_view(buf.data(), DType::F32, {6, 10});
  EXPECT_THAT(error_of([&] { check::rows_aligned16(rows, "hidden"); }),
              HasSubstr("rows of 40 bytes"));
  TensorView gpu = v;
  gpu.device = Device::cuda(0);
  EXPECT_THAT(error_of([&] { check::device(gpu, "out", Device::cpu()); }),
              HasSubstr("argument 'out' is on cuda:0: expected cpu"));
  v.strides[0] = 32;
  EXPECT_THAT(error_of([&] { check::contiguous(v, "hidden"); }), HasSubstr("is not contiguous"));
}

// Every MODMOE_* 0/1 switch reads through check::env_switch: unset or empty is "not set", 0 and 1
// are the two sides, and anything else is an error that names the variable and the value.
TEST(Checks, EnvironmentSwitches) {
  const char* name = "MODMOE_TEST_ENV_SWITCH";
  ::unsetenv(name);
  EXPECT_FALSE(check::env_switch(name).has_value());
  ::setenv(name, "", 1);
  EXPECT_FALSE(check::env_switch(name).has_value());
  ::setenv(name, "0", 1);
  EXPECT_EQ(check::env_switch(name), std::optional<bool>(false));
  ::setenv(name, "1", 1);
  EXPECT_EQ(check::env_switch(name), std::optional<bool>(true));
  for (const char* bad : {"yes", "2", "01", "1 ", "true"}) {
    ::setenv(name, bad, 1);
    EXPECT_THAT(error_of([&] { check::env_switch(name); }),
                HasSubstr(std::string(name) + "='" + bad + "': expected 0 or 1"));
  }
  ::unsetenv(name);
}

TEST(Presets, RealShapesAndScaledDownVersions) {
  const Preset& ds = find_preset("deepseek-v3");
  EXPECT_EQ(ds.num_experts, 256);
  EXPECT_EQ(ds.top_k, 8);
  EXPECT_EQ(ds.hidden, 7168);
  EXPECT_EQ(ds.intermediate, 2048);
  EXPECT_EQ(ds.routing.method, RoutingMethod::DeepSeekV3);
  EXPECT_EQ(ds.routing.n_group, 8);
  EXPECT_EQ(ds.routing.topk_group, 4);
  EXPECT_EQ(find_preset("gpt-oss-120b").activation, Activation::SwigluOai);
  EXPECT_EQ(presets().size(), 5u);
  for (const Preset& p : presets()) {
    const Preset s = p.scaled_down();
    EXPECT_EQ(s.hidden % 64, 0) << p.name;
    EXPECT_EQ(s.intermediate % 64, 0) << p.name;
    EXPECT_LE(s.hidden, 512) << p.name;
    EXPECT_EQ(s.num_experts, p.num_experts) << p.name;
    EXPECT_NO_THROW(s.routing.validate()) << p.name;
  }
  EXPECT_THAT(error_of([] { find_preset("llama-9"); }),
              HasSubstr("'--preset' = 'llama-9': expected one of mixtral-8x7b"));
}

TEST(Synth, DeterministicNonZeroUnitVariance) {
  HostTensor a(DType::F32, {4096}), b(DType::F32, {4096});
  synth::fill_host(a, 7, 3, 1.0f);
  synth::fill_host(b, 7, 3, 1.0f);
  double s = 0, s2 = 0;
  for (int i = 0; i < 4096; ++i) {
    ASSERT_EQ(a.data<float>()[i], b.data<float>()[i]);
    ASSERT_NE(a.data<float>()[i], 0.0f);
    s += a.data<float>()[i];
    s2 += a.data<float>()[i] * a.data<float>()[i];
  }
  EXPECT_NEAR(s / 4096, 0.0, 0.05);
  EXPECT_NEAR(s2 / 4096, 1.0, 0.1);
  synth::fill_host(b, 7, 4, 1.0f);
  EXPECT_NE(a.data<float>()[0], b.data<float>()[0]);
}

TEST(Readme, TwoSetupCommandsAndTheExampleVerbatim) {
  const std::string readme = repo_file("README.md");
  ASSERT_FALSE(readme.empty());
  const auto first_block = readme.find("```\n");
  ASSERT_NE(first_block, std::string::npos);
  const std::string block = readme.substr(first_block, readme.find("```", first_block + 4) - first_block);
  EXPECT_THAT(block, HasSubstr("bash scripts/demo.sh"));
  EXPECT_THAT(block, HasSubstr("bash scripts/test.sh"));
  EXPECT_FALSE(repo_file("scripts/demo.sh").empty());
  EXPECT_THAT(repo_file(".ci/run"), HasSubstr("scripts/test.sh"));
  const std::string example = repo_file("tests/consumer/example.cpp");
  ASSERT_FALSE(example.empty());
  EXPECT_THAT(readme, HasSubstr(example)) << "README's example drifted from tests/consumer/example.cpp";
}

TEST(Version, ReportsBuild) {
  EXPECT_STREQ(version(), "0.1.0");
  EXPECT_EQ(built_with_cuda(), !compiled_architectures().empty());
  EXPECT_NO_THROW(list_gpus());
}

}  // namespace
}  // namespace modmoe
