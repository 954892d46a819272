#pragma once
// Internal to the jobs layer: what the file subcommands (taskvector, apply, mask, merge, the
// whole-model merge, convert, generate) share. Each subcommand is a file of its own in src/jobs/;
// they read their inputs chunk by chunk in the compute type (float, or double where F64 is
// involved), and ChunkedJob (below) runs the part every one of them repeats: this rank's chunks
// of the output, the output under temporary names, progress, the refusal of results that came out
// non-finite, the input's model files, and the collective commit.

#include <functional>
#include <cmath>
#include <initializer_list>
#include <map>
#include <set>
#include <memory>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "gradfix/dist/backend.hpp"
#include "gradfix/io/dtype.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/select.hpp"
#include "gradfix/dist/collective_output.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/algebra/compare.hpp"
#include "gradfix/algebra/mask.hpp"
#include "gradfix/algebra/merge.hpp"
#include "gradfix/jobs/jobs.hpp"
#include "gradfix/dist/plan.hpp"

namespace gradfix::file_jobs {

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
                  long long first, bool allow);

// Fault-injection hook for the tests that kill a rank mid-run: GRADFIX_TEST_PAUSE_MS makes
// every chunk read take that much longer, so a run lasts long enough to be interrupted.
void pause_for_tests();

// Reads elements [begin, begin + count) in the compute type V (float, or double for F64
// tensors: both hold every stored value of their tensors exactly) and refuses NaN and Inf unless
// they are allowed; the check runs on the stored values, so a finite 1e300 in F64 is finite.
// Bytes in a stored dtype live only between a read and its conversion (or a conversion and its
// write): one buffer per direction, kept across chunks. Allocating them per chunk made page
// faults about 15% of a bf16 apply.
enum class Scratch { kLoad, kStore };

unsigned char* scratch_bytes(Scratch which, std::size_t bytes);

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
bool computes_in_f64(std::initializer_list<DType> dtypes);

// "pass --exclude '^name$' to leave it out", with a pattern the user can paste; a name that would
// not print as itself (control characters, invalid UTF-8) gets no pattern on the terminal.
std::string exclude_hint(const std::string& name);

std::vector<std::string> selected_names(const TensorReader& reader, const TensorSelector& selector);

// The tensors --include and --exclude select in `primary` (at least one), each present in `other`
// with the same shape.
std::vector<std::string> select_matching(const TensorReader& primary, const TensorReader& other, const OutputOptions& output);

// Every name must exist in `other` with the same shape; all missing names are reported together,
// so one run tells the user everything that is wrong.
void require_matching(const TensorReader& primary, const std::vector<std::string>& names, const TensorReader& other);

// The selected names of `other` that `primary` lacks: two checkpoints meant to be the same
// model must not differ in either direction.
void require_no_extra(const TensorReader& primary, const TensorReader& other, const TensorSelector& selector);

void require_selection(const std::vector<std::string>& names, const TensorReader& reader);

// --out-dtype changes float tensors only: integer and boolean tensors (position ids, masks,
// buffers) keep their dtype, as model.to(dtype) leaves them in PyTorch.
TensorInfo output_info(const TensorInfo& input, const OutputOptions& output);

// Operations that compute on values (mask, merge, the change of apply) make no sense on
// integer tensors: a selected one is refused, naming it, before anything is written.
void require_float(const TensorReader& reader, const std::vector<std::string>& names, const std::string& operation);

// The dtype of a result computed from inputs of these dtypes, when --out-dtype does not say:
// the widest of them (F64 over F32 over the 16-bit types over the 8-bit ones); F16 with BF16,
// or the two 8-bit types together, give F32, which holds both exactly.
DType widest_float(const std::vector<DType>& dtypes);

// An output's __metadata__ keeps the chain that made it: the primary input's own keys (such as
// "format": "pt", which transformers requires), every input's metadata under
// "gradfix.input.ROLE." (so a merge that made a task vector survives the apply that uses it), and
// this operation with its options as JSON. Chains deeper than kMaxProvenanceDepth operations are
// cut, saying so, so that metadata cannot grow without bound over repeated runs.
constexpr int kMaxProvenanceDepth = 8;

using Inputs = std::vector<std::pair<std::string, const TensorReader*>>;

int provenance_depth(const std::string& key);

Metadata output_metadata(const std::string& operation, const nlohmann::json& options, const Inputs& inputs);

// How options name an input: by its last path component ("tau.safetensors", "Llama-3-8B"), so
// that where a user keeps files does not change an output's bytes (or leak into shared models).
std::string input_name(std::string path);

nlohmann::json input_names(const std::vector<std::string>& paths);

// The options every writing job records: dtype rules and the tensor selection.
nlohmann::json output_options_json(const OutputOptions& output);

nlohmann::json mask_options_json(MaskMode mode, const MaskOptions& mask);

std::unique_ptr<TensorWriter> open_output(const Ranks& ranks, const std::string& path, const std::vector<TensorInfo>& layout,
                                          const Metadata& metadata, const OutputOptions& output);

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
std::vector<Piece> my_chunks(const Ranks& ranks, const ShardPlan& plan, const std::vector<TensorInfo>& layout, long long most = 0);

// Bytes of output a rank's chunks hold, for its progress line.
long long chunk_bytes(const std::vector<Piece>& chunks, const std::vector<TensorInfo>& layout);

// Copies a chunk unchanged, converting only when the output dtype differs: float to float with
// one rounding (exact whenever the output dtype holds the value), integers as they are.
void copy_chunk(const TensorReader& reader, const TensorInfo& out, const Piece& chunk, TensorWriter& writer, bool allow,
                NonFiniteResults& nonfinite);

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

std::string percent(double fraction);

long long layout_bytes(const std::vector<TensorInfo>& layout);

std::vector<TensorInfo> layout_of(const TensorReader& reader, const std::vector<std::string>& names, const OutputOptions& output);

std::string rank_note(const Ranks& ranks);

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

// A tensor's values on this rank (`values(chunk)` for each of `chunks`) for a selection's passes:
// computed once and kept when they fit in kKeptBytes, so that the passes after the first read
// memory instead of the inputs again (a TIES merge computed each delta three times); computed
// again for every pass otherwise, so that memory stays bounded by a chunk on any tensor.
template <typename Values>
class PassValues {
 public:
  using Vector = std::decay_t<std::invoke_result_t<const Values&, const Piece&>>;
  static constexpr long long kKeptBytes = 64LL << 20;

  PassValues(const std::vector<Piece>& chunks, const Values& values) : chunks_(chunks), values_(values) {
    long long count = 0;
    for (const auto& chunk : chunks) count += chunk.count;
    keep_ = count * static_cast<long long>(sizeof(typename Vector::value_type)) <= kKeptBytes;
    if (!keep_) return;
    kept_.reserve(chunks.size());
    for (const auto& chunk : chunks) kept_.push_back(values(chunk));
  }
  std::size_t size() const { return chunks_.size(); }
  const Piece& chunk(std::size_t j) const { return chunks_[j]; }
  // Chunk j's values; valid until the next call.
  const Vector& operator[](std::size_t j) {
    if (keep_) return kept_[j];
    current_ = values_(chunks_[j]);
    return current_;
  }

 private:
  const std::vector<Piece>& chunks_;
  const Values& values_;
  bool keep_ = false;
  std::vector<Vector> kept_;
  Vector current_;
};

// Exact k-th largest magnitude over chunks spread across ranks: the histograms are all-reduced
// between the passes when the values live on several ranks. Doubles are ranked as fp32
// (trim_magnitude).
template <typename Values>
float distributed_threshold(const Ranks& ranks, long long k, bool across_ranks, PassValues<Values>& values) {
  KthLargestMagnitude selection(k);
  std::vector<float> narrow;
  while (selection.needs_pass()) {
    for (std::size_t j = 0; j < values.size(); ++j) {
      const auto& data = values[j];
      if constexpr (std::is_same_v<typename PassValues<Values>::Vector, std::vector<float>>) {
        selection.add(data.data(), static_cast<long long>(data.size()));
      } else {
        narrow.assign(data.begin(), data.end());
        selection.add(narrow.data(), static_cast<long long>(narrow.size()));
      }
    }
    if (across_ranks) ranks.reduce_statistics(selection.histogram());
    selection.next_pass();
  }
  return selection.threshold();
}

// As above, `values(chunk)` giving a std::vector of float or double for each of `chunks`.
template <typename Values>
float distributed_threshold(const Ranks& ranks, long long k, bool across_ranks, const std::vector<Piece>& chunks, const Values& values) {
  PassValues<Values> passes(chunks, values);
  return distributed_threshold(ranks, k, across_ranks, passes);
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
    if (ties_left == 0) {
      // No tie to keep here (the usual case): a plain comparison, which vectorises.
      for (auto& value : values) value = trim_magnitude(value) > threshold ? value : V(0);
      return;
    }
    for (auto& value : values) {
      const float magnitude = trim_magnitude(value);
      if (!(magnitude > threshold || (magnitude == threshold && ties_left-- > 0))) value = V(0);
    }
  }
};

// Collective over the ranks that hold part of the tensor when it is split: `mine` are this
// rank's chunks of it, `values(chunk)` the vector's values there.
template <typename Values>
Trim exact_trim(const Ranks& ranks, long long k, long long numel, bool split, const std::vector<Piece>& mine, const Values& values) {
  Trim trim;
  trim.keep_all = k >= numel;
  if (trim.keep_all) return trim;
  PassValues<Values> passes(mine, values);
  trim.threshold = distributed_threshold(ranks, k, split, passes);
  // Counts above and at the threshold; the ties to keep go to the earliest entries.
  std::vector<long long> tied(mine.size(), 0);
  std::vector<long long> totals(1 + static_cast<std::size_t>(ranks.size()), 0);  // above, then tied per rank
  for (std::size_t j = 0; j < mine.size(); ++j) {
    long long above = 0, at = 0;
    for (auto value : passes[j]) {
      const float magnitude = trim_magnitude(value);
      above += magnitude > trim.threshold;
      at += magnitude == trim.threshold;
    }
    totals[0] += above;
    tied[j] = at;
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
std::uint64_t mix_bits(std::uint64_t x);

// Uniform in [0, 1), 53 random bits; `stream` separates draws of the same element.
double uniform_at(std::uint64_t seed, std::uint64_t key, long long index, std::uint64_t stream);

// A standard normal value (Box-Muller on two uniforms).
double gaussian_at(std::uint64_t seed, std::uint64_t key, long long index);

// A one-line notice when inputs hold the same tensor in different dtypes: which, how many, and
// the dtype the result gets, so that no rounding happens unannounced.
void notice_mixed_dtypes(const Ranks& ranks, std::ostream& log, const std::string& operation,
                         const std::vector<std::string>& differing, const std::string& example, const std::string& rule);

// The part of a file job around its per-chunk work. Construct it with the output's layout; read
// chunks() for any pass over this rank's data before the output exists (the sums some masks need,
// TIES thresholds); write() opens the output under temporary names and runs the kernel on every
// chunk with progress; commit() refuses results that came out NaN or infinite (unless allowed),
// carries the model files of the primary input, and publishes once every rank succeeded.
class ChunkedJob {
 public:
  using Kernel = std::function<void(const Piece& chunk, const TensorInfo& tensor, TensorWriter& writer, NonFiniteResults& nonfinite)>;

  // `most`: a job's own bound on a chunk's elements, below --chunk-elements (0: that option's).
  ChunkedJob(const Ranks& ranks, std::string operation, std::vector<TensorInfo> layout, long long most = 0);
  const std::vector<TensorInfo>& layout() const { return layout_; }
  const ShardPlan& plan() const { return plan_; }
  // This rank's chunks, in plan order.
  const std::vector<Piece>& chunks() const { return chunks_; }
  void write(const std::string& path, const Metadata& metadata, const OutputOptions& output, const Kernel& kernel);
  // `changes`: what a merge changes in the files carried from the primary input.
  void commit(const std::string& primary_input, const CarriedFileChanges& changes = {});
  // The bytes the output holds (every rank's), for the job's summary.
  long long bytes() const { return layout_bytes(layout_); }
  // The summary of a job that writes every tensor of its layout whole (convert, generate).
  JobSummary whole_output_summary() const {
    JobSummary summary;
    summary.tensors_written = static_cast<long long>(layout_.size());
    summary.bytes_written = bytes();
    for (const auto& tensor : layout_) summary.elements += tensor.numel();
    return summary;
  }

 private:
  const Ranks& ranks_;
  std::string operation_;
  std::vector<TensorInfo> layout_;
  ShardPlan plan_;
  std::vector<Piece> chunks_;
  std::string path_;
  Metadata metadata_;
  OutputOptions output_;
  std::unique_ptr<TensorWriter> writer_;
  NonFiniteResults nonfinite_;
};

}  // namespace gradfix::file_jobs
