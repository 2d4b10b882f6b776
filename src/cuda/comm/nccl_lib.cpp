#include "cuda/comm/nccl_lib.h"

#include <dlfcn.h>
#include <glob.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace modmoe::comm {
namespace {

std::vector<std::string> candidates() {
  std::vector<std::string> c;
  if (const char* env = std::getenv("MODMOE_NCCL_LIB"); env && *env) c.emplace_back(env);
  c.emplace_back("libnccl.so.2");
  for (const char* pattern : {"/usr/local/lib/python3*/dist-packages/nvidia/nccl/lib/libnccl.so.2",
                              "/usr/local/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2",
                              "/usr/lib/python3*/dist-packages/nvidia/nccl/lib/libnccl.so.2",
                              "/usr/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2",
                              "/opt/conda/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2",
                              "/opt/*/.venv/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2",
                              "/opt/*/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2"}) {
    glob_t g{};
    if (glob(pattern, 0, nullptr, &g) == 0) {
      for (size_t i = 0; i < g.gl_pathc; ++i) c.emplace_back(g.gl_pathv[i]);
    }
    globfree(&g);
  }
  c.emplace_back("/usr/local/cuda/lib64/libnccl.so.2");
  return c;
}

template <class F>
void bind(void* handle, F& fn, const char* name, const std::string& path) {
  fn = reinterpret_cast<F>(dlsym(handle, name));
  MODMOE_CHECK(fn != nullptr, "NCCL library '", path, "' has no symbol '", name,
               "': expected NCCL >= 2.19 (built against ", NCCL_MAJOR, ".", NCCL_MINOR, ".",
               NCCL_PATCH, ")");
}

NcclLib load() {
  std::string tried;
  for (const std::string& path : candidates()) {
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (h == nullptr) {
      tried += "\n  " + path + ": " + dlerror();
      continue;
    }
    NcclLib lib;
    lib.path = path;
    bind(h, lib.GetVersion, "ncclGetVersion", path);
    bind(h, lib.GetUniqueId, "ncclGetUniqueId", path);
    bind(h, lib.CommInitRank, "ncclCommInitRank", path);
    bind(h, lib.CommDestroy, "ncclCommDestroy", path);
    bind(h, lib.CommAbort, "ncclCommAbort", path);
    bind(h, lib.CommCount, "ncclCommCount", path);
    bind(h, lib.CommUserRank, "ncclCommUserRank", path);
    bind(h, lib.GetErrorString, "ncclGetErrorString", path);
    bind(h, lib.GroupStart, "ncclGroupStart", path);
    bind(h, lib.GroupEnd, "ncclGroupEnd", path);
    bind(h, lib.Send, "ncclSend", path);
    bind(h, lib.Recv, "ncclRecv", path);
    bind(h, lib.AllGather, "ncclAllGather", path);
    bind(h, lib.AllReduce, "ncclAllReduce", path);
    lib.GetVersion(&lib.version);
    MODMOE_CHECK(lib.version >= 21900, "NCCL library '", path, "' is version code ",
                 lib.version, ": expected 2.19 or newer (21900)");
    return lib;
  }
  MODMOE_FAIL("could not load NCCL (libnccl.so.2): expected it on LD_LIBRARY_PATH or named by "
              "MODMOE_NCCL_LIB. With PyTorch's wheel: export LD_LIBRARY_PATH=$(python3 -c "
              "'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))')/lib. "
              "Tried:", tried);
}

}  // namespace

const NcclLib& nccl() {
  static std::once_flag once;
  static NcclLib lib;
  static std::string error;
  std::call_once(once, [] {
    try {
      lib = load();
    } catch (const Error& e) {
      error = e.what();
    }
  });
  if (!error.empty()) throw Error(error);
  return lib;
}

}  // namespace modmoe::comm
