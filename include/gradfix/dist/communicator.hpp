#pragma once
// A small interface over raw buffers, the only way gradfix's jobs talk between ranks. Two
// implementations: MpiCommunicator (host memory) and NcclCommunicator (device memory, created
// over an MPI communicator that only carries its unique id). Every failed call becomes a
// RuntimeFailure naming the operation, the rank and the host.

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "gradfix/io/dtype.hpp"

namespace gradfix {

enum class ReduceOp { kSum, kMax, kMin };
enum class MemorySpace { kHost, kDevice };

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "mpi" or "nccl".
  virtual const char* backend() const = 0;
  // Where the buffers passed to this communicator must live.
  virtual MemorySpace memory() const = 0;

  // In place when send == recv. Element types: I8, I16 (MPI only), I32, I64, F16, BF16, F32, F64.
  virtual void allreduce(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) = 0;
  // Reduces size() * count elements and leaves block rank() (count elements) in recv.
  virtual void reduce_scatter(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) = 0;
  virtual void broadcast(void* buffer, std::size_t count, DType dtype, int root) = 0;
  // recv receives size() * count elements, rank r's block at r * count.
  virtual void allgather(const void* send, void* recv, std::size_t count, DType dtype) = 0;
  virtual void barrier() = 0;
  virtual void send(const void* buffer, std::size_t count, DType dtype, int peer) = 0;
  virtual void recv(void* buffer, std::size_t count, DType dtype, int peer) = 0;
  // Ranks with the same color form a new communicator, ordered by key.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
};

// "rank 2/4 on node17": the prefix of every message about a distributed failure.
std::string describe_rank(const Communicator& comm);

// The host name of this process.
std::string host_name();

// Every rank's host name, by rank. Collective.
std::vector<std::string> gather_host_names(Communicator& comm);

// Where the ranks run, for the first lines of a job: "2 hosts: node1 ranks 0-1, node2 ranks 2-3"
// (hosts in the order of their first rank), with " (4 threads each)" per host where `threads`
// (this rank's compute threads) is positive. `hosts` is each rank's host name
// (gather_host_names). `local_rank` is this rank's place among the ranks MPI counts as its node's
// (they pick GPUs and divide threads): where that grouping is not the host names' grouping, the
// text says so. Collective; every rank gets the text.
std::string describe_placement(Communicator& comm, const std::vector<std::string>& hosts, int local_rank, int threads = 0);

}  // namespace gradfix
