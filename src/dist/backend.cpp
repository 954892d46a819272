#include "gradfix/dist/backend.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "gradfix/io/error.hpp"

#ifdef GRADFIX_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>
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

std::string nccl_version() {
#ifdef GRADFIX_HAVE_NCCL
  int code = 0;
  if (ncclGetVersion(&code) != ncclSuccess) return "unknown";
  // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
  return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." + std::to_string(code % 100);
#else
  return "";
#endif
}

std::string cuda_runtime_version() {
#ifdef GRADFIX_HAVE_NCCL
  int code = 0;
  if (cudaRuntimeGetVersion(&code) != cudaSuccess) return "unknown";
  return std::to_string(code / 1000) + "." + std::to_string(code % 1000 / 10);
#else
  return "";
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

namespace {

#ifdef GRADFIX_HAVE_NCCL
// A device buffer for staging host data through a device communicator.
class DeviceBuffer {
 public:
  DeviceBuffer(std::size_t bytes, const Communicator& comm) {
    if (cudaMalloc(&data_, bytes) != cudaSuccess)
      throw RuntimeFailure("cudaMalloc of " + std::to_string(bytes) + " bytes failed on " + describe_rank(comm));
  }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return data_; }

 private:
  void* data_ = nullptr;
};

void copy(void* target, const void* source, std::size_t bytes, cudaMemcpyKind kind, const Communicator& comm) {
  if (cudaMemcpy(target, source, bytes, kind) != cudaSuccess)
    throw RuntimeFailure("cudaMemcpy of " + std::to_string(bytes) + " bytes failed on " + describe_rank(comm));
}
#endif

}  // namespace

double allreduce_exact_sum(Communicator& comm, ExactSum& sum) {
  std::vector<ExactSum> one = {sum};
  return allreduce_exact_sums(comm, one).front();
}

std::vector<double> allreduce_exact_sums(Communicator& comm, std::vector<ExactSum>& sums) {
  std::vector<std::int64_t> limbs(sums.size() * ExactSum::kLimbs);
  for (std::size_t i = 0; i < sums.size(); ++i) {
    const auto& carried = sums[i].carried();
    std::copy(carried.begin(), carried.end(), limbs.begin() + static_cast<std::ptrdiff_t>(i * ExactSum::kLimbs));
  }
  if (comm.size() > 1) allreduce_host(comm, limbs.data(), limbs.size(), DType::kI64, ReduceOp::kSum);
  std::vector<double> totals(sums.size());
  for (std::size_t i = 0; i < sums.size(); ++i) {
    ExactSum total;
    std::copy_n(limbs.begin() + static_cast<std::ptrdiff_t>(i * ExactSum::kLimbs), ExactSum::kLimbs, total.limbs().begin());
    totals[i] = total.value();
  }
  return totals;
}

void allreduce_host(Communicator& comm, void* buffer, std::size_t count, DType dtype, ReduceOp op) {
  if (comm.size() == 1 || count == 0) return;
  if (comm.memory() == MemorySpace::kHost) {
    comm.allreduce(buffer, buffer, count, dtype, op);
    return;
  }
#ifdef GRADFIX_HAVE_NCCL
  const std::size_t bytes = count * dtype_size(dtype);
  DeviceBuffer device(bytes, comm);
  copy(device.get(), buffer, bytes, cudaMemcpyHostToDevice, comm);
  comm.allreduce(device.get(), device.get(), count, dtype, op);
  copy(buffer, device.get(), bytes, cudaMemcpyDeviceToHost, comm);
#else
  throw RuntimeFailure("a device communicator in a build without CUDA on " + describe_rank(comm));
#endif
}

void reduce_scatter_host(Communicator& comm, const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) {
  const std::size_t bytes = count * dtype_size(dtype);
  if (comm.size() == 1) {
    std::memcpy(recv, send, bytes);
    return;
  }
  if (comm.memory() == MemorySpace::kHost) {
    comm.reduce_scatter(send, recv, count, dtype, op);
    return;
  }
#ifdef GRADFIX_HAVE_NCCL
  DeviceBuffer device_send(bytes * static_cast<std::size_t>(comm.size()), comm);
  DeviceBuffer device_recv(bytes, comm);
  copy(device_send.get(), send, bytes * static_cast<std::size_t>(comm.size()), cudaMemcpyHostToDevice, comm);
  comm.reduce_scatter(device_send.get(), device_recv.get(), count, dtype, op);
  copy(recv, device_recv.get(), bytes, cudaMemcpyDeviceToHost, comm);
#else
  throw RuntimeFailure("a device communicator in a build without CUDA on " + describe_rank(comm));
#endif
}

}  // namespace gradfix
