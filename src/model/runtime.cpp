// How the LibTorch part runs on a node: its threads beside the other ranks, and glibc's allocator.
#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/torch.h>

#include "gradfix/model/jobs.hpp"

namespace gradfix {

bool torch_available() { return true; }

namespace {
int g_configured_threads = 0;
}  // namespace

int configured_threads() { return g_configured_threads; }

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
  g_configured_threads = threads;
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

namespace {

// OpenBLAS's name for the kernel it runs, or empty when the BLAS is not OpenBLAS.
std::string openblas_kernel() {
  using CoreName = char* (*)();
  const auto core_name = reinterpret_cast<CoreName>(::dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  const char* name = core_name != nullptr ? core_name() : nullptr;
  return name != nullptr ? name : "";
}

}  // namespace

std::string blas_description() {
  const std::string kernel = openblas_kernel();
  if (kernel.empty()) return "BLAS: not OpenBLAS (LibTorch's own)";
  std::string line = "BLAS: OpenBLAS, kernel " + kernel;
  if (const char* replaced = std::getenv(kReplacedBlasKernelVariable))
    line += std::string(" (chosen by gradfix: OpenBLAS picked ") + replaced + " on this CPU; set OPENBLAS_CORETYPE to choose)";
  else if (std::getenv("OPENBLAS_CORETYPE") != nullptr)
    line += " (OPENBLAS_CORETYPE)";
  return line;
}

namespace {

// LibTorch's CPU tensors of 1 MiB and more, kept for reuse when freed. A sharded pass runs the
// same shapes for every group and layer, and each fresh block costs a page fault per 4 KiB when
// first written: with glibc returning every such block to the system, a third of `signs`'s time
// on a 20M-parameter Llama went to the kernel's page faults. A block is reused for a request of
// the same rounded size. The pool's footprint (blocks in use plus blocks kept) stays within the
// most it has had in use at once plus kSlackBlocks of its largest block: a miss first returns
// kept blocks to the system, oldest first. Without the slack, each group's new outputs (kept
// for the next stage) pushed out a block the next group needed, and a third of the requests
// still missed; with it, 97% hit, for 27 MiB more peak memory on that model.
class TensorBlockPool {
 public:
  static constexpr std::size_t kFrom = 1u << 20;
  static constexpr std::size_t kGranule = 64u << 10;
  static constexpr std::size_t kSlackBlocks = 4;

  void* take(std::size_t size) {
    std::vector<Block> evicted;
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The most recently kept block of this size: its pages are the likeliest still cached.
      for (std::size_t i = kept_.size(); i-- > 0;)
        if (kept_[i].size == size) {
          data = kept_[i].data;
          kept_.erase(kept_.begin() + static_cast<std::ptrdiff_t>(i));
          kept_bytes_ -= size;
          break;
        }
      largest_ = std::max(largest_, size);
      const std::size_t bound = std::max(peak_in_use_, in_use_ + size) + kSlackBlocks * largest_;
      while (data == nullptr && !kept_.empty() && in_use_ + kept_bytes_ + size > bound) {
        evicted.push_back(kept_.front());
        kept_bytes_ -= kept_.front().size;
        kept_.erase(kept_.begin());
      }
      in_use_ += size;
      peak_in_use_ = std::max(peak_in_use_, in_use_);
    }
    for (const auto& block : evicted) ::munmap(block.data, block.size);
    if (data == nullptr) data = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    std::lock_guard<std::mutex> lock(mutex_);
    if (data == MAP_FAILED) {
      in_use_ -= size;
      throw std::bad_alloc();
    }
    sizes_[data] = size;
    return data;
  }

  // Keeps a block this pool gave out for reuse; returns false (and does nothing) for any other.
  bool give_back(void* data) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = sizes_.find(data);
    if (found == sizes_.end()) return false;
    const std::size_t size = found->second;
    sizes_.erase(found);
    in_use_ -= size;
    kept_.push_back({data, size});
    kept_bytes_ += size;
    return true;
  }

  void release_kept() {
    std::vector<Block> kept;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      kept.swap(kept_);
      kept_bytes_ = 0;
      peak_in_use_ = in_use_;
    }
    for (const auto& block : kept) ::munmap(block.data, block.size);
  }

 private:
  struct Block {
    void* data;
    std::size_t size;
  };
  std::mutex mutex_;
  std::vector<Block> kept_;  // oldest first
  std::unordered_map<void*, std::size_t> sizes_;  // the blocks in use
  std::size_t kept_bytes_ = 0, in_use_ = 0, peak_in_use_ = 0, largest_ = 0;
};

TensorBlockPool& block_pool() {
  static TensorBlockPool* pool = new TensorBlockPool;  // never destroyed: tensors may outlive main
  return *pool;
}

void give_back_block(void* data) { block_pool().give_back(data); }

class ReusingCpuAllocator final : public c10::Allocator {
 public:
  // LibTorch 1.x declares allocate const, 2.x does not: both are defined, one overrides.
  c10::DataPtr allocate(std::size_t bytes) const { return make(bytes); }
  c10::DataPtr allocate(std::size_t bytes) { return make(bytes); }
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }
  // raw_allocate (oneDNN's convolutions use it) needs the data pointer as the deleter's context.
  c10::DeleterFnPtr raw_deleter() const override { return &free_raw; }

 private:
  static c10::DataPtr make(std::size_t bytes) {
    if (bytes < TensorBlockPool::kFrom) {
      void* data = c10::alloc_cpu(bytes);
      return {data, data, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    const std::size_t size = (bytes + TensorBlockPool::kGranule - 1) / TensorBlockPool::kGranule * TensorBlockPool::kGranule;
    void* data = block_pool().take(size);
    return {data, data, &give_back_block, c10::Device(c10::DeviceType::CPU)};
  }
  // A raw block is freed by its pointer alone: small ones came from alloc_cpu.
  static void free_raw(void* data) {
    if (!block_pool().give_back(data)) c10::free_cpu(data);
  }
};

}  // namespace

void configure_tensor_memory() {
  static ReusingCpuAllocator* allocator = new ReusingCpuAllocator;
  c10::SetCPUAllocator(allocator, 1);
}

void release_kept_tensor_memory() { block_pool().release_kept(); }

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
