// gradfix generate: synthetic checkpoints (shapes, an MLP, or like another checkpoint plus noise).
#include "file_jobs.hpp"

namespace gradfix {
using namespace file_jobs;

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

void GenerateJob::validate() const {
  require_given(out, "--out");
  if (!std::isfinite(noise) || !std::isfinite(like_scale)) throw InputError("--noise and --like-scale must be finite");
  if (!layout.empty() && !like.empty()) throw InputError("gradfix generate: give exactly one of --mlp, --shapes and --like");
}

JobSummary run_generate(const GenerateJob& job, std::ostream& log, const JobContext& context) {
  const Ranks ranks(context);
  Reader like;
  std::vector<TensorInfo> layout = job.layout;
  ranks.agree([&] {
    job.validate();
    if (!job.like.empty()) {
      like = open_reader(job.like);
      layout.clear();
      for (const auto& tensor : like->tensors()) layout.push_back(output_info(tensor, job.output));
    }
    if (layout.empty()) throw InputError("generate needs --mlp, --shapes or --like");
  });
  ChunkedJob chunked(ranks, "generate", layout);
  nlohmann::json options = {{"like", input_name(job.like)}, {"like_scale", job.like_scale}, {"noise", job.noise}, {"seed", job.seed},
                            {"output", output_options_json(job.output)}};
  const Metadata metadata = output_metadata("generate", options, like ? Inputs{{"like", like.get()}} : Inputs{});
  chunked.write(job.out, metadata, job.output, [&](const Piece& chunk, const TensorInfo& tensor, TensorWriter& writer, NonFiniteResults& nonfinite) {
    // Integer tensors of the model (position ids, buffers) are not weights: kept as they are.
    if (like && !dtype_is_float(tensor.dtype)) {
      copy_chunk(*like, tensor, chunk, writer, true, nonfinite);
      return;
    }
    std::vector<float> values(static_cast<std::size_t>(chunk.count), 0.0f);
    if (like) {
      values = load(*like, tensor.name, chunk.begin, chunk.count, job.output.allow_nonfinite);
      for (auto& value : values) value = static_cast<float>(job.like_scale * value);
    }
    const std::uint64_t key = tensor_key_of(tensor.name);
    for (long long i = 0; i < chunk.count; ++i)
      values[static_cast<std::size_t>(i)] += static_cast<float>(job.noise * gaussian_at(job.seed, key, chunk.begin + i));
    writer.write_f32(tensor.name, chunk.begin, values.data(), chunk.count);
  });
  chunked.commit(job.like);
  const JobSummary summary = chunked.whole_output_summary();
  if (ranks.is_root())
    log << "generate: " << layout.size() << " tensors, " << summary.elements << " elements, written to " << job.out
        << rank_note(ranks) << "\n";
  return summary;
}

}  // namespace gradfix
