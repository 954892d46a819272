// The NCCL communicator: device buffers, one CUDA stream, every call synchronised before it
// returns (gradfix reduces statistics a few times per job; simplicity beats overlap here). MPI
// only carries the ncclUniqueId from rank 0 to the others.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <thread>

#include "gradfix/dist/backend.hpp"
#include "gradfix/dist/mpi.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

ncclDataType_t nccl_type(DType dtype, const std::string& where) {
  switch (dtype) {
    case DType::kI8: return ncclInt8;
    case DType::kU8:
    case DType::kBool: return ncclUint8;
    case DType::kI32: return ncclInt32;
    case DType::kU32: return ncclUint32;
    case DType::kI64: return ncclInt64;
    case DType::kU64: return ncclUint64;
    case DType::kF16: return ncclFloat16;
    case DType::kBF16: return ncclBfloat16;
    case DType::kF32: return ncclFloat32;
    case DType::kF64: return ncclFloat64;
    default: break;
  }
  throw RuntimeFailure(where + ": NCCL has no " + dtype_name(dtype) + " type (use I8 or I32 for vote counts)");
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, cudaStream_t stream, int device) : comm_(comm), stream_(stream), device_(device) {
    ncclCommCount(comm_, &size_);
    ncclCommUserRank(comm_, &rank_);
  }
  ~NcclCommunicator() override {
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }
  MemorySpace memory() const override { return MemorySpace::kDevice; }

  void allreduce(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) override {
    check(ncclAllReduce(send, recv, count, nccl_type(dtype, where()), nccl_op(op), comm_, stream_), "ncclAllReduce");
    synchronize("ncclAllReduce");
  }
  void reduce_scatter(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) override {
    check(ncclReduceScatter(send, recv, count, nccl_type(dtype, where()), nccl_op(op), comm_, stream_), "ncclReduceScatter");
    synchronize("ncclReduceScatter");
  }
  void broadcast(void* buffer, std::size_t count, DType dtype, int root) override {
    check(ncclBroadcast(buffer, buffer, count, nccl_type(dtype, where()), root, comm_, stream_), "ncclBroadcast");
    synchronize("ncclBroadcast");
  }
  void allgather(const void* send, void* recv, std::size_t count, DType dtype) override {
    check(ncclAllGather(send, recv, count, nccl_type(dtype, where()), comm_, stream_), "ncclAllGather");
    synchronize("ncclAllGather");
  }
  void barrier() override {
    // NCCL has no barrier: an all-reduce of one value on the device serves as one.
    void* token = nullptr;
    checked_cuda(cudaMalloc(&token, sizeof(int)), "cudaMalloc");
    cudaMemsetAsync(token, 0, sizeof(int), stream_);
    const ncclResult_t result = ncclAllReduce(token, token, 1, ncclInt32, ncclSum, comm_, stream_);
    check(result, "ncclAllReduce (barrier)");
    synchronize("ncclAllReduce (barrier)");
    cudaFree(token);
  }
  void send(const void* buffer, std::size_t count, DType dtype, int peer) override {
    check(ncclSend(buffer, count, nccl_type(dtype, where()), peer, comm_, stream_), "ncclSend");
    synchronize("ncclSend");
  }
  void recv(void* buffer, std::size_t count, DType dtype, int peer) override {
    check(ncclRecv(buffer, count, nccl_type(dtype, where()), peer, comm_, stream_), "ncclRecv");
    synchronize("ncclRecv");
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    ncclComm_t part = nullptr;
    check(ncclCommSplit(comm_, color, key, &part, nullptr), "ncclCommSplit");
    cudaStream_t stream = nullptr;
    checked_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    return std::make_unique<NcclCommunicator>(part, stream, device_);
  }

 private:
  std::string where() const { return describe_rank(*this) + " (CUDA device " + std::to_string(device_) + ")"; }
  void check(ncclResult_t result, const char* operation) const {
    if (result != ncclSuccess)
      throw RuntimeFailure(std::string(operation) + " failed on " + where() + ": " + ncclGetErrorString(result));
  }
  void checked_cuda(cudaError_t result, const char* operation) const {
    if (result != cudaSuccess)
      throw RuntimeFailure(std::string(operation) + " failed on " + where() + ": " + cudaGetErrorString(result));
  }
  // Waits for the stream under the watchdog (--timeout, shared with MPI): the stream is polled,
  // NCCL's asynchronous errors are checked, and a collective that does not complete in time
  // aborts the communicator (ncclCommAbort) instead of waiting for a peer that will not come.
  void synchronize(const char* operation) {
    const double timeout = MpiCommunicator::collective_timeout();
    if (timeout <= 0.0) {
      checked_cuda(cudaStreamSynchronize(stream_), operation);
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    for (long long polls = 0;; ++polls) {
      const cudaError_t state = cudaStreamQuery(stream_);
      if (state == cudaSuccess) return;
      if (state != cudaErrorNotReady) checked_cuda(state, operation);
      ncclResult_t pending = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &pending) == ncclSuccess && pending != ncclSuccess && pending != ncclInProgress) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        throw RuntimeFailure(std::string(operation) + " failed on " + where() + ": " + ncclGetErrorString(pending));
      }
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (waited > timeout) {
        const std::string message = std::string(operation) + " did not complete within " + std::to_string(static_cast<long long>(timeout)) +
                                    " s (--timeout) on " + where() + ": a peer stopped answering; the NCCL communicator was aborted";
        ncclCommAbort(comm_);
        comm_ = nullptr;
        throw CollectiveTimeout(message + "; stopping every rank");
      }
      if (polls > 1000) std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int device_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

// Set-up is where ranks fail for local reasons (no GPU visible, a device that will not take a
// context, no network for NCCL's id): every rank first does its own part, then all agree on the
// outcome over MPI before anyone waits for the unique id, so a failure on any rank, rank 0's
// ncclGetUniqueId included, ends the set-up on every rank instead of leaving them in a broadcast.
std::unique_ptr<Communicator> make_nccl_communicator(MpiCommunicator& bootstrap, int local_rank) {
  const std::string where = describe_rank(bootstrap);
  std::string failure;
  int device = 0;
  ncclUniqueId id{};
  int devices = 0;
  const cudaError_t counted = cudaGetDeviceCount(&devices);
  if (counted != cudaSuccess || devices == 0) {
    failure = "--backend nccl needs a CUDA device, but " + where + " sees none (" +
              (counted != cudaSuccess ? cudaGetErrorString(counted) : "cudaGetDeviceCount returned 0") +
              "); use --backend mpi, or run on GPU nodes";
  } else {
    // One rank per GPU: the local rank picks the device. With --gpus-per-task=1 each rank sees
    // one device and the modulo maps every rank to it.
    device = local_rank % devices;
    const cudaError_t set = cudaSetDevice(device);
    if (set != cudaSuccess) failure = "cudaSetDevice(" + std::to_string(device) + ") failed on " + where + ": " + cudaGetErrorString(set);
  }
  if (failure.empty() && bootstrap.rank() == 0) {
    const ncclResult_t made = ncclGetUniqueId(&id);
    if (made != ncclSuccess) failure = std::string("ncclGetUniqueId failed on ") + where + ": " + ncclGetErrorString(made);
  }
  int first_failed = failure.empty() ? bootstrap.size() : bootstrap.rank();
  bootstrap.allreduce(&first_failed, &first_failed, 1, DType::kI32, ReduceOp::kMin);
  if (first_failed < bootstrap.size()) {
    // Every rank knows: the first failing rank reports, the others stop silently.
    if (bootstrap.rank() != first_failed)
      throw PeerFailure("--backend nccl: set-up stopped because rank " + std::to_string(first_failed) + " failed", kExitRuntimeFailure);
    RuntimeFailure error(failure);
    error.mark_agreed();
    throw error;
  }
  bootstrap.broadcast(&id, sizeof id, DType::kU8, 0);
  ncclComm_t comm = nullptr;
  const ncclResult_t joined = ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank());
  if (joined != ncclSuccess)
    throw RuntimeFailure(std::string("ncclCommInitRank failed on ") + where + ": " + ncclGetErrorString(joined));
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess)
    throw RuntimeFailure("cudaStreamCreate failed on " + where);
  return std::make_unique<NcclCommunicator>(comm, stream, device);
}

}  // namespace gradfix
