// gradfix merge: task vectors merged (mean, sum, TIES), with their masks before or after
// (mask-then-merge: each vector masked by its own statistics; merge-then-mask: the merge masked by
// the summed signs of all of them).
#include "file_jobs.hpp"

namespace gradfix {
using namespace file_jobs;

void MergeJob::validate() const {
  if (task_vectors.empty()) throw InputError("merge needs at least one --task-vector");
  require_given(out, "--out");
  if (order != MergeOrder::kNone && signs.size() != task_vectors.size())
    throw InputError(std::string("--order ") + merge_order_name(order) + " needs one --signs per --task-vector: got " +
                     std::to_string(signs.size()) + " --signs for " + std::to_string(task_vectors.size()) + " --task-vector");
  if (order == MergeOrder::kNone && !signs.empty()) throw InputError("--signs given without --order mask-then-merge|merge-then-mask");
  if (method == MergeMethod::kTies && !(ties.fraction > 0.0 && ties.fraction <= 1.0))
    throw InputError("--ties-fraction must be in (0, 1], got " + std::to_string(ties.fraction));
  const bool mergekit_ties = method == MergeMethod::kTies && ties.variant == TiesVariant::kMergekit;
  if (mergekit_ties && ties.scope != TiesScope::kTensor)
    throw InputError("--ties-variant mergekit trims within each tensor, as mergekit does; --ties-scope global does not go with it");
  if (mergekit_ties && ties.elect != TiesElect::kMass)
    throw InputError("--ties-variant mergekit elects the sign of the summed values (mass); --ties-elect count does not go with it");
  mask.validate();
}

namespace {

struct MergeInputs {
  std::vector<Reader> vectors;
  std::vector<Reader> signs;
  std::vector<std::string> names;  // the selected tensors
};

// The task vectors and statistics, checked against each other and the options.
MergeInputs open_merge_inputs(const MergeJob& job, const Ranks& ranks) {
  MergeInputs in;
  auto& vectors = in.vectors;
  auto& signs = in.signs;
  auto& names = in.names;
  ranks.agree([&] {
    job.validate();
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
  return in;
}

// The merged tensors: --out-dtype, else the widest of the vectors' dtypes (announced when they differ).
std::vector<TensorInfo> merge_layout(const MergeJob& job, const MergeInputs& in, const Ranks& ranks, std::ostream& log) {
  const auto& vectors = in.vectors;
  std::vector<TensorInfo> layout;
  std::vector<std::string> differing;
  std::string example;
  for (const auto& name : in.names) {
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
  return layout;
}

Metadata merge_metadata(const MergeJob& job, const MergeInputs& in) {
  const auto& vectors = in.vectors;
  const auto& signs = in.signs;
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
  return metadata;
}

// fp64 where a tensor is F64 in an input or the output (F32 tensors come out the same either
// way: sums and means are accumulated in double).
bool merges_in_f64(const std::vector<TensorInfo>& layout, const MergeInputs& in) {
  bool f64 = false;
  for (const auto& tensor : layout) {
    f64 = f64 || tensor.dtype == DType::kF64;
    for (const auto& reader : in.vectors) f64 = f64 || reader->info(tensor.name).dtype == DType::kF64;
    for (const auto& reader : in.signs) f64 = f64 || reader->info(tensor.name).dtype == DType::kF64;
  }
  return f64;
}

// TIES's cut-offs: a threshold per vector over everything (global) or per tensor and vector, or
// mergekit's exact trims per tensor and vector. `values_of(v, chunk)` gives vector v's values
// (masked first in mask-then-merge).
struct TiesCutoffs {
  std::map<std::size_t, std::vector<float>> thresholds;  // by tensor
  std::map<std::size_t, std::vector<Trim>> trims;         // by tensor
};

template <typename ValuesOf>
TiesCutoffs ties_cutoffs(const MergeJob& job, const Ranks& ranks, const ChunkedJob& chunked, std::size_t n, const ValuesOf& values_of) {
  TiesCutoffs cutoffs;
  auto& thresholds = cutoffs.thresholds;
  auto& trims = cutoffs.trims;
  const auto& layout = chunked.layout();
  const auto& plan = chunked.plan();
  const auto& chunks = chunked.chunks();
  const bool mergekit_ties = job.ties.variant == TiesVariant::kMergekit;
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
  return cutoffs;
}

// The merge of this rank's chunks in the compute type V, written through `chunked`; `stats`
// compares the merge with the first vector.
template <typename V>
void merge_chunks(const MergeJob& job, const Ranks& ranks, const MergeInputs& in, ChunkedJob& chunked, const Metadata& metadata,
                  PairStats& stats) {
  const bool mergekit_ties = job.method == MergeMethod::kTies && job.ties.variant == TiesVariant::kMergekit;
  const auto& vectors = in.vectors;
  const auto& signs = in.signs;
  const auto& layout = chunked.layout();
  const auto& plan = chunked.plan();
  const auto& chunks = chunked.chunks();
  const bool allow = job.output.allow_nonfinite;
  const std::size_t n = vectors.size();
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

  const TiesCutoffs cutoffs = ties_cutoffs(job, ranks, chunked, n, values_of);
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
        cutoffs.trims.at(chunk.tensor)[v].apply(chunk, kept);
        trimmed[v].assign(kept.begin(), kept.end());
        weighted.push_back(trimmed[v].data());
      }
      std::vector<double> mixed(merged.size());
      mergekit_consensus(weighted, std::vector<double>(n, 1.0), true, chunk.count, mixed.data());
      merged.assign(mixed.begin(), mixed.end());
      return std::make_pair(merged, values[0]);
    }
    const auto found = cutoffs.thresholds.find(chunk.tensor);
    merge_values(job.method, job.ties.elect, pointers, chunk.count, found == cutoffs.thresholds.end() ? std::vector<float>{} : found->second,
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

  chunked.write(job.out, metadata, job.output, [&](const Piece& chunk, const TensorInfo& out, TensorWriter& writer, NonFiniteResults& nonfinite) {
    auto [merged, first] = merged_of(chunk);
    if (job.order == MergeOrder::kMergeThenMask) {
      const std::vector<V> unmasked = merged;
      mask_chunk(job.mode, job.mask, layout[chunk.tensor], chunk, unmasked, summed_signs(chunk), merged_sums, merged);
    }
    store(writer, out, chunk.begin, merged.data(), chunk.count, nonfinite);
    stats.add(merged.data(), first.data(), chunk.count);
  });
}

}  // namespace

JobSummary run_merge(const MergeJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  const MergeInputs in = open_merge_inputs(job, ranks);
  ChunkedJob chunked(ranks, "merge", merge_layout(job, in, ranks, log));
  const Metadata metadata = merge_metadata(job, in);
  JobSummary summary;
  if (merges_in_f64(chunked.layout(), in)) merge_chunks<double>(job, ranks, in, chunked, metadata, summary.stats);
  else merge_chunks<float>(job, ranks, in, chunked, metadata, summary.stats);
  chunked.commit(job.task_vectors.front());
  ranks.reduce_summary(summary.stats);
  summary.elements = summary.stats.count;
  summary.tensors_written = summary.tensors_changed = static_cast<long long>(in.names.size());
  summary.bytes_written = chunked.bytes();
  if (ranks.is_root())
    log << "merge " << merge_method_name(job.method) << " (" << merge_order_name(job.order) << ") of " << in.vectors.size()
        << " task vectors: " << in.names.size() << " tensors, " << summary.elements
        << " elements; cosine of the merge with the first vector " << summary.stats.cosine() << "; written to " << job.out
        << rank_note(ranks) << "\n";
  return summary;
}

}  // namespace gradfix
