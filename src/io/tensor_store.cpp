#include "gradfix/io/tensor_store.hpp"

#include <set>

#include "gradfix/io/model_files.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/hdf5_store.hpp"
#include "gradfix/io/lora.hpp"
#include "gradfix/io/safetensors.hpp"

namespace gradfix {
namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// In HDF5 a tensor name is a path of groups: "a" and "a/b" cannot both be datasets, and empty,
// "." or ".." parts name nothing. Refused as bad input before any file is created.
void check_hdf5_names(const std::string& path, const std::set<std::string>& names) {
  for (const auto& name : names) {
    std::size_t start = 0;
    while (true) {
      const std::size_t slash = name.find('/', start);
      const std::string part = name.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
      if (part.empty() || part == "." || part == "..")
        throw InputError(path + ": tensor name '" + name + "' cannot be an HDF5 dataset path (an empty, '.' or '..' part)");
      if (slash == std::string::npos) break;
      if (names.count(name.substr(0, slash)))
        throw InputError(path + ": tensors '" + name.substr(0, slash) + "' and '" + name +
                         "' cannot both be HDF5 datasets: the first would have to be a group of the second");
      start = slash + 1;
    }
  }
}

}  // namespace

long long TensorInfo::numel() const {
  long long count = 1;
  for (long long dim : shape) count *= dim;
  return count;
}

const TensorInfo* TensorReader::find(const std::string& name) const {
  const auto& all = tensors();
  if (index_.size() != all.size()) {
    index_.clear();
    index_.reserve(all.size());
    for (std::size_t i = 0; i < all.size(); ++i) index_.emplace(all[i].name, i);
  }
  const auto found = index_.find(name);
  return found == index_.end() ? nullptr : &all[found->second];
}

const TensorInfo& TensorReader::info(const std::string& name) const {
  const TensorInfo* tensor = find(name);
  if (tensor == nullptr) throw InputError(path() + ": no tensor named '" + name + "'");
  return *tensor;
}

std::vector<float> TensorReader::read_f32(const std::string& name, long long begin, long long count) const {
  const TensorInfo& tensor = info(name);
  std::vector<float> values(static_cast<std::size_t>(count));
  if (tensor.dtype == DType::kF32) {
    read_raw(name, begin, count, values.data());
    return values;
  }
  std::vector<unsigned char> raw(static_cast<std::size_t>(count) * dtype_size(tensor.dtype));
  read_raw(name, begin, count, raw.data());
  convert_to_f32(tensor.dtype, raw.data(), values.data(), static_cast<std::size_t>(count));
  return values;
}

std::vector<float> TensorReader::read_f32(const std::string& name) const {
  return read_f32(name, 0, info(name).numel());
}

void TensorWriter::write_f32(const std::string& name, long long begin, const float* source, long long count) {
  if (dtypes_.empty())
    for (const auto& tensor : layout()) dtypes_[tensor.name] = tensor.dtype;
  const auto found = dtypes_.find(name);
  if (found == dtypes_.end()) throw RuntimeFailure(path() + ": tensor '" + name + "' is not in the output layout");
  const DType dtype = found->second;
  if (dtype == DType::kF32) {
    write_raw(name, begin, count, source);
    return;
  }
  std::vector<unsigned char> raw(static_cast<std::size_t>(count) * dtype_size(dtype));
  convert_from_f32(dtype, source, raw.data(), static_cast<std::size_t>(count));
  write_raw(name, begin, count, raw.data());
}

WriteTracker::WriteTracker(const std::vector<TensorInfo>& layout) : layout_(layout), written_(layout.size(), 0) {
  for (std::size_t i = 0; i < layout_.size(); ++i) index_[layout_[i].name] = i;
}

const TensorInfo& WriteTracker::record(const std::string& file, const std::string& name, long long begin,
                                       long long count) {
  const auto found = index_.find(name);
  // The jobs write only the tensors of the layout they declared: anything else is a bug.
  GRADFIX_CHECK(found != index_.end(), file + ": tensor '" + name + "' is not in the output layout");
  const TensorInfo& tensor = layout_[found->second];
  if (begin < 0 || count < 0 || begin + count > tensor.numel())
    throw RuntimeFailure(file + ": tensor '" + name + "': write of elements [" + std::to_string(begin) + ", " +
                         std::to_string(begin + count) + ") lies outside its " + std::to_string(tensor.numel()) +
                         " elements");
  written_[found->second] += count;
  return tensor;
}

void check_all_written(const std::string& file, const std::vector<TensorInfo>& layout, const std::vector<long long>& written) {
  if (written.size() != layout.size())
    throw RuntimeFailure(file + ": write counts for " + std::to_string(written.size()) + " tensors, the layout has " +
                         std::to_string(layout.size()));
  for (std::size_t i = 0; i < layout.size(); ++i) {
    if (written[i] != layout[i].numel())
      throw RuntimeFailure(file + ": tensor '" + layout[i].name + "': " + std::to_string(written[i]) + " of " +
                           std::to_string(layout[i].numel()) + " elements were written; refusing to publish");
  }
}

void TensorWriter::finish() {
  flush();
  check_all_written(path(), layout(), written_elements());
}

StoreFormat format_of_path(const std::string& path) {
  if (ends_with(path, ".safetensors")) return StoreFormat::kSafetensors;
  if (ends_with(path, ".h5") || ends_with(path, ".hdf5")) return StoreFormat::kHdf5;
  // Anything else names a directory: an existing sharded checkpoint, or the one a writer is to
  // create. Model names carry dots (Llama-3.1-8B, out.v2), so a new path is a directory whatever
  // its suffix; an existing file of another kind (pytorch_model.bin) keeps its kind and is refused.
  if (ends_with(path, ".index.json") || ends_with(path, "/") || is_directory(path)) return StoreFormat::kShardedSafetensors;
  if (file_exists(path))
    throw InputError("'" + path +
                     "': unknown checkpoint format; expected a .safetensors file, an .h5/.hdf5 file, or a directory "
                     "holding " + kSafetensorsIndexName + " or " + kSafetensorsSingleName);
  return StoreFormat::kShardedSafetensors;
}

const std::vector<std::pair<std::string, std::string>>& TensorReader::unreadable() const {
  static const std::vector<std::pair<std::string, std::string>> kNone;
  return kNone;
}

std::unique_ptr<TensorReader> open_reader(const std::string& path) {
  switch (format_of_path(path)) {
    case StoreFormat::kSafetensors: return open_safetensors_reader(path);
    case StoreFormat::kShardedSafetensors: {
      if (is_lora_adapter(path)) return open_lora_reader(path);
      const std::string directory = sharded_checkpoint_directory(path);
      if (is_directory(path) && !has_model_file(directory, kSafetensorsIndexName) && has_model_file(directory, kSafetensorsSingleName))
        return open_safetensors_reader(model_file(directory, kSafetensorsSingleName));
      return open_sharded_safetensors_reader(path);
    }
    case StoreFormat::kHdf5: return open_hdf5_reader(path);
  }
  throw InputError("'" + path + "': unknown checkpoint format");
}

void TensorWriter::add_file(const std::string& name, const std::string&) {
  throw RuntimeFailure(path() + ": '" + escaped_name(name) + "' cannot be added: only a directory output takes other files");
}

std::unique_ptr<TensorWriter> open_writer(const std::string& path, const std::vector<TensorInfo>& layout,
                                          const Metadata& metadata, const WriteOptions& options) {
  std::set<std::string> names;
  const bool json_header = format_of_path(path) != StoreFormat::kHdf5;
  for (const auto& tensor : layout) {
    if (tensor.name.empty()) throw InputError(path + ": a tensor without a name cannot be written");
    if (!names.insert(tensor.name).second)
      throw InputError(path + ": tensor '" + escaped_name(tensor.name) + "' appears twice in the output");
    // A safetensors header is JSON, which holds valid UTF-8 only: such a name is refused, not
    // silently changed.
    if (json_header && !is_valid_utf8(tensor.name))
      throw InputError(path + ": tensor name '" + escaped_name(tensor.name) + "' is not valid UTF-8, which a safetensors header (JSON) cannot hold");
  }
  if (json_header)
    for (const auto& [key, value] : metadata)
      if (!is_valid_utf8(key) || !is_valid_utf8(value))
        throw InputError(path + ": metadata '" + escaped_name(key) + "' is not valid UTF-8, which a safetensors header (JSON) cannot hold");
  if (format_of_path(path) == StoreFormat::kHdf5) check_hdf5_names(path, names);
  switch (format_of_path(path)) {
    case StoreFormat::kSafetensors: return open_safetensors_writer(path, layout, metadata, options.role);
    case StoreFormat::kShardedSafetensors:
      return open_sharded_safetensors_writer(path, layout, metadata, options.max_shard_bytes, options.role, options.force);
    case StoreFormat::kHdf5: return open_hdf5_writer(path, layout, metadata, options.role);
  }
  throw InputError("'" + path + "': unknown checkpoint format");
}

}  // namespace gradfix
