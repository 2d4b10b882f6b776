#include "modmoe/dtype.h"

#include <cstring>

#include "modmoe/error.h"

namespace modmoe {

size_t dtype_bytes(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
    case DType::E4M3: return 1;
    case DType::E2M1x2: return 1;
    case DType::UE8M0: return 1;
  }
  MODMOE_FAIL("unknown dtype value ", static_cast<int>(dtype));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::I32: return "i32";
    case DType::I64: return "i64";
    case DType::U8: return "u8";
    case DType::E4M3: return "e4m3";
    case DType::E2M1x2: return "e2m1x2";
    case DType::UE8M0: return "ue8m0";
  }
  return "unknown";
}

const char* quant_scheme_name(QuantScheme scheme) {
  switch (scheme) {
    case QuantScheme::None: return "none";
    case QuantScheme::Fp8PerTensor: return "fp8-tensor";
    case QuantScheme::Fp8Block128: return "fp8-block";
    case QuantScheme::Nvfp4: return "nvfp4";
    case QuantScheme::Mxfp8: return "mxfp8";
  }
  return "unknown";
}

uint16_t float_to_bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
  }
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace modmoe
