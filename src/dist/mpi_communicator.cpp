#include <algorithm>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <thread>
#include <cstdint>
#include <functional>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <set>
#include <vector>

#include "gradfix/dist/mpi.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

// 16-bit floats have no MPI type: each gets a 2-byte type of its own and user-defined reductions
// that widen to fp32, combine, and round back.
struct HalfTypes {
  MPI_Datatype f16 = MPI_DATATYPE_NULL;
  MPI_Datatype bf16 = MPI_DATATYPE_NULL;
  MPI_Op sum = MPI_OP_NULL;
  MPI_Op max = MPI_OP_NULL;
  MPI_Op min = MPI_OP_NULL;
};

template <typename Combine>
void combine_halves(void* in, void* inout, int* length, MPI_Datatype* type, Combine combine);

HalfTypes& half_types();

template <typename Combine>
void combine_halves(void* in, void* inout, int* length, MPI_Datatype* type, Combine combine) {
  const bool brain = *type == half_types().bf16;
  const auto* a = static_cast<const std::uint16_t*>(in);
  auto* b = static_cast<std::uint16_t*>(inout);
  for (int i = 0; i < *length; ++i) {
    const float x = brain ? bf16_to_f32(a[i]) : f16_to_f32(a[i]);
    const float y = brain ? bf16_to_f32(b[i]) : f16_to_f32(b[i]);
    const float z = combine(x, y);
    b[i] = brain ? f32_to_bf16(z) : f32_to_f16(z);
  }
}

void half_sum(void* in, void* inout, int* length, MPI_Datatype* type) {
  combine_halves(in, inout, length, type, [](float x, float y) { return x + y; });
}
void half_max(void* in, void* inout, int* length, MPI_Datatype* type) {
  combine_halves(in, inout, length, type, [](float x, float y) { return x > y ? x : y; });
}
void half_min(void* in, void* inout, int* length, MPI_Datatype* type) {
  combine_halves(in, inout, length, type, [](float x, float y) { return x < y ? x : y; });
}

HalfTypes& half_types() {
  static HalfTypes types = [] {
    HalfTypes made;
    MPI_Type_contiguous(2, MPI_BYTE, &made.f16);
    MPI_Type_commit(&made.f16);
    MPI_Type_contiguous(2, MPI_BYTE, &made.bf16);
    MPI_Type_commit(&made.bf16);
    MPI_Op_create(&half_sum, 1, &made.sum);
    MPI_Op_create(&half_max, 1, &made.max);
    MPI_Op_create(&half_min, 1, &made.min);
    return made;
  }();
  return types;
}

MPI_Datatype mpi_type(DType dtype) {
  switch (dtype) {
    case DType::kI8: return MPI_INT8_T;
    case DType::kI16: return MPI_INT16_T;
    case DType::kI32: return MPI_INT32_T;
    case DType::kI64: return MPI_INT64_T;
    case DType::kU8:
    case DType::kBool: return MPI_UINT8_T;
    case DType::kU16: return MPI_UINT16_T;
    case DType::kU32: return MPI_UINT32_T;
    case DType::kU64: return MPI_UINT64_T;
    case DType::kF32: return MPI_FLOAT;
    case DType::kF64: return MPI_DOUBLE;
    case DType::kF16: return half_types().f16;
    case DType::kBF16: return half_types().bf16;
    case DType::kF8E4M3:
    case DType::kF8E5M2: return MPI_UINT8_T;  // moved as bytes; mpi_op refuses to reduce them
  }
  return MPI_BYTE;
}

MPI_Op mpi_op(ReduceOp op, DType dtype) {
  const bool half = dtype == DType::kF16 || dtype == DType::kBF16;
  if (dtype == DType::kF8E4M3 || dtype == DType::kF8E5M2)
    throw RuntimeFailure(std::string("MPI: gradfix does not reduce ") + dtype_name(dtype) + " values");
  switch (op) {
    case ReduceOp::kSum: return half ? half_types().sum : MPI_SUM;
    case ReduceOp::kMax: return half ? half_types().max : MPI_MAX;
    case ReduceOp::kMin: return half ? half_types().min : MPI_MIN;
  }
  return MPI_SUM;
}

// MPI counts are int: larger messages go in pieces of at most this many elements.
constexpr std::size_t kMaxMpiCount = 1u << 30;

}  // namespace

std::string host_name() {
  char name[256] = {};
  ::gethostname(name, sizeof name - 1);
  return name;
}

std::vector<std::string> gather_host_names(Communicator& comm) {
  // Fixed-size fields: a name longer than one (DNS allows 253) is cut, which only shortens messages.
  constexpr std::size_t kField = 64;
  std::vector<char> mine(kField, '\0'), all(kField * static_cast<std::size_t>(comm.size()));
  const std::string name = host_name();
  std::copy_n(name.begin(), std::min(name.size(), kField - 1), mine.begin());
  comm.allgather(mine.data(), all.data(), kField, DType::kU8);
  std::vector<std::string> names;
  for (int r = 0; r < comm.size(); ++r) names.emplace_back(all.data() + kField * static_cast<std::size_t>(r));
  return names;
}

std::string describe_placement(Communicator& comm, const std::vector<std::string>& names, int local_rank, int threads) {
  const int mine[2] = {local_rank, threads};
  std::vector<int> all(2 * static_cast<std::size_t>(comm.size()));
  comm.allgather(mine, all.data(), 2, DType::kI32);
  std::vector<std::pair<std::string, std::vector<int>>> hosts;
  std::vector<std::set<int>> host_threads;
  bool grouped_alike = true;
  for (int r = 0; r < comm.size(); ++r) {
    const std::string& host = names[static_cast<std::size_t>(r)];
    const int local = all[2 * static_cast<std::size_t>(r)], rank_threads = all[2 * static_cast<std::size_t>(r) + 1];
    auto found = std::find_if(hosts.begin(), hosts.end(), [&](const auto& entry) { return entry.first == host; });
    if (found == hosts.end()) {
      found = hosts.insert(hosts.end(), {host, {}});
      host_threads.emplace_back();
    }
    // MPI's node-local ranks count 0, 1, ... over the ranks of one host when it groups by host.
    grouped_alike = grouped_alike && local == static_cast<int>(found->second.size());
    found->second.push_back(r);
    host_threads[static_cast<std::size_t>(found - hosts.begin())].insert(rank_threads);
  }
  std::string text = std::to_string(hosts.size()) + (hosts.size() == 1 ? " host:" : " hosts:");
  for (std::size_t h = 0; h < hosts.size(); ++h) {
    const std::vector<int>& ranks = hosts[h].second;
    text += std::string(h == 0 ? " " : ", ") + hosts[h].first + (ranks.size() == 1 ? " rank " : " ranks ");
    // Consecutive ranks as ranges: "0-3,8".
    for (std::size_t i = 0; i < ranks.size();) {
      std::size_t j = i;
      while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
      text += (i == 0 ? "" : ",") + std::to_string(ranks[i]) + (j > i ? "-" + std::to_string(ranks[j]) : "");
      i = j + 1;
    }
    const std::set<int>& counts = host_threads[h];
    if (*counts.rbegin() > 0) {
      text += " (";
      for (int count : counts) text += (count == *counts.begin() ? "" : "/") + std::to_string(count);
      text += counts.size() == 1 && *counts.begin() == 1 ? " thread" : " threads";
      text += ranks.size() == 1 ? ")" : " each)";
    }
  }
  if (!grouped_alike) text += " (MPI groups the ranks into nodes otherwise than by host name; GPUs and threads follow MPI's nodes)";
  return text;
}

std::string describe_rank(const Communicator& comm) {
  return "rank " + std::to_string(comm.rank()) + "/" + std::to_string(comm.size()) + " on " + host_name();
}

#define GRADFIX_MPI_CHECK(call, operation)                                                         \
  do {                                                                                             \
    const int gradfix_mpi_status = (call);                                                         \
    if (gradfix_mpi_status != MPI_SUCCESS) {                                                       \
      char gradfix_mpi_text[MPI_MAX_ERROR_STRING] = {};                                            \
      int gradfix_mpi_length = 0;                                                                  \
      MPI_Error_string(gradfix_mpi_status, gradfix_mpi_text, &gradfix_mpi_length);                 \
      throw RuntimeFailure(std::string(operation) + " failed on " + describe_rank(*this) + ": " + \
                           gradfix_mpi_text);                                                      \
    }                                                                                              \
  } while (0)

MpiCommunicator::MpiCommunicator(MPI_Comm comm) : comm_(comm) {
  // Errors come back as return codes, which the check macro turns into exceptions with context.
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

namespace {

// The watchdog's limit on one wait in a collective (seconds, 0: none), for every communicator.
double g_collective_timeout = 0.0;
// Announcements of "I entered collective #n" go to rank 0 with their own tag; the values sent
// stay in this ring until the (eager, tiny) sends complete.
constexpr int kArrivalTag = 7001;
constexpr std::size_t kArrivalRing = 256;

}  // namespace

void MpiCommunicator::set_collective_timeout(double seconds) { g_collective_timeout = seconds; }
double MpiCommunicator::collective_timeout() { return g_collective_timeout; }

void MpiCommunicator::enter(const char* operation) {
  ++sequence_;
  operation_ = operation;
  if (g_collective_timeout <= 0.0 || size_ == 1) return;
  if (rank_ == 0) {
    if (arrived_.empty()) {
      arrived_.assign(static_cast<std::size_t>(size_), 0);
      heard_.assign(static_cast<std::size_t>(size_), std::chrono::steady_clock::now());
    }
    arrived_[0] = sequence_;
    drain_arrivals();
    return;
  }
  announce();
}

// Tells rank 0 "I am in collective #sequence_": on arrival, and every second while waiting, so
// that a rank that arrived and then stopped (SIGSTOP, a hung GPU) falls silent.
void MpiCommunicator::announce() {
  if (ring_.empty()) ring_.assign(kArrivalRing, 0);
  long long& slot = ring_[static_cast<std::size_t>(announcements_++) % kArrivalRing];
  slot = sequence_;
  MPI_Request request = MPI_REQUEST_NULL;
  if (MPI_Isend(&slot, 1, MPI_LONG_LONG, 0, kArrivalTag, comm_, &request) == MPI_SUCCESS) MPI_Request_free(&request);
}

void MpiCommunicator::drain_arrivals() {
  int waiting = 0;
  MPI_Status status;
  while (MPI_Iprobe(MPI_ANY_SOURCE, kArrivalTag, comm_, &waiting, &status) == MPI_SUCCESS && waiting) {
    long long value = 0;
    MPI_Recv(&value, 1, MPI_LONG_LONG, status.MPI_SOURCE, kArrivalTag, comm_, MPI_STATUS_IGNORE);
    long long& last = arrived_[static_cast<std::size_t>(status.MPI_SOURCE)];
    if (value > last) last = value;
    heard_[static_cast<std::size_t>(status.MPI_SOURCE)] = std::chrono::steady_clock::now();
  }
}

void MpiCommunicator::complete(MPI_Request& request) {
  if (g_collective_timeout <= 0.0 || size_ == 1) {
    GRADFIX_MPI_CHECK(MPI_Wait(&request, MPI_STATUS_IGNORE), operation_);
    return;
  }
  // Rank 0 knows who has not arrived and says so; the others wait a little longer, so that its
  // report comes first.
  const double limit = g_collective_timeout + (rank_ == 0 ? 0.0 : 2.0);
  const auto start = std::chrono::steady_clock::now();
  double last_announced = 0.0;
  for (long long polls = 0;; ++polls) {
    int done = 0;
    GRADFIX_MPI_CHECK(MPI_Test(&request, &done, MPI_STATUS_IGNORE), operation_);
    if (done) return;
    const auto now = std::chrono::steady_clock::now();
    const double waited = std::chrono::duration<double>(now - start).count();
    if (rank_ == 0) {
      drain_arrivals();
    } else if (waited - last_announced >= 1.0) {
      announce();
      last_announced = waited;
    }
    if (waited > limit) {
      std::string message = std::string(operation_) + " (collective #" + std::to_string(sequence_) + ") did not complete within " +
                            std::to_string(static_cast<long long>(g_collective_timeout)) + " s (--timeout) on " + describe_rank(*this) + ": ";
      if (rank_ == 0) {
        // A rank that waits in a collective announces itself every second, so one silent for
        // longer is stopped or stuck (or computing far longer than the others); a rank still at
        // an earlier collective but heard recently is alive and waiting too (a broadcast can
        // reach it only through the silent one), so it is listed apart and not blamed.
        std::string silent, behind;
        auto on_host = [&](int r) { return hosts_.empty() ? std::string() : " on " + hosts_[static_cast<std::size_t>(r)]; };
        for (int r = 1; r < size_; ++r) {
          const double quiet = std::chrono::duration<double>(now - heard_[static_cast<std::size_t>(r)]).count();
          const std::string last = std::to_string(arrived_[static_cast<std::size_t>(r)]);
          if (quiet > 2.5)
            silent += (silent.empty() ? "" : ", ") + std::to_string(r) + on_host(r) + " (silent for " + std::to_string(static_cast<long long>(quiet)) +
                      " s, last seen at #" + last + ")";
          else if (arrived_[static_cast<std::size_t>(r)] < sequence_)
            behind += (behind.empty() ? "" : ", ") + std::to_string(r) + on_host(r) + " (alive, at #" + last + ")";
        }
        if (!silent.empty()) message += "rank(s) " + silent + " stopped answering (stopped, hung or stuck in I/O)";
        if (!behind.empty()) message += (silent.empty() ? "" : "; ") + std::string("rank(s) ") + behind + " still waiting in an earlier collective";
        if (silent.empty() && behind.empty()) message += "every rank arrived and answers, but the collective did not finish (a network or MPI failure)";
      } else {
        message += "another rank stopped answering (rank 0's message names it)";
      }
      throw CollectiveTimeout(message + "; stopping every rank");
    }
    // Spin for the first millisecond, then poll every 200 microseconds.
    if (polls > 1000) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

void MpiCommunicator::collective(const char* operation, const std::function<int(MPI_Request*)>& post) {
  enter(operation);
  MPI_Request request = MPI_REQUEST_NULL;
  GRADFIX_MPI_CHECK(post(&request), operation);
  complete(request);
}

void MpiCommunicator::allreduce(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) {
  const std::size_t item = dtype_size(dtype);
  for (std::size_t done = 0; done < count; done += kMaxMpiCount) {
    const int chunk = static_cast<int>(std::min(kMaxMpiCount, count - done));
    void* target = static_cast<char*>(recv) + done * item;
    const void* source = send == recv ? MPI_IN_PLACE : static_cast<const char*>(send) + done * item;
    collective("MPI_Allreduce", [&](MPI_Request* request) {
      return MPI_Iallreduce(source, target, chunk, mpi_type(dtype), mpi_op(op, dtype), comm_, request);
    });
  }
}

void MpiCommunicator::reduce_scatter(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op) {
  if (count > kMaxMpiCount) throw RuntimeFailure("reduce_scatter of more than 2^30 elements per rank on " + describe_rank(*this));
  collective("MPI_Reduce_scatter_block", [&](MPI_Request* request) {
    return MPI_Ireduce_scatter_block(send, recv, static_cast<int>(count), mpi_type(dtype), mpi_op(op, dtype), comm_, request);
  });
}

void MpiCommunicator::broadcast(void* buffer, std::size_t count, DType dtype, int root) {
  const std::size_t item = dtype_size(dtype);
  for (std::size_t done = 0; done < count; done += kMaxMpiCount) {
    const int chunk = static_cast<int>(std::min(kMaxMpiCount, count - done));
    collective("MPI_Bcast", [&](MPI_Request* request) {
      return MPI_Ibcast(static_cast<char*>(buffer) + done * item, chunk, mpi_type(dtype), root, comm_, request);
    });
  }
}

void MpiCommunicator::allgather(const void* send, void* recv, std::size_t count, DType dtype) {
  if (count > kMaxMpiCount) throw RuntimeFailure("allgather of more than 2^30 elements per rank on " + describe_rank(*this));
  collective("MPI_Allgather", [&](MPI_Request* request) {
    return MPI_Iallgather(send, static_cast<int>(count), mpi_type(dtype), recv, static_cast<int>(count), mpi_type(dtype), comm_, request);
  });
}

void MpiCommunicator::barrier() {
  collective("MPI_Barrier", [&](MPI_Request* request) { return MPI_Ibarrier(comm_, request); });
}

void MpiCommunicator::send(const void* buffer, std::size_t count, DType dtype, int peer) {
  const std::size_t item = dtype_size(dtype);
  std::size_t done = 0;
  do {  // at least one message, so that an empty send still pairs with its recv
    const int chunk = static_cast<int>(std::min(kMaxMpiCount, count - done));
    GRADFIX_MPI_CHECK(MPI_Send(static_cast<const char*>(buffer) + done * item, chunk, mpi_type(dtype), peer, 0, comm_), "MPI_Send");
    done += static_cast<std::size_t>(chunk);
  } while (done < count);
}

void MpiCommunicator::recv(void* buffer, std::size_t count, DType dtype, int peer) {
  const std::size_t item = dtype_size(dtype);
  std::size_t done = 0;
  do {
    const int chunk = static_cast<int>(std::min(kMaxMpiCount, count - done));
    GRADFIX_MPI_CHECK(MPI_Recv(static_cast<char*>(buffer) + done * item, chunk, mpi_type(dtype), peer, 0, comm_, MPI_STATUS_IGNORE),
                      "MPI_Recv");
    done += static_cast<std::size_t>(chunk);
  } while (done < count);
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  MPI_Comm part = MPI_COMM_NULL;
  GRADFIX_MPI_CHECK(MPI_Comm_split(comm_, color, key, &part), "MPI_Comm_split");
  return std::make_unique<MpiCommunicator>(part);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::duplicate() const {
  MPI_Comm copy = MPI_COMM_NULL;
  GRADFIX_MPI_CHECK(MPI_Comm_dup(comm_, &copy), "MPI_Comm_dup");
  auto twin = std::make_unique<MpiCommunicator>(copy);
  twin->set_rank_hosts(hosts_);
  return twin;
}

void MpiCommunicator::abort(int exit_code) const {
  MPI_Abort(comm_, exit_code);
  std::_Exit(exit_code);
}

std::string mpi_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int length = 0;
  MPI_Get_library_version(text, &length);
  std::string version(text, static_cast<std::size_t>(length));
  const auto line_end = version.find_first_of(std::string("\r\n\0", 3));
  if (line_end != std::string::npos) version.resize(line_end);
  while (!version.empty() && (version.back() == ',' || std::isspace(static_cast<unsigned char>(version.back())))) version.pop_back();
  return version;
}

namespace {

// Whether a launcher (mpirun, srun with PMI or PMIx, a PMI-aware scheduler) started this process;
// without one, MPI_Init makes a world of one: a singleton.
bool started_by_launcher() {
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "PMI_FD"})
    if (std::getenv(variable) != nullptr) return true;
  return false;
}

// Open MPI 4 spends about 0.2 s of a singleton's start in probing UCX for a transport, and 0.07 s
// in starting a helper daemon, although a world of one talks to no one and gradfix never spawns
// processes: 0.28 s of every one-rank command, measured here, against 0.01 s with its built-in
// transport and no daemon. Without the daemon every singleton takes job family 0, so concurrent
// ones would race on one session directory (one start in 120 failed with four at once): each
// gets a session directory of its own, removed at the end. A user's own settings are kept (and a
// user's own session directory keeps the daemon). Returns the directory made, or "".
std::string choose_singleton_transport() {
  if (started_by_launcher()) return "";
  ::setenv("OMPI_MCA_pml", "ob1", 0);
  if (std::getenv("OMPI_MCA_orte_tmpdir_base") != nullptr || std::getenv("OMPI_MCA_ess_singleton_isolated") != nullptr) return "";
  const char* tmp = std::getenv("TMPDIR");
  std::string path = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/gradfix-mpi-XXXXXX";
  if (::mkdtemp(path.data()) == nullptr) return "";  // the daemon then keeps the starts apart
  ::setenv("OMPI_MCA_orte_tmpdir_base", path.c_str(), 1);
  ::setenv("OMPI_MCA_ess_singleton_isolated", "1", 1);
  return path;
}

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = MPI_THREAD_SINGLE;
  if (!initialized) {
    session_directory_ = choose_singleton_transport();
    // MULTIPLE: the model jobs gather the next stage's weights on a helper thread, over a
    // communicator of its own, while the main thread computes and reduces.
    if (MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided) != MPI_SUCCESS)
      throw RuntimeFailure("MPI_Init_thread failed on " + host_name());
  } else {
    MPI_Query_thread(&provided);
  }
  thread_multiple_ = provided >= MPI_THREAD_MULTIPLE;
  // A stop signal ends the process before the destructor runs: the session directory's folders,
  // parents first, are registered as temporaries, which the signal handler removes newest first.
  if (!session_directory_.empty()) {
    session_folders_.push_back(session_directory_);
    std::error_code error;
    for (std::filesystem::recursive_directory_iterator it(session_directory_, error), end; !error && it != end; it.increment(error))
      if (it->is_directory(error)) session_folders_.push_back(it->path().string());
    for (const auto& folder : session_folders_) register_temporary(folder);
  }
  world_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
  // Every rank's host name, once, for messages about lost ranks.
  world_->set_rank_hosts(gather_host_names(*world_));
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_->rank(), MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &local_rank_);
  MPI_Comm_size(node, &local_size_);
  MPI_Comm_free(&node);
}

MpiRuntime::~MpiRuntime() {
  world_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
  // Open MPI removes its own session files at MPI_Finalize; what is left is the directory made for it.
  if (!session_directory_.empty()) {
    for (const auto& folder : session_folders_) unregister_temporary(folder);
    std::error_code ignored;
    std::filesystem::remove_all(session_directory_, ignored);
  }
}

}  // namespace gradfix
