#pragma once
// One interface over every checkpoint format gradfix reads and writes: safetensors (one file, or
// a directory of shards with model.safetensors.index.json) and HDF5. Readers are lazy: they read
// a tensor, or a flat element range of it, when asked, so a rank that owns part of a model never
// touches the rest. Writers know the whole layout up front, accept element ranges in any order,
// and publish atomically: nothing appears under the output name until every byte is written.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gradfix/core/dtype.hpp"

namespace gradfix {

using Metadata = std::map<std::string, std::string>;

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<long long> shape;  // empty for a scalar

  long long numel() const;
  long long nbytes() const { return numel() * static_cast<long long>(dtype_size(dtype)); }
};

class TensorReader {
 public:
  virtual ~TensorReader() = default;

  virtual const std::string& path() const = 0;
  // Every tensor, in the order the file stores them.
  virtual const std::vector<TensorInfo>& tensors() const = 0;
  virtual const Metadata& metadata() const = 0;
  // Copies elements [begin, begin + count) of the flattened tensor, in its stored dtype.
  virtual void read_raw(const std::string& name, long long begin, long long count, void* target) const = 0;

  // nullptr when the file has no such tensor.
  const TensorInfo* find(const std::string& name) const;
  // Throws InputError naming the file when the tensor is missing.
  const TensorInfo& info(const std::string& name) const;
  // Elements [begin, begin + count) converted to fp32.
  std::vector<float> read_f32(const std::string& name, long long begin, long long count) const;
  std::vector<float> read_f32(const std::string& name) const;
};

class MpiCommunicator;

struct WriteOptions {
  // For a sharded safetensors directory: the largest shard, in bytes (a single larger tensor gets
  // a shard of its own).
  long long max_shard_bytes = 5LL << 30;
  // With a communicator the writer is collective: every rank constructs it with the same layout,
  // rank 0 creates the files, every rank writes the ranges it owns into the same files (which
  // must be on a file system all ranks see), and publish() renames once all ranks finished.
  MpiCommunicator* comm = nullptr;
};

class TensorWriter {
 public:
  // A writer destroyed before commit() removes everything it wrote.
  virtual ~TensorWriter() = default;

  virtual const std::string& path() const = 0;
  virtual const std::vector<TensorInfo>& layout() const = 0;
  // Stores elements [begin, begin + count) of the flattened tensor, given in its layout dtype.
  virtual void write_raw(const std::string& name, long long begin, long long count, const void* source) = 0;
  // Checks that every element of every tensor was written and flushes, still under temporary
  // names. Splitting this from publish() lets several ranks all finish before any publishes.
  virtual void finish() = 0;
  // Renames the finished temporary files to their final names.
  virtual void publish() = 0;

  void commit() {
    finish();
    publish();
  }
  // Converts fp32 values into the layout dtype of `name` and stores them.
  void write_f32(const std::string& name, long long begin, const float* source, long long count);

 private:
  std::map<std::string, DType> dtypes_;  // filled on the first write_f32
};

enum class StoreFormat { kSafetensors, kShardedSafetensors, kHdf5 };

// The format a path names: *.safetensors, *.h5 or *.hdf5, or a directory (or its
// model.safetensors.index.json) for a sharded checkpoint. Throws InputError for anything else.
StoreFormat format_of_path(const std::string& path);

std::unique_ptr<TensorReader> open_reader(const std::string& path);
std::unique_ptr<TensorWriter> open_writer(const std::string& path, const std::vector<TensorInfo>& layout,
                                          const Metadata& metadata, const WriteOptions& options = {});

// Tracks which elements of each tensor a writer received, so that finish() can refuse to publish
// a file with a gap in it.
class WriteTracker {
 public:
  explicit WriteTracker(const std::vector<TensorInfo>& layout);
  // Throws RuntimeFailure when the range lies outside the tensor or the tensor is unknown.
  const TensorInfo& record(const std::string& file, const std::string& name, long long begin, long long count);
  // Throws RuntimeFailure naming the first tensor that is not complete. With a communicator,
  // counts the elements written by all ranks together (collective).
  void check_complete(const std::string& file, MpiCommunicator* comm = nullptr) const;

 private:
  std::map<std::string, std::size_t> index_;
  std::vector<TensorInfo> layout_;
  std::vector<long long> written_;
};

}  // namespace gradfix
