// Sign statistics between ranks under mpirun -np 1..4: the vote dtype, and bucketed
// reduce-scatter and all-reduce against sums computed locally from the same formula.
#include "gradfix/dist/statistics.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>

#include "gradfix/dist/mpi.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {

MpiCommunicator& test_world();

namespace {

// The vote of rank r for element i: a deterministic +-1 or 0.
int vote(int rank, long long i) { return static_cast<int>((i * 7 + rank * 3) % 3) - 1; }

std::vector<TensorInfo> model() {
  return {{"a", DType::kF32, {37, 11}}, {"b", DType::kF32, {9000}}, {"c", DType::kF32, {5, 5, 5}}, {"d", DType::kF32, {}}};
}

TEST(VoteDtype, NarrowestThatCannotOverflow) {
  MpiCommunicator& comm = test_world();
  EXPECT_EQ(vote_count_dtype(0, comm), DType::kI8);
  EXPECT_EQ(vote_count_dtype(127, comm), DType::kI8);
  EXPECT_EQ(vote_count_dtype(128, comm), DType::kI16);  // MPI reduces int16
  EXPECT_EQ(vote_count_dtype(32767, comm), DType::kI16);
  EXPECT_EQ(vote_count_dtype(32768, comm), DType::kI32);
  EXPECT_THROW(vote_count_dtype(1LL << 32, comm), InputError);
  // 127 voters all agreeing: the extreme sum fits int8 exactly.
  std::int8_t votes = 1, total = 0;
  for (int v = 0; v < 127; ++v) total = static_cast<std::int8_t>(total + votes);
  EXPECT_EQ(total, std::numeric_limits<std::int8_t>::max());
}

// Every rank holds votes for every parameter; after the reduce-scatter each rank holds the exact
// vote sums of its own shard, for several bucket sizes (one slice, many slices, ragged ends).
TEST(ReduceScatterStatistics, LeavesEachRankTheSumsOfItsShard) {
  MpiCommunicator& comm = test_world();
  const ShardPlan plan(model(), comm.size());
  const long long total = plan.total_elements();
  std::vector<std::int8_t> full(static_cast<std::size_t>(total));
  for (long long i = 0; i < total; ++i) full[static_cast<std::size_t>(i)] = static_cast<std::int8_t>(vote(comm.rank(), i));
  const auto [first, count] = plan.flat_range(comm.rank());
  for (long long bucket : {7LL, 1000LL, 1LL << 24}) {
    std::vector<std::int8_t> mine(static_cast<std::size_t>(count), 99);
    reduce_scatter_statistics(comm, plan, full.data(), mine.data(), DType::kI8, bucket);
    for (long long i = 0; i < count; ++i) {
      int expected = 0;
      for (int r = 0; r < comm.size(); ++r) expected += vote(r, first + i);
      ASSERT_EQ(mine[static_cast<std::size_t>(i)], expected) << "bucket " << bucket << " element " << first + i;
    }
  }
  // The ranges tile the flat space.
  long long covered = 0;
  for (int r = 0; r < comm.size(); ++r) {
    EXPECT_EQ(plan.flat_range(r).first, covered);
    covered += plan.flat_range(r).second;
  }
  EXPECT_EQ(covered, total);
}

TEST(AllreduceStatistics, MeanSumsInFp64) {
  MpiCommunicator& comm = test_world();
  std::vector<double> sums(5000);
  for (std::size_t i = 0; i < sums.size(); ++i) sums[i] = 0.25 * static_cast<double>(comm.rank() + 1) * static_cast<double>(i);
  allreduce_statistics(comm, sums.data(), static_cast<long long>(sums.size()), DType::kF64, 777);
  const double ranks = comm.size();
  for (std::size_t i = 0; i < sums.size(); ++i) ASSERT_EQ(sums[i], 0.25 * ranks * (ranks + 1) / 2 * static_cast<double>(i));
}

}  // namespace
}  // namespace gradfix
