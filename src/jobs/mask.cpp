// gradfix mask: tau masked by sign statistics, tensor by tensor, in any mask mode.
#include "file_jobs.hpp"

namespace gradfix {
using namespace file_jobs;

void MaskJob::validate() const {
  require_given(task_vector, "--task-vector");
  require_given(signs, "--signs");
  require_given(out, "--out");
  mask.validate();
}

JobSummary run_mask(const MaskJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader tau, signs;
  std::vector<std::string> names;
  ranks.agree([&] {
    job.validate();
    tau = open_reader(job.task_vector);
    signs = open_reader(job.signs);
    names = select_matching(*tau, *signs, job.output);
    require_float(*tau, names, "mask");
  });
  const std::set<std::string> changed(names.begin(), names.end());
  std::vector<TensorInfo> layout;
  for (const auto& tensor : tau->tensors()) layout.push_back(output_info(tensor, job.output));
  nlohmann::json options = {{"task_vector", input_name(job.task_vector)}, {"signs", input_name(job.signs)}, {"mask", mask_options_json(job.mode, job.mask)},
                             {"output", output_options_json(job.output)}};
  Metadata metadata = output_metadata("mask", options, {{"task_vector", tau.get()}, {"signs", signs.get()}});
  metadata["gradfix.mask_mode"] = mask_mode_name(job.mode);
  ChunkedJob chunked(ranks, "mask", layout);
  const bool allow = job.output.allow_nonfinite;
  // fp64 where a selected tensor is F64 in the task vector or the output (the other tensors come
  // out the same either way: a mask's weights are computed in double).
  bool f64 = false;
  for (const auto& name : names) f64 = f64 || computes_in_f64({tau->info(name).dtype, signs->info(name).dtype, output_info(tau->info(name), job.output).dtype});
  JobSummary summary;
  PairStats kept;  // masked output against the input task vector
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
    for (const auto& chunk : chunked.chunks())
      if (changed.count(layout[chunk.tensor].name)) masked_chunks.push_back(chunk);
    const SumsByTensor sums = mask_sums<V>(ranks, chunked.plan(), layout, job.mode, job.mask, masked_chunks, read_pair);
    std::vector<V> values, statistics, masked;
    chunked.write(job.out, metadata, job.output, [&](const Piece& chunk, const TensorInfo& out, TensorWriter& writer, NonFiniteResults& nonfinite) {
      if (!changed.count(out.name)) {
        copy_chunk(*tau, out, chunk, writer, allow, nonfinite);
        return;
      }
      read_pair(chunk, values, statistics);
      mask_chunk(job.mode, job.mask, out, chunk, values, statistics, sums, masked);
      store(writer, out, chunk.begin, masked.data(), chunk.count, nonfinite);
      summary.stats.add(values.data(), statistics.data(), chunk.count);
      kept.add(masked.data(), values.data(), chunk.count);
    });
  };
  if (f64) mask_in(0.0);
  else mask_in(0.0f);
  chunked.commit(job.task_vector);
  ranks.reduce_summary(summary.stats);
  ranks.reduce_summary(kept);
  summary.elements = summary.stats.count;
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.tensors_changed = static_cast<long long>(names.size());
  summary.bytes_written = chunked.bytes();
  const double kept_fraction =
      kept.nonzero_b > 0 ? static_cast<double>(kept.nonzero_a) / static_cast<double>(kept.nonzero_b) : 0.0;
  if (ranks.is_root())
    log << "mask " << mask_mode_name(job.mode) << ": " << names.size() << " tensors, " << summary.elements
        << " elements; sign agreement of tau with the statistics " << percent(summary.stats.sign_agreement())
        << "; non-zero entries kept " << percent(kept_fraction) << "; written to " << job.out << rank_note(ranks) << "\n";
  return summary;
}

}  // namespace gradfix
