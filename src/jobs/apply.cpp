// gradfix apply: base + alpha * tau on the tensors tau has; the base's other tensors copied.
#include "file_jobs.hpp"

namespace gradfix {
using namespace file_jobs;

void ApplyJob::validate() const {
  require_given(base, "--base");
  require_given(task_vector, "--task-vector");
  require_given(out, "--out");
  if (!std::isfinite(alpha)) throw InputError("--alpha must be finite, got " + format_number(alpha));
}

JobSummary run_apply(const ApplyJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader base, tau;
  std::vector<std::string> tau_names;
  ranks.agree([&] {
    job.validate();
    base = open_reader(job.base);
    tau = open_reader(job.task_vector);
    // A task vector may cover part of a model (a vision tower, say): every tensor it has must be
    // in the base, and the base's other tensors are copied unchanged.
    tau_names = select_matching(*tau, *base, job.output);
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
  metadata["gradfix.alpha"] = format_number(job.alpha);
  ChunkedJob chunked(ranks, "apply", layout);
  JobSummary summary;
  const bool allow = job.output.allow_nonfinite;
  ChunkBuffers buffers;
  chunked.write(job.out, metadata, job.output, [&](const Piece& chunk, const TensorInfo& out, TensorWriter& writer, NonFiniteResults& nonfinite) {
    if (!changed.count(out.name)) {
      copy_chunk(*base, out, chunk, writer, true, nonfinite);
      return;
    }
    auto add = [&](auto alpha) {
      using V = decltype(alpha);
      auto& values = buffers.get<V>(0);
      auto& delta = buffers.get<V>(1);
      load_into(values, *base, out.name, chunk.begin, chunk.count, allow);
      load_into(delta, *tau, out.name, chunk.begin, chunk.count, allow);
      for (std::size_t i = 0; i < values.size(); ++i) values[i] += alpha * delta[i];
      store(writer, out, chunk.begin, values.data(), chunk.count, nonfinite);
      summary.stats.add_self(delta.data(), chunk.count);
    };
    if (computes_in_f64({base->info(out.name).dtype, tau->info(out.name).dtype, out.dtype})) add(job.alpha);
    else add(static_cast<float>(job.alpha));
  });
  chunked.commit(job.base);
  ranks.reduce_summary(summary.stats);
  summary.elements = summary.stats.count;
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.tensors_changed = static_cast<long long>(tau_names.size());
  summary.bytes_written = chunked.bytes();
  if (ranks.is_root())
    log << "apply: base + " << job.alpha << " * tau on " << tau_names.size() << " of " << layout.size() << " tensors ("
        << summary.elements << " elements), written to " << job.out << rank_note(ranks) << "\n";
  return summary;
}

}  // namespace gradfix
