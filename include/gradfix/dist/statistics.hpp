#pragma once
// Sign statistics between ranks. Per-sample votes sum(sign(-grad_n)) are integers, so they are
// kept in the narrowest integer type that cannot overflow for the number of voters and that the
// backend can reduce, and their sums are exact whatever the rank count or reduction order.
// Mean-mode sums of -grad are reduced in fp64.
//
// Two reductions, both in buckets of bounded size so that memory stays bounded for any model:
//  - reduce_scatter_statistics: every rank computed statistics for the whole parameter space (a
//    data-parallel gradient pass) but needs only its own shard. Bucket k holds the k-th slice of
//    every rank's shard, so one reduce-scatter per bucket leaves each rank its slice: half the
//    bytes of an all-reduce, as ZeRO and FSDP do.
//  - allreduce_statistics: every rank needs the complete statistics (they stay replicated).

#include <vector>

#include "gradfix/dist/communicator.hpp"
#include "gradfix/dist/plan.hpp"

namespace gradfix {

constexpr long long kDefaultBucketElements = 1LL << 24;

// I8 for up to 127 voters, I16 up to 32767 where the backend reduces it (MPI; NCCL has no
// int16), else I32 (up to 2^31 - 1 voters).
DType vote_count_dtype(long long voters, const Communicator& comm);

// `full` holds plan.total_elements() statistics of `dtype` laid out like the plan's flat space;
// `mine` receives the reduced statistics of this rank's flat range.
void reduce_scatter_statistics(Communicator& comm, const ShardPlan& plan, const void* full, void* mine, DType dtype,
                               long long bucket_elements = kDefaultBucketElements);

// Sums `count` statistics in place across all ranks, bucket by bucket.
void allreduce_statistics(Communicator& comm, void* values, long long count, DType dtype,
                          long long bucket_elements = kDefaultBucketElements);

}  // namespace gradfix
