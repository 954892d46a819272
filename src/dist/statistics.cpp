#include "gradfix/dist/statistics.hpp"

#include <algorithm>
#include <cstring>

#include "gradfix/dist/backend.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {

DType vote_count_dtype(long long voters, const Communicator& comm) {
  if (voters < 0) throw InputError("a negative number of voters: " + std::to_string(voters));
  if (voters <= 127) return DType::kI8;
  if (voters <= 32767 && std::string(comm.backend()) != "nccl") return DType::kI16;
  if (voters <= 2147483647LL) return DType::kI32;
  throw InputError("more than 2^31 - 1 voters (" + std::to_string(voters) + ") cannot be counted in 32 bits");
}

void reduce_scatter_statistics(Communicator& comm, const ShardPlan& plan, const void* full, void* mine, DType dtype,
                               long long bucket_elements) {
  if (plan.ranks() != comm.size())
    throw RuntimeFailure("shard plan for " + std::to_string(plan.ranks()) + " ranks used on " + describe_rank(comm));
  const auto item = static_cast<long long>(dtype_size(dtype));
  const long long my_count = plan.flat_range(comm.rank()).second;
  long long longest = 0;
  for (int r = 0; r < comm.size(); ++r) longest = std::max(longest, plan.flat_range(r).second);
  const long long slice = std::max(1LL, std::min(bucket_elements / comm.size(), longest));
  // One bucket: the k-th slice of each rank's range, zero-padded past the range's end.
  std::vector<unsigned char> send(static_cast<std::size_t>(slice * comm.size() * item));
  std::vector<unsigned char> receive(static_cast<std::size_t>(slice * item));
  for (long long offset = 0; offset < longest; offset += slice) {
    std::fill(send.begin(), send.end(), 0);
    for (int r = 0; r < comm.size(); ++r) {
      const auto [first, count] = plan.flat_range(r);
      const long long length = std::max(0LL, std::min(slice, count - offset));
      if (length > 0)
        std::memcpy(send.data() + static_cast<std::size_t>(r * slice * item),
                    static_cast<const unsigned char*>(full) + (first + offset) * item, static_cast<std::size_t>(length * item));
    }
    reduce_scatter_host(comm, send.data(), receive.data(), static_cast<std::size_t>(slice), dtype, ReduceOp::kSum);
    const long long length = std::max(0LL, std::min(slice, my_count - offset));
    if (length > 0)
      std::memcpy(static_cast<unsigned char*>(mine) + offset * item, receive.data(), static_cast<std::size_t>(length * item));
  }
}

void allreduce_statistics(Communicator& comm, void* values, long long count, DType dtype, long long bucket_elements) {
  const auto item = static_cast<long long>(dtype_size(dtype));
  for (long long offset = 0; offset < count; offset += bucket_elements) {
    const long long length = std::min(bucket_elements, count - offset);
    allreduce_host(comm, static_cast<unsigned char*>(values) + offset * item, static_cast<std::size_t>(length), dtype, ReduceOp::kSum);
  }
}

}  // namespace gradfix
