#include "sharded_decoder.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "gradfix/comm/backend.hpp"
#include "gradfix/core/error.hpp"
#include "gradfix/signs/statistics.hpp"

namespace gradfix {
namespace {

// Samples that go through the model together. Fixed, and the groups round-robin to the ranks,
// so each group is computed the same way at any number of ranks: the votes do not depend on P.
constexpr long long kSamplesPerGroup = 8;

std::vector<int64_t> shape_of(const TensorInfo& tensor) { return {tensor.shape.begin(), tensor.shape.end()}; }

// Running statistics of the tensors of one step (a layer, the head, the embedding), over this
// rank's samples: vote counts (int32) or sums of -gradients (float64), full shape, on the CPU.
class Accumulators {
 public:
  Accumulators(bool votes, const torch::Device& device) : votes_(votes), device_(device) {}

  torch::Tensor& of(const std::string& name, const std::vector<int64_t>& shape) {
    auto found = values_.find(name);
    if (found == values_.end())
      found = values_.emplace(name, torch::zeros(shape, torch::TensorOptions().dtype(votes_ ? torch::kInt32 : torch::kFloat64).device(device_))).first;
    return found->second;
  }
  // Adds the per-sample gradients `per_sample` [n, ...] of rows [begin, begin + rows) (dim 0 of
  // the parameter) to the statistics.
  void add(const std::string& name, const std::vector<int64_t>& shape, const torch::Tensor& per_sample, int64_t begin = 0) {
    torch::Tensor target = of(name, shape);
    if (per_sample.dim() > 1 && per_sample.size(1) != target.size(0)) target = target.slice(0, begin, begin + per_sample.size(1));
    if (votes_) target.add_(torch::sign(-per_sample).sum(0).to(torch::kInt32));
    else target.add_((-per_sample).to(torch::kFloat64).sum(0));
  }
  // Adds per-sample gradients of a few rows: `rows` [k] row indices, `values` [k, H] (one sample).
  void add_rows(const std::string& name, const std::vector<int64_t>& shape, const torch::Tensor& rows, const torch::Tensor& values) {
    torch::Tensor& target = of(name, shape);
    if (votes_) target.index_add_(0, rows, torch::sign(-values).to(torch::kInt32));
    else target.index_add_(0, rows, (-values).to(torch::kFloat64));
  }
  std::map<std::string, torch::Tensor>& values() { return values_; }

 private:
  bool votes_;
  torch::Device device_;
  std::map<std::string, torch::Tensor> values_;
};

struct Group {
  std::vector<long long> samples;
  TokenBatch batch;
};

// The per-sample gradient rows of an embedding (sample i: the rows of its token ids), added to
// `dense` rows [begin, end) when given (a tied head), else straight into the statistics.
void embedding_rows(const torch::Tensor& ids, const torch::Tensor& gradient, int64_t sample, torch::Tensor* dense, int64_t begin, int64_t end,
                    Accumulators* accumulators, const std::string& name, const std::vector<int64_t>& shape) {
  const torch::Tensor sample_ids = ids[sample];
  const torch::Tensor sample_gradient = gradient[sample];
  if (dense != nullptr) {
    const torch::Tensor inside = sample_ids.ge(begin).logical_and(sample_ids.lt(end)).nonzero().squeeze(1);
    if (inside.numel() == 0) return;
    (*dense)[sample].index_add_(0, sample_ids.index_select(0, inside) - begin, sample_gradient.index_select(0, inside));
    return;
  }
  // Rows of one sample summed per distinct token: that sample's gradient of each touched row.
  const auto [unique, inverse] = torch::_unique(sample_ids, true, true);
  const torch::Tensor rows = torch::zeros({unique.size(0), sample_gradient.size(1)}, sample_gradient.options()).index_add_(0, inverse, sample_gradient);
  accumulators->add_rows(name, shape, unique, rows);
}

// Per-sample gradients of a Linear weight from its recorded input X [n, T, in] and output
// gradient G [n, T, out], in blocks of rows sized to the memory bound; `tied` adds the
// embedding's rows of the same tensor (a tied head) before the signs are taken.
void linear_weight(const std::string& name, const std::vector<int64_t>& shape, const torch::Tensor& input, const torch::Tensor& output_gradient,
                   long long product_bytes, Accumulators& accumulators, const torch::Tensor* tied_ids = nullptr,
                   const torch::Tensor* tied_gradient = nullptr) {
  const int64_t n = input.size(0), out = output_gradient.size(2), in = input.size(2);
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(out, product_bytes / std::max<int64_t>(1, n * in * 4)));
  const torch::Tensor g = output_gradient.transpose(1, 2);  // [n, out, T]
  for (int64_t begin = 0; begin < out; begin += rows) {
    const int64_t end = std::min(out, begin + rows);
    torch::Tensor per_sample = torch::bmm(g.slice(1, begin, end), input);  // [n, rows, in]
    if (tied_ids != nullptr)
      for (int64_t i = 0; i < n; ++i) embedding_rows(*tied_ids, *tied_gradient, i, &per_sample, begin, end, nullptr, name, shape);
    accumulators.add(name, shape, per_sample, begin);
  }
}

// Statistics from the captures of one recomputation (fast method).
void add_captures(const std::vector<Capture>& captures, const std::map<std::string, std::vector<int64_t>>& shapes, long long product_bytes,
                  Accumulators& accumulators) {
  for (const auto& capture : captures) {
    const auto& shape = shapes.at(capture.parameter);
    const torch::Tensor gradient = capture.output.grad();
    GRADFIX_CHECK(gradient.defined(), "no gradient reached the output of " + capture.parameter);
    switch (capture.kind) {
      case Capture::Kind::kLinearWeight:
        linear_weight(capture.parameter, shape, capture.input, gradient, product_bytes, accumulators);
        break;
      case Capture::Kind::kBias: accumulators.add(capture.parameter, shape, gradient.sum(1)); break;
      case Capture::Kind::kScale: accumulators.add(capture.parameter, shape, (gradient * capture.input).sum(1)); break;
      case Capture::Kind::kEmbedding:
        for (int64_t i = 0; i < capture.input.size(0); ++i)
          embedding_rows(capture.input, gradient, i, nullptr, 0, 0, &accumulators, capture.parameter, shape);
        break;
    }
  }
}

}  // namespace

ShardedWeights::ShardedWeights(const DecoderConfig& config, const JobContext& context)
    : context_(context), layout_(decoder_layout(config)), plan_(layout_, context.size()) {
  for (std::size_t i = 0; i < layout_.size(); ++i) index_[layout_[i].name] = i;
  const auto reader = open_reader(config.directory);
  for (const auto& piece : plan_.pieces(context.rank())) mine_.push_back(reader->read_f32(layout_[piece.tensor].name, piece.begin, piece.count));
}

long long ShardedWeights::held_elements() const {
  long long total = 0;
  for (const auto& values : mine_) total += static_cast<long long>(values.size());
  return total;
}

Parameters ShardedWeights::gather(const std::vector<std::string>& names, const torch::Device& device) const {
  std::set<std::size_t> wanted;
  for (const auto& name : names) {
    const auto found = index_.find(name);
    GRADFIX_CHECK(found != index_.end(), "no tensor '" + name + "' in the decoder's layout");
    wanted.insert(found->second);
  }
  // Every rank's pieces of these tensors, packed in plan order and padded to the longest: one
  // all-gather brings every piece to every rank.
  const int ranks = context_.size();
  std::vector<long long> counts(static_cast<std::size_t>(ranks), 0);
  for (int r = 0; r < ranks; ++r)
    for (const auto& piece : plan_.pieces(r))
      if (wanted.count(piece.tensor)) counts[static_cast<std::size_t>(r)] += piece.count;
  const long long longest = *std::max_element(counts.begin(), counts.end());
  std::vector<float> send(static_cast<std::size_t>(longest), 0.0f);
  long long offset = 0;
  const auto& my_pieces = plan_.pieces(context_.rank());
  for (std::size_t k = 0; k < my_pieces.size(); ++k) {
    if (!wanted.count(my_pieces[k].tensor)) continue;
    std::memcpy(send.data() + offset, mine_[k].data(), mine_[k].size() * sizeof(float));
    offset += my_pieces[k].count;
  }
  std::vector<float> received(static_cast<std::size_t>(longest * ranks));
  if (longest > 0) context_.host().allgather(send.data(), received.data(), static_cast<std::size_t>(longest), DType::kF32);
  std::map<std::size_t, std::vector<float>> full;
  for (std::size_t tensor : wanted) full[tensor].assign(static_cast<std::size_t>(layout_[tensor].numel()), 0.0f);
  for (int r = 0; r < ranks; ++r) {
    long long cursor = static_cast<long long>(r) * longest;
    for (const auto& piece : plan_.pieces(r)) {
      if (!wanted.count(piece.tensor)) continue;
      std::memcpy(full[piece.tensor].data() + piece.begin, received.data() + cursor, static_cast<std::size_t>(piece.count) * sizeof(float));
      cursor += piece.count;
    }
  }
  Parameters parameters;
  for (auto& [tensor, values] : full)
    parameters[layout_[tensor].name] = torch::from_blob(values.data(), shape_of(layout_[tensor]), torch::kFloat32).to(device, false, true);
  return parameters;
}

ShardedStatistics sharded_decoder_statistics(const Decoder& decoder, const ShardedWeights& weights, const TokenData& data,
                                             const DecoderSignsOptions& options, const JobContext& context, const torch::Device& device) {
  const DecoderConfig& config = decoder.config();
  const bool votes = options.sign_mode == "max";
  const bool loop = options.method == "loop";
  const long long group_size = loop ? 1 : kSamplesPerGroup;
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& tensor : weights.layout()) shapes[tensor.name] = shape_of(tensor);

  ShardedStatistics result;
  result.samples = data.samples;
  for (const auto& piece : weights.plan().pieces(context.rank())) result.pieces.emplace_back(static_cast<std::size_t>(piece.count), 0.0f);
  // Sums a step's statistics over the ranks, in the narrowest type that holds them, and keeps
  // the pieces this rank owns.
  const DType reduce_type = votes ? vote_count_dtype(data.samples, context.stats()) : DType::kF64;
  auto finish = [&](Accumulators& accumulators, const std::vector<std::string>& names) {
    for (const auto& name : names) {
      const auto& shape = shapes.at(name);
      const torch::Tensor values = accumulators.of(name, shape).to(torch::kCPU).contiguous();
      const auto count = static_cast<std::size_t>(values.numel());
      std::vector<double> wide(count);
      if (votes) {
        const torch::Tensor as_float = values.to(torch::kFloat32).contiguous();
        std::vector<unsigned char> narrow(count * dtype_size(reduce_type));
        convert_from_f32(reduce_type, as_float.data_ptr<float>(), narrow.data(), count);
        allreduce_statistics(context.stats(), narrow.data(), static_cast<long long>(count), reduce_type);
        std::vector<float> summed(count);
        convert_to_f32(reduce_type, narrow.data(), summed.data(), count);
        wide.assign(summed.begin(), summed.end());
      } else {
        std::memcpy(wide.data(), values.data_ptr<double>(), count * sizeof(double));
        allreduce_statistics(context.stats(), wide.data(), static_cast<long long>(count), DType::kF64);
      }
      const auto& my_pieces = weights.plan().pieces(context.rank());
      for (std::size_t k = 0; k < my_pieces.size(); ++k) {
        if (weights.layout()[my_pieces[k].tensor].name != name) continue;
        for (long long i = 0; i < my_pieces[k].count; ++i)
          result.pieces[k][static_cast<std::size_t>(i)] = static_cast<float>(wide[static_cast<std::size_t>(my_pieces[k].begin + i)]);
      }
      accumulators.values().erase(name);
    }
  };

  // This rank's groups of samples.
  std::vector<Group> groups;
  const long long total_groups = (data.samples + group_size - 1) / group_size;
  for (long long g = context.rank(); g < total_groups; g += context.size()) {
    Group group;
    for (long long n = g * group_size; n < std::min(data.samples, (g + 1) * group_size); ++n) group.samples.push_back(n);
    group.batch = token_batch(data.subset(group.samples), device);
    groups.push_back(std::move(group));
  }

  // Forward, keeping each layer's input: boundary[l][g].
  std::vector<std::vector<torch::Tensor>> boundary(static_cast<std::size_t>(config.layers + 1));
  {
    torch::NoGradGuard no_gradients;
    const Parameters embedding = weights.gather({"model.embed_tokens.weight"}, device);
    for (const auto& group : groups) boundary[0].push_back(decoder.embed(embedding, group.batch.input_ids));
    for (long long l = 0; l < config.layers; ++l) {
      const Parameters layer = weights.gather(layer_parameter_names(config, l), device);
      for (std::size_t g = 0; g < groups.size(); ++g)
        boundary[static_cast<std::size_t>(l + 1)].push_back(decoder.layer(l, layer, boundary[static_cast<std::size_t>(l)][g], groups[g].batch.attention_mask));
    }
  }

  auto make_leaves = [&](Parameters& parameters) {
    if (!loop) return;
    for (auto& [name, tensor] : parameters) tensor.requires_grad_(true);
  };
  // Loop method: the parameters' own gradients after one sample's backward pass.
  auto add_leaf_gradients = [&](Parameters& parameters, Accumulators& accumulators, const std::set<std::string>& skip) {
    for (auto& [name, tensor] : parameters) {
      if (skip.count(name)) continue;
      if (tensor.grad().defined()) {
        accumulators.add(name, shapes.at(name), tensor.grad().unsqueeze(0));
        tensor.mutable_grad().reset();
      } else {
        accumulators.of(name, shapes.at(name));
      }
    }
  };

  // The head: final norm and lm_head (or the tied embedding), from the last boundary.
  std::vector<torch::Tensor> incoming(groups.size());
  Accumulators accumulators(votes, device);
  const std::string head = decoder.head_name();
  const bool tied = config.tie_word_embeddings;
  std::vector<Capture> tied_head(groups.size());        // fast: the head's X and G, kept for the embedding
  std::vector<torch::Tensor> tied_head_gradient(groups.size());  // loop: the head's gradient of the tied tensor
  {
    Parameters parameters = weights.gather({"model.norm.weight", head}, device);
    // Only this rank sees its samples: a non-finite loss (weights with NaN or Inf) must stop
    // every rank before the collective steps below.
    context.agree([&] {
      torch::NoGradGuard no_gradients;
      for (std::size_t g = 0; g < groups.size(); ++g) {
        const torch::Tensor losses = per_sample_losses(decoder.head(parameters, boundary.back()[g]), groups[g].batch.labels);
        for (std::size_t i = 0; i < groups[g].samples.size(); ++i)
          if (!std::isfinite(losses[static_cast<int64_t>(i)].item<double>()))
            throw InputError(data.source + ": selected sample " + std::to_string(groups[g].samples[i]) + " has a loss of " +
                             std::to_string(losses[static_cast<int64_t>(i)].item<double>()) + ": check the model's weights");
      }
    });
    make_leaves(parameters);
    for (std::size_t g = 0; g < groups.size(); ++g) {
      GradientRecorder recorder;
      const torch::Tensor hidden = boundary.back()[g].detach().requires_grad_(true);
      const torch::Tensor logits = decoder.head(parameters, hidden, loop ? nullptr : &recorder);
      per_sample_losses(logits, groups[g].batch.labels).sum().backward();
      incoming[g] = hidden.grad();
      if (loop) {
        if (tied) tied_head_gradient[g] = parameters.at(head).grad().clone();
        add_leaf_gradients(parameters, accumulators, tied ? std::set<std::string>{head} : std::set<std::string>{});
        if (tied) parameters.at(head).mutable_grad().reset();
        continue;
      }
      std::vector<Capture> captures;
      for (const auto& capture : recorder.captures()) {
        if (tied && capture.parameter == head) {
          tied_head[g] = {capture.parameter, capture.kind, capture.input, capture.output.grad()};
          continue;
        }
        captures.push_back(capture);
      }
      add_captures(captures, shapes, options.product_bytes, accumulators);
    }
    finish(accumulators, tied ? std::vector<std::string>{"model.norm.weight"} : std::vector<std::string>{"model.norm.weight", head});
    boundary.pop_back();
  }

  // The layers, last first: recompute from the kept input, backpropagate the incoming gradient.
  for (long long l = config.layers - 1; l >= 0; --l) {
    const std::vector<std::string> names = layer_parameter_names(config, l);
    Parameters parameters = weights.gather(names, device);
    make_leaves(parameters);
    for (std::size_t g = 0; g < groups.size(); ++g) {
      GradientRecorder recorder;
      const torch::Tensor input = boundary.back()[g].detach().requires_grad_(true);
      const torch::Tensor output = decoder.layer(l, parameters, input, groups[g].batch.attention_mask, loop ? nullptr : &recorder);
      torch::autograd::backward({output}, {incoming[g]});
      incoming[g] = input.grad();
      if (loop) add_leaf_gradients(parameters, accumulators, {});
      else add_captures(recorder.captures(), shapes, options.product_bytes, accumulators);
    }
    finish(accumulators, names);
    boundary.pop_back();
  }

  // The embedding: its output gradient is what reached the first layer's input.
  const std::string embedding = "model.embed_tokens.weight";
  const auto& embedding_shape = shapes.at(embedding);
  Parameters embedding_parameters;
  if (loop) {  // gathered once on every rank: a gather is collective, and ranks hold different numbers of groups
    embedding_parameters = weights.gather({embedding}, device);
    make_leaves(embedding_parameters);
  }
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const torch::Tensor& ids = groups[g].batch.input_ids;
    if (loop) {
      Parameters& parameters = embedding_parameters;
      torch::autograd::backward({torch::embedding(parameters.at(embedding), ids)}, {incoming[g]});
      if (tied) parameters.at(embedding).mutable_grad().add_(tied_head_gradient[g]);
      add_leaf_gradients(parameters, accumulators, {});
    } else if (tied) {
      linear_weight(embedding, embedding_shape, tied_head[g].input, tied_head[g].output, options.product_bytes, accumulators, &ids, &incoming[g]);
    } else {
      for (int64_t i = 0; i < ids.size(0); ++i) embedding_rows(ids, incoming[g], i, nullptr, 0, 0, &accumulators, embedding, embedding_shape);
    }
  }
  accumulators.of(embedding, embedding_shape);
  finish(accumulators, {embedding});
  return result;
}

}  // namespace gradfix
