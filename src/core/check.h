// Argument checks shared by every public entry point. Each throws modmoe::Error naming the
// argument, the value found and what was expected.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include "modmoe/error.h"
#include "modmoe/tensor.h"

namespace modmoe::check {

// Shape wildcard in check_shape.
constexpr int64_t kAny = -1;

void defined(const TensorView& t, const char* name);
void dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed);
// expected: one entry per dimension; kAny matches any size.
void shape(const TensorView& t, const char* name, std::initializer_list<int64_t> expected);
void contiguous(const TensorView& t, const char* name);
// The base pointer and every row (stride of dim ndim-2) start on a 16-byte boundary.
void rows_aligned16(const TensorView& t, const char* name);
void device(const TensorView& t, const char* name, const Device& expected);
// Defined, contiguous, 16-byte aligned rows, and on `dev`: the usual set for a dense input.
void dense(const TensorView& t, const char* name, const Device& dev);

// a and b do not share a byte (empty views never overlap).
void disjoint(const TensorView& a, const char* a_name, const TensorView& b, const char* b_name);
// dst has src's dtype and shape, is contiguous, on `dev`, and does not overlap src: an output
// that prepare_weights fills from src.
void same_as(const TensorView& dst, const TensorView& src, const char* dst_name,
             const char* src_name, const Device& dev);

std::string dtypes_string(std::initializer_list<DType> allowed);

// The 0/1 environment switch `name` (the MODMOE_* test, benchmark and diagnosis hooks): unset or
// empty -> nullopt, "0" -> false, "1" -> true; any other value throws, naming the variable, so a
// mistyped value never silently picks a side. Every switch of the library reads through here.
std::optional<bool> env_switch(const char* name);

}  // namespace modmoe::check
