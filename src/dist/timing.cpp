#include "gradfix/dist/timing.hpp"

#include <atomic>
#include <cstdio>
#include <ostream>
#include <vector>

#include "gradfix/dist/communicator.hpp"

namespace gradfix {
namespace {

// Microseconds per step; atomic, as a CUDA or LibTorch thread could end a timer.
std::atomic<long long> microseconds[3];
std::atomic<long long> ahead_count{0};

}  // namespace

void add_step_seconds(TimedStep step, double seconds) { microseconds[static_cast<int>(step)] += static_cast<long long>(seconds * 1e6); }

void count_gather_ahead() { ++ahead_count; }
long long gathers_ahead() { return ahead_count.load(); }

double step_seconds(TimedStep step) { return static_cast<double>(microseconds[static_cast<int>(step)].load()) * 1e-6; }

void print_step_times(Communicator& host, std::chrono::steady_clock::time_point start, std::ostream& out) {
  const double mine[5] = {std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), step_seconds(TimedStep::kGather),
                          step_seconds(TimedStep::kReduce), step_seconds(TimedStep::kGatherAhead), static_cast<double>(gathers_ahead())};
  std::vector<double> all(static_cast<std::size_t>(host.size()) * 5);
  host.allgather(mine, all.data(), 5, DType::kF64);
  if (host.rank() != 0) return;
  out << "time per rank (s): wall, waiting on weight gathers, on statistics reductions; gathers run ahead of compute\n";
  for (int r = 0; r < host.size(); ++r) {
    const double* t = all.data() + 5 * r;
    char line[220];
    std::snprintf(line, sizeof line, "  rank %d: %.2f wall, %.2f gathers (%.1f%%), %.2f reductions (%.1f%%); %.2f ahead (%.0f gathers)\n", r, t[0],
                  t[1], 100.0 * t[1] / (t[0] > 0 ? t[0] : 1), t[2], 100.0 * t[2] / (t[0] > 0 ? t[0] : 1), t[3], t[4]);
    out << line;
  }
}

}  // namespace gradfix
