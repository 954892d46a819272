#include "sharded_executor.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <set>

#include <torch/cuda.h>

#include "gradfix/dist/backend.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/dist/collective_output.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/dist/statistics.hpp"
#include "gradfix/dist/timing.hpp"
#include "sample_statistics.hpp"
#include "vocabulary_head.hpp"

namespace gradfix {
namespace {

// Samples that go through the model together. Fixed, and the groups round-robin to the ranks,
// so each group is computed the same way at any number of ranks: the votes do not depend on P.
constexpr long long kSamplesPerGroup = 8;

struct Group {
  std::vector<long long> samples;
  Batch batch;
};

// This rank's groups: samples in fixed groups of `size`, the groups round-robin over the ranks.
std::vector<Group> my_groups(const SampleSource& data, long long size, const JobContext& context, const torch::Device& device) {
  std::vector<Group> groups;
  const long long total = (data.samples + size - 1) / size;
  for (long long g = context.rank(); g < total; g += context.size()) {
    Group group;
    for (long long n = g * size; n < std::min(data.samples, (g + 1) * size); ++n) group.samples.push_back(n);
    group.batch = data.batch(group.samples, device);
    groups.push_back(std::move(group));
  }
  return groups;
}

// The rows of the model's token embedding that the tokens of every rank's groups use
// (ascending), with each group's inputs rewritten to index them (Batch::token_rows): the input
// stage then gathers these rows only, not the vocabulary. Collective.
std::vector<int64_t> use_token_rows(const LayeredModel& model, const ShardedWeights& weights, std::vector<Group>& groups,
                                    const JobContext& context) {
  const std::string name = model.token_embedding();
  if (name.empty()) return {};
  const int64_t vocabulary = weights.info(name).shape.at(0);
  std::vector<std::int8_t> used(static_cast<std::size_t>(vocabulary), 0);
  for (const auto& group : groups) {
    const torch::Tensor ids = group.batch.inputs.to(torch::kCPU, torch::kInt64).contiguous();
    const int64_t* values = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < ids.numel(); ++i) {
      GRADFIX_CHECK(values[i] >= 0 && values[i] < vocabulary, "token id " + std::to_string(values[i]) + " outside the vocabulary");
      used[static_cast<std::size_t>(values[i])] = 1;
    }
  }
  context.host().allreduce(used.data(), used.data(), used.size(), DType::kI8, ReduceOp::kMax);
  std::vector<int64_t> rows;
  torch::Tensor index = torch::full({vocabulary}, -1, torch::kInt64);
  int64_t* position = index.data_ptr<int64_t>();
  for (int64_t v = 0; v < vocabulary; ++v)
    if (used[static_cast<std::size_t>(v)] != 0) {
      position[v] = static_cast<int64_t>(rows.size());
      rows.push_back(v);
    }
  const torch::Tensor token_rows = torch::tensor(rows, torch::kInt64);
  for (auto& group : groups) {
    const torch::Tensor& ids = group.batch.inputs;
    group.batch.inputs = index.to(ids.device()).index_select(0, ids.reshape({-1}).to(torch::kInt64)).view_as(ids);
    group.batch.token_rows = token_rows;
  }
  return rows;
}

// The input stage's tensors, the token embedding as the rows `token_rows` only.
Parameters gather_input(const LayeredModel& model, const ShardedWeights& weights, const std::vector<int64_t>& token_rows,
                        const torch::Device& device) {
  const std::string embedding = model.token_embedding();
  std::vector<std::string> names;
  for (const auto& name : model.input_names())
    if (name != embedding) names.push_back(name);
  Parameters parameters = weights.gather(names, device);
  if (!embedding.empty()) parameters[embedding] = weights.gather_rows(embedding, token_rows, device);
  return parameters;
}

// The output stage's tensors but a vocabulary head's weight, which travels block by block.
std::vector<std::string> feature_names(const LayeredModel& model) {
  std::vector<std::string> names;
  for (const auto& name : model.output_names())
    if (model.vocabulary_head() == nullptr || name != model.vocabulary_head()->weight) names.push_back(name);
  return names;
}

// The blocks of the model's vocabulary head for these groups: sized to the job's buffer bound
// for the data's sequence length (the largest over the ranks, so every rank cuts alike).
VocabularyBlocks head_blocks(const LayeredModel& model, const ShardedWeights& weights, const std::vector<Group>& groups,
                             const JobContext& context) {
  const TensorInfo& head = weights.info(model.vocabulary_head()->weight);
  long long positions = 0;
  for (const auto& group : groups) positions = std::max<long long>(positions, group.batch.inputs.size(1));
  context.host().allreduce(&positions, &positions, 1, DType::kI64, ReduceOp::kMax);
  return vocabulary_blocks(head.shape.at(0), head.numel() / head.shape.at(0), kSamplesPerGroup, positions, context.chunk_elements);
}

// Rows [begin, end) as a list.
std::vector<int64_t> row_range(int64_t begin, int64_t end) {
  std::vector<int64_t> rows(static_cast<std::size_t>(end - begin));
  std::iota(rows.begin(), rows.end(), begin);
  return rows;
}

// One StreamingLogits per group after every block of the head: the groups' log-sum-exp, losses
// and predictions. Collective.
std::vector<StreamingLogits> scan_head(const LayeredModel& model, const ShardedWeights& weights, const VocabularyBlocks& blocks,
                                       const std::vector<torch::Tensor>& features, const std::vector<torch::Tensor>& next_tokens,
                                       const torch::Device& device) {
  torch::NoGradGuard no_gradients;
  const VocabularyHead& head = *model.vocabulary_head();
  std::vector<StreamingLogits> streams;
  for (const auto& tokens : next_tokens) streams.emplace_back(tokens);
  Pending<torch::Tensor> next = weights.gather_rows_ahead(head.weight, row_range(blocks.begin(0), blocks.end(0)), device);
  for (int64_t b = 0; b < blocks.count(); ++b) {
    const torch::Tensor weight = next.take();
    if (b + 1 < blocks.count()) next = weights.gather_rows_ahead(head.weight, row_range(blocks.begin(b + 1), blocks.end(b + 1)), device);
    for (std::size_t g = 0; g < features.size(); ++g) streams[g].add(block_logits(head, features[g], weight), blocks.begin(b));
  }
  return streams;
}

// The forward pass without gradients, one gathered layer at a time. Returns each layer's input
// per group and, last, the final hidden states ([layers + 1][group]); with `keep_inputs` false
// only the final hidden states are kept (entry 0).
std::vector<std::vector<torch::Tensor>> forward_groups(const LayeredModel& model, const ShardedWeights& weights, const std::vector<Group>& groups,
                                                       const std::vector<int64_t>& token_rows, const torch::Device& device, bool keep_inputs) {
  const long long layers = model.layers();
  torch::NoGradGuard no_gradients;
  std::vector<std::vector<torch::Tensor>> boundary(static_cast<std::size_t>(keep_inputs ? layers + 1 : 1));
  // Each layer's gather starts while the stage before it computes (one stage ahead).
  Pending<Parameters> next;
  {  // the input stage's tensors are dropped before the second layer is gathered
    const Parameters input = gather_input(model, weights, token_rows, device);
    if (layers > 0) next = weights.gather_ahead(model.layer_names(0), device);
    for (const auto& group : groups) boundary[0].push_back(model.input(input, group.batch));
  }
  for (long long l = 0; l < layers; ++l) {
    const Parameters layer = next.take();
    if (l + 1 < layers) next = weights.gather_ahead(model.layer_names(l + 1), device);
    const std::size_t in = keep_inputs ? static_cast<std::size_t>(l) : 0, out = keep_inputs ? in + 1 : 0;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      torch::Tensor next = model.layer(l, layer, boundary[in][g], groups[g].batch);
      if (keep_inputs) boundary[out].push_back(std::move(next));
      else boundary[0][g] = std::move(next);
    }
  }
  return boundary;
}

}  // namespace

namespace {

torch::ScalarType scalar_type_of(DType dtype) {
  return dtype == DType::kI8 ? torch::kInt8 : dtype == DType::kI16 ? torch::kInt16 : dtype == DType::kI32 ? torch::kInt32 : torch::kFloat64;
}

// One few-shot statistics pass (sharded_statistics), stage by stage:
//   forward   every stage gathered in turn (a token embedding as the rows of the data's tokens
//             only), each layer's input kept (the boundaries)
//   output    without a vocabulary head (a classifier's few logits): per sample, whole. With
//             one: the features (final norm) of every group, then the head block by block
//             (vocabulary_head.hpp): a scan for each position's log-sum-exp, then a pass that
//             forms the gradient reaching the features and the head's per-sample products,
//             reduced block by block
//   layers    last first: recomputed from the kept boundary with autograd, the incoming gradient
//             backpropagated, per-sample statistics formed from the recorded captures
//   input     recomputed from the batch; a token embedding's statistics cover its used rows. A
//             head tied to the embedding makes its products last, in one more pass over its
//             blocks: each sample's embedding rows join its head block before the sign is taken.
// and after each stage its statistics are summed over the ranks, each rank keeping the pieces it
// owns.
class StatisticsPass {
 public:
  StatisticsPass(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data, const ShardedSignsOptions& options,
                 const JobContext& context, const torch::Device& device)
      : model_(model), weights_(weights), data_(data), options_(options), context_(context), device_(device),
        votes_(options.sign_mode == SignMode::kMax), loop_(options.method == VoteMethod::kLoop),
        reduce_type_(votes_ ? vote_count_dtype(data.samples, context.stats()) : DType::kF64),
        accumulators_(scalar_type_of(reduce_type_), device, kProductTileBytes,
                      options.precision == VotePrecision::kBF16 ? torch::kBFloat16 : torch::kFloat32),
        input_names_(model.input_names()), output_names_(model.output_names()),
        head_(model.vocabulary_head()), token_embedding_(model.token_embedding()),
        tied_(head_ != nullptr && head_->weight == token_embedding_) {
    for (const auto& tensor : weights.layout()) shapes_[tensor.name] = shape_of(tensor);
    // Only a vocabulary head may share its tensor with the input stage (the pass sums the two
    // uses of a tied head and embedding); any other sharing would be counted twice.
    for (const auto& name : output_names_)
      GRADFIX_CHECK(tied_ || std::find(input_names_.begin(), input_names_.end(), name) == input_names_.end(),
                    "a tensor in both the input and the output stage that is not a tied vocabulary head: " + name);
    if (options.precision != VotePrecision::kF32 && (loop_ || !votes_))
      throw InputError(std::string("--vote-precision ") + vote_precision_name(options.precision) +
                       " narrows the fast method's per-sample vote products (sign mode max, --method fast)");
    result_.samples = data.samples;
    result_.dtype = votes_ ? reduce_type_ : DType::kF32;
    for (const auto& piece : weights.plan().pieces(context.rank()))
      result_.pieces.emplace_back(static_cast<std::size_t>(piece.count) * dtype_size(result_.dtype), 0);
  }

  ShardedStatistics run() {
    groups_ = my_groups(data_, loop_ ? 1 : kSamplesPerGroup, context_, device_);
    token_rows_ = use_token_rows(model_, weights_, groups_, context_);
    boundary_ = forward_groups(model_, weights_, groups_, token_rows_, device_, true);  // boundary_[l][g]
    incoming_.resize(groups_.size());
    if (head_ != nullptr) vocabulary_output_stage();
    else output_stage();
    // Last layer first, each layer's gather started while the one after it computes.
    Pending<Parameters> next;
    if (model_.layers() > 0) next = weights_.gather_ahead(model_.layer_names(model_.layers() - 1), device_);
    for (long long l = model_.layers() - 1; l >= 0; --l) {
      Parameters parameters = next.take();
      if (l > 0) next = weights_.gather_ahead(model_.layer_names(l - 1), device_);
      layer_stage(l, std::move(parameters));
    }
    input_stage();
    if (tied_) head_pass(nullptr);
    release_kept_tensor_memory();  // the pass's working blocks are not needed for writing
    return std::move(result_);
  }

 private:
  // The output stage of a model without a vocabulary head, from the last boundary, one sample at
  // a time: the gradient reaching the last boundary kept as the next stage's incoming gradient.
  void output_stage() {
    Parameters parameters = weights_.gather(output_names_, device_);
    if (options_.refuse_nonfinite) refuse_nonfinite_losses(parameters);
    make_leaves(parameters);
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      std::vector<torch::Tensor> gradients;
      for (int64_t i = 0; i < static_cast<int64_t>(groups_[g].samples.size()); ++i) {
        GradientRecorder recorder;
        const torch::Tensor hidden = boundary_.back()[g].slice(0, i, i + 1).detach().requires_grad_(true);
        const torch::Tensor logits = model_.output(parameters, hidden, &recorder);
        model_.losses(logits, groups_[g].batch.slice(i, i + 1)).sum().backward();
        gradients.push_back(hidden.grad());
        if (loop_) {
          zero_cancelled(parameters, recorder);
          add_leaf_gradients(parameters, {});
        } else {
          add_captures(recorder.captures(), shapes_, accumulators_);
        }
      }
      incoming_[g] = torch::cat(gradients, 0);
    }
    reduce_whole(output_names_);
    boundary_.pop_back();
    stage_done();
  }

  // Only this rank sees its samples: a non-finite loss (weights with NaN or Inf) must stop every
  // rank before the collective steps that follow.
  void refuse_nonfinite_losses(const Parameters& parameters) const {
    context_.agree([&] {
      torch::NoGradGuard no_gradients;
      for (std::size_t g = 0; g < groups_.size(); ++g)
        for (int64_t i = 0; i < static_cast<int64_t>(groups_[g].samples.size()); ++i)
          refuse_nonfinite(g, i,
                           model_.losses(model_.output(parameters, boundary_.back()[g].slice(0, i, i + 1)), groups_[g].batch.slice(i, i + 1))[0]
                               .item<double>());
    });
  }
  void refuse_nonfinite(std::size_t g, int64_t i, double loss) const {
    if (!std::isfinite(loss))
      throw InputError(data_.name + ": selected sample " + std::to_string(groups_[g].samples[static_cast<std::size_t>(i)]) + " has a loss of " +
                       std::to_string(loss) + ": check the model's weights");
  }

  // The output stage of a language model: the features (final norm) of every group, recorded,
  // then the head block by block, never whole.
  void vocabulary_output_stage() {
    const std::vector<std::string> names = feature_names(model_);
    Parameters parameters = weights_.gather(names, device_);
    make_leaves(parameters);
    std::vector<torch::Tensor> hidden(groups_.size()), features(groups_.size());
    std::vector<GradientRecorder> recorders(groups_.size());
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      hidden[g] = boundary_.back()[g].detach().requires_grad_(true);
      features[g] = model_.head_features(parameters, hidden[g], loop_ ? nullptr : &recorders[g]);
      features_.push_back(features[g].detach());
      next_tokens_.push_back(model_.next_tokens(groups_[g].batch));
      position_weights_.push_back(position_weights(next_tokens_[g]));
    }
    blocks_ = head_blocks(model_, weights_, groups_, context_);
    const std::vector<StreamingLogits> scans = scan_head(model_, weights_, blocks_, features_, next_tokens_, device_);
    for (const auto& scan : scans) log_sum_exp_.push_back(scan.log_sum_exp());
    if (options_.refuse_nonfinite)
      context_.agree([&] {
        for (std::size_t g = 0; g < groups_.size(); ++g) {
          const torch::Tensor losses = scans[g].losses().to(torch::kCPU, torch::kFloat64);
          for (int64_t i = 0; i < losses.size(0); ++i) refuse_nonfinite(g, i, losses[i].item<double>());
        }
      });
    std::vector<torch::Tensor> feature_gradients(groups_.size());
    head_pass(&feature_gradients);
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      torch::autograd::backward({features[g]}, {feature_gradients[g]});
      incoming_[g] = hidden[g].grad();
      if (loop_) {
        zero_cancelled(parameters, recorders[g]);
        add_leaf_gradients(parameters, {});
      } else {
        add_captures(recorders[g].captures(), shapes_, accumulators_);
      }
    }
    reduce_whole(names);
    boundary_.pop_back();
    stage_done();
  }

  // One pass over the head's blocks, each gathered once, its logits' gradient formed for every
  // group from the kept features and log-sum-exp. The gradient reaching the features is summed
  // into `feature_gradients` when given. The head's per-sample products [n, rows, H] become its
  // statistics, reduced block by block, except in the output stage's pass of a tied head: the
  // embedding's rows, which join them, are not known until the input stage.
  void head_pass(std::vector<torch::Tensor>* feature_gradients) {
    torch::NoGradGuard no_gradients;
    const bool statistics = feature_gradients == nullptr || !tied_;
    std::vector<int64_t> shape = shapes_.at(head_->weight);
    Pending<torch::Tensor> next = weights_.gather_rows_ahead(head_->weight, row_range(blocks_.begin(0), blocks_.end(0)), device_);
    for (int64_t b = 0; b < blocks_.count(); ++b) {
      const int64_t begin = blocks_.begin(b), end = blocks_.end(b);
      const std::vector<int64_t> rows = row_range(begin, end);
      const torch::Tensor weight = next.take();
      if (b + 1 < blocks_.count()) next = weights_.gather_rows_ahead(head_->weight, row_range(blocks_.begin(b + 1), blocks_.end(b + 1)), device_);
      shape[0] = end - begin;
      torch::Tensor block = statistics ? accumulators_.zeros(shape) : torch::Tensor();
      for (std::size_t g = 0; g < groups_.size(); ++g) {
        const torch::Tensor gradient =
            block_logit_gradient(*head_, block_logits(*head_, features_[g], weight), log_sum_exp_[g], next_tokens_[g], position_weights_[g], begin);
        if (feature_gradients != nullptr) {
          torch::Tensor& sum = (*feature_gradients)[g];
          sum = sum.defined() ? sum.add_(torch::matmul(gradient, weight)) : torch::matmul(gradient, weight);
        }
        if (!statistics) continue;
        // A tied head's embedding rows join each tile of its products before the signs.
        const TileHook tied_rows = [&](torch::Tensor& tile, int64_t tile_begin, int64_t tile_end) {
          for (int64_t i = 0; i < tile.size(0); ++i)
            embedding_rows(tied_ids_[g], tied_gradients_[g], i, &tile, begin + tile_begin, begin + tile_end, nullptr, head_->weight, shape);
        };
        accumulators_.add_products(block, gradient.transpose(1, 2), features_[g], tied_ ? tied_rows : TileHook());
      }
      if (statistics) reduce_runs(head_->weight, block, row_runs(rows, block.numel() / shape[0]));
    }
  }

  // Layer l, its gathered `parameters`: recomputed from its kept input, the incoming gradient
  // backpropagated.
  void layer_stage(long long l, Parameters parameters) {
    const std::vector<std::string> names = model_.layer_names(l);
    make_leaves(parameters);
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      GradientRecorder recorder;
      const torch::Tensor input = boundary_.back()[g].detach().requires_grad_(true);
      const torch::Tensor output = model_.layer(l, parameters, input, groups_[g].batch, &recorder);
      torch::autograd::backward({output}, {incoming_[g]});
      incoming_[g] = input.grad();
      if (loop_) {
        zero_cancelled(parameters, recorder);
        add_leaf_gradients(parameters, {});
      } else {
        add_captures(recorder.captures(), shapes_, accumulators_);
      }
    }
    reduce_whole(names);
    boundary_.pop_back();
    stage_done();
  }

  // The input stage: recomputed from the batch, its output gradient is what reached the first
  // layer's input. Gathered once on every rank: a gather is collective, and ranks hold different
  // numbers of groups.
  void input_stage() {
    Parameters parameters = gather_input(model_, weights_, token_rows_, device_);
    make_leaves(parameters);
    // A token embedding's statistics come from its recorded rows in both methods: as a leaf its
    // gradient would span every gathered row.
    if (!token_embedding_.empty()) parameters.at(token_embedding_).requires_grad_(false);
    tied_ids_.resize(groups_.size());
    tied_gradients_.resize(groups_.size());
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      GradientRecorder recorder;
      const torch::Tensor output = model_.input(parameters, groups_[g].batch, loop_ && token_embedding_.empty() ? nullptr : &recorder);
      torch::autograd::backward({output}, {incoming_[g]});
      std::vector<Capture> captures;
      for (const auto& capture : recorder.captures()) {
        if (capture.parameter == token_embedding_) token_embedding_rows(capture, g);
        else if (!loop_) captures.push_back(capture);
      }
      add_captures(captures, shapes_, accumulators_);
      if (loop_) add_leaf_gradients(parameters, {token_embedding_});
    }
    std::vector<std::string> whole;
    for (const auto& name : input_names_)
      if (name != token_embedding_) {
        accumulators_.of(name, shapes_.at(name));
        whole.push_back(name);
      }
    reduce_whole(whole);
    if (!token_embedding_.empty() && !tied_) reduce_token_rows();
    stage_done();
  }

  // A token embedding's per-sample rows, from its recorded lookup of group g: into its
  // statistics of the used rows [U, H], or kept (as vocabulary ids) for a tied head's blocks.
  void token_embedding_rows(const Capture& capture, std::size_t g) {
    GRADFIX_CHECK(capture.kind == Capture::Kind::kEmbedding, "the token embedding's use must be an embedding lookup: " + capture.parameter);
    const torch::Tensor gradient = capture.output.grad();
    GRADFIX_CHECK(gradient.defined(), "no gradient reached the output of " + capture.parameter);
    if (tied_) {
      const torch::Tensor rows = groups_[g].batch.token_rows.to(capture.input.device());
      tied_ids_[g] = rows.index_select(0, capture.input.reshape({-1})).view_as(capture.input);
      tied_gradients_[g] = gradient;
      return;
    }
    const std::vector<int64_t> shape = used_rows_shape();
    for (int64_t i = 0; i < capture.input.size(0); ++i) embedding_rows(capture.input, gradient, i, nullptr, 0, 0, &accumulators_, token_embedding_, shape);
  }
  std::vector<int64_t> used_rows_shape() const {
    std::vector<int64_t> shape = shapes_.at(token_embedding_);
    shape[0] = static_cast<int64_t>(token_rows_.size());
    return shape;
  }

  // The token embedding's statistics of its used rows, reduced into the owners' pieces: runs of
  // consecutive token ids go together.
  void reduce_token_rows() {
    const std::vector<int64_t> shape = used_rows_shape();
    const long long width = std::accumulate(shape.begin() + 1, shape.end(), 1LL, std::multiplies<long long>());
    reduce_runs(token_embedding_, accumulators_.of(token_embedding_, shape), row_runs(token_rows_, width));
    accumulators_.values().erase(token_embedding_);
  }

  // Sums whole tensors' statistics over the ranks; each rank keeps the pieces it owns.
  void reduce_whole(const std::vector<std::string>& names) {
    for (const auto& name : names) {
      const torch::Tensor& values = accumulators_.of(name, shapes_.at(name));
      reduce_runs(name, values, {{0, values.numel(), 0}});
      accumulators_.values().erase(name);
    }
  }

  // Sums `values` (statistics of tensor `name` at the elements `runs` name) over the ranks, bucket
  // by bucket in the narrowest type that holds them, and keeps the elements this rank owns:
  // memory for this is one bucket, whatever the size. Collective: every rank passes the same runs.
  void reduce_runs(const std::string& name, const torch::Tensor& values, const std::vector<Run>& runs) {
    const StepTimer timer(TimedStep::kReduce);
    constexpr long long kBucket = 1LL << 22;
    const torch::Tensor flat = values.to(torch::kCPU).contiguous().view({-1});
    const long long count = flat.numel();
    const std::size_t item = dtype_size(reduce_type_);
    const auto* data = static_cast<const unsigned char*>(flat.data_ptr());
    std::vector<unsigned char> bucket;
    for (long long offset = 0; offset < count; offset += kBucket) {
      const long long length = std::min(kBucket, count - offset);
      bucket.assign(data + offset * static_cast<long long>(item), data + (offset + length) * static_cast<long long>(item));
      allreduce_statistics(context_.stats(), bucket.data(), length, reduce_type_);
      for (const auto& run : runs) {
        const long long first = std::max(offset, run.at), last = std::min(offset + length, run.at + run.count);
        if (first < last) keep_owned(name, run.begin + first - run.at, bucket.data() + static_cast<std::size_t>(first - offset) * item, last - first);
      }
    }
  }

  // Copies reduced statistics of elements [begin, begin + count) of tensor `name` into the pieces
  // this rank owns: vote counts as reduced, float64 sums as float32.
  void keep_owned(const std::string& name, long long begin, const unsigned char* values, long long count) {
    const auto& my_pieces = weights_.plan().pieces(context_.rank());
    const std::size_t item = dtype_size(reduce_type_);
    for (std::size_t k = 0; k < my_pieces.size(); ++k) {
      if (weights_.layout()[my_pieces[k].tensor].name != name) continue;
      const long long first = std::max(begin, my_pieces[k].begin), last = std::min(begin + count, my_pieces[k].begin + my_pieces[k].count);
      if (first >= last) continue;
      unsigned char* target = result_.pieces[k].data();
      if (votes_) {
        std::memcpy(target + static_cast<std::size_t>(first - my_pieces[k].begin) * item, values + static_cast<std::size_t>(first - begin) * item,
                    static_cast<std::size_t>(last - first) * item);
      } else {
        const auto* sums = reinterpret_cast<const double*>(values);
        auto* out = reinterpret_cast<float*>(target);
        for (long long i = first; i < last; ++i) out[static_cast<std::size_t>(i - my_pieces[k].begin)] = static_cast<float>(sums[static_cast<std::size_t>(i - begin)]);
      }
    }
  }

  // Progress: the backward stages (output, each layer, input) share the pass's samples.
  void stage_done() {
    const long long stages = model_.layers() + 2;
    ++stages_done_;
    count_progress(data_.samples * stages_done_ / stages - data_.samples * (stages_done_ - 1) / stages);
  }

  // Loop method: the gathered parameters are leaves whose own gradients are read.
  void make_leaves(Parameters& parameters) const {
    if (!loop_) return;
    for (auto& [name, tensor] : parameters) tensor.requires_grad_(true);
  }

  // Loop method: the bias entries that cancel to rounding (see without_cancelled) count as 0 in
  // the leaf gradients too; the recorded outputs of one sample's pass tell which.
  static void zero_cancelled(Parameters& parameters, const GradientRecorder& recorder) {
    for (const auto& capture : recorder.captures()) {
      if (capture.kind != Capture::Kind::kBias) continue;
      torch::Tensor& gradient = parameters.at(capture.parameter).mutable_grad();
      if (!gradient.defined()) continue;
      const torch::Tensor terms = capture.output.grad();
      const torch::Tensor cancelled = without_cancelled(terms.sum(1), terms.abs().sum(1)).eq(0)[0];
      gradient.masked_fill_(cancelled, 0);
    }
  }

  // Loop method: the parameters' own gradients after one sample's backward pass.
  void add_leaf_gradients(Parameters& parameters, const std::set<std::string>& skip) {
    for (auto& [name, tensor] : parameters) {
      if (skip.count(name)) continue;
      if (tensor.grad().defined()) {
        accumulators_.add(name, shapes_.at(name), tensor.grad().unsqueeze(0).clone());
        tensor.mutable_grad().reset();
      } else {
        accumulators_.of(name, shapes_.at(name));
      }
    }
  }

  const LayeredModel& model_;
  const ShardedWeights& weights_;
  const SampleSource& data_;
  const ShardedSignsOptions& options_;
  const JobContext& context_;
  const torch::Device& device_;
  const bool votes_;
  const bool loop_;
  const DType reduce_type_;
  Accumulators accumulators_;
  const std::vector<std::string> input_names_;
  const std::vector<std::string> output_names_;
  const VocabularyHead* const head_;   // nullptr: the output stage is computed whole
  const std::string token_embedding_;  // "" when the model has none
  const bool tied_;                    // the head is the token embedding
  std::map<std::string, std::vector<int64_t>> shapes_;
  ShardedStatistics result_;
  std::vector<Group> groups_;
  std::vector<int64_t> token_rows_;                   // the token embedding's rows that the data uses, over every rank
  std::vector<std::vector<torch::Tensor>> boundary_;  // each layer's input, per group; popped as the backward pass goes
  std::vector<torch::Tensor> incoming_;                // the gradient reaching the current stage's output, per group
  // The vocabulary head's blocks and, per group, what its passes need: the features, the next
  // tokens, their weights in the loss and each position's log-sum-exp.
  VocabularyBlocks blocks_;
  std::vector<torch::Tensor> features_, next_tokens_, position_weights_, log_sum_exp_;
  // A tied head: each group's embedding lookups (vocabulary ids) and their gradients.
  std::vector<torch::Tensor> tied_ids_, tied_gradients_;
  long long stages_done_ = 0;
};

}  // namespace

ShardedStatistics sharded_statistics(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data,
                                     const ShardedSignsOptions& options, const JobContext& context, const torch::Device& device) {
  return StatisticsPass(model, weights, data, options, context, device).run();
}

ShardedEvaluation sharded_evaluation(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data,
                                     const JobContext& context, const torch::Device& device, bool refuse_nonfinite) {
  torch::NoGradGuard no_gradients;
  std::vector<Group> groups = my_groups(data, kSamplesPerGroup, context, device);
  const std::vector<int64_t> token_rows = use_token_rows(model, weights, groups, context);
  const std::vector<torch::Tensor> hidden = forward_groups(model, weights, groups, token_rows, device, false)[0];
  ShardedEvaluation result;
  result.losses.assign(static_cast<std::size_t>(data.samples), 0.0);
  const Parameters head = weights.gather(feature_names(model), device);
  // Each group's per-sample losses and hits: from the head's blocks for a language model.
  std::vector<torch::Tensor> losses(groups.size());
  std::vector<std::pair<long long, long long>> hits(groups.size());
  if (model.vocabulary_head() != nullptr) {
    std::vector<torch::Tensor> features, next_tokens;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      features.push_back(model.head_features(head, hidden[g]));
      next_tokens.push_back(model.next_tokens(groups[g].batch));
    }
    const std::vector<StreamingLogits> scans = scan_head(model, weights, head_blocks(model, weights, groups, context), features, next_tokens, device);
    for (std::size_t g = 0; g < groups.size(); ++g) {
      losses[g] = scans[g].losses();
      hits[g] = scans[g].hits();
    }
  }
  context.agree([&] {
    for (std::size_t g = 0; g < groups.size(); ++g) {
      if (model.vocabulary_head() == nullptr) {
        const torch::Tensor logits = model.output(head, hidden[g]);
        losses[g] = model.losses(logits, groups[g].batch);
        hits[g] = model.hits(logits, groups[g].batch);
      }
      const torch::Tensor values = losses[g].to(torch::kCPU, torch::kFloat64);
      for (std::size_t i = 0; i < groups[g].samples.size(); ++i) {
        const double loss = values[static_cast<int64_t>(i)].item<double>();
        if (refuse_nonfinite && !std::isfinite(loss))
          throw InputError(data.name + ": sample " + std::to_string(groups[g].samples[i]) + " has a loss of " + std::to_string(loss) +
                           ": check the model's weights");
        result.losses[static_cast<std::size_t>(groups[g].samples[i])] = loss;
      }
      result.hits += hits[g].first;
      result.targets += hits[g].second;
    }
  });
  // Each loss has one contributor: the sum over ranks places them exactly.
  context.host().allreduce(result.losses.data(), result.losses.data(), result.losses.size(), DType::kF64, ReduceOp::kSum);
  long long counts[2] = {result.hits, result.targets};
  context.host().allreduce(counts, counts, 2, DType::kI64, ReduceOp::kSum);
  result.hits = counts[0];
  result.targets = counts[1];
  count_progress(data.samples);
  return result;
}

torch::Tensor sharded_features(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data,
                               const JobContext& context, const torch::Device& device) {
  GRADFIX_CHECK(model.feature_size() > 0, "sharded_features on a model without features");
  torch::NoGradGuard no_gradients;
  std::vector<Group> groups = my_groups(data, kSamplesPerGroup, context, device);
  const std::vector<int64_t> token_rows = use_token_rows(model, weights, groups, context);
  const std::vector<torch::Tensor> hidden = forward_groups(model, weights, groups, token_rows, device, false)[0];
  const Parameters head = weights.gather(feature_names(model), device);
  const long long width = model.feature_size();
  std::vector<double> rows(static_cast<std::size_t>(data.samples * width), 0.0);
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const torch::Tensor features = model.features(head, hidden[g], groups[g].batch).to(torch::kCPU, torch::kFloat64).contiguous();
    GRADFIX_CHECK(features.dim() == 2 && features.size(1) == width, "features of the wrong width");
    const double* values = features.data_ptr<double>();
    for (std::size_t i = 0; i < groups[g].samples.size(); ++i)
      std::copy_n(values + static_cast<long long>(i) * width, width, rows.data() + groups[g].samples[i] * width);
  }
  // Each row has one contributor: the sum over ranks places them exactly.
  context.host().allreduce(rows.data(), rows.data(), rows.size(), DType::kF64, ReduceOp::kSum);
  return torch::from_blob(rows.data(), {data.samples, width}, torch::kFloat64).to(torch::kFloat32);
}

DType write_sharded_statistics(const JobContext& context, const ShardedWeights& weights, const ShardedStatistics& statistics,
                               SignMode sign_mode, std::uint64_t seed, const std::string& model_type, const std::string& out,
                               const Metadata& extra_metadata) {
  const long long samples = statistics.samples;
  const DType dtype = sign_mode == SignMode::kMax ? (samples <= 127 ? DType::kI8 : samples <= 32767 ? DType::kI16 : DType::kI32) : DType::kF32;
  std::vector<TensorInfo> layout = weights.layout();
  for (auto& tensor : layout) tensor.dtype = dtype;
  Metadata metadata = {{"gradfix.operation", "signs"}, {"gradfix.sign_mode", sign_mode_name(sign_mode)},
                       {"gradfix.samples", std::to_string(samples)}, {"gradfix.seed", std::to_string(seed)},
                       {"gradfix.model_type", model_type}};
  metadata.insert(extra_metadata.begin(), extra_metadata.end());
  auto writer = open_collective_writer(context, out, layout, metadata);
  context.agree([&] {
    const auto& pieces = weights.plan().pieces(context.rank());
    // Converted in blocks: a float32 copy of a piece would be as large as the model's piece.
    constexpr long long kBlock = 1LL << 20;
    std::vector<float> block;
    for (std::size_t k = 0; k < pieces.size(); ++k)
      for (long long offset = 0; offset < pieces[k].count; offset += kBlock) {
        const long long length = std::min(kBlock, pieces[k].count - offset);
        block.resize(static_cast<std::size_t>(length));
        statistics.read_f32(k, offset, length, block.data());
        writer->write_f32(layout[pieces[k].tensor].name, pieces[k].begin + offset, block.data(), length);
      }
  });
  commit_collectively(context, *writer);
  return dtype;
}

}  // namespace gradfix
