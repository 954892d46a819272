// gradfix convert: a checkpoint re-packed (format, shards, dtype), chunk by chunk.
#include "file_jobs.hpp"

namespace gradfix {
using namespace file_jobs;

void ConvertJob::validate() const {
  require_given(in, "the input (IN)");
  require_given(out, "the output (OUT)");
}

JobSummary run_convert(const ConvertJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader in;
  std::vector<std::string> names;
  ranks.agree([&] {
    job.validate();
    in = open_reader(job.in);
    const TensorSelector selector(job.output.include, job.output.exclude);
    names = selected_names(*in, selector);
    require_selection(names, *in);
  });
  const auto layout = layout_of(*in, names, job.output);
  ChunkedJob chunked(ranks, "convert", layout);
  const Metadata metadata =
      output_metadata("convert", {{"in", input_name(job.in)}, {"output", output_options_json(job.output)}}, {{"input", in.get()}});
  chunked.write(job.out, metadata, job.output, [&](const Piece& chunk, const TensorInfo& out, TensorWriter& writer, NonFiniteResults& nonfinite) {
    copy_chunk(*in, out, chunk, writer, job.output.allow_nonfinite, nonfinite);
  });
  chunked.commit(job.in);
  const JobSummary summary = chunked.whole_output_summary();
  if (ranks.is_root())
    log << "convert: " << layout.size() << " tensors, " << summary.bytes_written << " bytes, written to " << job.out
        << rank_note(ranks) << "\n";
  return summary;
}

}  // namespace gradfix
