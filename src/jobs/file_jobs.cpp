// The helpers every file job shares (file_jobs.hpp), and ChunkedJob.
#include "file_jobs.hpp"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <set>
#include <sstream>
#include <thread>

#include "gradfix/io/exact_sum.hpp"

namespace gradfix::file_jobs {

void check_finite(DType dtype, const void* values, long long count, const TensorReader& reader, const std::string& name,
                  long long first, bool allow) {
  if (allow) return;
  const long long bad = first_nonfinite(dtype, values, static_cast<std::size_t>(count));
  if (bad < 0) return;
  double value = 0.0;
  convert_to_f64(dtype, static_cast<const unsigned char*>(values) + bad * static_cast<long long>(dtype_size(dtype)), &value, 1);
  throw InputError(reader.path() + ": tensor '" + name + "': element " + std::to_string(first + bad) + " is " +
                   (std::isnan(value) ? "NaN" : "infinite") + "; pass --allow-nonfinite to accept such values");
}

void pause_for_tests() {
  static const long pause_ms = [] {
    const char* text = std::getenv("GRADFIX_TEST_PAUSE_MS");
    return text != nullptr ? std::strtol(text, nullptr, 10) : 0L;
  }();
  if (pause_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
}

unsigned char* scratch_bytes(Scratch which, std::size_t bytes) {
  thread_local std::vector<unsigned char> buffers[2];
  auto& buffer = buffers[static_cast<int>(which)];
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

bool computes_in_f64(std::initializer_list<DType> dtypes) {
  for (DType dtype : dtypes)
    if (dtype == DType::kF64) return true;
  return false;
}

std::string exclude_hint(const std::string& name) {
  if (escaped_name(name) != name) return "pass an --exclude pattern that matches it to leave it out";
  return "pass --exclude '" + exact_pattern(name) + "' to leave it out";
}

std::vector<std::string> selected_names(const TensorReader& reader, const TensorSelector& selector) {
  for (const auto& [name, dtype] : reader.unreadable())
    if (selector.selects(name))
      throw InputError(reader.path() + ": tensor '" + escaped_name(name) + "' is stored as '" + escaped_name(dtype) +
                       "', a dtype gradfix cannot read (it reads " + dtype_names() + "); " +
                       exclude_hint(name));
  std::vector<std::string> names;
  for (const auto& tensor : reader.tensors())
    if (selector.selects(tensor.name)) names.push_back(tensor.name);
  return names;
}

void require_matching(const TensorReader& primary, const std::vector<std::string>& names, const TensorReader& other) {
  std::vector<std::string> missing;
  std::string shapes;
  for (const auto& name : names) {
    const TensorInfo* theirs = other.find(name);
    if (theirs == nullptr) {
      missing.push_back(name);
      continue;
    }
    const TensorInfo& ours = primary.info(name);
    if (ours.shape != theirs->shape && shapes.empty())
      shapes = "tensor '" + name + "': shape " + format_shape(ours.shape) + " in " + primary.path() + ", " +
               format_shape(theirs->shape) + " in " + other.path();
  }
  if (!missing.empty())
    throw InputError(other.path() + " lacks " + std::to_string(missing.size()) + " tensor(s) that " + primary.path() +
                     " has: " + format_name_list(missing));
  if (!shapes.empty()) throw InputError(shapes);
}

std::vector<std::string> select_matching(const TensorReader& primary, const TensorReader& other, const OutputOptions& output) {
  const std::vector<std::string> names = selected_names(primary, TensorSelector(output.include, output.exclude));
  require_selection(names, primary);
  require_matching(primary, names, other);
  return names;
}

void require_no_extra(const TensorReader& primary, const TensorReader& other, const TensorSelector& selector) {
  std::vector<std::string> extra;
  for (const auto& name : selected_names(other, selector))
    if (primary.find(name) == nullptr) extra.push_back(name);
  if (!extra.empty())
    throw InputError(other.path() + " has " + std::to_string(extra.size()) + " tensor(s) that " + primary.path() +
                     " lacks: " + format_name_list(extra));
}

void require_selection(const std::vector<std::string>& names, const TensorReader& reader) {
  if (names.empty())
    throw InputError(reader.path() + ": no tensor is selected (" + std::to_string(reader.tensors().size()) +
                     " tensors in the file; check --include and --exclude)");
}

TensorInfo output_info(const TensorInfo& input, const OutputOptions& output) {
  TensorInfo info = input;
  if (output.out_dtype && dtype_is_float(input.dtype)) info.dtype = *output.out_dtype;
  return info;
}

void require_float(const TensorReader& reader, const std::vector<std::string>& names, const std::string& operation) {
  for (const auto& name : names) {
    const DType dtype = reader.info(name).dtype;
    if (!dtype_is_float(dtype))
      throw InputError(reader.path() + ": tensor '" + escaped_name(name) + "' is " + dtype_name(dtype) + "; " + operation +
                       " works on float tensors only (integer tensors such as position ids are copied from the base "
                       "by apply); " + exclude_hint(name));
  }
}

DType widest_float(const std::vector<DType>& dtypes) {
  auto rank = [](DType dtype) {
    switch (dtype) {
      case DType::kF64: return 4;
      case DType::kF32: return 3;
      case DType::kF16:
      case DType::kBF16: return 2;
      default: return 1;
    }
  };
  DType widest = dtypes.front();
  bool mixed_same_rank = false;
  for (DType dtype : dtypes) {
    if (rank(dtype) > rank(widest)) {
      widest = dtype;
      mixed_same_rank = false;
    } else if (rank(dtype) == rank(widest) && dtype != widest) {
      mixed_same_rank = true;
    }
  }
  return mixed_same_rank && rank(widest) < 3 ? DType::kF32 : widest;
}

int provenance_depth(const std::string& key) {
  int depth = 0;
  for (std::size_t at = key.find("gradfix.input."); at != std::string::npos; at = key.find("gradfix.input.", at + 1)) ++depth;
  return depth;
}

Metadata output_metadata(const std::string& operation, const nlohmann::json& options, const Inputs& inputs) {
  // Keys that describe an operation, not the model: they move under gradfix.input. with the rest
  // of the input's record. The model's own keys (format, gradfix.arch, ...) stay at the top.
  static const std::set<std::string> kOperationKeys = {
      "gradfix.operation", "gradfix.options", "gradfix.provenance_cut", "gradfix.alpha", "gradfix.mask_mode",
      "gradfix.merge_method", "gradfix.merge_order", "gradfix.sign_mode", "gradfix.samples", "gradfix.seed"};
  Metadata metadata;
  if (!inputs.empty())
    for (const auto& [key, value] : inputs.front().second->metadata())
      if (!kOperationKeys.count(key) && key.rfind("gradfix.input.", 0) != 0) metadata[key] = value;
  for (const auto& [role, reader] : inputs)
    for (const auto& [key, value] : reader->metadata()) {
      const std::string nested = "gradfix.input." + role + "." + key;
      if (provenance_depth(nested) > kMaxProvenanceDepth) metadata["gradfix.provenance_cut"] = "deeper than " + std::to_string(kMaxProvenanceDepth) + " operations";
      else metadata[nested] = value;
    }
  metadata["gradfix.operation"] = operation;
  metadata["gradfix.options"] = options.dump();
  if (!metadata.count("format")) metadata["format"] = "pt";
  return metadata;
}

std::string input_name(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

nlohmann::json input_names(const std::vector<std::string>& paths) {
  nlohmann::json names = nlohmann::json::array();
  for (const auto& path : paths) names.push_back(input_name(path));
  return names;
}

nlohmann::json output_options_json(const OutputOptions& output) {
  nlohmann::json json = {{"include", output.include}, {"exclude", output.exclude}, {"allow_nonfinite", output.allow_nonfinite}};
  if (output.out_dtype) json["out_dtype"] = dtype_name(*output.out_dtype);
  return json;
}

nlohmann::json mask_options_json(MaskMode mode, const MaskOptions& mask) {
  return {{"mask_mode", mask_mode_name(mode)}, {"beta", mask.beta}, {"gamma", mask.gamma}, {"c", mask.c}, {"seed", mask.seed}};
}

std::unique_ptr<TensorWriter> open_output(const Ranks& ranks, const std::string& path, const std::vector<TensorInfo>& layout,
                                          const Metadata& metadata, const OutputOptions& output) {
  return open_collective_writer(ranks.context(), path, layout, metadata, output.max_shard_bytes, output.force);
}

std::vector<Piece> my_chunks(const Ranks& ranks, const ShardPlan& plan, const std::vector<TensorInfo>& layout, long long most) {
  const long long limit = most > 0 ? std::min(most, ranks.chunk_elements()) : ranks.chunk_elements();
  std::vector<Piece> chunks;
  for (const auto& piece : plan.pieces(ranks.rank()))
    for (const auto& chunk : chunks_of(piece, split_unit(layout[piece.tensor]), limit)) chunks.push_back(chunk);
  return chunks;
}

long long chunk_bytes(const std::vector<Piece>& chunks, const std::vector<TensorInfo>& layout) {
  long long bytes = 0;
  for (const auto& chunk : chunks) bytes += chunk.count * static_cast<long long>(dtype_size(layout[chunk.tensor].dtype));
  return bytes;
}

void copy_chunk(const TensorReader& reader, const TensorInfo& out, const Piece& chunk, TensorWriter& writer, bool allow,
                NonFiniteResults& nonfinite) {
  pause_for_tests();
  const TensorInfo& in = reader.info(out.name);
  std::vector<unsigned char> raw(static_cast<std::size_t>(chunk.count) * dtype_size(in.dtype));
  reader.read_raw(out.name, chunk.begin, chunk.count, raw.data());
  check_finite(in.dtype, raw.data(), chunk.count, reader, out.name, chunk.begin, allow);
  if (in.dtype == out.dtype) {
    writer.write_raw(out.name, chunk.begin, chunk.count, raw.data());
    return;
  }
  GRADFIX_CHECK(dtype_is_float(in.dtype) && dtype_is_float(out.dtype),
                "tensor '" + out.name + "': no conversion from " + dtype_name(in.dtype) + " to " + dtype_name(out.dtype));
  std::vector<unsigned char> converted(static_cast<std::size_t>(chunk.count) * dtype_size(out.dtype));
  convert_float(in.dtype, raw.data(), out.dtype, converted.data(), static_cast<std::size_t>(chunk.count));
  nonfinite.add_raw(out, converted.data(), chunk.count);
  writer.write_raw(out.name, chunk.begin, chunk.count, converted.data());
}

std::string percent(double fraction) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(2) << 100.0 * fraction << "%";
  return text.str();
}

long long layout_bytes(const std::vector<TensorInfo>& layout) {
  long long bytes = 0;
  for (const auto& tensor : layout) bytes += tensor.nbytes();
  return bytes;
}

std::vector<TensorInfo> layout_of(const TensorReader& reader, const std::vector<std::string>& names, const OutputOptions& output) {
  std::vector<TensorInfo> layout;
  for (const auto& name : names) layout.push_back(output_info(reader.info(name), output));
  return layout;
}

std::string rank_note(const Ranks& ranks) {
  return ranks.size() > 1 ? " [" + std::to_string(ranks.size()) + " ranks]" : "";
}

std::uint64_t mix_bits(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

double uniform_at(std::uint64_t seed, std::uint64_t key, long long index, std::uint64_t stream) {
  const std::uint64_t bits = mix_bits(seed ^ mix_bits(key ^ mix_bits(static_cast<std::uint64_t>(index) * 2 + stream)));
  return static_cast<double>(bits >> 11) / 9007199254740992.0;
}

double gaussian_at(std::uint64_t seed, std::uint64_t key, long long index) {
  const std::uint64_t a = mix_bits(seed ^ mix_bits(key ^ mix_bits(static_cast<std::uint64_t>(index) * 2)));
  const double u1 = (static_cast<double>(a >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
  const double u2 = uniform_at(seed, key, index, 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

void notice_mixed_dtypes(const Ranks& ranks, std::ostream& log, const std::string& operation,
                         const std::vector<std::string>& differing, const std::string& example, const std::string& rule) {
  if (!ranks.is_root() || differing.empty()) return;
  log << operation << ": " << differing.size() << " tensor(s) differ in dtype between the inputs (" << example << "); " << rule
      << "\n";
}

ChunkedJob::ChunkedJob(const Ranks& ranks, std::string operation, std::vector<TensorInfo> layout, long long most)
    : ranks_(ranks), operation_(std::move(operation)), layout_(std::move(layout)), plan_(layout_, ranks.size()),
      chunks_(my_chunks(ranks, plan_, layout_, most)) {}

void ChunkedJob::write(const std::string& path, const Metadata& metadata, const OutputOptions& output, const Kernel& kernel) {
  path_ = path;
  metadata_ = metadata;
  output_ = output;
  Progress progress(ranks_.context(), operation_, static_cast<long long>(chunks_.size()), chunk_bytes(chunks_, layout_));
  writer_ = open_output(ranks_, path, layout_, metadata, output);
  for (const auto& chunk : chunks_) {
    const TensorInfo& tensor = layout_[chunk.tensor];
    progress.next(chunk.count * static_cast<long long>(dtype_size(tensor.dtype)));
    kernel(chunk, tensor, *writer_, nonfinite_);
  }
  progress.finish();
}

void ChunkedJob::commit(const std::string& primary_input, const CarriedFileChanges& changes) {
  GRADFIX_CHECK(writer_ != nullptr, operation_ + ": commit before write");
  nonfinite_.refuse(ranks_, path_, output_.allow_nonfinite);
  carry_model_files(ranks_.context(), primary_input, *writer_, output_, metadata_, changes);
  commit_collectively(ranks_.context(), *writer_);
}

}  // namespace gradfix::file_jobs
