#include "gradfix/comm/backend.hpp"

#include <vector>

#include "gradfix/core/error.hpp"

#ifdef GRADFIX_HAVE_NCCL
#include <cuda_runtime_api.h>
#endif

namespace gradfix {

bool nccl_available() {
#ifdef GRADFIX_HAVE_NCCL
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef GRADFIX_HAVE_NCCL
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
#else
  return 0;
#endif
}

std::shared_ptr<Communicator> make_communicator(const std::string& name, MpiRuntime& runtime, bool tensors_on_device) {
  std::string chosen = name;
  if (name == "auto") chosen = tensors_on_device ? "nccl" : "mpi";
  if (chosen == "mpi") return std::shared_ptr<Communicator>(&runtime.world(), [](Communicator*) {});
  if (chosen != "nccl") throw InputError("unknown --backend '" + name + "'; valid: auto|mpi|nccl");
#ifdef GRADFIX_HAVE_NCCL
  return make_nccl_communicator(runtime.world(), runtime.local_rank());
#else
  throw InputError("--backend nccl: this gradfix was built without NCCL (CUDA and NCCL were not found at configure "
                   "time); rebuild on a machine with them, or use --backend mpi");
#endif
}

void allreduce_host(Communicator& comm, void* buffer, std::size_t count, DType dtype, ReduceOp op) {
  if (comm.size() == 1 || count == 0) return;
  if (comm.memory() == MemorySpace::kHost) {
    comm.allreduce(buffer, buffer, count, dtype, op);
    return;
  }
#ifdef GRADFIX_HAVE_NCCL
  const std::size_t bytes = count * dtype_size(dtype);
  void* device = nullptr;
  if (cudaMalloc(&device, bytes) != cudaSuccess)
    throw RuntimeFailure("cudaMalloc of " + std::to_string(bytes) + " bytes failed on " + describe_rank(comm));
  try {
    if (cudaMemcpy(device, buffer, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
      throw RuntimeFailure("cudaMemcpy to the device failed on " + describe_rank(comm));
    comm.allreduce(device, device, count, dtype, op);
    if (cudaMemcpy(buffer, device, bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
      throw RuntimeFailure("cudaMemcpy to the host failed on " + describe_rank(comm));
  } catch (...) {
    cudaFree(device);
    throw;
  }
  cudaFree(device);
#else
  throw RuntimeFailure("a device communicator in a build without CUDA on " + describe_rank(comm));
#endif
}

}  // namespace gradfix
