#pragma once
// Where a job runs, for every job alike: the file jobs, the model jobs, and any program that
// links gradfix. A context always has a host communicator (the MPI world under a launcher, a
// world of one otherwise), a statistics communicator (MPI or NCCL, the same as host unless NCCL
// was chosen), the device, and the memory bound. It is also the job's controller: steps whose
// failure the other ranks could not see are run through agree(), so that a failure on one rank
// stops every rank with one message and one exit code, and nothing is published.

#include <functional>
#include <string>

#include "gradfix/dist/communicator.hpp"

namespace gradfix {

class JobContext {
 public:
  // A world of one process, statistics in host memory, on the CPU.
  JobContext();
  // `stats` reduces statistics (it may be `host` itself). Both must outlive the context.
  JobContext(Communicator& host, Communicator& stats);

  Communicator& host() const { return *host_; }
  Communicator& stats() const { return *stats_; }
  // Communicators of their own for gathers that run ahead of compute on a helper thread
  // (--prefetch): twins of host and stats (stats' twin only where stats is not host). Both null:
  // every gather runs on the calling thread when its result is needed.
  void set_ahead(Communicator* host, Communicator* stats) {
    ahead_host_ = host;
    ahead_stats_ = stats != nullptr ? stats : host;
  }
  Communicator* ahead_host() const { return ahead_host_; }
  Communicator* ahead_stats() const { return ahead_stats_; }
  int rank() const { return host_->rank(); }
  int size() const { return host_->size(); }
  bool is_root() const { return rank() == 0; }

  // Runs a step on every rank and agrees on its outcome. When any rank failed, the lowest failing
  // rank rethrows its error (marked agreed: main prints it) and the others throw a silent
  // PeerFailure with the same exit code, so the error is printed once and every rank exits with
  // that code instead of waiting in a later collective. Errors that are not gradfix::Error
  // become RuntimeFailure (exit 3).
  void agree(const std::function<void()>& work) const;

  long long chunk_elements = 1LL << 22;  // elements per buffer: bounds memory for any model size
  int local_rank = 0;                    // rank on this node: picks the GPU
  std::string device = "cpu";            // model jobs: cpu | cuda | cuda:N
  bool progress = true;                  // rank 0 reports progress on stderr (--quiet: off)
  bool strict_config = false;            // model jobs: refuse config.json keys gradfix does not know

 private:
  Communicator* host_;
  Communicator* stats_;
  Communicator* ahead_host_ = nullptr;
  Communicator* ahead_stats_ = nullptr;
};

// The same as context.agree(work).
void agree_on_outcome(const JobContext& context, const std::function<void()>& work);

}  // namespace gradfix
