#pragma once
// Where a job's time goes, for --report-time: seconds this process spent in the collective steps
// that move a sharded model's weights (gathers: owners broadcasting pieces of a stage, or rows of
// an embedding or a head block) and its statistics (reductions). Nothing overlaps them with
// compute yet, so their time is time the compute waited.

#include <chrono>
#include <iosfwd>

namespace gradfix {

class Communicator;

enum class TimedStep { kGather, kReduce };

void add_step_seconds(TimedStep step, double seconds);
double step_seconds(TimedStep step);

// Adds the time from its construction to its destruction to `step`.
class StepTimer {
 public:
  explicit StepTimer(TimedStep step) : step_(step), start_(std::chrono::steady_clock::now()) {}
  ~StepTimer() { add_step_seconds(step_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count()); }
  StepTimer(const StepTimer&) = delete;
  StepTimer& operator=(const StepTimer&) = delete;

 private:
  TimedStep step_;
  std::chrono::steady_clock::time_point start_;
};

// Prints, on rank 0 of `host`, each rank's wall time since `start` and its seconds in gathers and
// reductions with their share of the wall time. Collective.
void print_step_times(Communicator& host, std::chrono::steady_clock::time_point start, std::ostream& out);

}  // namespace gradfix
