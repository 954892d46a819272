// The communicators under mpirun -np 1..4: every operation and element type against values
// computed by hand from the rank numbers. The NCCL test compares NCCL's all-reduce with MPI's and
// skips itself, saying why, where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <unistd.h>
#include <cstdint>
#include <numeric>
#include <thread>
#include <vector>

#include "gradfix/dist/backend.hpp"
#include "gradfix/dist/mpi.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/dist/collective_output.hpp"
#include "gradfix/dist/job_context.hpp"
#include "gradfix/io/atomic_file.hpp"

#ifdef GRADFIX_HAVE_NCCL
#include <cuda_runtime_api.h>
#endif

namespace gradfix {

extern MpiRuntime* g_runtime;
MpiCommunicator& test_world();

namespace {

MpiCommunicator& world() { return test_world(); }

template <typename T>
void expect_allreduce(DType dtype) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  const std::size_t n = 1000;
  std::vector<T> values(n), sum(n), max(n), min(n);
  for (std::size_t i = 0; i < n; ++i) values[i] = static_cast<T>((r + 1) * static_cast<int>(i % 7) - 3);
  comm.allreduce(values.data(), sum.data(), n, dtype, ReduceOp::kSum);
  comm.allreduce(values.data(), max.data(), n, dtype, ReduceOp::kMax);
  comm.allreduce(values.data(), min.data(), n, dtype, ReduceOp::kMin);
  for (std::size_t i = 0; i < n; ++i) {
    const int k = static_cast<int>(i % 7);
    // sum_{r=0}^{p-1} ((r + 1) k - 3) = k p (p + 1) / 2 - 3 p
    ASSERT_EQ(static_cast<double>(sum[i]), k * p * (p + 1) / 2.0 - 3.0 * p) << dtype_name(dtype) << " " << i;
    ASSERT_EQ(static_cast<double>(max[i]), static_cast<double>(p * k - 3));
    ASSERT_EQ(static_cast<double>(min[i]), static_cast<double>(k - 3));
  }
  std::vector<T> in_place = values;
  comm.allreduce(in_place.data(), in_place.data(), n, dtype, ReduceOp::kSum);
  EXPECT_EQ(in_place, sum);
}

TEST(MpiCommunicator, AllreduceIntegersAndFloats) {
  expect_allreduce<std::int8_t>(DType::kI8);
  expect_allreduce<std::int16_t>(DType::kI16);
  expect_allreduce<std::int32_t>(DType::kI32);
  expect_allreduce<std::int64_t>(DType::kI64);
  expect_allreduce<float>(DType::kF32);
  expect_allreduce<double>(DType::kF64);
}

TEST(MpiCommunicator, AllreduceHalfPrecision) {
  MpiCommunicator& comm = world();
  const int p = comm.size();
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    const bool brain = dtype == DType::kBF16;
    std::vector<std::uint16_t> values(64), sum(64), max(64);
    for (std::size_t i = 0; i < values.size(); ++i) {
      const float value = 0.5f * static_cast<float>(i) - static_cast<float>(comm.rank());
      values[i] = brain ? f32_to_bf16(value) : f32_to_f16(value);
    }
    comm.allreduce(values.data(), sum.data(), values.size(), dtype, ReduceOp::kSum);
    comm.allreduce(values.data(), max.data(), values.size(), dtype, ReduceOp::kMax);
    for (std::size_t i = 0; i < values.size(); ++i) {
      // Small integers and halves are exact in both formats.
      const float expected = 0.5f * static_cast<float>(i) * p - p * (p - 1) / 2.0f;
      EXPECT_EQ(brain ? bf16_to_f32(sum[i]) : f16_to_f32(sum[i]), expected) << dtype_name(dtype) << " " << i;
      EXPECT_EQ(brain ? bf16_to_f32(max[i]) : f16_to_f32(max[i]), 0.5f * static_cast<float>(i));
    }
  }
}

TEST(MpiCommunicator, ReduceScatterBroadcastAllgather) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  const std::size_t block = 5;
  std::vector<std::int32_t> full(block * static_cast<std::size_t>(p));
  std::iota(full.begin(), full.end(), r);
  std::vector<std::int32_t> mine(block);
  comm.reduce_scatter(full.data(), mine.data(), block, DType::kI32, ReduceOp::kSum);
  for (std::size_t i = 0; i < block; ++i) {
    const int index = r * static_cast<int>(block) + static_cast<int>(i);
    EXPECT_EQ(mine[i], p * index + p * (p - 1) / 2);  // sum over ranks q of (index + q)
  }
  double value = r == p - 1 ? 3.25 : -1.0;
  comm.broadcast(&value, 1, DType::kF64, p - 1);
  EXPECT_EQ(value, 3.25);
  std::int64_t rank_squared = static_cast<std::int64_t>(r) * r;
  std::vector<std::int64_t> gathered(static_cast<std::size_t>(p));
  comm.allgather(&rank_squared, gathered.data(), 1, DType::kI64);
  for (int q = 0; q < p; ++q) EXPECT_EQ(gathered[static_cast<std::size_t>(q)], q * q);
  comm.barrier();
}

TEST(MpiCommunicator, SendRecvRingAndSplit) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  if (p > 1) {
    std::vector<float> out(100, static_cast<float>(r)), in(100, -1.0f);
    // Even ranks send first, odd ranks receive first: no deadlock for any p.
    const int next = (r + 1) % p, previous = (r + p - 1) % p;
    if (r % 2 == 0) {
      comm.send(out.data(), out.size(), DType::kF32, next);
      comm.recv(in.data(), in.size(), DType::kF32, previous);
    } else {
      comm.recv(in.data(), in.size(), DType::kF32, previous);
      comm.send(out.data(), out.size(), DType::kF32, next);
    }
    EXPECT_EQ(in, std::vector<float>(100, static_cast<float>(previous)));
  }
  auto half = comm.split(r % 2, r);
  EXPECT_EQ(half->size(), (p + 1 - r % 2) / 2);
  EXPECT_EQ(half->rank(), r / 2);
  int one = 1, count = 0;
  half->allreduce(&one, &count, 1, DType::kI32, ReduceOp::kSum);
  EXPECT_EQ(count, half->size());
}

// The helper thread's twin (--prefetch): MPI_THREAD_MULTIPLE was granted, and a sequence of
// broadcasts on the twin in a second thread runs while the main thread all-reduces on the world,
// neither seeing the other's messages.
TEST(MpiCommunicator, TwinRunsItsOwnSequenceOnAnotherThread) {
  MpiCommunicator& comm = world();
  const int p = comm.size(), r = comm.rank();
  ASSERT_TRUE(g_runtime->thread_multiple()) << mpi_library_version();
  const auto twin = comm.duplicate();
  EXPECT_EQ(twin->size(), p);
  EXPECT_EQ(twin->rank(), r);
  EXPECT_EQ(twin->rank_hosts(), comm.rank_hosts());
  constexpr int kRounds = 50;
  std::vector<std::vector<float>> received(kRounds);
  std::thread helper([&] {
    for (int round = 0; round < kRounds; ++round) {
      std::vector<float>& buffer = received[static_cast<std::size_t>(round)];
      const int root = round % p;
      buffer.assign(20000, r == root ? static_cast<float>(1000 * round + root) : -1.0f);
      twin->broadcast(buffer.data(), buffer.size(), DType::kF32, root);
    }
  });
  long long total = 0;
  for (int round = 0; round < kRounds; ++round) {
    long long mine = r + round, sum = 0;
    comm.allreduce(&mine, &sum, 1, DType::kI64, ReduceOp::kSum);
    total += sum;
  }
  helper.join();
  // sum over rounds of (sum_r r + p * round) = kRounds * p (p - 1) / 2 + p * kRounds (kRounds - 1) / 2
  EXPECT_EQ(total, static_cast<long long>(kRounds) * p * (p - 1) / 2 + static_cast<long long>(p) * kRounds * (kRounds - 1) / 2);
  for (int round = 0; round < kRounds; ++round)
    EXPECT_EQ(received[static_cast<std::size_t>(round)], std::vector<float>(20000, static_cast<float>(1000 * round + round % p))) << round;
}

TEST(Backend, ChoosesByNameAndNeverFallsBackSilently) {
  auto mpi = make_communicator("mpi", *g_runtime, false);
  EXPECT_STREQ(mpi->backend(), "mpi");
  EXPECT_STREQ(make_communicator("auto", *g_runtime, false)->backend(), "mpi");
  EXPECT_THROW(make_communicator("gloo", *g_runtime, false), InputError);
  if (cuda_device_count() == 0) {
    // No GPU here: asking for NCCL must fail with a message, not quietly use MPI.
    try {
      make_communicator("nccl", *g_runtime, false);
      FAIL() << "nccl without a GPU must fail";
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find("nccl"), std::string::npos) << error.what();
    }
  }
}

TEST(NcclCommunicator, AllreduceMatchesMpi) {
#ifndef GRADFIX_HAVE_NCCL
  GTEST_SKIP() << "this build has no NCCL backend (CUDA or NCCL not found at configure time)";
#else
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device on this machine: the NCCL path is built and linked but cannot run here";
  auto nccl = make_communicator("nccl", *g_runtime, true);
  ASSERT_STREQ(nccl->backend(), "nccl");
  const std::size_t n = 1 << 16;
  for (DType dtype : {DType::kI8, DType::kI32, DType::kF32, DType::kF64}) {
    std::vector<unsigned char> host(n * dtype_size(dtype));
    std::vector<float> values(n);
    for (std::size_t i = 0; i < n; ++i) values[i] = static_cast<float>(static_cast<int>(i % 13) - 6 + world().rank());
    convert_from_f32(dtype, values.data(), host.data(), n);
    std::vector<unsigned char> expected = host;
    world().allreduce(expected.data(), expected.data(), n, dtype, ReduceOp::kSum);
    std::vector<unsigned char> through_nccl = host;
    allreduce_host(*nccl, through_nccl.data(), n, dtype, ReduceOp::kSum);
    EXPECT_EQ(through_nccl, expected) << dtype_name(dtype);
  }
#endif
}

// A step that fails on the last rank only: every rank leaves the agreement with an error of
// the failing rank's exit code, only that rank's error is not silent, and the ranks that did not
// fail say which rank did.
TEST(JobContext, AgreementGivesEveryRankTheFailingRanksCode) {
  const JobContext context(world(), world());
  const int last = world().size() - 1;
  try {
    context.agree([&] {
      if (world().rank() == last) throw RuntimeFailure("disk full on the last rank");
    });
    ADD_FAILURE() << "the agreement passed although rank " << last << " failed";
  } catch (const Error& error) {
    EXPECT_EQ(error.exit_code(), kExitRuntimeFailure);
    if (world().size() > 1) {
      EXPECT_TRUE(error.agreed());  // one rank needs no agreement
    }
    EXPECT_EQ(error.silent(), world().rank() != last) << error.what();
    if (world().rank() != last) {
      EXPECT_NE(std::string(error.what()).find("rank " + std::to_string(last)), std::string::npos);
    }
  }
  // Success on every rank passes quietly, and a nested agreement's error passes the outer one
  // without another collective.
  EXPECT_NO_THROW(context.agree([] {}));
  try {
    context.agree([&] { context.agree([] { throw InputError("bad everywhere"); }); });
    ADD_FAILURE() << "nested failure lost";
  } catch (const Error& error) {
    EXPECT_EQ(error.exit_code(), kExitBadInput);
    EXPECT_EQ(error.silent(), world().rank() != 0);
  }
}

// Every rank writes its own half of each tensor through the collective writer: the file holds
// all of them, and nothing is published when one rank leaves a gap.
TEST(CollectiveWriter, RanksWriteTheirRangesOfOneFile) {
  const JobContext context(world(), world());
  std::string directory = "/tmp/gradfix-collective-XXXXXX";
  if (world().rank() == 0) directory = ::mkdtemp(directory.data());
  unsigned long long length = directory.size();
  world().broadcast(&length, 1, DType::kU64, 0);
  directory.resize(length);
  world().broadcast(directory.data(), length, DType::kU8, 0);
  const long long p = world().size(), r = world().rank();
  const std::vector<TensorInfo> layout = {{"a", DType::kF32, {p, 3}}, {"b", DType::kI32, {p}}};
  for (const std::string name : {"all.safetensors", "all.h5", "sharded"}) {
    const std::string path = directory + "/" + name;
    auto writer = open_collective_writer(context, path, layout, {{"k", "v"}}, 16);
    const std::vector<float> row = {static_cast<float>(r), static_cast<float>(r) + 0.5f, -1.0f};
    writer->write_f32("a", r * 3, row.data(), 3);
    const std::int32_t value = static_cast<std::int32_t>(10 * r);
    writer->write_raw("b", r, 1, &value);
    commit_collectively(context, *writer);
    world().barrier();
    const auto reader = open_reader(path);
    const auto a = reader->read_f32("a");
    const auto b = reader->read_f32("b");
    for (long long q = 0; q < p; ++q) {
      EXPECT_EQ(a[static_cast<std::size_t>(q * 3)], static_cast<float>(q)) << name;
      EXPECT_EQ(a[static_cast<std::size_t>(q * 3 + 2)], -1.0f) << name;
      EXPECT_EQ(b[static_cast<std::size_t>(q)], static_cast<float>(10 * q)) << name;
    }
    EXPECT_EQ(reader->metadata().at("k"), "v") << name;
  }
  // The last rank writes nothing of "b": the sum of written counts misses one element.
  const std::string gap = directory + "/gap.safetensors";
  {
    auto writer = open_collective_writer(context, gap, layout, {});
    const std::vector<float> row(3, 1.0f);
    writer->write_f32("a", r * 3, row.data(), 3);
    const std::int32_t value = 1;
    if (r != p - 1) writer->write_raw("b", r, 1, &value);
    EXPECT_THROW(commit_collectively(context, *writer), Error);
  }
  world().barrier();
  EXPECT_FALSE(file_exists(gap));
  if (world().rank() == 0) {
    // Only the published outputs are left: no temporary file of any writer.
    FILE* listing = ::popen(("ls -A '" + directory + "' | grep -c tmp || true").c_str(), "r");
    char line[64] = {};
    if (listing != nullptr && std::fgets(line, sizeof line, listing) != nullptr) {
      EXPECT_EQ(std::string(line), "0\n");
    }
    if (listing != nullptr) ::pclose(listing);
  }
  world().barrier();
  if (world().rank() == 0) std::system(("rm -rf '" + directory + "'").c_str());
}

}  // namespace
}  // namespace gradfix
