#include "gradfix/pipeline/jobs.hpp"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iomanip>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <dirent.h>
#include <sys/stat.h>
#include <sstream>

#include "gradfix/comm/backend.hpp"
#include "gradfix/core/error.hpp"
#include "gradfix/core/exact_sum.hpp"
#include "gradfix/core/select.hpp"
#include "gradfix/dist/collective_output.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/safetensors.hpp"
#include "gradfix/shard/plan.hpp"

namespace gradfix {
namespace {

using Reader = std::unique_ptr<TensorReader>;

// This rank's view of the job: the context, and the reductions of statistics and summaries.
class Ranks {
 public:
  explicit Ranks(const JobContext& context) : context_(context) {}

  int rank() const { return context_.rank(); }
  int size() const { return context_.size(); }
  bool is_root() const { return context_.is_root(); }
  const JobContext& context() const { return context_; }
  long long chunk_elements() const { return context_.chunk_elements; }

  // Sums of statistics, through the statistics communicator (NCCL or MPI).
  void reduce_statistics(std::vector<double>& values) const { reduce(values.data(), values.size(), DType::kF64, true); }
  void reduce_statistics(std::vector<long long>& values) const { reduce(values.data(), values.size(), DType::kI64, true); }
  // Sums of bookkeeping (summaries), through the host communicator.
  void reduce_summary(PairStats& stats) const {
    std::vector<long long> counts = {stats.count, stats.sign_agreements, stats.nonzero_a, stats.nonzero_b};
    std::vector<double> sums = {stats.dot, stats.norm_a_squared, stats.norm_b_squared};
    reduce(counts.data(), counts.size(), DType::kI64, false);
    reduce(sums.data(), sums.size(), DType::kF64, false);
    stats.count = counts[0];
    stats.sign_agreements = counts[1];
    stats.nonzero_a = counts[2];
    stats.nonzero_b = counts[3];
    stats.dot = sums[0];
    stats.norm_a_squared = sums[1];
    stats.norm_b_squared = sums[2];
  }

  template <typename Work>
  void agree(Work work) const {
    context_.agree(work);
  }

 private:
  void reduce(void* values, std::size_t count, DType dtype, bool statistics) const {
    if (size() == 1 || count == 0) return;
    allreduce_host(statistics ? context_.stats() : context_.host(), values, count, dtype, ReduceOp::kSum);
  }

  const JobContext& context_;
};

// Refuses NaN and Inf among `count` values stored as `dtype` unless they are allowed.
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

// Fault-injection hook for the tests that kill a rank mid-run: GRADFIX_TEST_PAUSE_MS makes
// every chunk read take that much longer, so a run lasts long enough to be interrupted.
void pause_for_tests() {
  static const long pause_ms = [] {
    const char* text = std::getenv("GRADFIX_TEST_PAUSE_MS");
    return text != nullptr ? std::strtol(text, nullptr, 10) : 0L;
  }();
  if (pause_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
}

// Reads elements [begin, begin + count) in the compute type V (float, or double for F64
// tensors: both hold every stored value of their tensors exactly) and refuses NaN and Inf unless
// they are allowed; the check runs on the stored values, so a finite 1e300 in F64 is finite.
// Bytes in a stored dtype live only between a read and its conversion (or a conversion and its
// write): one buffer per direction, kept across chunks. Allocating them per chunk made page
// faults about 15% of a bf16 apply.
enum class Scratch { kLoad, kStore };
unsigned char* scratch_bytes(Scratch which, std::size_t bytes) {
  thread_local std::vector<unsigned char> buffers[2];
  auto& buffer = buffers[static_cast<int>(which)];
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// As load, into `values` (resized to count; its memory is reused from chunk to chunk).
template <typename V>
void load_into(std::vector<V>& values, const TensorReader& reader, const std::string& name, long long begin, long long count, bool allow) {
  pause_for_tests();
  const DType dtype = reader.info(name).dtype;
  values.resize(static_cast<std::size_t>(count));
  const bool same = (dtype == DType::kF32 && sizeof(V) == 4) || (dtype == DType::kF64 && sizeof(V) == 8);
  if (same) {
    reader.read_raw(name, begin, count, values.data());
    check_finite(dtype, values.data(), count, reader, name, begin, allow);
    return;
  }
  unsigned char* raw = scratch_bytes(Scratch::kLoad, static_cast<std::size_t>(count) * dtype_size(dtype));
  reader.read_raw(name, begin, count, raw);
  check_finite(dtype, raw, count, reader, name, begin, allow);
  if constexpr (sizeof(V) == 8) convert_to_f64(dtype, raw, values.data(), values.size());
  else convert_to_f32(dtype, raw, values.data(), values.size());
}

template <typename V = float>
std::vector<V> load(const TensorReader& reader, const std::string& name, long long begin, long long count, bool allow) {
  std::vector<V> values;
  load_into(values, reader, name, begin, count, allow);
  return values;
}

// Two reusable chunk buffers per compute type, for the jobs that run a tensor in float or double.
struct ChunkBuffers {
  std::vector<float> f32[2];
  std::vector<double> f64[2];
  template <typename V>
  std::vector<V>& get(int i) {
    if constexpr (sizeof(V) == 8) return f64[i];
    else return f32[i];
  }
};

// Whether a tensor is computed in fp64: when it is F64 in any input or in the output.
bool computes_in_f64(std::initializer_list<DType> dtypes) {
  for (DType dtype : dtypes)
    if (dtype == DType::kF64) return true;
  return false;
}

// "pass --exclude '^name$' to leave it out", with a pattern the user can paste; a name that would
// not print as itself (control characters, invalid UTF-8) gets no pattern on the terminal.
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

// Every name must exist in `other` with the same shape; all missing names are reported together,
// so one run tells the user everything that is wrong.
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

// The selected names of `other` that `primary` lacks: two checkpoints meant to be the same
// model must not differ in either direction.
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

// --out-dtype changes float tensors only: integer and boolean tensors (position ids, masks,
// buffers) keep their dtype, as model.to(dtype) leaves them in PyTorch.
TensorInfo output_info(const TensorInfo& input, const OutputOptions& output) {
  TensorInfo info = input;
  if (output.out_dtype && dtype_is_float(input.dtype)) info.dtype = *output.out_dtype;
  return info;
}

// Operations that compute on values (mask, merge, the change of apply) make no sense on
// integer tensors: a selected one is refused, naming it, before anything is written.
void require_float(const TensorReader& reader, const std::vector<std::string>& names, const std::string& operation) {
  for (const auto& name : names) {
    const DType dtype = reader.info(name).dtype;
    if (!dtype_is_float(dtype))
      throw InputError(reader.path() + ": tensor '" + escaped_name(name) + "' is " + dtype_name(dtype) + "; " + operation +
                       " works on float tensors only (integer tensors such as position ids are copied from the base "
                       "by apply); " + exclude_hint(name));
  }
}

// The dtype of a result computed from inputs of these dtypes, when --out-dtype does not say:
// the widest of them (F64 over F32 over the 16-bit types over the 8-bit ones); F16 with BF16,
// or the two 8-bit types together, give F32, which holds both exactly.
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

// An output's __metadata__ keeps the chain that made it: the primary input's own keys (such as
// "format": "pt", which transformers requires), every input's metadata under
// "gradfix.input.ROLE." (so a merge that made a task vector survives the apply that uses it), and
// this operation with its options as JSON. Chains deeper than kMaxProvenanceDepth operations are
// cut, saying so, so that metadata cannot grow without bound over repeated runs.
constexpr int kMaxProvenanceDepth = 8;

using Inputs = std::vector<std::pair<std::string, const TensorReader*>>;

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

// How options name an input: by its last path component ("tau.safetensors", "Llama-3-8B"), so
// that where a user keeps files does not change an output's bytes (or leak into shared models).
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

// The options every writing job records: dtype rules and the tensor selection.
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


// Results that are not finite although every input was (an alpha of 1e300, a sum of two values
// near the float range, values past the range of an F16 or BF16 output): counted per tensor as
// they are written, and refused before anything is published unless --allow-nonfinite.
class NonFiniteResults {
 public:
  // `values` are stored as out.dtype: checking after the conversion catches values past the
  // range of a narrow output (an F64 1e300 written as F32, 500 as F8_E4M3) as well as NaN.
  void add_raw(const TensorInfo& out, const void* values, long long count) {
    const auto bad = static_cast<long long>(count_nonfinite(out.dtype, values, static_cast<std::size_t>(count)));
    if (bad == 0) return;
    if (first_.empty()) {
      first_ = out.name;
      dtype_ = out.dtype;
    }
    if (out.name == first_) count_ += bad;
  }
  // Collective: every rank's part is checked; the first rank with such a tensor reports it.
  void refuse(const Ranks& ranks, const std::string& path, bool allowed) const {
    ranks.agree([&] {
      if (allowed || first_.empty()) return;
      throw InputError(path + ": tensor '" + first_ + "': " + std::to_string(count_) + " value(s)" +
                       (ranks.size() > 1 ? " of this rank's part" : "") + " came out NaN or beyond the range of " +
                       dtype_name(dtype_) + " from finite inputs; nothing was written (check --alpha and the inputs, "
                       "or pass --allow-nonfinite to write them)");
    });
  }

 private:
  std::string first_;
  DType dtype_ = DType::kF32;
  long long count_ = 0;
};

// This rank's chunks of the layout, in plan order.
std::vector<Piece> my_chunks(const Ranks& ranks, const ShardPlan& plan, const std::vector<TensorInfo>& layout) {
  std::vector<Piece> chunks;
  for (const auto& piece : plan.pieces(ranks.rank()))
    for (const auto& chunk : chunks_of(piece, split_unit(layout[piece.tensor]), ranks.chunk_elements())) chunks.push_back(chunk);
  return chunks;
}

// Bytes of output a rank's chunks hold, for its progress line.
long long chunk_bytes(const std::vector<Piece>& chunks, const std::vector<TensorInfo>& layout) {
  long long bytes = 0;
  for (const auto& chunk : chunks) bytes += chunk.count * static_cast<long long>(dtype_size(layout[chunk.tensor].dtype));
  return bytes;
}

// Copies a chunk unchanged, converting only when the output dtype differs: float to float with
// one rounding (exact whenever the output dtype holds the value), integers as they are.
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

// Converts computed values (fp32 or fp64) into the output dtype with one rounding, counts the
// results that came out NaN or past the dtype's range, and writes them.
template <typename V>
void store(TensorWriter& writer, const TensorInfo& out, long long begin, const V* values, long long count,
           NonFiniteResults& nonfinite) {
  const bool same = (out.dtype == DType::kF32 && sizeof(V) == 4) || (out.dtype == DType::kF64 && sizeof(V) == 8);
  if (same) {
    nonfinite.add_raw(out, values, count);
    writer.write_raw(out.name, begin, count, values);
    return;
  }
  unsigned char* raw = scratch_bytes(Scratch::kStore, static_cast<std::size_t>(count) * dtype_size(out.dtype));
  if constexpr (sizeof(V) == 8) convert_from_f64(out.dtype, values, raw, static_cast<std::size_t>(count));
  else convert_from_f32(out.dtype, values, raw, static_cast<std::size_t>(count));
  nonfinite.add_raw(out, raw, count);
  writer.write_raw(out.name, begin, count, raw);
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

// The sums a mask mode needs, per tensor this rank touches, complete: a split tensor's sums are
// all-reduced. Each block of a tensor has exactly one contributing rank (cuts fall on blocks),
// so these sums are exact and the masks do not depend on the number of ranks.
using SumsByTensor = std::map<std::size_t, std::vector<double>>;

// V is the compute type (float, or double where F64 is involved); source(chunk, tau, statistics)
// fills two std::vector<V>.
template <typename V, typename Source>
SumsByTensor mask_sums(const Ranks& ranks, const ShardPlan& plan, const std::vector<TensorInfo>& layout, MaskMode mode,
                       const MaskOptions& options, const std::vector<Piece>& chunks, Source source) {
  SumsByTensor sums;
  auto buffer_for = [&](std::size_t tensor) -> std::vector<double>* {
    const MaskPlan mask = plan_mask(mode, layout[tensor].shape);
    if (mask.sums_per_row == 0) return nullptr;
    auto& buffer = sums[tensor];
    buffer.resize(static_cast<std::size_t>(mask.rows * mask.sums_per_row), 0.0);
    return &buffer;
  };
  std::vector<V> tau, statistics;
  for (const auto& chunk : chunks) {
    std::vector<double>* buffer = buffer_for(chunk.tensor);
    if (buffer == nullptr) continue;
    source(chunk, tau, statistics);
    accumulate_mask_sums(plan_mask(mode, layout[chunk.tensor].shape), options, tau.data(), statistics.data(), chunk.begin,
                         chunk.count, buffer->data());
  }
  for (std::size_t tensor = 0; tensor < layout.size(); ++tensor) {
    if (!plan.is_split(tensor)) continue;
    std::vector<double>* buffer = buffer_for(tensor);
    if (buffer != nullptr) ranks.reduce_statistics(*buffer);
  }
  return sums;
}

template <typename V>
void mask_chunk(MaskMode mode, const MaskOptions& options, const TensorInfo& tensor, const Piece& chunk, const std::vector<V>& tau,
                const std::vector<V>& statistics, const SumsByTensor& sums, std::vector<V>& out) {
  out.resize(tau.size());
  const auto found = sums.find(chunk.tensor);
  apply_mask(plan_mask(mode, tensor.shape), options, tau.data(), statistics.data(), chunk.begin, chunk.count,
             found == sums.end() ? nullptr : found->second.data(), tensor_key_of(tensor.name), out.data());
}

// sum_i sign(s_i) over the statistics files at one chunk: a per-entry majority over the sources,
// what merge-then-mask masks with (the official code sums sign tensors).
template <typename V>
std::vector<V> sign_sum(const std::vector<Reader>& signs, const std::string& name, const Piece& chunk, bool allow) {
  std::vector<V> summed(static_cast<std::size_t>(chunk.count), V(0));
  for (const auto& reader : signs) {
    const auto statistics = load<V>(*reader, name, chunk.begin, chunk.count, allow);
    for (std::size_t i = 0; i < summed.size(); ++i) summed[i] += static_cast<V>((statistics[i] > V(0)) - (statistics[i] < V(0)));
  }
  return summed;
}

// Exact k-th largest magnitude over chunks spread across ranks: the histograms are all-reduced
// between the passes when the values live on several ranks.
// `values(chunk)` gives a std::vector of float or double; doubles are ranked as fp32 (trim_magnitude).
template <typename Values>
float distributed_threshold(const Ranks& ranks, long long k, bool across_ranks, const std::vector<Piece>& chunks, Values values) {
  KthLargestMagnitude selection(k);
  while (selection.needs_pass()) {
    for (const auto& chunk : chunks) {
      const auto data = values(chunk);
      const std::vector<float> narrow(data.begin(), data.end());
      selection.add(narrow.data(), static_cast<long long>(narrow.size()));
    }
    if (across_ranks) ranks.reduce_statistics(selection.histogram());
    selection.next_pass();
  }
  return selection.threshold();
}

// mergekit's trim of one vector within one tensor: exactly k entries survive, those above the
// k-th largest magnitude and, of those equal to it, the first in flattened order counted across
// ranks, so that the kept entries do not depend on the number of ranks.
struct Trim {
  float threshold = 0.0f;
  bool keep_all = true;
  std::map<long long, long long> tied_to_keep;  // by the chunk's first element

  // Zeroes the entries of a chunk of this tensor that the trim drops.
  template <typename V>
  void apply(const Piece& chunk, std::vector<V>& values) const {
    if (keep_all) return;
    long long ties_left = tied_to_keep.at(chunk.begin);
    for (auto& value : values) {
      const float magnitude = trim_magnitude(value);
      if (!(magnitude > threshold || (magnitude == threshold && ties_left-- > 0))) value = V(0);
    }
  }
};

// Collective over the ranks that hold part of the tensor when it is split: `mine` are this
// rank's chunks of it, `values(chunk)` the vector's values there.
template <typename Values>
Trim exact_trim(const Ranks& ranks, long long k, long long numel, bool split, const std::vector<Piece>& mine, Values values) {
  Trim trim;
  trim.keep_all = k >= numel;
  if (trim.keep_all) return trim;
  trim.threshold = distributed_threshold(ranks, k, split, mine, values);
  // Counts above and at the threshold; the ties to keep go to the earliest entries.
  std::vector<long long> tied(mine.size(), 0);
  std::vector<long long> totals(1 + static_cast<std::size_t>(ranks.size()), 0);  // above, then tied per rank
  for (std::size_t j = 0; j < mine.size(); ++j) {
    for (auto value : values(mine[j])) {
      const float magnitude = trim_magnitude(value);
      totals[0] += magnitude > trim.threshold;
      tied[j] += magnitude == trim.threshold;
    }
    totals[1 + static_cast<std::size_t>(ranks.rank())] += tied[j];
  }
  if (split) ranks.reduce_statistics(totals);
  long long remaining = k - totals[0];
  for (int r = 0; r < ranks.rank(); ++r) remaining -= totals[1 + static_cast<std::size_t>(r)];
  for (std::size_t j = 0; j < mine.size(); ++j) {
    trim.tied_to_keep[mine[j].begin] = std::max(0LL, std::min(remaining, tied[j]));
    remaining -= tied[j];
  }
  return trim;
}

// Counter-based random numbers: a value from (seed, tensor, index) alone, so that generated
// checkpoints and DARE's drops do not depend on chunking or on the number of ranks.
std::uint64_t mix_bits(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Uniform in [0, 1), 53 random bits; `stream` separates draws of the same element.
double uniform_at(std::uint64_t seed, std::uint64_t key, long long index, std::uint64_t stream) {
  const std::uint64_t bits = mix_bits(seed ^ mix_bits(key ^ mix_bits(static_cast<std::uint64_t>(index) * 2 + stream)));
  return static_cast<double>(bits >> 11) / 9007199254740992.0;
}

// A standard normal value (Box-Muller on two uniforms).
double gaussian_at(std::uint64_t seed, std::uint64_t key, long long index) {
  const std::uint64_t a = mix_bits(seed ^ mix_bits(key ^ mix_bits(static_cast<std::uint64_t>(index) * 2)));
  const double u1 = (static_cast<double>(a >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
  const double u2 = uniform_at(seed, key, index, 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace

namespace {

// One line of a markdown table cell: no newlines, no column breaks.
std::string cell(const std::string& text) {
  std::string out;
  for (char c : escaped_name(text)) {
    if (c == '|') out += "\\|";
    else out += c;
  }
  return out;
}

// The options of one operation as "key: value" rows, nested objects flattened with dots.
void option_rows(const nlohmann::json& json, const std::string& prefix, std::ostream& out) {
  for (const auto& [key, value] : json.items()) {
    const std::string name = prefix.empty() ? key : prefix + "." + key;
    if (value.is_object()) option_rows(value, name, out);
    else if (!(value.is_array() && value.empty())) out << "| " << cell(name) << " | " << cell(value.is_string() ? value.get<std::string>() : value.dump()) << " |\n";
  }
}

// The operations behind `prefix` (an output's keys, or an input's under gradfix.input.ROLE.),
// as a nested list: each input's operation and options, then its own inputs.
void provenance_list(const Metadata& metadata, const std::string& prefix, int depth, std::ostream& out) {
  std::set<std::string> roles;
  const std::string inputs = prefix + "gradfix.input.";
  for (auto it = metadata.lower_bound(inputs); it != metadata.end() && it->first.rfind(inputs, 0) == 0; ++it) {
    const std::string rest = it->first.substr(inputs.size());
    // A role is "base", "task_vector.0"...: up to the ".gradfix." or the key of its own metadata.
    const std::size_t end = rest.find(".gradfix.");
    if (end != std::string::npos) roles.insert(rest.substr(0, end));
  }
  for (const auto& role : roles) {
    const std::string key = inputs + role + ".";
    const auto operation = metadata.find(key + "gradfix.operation");
    if (operation == metadata.end()) continue;
    out << std::string(static_cast<std::size_t>(2 * depth), ' ') << "- " << cell(role) << ": `" << cell(operation->second) << "`";
    const auto options = metadata.find(key + "gradfix.options");
    if (options != metadata.end()) out << " " << cell(options->second);
    out << "\n";
    provenance_list(metadata, key, depth + 1, out);
  }
}

}  // namespace

std::string model_card(const Metadata& metadata, bool transformers_model) {
  std::ostringstream card;
  card << "---\n";
  if (transformers_model) card << "library_name: transformers\n";
  card << "tags:\n- gradfix\n";
  const auto operation = metadata.find("gradfix.operation");
  if (operation != metadata.end()) card << "- gradfix-" << cell(operation->second) << "\n";
  card << "---\n\n# Written by gradfix\n\n";
  card << "This directory was written by `gradfix " << (operation != metadata.end() ? cell(operation->second) : "") << "`";
  card << " (task vector transport by gradient-sign masking, Rinaldi et al., ICLR 2026). The same record is in the "
          "`__metadata__` of its safetensors files.\n\n| option | value |\n|---|---|\n";
  const auto options = metadata.find("gradfix.options");
  const auto json = options == metadata.end() ? nlohmann::json() : nlohmann::json::parse(options->second, nullptr, false);
  if (json.is_object()) option_rows(json, "", card);
  // Jobs without an options record (the model subcommands) keep their settings in plain keys.
  for (const auto& [key, value] : metadata)
    if (!json.is_object() && key.rfind("gradfix.", 0) == 0 && key.find('.', 8) == std::string::npos && key != "gradfix.operation")
      card << "| " << cell(key.substr(8)) << " | " << cell(value) << " |\n";
  std::ostringstream chain;
  provenance_list(metadata, "", 0, chain);
  if (!chain.str().empty()) card << "\n## How its inputs were made\n\n" << chain.str();
  return card.str();
}

void carry_model_files(const JobContext& context, const std::string& input, TensorWriter& output, const OutputOptions& options,
                       const Metadata& metadata) {
  if (!output.takes_files()) return;
  context.agree([&] {
    if (!context.is_root()) return;
    bool transformers_model = false;
    // The input's own model card describes the input: the output gets its own (below).
    if (!is_directory(input)) {
      output.add_file("README.md", model_card(metadata, false));
      return;
    }
    DIR* listing = ::opendir(input.c_str());
    if (listing == nullptr) throw InputError(input + ": cannot list the model directory: " + std::strerror(errno));
    std::vector<std::string> names;
    while (const dirent* entry = ::readdir(listing)) names.emplace_back(entry->d_name);
    ::closedir(listing);
    std::sort(names.begin(), names.end());
    for (const auto& name : names) {
      const bool tensors = name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0;
      if (name.empty() || name[0] == '.' || tensors || name == kSafetensorsIndexName || name == "README.md") continue;
      const std::string from = input + "/" + name;
      struct stat status {};
      if (::lstat(from.c_str(), &status) != 0 || !S_ISREG(status.st_mode)) continue;
      if (status.st_size > (256LL << 20))
        throw InputError(from + ": " + std::to_string(status.st_size) + " bytes; model files beside the tensors are refused above 256 MiB");
      std::ifstream file(from, std::ios::binary);
      std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
      if (!file.good() && !file.eof()) throw RuntimeFailure(from + ": read failed");
      if (name == "config.json" && options.out_dtype) {
        const char* torch_name = torch_dtype_name(*options.out_dtype);
        auto config = nlohmann::json::parse(text, nullptr, false);
        if (config.is_object()) {
          for (const char* key : {"torch_dtype", "dtype"})
            if (config.contains(key)) config[key] = torch_name;
          if (!config.contains("torch_dtype") && !config.contains("dtype")) config["torch_dtype"] = torch_name;
          text = config.dump(2) + "\n";
        }
      }
      if (name == "config.json") transformers_model = true;
      output.add_file(name, text);
    }
    output.add_file("README.md", model_card(metadata, transformers_model));
  });
}


// A one-line notice when inputs hold the same tensor in different dtypes: which, how many, and
// the dtype the result gets, so that no rounding happens unannounced.
void notice_mixed_dtypes(const Ranks& ranks, std::ostream& log, const std::string& operation,
                         const std::vector<std::string>& differing, const std::string& example, const std::string& rule) {
  if (!ranks.is_root() || differing.empty()) return;
  log << operation << ": " << differing.size() << " tensor(s) differ in dtype between the inputs (" << example << "); " << rule
      << "\n";
}

JobSummary run_taskvector(const TaskVectorJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader base, finetuned;
  std::vector<std::string> names, integers;
  ranks.agree([&] {
    base = open_reader(job.base);
    finetuned = open_reader(job.finetuned);
    const TensorSelector selector(job.output.include, job.output.exclude);
    names = selected_names(*base, selector);
    require_selection(names, *base);
    require_matching(*base, names, *finetuned);
    require_no_extra(*base, *finetuned, selector);
    // Integer tensors (position ids, buffers) are not parameters: they stay out of the task
    // vector, and apply copies them from the base.
    std::vector<std::string> floats;
    for (const auto& name : names) (dtype_is_float(base->info(name).dtype) ? floats : integers).push_back(name);
    names = floats;
    for (const auto& name : names)
      if (!dtype_is_float(finetuned->info(name).dtype))
        throw InputError(finetuned->path() + ": tensor '" + escaped_name(name) + "' is " + dtype_name(finetuned->info(name).dtype) +
                         ", float (" + dtype_name(base->info(name).dtype) + ") in " + base->path());
    require_selection(names, *base);
  });
  // Task vectors are F32 whatever the inputs (a BF16 difference would lose ~0.4% of each value),
  // F64 when either input is F64; --out-dtype overrides.
  std::vector<TensorInfo> layout;
  std::vector<std::string> differing;
  std::string example;
  for (const auto& name : names) {
    const DType a = base->info(name).dtype, b = finetuned->info(name).dtype;
    TensorInfo tensor = base->info(name);
    tensor.dtype = job.output.out_dtype ? *job.output.out_dtype : computes_in_f64({a, b}) ? DType::kF64 : DType::kF32;
    layout.push_back(tensor);
    if (a != b && differing.empty()) example = "'" + escaped_name(name) + "': " + dtype_name(a) + " in the base, " + dtype_name(b) + " fine-tuned";
    if (a != b) differing.push_back(name);
  }
  notice_mixed_dtypes(ranks, log, "taskvector", differing, example, "the task vector is F32 (F64 where an input is F64) unless --out-dtype");
  if (ranks.is_root() && !integers.empty())
    log << "taskvector: " << integers.size() << " integer tensor(s) left out (not parameters; apply copies them from the base): "
        << format_name_list(integers) << "\n";
  const ShardPlan plan(layout, ranks.size());
  NonFiniteResults nonfinite;
  nlohmann::json options = {{"base", input_name(job.base)}, {"finetuned", input_name(job.finetuned)}, {"output", output_options_json(job.output)}};
  const Metadata metadata = output_metadata("taskvector", options, {{"base", base.get()}, {"finetuned", finetuned.get()}});
  auto writer = open_output(ranks, job.out, layout, metadata, job.output);
  JobSummary summary;
  const bool allow = job.output.allow_nonfinite;
  const auto chunks = my_chunks(ranks, plan, layout);
  Progress progress(ranks.context(), "taskvector", static_cast<long long>(chunks.size()), chunk_bytes(chunks, layout));
  for (const auto& chunk : chunks) {
    const TensorInfo& out = layout[chunk.tensor];
    progress.next(chunk.count * static_cast<long long>(dtype_size(out.dtype)));
    auto difference = [&](auto zero) {
      using V = decltype(zero);
      const auto base_values = load<V>(*base, out.name, chunk.begin, chunk.count, allow);
      auto tau = load<V>(*finetuned, out.name, chunk.begin, chunk.count, allow);
      for (std::size_t i = 0; i < tau.size(); ++i) tau[i] -= base_values[i];
      store(*writer, out, chunk.begin, tau.data(), chunk.count, nonfinite);
      summary.stats.add_self(tau.data(), chunk.count);
    };
    if (computes_in_f64({base->info(out.name).dtype, finetuned->info(out.name).dtype, out.dtype})) difference(0.0);
    else difference(0.0f);
  }
  progress.finish();
  nonfinite.refuse(ranks, job.out, job.output.allow_nonfinite);
  carry_model_files(ranks.context(), job.base, *writer, job.output, metadata);
  commit_collectively(ranks.context(), *writer);
  ranks.reduce_summary(summary.stats);
  summary.elements = summary.stats.count;
  summary.tensors_written = summary.tensors_changed = static_cast<long long>(names.size());
  summary.bytes_written = layout_bytes(layout);
  if (ranks.is_root())
    log << "taskvector: " << names.size() << " tensors, " << summary.elements << " elements, ||tau|| = "
        << std::sqrt(summary.stats.norm_a_squared) << ", written to " << job.out << rank_note(ranks) << "\n";
  return summary;
}

JobSummary run_apply(const ApplyJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader base, tau;
  std::vector<std::string> tau_names;
  ranks.agree([&] {
    if (!std::isfinite(job.alpha)) throw InputError("--alpha must be finite, got " + std::to_string(job.alpha));
    base = open_reader(job.base);
    tau = open_reader(job.task_vector);
    const TensorSelector selector(job.output.include, job.output.exclude);
    // A task vector may cover part of a model (a vision tower, say): every tensor it has must be
    // in the base, and the base's other tensors are copied unchanged.
    tau_names = selected_names(*tau, selector);
    require_selection(tau_names, *tau);
    require_matching(*tau, tau_names, *base);
    require_float(*tau, tau_names, "apply");
    require_float(*base, tau_names, "apply");
  });
  const std::set<std::string> changed(tau_names.begin(), tau_names.end());
  std::vector<TensorInfo> layout;
  for (const auto& tensor : base->tensors()) layout.push_back(output_info(tensor, job.output));
  std::vector<std::string> differing;
  std::string example;
  for (const auto& name : tau_names) {
    const DType a = base->info(name).dtype, b = tau->info(name).dtype;
    if (a != b && differing.empty()) example = "'" + escaped_name(name) + "': " + dtype_name(a) + " in the base, " + dtype_name(b) + " in the task vector";
    if (a != b) differing.push_back(name);
  }
  notice_mixed_dtypes(ranks, log, "apply", differing, example,
                      "computed in F32 (F64 where an input is F64) and written in the base's dtype unless --out-dtype");
  nlohmann::json options = {
      {"base", input_name(job.base)}, {"task_vector", input_name(job.task_vector)}, {"alpha", job.alpha}, {"output", output_options_json(job.output)}};
  Metadata metadata = output_metadata("apply", options, {{"base", base.get()}, {"task_vector", tau.get()}});
  metadata["gradfix.alpha"] = std::to_string(job.alpha);
  const ShardPlan plan(layout, ranks.size());
  NonFiniteResults nonfinite;
  auto writer = open_output(ranks, job.out, layout, metadata, job.output);
  JobSummary summary;
  const bool allow = job.output.allow_nonfinite;
  const auto chunks = my_chunks(ranks, plan, layout);
  Progress progress(ranks.context(), "apply", static_cast<long long>(chunks.size()), chunk_bytes(chunks, layout));
  ChunkBuffers buffers;
  for (const auto& chunk : chunks) {
    const TensorInfo& out = layout[chunk.tensor];
    progress.next(chunk.count * static_cast<long long>(dtype_size(out.dtype)));
    if (!changed.count(out.name)) {
      copy_chunk(*base, out, chunk, *writer, true, nonfinite);
      continue;
    }
    auto add = [&](auto alpha) {
      using V = decltype(alpha);
      auto& values = buffers.get<V>(0);
      auto& delta = buffers.get<V>(1);
      load_into(values, *base, out.name, chunk.begin, chunk.count, allow);
      load_into(delta, *tau, out.name, chunk.begin, chunk.count, allow);
      for (std::size_t i = 0; i < values.size(); ++i) values[i] += alpha * delta[i];
      store(*writer, out, chunk.begin, values.data(), chunk.count, nonfinite);
      summary.stats.add_self(delta.data(), chunk.count);
    };
    if (computes_in_f64({base->info(out.name).dtype, tau->info(out.name).dtype, out.dtype})) add(job.alpha);
    else add(static_cast<float>(job.alpha));
  }
  progress.finish();
  nonfinite.refuse(ranks, job.out, job.output.allow_nonfinite);
  carry_model_files(ranks.context(), job.base, *writer, job.output, metadata);
  commit_collectively(ranks.context(), *writer);
  ranks.reduce_summary(summary.stats);
  summary.elements = summary.stats.count;
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.tensors_changed = static_cast<long long>(tau_names.size());
  summary.bytes_written = layout_bytes(layout);
  if (ranks.is_root())
    log << "apply: base + " << job.alpha << " * tau on " << tau_names.size() << " of " << layout.size() << " tensors ("
        << summary.elements << " elements), written to " << job.out << rank_note(ranks) << "\n";
  return summary;
}

JobSummary run_mask(const MaskJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader tau, signs;
  std::vector<std::string> names;
  ranks.agree([&] {
    tau = open_reader(job.task_vector);
    signs = open_reader(job.signs);
    const TensorSelector selector(job.output.include, job.output.exclude);
    names = selected_names(*tau, selector);
    require_selection(names, *tau);
    require_matching(*tau, names, *signs);
    require_float(*tau, names, "mask");
  });
  const std::set<std::string> changed(names.begin(), names.end());
  std::vector<TensorInfo> layout;
  for (const auto& tensor : tau->tensors()) layout.push_back(output_info(tensor, job.output));
  nlohmann::json options = {{"task_vector", input_name(job.task_vector)}, {"signs", input_name(job.signs)}, {"mask", mask_options_json(job.mode, job.mask)},
                             {"output", output_options_json(job.output)}};
  Metadata metadata = output_metadata("mask", options, {{"task_vector", tau.get()}, {"signs", signs.get()}});
  metadata["gradfix.mask_mode"] = mask_mode_name(job.mode);
  const ShardPlan plan(layout, ranks.size());
  const auto chunks = my_chunks(ranks, plan, layout);
  const bool allow = job.output.allow_nonfinite;
  // fp64 where a selected tensor is F64 in the task vector or the output (the other tensors come
  // out the same either way: a mask's weights are computed in double).
  bool f64 = false;
  for (const auto& name : names) f64 = f64 || computes_in_f64({tau->info(name).dtype, signs->info(name).dtype, output_info(tau->info(name), job.output).dtype});
  NonFiniteResults nonfinite;
  std::unique_ptr<TensorWriter> writer;
  JobSummary summary;
  PairStats kept;  // masked output against the input task vector
  Progress progress(ranks.context(), "mask", static_cast<long long>(chunks.size()), chunk_bytes(chunks, layout));
  auto mask_in = [&](auto zero) {
    using V = decltype(zero);
    auto read_pair = [&](const Piece& chunk, std::vector<V>& values, std::vector<V>& statistics) {
      const std::string& name = layout[chunk.tensor].name;
      load_into(values, *tau, name, chunk.begin, chunk.count, allow);
      if (changed.count(name)) {
        load_into(statistics, *signs, name, chunk.begin, chunk.count, allow);
      } else {
        statistics.assign(values.size(), V(0));
      }
    };
    // Only selected tensors are masked, so only they contribute sums.
    std::vector<Piece> masked_chunks;
    for (const auto& chunk : chunks)
      if (changed.count(layout[chunk.tensor].name)) masked_chunks.push_back(chunk);
    const SumsByTensor sums = mask_sums<V>(ranks, plan, layout, job.mode, job.mask, masked_chunks, read_pair);
    writer = open_output(ranks, job.out, layout, metadata, job.output);
    std::vector<V> values, statistics, masked;
    for (const auto& chunk : chunks) {
      const TensorInfo& out = layout[chunk.tensor];
      progress.next(chunk.count * static_cast<long long>(dtype_size(out.dtype)));
      if (!changed.count(out.name)) {
        copy_chunk(*tau, out, chunk, *writer, allow, nonfinite);
        continue;
      }
      read_pair(chunk, values, statistics);
      mask_chunk(job.mode, job.mask, out, chunk, values, statistics, sums, masked);
      store(*writer, out, chunk.begin, masked.data(), chunk.count, nonfinite);
      summary.stats.add(values.data(), statistics.data(), chunk.count);
      kept.add(masked.data(), values.data(), chunk.count);
    }
  };
  if (f64) mask_in(0.0);
  else mask_in(0.0f);
  progress.finish();
  nonfinite.refuse(ranks, job.out, job.output.allow_nonfinite);
  carry_model_files(ranks.context(), job.task_vector, *writer, job.output, metadata);
  commit_collectively(ranks.context(), *writer);
  ranks.reduce_summary(summary.stats);
  ranks.reduce_summary(kept);
  summary.elements = summary.stats.count;
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.tensors_changed = static_cast<long long>(names.size());
  summary.bytes_written = layout_bytes(layout);
  const double kept_fraction =
      kept.nonzero_b > 0 ? static_cast<double>(kept.nonzero_a) / static_cast<double>(kept.nonzero_b) : 0.0;
  if (ranks.is_root())
    log << "mask " << mask_mode_name(job.mode) << ": " << names.size() << " tensors, " << summary.elements
        << " elements; sign agreement of tau with the statistics " << percent(summary.stats.sign_agreement())
        << "; non-zero entries kept " << percent(kept_fraction) << "; written to " << job.out << rank_note(ranks) << "\n";
  return summary;
}

JobSummary run_merge(const MergeJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  const bool mergekit_ties = job.method == MergeMethod::kTies && job.ties.variant == TiesVariant::kMergekit;
  std::vector<Reader> vectors, signs;
  std::vector<std::string> names;
  ranks.agree([&] {
    if (job.task_vectors.empty()) throw InputError("merge needs at least one --task-vector");
    if (job.order != MergeOrder::kNone && job.signs.size() != job.task_vectors.size())
      throw InputError(std::string("--order ") + merge_order_name(job.order) + " needs one --signs per --task-vector: got " +
                       std::to_string(job.signs.size()) + " --signs for " + std::to_string(job.task_vectors.size()) +
                       " --task-vector");
    if (job.order == MergeOrder::kNone && !job.signs.empty())
      throw InputError("--signs given without --order mask-then-merge|merge-then-mask");
    if (job.method == MergeMethod::kTies && !(job.ties.fraction > 0.0 && job.ties.fraction <= 1.0))
      throw InputError("--ties-fraction must be in (0, 1], got " + std::to_string(job.ties.fraction));
    if (mergekit_ties && job.ties.scope != TiesScope::kTensor)
      throw InputError("--ties-variant mergekit trims within each tensor, as mergekit does; --ties-scope global does not go with it");
    if (mergekit_ties && job.ties.elect != TiesElect::kMass)
      throw InputError("--ties-variant mergekit elects the sign of the summed values (mass); --ties-elect count does not go with it");
    for (const auto& path : job.task_vectors) vectors.push_back(open_reader(path));
    for (const auto& path : job.signs) signs.push_back(open_reader(path));
    const TensorSelector selector(job.output.include, job.output.exclude);
    names = selected_names(*vectors[0], selector);
    require_selection(names, *vectors[0]);
    for (std::size_t v = 1; v < vectors.size(); ++v) {
      require_matching(*vectors[0], names, *vectors[v]);
      require_no_extra(*vectors[0], *vectors[v], selector);
    }
    for (const auto& reader : signs) require_matching(*vectors[0], names, *reader);
    for (const auto& reader : vectors) require_float(*reader, names, "merge");
  });
  // The merged tensor's dtype: --out-dtype, else the widest of the vectors' dtypes.
  std::vector<TensorInfo> layout;
  std::vector<std::string> differing;
  std::string example;
  for (const auto& name : names) {
    std::vector<DType> dtypes;
    for (const auto& reader : vectors) dtypes.push_back(reader->info(name).dtype);
    TensorInfo tensor = vectors[0]->info(name);
    tensor.dtype = job.output.out_dtype ? *job.output.out_dtype : widest_float(dtypes);
    layout.push_back(tensor);
    for (std::size_t v = 1; v < dtypes.size(); ++v) {
      if (dtypes[v] == dtypes[0]) continue;
      if (differing.empty())
        example = "'" + escaped_name(name) + "': " + dtype_name(dtypes[0]) + " in " + vectors[0]->path() + ", " +
                  dtype_name(dtypes[v]) + " in " + vectors[v]->path();
      differing.push_back(name);
      break;
    }
  }
  notice_mixed_dtypes(ranks, log, "merge", differing, example, "the merge is written in the widest of their dtypes unless --out-dtype");
  const ShardPlan plan(layout, ranks.size());
  const auto chunks = my_chunks(ranks, plan, layout);
  const bool allow = job.output.allow_nonfinite;
  const std::size_t n = vectors.size();

  nlohmann::json options = {{"task_vectors", input_names(job.task_vectors)}, {"signs", input_names(job.signs)}, {"method", merge_method_name(job.method)},
                             {"order", merge_order_name(job.order)}, {"output", output_options_json(job.output)}};
  if (job.method == MergeMethod::kTies)
    options["ties"] = {{"fraction", job.ties.fraction}, {"elect", ties_elect_name(job.ties.elect)}, {"scope", ties_scope_name(job.ties.scope)},
                       {"variant", ties_variant_name(job.ties.variant)}};
  if (job.order != MergeOrder::kNone) options["mask"] = mask_options_json(job.mode, job.mask);
  Inputs inputs;
  for (std::size_t v = 0; v < vectors.size(); ++v) inputs.emplace_back("task_vector." + std::to_string(v), vectors[v].get());
  for (std::size_t v = 0; v < signs.size(); ++v) inputs.emplace_back("signs." + std::to_string(v), signs[v].get());
  Metadata metadata = output_metadata("merge", options, inputs);
  metadata["gradfix.merge_method"] = merge_method_name(job.method);
  metadata["gradfix.merge_order"] = merge_order_name(job.order);
  // fp64 where a tensor is F64 in an input or the output (F32 tensors come out the same either
  // way: sums and means are accumulated in double).
  bool f64 = false;
  for (const auto& tensor : layout) {
    f64 = f64 || tensor.dtype == DType::kF64;
    for (const auto& reader : vectors) f64 = f64 || reader->info(tensor.name).dtype == DType::kF64;
    for (const auto& reader : signs) f64 = f64 || reader->info(tensor.name).dtype == DType::kF64;
  }
  NonFiniteResults nonfinite;
  std::unique_ptr<TensorWriter> writer;
  JobSummary summary;
  Progress progress(ranks.context(), "merge", static_cast<long long>(chunks.size()), chunk_bytes(chunks, layout));
  auto merge_in = [&](auto zero) {
    using V = decltype(zero);
    // Vector v's values for a chunk, masked with its own statistics when masking comes first.
    std::vector<SumsByTensor> vector_sums(n);
    auto raw_pair = [&](std::size_t v) {
      return [&, v](const Piece& chunk, std::vector<V>& values, std::vector<V>& statistics) {
        const std::string& name = layout[chunk.tensor].name;
        values = load<V>(*vectors[v], name, chunk.begin, chunk.count, allow);
        statistics = load<V>(*signs[v], name, chunk.begin, chunk.count, allow);
      };
    };
    if (job.order == MergeOrder::kMaskThenMerge)
      for (std::size_t v = 0; v < n; ++v) vector_sums[v] = mask_sums<V>(ranks, plan, layout, job.mode, job.mask, chunks, raw_pair(v));
    auto values_of = [&](std::size_t v, const Piece& chunk) {
      if (job.order != MergeOrder::kMaskThenMerge) return load<V>(*vectors[v], layout[chunk.tensor].name, chunk.begin, chunk.count, allow);
      std::vector<V> values, statistics, masked;
      raw_pair(v)(chunk, values, statistics);
      mask_chunk(job.mode, job.mask, layout[chunk.tensor], chunk, values, statistics, vector_sums[v], masked);
      return masked;
    };

    // TIES thresholds: per vector over everything (global), or per tensor and vector; mergekit's
    // exact trims per tensor and vector.
    std::map<std::size_t, std::vector<float>> thresholds;  // by tensor
    std::map<std::size_t, std::vector<Trim>> trims;         // by tensor
    if (job.method == MergeMethod::kTies) {
      std::map<std::size_t, std::vector<Piece>> chunks_by_tensor;
      for (const auto& chunk : chunks) chunks_by_tensor[chunk.tensor].push_back(chunk);
      if (mergekit_ties) {
        for (std::size_t t = 0; t < layout.size(); ++t) {
          const bool split = plan.is_split(t);
          if (!split && !chunks_by_tensor.count(t)) continue;
          for (std::size_t v = 0; v < n; ++v)
            trims[t].push_back(exact_trim(ranks, mergekit_keep_count(layout[t].numel(), job.ties.fraction), layout[t].numel(), split,
                                          chunks_by_tensor[t], [&](const Piece& chunk) { return values_of(v, chunk); }));
        }
      } else if (job.ties.scope == TiesScope::kGlobal) {
        long long total = 0;
        for (const auto& tensor : layout) total += tensor.numel();
        std::vector<float> global;
        for (std::size_t v = 0; v < n; ++v)
          global.push_back(distributed_threshold(ranks, ties_keep_count(total, job.ties.fraction), true, chunks,
                                                 [&](const Piece& chunk) { return values_of(v, chunk); }));
        for (std::size_t t = 0; t < layout.size(); ++t) thresholds[t] = global;
      } else {
        for (std::size_t t = 0; t < layout.size(); ++t) {
          const bool split = plan.is_split(t);
          if (!split && !chunks_by_tensor.count(t)) continue;
          for (std::size_t v = 0; v < n; ++v)
            thresholds[t].push_back(distributed_threshold(ranks, ties_keep_count(layout[t].numel(), job.ties.fraction), split,
                                                          chunks_by_tensor[t], [&](const Piece& chunk) { return values_of(v, chunk); }));
        }
      }
    }

    auto merged_of = [&](const Piece& chunk) {
      std::vector<std::vector<V>> values;
      std::vector<const V*> pointers;
      for (std::size_t v = 0; v < n; ++v) values.push_back(values_of(v, chunk));
      for (const auto& vector : values) pointers.push_back(vector.data());
      std::vector<V> merged(static_cast<std::size_t>(chunk.count));
      if (mergekit_ties) {
        // mergekit's TIES with unit weights: trim exactly k, elect by the sum, disjoint mean.
        std::vector<std::vector<double>> trimmed(n);
        std::vector<const double*> weighted;
        for (std::size_t v = 0; v < n; ++v) {
          std::vector<V> kept = values[v];
          trims.at(chunk.tensor)[v].apply(chunk, kept);
          trimmed[v].assign(kept.begin(), kept.end());
          weighted.push_back(trimmed[v].data());
        }
        std::vector<double> mixed(merged.size());
        mergekit_consensus(weighted, std::vector<double>(n, 1.0), true, chunk.count, mixed.data());
        merged.assign(mixed.begin(), mixed.end());
        return std::make_pair(merged, values[0]);
      }
      const auto found = thresholds.find(chunk.tensor);
      merge_values(job.method, job.ties.elect, pointers, chunk.count, found == thresholds.end() ? std::vector<float>{} : found->second,
                   merged.data());
      return std::make_pair(merged, values[0]);
    };
    auto summed_signs = [&](const Piece& chunk) { return sign_sum<V>(signs, layout[chunk.tensor].name, chunk, allow); };
    SumsByTensor merged_sums;
    if (job.order == MergeOrder::kMergeThenMask)
      merged_sums = mask_sums<V>(ranks, plan, layout, job.mode, job.mask, chunks,
                                 [&](const Piece& chunk, std::vector<V>& values, std::vector<V>& statistics) {
                                   values = merged_of(chunk).first;
                                   statistics = summed_signs(chunk);
                                 });

    writer = open_output(ranks, job.out, layout, metadata, job.output);
    for (const auto& chunk : chunks) {
      progress.next(chunk.count * static_cast<long long>(dtype_size(layout[chunk.tensor].dtype)));
      auto [merged, first] = merged_of(chunk);
      if (job.order == MergeOrder::kMergeThenMask) {
        const std::vector<V> unmasked = merged;
        mask_chunk(job.mode, job.mask, layout[chunk.tensor], chunk, unmasked, summed_signs(chunk), merged_sums, merged);
      }
      store(*writer, layout[chunk.tensor], chunk.begin, merged.data(), chunk.count, nonfinite);
      summary.stats.add(merged.data(), first.data(), chunk.count);
    }
  };
  if (f64) merge_in(0.0);
  else merge_in(0.0f);
  progress.finish();
  nonfinite.refuse(ranks, job.out, job.output.allow_nonfinite);
  carry_model_files(ranks.context(), job.task_vectors.front(), *writer, job.output, metadata);
  commit_collectively(ranks.context(), *writer);
  ranks.reduce_summary(summary.stats);
  summary.elements = summary.stats.count;
  summary.tensors_written = summary.tensors_changed = static_cast<long long>(names.size());
  summary.bytes_written = layout_bytes(layout);
  if (ranks.is_root())
    log << "merge " << merge_method_name(job.method) << " (" << merge_order_name(job.order) << ") of " << n
        << " task vectors: " << names.size() << " tensors, " << summary.elements
        << " elements; cosine of the merge with the first vector " << summary.stats.cosine() << "; written to " << job.out
        << rank_note(ranks) << "\n";
  return summary;
}

const char* model_merge_method_name(ModelMergeMethod method) {
  switch (method) {
    case ModelMergeMethod::kLinear: return "linear";
    case ModelMergeMethod::kTaskArithmetic: return "task_arithmetic";
    case ModelMergeMethod::kTies: return "ties";
    case ModelMergeMethod::kDareLinear: return "dare_linear";
    case ModelMergeMethod::kDareTies: return "dare_ties";
  }
  return "?";
}

JobSummary run_model_merge(const ModelMergeJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader base;
  std::vector<Reader> models, signs;
  std::vector<std::string> names;
  const bool linear = job.method == ModelMergeMethod::kLinear;
  const std::size_t n = job.models.size();
  ranks.agree([&] {
    if (n == 0) throw InputError("a merge needs at least one model");
    if (job.method == ModelMergeMethod::kTaskArithmetic || job.method == ModelMergeMethod::kLinear)
      for (double density : job.densities)
        if (density != 1.0) throw InputError(std::string(model_merge_method_name(job.method)) + " does not sparsify: density must be 1");
    if (job.weights.size() != n || job.densities.size() != n)
      throw InputError("a merge needs one weight and one density per model");
    if (!linear && job.base.empty()) throw InputError(std::string(model_merge_method_name(job.method)) + " needs a base_model");
    for (std::size_t m = 0; m < n; ++m) {
      if (!std::isfinite(job.weights[m])) throw InputError(job.models[m] + ": weight must be finite");
      if (!(job.densities[m] >= 0.0 && job.densities[m] <= 1.0))
        throw InputError(job.models[m] + ": density must be in [0, 1], got " + std::to_string(job.densities[m]));
    }
    if (!std::isfinite(job.lambda)) throw InputError("lambda must be finite");
    if (job.order != MergeOrder::kNone && linear)
      throw InputError("gradfix.order: linear merges whole weights, not deltas from a base; masks go with task_arithmetic, ties, "
                       "dare_linear and dare_ties");
    if (job.order != MergeOrder::kNone && job.signs.size() != n)
      throw InputError(std::string("gradfix.order ") + merge_order_name(job.order) + " needs sign statistics (gradfix: {signs: FILE}) "
                       "for every model: got " + std::to_string(job.signs.size()) + " for " + std::to_string(n) + " models");
    if (job.order == MergeOrder::kNone && !job.signs.empty())
      throw InputError("sign statistics given without gradfix.order (mask-then-merge or merge-then-mask)");
    base = open_reader(linear && job.base.empty() ? job.models.front() : job.base);
    for (const auto& path : job.models) models.push_back(open_reader(path));
    const TensorSelector selector(job.output.include, job.output.exclude);
    for (const auto& name : selected_names(*base, selector))
      if (dtype_is_float(base->info(name).dtype)) names.push_back(name);
    require_selection(names, *base);
    for (const auto& model : models) {
      require_matching(*base, names, *model);
      require_float(*model, names, "merge");
    }
    for (const auto& path : job.signs) {
      signs.push_back(open_reader(path));
      require_matching(*base, names, *signs.back());
      require_float(*signs.back(), names, "merge");
    }
  });
  const std::set<std::string> merged(names.begin(), names.end());
  std::vector<TensorInfo> layout;
  for (const auto& tensor : base->tensors()) layout.push_back(output_info(tensor, job.output));
  const ShardPlan plan(layout, ranks.size());
  const auto chunks = my_chunks(ranks, plan, layout);
  const bool allow = job.output.allow_nonfinite;
  const bool dare = job.method == ModelMergeMethod::kDareLinear || job.method == ModelMergeMethod::kDareTies;
  const bool consensus = job.method == ModelMergeMethod::kTies || job.method == ModelMergeMethod::kDareTies;
  nlohmann::json options = {{"method", model_merge_method_name(job.method)}, {"variant", "mergekit"},
                            {"base", job.base.empty() ? "" : input_name(job.base)}, {"models", input_names(job.models)},
                            {"weights", job.weights}, {"densities", job.densities}, {"normalize", job.normalize},
                            {"lambda", job.lambda}, {"output", output_options_json(job.output)}};
  if (dare) {
    options["rescale"] = job.rescale;
    options["seed"] = job.seed;
  }
  if (job.order != MergeOrder::kNone) {
    options["order"] = merge_order_name(job.order);
    options["signs"] = input_names(job.signs);
    options["mask"] = mask_options_json(job.mode, job.mask);
  }
  Inputs inputs;
  if (!job.base.empty()) inputs.emplace_back("base", base.get());
  for (std::size_t m = 0; m < n; ++m) inputs.emplace_back("model." + std::to_string(m), models[m].get());
  for (std::size_t m = 0; m < signs.size(); ++m) inputs.emplace_back("signs." + std::to_string(m), signs[m].get());
  Metadata metadata = output_metadata("merge", options, inputs);
  if (!job.config_json.empty()) metadata["gradfix.merge_config"] = job.config_json;
  // fp64 where a merged tensor is F64 in an input or the output.
  bool f64 = false;
  for (const auto& tensor : layout) {
    if (!merged.count(tensor.name)) continue;
    f64 = f64 || tensor.dtype == DType::kF64 || base->info(tensor.name).dtype == DType::kF64;
    for (const auto& reader : models) f64 = f64 || reader->info(tensor.name).dtype == DType::kF64;
    for (const auto& reader : signs) f64 = f64 || reader->info(tensor.name).dtype == DType::kF64;
  }
  NonFiniteResults nonfinite;
  std::unique_ptr<TensorWriter> writer;
  JobSummary summary;
  Progress progress(ranks.context(), "merge", static_cast<long long>(chunks.size()), chunk_bytes(chunks, layout));
  auto merge_in = [&](auto zero) {
    using V = decltype(zero);
    // M_m - base in the compute type (fp32 as mergekit computes a float32 merge; fp64 with F64);
    // `reference` is the base's chunk when the caller has it already.
    auto raw_delta = [&](std::size_t m, const Piece& chunk, const std::vector<V>* reference = nullptr) {
      const std::string& name = layout[chunk.tensor].name;
      auto values = load<V>(*models[m], name, chunk.begin, chunk.count, allow);
      const auto loaded = reference ? std::vector<V>() : load<V>(*base, name, chunk.begin, chunk.count, allow);
      const auto& base_values = reference ? *reference : loaded;
      for (std::size_t i = 0; i < values.size(); ++i) values[i] -= base_values[i];
      return values;
    };
    // This rank's chunks of the merged tensors (the others are copied from the base).
    std::vector<Piece> merged_chunks;
    for (const auto& chunk : chunks)
      if (merged.count(layout[chunk.tensor].name)) merged_chunks.push_back(chunk);
    auto statistics_of = [&](const TensorReader& reader, const Piece& chunk) {
      return load<V>(reader, layout[chunk.tensor].name, chunk.begin, chunk.count, allow);
    };
    // Mask-then-merge: each delta is masked with its own model's statistics before anything else
    // (DARE's drops, TIES's trims), as gradfix merge masks task vectors before merging them.
    std::vector<SumsByTensor> delta_sums(n);
    if (job.order == MergeOrder::kMaskThenMerge)
      for (std::size_t m = 0; m < n; ++m)
        delta_sums[m] = mask_sums<V>(ranks, plan, layout, job.mode, job.mask, merged_chunks,
                                  [&](const Piece& chunk, std::vector<V>& values, std::vector<V>& statistics) {
                                    values = raw_delta(m, chunk);
                                    statistics = statistics_of(*signs[m], chunk);
                                  });
    auto delta = [&](std::size_t m, const Piece& chunk, const std::vector<V>* reference = nullptr) {
      auto values = raw_delta(m, chunk, reference);
      if (job.order != MergeOrder::kMaskThenMerge) return values;
      std::vector<V> masked;
      mask_chunk(job.mode, job.mask, layout[chunk.tensor], chunk, values, statistics_of(*signs[m], chunk), delta_sums[m], masked);
      return masked;
    };

    // DARE keeps entry i of model m's delta when its draw falls below the model's density.
    auto dare_keeps = [&](std::size_t m, std::uint64_t key, long long index) {
      return job.densities[m] >= 1.0 || uniform_at(job.seed ^ mix_bits(m + 1), key, index, 0) < job.densities[m];
    };
    // DARE's rescaling: per tensor and model, ||delta||_1 / ||kept delta||_1 (mergekit leaves the
    // kept delta as it is when either norm is below 1e-7). The norms are exact sums, so the factor
    // is the same at any number of ranks.
    // This rank's chunks of each merged tensor (indices into `chunks`), for the passes before the
    // merge: DARE's norms and TIES's trims.
    std::map<std::size_t, std::vector<std::size_t>> chunks_by_tensor;
    for (std::size_t c = 0; c < chunks.size(); ++c)
      if (merged.count(layout[chunks[c].tensor].name)) chunks_by_tensor[chunks[c].tensor].push_back(c);
    auto takes_part = [&](std::size_t t) { return merged.count(layout[t].name) && (plan.is_split(t) || chunks_by_tensor.count(t)); };
    std::map<std::size_t, std::vector<double>> rescales;  // by tensor
    if (dare) {
      for (std::size_t t = 0; t < layout.size(); ++t) {
        if (!takes_part(t)) continue;
        const std::uint64_t key = tensor_key_of(layout[t].name);
        for (std::size_t m = 0; m < n; ++m) {
          double factor = 1.0;
          if (job.rescale && job.densities[m] < 1.0) {
            ExactSum before, after;
            for (std::size_t c : chunks_by_tensor[t]) {
              const Piece& chunk = chunks[c];
              const auto values = delta(m, chunk);
              for (std::size_t i = 0; i < values.size(); ++i) {
                before.add(std::fabs(values[i]));
                if (dare_keeps(m, key, chunk.begin + static_cast<long long>(i))) after.add(std::fabs(values[i]));
              }
            }
            auto total = [&](ExactSum& sum) { return plan.is_split(t) ? allreduce_exact_sum(ranks.context().stats(), sum) : sum.value(); };
            const double b = total(before), a = total(after);
            if (b >= 1e-7 && a >= 1e-7) factor = b / a;
          }
          rescales[t].push_back(factor);
        }
      }
    }

    // The trims (ties): a threshold per tensor and model, then the tied entries each chunk keeps.
    std::map<std::size_t, std::vector<Trim>> trims;  // by tensor
    if (job.method == ModelMergeMethod::kTies) {
      for (std::size_t t = 0; t < layout.size(); ++t) {
        if (!takes_part(t)) continue;
        const bool split = plan.is_split(t);
        std::vector<Piece> mine;
        for (std::size_t c : chunks_by_tensor[t]) mine.push_back(chunks[c]);
        for (std::size_t m = 0; m < n; ++m)
          trims[t].push_back(exact_trim(ranks, mergekit_keep_count(layout[t].numel(), job.densities[m]), layout[t].numel(), split, mine,
                                        [&](const Piece& chunk) { return delta(m, chunk); }));
      }
    }

    double weight_sum = 0.0;
    for (double w : job.weights) weight_sum += w;
    // The merged delta of a chunk of a merged tensor, before lambda (every method but linear).
    auto mixed_of = [&](const Piece& chunk) {
      const TensorInfo& out = layout[chunk.tensor];
      const auto count = static_cast<std::size_t>(chunk.count);
      std::vector<std::vector<double>> deltas(n);
      const auto base_values = load<V>(*base, out.name, chunk.begin, chunk.count, allow);
      for (std::size_t m = 0; m < n; ++m) {
        auto values = delta(m, chunk, &base_values);
        if (job.method == ModelMergeMethod::kTies) trims[chunk.tensor][m].apply(chunk, values);
        deltas[m].assign(values.begin(), values.end());
        if (dare) {
          const std::uint64_t key = tensor_key_of(out.name);
          const double factor = rescales[chunk.tensor][m];
          for (std::size_t i = 0; i < count; ++i)
            deltas[m][i] = dare_keeps(m, key, chunk.begin + static_cast<long long>(i)) ? deltas[m][i] * factor : 0.0;
        }
        for (auto& value : deltas[m]) value *= job.weights[m];
      }
      std::vector<double> mixed(count, 0.0);
      if (consensus) {
        std::vector<const double*> pointers;
        for (const auto& values : deltas) pointers.push_back(values.data());
        mergekit_consensus(pointers, job.weights, job.normalize, chunk.count, mixed.data());
      } else {
        const double divisor = std::fabs(weight_sum) < 1e-8 ? 1.0 : weight_sum;
        for (std::size_t i = 0; i < count; ++i) {
          for (std::size_t m = 0; m < n; ++m) mixed[i] += deltas[m][i];
          if (job.normalize) mixed[i] /= divisor;
        }
      }
      return mixed;
    };
    // Merge-then-mask: the merged delta is masked with sum_m sign(s_m), as gradfix merge does for
    // task vectors.
    auto summed_signs = [&](const Piece& chunk) { return sign_sum<V>(signs, layout[chunk.tensor].name, chunk, allow); };
    SumsByTensor merged_sums;
    if (job.order == MergeOrder::kMergeThenMask)
      merged_sums = mask_sums<V>(ranks, plan, layout, job.mode, job.mask, merged_chunks,
                                 [&](const Piece& chunk, std::vector<V>& values, std::vector<V>& statistics) {
                                   const auto mixed = mixed_of(chunk);
                                   values.assign(mixed.begin(), mixed.end());
                                   statistics = summed_signs(chunk);
                                 });

    writer = open_output(ranks, job.out, layout, metadata, job.output);
    for (std::size_t c = 0; c < chunks.size(); ++c) {
      const Piece& chunk = chunks[c];
      const TensorInfo& out = layout[chunk.tensor];
      progress.next(chunk.count * static_cast<long long>(dtype_size(out.dtype)));
      if (!merged.count(out.name)) {
        copy_chunk(*base, out, chunk, *writer, true, nonfinite);
        continue;
      }
      const auto count = static_cast<std::size_t>(chunk.count);
      std::vector<double> result(count, 0.0);
      if (linear) {
        for (std::size_t m = 0; m < n; ++m) {
          const auto values = load<V>(*models[m], out.name, chunk.begin, chunk.count, allow);
          for (std::size_t i = 0; i < count; ++i) result[i] += job.weights[m] * values[i];
        }
        if (job.normalize && weight_sum != 0.0)
          for (auto& value : result) value /= weight_sum;
      } else {
        auto mixed = mixed_of(chunk);
        if (job.order == MergeOrder::kMergeThenMask) {
          const std::vector<V> unmasked(mixed.begin(), mixed.end());
          std::vector<V> masked;
          mask_chunk(job.mode, job.mask, out, chunk, unmasked, summed_signs(chunk), merged_sums, masked);
          mixed.assign(masked.begin(), masked.end());
        }
        const auto reference = load<V>(*base, out.name, chunk.begin, chunk.count, allow);
        for (std::size_t i = 0; i < count; ++i) result[i] = reference[i] + job.lambda * mixed[i];
      }
      store(*writer, out, chunk.begin, result.data(), chunk.count, nonfinite);
      summary.elements += chunk.count;
    }
  };
  if (f64) merge_in(0.0);
  else merge_in(0.0f);
  progress.finish();
  nonfinite.refuse(ranks, job.out, allow);
  carry_model_files(ranks.context(), linear && job.base.empty() ? job.models.front() : job.base, *writer, job.output, metadata);
  commit_collectively(ranks.context(), *writer);
  std::vector<long long> elements = {summary.elements};
  ranks.reduce_statistics(elements);
  summary.elements = elements[0];
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.tensors_changed = static_cast<long long>(names.size());
  summary.bytes_written = layout_bytes(layout);
  if (ranks.is_root())
    log << "merge " << model_merge_method_name(job.method) << " (mergekit rules"
        << (job.order == MergeOrder::kNone ? std::string() : std::string(", ") + merge_order_name(job.order) + " " + mask_mode_name(job.mode))
        << ") of " << n << " models: " << names.size() << " of "
        << layout.size() << " tensors (" << summary.elements << " elements) merged, written to " << job.out << rank_note(ranks) << "\n";
  return summary;
}

JobSummary run_convert(const ConvertJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader in;
  std::vector<std::string> names;
  ranks.agree([&] {
    in = open_reader(job.in);
    const TensorSelector selector(job.output.include, job.output.exclude);
    names = selected_names(*in, selector);
    require_selection(names, *in);
  });
  const auto layout = layout_of(*in, names, job.output);
  const ShardPlan plan(layout, ranks.size());
  const Metadata metadata =
      output_metadata("convert", {{"in", input_name(job.in)}, {"output", output_options_json(job.output)}}, {{"input", in.get()}});
  auto writer = open_output(ranks, job.out, layout, metadata, job.output);
  JobSummary summary;
  NonFiniteResults nonfinite;
  const auto chunks = my_chunks(ranks, plan, layout);
  Progress progress(ranks.context(), "convert", static_cast<long long>(chunks.size()), chunk_bytes(chunks, layout));
  for (const auto& chunk : chunks) {
    progress.next(chunk.count * static_cast<long long>(dtype_size(layout[chunk.tensor].dtype)));
    copy_chunk(*in, layout[chunk.tensor], chunk, *writer, job.output.allow_nonfinite, nonfinite);
  }
  progress.finish();
  nonfinite.refuse(ranks, job.out, job.output.allow_nonfinite);
  carry_model_files(ranks.context(), job.in, *writer, job.output, metadata);
  commit_collectively(ranks.context(), *writer);
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.bytes_written = layout_bytes(layout);
  for (const auto& tensor : layout) summary.elements += tensor.numel();
  if (ranks.is_root())
    log << "convert: " << layout.size() << " tensors, " << summary.bytes_written << " bytes, written to " << job.out
        << rank_note(ranks) << "\n";
  return summary;
}

std::vector<TensorInfo> parse_shapes(const std::string& text, DType dtype) {
  std::vector<TensorInfo> layout;
  std::stringstream entries(text);
  std::string entry;
  while (std::getline(entries, entry, ',')) {
    const auto equals = entry.find('=');
    if (equals == std::string::npos || equals == 0)
      throw InputError("--shapes entry '" + entry + "' is not NAME=DIMxDIMx... (e.g. w=256x784)");
    TensorInfo tensor{entry.substr(0, equals), dtype, {}};
    std::stringstream dims(entry.substr(equals + 1));
    std::string dim;
    while (std::getline(dims, dim, 'x')) {
      if (dim.empty() || dim.find_first_not_of("0123456789") != std::string::npos)
        throw InputError("--shapes entry '" + entry + "': '" + dim + "' is not a dimension");
      tensor.shape.push_back(std::stoll(dim));
    }
    layout.push_back(tensor);
  }
  if (layout.empty()) throw InputError("--shapes is empty");
  return layout;
}

std::vector<TensorInfo> mlp_layout(const std::string& dims, DType dtype) {
  std::vector<long long> widths;
  std::stringstream text(dims);
  std::string width;
  while (std::getline(text, width, ',')) {
    if (width.empty() || width.find_first_not_of("0123456789") != std::string::npos || std::stoll(width) == 0)
      throw InputError("--mlp '" + dims + "': '" + width + "' is not a positive layer width");
    widths.push_back(std::stoll(width));
  }
  if (widths.size() < 2) throw InputError("--mlp '" + dims + "' needs at least two widths (input and output)");
  std::vector<TensorInfo> layout;
  for (std::size_t i = 0; i + 1 < widths.size(); ++i) {
    layout.push_back({"layers." + std::to_string(i) + ".weight", dtype, {widths[i + 1], widths[i]}});
    layout.push_back({"layers." + std::to_string(i) + ".bias", dtype, {widths[i + 1]}});
  }
  return layout;
}

JobSummary run_generate(const GenerateJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader like;
  std::vector<TensorInfo> layout = job.layout;
  ranks.agree([&] {
    if (!std::isfinite(job.noise) || !std::isfinite(job.like_scale)) throw InputError("--noise and --like-scale must be finite");
    if (!job.like.empty()) {
      like = open_reader(job.like);
      layout.clear();
      for (const auto& tensor : like->tensors()) layout.push_back(output_info(tensor, job.output));
    }
    if (layout.empty()) throw InputError("generate needs --mlp, --shapes or --like");
  });
  const ShardPlan plan(layout, ranks.size());
  nlohmann::json options = {{"like", input_name(job.like)}, {"like_scale", job.like_scale}, {"noise", job.noise}, {"seed", job.seed},
                            {"output", output_options_json(job.output)}};
  const Metadata metadata = output_metadata("generate", options, like ? Inputs{{"like", like.get()}} : Inputs{});
  auto writer = open_output(ranks, job.out, layout, metadata, job.output);
  JobSummary summary;
  NonFiniteResults nonfinite;
  for (const auto& chunk : my_chunks(ranks, plan, layout)) {
    const TensorInfo& tensor = layout[chunk.tensor];
    // Integer tensors of the model (position ids, buffers) are not weights: kept as they are.
    if (like && !dtype_is_float(tensor.dtype)) {
      copy_chunk(*like, tensor, chunk, *writer, true, nonfinite);
      continue;
    }
    std::vector<float> values(static_cast<std::size_t>(chunk.count), 0.0f);
    if (like) {
      values = load(*like, tensor.name, chunk.begin, chunk.count, job.output.allow_nonfinite);
      for (auto& value : values) value = static_cast<float>(job.like_scale * value);
    }
    const std::uint64_t key = tensor_key_of(tensor.name);
    for (long long i = 0; i < chunk.count; ++i)
      values[static_cast<std::size_t>(i)] += static_cast<float>(job.noise * gaussian_at(job.seed, key, chunk.begin + i));
    writer->write_f32(tensor.name, chunk.begin, values.data(), chunk.count);
  }
  carry_model_files(ranks.context(), job.like, *writer, job.output, metadata);
  commit_collectively(ranks.context(), *writer);
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.bytes_written = layout_bytes(layout);
  for (const auto& tensor : layout) summary.elements += tensor.numel();
  if (ranks.is_root())
    log << "generate: " << layout.size() << " tensors, " << summary.elements << " elements, written to " << job.out
        << rank_note(ranks) << "\n";
  return summary;
}

void run_inspect(const InspectJob& job, std::ostream& out, const JobContext& context) {
  using Json = nlohmann::json;
  const Ranks ranks(context);
  Reader file, other;
  std::vector<std::string> names, common, only_first, only_second;
  ranks.agree([&] {
    file = open_reader(job.file);
    const TensorSelector selector(job.include, job.exclude);
    // inspect lists tensors of unreadable dtypes rather than refusing them.
    for (const auto& tensor : file->tensors())
      if (selector.selects(tensor.name)) names.push_back(tensor.name);
    if (job.other.empty()) return;
    other = open_reader(job.other);
    for (const auto& name : names) (other->find(name) ? common : only_first).push_back(name);
    for (const auto& name : selected_names(*other, selector))
      if (!file->find(name)) only_second.push_back(name);
    require_matching(*file, common, *other);
  });
  Json report = {{"file", job.file}};
  if (!other) {
    if (!ranks.is_root()) return;
    long long elements = 0, bytes = 0;
    out << std::left << std::setw(48) << "tensor" << std::setw(9) << "dtype" << std::setw(22) << "shape" << std::right
        << std::setw(14) << "elements" << std::setw(16) << "bytes" << "\n";
    Json tensors = Json::array();
    for (const auto& name : names) {
      const TensorInfo& info = file->info(name);
      out << std::left << std::setw(48) << escaped_name(name) << std::setw(9) << dtype_name(info.dtype) << std::setw(22)
          << format_shape(info.shape) << std::right << std::setw(14) << info.numel() << std::setw(16) << info.nbytes() << "\n";
      elements += info.numel();
      bytes += info.nbytes();
      tensors.push_back({{"name", escaped_name(name)}, {"dtype", dtype_name(info.dtype)}, {"shape", info.shape}, {"bytes", info.nbytes()}});
    }
    out << names.size() << " tensors, " << elements << " elements, " << bytes << " bytes\n";
    Json unreadable = Json::array();
    for (const auto& [name, dtype] : file->unreadable()) {
      out << "unreadable " << escaped_name(name) << ": dtype '" << escaped_name(dtype) << "' (gradfix reads " << dtype_names()
          << "; jobs need --exclude for it)\n";
      unreadable.push_back({{"name", escaped_name(name)}, {"dtype", escaped_name(dtype)}});
    }
    report["unreadable"] = unreadable;
    for (const auto& [key, value] : file->metadata()) out << "metadata " << escaped_name(key) << " = " << escaped_name(value) << "\n";
    report["tensors"] = tensors;
    report["elements"] = elements;
    report["bytes"] = bytes;
    Json metadata = Json::object();
    for (const auto& [key, value] : file->metadata()) metadata[escaped_name(key)] = escaped_name(value);
    report["metadata"] = metadata;
  } else {
    // Each rank compares its pieces; the per-tensor sums meet on every rank.
    const auto layout = layout_of(*file, common, {});
    const ShardPlan plan(layout, ranks.size());
    std::vector<PairStats> per_tensor(layout.size());
    for (const auto& chunk : my_chunks(ranks, plan, layout)) {
      const std::string& name = layout[chunk.tensor].name;
      const auto a = file->read_f32(name, chunk.begin, chunk.count);
      const auto b = other->read_f32(name, chunk.begin, chunk.count);
      per_tensor[chunk.tensor].add(a.data(), b.data(), chunk.count);
    }
    for (auto& stats : per_tensor) ranks.reduce_summary(stats);
    if (!ranks.is_root()) return;
    out << std::left << std::setw(48) << "tensor" << std::right << std::setw(12) << "agree" << std::setw(10) << "cosine"
        << std::setw(14) << "norm_a" << std::setw(14) << "norm_b" << "\n";
    PairStats overall;
    Json tensors = Json::array();
    auto row = [&](const std::string& label, const PairStats& stats) {
      out << std::left << std::setw(48) << label << std::right << std::setw(12) << percent(stats.sign_agreement())
          << std::setw(10) << std::fixed << std::setprecision(4) << stats.cosine() << std::setw(14) << std::setprecision(6)
          << std::sqrt(stats.norm_a_squared) << std::setw(14) << std::sqrt(stats.norm_b_squared) << "\n";
      out.unsetf(std::ios::fixed);
    };
    for (std::size_t t = 0; t < layout.size(); ++t) {
      const PairStats& stats = per_tensor[t];
      overall.add(stats);
      row(escaped_name(layout[t].name), stats);
      tensors.push_back({{"name", escaped_name(layout[t].name)}, {"sign_agreement", stats.sign_agreement()}, {"cosine", stats.cosine()},
                         {"norm_a", std::sqrt(stats.norm_a_squared)}, {"norm_b", std::sqrt(stats.norm_b_squared)}});
    }
    row("(overall, " + std::to_string(common.size()) + " tensors)", overall);
    if (!only_first.empty()) out << "only in " << job.file << ": " << format_name_list(only_first) << "\n";
    if (!only_second.empty()) out << "only in " << job.other << ": " << format_name_list(only_second) << "\n";
    report["other"] = job.other;
    report["tensors"] = tensors;
    report["overall"] = {{"sign_agreement", overall.sign_agreement()}, {"cosine", overall.cosine()}, {"elements", overall.count}};
    auto escaped = [](std::vector<std::string> names) {
      for (auto& name : names) name = escaped_name(name);
      return names;
    };
    report["only_in_file"] = escaped(only_first);
    report["only_in_other"] = escaped(only_second);
  }
  if (!job.json_out.empty()) write_text_file_atomically(job.json_out, report.dump(2) + "\n");
}

}  // namespace gradfix
