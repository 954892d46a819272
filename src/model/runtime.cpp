// How the LibTorch part runs on a node: its threads beside the other ranks, and glibc's allocator.
#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include <torch/torch.h>

#include "gradfix/model/jobs.hpp"

namespace gradfix {

bool torch_available() { return true; }

int configure_threads(int ranks_on_node) {
  int threads = 0;
  if (const char* forced = std::getenv("GRADFIX_THREADS")) {
    char* end = nullptr;
    const long value = std::strtol(forced, &end, 10);
    if (end == forced || *end != '\0' || value < 1 || value > 4096)
      throw InputError(std::string("GRADFIX_THREADS='") + forced + "': expected a number of threads from 1 to 4096");
    threads = static_cast<int>(value);
  } else {
    cpu_set_t mask;
    CPU_ZERO(&mask);
    const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
    int usable = ::sched_getaffinity(0, sizeof mask, &mask) == 0 ? CPU_COUNT(&mask) : static_cast<int>(online);
    // A mask of the whole node: the launcher bound nothing, and the node's ranks share it.
    if (usable >= online) usable = static_cast<int>(online) / std::max(1, ranks_on_node);
    threads = std::max(1, usable);
  }
  torch::set_num_threads(threads);
  // LibTorch parallelises around its BLAS calls with its own OpenMP pool. A pthreads OpenBLAS
  // (Debian's default) keeps a second pool of one thread per core, and the OpenMP threads spin
  // while they wait, so the two pools fight over the rank's cores: an MLP trained 2.1x slower with
  // two threads than with one on a 2-core machine (docs/benchmarks.md). OpenBLAS gets one thread
  // inside LibTorch's pool unless the user set OPENBLAS_NUM_THREADS.
  if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr) {
    using SetThreads = void (*)(int);
    if (auto set_blas_threads = reinterpret_cast<SetThreads>(::dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) set_blas_threads(1);
  }
  return threads;
}

void configure_allocator() {
#ifdef __GLIBC__
  for (const char* variable : {"GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"})
    if (std::getenv(variable) != nullptr) return;
  // Fixed values also end glibc's own adjustment, which raises the mapping threshold to the
  // largest block freed so far: whether a step faulted then depended on which temporaries
  // happened to come before it (the CNN's votes ran 0.08 or 0.11 ms per sample by that alone).
  // The one-task demo's evaluation batches (about 20 MB) need the 32 MiB: at 4 or 8 MiB it ran
  // as slowly as with glibc's defaults.
  ::mallopt(M_MMAP_THRESHOLD, 32 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 64 << 20);
#endif
}

}  // namespace gradfix
