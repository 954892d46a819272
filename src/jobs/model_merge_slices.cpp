// gradfix merge --config with slices (mergekit's layer stacking): each part of the merge (the base,
// each model) is presented as one model assembled from its sources' layers, renamed to the
// output's layer numbers, so that every merge method runs on it unchanged and reads each source
// tensor where it lies.
#include <functional>
#include <unordered_map>

#include "model_merge_internal.hpp"

namespace gradfix::file_jobs {
namespace {

std::string renumbered(const std::string& name, long long layer) {
  const LayerName where = layer_name(name);
  return name.substr(0, where.at) + std::to_string(layer) + name.substr(where.at + where.length);
}

// Outside the layers, the embeddings come before them (mergekit's pre-weights, taken from the
// first slice's sources) and everything else after (the final norm and the head: post-weights,
// from the last slice's). gradfix tells them apart by name, as no architecture table is needed.
bool before_layers(const std::string& name) {
  return name.find("embed") != std::string::npos || name.find("wte.") != std::string::npos || name.find("wpe.") != std::string::npos;
}

// One source model's layers: how many, and its tensors in file order, by layer (-1: outside).
struct SourceLayers {
  const TensorReader* reader = nullptr;
  long long count = 0;
  std::map<long long, std::vector<std::string>> names;
};

SourceLayers source_layers(const TensorReader& reader) {
  SourceLayers out;
  out.reader = &reader;
  std::string stack;
  for (const auto& tensor : reader.tensors()) {
    const LayerName where = layer_name(tensor.name);
    if (where.layer >= 0) {
      if (!stack.empty() && where.stack != stack)
        throw InputError(reader.path() + ": slices need one stack of layers, and this model has two (" + escaped_name(stack) + "N and " +
                         escaped_name(where.stack) + "N); merge it without slices");
      stack = where.stack;
      out.count = std::max(out.count, where.layer + 1);
    }
    out.names[where.layer].push_back(tensor.name);
  }
  return out;
}

// A model assembled from other models' tensors under new names.
class StackedReader : public TensorReader {
 public:
  StackedReader(std::string path, const Metadata& metadata) : path_(std::move(path)), metadata_(metadata) {}

  void add(const std::string& name, const TensorReader& source, const std::string& source_name) {
    TensorInfo info = source.info(source_name);
    info.name = name;
    tensors_.push_back(std::move(info));
    parts_.emplace(name, Part{&source, source_name});
  }

  const std::string& path() const override { return path_; }
  const std::vector<TensorInfo>& tensors() const override { return tensors_; }
  const Metadata& metadata() const override { return metadata_; }
  void read_raw(const std::string& name, long long begin, long long count, void* target) const override {
    const auto part = parts_.find(name);
    if (part == parts_.end()) throw InputError(path_ + ": no tensor " + escaped_name(name));
    part->second.source->read_raw(part->second.name, begin, count, target);
  }

 private:
  struct Part {
    const TensorReader* source;
    std::string name;
  };
  std::string path_;
  Metadata metadata_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, Part> parts_;
};

std::string describe(const MergeSliceSource& source) {
  return input_name(source.model) + "[" + std::to_string(source.begin) + ":" + std::to_string(source.end) + "]";
}

}  // namespace

StackedModels stack_slices(const ModelMergeJob& job) {
  StackedModels out;
  std::map<std::string, SourceLayers> sources;
  auto layers_of = [&](const MergeSliceSource& source, std::size_t slice) -> const SourceLayers& {
    auto found = sources.find(source.model);
    if (found == sources.end()) {
      out.sources.push_back(open_reader(source.model));
      found = sources.emplace(source.model, source_layers(*out.sources.back())).first;
    }
    const SourceLayers& layers = found->second;
    if (source.end > layers.count)
      throw InputError(layers.reader->path() + ": slices[" + std::to_string(slice) + "] takes layer_range [" + std::to_string(source.begin) + ", " +
                       std::to_string(source.end) + "] of a model with " + std::to_string(layers.count) + " layers");
    return layers;
  };
  const bool with_base = !job.slices.front().base.model.empty();
  // The parts of the merge: -1 the base (where there is one), then each model.
  auto source_of = [&](const MergeSlice& slice, int part) -> const MergeSliceSource& {
    return part < 0 ? slice.base : slice.models.at(static_cast<std::size_t>(part));
  };
  // The readers to make: the base's (without a base, a copy of the first model's, which gives
  // the layout and the copied tensors as it does without slices), then each model's.
  const int first = with_base ? -1 : 0;
  std::vector<int> roles = {first};
  for (int part = 0; part < static_cast<int>(job.models.size()); ++part) roles.push_back(part);
  std::vector<std::unique_ptr<StackedReader>> readers;
  for (const int part : roles) {
    std::string path;
    for (const auto& slice : job.slices) path += (path.empty() ? "" : " + ") + describe(source_of(slice, part));
    readers.push_back(std::make_unique<StackedReader>(path, layers_of(source_of(job.slices.front(), part), 0).reader->metadata()));
  }
  // Adds the output tensor `name` to every part, from tensor `source_name(part source)` of its
  // source in slice `slice`.
  auto add = [&](const std::string& name, std::size_t slice, const std::function<std::string(const MergeSliceSource&)>& source_name) {
    for (std::size_t r = 0; r < roles.size(); ++r) {
      const MergeSliceSource& source = source_of(job.slices[slice], roles[r]);
      const SourceLayers& layers = layers_of(source, slice);
      const std::string from = source_name(source);
      if (layers.reader->find(from) == nullptr)
        throw InputError(layers.reader->path() + ": no tensor " + escaped_name(from) + ", which slices[" + std::to_string(slice) +
                         "] needs for the output's " + escaped_name(name));
      readers[r]->add(name, *layers.reader, from);
    }
  };
  // The names follow the first part (the base, else the first model): the embeddings of the first
  // slice, each slice's layers renumbered, then the rest of the last slice.
  const std::size_t last = job.slices.size() - 1;
  const SourceLayers& opening = layers_of(source_of(job.slices.front(), first), 0);
  const auto outside = opening.names.find(-1);
  if (outside != opening.names.end())
    for (const auto& name : outside->second)
      if (before_layers(name)) {
        add(name, 0, [&](const MergeSliceSource&) { return name; });
        out.positions[name] = {0, 0.0};
      }
  long long next = 0;
  for (std::size_t s = 0; s < job.slices.size(); ++s) {
    const MergeSliceSource& lead = source_of(job.slices[s], first);
    const SourceLayers& layers = layers_of(lead, s);
    const long long count = lead.end - lead.begin;
    for (long long i = 0; i < count; ++i, ++next) {
      const auto found = layers.names.find(lead.begin + i);
      if (found == layers.names.end()) continue;
      for (const auto& name : found->second) {
        const std::string output = renumbered(name, next);
        add(output, s, [&](const MergeSliceSource& source) { return renumbered(name, source.begin + i); });
        // mergekit's t within a slice: i / (count - 1), 1 for a slice of one layer.
        out.positions[output] = {s, count > 1 ? static_cast<double>(i) / static_cast<double>(count - 1) : 1.0};
      }
    }
  }
  out.layers = next;
  const SourceLayers& closing = layers_of(source_of(job.slices[last], first), last);
  const auto after = closing.names.find(-1);
  if (after != closing.names.end())
    for (const auto& name : after->second)
      if (!before_layers(name)) {
        add(name, last, [&](const MergeSliceSource&) { return name; });
        out.positions[name] = {last, 0.0};
      }
  out.base = std::move(readers.front());
  for (std::size_t r = 1; r < readers.size(); ++r) out.models.push_back(std::move(readers[r]));
  return out;
}

nlohmann::json slices_json(const ModelMergeJob& job) {
  nlohmann::json slices = nlohmann::json::array();
  for (const auto& slice : job.slices) {
    nlohmann::json entry = {{"models", nlohmann::json::array()}};
    if (!slice.base.model.empty()) entry["base"] = describe(slice.base);
    for (const auto& source : slice.models) entry["models"].push_back(describe(source));
    slices.push_back(entry);
  }
  return slices;
}

}  // namespace gradfix::file_jobs
