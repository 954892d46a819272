#pragma once
// Where a job's time goes, for --report-time: seconds this process's compute waited on the
// collective steps that move a sharded model's weights (gathers: owners broadcasting pieces of a
// stage, or rows of an embedding or a head block) and its statistics (reductions), and the
// seconds of gathers that ran ahead on the helper thread while the compute went on (--prefetch).

#include <chrono>
#include <iosfwd>

namespace gradfix {

class Communicator;

// kGather: the compute waited for a gather (it ran on the calling thread, or had not finished
// ahead); kReduce: it waited for a reduction; kGatherAhead: a gather ran on the helper thread.
enum class TimedStep { kGather, kReduce, kGatherAhead };

void add_step_seconds(TimedStep step, double seconds);
double step_seconds(TimedStep step);
// Gathers that ran on the helper thread, for --report-time.
void count_gather_ahead();
long long gathers_ahead();

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

// Prints, on rank 0 of `host`, each rank's wall time since `start`, its waits on gathers and
// reductions with their share of the wall time, and the seconds of gathers run ahead. Collective.
void print_step_times(Communicator& host, std::chrono::steady_clock::time_point start, std::ostream& out);

}  // namespace gradfix
