#include "gradfix/dist/collective_output.hpp"

#include <hdf5.h>

#include "gradfix/dist/mpi.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/atomic_file.hpp"

namespace gradfix {
namespace {

// Wraps the io writer of one rank and adds the meetings between ranks around its steps.
class CollectiveWriter final : public TensorWriter {
 public:
  CollectiveWriter(Communicator& comm, std::unique_ptr<TensorWriter> inner) : comm_(comm), inner_(std::move(inner)) {
    // The leader's files exist once every rank passed this barrier; then the others open them.
    comm_.barrier();
    inner_->attach();
  }

  const std::string& path() const override { return inner_->path(); }
  const std::vector<TensorInfo>& layout() const override { return inner_->layout(); }

  void write_raw(const std::string& name, long long begin, long long count, const void* source) override {
    inner_->write_raw(name, begin, count, source);
  }

  // Every rank flushes, then the counts of all ranks are summed: finish() then checks that the
  // ranks together wrote every element.
  void flush() override {
    inner_->flush();
    written_ = inner_->written_elements();
    if (!written_.empty()) comm_.allreduce(written_.data(), written_.data(), written_.size(), DType::kI64, ReduceOp::kSum);
    comm_.barrier();
  }

  std::vector<long long> written_elements() const override { return written_; }

  bool takes_files() const override { return inner_->takes_files(); }
  void add_file(const std::string& name, const std::string& content) override { inner_->add_file(name, content); }

  void publish() override {
    inner_->publish();
    comm_.barrier();
  }

 private:
  Communicator& comm_;
  std::unique_ptr<TensorWriter> inner_;
  std::vector<long long> written_;
};

// Rank 0's fresh token, on every rank.
std::string shared_token(Communicator& comm) {
  std::string token = comm.rank() == 0 ? new_temporary_token() : std::string();
  unsigned long long length = token.size();
  comm.broadcast(&length, 1, DType::kU64, 0);
  token.resize(length);
  comm.broadcast(token.data(), length, DType::kU8, 0);
  return token;
}

}  // namespace

std::unique_ptr<TensorWriter> open_collective_writer(const JobContext& context, const std::string& path,
                                                     const std::vector<TensorInfo>& layout, const Metadata& metadata,
                                                     long long max_shard_bytes, bool force) {
  Communicator& comm = context.host();
  WriteOptions options;
  options.max_shard_bytes = max_shard_bytes;
  options.force = force;
  auto* mpi = dynamic_cast<MpiCommunicator*>(&comm);
  // A world of one without MPI (a library user, a unit test) writes alone.
  if (comm.size() == 1 && mpi == nullptr) return open_writer(path, layout, metadata, options);

  options.role.token = shared_token(comm);
  options.role.leader = comm.rank() == 0;
  options.role.who = describe_rank(comm);
  // Under MPI, HDF5 files go through MPI-IO at any number of ranks, one rank included: the
  // driver shapes the file's bytes, and outputs must be byte-identical for every P.
  if (format_of_path(path) == StoreFormat::kHdf5) {
    if (mpi == nullptr)
      throw RuntimeFailure(path + ": several ranks write one HDF5 file through MPI-IO, but the job's host communicator is " +
                           comm.backend());
    const MPI_Comm native = mpi->native();
    options.role.hdf5_file_access = [native](std::int64_t access) {
      if (H5Pset_fapl_mpio(static_cast<hid_t>(access), native, MPI_INFO_NULL) < 0)
        throw RuntimeFailure("H5Pset_fapl_mpio failed: this HDF5 has no MPI-IO driver");
    };
  }
  return std::make_unique<CollectiveWriter>(comm, open_writer(path, layout, metadata, options));
}

void commit_collectively(const JobContext& context, TensorWriter& writer) {
  context.agree([&] { writer.finish(); });
  writer.publish();
}

}  // namespace gradfix
