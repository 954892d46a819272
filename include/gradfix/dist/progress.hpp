#pragma once
// Progress of a long job, reported by rank 0 on stderr: items (tensors, samples) and bytes done
// of rank 0's share, the rate, and the time left. On a terminal one line is rewritten in place
// (at most five times a second); otherwise a line is printed every few seconds (10 s, or
// GRADFIX_PROGRESS_SECONDS), so logs of batch jobs stay short. Other ranks and --quiet runs
// report nothing. Rank 0's share is what it measures: the plan gives every rank a nearly equal
// share, so its time left is the job's.

#include <chrono>
#include <ostream>
#include <string>

#include "gradfix/dist/job_context.hpp"

namespace gradfix {

class Progress {
 public:
  // `unit` names the items ("tensors", "samples"); a total of 0 bytes reports items only.
  Progress(const JobContext& context, std::string what, long long total_items, long long total_bytes,
           std::string unit = "chunks");
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // The next item (of `bytes`) starts: the one before it is done. Called at the top of a loop,
  // so that every `continue` still counts the item.
  void next(long long bytes = 0);
  // `items` more are done at once: work counted in samples rather than in loop iterations.
  void add(long long items);
  // The last item is done; the final line (on a terminal: the line finished with a newline).
  void finish();

 private:
  // A progress line when the interval since the last one has passed.
  void report_when_due();
  void report(bool final);

  bool enabled_ = false;
  bool terminal_ = false;
  std::string what_, unit_;
  long long total_items_ = 0, total_bytes_ = 0, items_ = 0, bytes_ = 0;
  long long pending_items_ = 0, pending_bytes_ = 0;  // the item in progress
  double interval_ = 10.0;
  std::chrono::steady_clock::time_point start_, last_;
  bool finished_ = false, printed_ = false;
};

// Work counted deep inside a model job (samples through the network, in evaluations, gradient
// passes and training steps) reaches the job's Progress without a parameter on every function in
// between: the job makes its Progress current for a scope, and the passes call count_progress.
// Outside such a scope count_progress does nothing; scopes nest (the inner one counts).
class CurrentProgress {
 public:
  explicit CurrentProgress(Progress& progress);
  ~CurrentProgress();
  CurrentProgress(const CurrentProgress&) = delete;
  CurrentProgress& operator=(const CurrentProgress&) = delete;

 private:
  Progress* previous_;
};

void count_progress(long long items);

}  // namespace gradfix
