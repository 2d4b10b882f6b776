// MODMOE_HD marks a function both the host and the device compile (activation formulas,
// synthetic data, fp8 conversions), so that the CPU reference and the kernels share one
// expression. Write `MODMOE_HD inline` (or constexpr) on functions defined in headers.
#pragma once

#ifdef __CUDACC__
#define MODMOE_HD __host__ __device__
#else
#define MODMOE_HD
#endif
