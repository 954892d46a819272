#pragma once
// MPI: the runtime (initialised once per process, with the rank's place on its node) and the
// host-memory communicator. MPI is always the bootstrap: a one-process run is an MPI world of
// size 1 (MPI's singleton mode), so one rank is just the case P = 1.

#include <mpi.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gradfix/dist/communicator.hpp"

namespace gradfix {

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (freed on destruction) unless it is MPI_COMM_WORLD.
  explicit MpiCommunicator(MPI_Comm comm);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }
  MemorySpace memory() const override { return MemorySpace::kHost; }

  void allreduce(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) override;
  void broadcast(void* buffer, std::size_t count, DType dtype, int root) override;
  void allgather(const void* send, void* recv, std::size_t count, DType dtype) override;
  void barrier() override;
  void send(const void* buffer, std::size_t count, DType dtype, int peer) override;
  void recv(void* buffer, std::size_t count, DType dtype, int peer) override;
  std::unique_ptr<Communicator> split(int color, int key) override;
  // The same ranks on a communicator of their own (MPI_Comm_dup), with the same host names:
  // collectives on it never match this one's, so another thread can run its own sequence.
  // Collective.
  std::unique_ptr<MpiCommunicator> duplicate() const;

  MPI_Comm native() const { return comm_; }
  // The watchdog (--timeout): a rank that waits longer than this in one collective throws
  // CollectiveTimeout, rank 0 naming the ranks that stopped answering; 0 waits forever. For every
  // MPI communicator of the process.
  static void set_collective_timeout(double seconds);
  static double collective_timeout();
  // Ends every rank of this communicator's job with `exit_code`: the way out of a failure that
  // happens while other ranks may be waiting in a collective.
  [[noreturn]] void abort(int exit_code) const;
  // The host of each rank, for the watchdog's message ("rank(s) 2 on node17 ..."): a lost node
  // shows as its ranks and its name. Set on the world communicator when MPI starts.
  void set_rank_hosts(std::vector<std::string> hosts) { hosts_ = std::move(hosts); }
  const std::vector<std::string>& rank_hosts() const { return hosts_; }

 private:
  // Every collective is posted non-blocking (`post` starts it and returns MPI's status) and
  // completed under the watchdog.
  void collective(const char* operation, const std::function<int(MPI_Request*)>& post);
  void enter(const char* operation);
  void complete(MPI_Request& request);
  void drain_arrivals();
  void announce();

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  long long sequence_ = 0;            // collectives entered on this communicator
  const char* operation_ = "";        // the one in progress, for messages
  std::vector<long long> arrived_;    // rank 0: the last collective each rank announced
  std::vector<long long> ring_;       // other ranks: the announcements in flight
  long long announcements_ = 0;
  std::vector<std::chrono::steady_clock::time_point> heard_;  // rank 0: when each rank last announced
  std::vector<std::string> hosts_;    // each rank's host name (empty: not known)
};

// The MPI library's own version line ("Open MPI v4.1.4, package: ..."); callable before MPI starts.
std::string mpi_library_version();

class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  MpiCommunicator& world() { return *world_; }
  // The rank among the processes on this node (from MPI_Comm_split_type SHARED): picks the GPU.
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  // Whether MPI lets two threads call it at once (MPI_THREAD_MULTIPLE): gathers ahead of compute
  // (--prefetch) run on a helper thread.
  bool thread_multiple() const { return thread_multiple_; }

 private:
  std::unique_ptr<MpiCommunicator> world_;
  int local_rank_ = 0;
  int local_size_ = 1;
  bool thread_multiple_ = false;
  std::string session_directory_;  // a singleton's own Open MPI session directory, removed at the end
  std::vector<std::string> session_folders_;  // it and its folders, parents first, as temporaries
};

}  // namespace gradfix
