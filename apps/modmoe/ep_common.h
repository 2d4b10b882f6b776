// Shared pieces of `modmoe ep-demo` and `modmoe bench all-to-all` (CUDA builds only).
#pragma once

#include <cctype>
#include <string>
#include <vector>

#include "modmoe/all_to_all.h"
#include "modmoe/dtype.h"
#include "modmoe/error.h"

namespace modmoe::app {

inline AllToAllBackend parse_backend(const std::string& s) {
  if (s == "nvlink") return AllToAllBackend::NvLink;
  if (s == "nccl") return AllToAllBackend::Nccl;
  MODMOE_FAIL("option '--backend' = '", s, "': expected nvlink or nccl");
}

// --dtype: what the experts' weights are and what the dispatch carries (docs/fp8.md and
// docs/nvfp4.md, "Quantize before dispatch"): bf16 (QuantScheme::None), fp8-block, fp8-tensor
// or nvfp4 (NVFP4 rows + e4m3 block scales + one fp32 global per token dispatched, dequantized
// to bf16 on arrival for the W4A16 experts).
inline QuantScheme parse_dtype(const std::string& s) {
  if (s == "bf16") return QuantScheme::None;
  if (s == "fp8-block") return QuantScheme::Fp8Block128;
  if (s == "fp8-tensor") return QuantScheme::Fp8PerTensor;
  if (s == "nvfp4") return QuantScheme::Nvfp4;
  MODMOE_FAIL("option '--dtype' = '", s, "': expected bf16, fp8-block, fp8-tensor or nvfp4");
}

inline bool is_fp8_dtype(QuantScheme dtype) {
  return dtype == QuantScheme::Fp8Block128 || dtype == QuantScheme::Fp8PerTensor;
}

// H and I that `dtype` needs: FP8 multiples of 128 (the scale block), NVFP4 of 64 (the W4A16
// kernel's K tile; the 16-value blocks and 16-byte packed rows need 32). "" when they fit.
inline std::string dtype_shape_problem(QuantScheme dtype, int64_t hidden, int64_t intermediate) {
  const int64_t m = is_fp8_dtype(dtype) ? 128 : dtype == QuantScheme::Nvfp4 ? 64 : 1;
  if (hidden % m == 0 && intermediate % m == 0) return "";
  return "expected H and I multiples of " + std::to_string(m) +
         (m == 128 ? " (the FP8 scale block)" : " (NVFP4: the W4A16 kernel's K tile)");
}

inline const char* dtype_option_name(QuantScheme dtype) {
  return dtype == QuantScheme::None ? "bf16" : quant_scheme_name(dtype);
}

// "1,16,128" -> {1, 16, 128}
inline std::vector<int> parse_int_list(const std::string& s, const char* option, int lo, int hi) {
  std::vector<int> v;
  size_t i = 0;
  while (i <= s.size()) {
    const size_t j = s.find(',', i);
    const std::string item = s.substr(i, j == std::string::npos ? std::string::npos : j - i);
    char* end = nullptr;
    const long x = std::strtol(item.c_str(), &end, 10);
    MODMOE_CHECK(!item.empty() && *end == '\0' && x >= lo && x <= hi, "option '", option, "' = '",
                 s, "': expected a comma-separated list of integers in [", lo, ", ", hi, "]");
    v.push_back(static_cast<int>(x));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  return v;
}

inline std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> v;
  size_t i = 0;
  while (true) {
    const size_t j = s.find(',', i);
    v.push_back(s.substr(i, j == std::string::npos ? std::string::npos : j - i));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  return v;
}


}  // namespace modmoe::app
