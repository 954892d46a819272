#pragma once
// One interface over every checkpoint format gradfix reads and writes: safetensors (one file, or
// a directory of shards with model.safetensors.index.json) and HDF5. Readers are lazy: they read
// a tensor, or a flat element range of it, when asked, so a rank that owns part of a model never
// touches the rest. Writers know the whole layout up front, accept element ranges in any order,
// and publish atomically: nothing appears under the output name until every byte is written.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "gradfix/io/dtype.hpp"

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
  // Tensors stored in a dtype gradfix cannot read, as (name, dtype text); they are not in
  // tensors(). A job refuses one that its --include/--exclude selects.
  virtual const std::vector<std::pair<std::string, std::string>>& unreadable() const;
  // Copies elements [begin, begin + count) of the flattened tensor, in its stored dtype.
  virtual void read_raw(const std::string& name, long long begin, long long count, void* target) const = 0;

  // nullptr when the file has no such tensor. Constant time: a checkpoint of a mixture of experts
  // holds tens of thousands of tensors, and jobs look each one up.
  const TensorInfo* find(const std::string& name) const;
  // Throws InputError naming the file when the tensor is missing.
  const TensorInfo& info(const std::string& name) const;
  // Elements [begin, begin + count) converted to fp32.
  std::vector<float> read_f32(const std::string& name, long long begin, long long count) const;
  std::vector<float> read_f32(const std::string& name) const;

 private:
  mutable std::unordered_map<std::string, std::size_t> index_;  // built on the first find()
};

// How this process takes part in writing one output. A process that writes alone keeps the
// defaults. When several processes write one output together (gradfix::dist's collective
// writer), they share one token, so their temporary files have the same names; the leader
// creates the files, renames them on publication and removes them on failure, the others
// attach() to what the leader created and write their own ranges. The io layer itself never
// communicates: whoever coordinates the processes calls the steps in order.
struct WriterRole {
  std::string token;  // names the temporary files; empty: a fresh token of this process
  bool leader = true;
  std::string who;    // "rank 2/4 on node17", for messages; empty when writing alone
  // Called with the HDF5 file-access property list (an hid_t) before the file is created. The
  // distributed layer sets MPI-IO here; then every process creates the HDF5 file together.
  std::function<void(std::int64_t)> hdf5_file_access;
};

struct WriteOptions {
  // For a sharded safetensors directory: the largest shard, in bytes (a single larger tensor gets
  // a shard of its own).
  long long max_shard_bytes = 5LL << 30;
  // A directory output may replace an existing directory that is not a checkpoint (--force);
  // one holding anything but regular files is still refused (nothing is removed recursively).
  bool force = false;
  WriterRole role;
};

class TensorWriter {
 public:
  // A writer destroyed before publish() removes everything it wrote.
  virtual ~TensorWriter() = default;

  virtual const std::string& path() const = 0;
  virtual const std::vector<TensorInfo>& layout() const = 0;
  // A process that is not the leader opens the files the leader created. The leader's files
  // exist once its constructor returned; a process writing alone never needs to call this.
  virtual void attach() {}
  // Stores elements [begin, begin + count) of the flattened tensor, given in its layout dtype.
  virtual void write_raw(const std::string& name, long long begin, long long count, const void* source) = 0;
  // Flushes and closes this process's files, still under temporary names.
  virtual void flush() = 0;
  // Elements this process wrote, per tensor of layout(), in layout order.
  virtual std::vector<long long> written_elements() const = 0;
  // Renames the finished temporary files to their final names (the leader does the renaming).
  virtual void publish() = 0;
  // Whether add_file() works: a directory output (sharded safetensors) is built whole under a
  // temporary name and published in one step, with any files added to it.
  virtual bool takes_files() const { return false; }
  // Adds a non-tensor file (config.json, a tokenizer) to a directory output, published with the
  // tensors. `name` is a plain file name. The leader calls it, after flush() and before publish().
  virtual void add_file(const std::string& name, const std::string& content);

  // flush(), then refuses to go on when an element of a tensor was not written. Splitting this
  // from publish() lets several processes all finish before any publishes.
  void finish();
  void commit() {
    finish();
    publish();
  }
  // Converts fp32 values into the layout dtype of `name` and stores them.
  void write_f32(const std::string& name, long long begin, const float* source, long long count);

 private:
  std::map<std::string, DType> dtypes_;  // filled on the first write_f32
};

// Throws RuntimeFailure naming `file` and the first tensor whose written count is not its size.
void check_all_written(const std::string& file, const std::vector<TensorInfo>& layout, const std::vector<long long>& written);

enum class StoreFormat { kSafetensors, kShardedSafetensors, kHdf5 };

// The format a path names: *.safetensors, *.h5 or *.hdf5, or a directory (or its
// model.safetensors.index.json) for a sharded checkpoint. An existing directory without an index
// but with a model.safetensors (what save_pretrained writes for a small model) reads as that file.
// Throws InputError for anything else.
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
  // Elements recorded per tensor, in layout order.
  const std::vector<long long>& written() const { return written_; }

 private:
  std::map<std::string, std::size_t> index_;
  std::vector<TensorInfo> layout_;
  std::vector<long long> written_;
};

}  // namespace gradfix
