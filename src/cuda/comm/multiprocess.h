// One process per GPU, by fork: the launcher that `modmoe ep-demo`, `modmoe bench all-to-all`
// and tests/multigpu use. Header-only and not part of the library (it forks and _exits).
//
// The parent never touches CUDA: CUDA is not fork-safe, so the GPU count comes from a probe
// child, and the NCCL unique id is made by rank 0's process after the fork and handed to the
// others through a shared page. NCCL_NVLS_ENABLE=0 is forced in every child: NVLink multicast
// can take a shared host's GPUs out of service.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <new>
#include <thread>
#include <vector>

#include "cuda/comm/nccl_lib.h"
#include "cuda/device/cuda_check.h"

namespace modmoe::comm::mp {

// Anonymous shared memory, created before the fork and visible to every child.
class SharedMemory {
 public:
  explicit SharedMemory(size_t bytes) : bytes_(bytes) {
    ptr_ = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    MODMOE_CHECK(ptr_ != MAP_FAILED, "mmap of ", bytes, " shared bytes failed");
  }
  ~SharedMemory() { munmap(ptr_, bytes_); }
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  void* data() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Where rank 0 leaves the NCCL unique id for the others.
struct Rendezvous {
  std::atomic<int> state;  // 0 waiting, 1 id ready, 2 rank 0 failed
  ncclUniqueId id;
};

// The GPUs a fresh process sees, counted in a probe child (0 without a driver).
inline int probe_gpu_count() {
  static int cached = -1;
  if (cached >= 0) return cached;
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    _exit(n > 250 ? 250 : n);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  cached = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
  return cached;
}

// Runs fn(rank) in `n` child processes and waits for all of them. Returns each rank's exit
// code: fn's return value, 1 for an exception (printed), 128 + signal when killed, 124 when
// the deadline passed (the parent then kills the rank, by its pid).
inline std::vector<int> run_ranks(int n, double timeout_s, const std::function<int(int)>& fn) {
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  std::fflush(nullptr);
  std::vector<pid_t> pids;
  for (int r = 0; r < n; ++r) {
    const pid_t pid = fork();
    MODMOE_CHECK(pid >= 0, "fork of rank ", r, " failed");
    if (pid == 0) {
      int code = 1;
      try {
        code = fn(r);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "[rank %d] error: %s\n", r, e.what());
      }
      std::fflush(nullptr);
      _exit(code);
    }
    pids.push_back(pid);
  }
  std::vector<int> codes(static_cast<size_t>(n), -1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  int left = n;
  while (left > 0) {
    for (int r = 0; r < n; ++r) {
      if (codes[r] != -1) continue;
      int status = 0;
      const pid_t got = waitpid(pids[r], &status, WNOHANG);
      if (got == pids[r]) {
        codes[r] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        --left;
      }
    }
    if (left > 0 && std::chrono::steady_clock::now() > deadline) {
      for (int r = 0; r < n; ++r) {
        if (codes[r] != -1) continue;
        std::fprintf(stderr, "[launcher] rank %d (pid %d) still running after %.0f s: killing it\n",
                     r, static_cast<int>(pids[r]), timeout_s);
        kill(pids[r], SIGKILL);
        waitpid(pids[r], nullptr, 0);
        codes[r] = 124;
        --left;
      }
    }
    if (left > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return codes;
}

// In a child: the id made by rank 0.
inline ncclUniqueId shared_unique_id(Rendezvous* rv, int rank, double timeout_s = 120.0) {
  if (rank == 0) {
    try {
      ncclUniqueId id;
      MODMOE_NCCL_CHECK(nccl().GetUniqueId(&id));
      rv->id = id;
      rv->state.store(1, std::memory_order_release);
    } catch (...) {
      rv->state.store(2, std::memory_order_release);
      throw;
    }
    return rv->id;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (true) {
    const int s = rv->state.load(std::memory_order_acquire);
    if (s == 1) return rv->id;
    MODMOE_CHECK(s != 2, "rank ", rank, ": rank 0 could not create the NCCL unique id");
    MODMOE_CHECK(std::chrono::steady_clock::now() < deadline, "rank ", rank,
                 ": no NCCL unique id from rank 0 after ", timeout_s, " s");
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// One rank's device and communicator; destroys the communicator when it goes.
class RankComm {
 public:
  RankComm(Rendezvous* rv, int rank, int num_ranks, int device) : rank_(rank) {
    MODMOE_CUDA_CHECK(cudaSetDevice(device));
    const ncclUniqueId id = shared_unique_id(rv, rank);
    MODMOE_NCCL_CHECK(nccl().CommInitRank(&comm_, num_ranks, id, rank));
  }
  ~RankComm() {
    if (comm_) nccl().CommDestroy(comm_);
  }
  RankComm(const RankComm&) = delete;
  RankComm& operator=(const RankComm&) = delete;
  ncclComm_t get() const { return comm_; }
  int rank() const { return rank_; }

  // A barrier over the communicator (an all-reduce of one int), synchronised on the host.
  void barrier() const {
    int* d = nullptr;
    MODMOE_CUDA_CHECK(cudaMalloc(&d, sizeof(int)));
    MODMOE_NCCL_CHECK(nccl().AllReduce(d, d, 1, ncclInt32, ncclSum, comm_, nullptr));
    MODMOE_CUDA_CHECK(cudaStreamSynchronize(nullptr));
    MODMOE_CUDA_CHECK(cudaFree(d));
  }

 private:
  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
};

}  // namespace modmoe::comm::mp
