// NCCL, loaded at run time. libmodmoe does not link NCCL: the CPU-only and single-GPU users
// of the library (and its tests) then need no libnccl at load time. The all-to-all, the
// `modmoe ep-demo`/`bench all-to-all` commands and the multi-GPU tests load libnccl.so.2 the
// first time they need it. The caller that created the communicator must use the same
// library: dlopen("libnccl.so.2") returns the copy that is already loaded, if any.
//
// Search order: $MODMOE_NCCL_LIB (a full path), then "libnccl.so.2" through the loader's
// usual path (LD_LIBRARY_PATH, rpath, ldconfig), then the nvidia-nccl-cu13 wheel of the
// system Pythons and of /opt/*/.venv (site/dist-packages/nvidia/nccl/lib), then
// /usr/local/cuda/lib64.
#pragma once

#include <nccl.h>

#include <string>

#include "modmoe/error.h"

namespace modmoe::comm {

struct NcclLib {
  decltype(&::ncclGetVersion) GetVersion = nullptr;
  decltype(&::ncclGetUniqueId) GetUniqueId = nullptr;
  decltype(&::ncclCommInitRank) CommInitRank = nullptr;
  decltype(&::ncclCommDestroy) CommDestroy = nullptr;
  decltype(&::ncclCommAbort) CommAbort = nullptr;
  decltype(&::ncclCommCount) CommCount = nullptr;
  decltype(&::ncclCommUserRank) CommUserRank = nullptr;
  decltype(&::ncclGetErrorString) GetErrorString = nullptr;
  decltype(&::ncclGroupStart) GroupStart = nullptr;
  decltype(&::ncclGroupEnd) GroupEnd = nullptr;
  decltype(&::ncclSend) Send = nullptr;
  decltype(&::ncclRecv) Recv = nullptr;
  decltype(&::ncclAllGather) AllGather = nullptr;
  decltype(&::ncclAllReduce) AllReduce = nullptr;
  std::string path;  // the file that was loaded
  int version = 0;   // NCCL_VERSION_CODE of the loaded library, e.g. 22809
};

// The loaded library; throws modmoe::Error naming the places searched when none loads.
const NcclLib& nccl();

}  // namespace modmoe::comm

// MODMOE_NCCL_CHECK(nccl().Send(...)): throws modmoe::Error with NCCL's message.
#define MODMOE_NCCL_CHECK(call)                                                          \
  do {                                                                                   \
    const ncclResult_t modmoe_nccl_res_ = (call);                                        \
    if (modmoe_nccl_res_ != ncclSuccess) {                                               \
      MODMOE_FAIL("NCCL error ", static_cast<int>(modmoe_nccl_res_), " (",               \
                  ::modmoe::comm::nccl().GetErrorString(modmoe_nccl_res_), ") from `",   \
                  #call, "`");                                                           \
    }                                                                                    \
  } while (0)
