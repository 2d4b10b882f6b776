// Helpers shared by the public entry points of the experts stage (experts.cpp, moe.cpp,
// quant.cpp): backend selection and workspace checks. Internal to src/api/.
#pragma once

#include <cstddef>
#include <cstdint>

#include "modmoe/error.h"
#include "modmoe/experts.h"

namespace modmoe::api {

// Workspace carves start on this boundary (cudaMalloc returns 256-byte aligned memory).
constexpr size_t kWorkspaceAlign = 256;

constexpr size_t align_up(size_t bytes, size_t align = kWorkspaceAlign) {
  return (bytes + align - 1) / align * align;
}

// Thrown where a CUDA tensor reaches a build without the CUDA backend.
[[noreturn]] inline void no_cuda_backend(const char* function, const Device& device) {
  MODMOE_FAIL(function, ": the tensors are on ", device.to_string(),
              " but this build of modmoe has no CUDA backend (configured with MODMOE_CUDA=OFF "
              "or without nvcc): expected CPU tensors, or a build with CUDA");
}

// A call needs `required` bytes of workspace starting on an `align`-byte boundary (CUDA
// calls: 256).
inline void check_workspace(const Workspace& ws, size_t required, const char* function,
                            size_t align = kWorkspaceAlign) {
  MODMOE_CHECK(ws.bytes >= required, function, ": argument 'workspace' has ", ws.bytes,
               " bytes: expected at least ", required,
               " bytes (size it with the matching *_workspace_size)");
  if (required == 0) return;
  MODMOE_CHECK(ws.data != nullptr, function,
               ": argument 'workspace' has a null pointer: expected ", required, " bytes");
  const auto addr = reinterpret_cast<uintptr_t>(ws.data);
  MODMOE_CHECK(addr % align == 0, function, ": argument 'workspace' starts at 0x", std::hex,
               addr, std::dec, ": expected a ", align, "-byte aligned pointer");
}

}  // namespace modmoe::api
