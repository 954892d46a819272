#pragma once
// A communicator of one process that needs no MPI: the world of a job run from a library or a
// unit test. Collectives copy send to receive; there is no peer to send to.

#include "gradfix/dist/communicator.hpp"

namespace gradfix {

class SoloCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* backend() const override { return "solo"; }
  MemorySpace memory() const override { return MemorySpace::kHost; }

  void allreduce(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) override;
  void broadcast(void* buffer, std::size_t count, DType dtype, int root) override;
  void allgather(const void* send, void* recv, std::size_t count, DType dtype) override;
  void barrier() override {}
  void send(const void* buffer, std::size_t count, DType dtype, int peer) override;
  void recv(void* buffer, std::size_t count, DType dtype, int peer) override;
  std::unique_ptr<Communicator> split(int color, int key) override;
};

// The one solo communicator of this process.
SoloCommunicator& solo_communicator();

}  // namespace gradfix
