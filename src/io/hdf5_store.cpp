#include "gradfix/io/hdf5_store.hpp"

#include <fcntl.h>
#include <hdf5.h>
#include <spawn.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <csignal>
#include <cstdio>

#include <limits>
#include <map>
#include <vector>

#include "gradfix/io/error.hpp"
#include "gradfix/io/atomic_file.hpp"

extern char** environ;

namespace gradfix {
namespace {

// What the system said about the last failed call, when HDF5 failed because a write or a flush
// did (no space left, quota, I/O error): the file driver records the errno text in HDF5's error
// stack ("..., errno = 28, error message = 'No space left on device'"); that message, else
// errno's own text, else nothing.
herr_t find_system_message(unsigned /*depth*/, const H5E_error2_t* error, void* found) {
  const std::string description = error->desc != nullptr ? error->desc : "";
  const auto at = description.find("error message = '");
  if (at != std::string::npos) {
    const auto begin = at + 17, end = description.find('\'', begin);
    *static_cast<std::string*>(found) = description.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
  }
  return 0;
}

// The MPI-IO driver (parallel HDF5, also at one rank) keeps neither: then a full file system is
// recognised by what statvfs says is left of the one holding `path`.
std::string system_reason(const std::string& path) {
  const int error = errno;
  std::string message;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, find_system_message, &message);
  if (message.empty() && error != 0) message = std::strerror(error);
  if (message.empty()) {
    const auto slash = path.find_last_of('/');
    const std::string directory = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    struct statvfs space {};
    if (::statvfs(directory.c_str(), &space) == 0) {
      const unsigned long long free_bytes = static_cast<unsigned long long>(space.f_bavail) * space.f_frsize;
      if (free_bytes < (1ULL << 20))
        message = std::strerror(ENOSPC) + std::string(" (") + std::to_string(free_bytes) + " bytes free on the file system)";
    }
  }
  return message.empty() ? std::string() : ": " + message;
}


// Owns one HDF5 identifier and closes it with the matching H5*close call.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~Handle() { reset(); }
  Handle(Handle&& other) noexcept : id_(other.id_), closer_(other.closer_) { other.id_ = -1; }
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = other.id_;
      closer_ = other.closer_;
      other.id_ = -1;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  hid_t get() const { return id_; }
  void reset() {
    if (id_ >= 0 && closer_ != nullptr) closer_(id_);
    id_ = -1;
  }

 private:
  hid_t id_ = -1;
  Closer closer_ = nullptr;
};

// Turns a negative HDF5 return value into an error naming the file and what was being done.
hid_t check(hid_t result, const std::string& path, const std::string& action) {
  if (result < 0) throw InputError(path + ": HDF5 could not " + action);
  return result;
}

// HDF5 prints its own error stack to stderr by default; gradfix reports errors itself.
void silence_hdf5() {
  static const bool silenced = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)silenced;
}

hid_t native_type(DType dtype) {
  switch (dtype) {
    case DType::kF64: return H5T_NATIVE_DOUBLE;
    case DType::kF32: return H5T_NATIVE_FLOAT;
    case DType::kF16:
    case DType::kBF16:
    case DType::kU16: return H5T_NATIVE_UINT16;
    case DType::kI64: return H5T_NATIVE_INT64;
    case DType::kI32: return H5T_NATIVE_INT32;
    case DType::kI16: return H5T_NATIVE_INT16;
    case DType::kI8: return H5T_NATIVE_INT8;
    case DType::kU64: return H5T_NATIVE_UINT64;
    case DType::kU32: return H5T_NATIVE_UINT32;
    case DType::kU8:
    case DType::kBool:
    case DType::kF8E4M3:
    case DType::kF8E5M2: return H5T_NATIVE_UINT8;
  }
  return H5T_NATIVE_FLOAT;
}

// Little-endian file types, so that files are the same on every machine.
hid_t file_type(DType dtype) {
  switch (dtype) {
    case DType::kF64: return H5T_IEEE_F64LE;
    case DType::kF32: return H5T_IEEE_F32LE;
    case DType::kF16:
    case DType::kBF16:
    case DType::kU16: return H5T_STD_U16LE;
    case DType::kI64: return H5T_STD_I64LE;
    case DType::kI32: return H5T_STD_I32LE;
    case DType::kI16: return H5T_STD_I16LE;
    case DType::kI8: return H5T_STD_I8LE;
    case DType::kU64: return H5T_STD_U64LE;
    case DType::kU32: return H5T_STD_U32LE;
    case DType::kU8:
    case DType::kBool:
    case DType::kF8E4M3:
    case DType::kF8E5M2: return H5T_STD_U8LE;
  }
  return H5T_IEEE_F32LE;
}

std::string read_string_attribute(hid_t object, const char* name, const std::string& path) {
  Handle attribute(check(H5Aopen(object, name, H5P_DEFAULT), path, std::string("open attribute ") + name), H5Aclose);
  Handle type(H5Aget_type(attribute.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_STRING) throw InputError(path + ": attribute '" + name + "' is not a string");
  if (H5Tis_variable_str(type.get()) > 0) {
    Handle memory(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(memory.get(), H5T_VARIABLE);
    char* value = nullptr;
    check(H5Aread(attribute.get(), memory.get(), &value), path, std::string("read attribute ") + name);
    std::string text = value != nullptr ? value : "";
    H5free_memory(value);
    return text;
  }
  // One byte more than stored, for the terminating zero the C string type insists on.
  const std::size_t size = H5Tget_size(type.get()) + 1;
  std::string text(size, '\0');
  Handle memory(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(memory.get(), size);
  check(H5Aread(attribute.get(), memory.get(), text.data()), path, std::string("read attribute ") + name);
  const auto end = text.find('\0');
  return end == std::string::npos ? text : text.substr(0, end);
}

void write_string_attribute(hid_t object, const std::string& name, const std::string& value, const std::string& path) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), value.empty() ? 1 : value.size());
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attribute(check(H5Acreate2(object, name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), path,
                         "create attribute " + name),
                   H5Aclose);
  const std::string padded = value.empty() ? std::string(1, '\0') : value;
  check(H5Awrite(attribute.get(), type.get(), padded.data()), path, "write attribute " + name);
}

// The gradfix dtype of a dataset: from its HDF5 type, refined by the gradfix_dtype attribute for
// the 16-bit float types stored as uint16 and the 8-bit ones stored as uint8.
DType dataset_dtype(hid_t dataset, const std::string& path, const std::string& name) {
  if (H5Aexists(dataset, kHdf5DtypeAttribute) > 0) {
    const std::string text = read_string_attribute(dataset, kHdf5DtypeAttribute, path);
    const auto dtype = parse_dtype(text);
    if (!dtype) throw InputError(path + ": dataset '" + name + "': unknown " + kHdf5DtypeAttribute + " '" + text + "'");
    return *dtype;
  }
  Handle type(H5Dget_type(dataset), H5Tclose);
  const std::size_t size = H5Tget_size(type.get());
  switch (H5Tget_class(type.get())) {
    case H5T_FLOAT:
      if (size == 8) return DType::kF64;
      if (size == 4) return DType::kF32;
      break;
    case H5T_INTEGER: {
      const bool is_signed = H5Tget_sign(type.get()) == H5T_SGN_2;
      if (size == 8) return is_signed ? DType::kI64 : DType::kU64;
      if (size == 4) return is_signed ? DType::kI32 : DType::kU32;
      if (size == 2) return is_signed ? DType::kI16 : DType::kU16;
      if (size == 1) return is_signed ? DType::kI8 : DType::kU8;
      break;
    }
    default: break;
  }
  throw InputError(path + ": dataset '" + name + "' has an HDF5 type gradfix cannot read (" + std::to_string(size) +
                   "-byte, neither integer nor float)");
}

// Selects elements [begin, end) of the row-major flattening of `dims` in `space`. A flat range
// is not one hyperslab, but it is a union of at most two partial rows per level plus one block
// of whole rows, which is what this builds, level by level.
void select_flat_range(hid_t space, const std::vector<hsize_t>& dims, std::vector<hsize_t> prefix, hsize_t begin,
                       hsize_t end) {
  const std::size_t level = prefix.size();
  if (begin >= end) return;
  auto add_block = [&](std::vector<hsize_t> start, std::vector<hsize_t> count) {
    for (std::size_t i = start.size(); i < dims.size(); ++i) {
      start.push_back(0);
      count.push_back(dims[i]);
    }
    H5Sselect_hyperslab(space, H5S_SELECT_OR, start.data(), nullptr, count.data(), nullptr);
  };
  if (level + 1 == dims.size()) {
    std::vector<hsize_t> start = prefix, count(prefix.size(), 1);
    start.push_back(begin);
    count.push_back(end - begin);
    add_block(start, count);
    return;
  }
  hsize_t stride = 1;
  for (std::size_t i = level + 1; i < dims.size(); ++i) stride *= dims[i];
  hsize_t first = begin / stride;
  const hsize_t last = (end - 1) / stride;
  auto descend = [&](hsize_t row, hsize_t from, hsize_t to) {
    std::vector<hsize_t> next = prefix;
    next.push_back(row);
    select_flat_range(space, dims, next, from, to);
  };
  if (first == last) {
    descend(first, begin - first * stride, end - first * stride);
    return;
  }
  if (begin % stride != 0) {
    descend(first, begin % stride, stride);
    ++first;
  }
  hsize_t full_end = end / stride;
  if (end % stride != 0) descend(full_end, 0, end % stride);
  if (full_end > first) {
    std::vector<hsize_t> start = prefix, count(prefix.size(), 1);
    start.push_back(first);
    count.push_back(full_end - first);
    add_block(start, count);
  }
}

Handle file_space_for_range(hid_t dataset, const TensorInfo& tensor, long long begin, long long count) {
  Handle space(H5Dget_space(dataset), H5Sclose);
  if (tensor.shape.empty()) {
    H5Sselect_all(space.get());
    return space;
  }
  std::vector<hsize_t> dims(tensor.shape.begin(), tensor.shape.end());
  H5Sselect_none(space.get());
  select_flat_range(space.get(), dims, {}, static_cast<hsize_t>(begin), static_cast<hsize_t>(begin + count));
  return space;
}

// What the probe walks: every link, every object's header, every dataset's dataspace, type and
// creation properties and one element, every root attribute. Errors are HDF5's to report (the
// reader does that in the parent); only a crash matters here.
herr_t probe_link(hid_t, const char*, const H5L_info_t*, void*) { return 0; }
herr_t probe_object(hid_t location, const char* name, const H5O_info_t* info, void*) {
  if (info->type != H5O_TYPE_DATASET) return 0;
  const hid_t dataset = H5Dopen2(location, name, H5P_DEFAULT);
  if (dataset < 0) return 0;
  const hid_t space = H5Dget_space(dataset), type = H5Dget_type(dataset), creation = H5Dget_create_plist(dataset);
  if (space >= 0 && H5Sget_simple_extent_type(space) == H5S_SIMPLE && H5Sget_simple_extent_npoints(space) > 0 && type >= 0 &&
      H5Tget_class(type) != H5T_STRING && H5Tget_size(type) <= 16 && H5Pget_external_count(creation) <= 0) {
    const int rank = H5Sget_simple_extent_ndims(space);
    if (rank > 0 && rank <= 32) {
      std::vector<hsize_t> start(static_cast<std::size_t>(rank), 0), count(static_cast<std::size_t>(rank), 1);
      if (H5Sselect_hyperslab(space, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr) >= 0) {
        const hsize_t one = 1;
        const hid_t memory = H5Screate_simple(1, &one, nullptr);
        unsigned char element[16];
        H5Dread(dataset, type, memory, space, H5P_DEFAULT, element);
        H5Sclose(memory);
      }
    }
  }
  if (creation >= 0) H5Pclose(creation);
  if (type >= 0) H5Tclose(type);
  if (space >= 0) H5Sclose(space);
  H5Dclose(dataset);
  return 0;
}
herr_t probe_attribute(hid_t, const char*, const H5A_info_t*, void*) { return 0; }

// The probe executable beside the running program, or "" when there is none.
std::string probe_executable() {
  char self[4096];
  const ssize_t length = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (length <= 0) return "";
  self[length] = '\0';
  std::string directory(self);
  directory.resize(directory.rfind('/') == std::string::npos ? 0 : directory.rfind('/'));
  const std::string probe = directory + "/gradfix-hdf5-probe";
  return ::access(probe.c_str(), X_OK) == 0 ? probe : "";
}

// The probe's status, from a spawned probe executable or a forked child; -1 when no process
// could be made (the file is then read without a probe).
int run_probe(const std::string& path) {
  pid_t child = -1;
  static const std::string executable = probe_executable();
  if (!executable.empty()) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
    posix_spawnattr_t attributes;
    posix_spawnattr_init(&attributes);
    // Default actions for the signals this process handles (cleanup of its temporaries).
    sigset_t defaults;
    sigemptyset(&defaults);
    for (int signal_number : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL, SIGTERM, SIGINT, SIGHUP}) sigaddset(&defaults, signal_number);
    posix_spawnattr_setsigdefault(&attributes, &defaults);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGDEF);
    std::string argument0 = executable, argument1 = path;
    char* const arguments[] = {argument0.data(), argument1.data(), nullptr};
    if (::posix_spawn(&child, executable.c_str(), &actions, &attributes, arguments, environ) != 0) child = -1;
    posix_spawnattr_destroy(&attributes);
    posix_spawn_file_actions_destroy(&actions);
  } else {
    std::fflush(nullptr);
    child = ::fork();
    if (child == 0) {
      // The child reports nothing and touches nothing of the parent's: default signal actions (no
      // cleanup of the parent's temporaries, no MPI backtraces), its output to /dev/null.
      for (int signal_number : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL, SIGTERM, SIGINT, SIGHUP}) std::signal(signal_number, SIG_DFL);
      const int null = ::open("/dev/null", O_WRONLY);
      if (null >= 0) {
        ::dup2(null, 1);
        ::dup2(null, 2);
      }
      walk_hdf5_structure(path);
      ::_exit(0);
    }
  }
  if (child < 0) return -1;
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

// libhdf5 (Debian's 1.10.8) can crash on a corrupt file: a 3.5 KB file found by the fuzz harness
// makes H5Lvisit copy into a null pointer (tests/fuzz/seeds/hdf5). A file from a stranger is
// therefore first walked in another process; if that does not come back cleanly, the file is
// refused (exit 2) and this process, its ranks and its outputs are unaffected.
void probe_in_child(const std::string& path) {
  const int status = run_probe(path);
  if (status == -1) return;  // no process to spare: read without the probe
  if (WIFSIGNALED(status))
    throw InputError(path + ": libhdf5 crashed (signal " + std::to_string(WTERMSIG(status)) +
                     ") reading the file's structure in a probe process: the file is corrupt; it was not opened here");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw InputError(path + ": libhdf5 failed (exit " + std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1) +
                     ") reading the file's structure in a probe process: the file is corrupt; it was not opened here");
}

}  // namespace

void walk_hdf5_structure(const std::string& path) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (file < 0) return;
  H5Lvisit(file, H5_INDEX_NAME, H5_ITER_INC, probe_link, nullptr);
  H5Ovisit(file, H5_INDEX_NAME, H5_ITER_INC, probe_object, nullptr);
  hsize_t position = 0;
  H5Aiterate2(file, H5_INDEX_NAME, H5_ITER_INC, &position, probe_attribute, nullptr);
  H5Fclose(file);
}

namespace {

class Hdf5Reader final : public TensorReader {
 public:
  explicit Hdf5Reader(const std::string& path) : path_(path) {
    silence_hdf5();
    if (!file_exists(path)) throw InputError(path + ": cannot open: No such file or directory");
    if (H5Fis_hdf5(path.c_str()) <= 0) throw InputError(path + ": not an HDF5 file (bad signature or truncated)");
    probe_in_child(path);
    file_ = Handle(check(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), path, "open the file"), H5Fclose);
    const herr_t linked = H5Lvisit(file_.get(), H5_INDEX_NAME, H5_ITER_INC, &Hdf5Reader::visit_link, this);
    if (visit_error_) std::rethrow_exception(visit_error_);
    check(linked, path, "list the links");
    const herr_t listed = H5Ovisit(file_.get(), H5_INDEX_NAME, H5_ITER_INC, &Hdf5Reader::visit, this);
    if (visit_error_) std::rethrow_exception(visit_error_);
    check(listed, path, "list the datasets");
    read_root_attributes();
  }

  const std::string& path() const override { return path_; }
  const std::vector<TensorInfo>& tensors() const override { return tensors_; }
  const Metadata& metadata() const override { return metadata_; }

  void read_raw(const std::string& name, long long begin, long long count, void* target) const override {
    const TensorInfo& tensor = info(name);
    if (begin < 0 || count < 0 || begin + count > tensor.numel())
      throw InputError(path_ + ": tensor '" + name + "': elements [" + std::to_string(begin) + ", " +
                       std::to_string(begin + count) + ") requested, it has " + std::to_string(tensor.numel()));
    if (count == 0) return;
    Handle dataset(check(H5Dopen2(file_.get(), name.c_str(), H5P_DEFAULT), path_, "open dataset '" + name + "'"), H5Dclose);
    Handle file_space = file_space_for_range(dataset.get(), tensor, begin, count);
    const hsize_t memory_size = static_cast<hsize_t>(count);
    Handle memory_space(H5Screate_simple(1, &memory_size, nullptr), H5Sclose);
    check(H5Dread(dataset.get(), native_type(tensor.dtype), memory_space.get(), file_space.get(), H5P_DEFAULT, target),
          path_, "read dataset '" + name + "' (the file may be truncated)");
  }

 private:
  // Links that lead out of the file (external links) or nowhere certain (soft links) are refused:
  // a checkpoint's tensors live inside the checkpoint.
  static herr_t visit_link(hid_t group, const char* name, const H5L_info_t* info, void* self_pointer) {
    auto* self = static_cast<Hdf5Reader*>(self_pointer);
    if (info->type == H5L_TYPE_HARD) return 0;
    try {
      std::string target;
      if (info->type == H5L_TYPE_EXTERNAL && info->u.val_size > 0 && info->u.val_size < (1u << 16)) {
        std::vector<char> value(info->u.val_size);
        const char* file = nullptr;
        const char* object = nullptr;
        if (H5Lget_val(group, name, value.data(), value.size(), H5P_DEFAULT) >= 0 &&
            H5Lunpack_elink_val(value.data(), value.size(), nullptr, &file, &object) >= 0 && file != nullptr)
          target = std::string(" to '") + file + ":" + (object != nullptr ? object : "") + "'";
      }
      const char* kind = info->type == H5L_TYPE_EXTERNAL ? "an external link" : info->type == H5L_TYPE_SOFT ? "a soft link" : "a user-defined link";
      throw InputError(self->path_ + ": '" + name + "' is " + kind + target +
                       "; gradfix reads only datasets stored in the file itself (no links, no external storage)");
    } catch (...) {
      self->visit_error_ = std::current_exception();
      return -1;
    }
  }

  static herr_t visit(hid_t object, const char* name, const H5O_info_t* info, void* self_pointer) {
    auto* self = static_cast<Hdf5Reader*>(self_pointer);
    if (info->type != H5O_TYPE_DATASET) return 0;
    try {
      Handle dataset(H5Dopen2(object, name, H5P_DEFAULT), H5Dclose);
      TensorInfo tensor;
      tensor.name = name;
      tensor.dtype = dataset_dtype(dataset.get(), self->path_, name);
      const std::string where = self->path_ + ": dataset '" + tensor.name + "'";
      Handle space(H5Dget_space(dataset.get()), H5Sclose);
      if (H5Sget_simple_extent_type(space.get()) == H5S_NULL)
        throw InputError(where + " has a null dataspace (no elements, not even a scalar): it holds no tensor");
      const int rank = H5Sget_simple_extent_ndims(space.get());
      if (rank < 0 || rank > 32) throw InputError(where + ": HDF5 could not read its dimensions");
      std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
      if (rank > 0) H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
      // Checked arithmetic: a declared size must be countable and addressable before anything
      // is sized from it.
      long long elements = 1, bytes = 0;
      std::string shape;
      for (hsize_t dim : dims) {
        shape += (shape.empty() ? "" : ", ") + std::to_string(dim);
        if (elements >= 0 && (dim > static_cast<hsize_t>(std::numeric_limits<long long>::max()) ||
                              __builtin_mul_overflow(elements, static_cast<long long>(dim), &elements)))
          elements = -1;
        tensor.shape.push_back(static_cast<long long>(dim));
      }
      if (elements < 0 || __builtin_mul_overflow(elements, static_cast<long long>(dtype_size(tensor.dtype)), &bytes))
        throw InputError(where + " declares shape [" + shape + "]: its element count or byte size overflows 64 bits");
      Handle creation(H5Dget_create_plist(dataset.get()), H5Pclose);
      if (creation.get() >= 0) {
        const int external = H5Pget_external_count(creation.get());
        if (external > 0) {
          char file[4096] = {0};
          off_t offset = 0;
          hsize_t size = 0;
          H5Pget_external(creation.get(), 0, sizeof file - 1, file, &offset, &size);
          throw InputError(where + " keeps its data in another file ('" + std::string(file) +
                           "', external storage); a checkpoint's tensors must be stored inside it");
        }
        if (H5Pget_layout(creation.get()) == H5D_VIRTUAL)
          throw InputError(where + " is a virtual dataset (its data comes from other datasets or files); store the data itself");
      }
      // Storage that was never written reads as the fill value: a declared 2^40 floats would be
      // read (or copied) for hours as zeros. A tensor's data must be in the file.
      H5D_space_status_t status = H5D_SPACE_STATUS_ERROR;
      if (elements > 0 && (H5Dget_space_status(dataset.get(), &status) < 0 || status != H5D_SPACE_STATUS_ALLOCATED)) {
        throw InputError(where + " declares " + std::to_string(bytes) + " bytes but its storage " +
                         (status == H5D_SPACE_STATUS_PART_ALLOCATED ? "is only partly" : "was never") +
                         " written (" + std::to_string(H5Dget_storage_size(dataset.get())) + " bytes allocated)");
      }
      if (elements > 0 && creation.get() >= 0 && H5Pget_layout(creation.get()) == H5D_CONTIGUOUS) {
        const hsize_t stored = H5Dget_storage_size(dataset.get());
        if (stored < static_cast<hsize_t>(bytes))
          throw InputError(where + " declares " + std::to_string(bytes) + " bytes but " + std::to_string(stored) + " are stored");
      }
      self->tensors_.push_back(tensor);
    } catch (...) {
      self->visit_error_ = std::current_exception();
      return -1;
    }
    return 0;
  }

  // One pass over the root group's attributes (looking each up by its index was quadratic:
  // 20,000 metadata entries took minutes).
  void read_root_attributes() {
    hsize_t position = 0;
    const herr_t listed = H5Aiterate2(file_.get(), H5_INDEX_NAME, H5_ITER_INC, &position, &Hdf5Reader::visit_attribute, this);
    if (visit_error_) std::rethrow_exception(visit_error_);
    check(listed, path_, "read the root group's attributes");
  }

  static herr_t visit_attribute(hid_t location, const char* name, const H5A_info_t* info, void* self_pointer) {
    auto* self = static_cast<Hdf5Reader*>(self_pointer);
    try {
      if (info->data_size > (16u << 20))
        throw InputError(self->path_ + ": metadata attribute '" + escaped_name(name) + "' holds " + std::to_string(info->data_size) +
                         " bytes; metadata values are read up to 16 MiB");
      self->metadata_[name] = read_string_attribute(location, name, self->path_);
    } catch (...) {
      self->visit_error_ = std::current_exception();
      return -1;
    }
    return 0;
  }

  std::string path_;
  Handle file_;
  std::vector<TensorInfo> tensors_;
  Metadata metadata_;
  std::exception_ptr visit_error_;
};

constexpr std::size_t kDenseAttributesAbove = 64;

class Hdf5Writer final : public TensorWriter {
 public:
  Hdf5Writer(const std::string& path, const std::vector<TensorInfo>& layout, const Metadata& metadata,
             const WriterRole& role)
      : path_(path), temporary_(temporary_path_for(path, role.token)), layout_(layout), tracker_(layout), role_(role) {
    silence_hdf5();
    // HDF5 has no way to attach to a file another process is still creating: several writers of
    // one file go through a parallel file access (MPI-IO, set by gradfix::dist), where the file,
    // its datasets and attributes are created by all of them together, the data by each alone.
    if (!role_.leader && !role_.hdf5_file_access)
      throw RuntimeFailure(path_ + ": " + role_.who + ": several writers of one HDF5 file need a parallel file access");
    register_temporary(temporary_);
    // A constructor that throws runs no destructor: what it created is removed here.
    try {
      create(metadata);
    } catch (...) {
      file_.reset();
      if (role_.leader) remove_quietly(temporary_);
      unregister_temporary(temporary_);
      throw;
    }
  }

 private:
  void create(const Metadata& metadata) {
    Handle access(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
    if (role_.hdf5_file_access) role_.hdf5_file_access(static_cast<std::int64_t>(access.get()));
    Handle creation(H5Pcreate(H5P_FILE_CREATE), H5Pclose);
    // Many metadata entries go to dense attribute storage (a B-tree; the default compact storage
    // in the object header made 20,000 entries take seconds to write and minutes to read). It
    // needs the HDF5 1.8 file format, so small files keep the oldest format.
    if (metadata.size() > kDenseAttributesAbove) {
      H5Pset_attr_phase_change(creation.get(), 0, 0);
      H5Pset_obj_track_times(creation.get(), 0);  // that format stamps the root group's times
      H5Pset_libver_bounds(access.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST);
    }
    file_ = Handle(H5Fcreate(temporary_.c_str(), H5F_ACC_TRUNC, creation.get(), access.get()), H5Fclose);
    if (file_.get() < 0) throw RuntimeFailure(path_ + ": cannot create '" + temporary_ + "'");
    for (const auto& [key, value] : metadata) write_string_attribute(file_.get(), key, value, path_);
    Handle link_properties(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
    H5Pset_create_intermediate_group(link_properties.get(), 1);
    // No modification times in object headers: the same tensors give the same file bytes.
    Handle dataset_properties(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    H5Pset_obj_track_times(dataset_properties.get(), 0);
    for (const auto& tensor : layout_) {
      Handle space = tensor.shape.empty()
                         ? Handle(H5Screate(H5S_SCALAR), H5Sclose)
                         : Handle(H5Screate_simple(static_cast<int>(tensor.shape.size()),
                                                   std::vector<hsize_t>(tensor.shape.begin(), tensor.shape.end()).data(),
                                                   nullptr),
                                  H5Sclose);
      Handle dataset(H5Dcreate2(file_.get(), tensor.name.c_str(), file_type(tensor.dtype), space.get(),
                                link_properties.get(), dataset_properties.get(), H5P_DEFAULT),
                     H5Dclose);
      if (dataset.get() < 0) throw RuntimeFailure(path_ + ": cannot create dataset '" + tensor.name + "'");
      if (tensor.dtype == DType::kBF16 || tensor.dtype == DType::kF16 || tensor.dtype == DType::kBool ||
          tensor.dtype == DType::kF8E4M3 || tensor.dtype == DType::kF8E5M2)
        write_string_attribute(dataset.get(), kHdf5DtypeAttribute, dtype_name(tensor.dtype), path_);
    }
  }

 public:
  ~Hdf5Writer() override {
    file_.reset();
    if (!published_) {
      if (role_.leader) remove_quietly(temporary_);
      unregister_temporary(temporary_);
    }
  }

  const std::string& path() const override { return path_; }
  const std::vector<TensorInfo>& layout() const override { return layout_; }

  void write_raw(const std::string& name, long long begin, long long count, const void* source) override {
    const TensorInfo& tensor = tracker_.record(path_, name, begin, count);
    if (count == 0) return;
    Handle dataset(H5Dopen2(file_.get(), name.c_str(), H5P_DEFAULT), H5Dclose);
    if (dataset.get() < 0) throw RuntimeFailure(path_ + ": cannot open dataset '" + name + "'");
    Handle file_space = file_space_for_range(dataset.get(), tensor, begin, count);
    const hsize_t memory_size = static_cast<hsize_t>(count);
    Handle memory_space(H5Screate_simple(1, &memory_size, nullptr), H5Sclose);
    errno = 0;
    if (H5Dwrite(dataset.get(), native_type(tensor.dtype), memory_space.get(), file_space.get(), H5P_DEFAULT, source) < 0)
      throw RuntimeFailure(path_ + ": cannot write dataset '" + name + "'" + system_reason(temporary_));
  }

  // With a parallel file access, closing the file is collective: every writer flushes.
  void flush() override {
    if (file_.get() < 0) return;
    errno = 0;
    if (H5Fflush(file_.get(), H5F_SCOPE_GLOBAL) < 0) throw RuntimeFailure(path_ + ": flush failed" + system_reason(temporary_));
    file_.reset();
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
  Handle file_;
  bool published_ = false;
};

}  // namespace

std::string hdf5_version() {
  unsigned major = 0, minor = 0, release = 0;
  H5get_libversion(&major, &minor, &release);
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(release);
}

bool hdf5_is_parallel() {
#ifdef H5_HAVE_PARALLEL
  return true;
#else
  return false;
#endif
}

std::unique_ptr<TensorReader> open_hdf5_reader(const std::string& path) { return std::make_unique<Hdf5Reader>(path); }

std::unique_ptr<TensorWriter> open_hdf5_writer(const std::string& path, const std::vector<TensorInfo>& layout,
                                               const Metadata& metadata, const WriterRole& role) {
  return std::make_unique<Hdf5Writer>(path, layout, metadata, role);
}

}  // namespace gradfix
