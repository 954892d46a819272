// All-reduce of vote counts as int8 against the same count of fp32 values, on the statistics
// communicator chosen by --backend, in the style of nccl-tests: size, time, algorithm and bus
// bandwidth, and the int8/fp32 time ratio measured in the same run. Prints a table on rank 0
// and writes a JSON copy. Run under mpirun:
//   mpirun -np 2 build/gradfix_bench_allreduce [--backend mpi|nccl] [--max 64M] [--json bench_allreduce.json]
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench_flags.hpp"
#include "gradfix/cli/cli.hpp"
#include "gradfix/dist/backend.hpp"
#include "gradfix/dist/mpi.hpp"

namespace {

// Seconds per all-reduce: the best of three timed rounds of `iterations`, after a warm-up.
double time_allreduce(gradfix::Communicator& comm, gradfix::MpiCommunicator& world, std::vector<unsigned char>& buffer,
                      std::size_t count, gradfix::DType dtype, int iterations) {
  gradfix::allreduce_host(comm, buffer.data(), count, dtype, gradfix::ReduceOp::kSum);
  double best = 1e30;
  for (int round = 0; round < 3; ++round) {
    world.barrier();
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iterations; ++i) gradfix::allreduce_host(comm, buffer.data(), count, dtype, gradfix::ReduceOp::kSum);
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iterations;
    world.allreduce(&seconds, &seconds, 1, gradfix::DType::kF64, gradfix::ReduceOp::kMax);
    best = std::min(best, seconds);
  }
  return best;
}

// One more all-reduce of each type on known values: votes r - 1 on rank r sum to
// P (P - 3) / 2, exactly, in int8 and in fp32.
void check_sums(gradfix::Communicator& comm, std::size_t count) {
  const int p = comm.size();
  const long long expected = static_cast<long long>(p) * (p - 3) / 2;
  std::vector<std::int8_t> votes(count, static_cast<std::int8_t>(comm.rank() - 1));
  gradfix::allreduce_host(comm, votes.data(), count, gradfix::DType::kI8, gradfix::ReduceOp::kSum);
  std::vector<float> values(count, static_cast<float>(comm.rank() - 1));
  gradfix::allreduce_host(comm, values.data(), count, gradfix::DType::kF32, gradfix::ReduceOp::kSum);
  for (std::size_t i = 0; i < count; i += 1 + count / 1024) {
    gradfix::bench::require(votes[i] == expected, "int8 sum at " + std::to_string(i) + " is " + std::to_string(votes[i]));
    gradfix::bench::require(values[i] == static_cast<float>(expected), "fp32 sum at " + std::to_string(i) + " is " + std::to_string(values[i]));
  }
}

}  // namespace

int main(int argc, char** argv) {
  gradfix::MpiRuntime runtime(&argc, &argv);
  const gradfix::bench::Flags flags(argc, argv, {{"backend", "mpi"}, {"max", "64M"}, {"json", "bench_allreduce.json"}},
                                    "mpirun -np P gradfix_bench_allreduce [--backend mpi|nccl] [--max 64M] [--json bench_allreduce.json]");
  const std::string backend = flags["backend"], json_path = flags["json"];
  long long max_count = 0;
  try {
    max_count = gradfix::parse_byte_size(flags["max"], "--max");
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 2;
  }
  auto comm = gradfix::make_communicator(backend, runtime, backend == "nccl");
  gradfix::MpiCommunicator& world = runtime.world();
  const int ranks = world.size();
  const bool root = world.rank() == 0;
  const double bus_factor = ranks > 1 ? 2.0 * (ranks - 1) / ranks : 0.0;
  if (root) {
    std::printf("# gradfix bench_allreduce: vote counts as int8 vs fp32, backend %s, %d ranks\n", comm->backend(), ranks);
    std::printf("# %12s %6s %12s %12s %10s %10s %10s\n", "count", "type", "bytes", "time(us)", "algbw", "busbw", "vs fp32");
    std::printf("# %12s %6s %12s %12s %10s %10s %10s\n", "(elements)", "", "", "", "(GB/s)", "(GB/s)", "(time)");
  }
  nlohmann::json rows = nlohmann::json::array();
  std::vector<unsigned char> buffer(static_cast<std::size_t>(max_count) * 4, 1);
  for (long long count = 1LL << 10; count <= max_count; count *= 4) {
    const int iterations = count <= (1LL << 16) ? 200 : (count <= (1LL << 22) ? 20 : 5);
    const double fp32 = time_allreduce(*comm, world, buffer, static_cast<std::size_t>(count), gradfix::DType::kF32, iterations);
    std::fill(buffer.begin(), buffer.end(), 0);  // int8 sums of zeros never overflow
    const double int8 = time_allreduce(*comm, world, buffer, static_cast<std::size_t>(count), gradfix::DType::kI8, iterations);
    check_sums(*comm, static_cast<std::size_t>(count));
    for (const auto& [type, seconds, item] : {std::tuple<const char*, double, int>{"fp32", fp32, 4}, {"int8", int8, 1}}) {
      const double bytes = static_cast<double>(count) * item;
      const double algbw = bytes / seconds / 1e9;
      if (root)
        std::printf("  %12lld %6s %12.0f %12.1f %10.3f %10.3f %10.2f\n", count, type, bytes, seconds * 1e6, algbw,
                    algbw * bus_factor, seconds / fp32);
      rows.push_back({{"count", count}, {"type", type}, {"bytes", bytes}, {"seconds", seconds}, {"algbw_gb_s", algbw},
                      {"busbw_gb_s", algbw * bus_factor}, {"time_vs_fp32", seconds / fp32}});
    }
  }
  if (root) {
    std::ofstream(json_path) << nlohmann::json{{"benchmark", "bench_allreduce"}, {"backend", comm->backend()}, {"ranks", ranks},
                                               {"rows", rows}}.dump(2)
                             << "\n";
    std::printf("# JSON copy: %s\n", json_path.c_str());
  }
  return 0;
}
