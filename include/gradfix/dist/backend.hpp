#pragma once
// Choosing the statistics communicator by name. `auto` picks NCCL when the tensors are on CUDA
// devices and MPI otherwise; `nccl` on a machine without a usable GPU, or in a build without
// NCCL, is an error that says so, never a silent fall back to MPI.

#include <memory>
#include <string>

#include "gradfix/dist/mpi.hpp"
#include "gradfix/io/exact_sum.hpp"

namespace gradfix {

// Whether this build has the NCCL backend.
bool nccl_available();

// Number of CUDA devices visible to this process (0 in a build without CUDA).
int cuda_device_count();

// "2.27.3", the NCCL library in use; empty in a build without NCCL.
std::string nccl_version();
// "13.0", the CUDA runtime in use; empty in a build without CUDA.
std::string cuda_runtime_version();

// `name` is auto, mpi or nccl. `tensors_on_device` tells auto where the data lives. Returns the
// MPI world itself for mpi (not owned: null deleter), a new NcclCommunicator for nccl.
std::shared_ptr<Communicator> make_communicator(const std::string& name, MpiRuntime& runtime, bool tensors_on_device);

// Moves host data through a communicator of either memory space: a device communicator gets
// staged copies. Used for the statistics the CPU jobs reduce.
void allreduce_host(Communicator& comm, void* buffer, std::size_t count, DType dtype, ReduceOp op);
// The total of every rank's ExactSum (their limbs added as integers), read as a double: the same
// value whatever the number of ranks and wherever the ranks' pieces begin.
double allreduce_exact_sum(Communicator& comm, ExactSum& sum);
// The same for many sums at once (one collective): their totals in order.
std::vector<double> allreduce_exact_sums(Communicator& comm, std::vector<ExactSum>& sums);

// reduce_scatter of host buffers through a communicator of either memory space.
void reduce_scatter_host(Communicator& comm, const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op);

#ifdef GRADFIX_HAVE_NCCL
std::unique_ptr<Communicator> make_nccl_communicator(MpiCommunicator& bootstrap, int local_rank);
#endif

}  // namespace gradfix
