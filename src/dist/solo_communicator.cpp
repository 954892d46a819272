#include "gradfix/dist/solo.hpp"

#include <cstring>

#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

void copy(const void* send, void* recv, std::size_t count, DType dtype) {
  if (send != recv && count > 0) std::memcpy(recv, send, count * dtype_size(dtype));
}

}  // namespace

void SoloCommunicator::allreduce(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp) {
  copy(send, recv, count, dtype);
}
void SoloCommunicator::reduce_scatter(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp) {
  copy(send, recv, count, dtype);
}
void SoloCommunicator::broadcast(void*, std::size_t, DType, int root) {
  GRADFIX_CHECK(root == 0, "a world of one has only rank 0");
}
void SoloCommunicator::allgather(const void* send, void* recv, std::size_t count, DType dtype) {
  copy(send, recv, count, dtype);
}
void SoloCommunicator::send(const void*, std::size_t, DType, int peer) {
  throw RuntimeFailure("send to rank " + std::to_string(peer) + " in a world of one process");
}
void SoloCommunicator::recv(void*, std::size_t, DType, int peer) {
  throw RuntimeFailure("receive from rank " + std::to_string(peer) + " in a world of one process");
}
std::unique_ptr<Communicator> SoloCommunicator::split(int, int) { return std::make_unique<SoloCommunicator>(); }

SoloCommunicator& solo_communicator() {
  static SoloCommunicator solo;
  return solo;
}

}  // namespace gradfix
