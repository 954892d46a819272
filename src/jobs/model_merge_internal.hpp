#pragma once
// Internal to the jobs layer: what the two halves of `gradfix merge --config` share.
// model_merge.cpp reads and checks the inputs and runs the sums of deltas; model_merge_vectors.cpp
// runs the methods that take each tensor as one vector (slerp, nuslerp, nearswap, model_stock,
// multislerp).
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "file_jobs.hpp"
#include "gradfix/io/exact_sum.hpp"

namespace gradfix::file_jobs {

struct ModelMergeInputs {
  std::vector<Reader> sources;  // with slices: the models the parts below are stacked from
  Reader base;  // the base model (linear without one: the first model, for the layout and copies)
  std::vector<Reader> models;
  std::vector<Reader> signs;
  std::vector<std::string> names;  // the merged tensors: the base's selected float tensors
  std::set<std::string> merged;    // the same, for lookups
  // Each merged tensor's weights, densities, gammas, t and lambda (ModelMergeJob::parameters_for
  // at its layer fraction): the same for every tensor unless the configuration varies them.
  std::map<std::string, MergeParameters> parameters;
  const MergeParameters& of(const std::string& name) const { return parameters.at(name); }
  CarriedFileChanges files;  // config.json's counts, the tokenizer and chat template where they change
};

// mergekit's tokenizer_source / tokenizer: section: replaces `in`'s base and models by readers whose
// vocabulary tensors (embeddings and head) are aligned to the output's vocabulary, and sets the
// output's tokenizer files and config.json's vocab_size in `in.files`. Also the chat template.
void align_vocabularies(const ModelMergeJob& job, ModelMergeInputs& in);
void set_chat_template(const ModelMergeJob& job, ModelMergeInputs& in);
// Without alignment: an embedding or head whose row count differs between the base and a model
// is refused, saying how to align the vocabularies.
void require_same_vocabulary(const ModelMergeInputs& in);

// A model presented through another: its tensors, each as `change` alters it (a dtype, a row
// count), read through the subclass's read_raw; everything else forwarded. The merge's reader
// adapters (dtype casts, aligned vocabularies, masked deltas) are these.
class WrappedReader : public TensorReader {
 public:
  WrappedReader(std::unique_ptr<TensorReader> own, const std::function<void(TensorInfo&)>& change) : own_(std::move(own)) {
    for (TensorInfo tensor : own_->tensors()) {
      change(tensor);
      tensors_.push_back(std::move(tensor));
    }
  }
  const std::string& path() const override { return own_->path(); }
  const std::vector<TensorInfo>& tensors() const override { return tensors_; }
  const Metadata& metadata() const override { return own_->metadata(); }
  const std::vector<std::pair<std::string, std::string>>& unreadable() const override { return own_->unreadable(); }

 protected:
  const TensorReader& own() const { return *own_; }

 private:
  std::unique_ptr<TensorReader> own_;
  std::vector<TensorInfo> tensors_;
};

// The parts of a merge with slices, each one model stacked from its sources' layers under the
// output's names (stack_slices).
struct StackedModels {
  std::vector<Reader> sources;  // each source model, opened once
  Reader base;                  // the base; without one, the first model again (the layout)
  std::vector<Reader> models;   // each model of the job
  // Each output tensor's slice and mergekit's layer fraction within it (0 outside the layers).
  std::map<std::string, std::pair<std::size_t, double>> positions;
  long long layers = 0;  // the output's layer count
};
StackedModels stack_slices(const ModelMergeJob& job);
// The slices as the metadata records them: "name[begin:end]" per source.
nlohmann::json slices_json(const ModelMergeJob& job);

// Where a tensor's name holds its layer number ("model.layers.7.mlp.up_proj.weight",
// "transformer.h.7.attn.c_attn.weight": a name part "layers.N", "h.N", "blocks.N" or "layer.N"):
// the stack's prefix ("model.layers."), the number's position and length; layer -1 outside the
// layers (or a number of more than 9 digits).
struct LayerName {
  std::string stack;
  std::size_t at = 0, length = 0;
  long long layer = -1;
};
LayerName layer_name(const std::string& name);

// mergekit's layer fraction of each tensor, for per-layer parameter lists: layer / (layers - 1)
// for a tensor of a numbered layer (a name part "layers.N", "h.N", "blocks.N" or "layer.N"),
// 1 where there is one layer, 0 for every other tensor (embeddings, final norm, head). `layers`
// is one more than the largest layer number among `names`.
std::map<std::string, double> layer_fractions(const std::vector<std::string>& names);

// This rank's chunks of each merged tensor, for the passes before the merge (DARE's norms, TIES's
// trims); a merged tensor split across ranks is listed even where this rank holds none of it, so
// that every rank joins its reductions.
using ChunksByTensor = std::map<std::size_t, std::vector<Piece>>;
ChunksByTensor merged_tensors_here(const ChunkedJob& chunked, const std::set<std::string>& merged);

// Writes every tensor: those not merged copied from the base, the merged ones chunk by chunk from
// `merged(chunk)`, rounded once to the output type.
template <typename Merged>
void write_merged(const ModelMergeJob& job, const ModelMergeInputs& in, ChunkedJob& chunked, const Metadata& metadata, long long& elements,
                  const Merged& merged) {
  chunked.write(job.out, metadata, job.output, [&](const Piece& chunk, const TensorInfo& out, TensorWriter& writer, NonFiniteResults& nonfinite) {
    if (!in.merged.count(out.name)) {
      copy_chunk(*in.base, out, chunk, writer, true, nonfinite);
      return;
    }
    const std::vector<double> result = merged(chunk);
    store(writer, out, chunk.begin, result.data(), chunk.count, nonfinite);
    elements += chunk.count;
  });
}

// A tensor's exact sum over this rank's chunks, completed over the ranks when the tensor is split
// (collective then: every rank with a piece of it calls).
double tensor_total(const Ranks& ranks, const ChunkedJob& chunked, std::size_t tensor, ExactSum& sum);
// The same for many sums of one tensor at once.
std::vector<double> tensor_totals(const Ranks& ranks, const ChunkedJob& chunked, std::size_t tensor, std::vector<ExactSum>& sums);

// The methods whose combination is not a sum of deltas, in float64 when `f64` (an F64 input or
// output) else float32: every tensor computed and written through `chunked`. Returns the number
// of merged entries this rank wrote.
long long merge_whole_tensors(const ModelMergeJob& job, const Ranks& ranks, const ModelMergeInputs& in, ChunkedJob& chunked,
                              const Metadata& metadata, bool f64);

}  // namespace gradfix::file_jobs
