#include "gradfix/io/safetensors.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_set>

#include "gradfix/io/model_files.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "json_input.hpp"

namespace gradfix {
namespace {

using Json = nlohmann::json;

// A read-only memory map of a whole file; zero-length files map nothing.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw InputError(path + ": cannot open: " + std::strerror(errno));
    struct stat status {};
    if (::fstat(fd_, &status) != 0) throw InputError(path + ": cannot stat: " + std::strerror(errno));
    if (S_ISDIR(status.st_mode)) {
      ::close(fd_);
      throw InputError(path + ": is a directory, not a file (a sharded checkpoint is named by its directory without a file name)");
    }
    if (!S_ISREG(status.st_mode)) {
      ::close(fd_);
      throw InputError(path + ": is not a regular file");
    }
    size_ = static_cast<long long>(status.st_size);
    if (size_ > 0) {
      void* mapped = ::mmap(nullptr, static_cast<std::size_t>(size_), PROT_READ, MAP_SHARED, fd_, 0);
      if (mapped == MAP_FAILED) throw RuntimeFailure(path + ": cannot memory-map: " + std::strerror(errno));
      data_ = static_cast<const unsigned char*>(mapped);
    }
  }
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<unsigned char*>(data_), static_cast<std::size_t>(size_));
    if (fd_ >= 0) ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const unsigned char* data() const { return data_; }
  long long size() const { return size_; }

  // Unmaps the whole pages inside [start, start + bytes) from the resident set.
  void release(const unsigned char* start, std::size_t bytes) const {
    static const std::uintptr_t page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto first = (reinterpret_cast<std::uintptr_t>(start) + page - 1) / page * page;
    const auto last = (reinterpret_cast<std::uintptr_t>(start) + bytes) / page * page;
    if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
  }

 private:
  int fd_ = -1;
  long long size_ = 0;
  const unsigned char* data_ = nullptr;
};

std::uint64_t read_le64(const unsigned char* bytes) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

// Multiplies with a check: a forged shape must not wrap around to a small byte count.
bool checked_multiply(unsigned long long a, unsigned long long b, unsigned long long* product) {
  return !__builtin_mul_overflow(a, b, product);
}

struct StoredTensor {
  TensorInfo info;
  std::string unknown_dtype;  // non-empty: a dtype gradfix cannot read; the bytes are only skipped
  unsigned long long begin = 0;  // byte offsets within the data section
  unsigned long long end = 0;
};

// Deeper than any valid header or index needs (a header has three levels): refused before the
// document is built, because building and destroying a deeply nested document recurses.
constexpr int kMaxJsonDepth = 16;

// A first pass over the text with nlohmann's SAX interface: the nesting depth, and names given
// twice at the top level (the format forbids them; a parser would silently keep the last). It is
// linear in the text, where the callback form of the DOM parser rescans the top-level object
// after every nested one (quadratic in the number of tensors).
class JsonShapeCheck final : public nlohmann::json_sax<Json> {
 public:
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return enter(); }
  bool end_object() override { return leave(); }
  bool start_array(std::size_t) override { return enter(); }
  bool end_array() override { return leave(); }
  bool key(string_t& name) override {
    if (depth_ == 1 && duplicate_.empty() && !keys_.insert(name).second) duplicate_ = name;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& error) override {
    error_ = std::string(error.what()) + " (at byte " + std::to_string(position) + ")";
    return false;
  }

  bool too_deep() const { return too_deep_; }
  const std::string& duplicate() const { return duplicate_; }
  const std::string& error() const { return error_; }

 private:
  bool enter() {
    if (++depth_ > kMaxJsonDepth) {
      too_deep_ = true;
      return false;
    }
    return true;
  }
  bool leave() {
    --depth_;
    return true;
  }

  int depth_ = 0;
  bool too_deep_ = false;
  std::unordered_set<std::string> keys_;
  std::string duplicate_;
  std::string error_;
};

Json parse_json_without_duplicates(const std::string& text, const std::string& path, const char* what) {
  JsonShapeCheck check;
  const bool complete = Json::sax_parse(text, &check);
  if (check.too_deep())
    throw InputError(path + ": " + what + " nests deeper than " + std::to_string(kMaxJsonDepth) + " levels; a valid one needs three");
  if (!complete) throw InputError(path + ": " + what + " is not valid JSON: " + escaped_name(check.error()));
  if (!check.duplicate().empty()) throw InputError(path + ": " + what + " names '" + escaped_name(check.duplicate()) + "' twice");
  try {
    return Json::parse(text);
  } catch (const Json::exception& error) {
    throw InputError(path + ": " + what + " is not valid JSON: " + escaped_name(error.what()));
  }
}

class SafetensorsReader final : public TensorReader {
 public:
  explicit SafetensorsReader(const std::string& path) : path_(path), file_(path) { parse_header(); }

  const std::string& path() const override { return path_; }
  const std::vector<TensorInfo>& tensors() const override { return tensors_; }
  const Metadata& metadata() const override { return metadata_; }
  const std::vector<std::pair<std::string, std::string>>& unreadable() const override { return unreadable_; }

  void read_raw(const std::string& name, long long begin, long long count, void* target) const override {
    const auto found = index_.find(name);
    if (found == index_.end()) throw InputError(path_ + ": no tensor named '" + name + "'");
    const TensorInfo& tensor = tensors_[found->second];
    if (begin < 0 || count < 0 || begin + count > tensor.numel())
      throw InputError(path_ + ": tensor '" + name + "': elements [" + std::to_string(begin) + ", " +
                       std::to_string(begin + count) + ") requested, it has " + std::to_string(tensor.numel()));
    if (count == 0) return;
    const std::size_t item = dtype_size(tensor.dtype);
    const unsigned char* source = file_.data() + data_start_ + byte_begin_[found->second] + begin * item;
    const std::size_t bytes = static_cast<std::size_t>(count) * item;
    std::memcpy(target, source, bytes);
    // Drop the copied pages from this process's mapping (the page cache keeps them): reading a
    // whole checkpoint chunk by chunk must not grow the resident set by the checkpoint's size.
    file_.release(source, bytes);
  }

 private:
  void parse_header() {
    const long long size = file_.size();
    if (size < 8)
      throw InputError(path_ + ": file is " + std::to_string(size) +
                       " bytes, too short for the 8-byte header length of a safetensors file");
    const std::uint64_t header_length = read_le64(file_.data());
    if (header_length > static_cast<std::uint64_t>(kMaxSafetensorsHeaderBytes))
      throw InputError(path_ + ": header length " + std::to_string(header_length) + " exceeds the limit of " +
                       std::to_string(kMaxSafetensorsHeaderBytes) + " bytes");
    if (header_length > static_cast<std::uint64_t>(size - 8))
      throw InputError(path_ + ": header length " + std::to_string(header_length) +
                       " is larger than the file allows (" + std::to_string(size - 8) +
                       " bytes after the length field); the file is truncated or not safetensors");
    const std::string text(reinterpret_cast<const char*>(file_.data() + 8), header_length);
    if (text.empty() || text[0] != '{')
      throw InputError(path_ + ": header does not start with '{'; not a safetensors file");
    const Json header = parse_json_without_duplicates(text, path_, "header");
    if (!header.is_object()) throw InputError(path_ + ": header is not a JSON object");

    data_start_ = 8 + static_cast<long long>(header_length);
    std::vector<StoredTensor> stored;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        read_metadata(entry);
        continue;
      }
      stored.push_back(parse_entry(name, entry));
    }
    check_layout(stored, static_cast<unsigned long long>(size - data_start_));
    for (const auto& tensor : stored) {
      if (!tensor.unknown_dtype.empty()) {
        unreadable_.emplace_back(tensor.info.name, tensor.unknown_dtype);
        continue;
      }
      index_[tensor.info.name] = tensors_.size();
      tensors_.push_back(tensor.info);
      byte_begin_.push_back(static_cast<long long>(tensor.begin));
    }
  }

  void read_metadata(const Json& entry) {
    if (!entry.is_object()) throw InputError(path_ + ": __metadata__ is not a JSON object");
    for (const auto& [key, value] : entry.items()) {
      if (!value.is_string())
        throw InputError(path_ + ": __metadata__ entry '" + key + "' is not a string (" + value.type_name() + ")");
      metadata_[key] = value.get<std::string>();
    }
  }

  StoredTensor parse_entry(const std::string& name, const Json& entry) const {
    const std::string where = path_ + ": tensor '" + name + "'";
    if (!entry.is_object()) throw InputError(where + ": entry is not a JSON object");
    if (!entry.contains("dtype") || !entry["dtype"].is_string()) throw InputError(where + ": missing string 'dtype'");
    const std::string dtype_text = entry["dtype"].get<std::string>();
    const auto dtype = parse_dtype(dtype_text);
    if (!entry.contains("shape") || !entry["shape"].is_array()) throw InputError(where + ": missing array 'shape'");
    StoredTensor tensor;
    tensor.info.name = name;
    // A tensor of a dtype gradfix does not know (F4, a new 6-bit float...) is kept aside: its
    // bytes still take their place in the layout check, and a job refuses it unless --exclude
    // leaves it out.
    if (!dtype) tensor.unknown_dtype = dtype_text.empty() ? std::string("(empty)") : dtype_text;
    tensor.info.dtype = dtype ? *dtype : DType::kU8;
    unsigned long long elements = 1;
    for (const auto& dim : entry["shape"]) {
      if (!dim.is_number_unsigned()) throw InputError(where + ": shape entry " + dim.dump() + " is not a non-negative integer");
      const auto value = dim.get<unsigned long long>();
      if (value > (1ULL << 62) || !checked_multiply(elements, value, &elements))
        throw InputError(where + ": shape " + entry["shape"].dump() + " overflows");
      tensor.info.shape.push_back(static_cast<long long>(value));
    }
    const auto& offsets = entry.contains("data_offsets") ? entry["data_offsets"] : Json();
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      throw InputError(where + ": 'data_offsets' must be two non-negative integers, got " + offsets.dump());
    tensor.begin = offsets[0].get<unsigned long long>();
    tensor.end = offsets[1].get<unsigned long long>();
    if (tensor.end < tensor.begin)
      throw InputError(where + ": data_offsets end " + std::to_string(tensor.end) + " is before begin " +
                       std::to_string(tensor.begin));
    if (!dtype) return tensor;
    unsigned long long bytes = 0;
    if (!checked_multiply(elements, dtype_size(*dtype), &bytes))
      throw InputError(where + ": byte size of shape " + entry["shape"].dump() + " overflows");
    if (bytes != tensor.end - tensor.begin)
      throw InputError(where + ": shape " + entry["shape"].dump() + " of " + dtype_text + " needs " +
                       std::to_string(bytes) + " bytes, data_offsets span " +
                       std::to_string(tensor.end - tensor.begin));
    return tensor;
  }

  // The data section must be covered exactly: tensors back to back from offset 0, no hole, no
  // overlap, the last one ending at the end of the file.
  void check_layout(std::vector<StoredTensor>& stored, unsigned long long data_bytes) const {
    std::sort(stored.begin(), stored.end(), [](const StoredTensor& a, const StoredTensor& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    unsigned long long expected = 0;
    for (const auto& tensor : stored) {
      if (tensor.begin < expected)
        throw InputError(path_ + ": tensor '" + tensor.info.name + "' starts at byte " + std::to_string(tensor.begin) +
                         ", overlapping the previous tensor, which ends at " + std::to_string(expected));
      if (tensor.begin > expected)
        throw InputError(path_ + ": tensor '" + tensor.info.name + "' starts at byte " + std::to_string(tensor.begin) +
                         ", leaving a hole after byte " + std::to_string(expected));
      expected = tensor.end;
    }
    if (expected != data_bytes)
      throw InputError(path_ + ": tensors end at data byte " + std::to_string(expected) + " but the data section has " +
                       std::to_string(data_bytes) + " bytes" +
                       (expected > data_bytes ? " (the file is truncated or an offset is out of range)" : ""));
  }

  std::string path_;
  MappedFile file_;
  long long data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::vector<long long> byte_begin_;
  std::map<std::string, std::size_t> index_;
  Metadata metadata_;
  std::vector<std::pair<std::string, std::string>> unreadable_;
};

class ShardedSafetensorsReader final : public TensorReader {
 public:
  explicit ShardedSafetensorsReader(const std::string& path) {
    const bool is_index = path.size() > 11 && path.compare(path.size() - 11, 11, ".index.json") == 0;
    directory_ = sharded_checkpoint_directory(path);
    path_ = is_index ? path : model_file(directory_, kSafetensorsIndexName);
    if (!file_exists(path_))
      throw InputError(directory_ + ": not a checkpoint directory (neither " + kSafetensorsIndexName + " nor model.safetensors)");
    const Json index = parse_json_without_duplicates(read_text(path_), path_, "index");
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      throw InputError(path_ + ": index has no 'weight_map' object");
    std::map<std::string, std::vector<std::string>> names_by_file;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) throw InputError(path_ + ": weight_map entry '" + name + "' is not a file name");
      // A checkpoint's shards lie in its own directory: a path in the index must not lead a
      // downloaded checkpoint into reading other files of the user's.
      const std::string& shard = file.get_ref<const std::string&>();
      if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos || shard.find('\\') != std::string::npos)
        throw InputError(path_ + ": weight_map entry '" + name + "' names '" + shard +
                         "'; shard names must be plain file names in the checkpoint's directory");
      names_by_file[file.get<std::string>()].push_back(name);
    }
    check_shard_set(names_by_file);
    for (const auto& [file, names] : names_by_file) {
      auto shard = open_safetensors_reader(model_file(directory_, file));
      std::set<std::string> expected(names.begin(), names.end());
      std::vector<std::string> held;
      for (const auto& tensor : shard->tensors()) held.push_back(tensor.name);
      for (const auto& [name, dtype] : shard->unreadable()) held.push_back(name);
      for (const auto& name : held) {
        if (!expected.count(name))
          throw InputError(shard->path() + ": tensor '" + name + "' is not listed for this file in " + path_);
        expected.erase(name);
      }
      for (const auto& entry : shard->unreadable()) unreadable_.push_back(entry);
      if (!expected.empty())
        throw InputError(path_ + ": lists " + format_name_list({expected.begin(), expected.end()}) + " in '" + file +
                         "', which does not hold them");
      const std::size_t shard_index = shards_.size();
      for (const auto& tensor : shard->tensors()) {
        owner_[tensor.name] = shard_index;
        tensors_.push_back(tensor);
      }
      if (metadata_.empty()) metadata_ = shard->metadata();
      shards_.push_back(std::move(shard));
    }
  }

  const std::string& path() const override { return path_; }
  const std::vector<TensorInfo>& tensors() const override { return tensors_; }
  const Metadata& metadata() const override { return metadata_; }
  const std::vector<std::pair<std::string, std::string>>& unreadable() const override { return unreadable_; }

  // Shards named model-0000i-of-0000N.safetensors form a set: an index that leaves one of the
  // set out (present in the directory, or named by the others' count) would silently drop its
  // tensors. Other .safetensors files (consolidated.safetensors, adapters) are not the index's.
  void check_shard_set(const std::map<std::string, std::vector<std::string>>& names_by_file) const {
    auto parse = [](const std::string& name, int& index, int& count) {
      return name.size() == 32 && std::sscanf(name.c_str(), "model-%5d-of-%5d.safetensors", &index, &count) == 2 &&
             name == shard_file_name(index, count);
    };
    std::set<int> counts;
    for (const auto& [file, names] : names_by_file) {
      int index = 0, count = 0;
      if (parse(file, index, count)) counts.insert(count);
    }
    for (int count : counts)
      for (int index = 1; index <= count; ++index)
        if (!names_by_file.count(shard_file_name(index, count)))
          throw InputError(path_ + ": names shards of a set of " + std::to_string(count) + " but not '" + shard_file_name(index, count) +
                           "'; its tensors would be left out");
    DIR* listing = ::opendir(directory_.c_str());
    if (listing == nullptr) return;
    std::vector<std::string> unnamed;
    while (const dirent* entry = ::readdir(listing)) {
      int index = 0, count = 0;
      const std::string name = entry->d_name;
      if (parse(name, index, count) && !names_by_file.count(name)) unnamed.push_back(name);
    }
    ::closedir(listing);
    std::sort(unnamed.begin(), unnamed.end());
    if (!unnamed.empty())
      throw InputError(path_ + ": does not name " + format_name_list(unnamed) + " beside it; its tensors would be left out");
  }

  void read_raw(const std::string& name, long long begin, long long count, void* target) const override {
    const auto found = owner_.find(name);
    if (found == owner_.end()) throw InputError(path_ + ": no tensor named '" + name + "'");
    shards_[found->second]->read_raw(name, begin, count, target);
  }

 private:
  static std::string read_text(const std::string& path) {
    MappedFile file(path);
    return std::string(reinterpret_cast<const char*>(file.data()), static_cast<std::size_t>(file.size()));
  }

  std::string directory_;
  std::string path_;
  std::vector<std::unique_ptr<TensorReader>> shards_;
  std::map<std::string, std::size_t> owner_;
  std::vector<TensorInfo> tensors_;
  Metadata metadata_;
  std::vector<std::pair<std::string, std::string>> unreadable_;
};

void write_all(int fd, const void* data, std::size_t bytes, off_t offset, const std::string& path) {
  const auto* cursor = static_cast<const unsigned char*>(data);
  while (bytes > 0) {
    const ssize_t done = ::pwrite(fd, cursor, bytes, offset);
    if (done < 0) {
      if (errno == EINTR) continue;
      throw RuntimeFailure(path + ": write failed: " + std::strerror(errno));
    }
    cursor += done;
    bytes -= static_cast<std::size_t>(done);
    offset += done;
  }
}

// One safetensors file, written in place under a temporary name: the header first, the file
// sized to its final length, then each range with pwrite at its offset. The leader creates the
// file; other writers of the same output attach to it and write their ranges in place.
class SafetensorsWriter final : public TensorWriter {
 public:
  SafetensorsWriter(const std::string& path, const std::vector<TensorInfo>& layout, const Metadata& metadata,
                    const WriterRole& role)
      : path_(path), temporary_(temporary_path_for(path, role.token)), layout_(layout), tracker_(layout), role_(role) {
    register_temporary(temporary_);
    Json header = Json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    unsigned long long offset = 0;
    for (const auto& tensor : aligned_storage_order(layout)) {
      const auto bytes = static_cast<unsigned long long>(tensor.nbytes());
      header[tensor.name] = {{"dtype", dtype_name(tensor.dtype)}, {"shape", tensor.shape}, {"data_offsets", {offset, offset + bytes}}};
      offset += bytes;
    }
    std::string text = header.dump();
    // Padding to a multiple of 8 puts the data section, and with the storage order every tensor,
    // on a naturally aligned address when the file is mapped.
    text.append((8 - text.size() % 8) % 8, ' ');
    data_start_ = 8 + static_cast<long long>(text.size());
    for (const auto& [name, entry] : header.items())
      if (name != "__metadata__") byte_begin_[name] = entry["data_offsets"][0].get<long long>();
    if (!role_.leader) return;

    fd_ = ::open(temporary_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) throw RuntimeFailure(path_ + ": cannot create '" + temporary_ + "': " + std::strerror(errno));
    // A constructor that throws runs no destructor: the file it created is removed here.
    try {
      unsigned char length[8];
      for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>((text.size() >> (8 * i)) & 0xFF);
      write_all(fd_, length, 8, 0, path_);
      write_all(fd_, text.data(), text.size(), 8, path_);
      if (::ftruncate(fd_, static_cast<off_t>(data_start_ + static_cast<long long>(offset))) != 0)
        throw RuntimeFailure(path_ + ": cannot size the file to " + std::to_string(data_start_ + static_cast<long long>(offset)) +
                             " bytes: " + std::strerror(errno));
    } catch (...) {
      ::close(fd_);
      fd_ = -1;
      remove_quietly(temporary_);
      unregister_temporary(temporary_);
      throw;
    }
  }

  ~SafetensorsWriter() override {
    if (fd_ >= 0) ::close(fd_);
    if (!published_) {
      if (role_.leader) remove_quietly(temporary_);
      unregister_temporary(temporary_);
    }
  }

  const std::string& path() const override { return path_; }
  const std::vector<TensorInfo>& layout() const override { return layout_; }

  void attach() override {
    if (role_.leader || fd_ >= 0) return;
    fd_ = ::open(temporary_.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd_ < 0)
      throw RuntimeFailure(path_ + ": " + role_.who + " cannot open '" + temporary_ + "' made by the leading rank: " +
                           std::strerror(errno) + " (is the output directory on a file system every rank sees?)");
  }

  void write_raw(const std::string& name, long long begin, long long count, const void* source) override {
    const TensorInfo& tensor = tracker_.record(path_, name, begin, count);
    GRADFIX_CHECK(fd_ >= 0, path_ + ": tensor '" + name + "' written before attach() by " + role_.who);
    const long long item = static_cast<long long>(dtype_size(tensor.dtype));
    write_all(fd_, source, static_cast<std::size_t>(count * item),
              static_cast<off_t>(data_start_ + byte_begin_.at(name) + begin * item), path_);
  }

  void flush() override {
    if (fd_ < 0) return;
    if (::fsync(fd_) != 0) throw RuntimeFailure(path_ + ": fsync failed: " + std::strerror(errno));
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw RuntimeFailure(path_ + ": close failed: " + std::strerror(errno));
  }

  std::vector<long long> written_elements() const override { return tracker_.written(); }

  void publish() override {
    if (role_.leader) rename_file(temporary_, path_);
    unregister_temporary(temporary_);
    published_ = true;
  }

 private:
  std::string path_;
  std::string temporary_;
  std::vector<TensorInfo> layout_;
  WriteTracker tracker_;
  WriterRole role_;
  std::map<std::string, long long> byte_begin_;
  long long data_start_ = 0;
  int fd_ = -1;
  bool published_ = false;
};

// What an existing output directory may be for a run to replace it whole: nothing but regular
// files, and a checkpoint (an index or shards), nothing at all, or with `force` any such files. Anything else (a home directory,
// a Hugging Face cache snapshot of symbolic links, a directory of results) is refused untouched.
void check_replaceable(const std::string& directory, bool force) {
  struct stat status {};
  if (::lstat(directory.c_str(), &status) != 0) return;  // nothing there yet
  if (!S_ISDIR(status.st_mode)) throw InputError(directory + ": exists and is not a directory; a sharded output is a directory");
  DIR* listing = ::opendir(directory.c_str());
  if (listing == nullptr) throw InputError(directory + ": cannot list the existing output directory: " + std::strerror(errno));
  bool checkpoint = false, empty = true;
  std::string other;
  while (const dirent* entry = ::readdir(listing)) {
    const std::string name = entry->d_name;
    if (name == "." || name == "..") continue;
    empty = false;
    struct stat inner {};
    if (::lstat((directory + "/" + name).c_str(), &inner) != 0 || !S_ISREG(inner.st_mode)) {
      if (other.empty()) other = name;
      continue;
    }
    if (name == kSafetensorsIndexName || (name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0)) checkpoint = true;
  }
  ::closedir(listing);
  if (!other.empty())
    throw InputError(directory + ": the existing output directory holds '" + escaped_name(other) +
                     "', which is not a regular file; gradfix replaces an output directory whole and will not replace this one");
  if (!empty && !checkpoint && !force)
    throw InputError(directory + ": the existing directory is not a checkpoint (no " + kSafetensorsIndexName +
                     ", no .safetensors file); gradfix replaces an output directory whole and will not replace this one "
                     "(--force replaces it)");
}

// Removes the regular files of a directory and the directory: what a swap left of an earlier
// output, or an unpublished staging directory. Anything else inside is left (and so the directory).
void remove_flat_directory(const std::string& directory) {
  if (DIR* listing = ::opendir(directory.c_str())) {
    std::vector<std::string> names;
    while (const dirent* entry = ::readdir(listing)) names.emplace_back(entry->d_name);
    ::closedir(listing);
    for (const auto& name : names) {
      struct stat status {};
      const std::string path = directory + "/" + name;
      if (name != "." && name != ".." && ::lstat(path.c_str(), &status) == 0 && S_ISREG(status.st_mode)) ::unlink(path.c_str());
    }
  }
  ::rmdir(directory.c_str());
}

// Puts the finished `staging` directory at `target` in one step. When `target` exists, the two
// are exchanged atomically (renameat2 RENAME_EXCHANGE) and the earlier output, now at `staging`,
// is removed: a reader, or a concurrent run, always sees one run's whole output.
void publish_directory(const std::string& staging, const std::string& target) {
  if (::rename(staging.c_str(), target.c_str()) == 0) return;  // no target, or an empty one
  if (errno != EEXIST && errno != ENOTEMPTY)
    throw RuntimeFailure(target + ": cannot publish the output directory: " + std::strerror(errno));
  if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
    remove_flat_directory(staging);
    return;
  }
  // A file system without the exchange: the earlier output steps aside first (a short window in
  // which the target is missing, never mixed).
  const std::string aside = staging + ".old";
  if (::rename(target.c_str(), aside.c_str()) != 0 || ::rename(staging.c_str(), target.c_str()) != 0)
    throw RuntimeFailure(target + ": cannot publish the output directory: " + std::strerror(errno));
  remove_flat_directory(aside);
}

// A directory of shards plus the index, built whole in a private staging directory beside the
// target (".NAME.tmp-TOKEN"), with any files added to it (config.json, tokenizer files), and
// published in one step: the target then holds exactly this run's output, never a mix with an
// earlier or concurrent run's shards.
class ShardedSafetensorsWriter final : public TensorWriter {
 public:
  ShardedSafetensorsWriter(const std::string& path, const std::vector<TensorInfo>& layout, const Metadata& metadata,
                           long long max_shard_bytes, const WriterRole& role, bool force)
      : path_(path), role_(role), layout_(layout) {
    if (max_shard_bytes <= 0) throw InputError("--max-shard-size must be positive, got " + std::to_string(max_shard_bytes));
    if (role_.token.empty()) role_.token = new_temporary_token();
    directory_ = sharded_checkpoint_directory(path);
    staging_ = temporary_path_for(directory_, role_.token);
    if (role_.leader) {
      check_replaceable(directory_, force);
      ensure_directory(parent_directory(directory_));
      if (::mkdir(staging_.c_str(), 0755) != 0)
        throw RuntimeFailure(directory_ + ": cannot create the staging directory '" + staging_ + "': " + std::strerror(errno));
      register_temporary(staging_);
    }
    try {
      std::vector<std::vector<TensorInfo>> groups(1);
      long long group_bytes = 0;
      for (const auto& tensor : layout) {
        if (!groups.back().empty() && group_bytes + tensor.nbytes() > max_shard_bytes) {
          groups.emplace_back();
          group_bytes = 0;
        }
        groups.back().push_back(tensor);
        group_bytes += tensor.nbytes();
      }
      const int count = static_cast<int>(groups.size());
      // What save_pretrained writes: a checkpoint that fits one shard is a lone model.safetensors
      // without an index, unless the index itself was named as the output.
      indexed_ = count > 1 || (path.size() > 11 && path.compare(path.size() - 11, 11, ".index.json") == 0);
      long long total = 0;
      for (int i = 0; i < count; ++i) {
        const std::string file = indexed_ ? shard_file_name(i + 1, count) : kSafetensorsSingleName;
        shards_.push_back(std::make_unique<SafetensorsWriter>(staging_ + "/" + file, groups[i], metadata, role_));
        files_.push_back(file);
        for (const auto& tensor : groups[i]) {
          owner_[tensor.name] = static_cast<std::size_t>(i);
          weight_map_[tensor.name] = file;
          total += tensor.nbytes();
        }
      }
      total_size_ = total;
    } catch (...) {
      discard();
      throw;
    }
  }

  ~ShardedSafetensorsWriter() override {
    if (!published_) discard();
  }

  const std::string& path() const override { return path_; }
  const std::vector<TensorInfo>& layout() const override { return layout_; }

  void attach() override {
    for (auto& shard : shards_) shard->attach();
  }

  void write_raw(const std::string& name, long long begin, long long count, const void* source) override {
    const auto found = owner_.find(name);
    if (found == owner_.end()) throw RuntimeFailure(path_ + ": tensor '" + escaped_name(name) + "' is not in the output layout");
    shards_[found->second]->write_raw(name, begin, count, source);
  }

  void flush() override {
    for (auto& shard : shards_) shard->flush();
    if (!role_.leader || !indexed_) return;  // the leader writes the index
    const std::string index_path = staging_ + "/" + kSafetensorsIndexName;
    register_temporary(index_path);
    const Json index = {{"metadata", {{"total_size", total_size_}}}, {"weight_map", weight_map_}};
    const std::string text = index.dump(2) + "\n";
    std::FILE* file = std::fopen(index_path.c_str(), "wb");
    if (file == nullptr) throw RuntimeFailure(directory_ + "/" + kSafetensorsIndexName + ": cannot create: " + std::strerror(errno));
    const bool written = std::fwrite(text.data(), 1, text.size(), file) == text.size();
    if (std::fclose(file) != 0 || !written) throw RuntimeFailure(directory_ + "/" + kSafetensorsIndexName + ": write failed");
  }

  std::vector<long long> written_elements() const override {
    std::vector<long long> written;
    for (const auto& shard : shards_)
      for (long long count : shard->written_elements()) written.push_back(count);
    return written;
  }

  bool takes_files() const override { return true; }

  void add_file(const std::string& name, const std::string& content) override {
    if (!role_.leader) return;
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos || name == kSafetensorsIndexName ||
        std::find(files_.begin(), files_.end(), name) != files_.end())
      throw RuntimeFailure(directory_ + ": '" + escaped_name(name) + "' cannot be added beside the tensors");
    const std::string file = staging_ + "/" + name;
    register_temporary(file);
    added_.push_back(file);
    write_text_file_atomically(file, content);
  }

  void publish() override {
    // The shards take their final names inside the staging directory, which then replaces the
    // target whole.
    for (const auto& file : files_) register_temporary(staging_ + "/" + file);
    for (auto& shard : shards_) shard->publish();
    if (role_.leader) publish_directory(staging_, directory_);
    published_ = true;
    for (const auto& file : files_) unregister_temporary(staging_ + "/" + file);
    for (const auto& file : added_) unregister_temporary(file);
    unregister_temporary(staging_ + "/" + kSafetensorsIndexName);
    unregister_temporary(staging_);
  }

 private:
  // Everything this run created, on any failure before publication.
  void discard() {
    shards_.clear();  // each removes its temporary
    if (role_.leader) remove_flat_directory(staging_);
    for (const auto& file : added_) unregister_temporary(file);
    unregister_temporary(staging_ + "/" + kSafetensorsIndexName);
    unregister_temporary(staging_);
  }

  std::string path_;
  WriterRole role_;
  std::string directory_;
  std::string staging_;
  std::vector<TensorInfo> layout_;
  std::vector<std::unique_ptr<SafetensorsWriter>> shards_;
  std::vector<std::string> files_;
  std::vector<std::string> added_;
  std::map<std::string, std::size_t> owner_;
  std::map<std::string, std::string> weight_map_;
  long long total_size_ = 0;
  bool indexed_ = true;
  bool published_ = false;
};

}  // namespace

std::string sharded_checkpoint_directory(const std::string& path) {
  std::string directory =
      path.size() > 11 && path.compare(path.size() - 11, 11, ".index.json") == 0 ? parent_directory(path) : path;
  while (directory.size() > 1 && directory.back() == '/') directory.pop_back();
  return directory;
}

std::string shard_file_name(int index, int count) {
  char name[64];
  std::snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", index, count);
  return name;
}

std::vector<TensorInfo> aligned_storage_order(const std::vector<TensorInfo>& layout) {
  std::vector<TensorInfo> order = layout;
  std::stable_sort(order.begin(), order.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return dtype_size(a.dtype) > dtype_size(b.dtype);
  });
  return order;
}

std::unique_ptr<TensorReader> open_safetensors_reader(const std::string& path) {
  return std::make_unique<SafetensorsReader>(path);
}

std::unique_ptr<TensorReader> open_sharded_safetensors_reader(const std::string& path) {
  return std::make_unique<ShardedSafetensorsReader>(path);
}

std::unique_ptr<TensorWriter> open_safetensors_writer(const std::string& path, const std::vector<TensorInfo>& layout,
                                                      const Metadata& metadata, const WriterRole& role) {
  return std::make_unique<SafetensorsWriter>(path, layout, metadata, role);
}

std::unique_ptr<TensorWriter> open_sharded_safetensors_writer(const std::string& path,
                                                              const std::vector<TensorInfo>& layout,
                                                              const Metadata& metadata, long long max_shard_bytes,
                                                              const WriterRole& role, bool force) {
  return std::make_unique<ShardedSafetensorsWriter>(path, layout, metadata, max_shard_bytes, role, force);
}

nlohmann::json parse_untrusted_json(const std::string& text, const std::string& path, const char* what) {
  return parse_json_without_duplicates(text, path, what);
}

std::string read_small_file(const std::string& path, long long limit) {
  MappedFile file(path);
  if (file.size() > limit)
    throw InputError(path + ": " + std::to_string(file.size()) + " bytes; gradfix reads at most " + std::to_string(limit) +
                     " bytes of such a file");
  return std::string(reinterpret_cast<const char*>(file.data()), static_cast<std::size_t>(file.size()));
}

}  // namespace gradfix
