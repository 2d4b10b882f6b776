// Shared test helpers: seeded random inputs (never zeros), bf16 conversion, relative L2 error
// against a float64 reference, and first-mismatch reporting.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "core/host_tensor.h"
#include "modmoe/dtype.h"
#include "modmoe/error.h"

// Runs `stmt` and expects a modmoe::Error whose message contains every needle.
#define EXPECT_MODMOE_ERROR(stmt, ...)                                                  \
  do {                                                                                  \
    SCOPED_TRACE(#stmt);                                                                \
    bool thrown = false;                                                                \
    try {                                                                               \
      stmt;                                                                             \
    } catch (const ::modmoe::Error& e) {                                                \
      thrown = true;                                                                    \
      const std::string msg = e.what();                                                 \
      for (const char* needle : std::initializer_list<const char*>{__VA_ARGS__}) {      \
        EXPECT_NE(msg.find(needle), std::string::npos)                                  \
            << "message lacks \"" << needle << "\": " << msg;                           \
      }                                                                                 \
    }                                                                                   \
    EXPECT_TRUE(thrown) << "expected a modmoe::Error";                                  \
  } while (0)

namespace modmoe::test {

// tests/data: MODMOE_TEST_DATA_DIR from the environment if set (the GPU machine runs the test
// binaries from another checkout path), else the folder compiled in.
inline std::string test_data_dir() {
  const char* env = std::getenv("MODMOE_TEST_DATA_DIR");
  if (env != nullptr && env[0] != '\0') return env;
  return MODMOE_TEST_DATA_DIR;
}

// The seed of a test: MODMOE_TEST_SEED if set, else a fixed default. Printed so that any
// failure can be replayed.
inline uint64_t seed(uint64_t salt = 0) {
  const char* env = std::getenv("MODMOE_TEST_SEED");
  const uint64_t base = env ? std::strtoull(env, nullptr, 10) : 20261127ull;
  const uint64_t s = base * 1000003ull + salt;
  std::printf("[ seed     ] %llu (MODMOE_TEST_SEED=%llu, salt %llu)\n",
              static_cast<unsigned long long>(s), static_cast<unsigned long long>(base),
              static_cast<unsigned long long>(salt));
  return s;
}

// The poison before each run: 0xFF bytes are NaN in bf16 and fp32 and -1 in integers, so an
// element the code under test never wrote fails the comparison.
inline void poison(HostTensor& t) {
  if (t.nbytes()) std::memset(t.view().data, 0xFF, t.nbytes());
}

// Fills a bf16 / fp32 host tensor with N(0, std^2), never exactly zero.
inline void fill_normal(HostTensor& t, std::mt19937_64& rng, float std) {
  std::normal_distribution<float> dist(0.0f, std);
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    float v = dist(rng);
    if (v == 0.0f) v = std * 1e-3f;
    if (t.view().dtype == DType::BF16) {
      t.data<uint16_t>()[i] = float_to_bf16_bits(v);
    } else if (t.view().dtype == DType::F32) {
      t.data<float>()[i] = v;
    } else {
      ADD_FAILURE() << "fill_normal: unsupported dtype " << dtype_name(t.view().dtype);
      return;
    }
  }
}

// Small integers in [-r, r] \ {0}: GEMMs over them are exact in fp32, so results compare bitwise.
inline void fill_small_int(HostTensor& t, std::mt19937_64& rng, int r) {
  std::uniform_int_distribution<int> dist(1, 2 * r);
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    int v = dist(rng) - r;
    if (v <= 0) v -= 1;
    if (t.view().dtype == DType::BF16) {
      t.data<uint16_t>()[i] = float_to_bf16_bits(static_cast<float>(v));
    } else {
      t.data<float>()[i] = static_cast<float>(v);
    }
  }
}

// A host tensor holding `values` (converted to bf16 when dtype is bf16, else stored as fp32).
inline HostTensor host_values(const std::vector<float>& values, std::vector<int64_t> shape,
                              DType dtype) {
  HostTensor t(dtype, shape);
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::BF16) {
      t.data<uint16_t>()[i] = float_to_bf16_bits(values[i]);
    } else {
      t.data<float>()[i] = values[i];
    }
  }
  return t;
}

inline std::vector<double> to_double(const HostTensor& t) {
  const int64_t n = t.numel();
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    switch (t.view().dtype) {
      case DType::BF16: out[i] = bf16_bits_to_float(t.data<uint16_t>()[i]); break;
      case DType::F32: out[i] = t.data<float>()[i]; break;
      case DType::F64: out[i] = t.data<double>()[i]; break;
      case DType::I32: out[i] = t.data<int32_t>()[i]; break;
      case DType::I64: out[i] = static_cast<double>(t.data<int64_t>()[i]); break;
      default: ADD_FAILURE() << "to_double: unsupported dtype"; return out;
    }
  }
  return out;
}

// ||out - ref|| / ||ref||; NaN anywhere gives +inf, so an unwritten (poisoned) element fails.
inline double rel_l2(const std::vector<double>& out, const std::vector<double>& ref) {
  if (out.size() != ref.size()) return INFINITY;
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return INFINITY;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Byte-wise equality; on failure the message names the first differing element.
inline ::testing::AssertionResult bitwise_equal(const HostTensor& a, const HostTensor& b) {
  if (a.nbytes() != b.nbytes()) {
    return ::testing::AssertionFailure() << "sizes differ: " << a.nbytes() << " vs " << b.nbytes();
  }
  const size_t esize = dtype_bytes(a.view().dtype);
  const auto* pa = static_cast<const unsigned char*>(a.view().data);
  const auto* pb = static_cast<const unsigned char*>(b.view().data);
  for (size_t i = 0; i < a.nbytes(); ++i) {
    if (pa[i] != pb[i]) {
      const size_t elem = i / esize;
      const int64_t cols = a.view().ndim >= 1 ? a.view().shape[a.view().ndim - 1] : 1;
      return ::testing::AssertionFailure()
             << "first mismatch at element " << elem << " (row " << elem / cols << ", col "
             << elem % cols << ") of shape " << a.view().shape_string();
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace modmoe::test
