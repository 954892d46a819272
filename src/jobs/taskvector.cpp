// gradfix taskvector: tau = finetuned - base, chunk by chunk, in F32 (F64 from F64).
#include "file_jobs.hpp"

namespace gradfix {
using namespace file_jobs;

void TaskVectorJob::validate() const {
  require_given(base, "--base");
  require_given(finetuned, "--finetuned");
  require_given(out, "--out");
}

JobSummary run_taskvector(const TaskVectorJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader base, finetuned;
  std::vector<std::string> names, integers;
  ranks.agree([&] {
    job.validate();
    base = open_reader(job.base);
    finetuned = open_reader(job.finetuned);
    names = select_matching(*base, *finetuned, job.output);
    require_no_extra(*base, *finetuned, TensorSelector(job.output.include, job.output.exclude));
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
  ChunkedJob chunked(ranks, "taskvector", layout);
  nlohmann::json options = {{"base", input_name(job.base)}, {"finetuned", input_name(job.finetuned)}, {"output", output_options_json(job.output)}};
  const Metadata metadata = output_metadata("taskvector", options, {{"base", base.get()}, {"finetuned", finetuned.get()}});
  JobSummary summary;
  const bool allow = job.output.allow_nonfinite;
  chunked.write(job.out, metadata, job.output, [&](const Piece& chunk, const TensorInfo& out, TensorWriter& writer, NonFiniteResults& nonfinite) {
    auto difference = [&](auto zero) {
      using V = decltype(zero);
      const auto base_values = load<V>(*base, out.name, chunk.begin, chunk.count, allow);
      auto tau = load<V>(*finetuned, out.name, chunk.begin, chunk.count, allow);
      for (std::size_t i = 0; i < tau.size(); ++i) tau[i] -= base_values[i];
      store(writer, out, chunk.begin, tau.data(), chunk.count, nonfinite);
      summary.stats.add_self(tau.data(), chunk.count);
    };
    if (computes_in_f64({base->info(out.name).dtype, finetuned->info(out.name).dtype, out.dtype})) difference(0.0);
    else difference(0.0f);
  });
  chunked.commit(job.base);
  ranks.reduce_summary(summary.stats);
  summary.elements = summary.stats.count;
  summary.tensors_written = summary.tensors_changed = static_cast<long long>(names.size());
  summary.bytes_written = chunked.bytes();
  if (ranks.is_root())
    log << "taskvector: " << names.size() << " tensors, " << summary.elements << " elements, ||tau|| = "
        << std::sqrt(summary.stats.norm_a_squared) << ", written to " << job.out << rank_note(ranks) << "\n";
  return summary;
}

}  // namespace gradfix
