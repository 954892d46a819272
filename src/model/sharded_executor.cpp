#include "sharded_executor.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include <torch/cuda.h>

#include "gradfix/dist/backend.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/dist/collective_output.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/dist/statistics.hpp"

namespace gradfix {
namespace {

// Samples that go through the model together. Fixed, and the groups round-robin to the ranks,
// so each group is computed the same way at any number of ranks: the votes do not depend on P.
constexpr long long kSamplesPerGroup = 8;

std::vector<int64_t> shape_of(const TensorInfo& tensor) { return {tensor.shape.begin(), tensor.shape.end()}; }

// Running statistics of the tensors of one step (a layer, the head, the embedding), over this
// rank's samples, full shape: vote counts in the narrowest integer type that holds them, or sums
// of -gradients in float64.
class Accumulators {
 public:
  Accumulators(torch::ScalarType type, const torch::Device& device) : type_(type), device_(device) {}

  torch::Tensor& of(const std::string& name, const std::vector<int64_t>& shape) {
    auto found = values_.find(name);
    if (found == values_.end()) found = values_.emplace(name, torch::zeros(shape, torch::TensorOptions().dtype(type_).device(device_))).first;
    return found->second;
  }
  // Adds the per-sample gradients `per_sample` [n, ...] of rows [begin, begin + rows) (dim 0 of
  // the parameter) to the statistics. `per_sample` is consumed (negated in place).
  void add(const std::string& name, const std::vector<int64_t>& shape, torch::Tensor per_sample, int64_t begin = 0) {
    torch::Tensor target = of(name, shape);
    if (per_sample.dim() > 1 && per_sample.size(1) != target.size(0)) target = target.slice(0, begin, begin + per_sample.size(1));
    per_sample.neg_();
    // view_as: a convolution's per-sample gradients come as [n, rows, in] for its [rows, c, h, w].
    if (type_ == torch::kFloat64) {
      target.add_(per_sample.sum(0, false, torch::kFloat64).view_as(target));
    } else {
      per_sample.sign_();
      target.add_(per_sample.sum(0).to(type_).view_as(target));
    }
  }
  // Adds per-sample gradients of a few rows: `rows` [k] row indices, `values` [k, H] (one sample).
  void add_rows(const std::string& name, const std::vector<int64_t>& shape, const torch::Tensor& rows, torch::Tensor values) {
    torch::Tensor& target = of(name, shape);
    values.neg_();
    if (type_ != torch::kFloat64) values.sign_();
    target.index_add_(0, rows, values.to(type_));
  }
  std::map<std::string, torch::Tensor>& values() { return values_; }

 private:
  torch::ScalarType type_;
  torch::Device device_;
  std::map<std::string, torch::Tensor> values_;
};

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

// The forward pass without gradients, one gathered layer at a time. Returns each layer's input
// per group and, last, the final hidden states ([layers + 1][group]); with `keep_inputs` false
// only the final hidden states are kept (entry 0).
std::vector<std::vector<torch::Tensor>> forward_groups(const LayeredModel& model, const ShardedWeights& weights, const std::vector<Group>& groups,
                                                       const torch::Device& device, bool keep_inputs) {
  const long long layers = model.layers();
  torch::NoGradGuard no_gradients;
  std::vector<std::vector<torch::Tensor>> boundary(static_cast<std::size_t>(keep_inputs ? layers + 1 : 1));
  {  // the input stage's tensors are dropped before the layers are gathered
    const Parameters input = weights.gather(model.input_names(), device);
    for (const auto& group : groups) boundary[0].push_back(model.input(input, group.batch));
  }
  for (long long l = 0; l < layers; ++l) {
    const Parameters layer = weights.gather(model.layer_names(l), device);
    const std::size_t in = keep_inputs ? static_cast<std::size_t>(l) : 0, out = keep_inputs ? in + 1 : 0;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      torch::Tensor next = model.layer(l, layer, boundary[in][g], groups[g].batch);
      if (keep_inputs) boundary[out].push_back(std::move(next));
      else boundary[0][g] = std::move(next);
    }
  }
  return boundary;
}

// The per-sample gradient rows of an embedding (sample i: the rows of its token ids), added to
// `dense` rows [begin, end) when given (a tied head), else straight into the statistics.
void embedding_rows(const torch::Tensor& ids, const torch::Tensor& gradient, int64_t sample, torch::Tensor* dense, int64_t begin, int64_t end,
                    Accumulators* accumulators, const std::string& name, const std::vector<int64_t>& shape) {
  const torch::Tensor sample_ids = ids[sample];
  const torch::Tensor sample_gradient = gradient[sample];
  if (dense != nullptr) {  // a tied head: into its dense block before any sign is taken
    const torch::Tensor inside = sample_ids.ge(begin).logical_and(sample_ids.lt(end)).nonzero().squeeze(1);
    if (inside.numel() == 0) return;
    (*dense)[sample].index_add_(0, sample_ids.index_select(0, inside) - begin, sample_gradient.index_select(0, inside));
    return;
  }
  // Rows of one sample summed per distinct token: that sample's gradient of each touched row.
  const auto [unique, inverse] = torch::_unique(sample_ids, true, true);
  torch::Tensor rows = torch::zeros({unique.size(0), sample_gradient.size(1)}, sample_gradient.options()).index_add_(0, inverse, sample_gradient);
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
      case Capture::Kind::kBias:  // a new tensor: consumable
        accumulators.add(capture.parameter, shape, without_cancelled(gradient.sum(1), gradient.abs().sum(1)));
        break;
      case Capture::Kind::kScale: accumulators.add(capture.parameter, shape, (gradient * capture.input).sum(1)); break;
      case Capture::Kind::kAdditive: accumulators.add(capture.parameter, shape, gradient.clone()); break;
      case Capture::Kind::kEmbedding:
        for (int64_t i = 0; i < capture.input.size(0); ++i)
          embedding_rows(capture.input, gradient, i, nullptr, 0, 0, &accumulators, capture.parameter, shape);
        break;
    }
  }
}

}  // namespace

ShardedWeights::ShardedWeights(std::vector<TensorInfo> layout, const std::string& path, const JobContext& context)
    : context_(context), layout_(std::move(layout)), plan_(layout_, context.size()) {
  for (std::size_t i = 0; i < layout_.size(); ++i) index_[layout_[i].name] = i;
  mine_ = read_pieces(*open_reader(path), layout_, plan_, context.rank());
}

std::vector<std::vector<float>> read_pieces(const TensorReader& reader, const std::vector<TensorInfo>& layout, const ShardPlan& plan,
                                            int rank) {
  std::vector<std::vector<float>> pieces;
  for (const auto& piece : plan.pieces(rank)) {
    const std::string& name = layout[piece.tensor].name;
    if (reader.find(name) == nullptr) pieces.emplace_back(static_cast<std::size_t>(piece.count), 0.0f);
    else pieces.push_back(reader.read_f32(name, piece.begin, piece.count));
  }
  return pieces;
}

std::set<std::size_t> ShardedWeights::indices_of(const std::vector<std::string>& names) const {
  std::set<std::size_t> indices;
  for (const auto& name : names) {
    const auto found = index_.find(name);
    GRADFIX_CHECK(found != index_.end(), "no tensor '" + name + "' in the model's layout");
    indices.insert(found->second);
  }
  return indices;
}

std::vector<Piece> ShardedWeights::pieces_of(int rank, const std::set<std::size_t>& wanted, long long& count) const {
  std::vector<Piece> pieces;
  for (const auto& piece : plan_.pieces(rank))
    if (wanted.count(piece.tensor)) {
      pieces.push_back(piece);
      count += piece.count;
    }
  return pieces;
}

void ShardedWeights::own_values(std::size_t k, float* out) const {
  const std::vector<float>& base = mine_[k];
  if (offset_ == nullptr) {
    std::memcpy(out, base.data(), base.size() * sizeof(float));
    return;
  }
  const std::vector<float>& delta = (*offset_)[k];
  for (std::size_t i = 0; i < base.size(); ++i) out[i] = base[i] + alpha_ * delta[i];
}

Parameters ShardedWeights::gather(const std::vector<std::string>& names, const torch::Device& device) const {
  if (!device.is_cpu() && context_.size() > 1 && context_.stats().memory() == MemorySpace::kDevice) return gather_on_device(names, device);
  const std::set<std::size_t> wanted = indices_of(names);
  // Each rank that owns pieces of these tensors broadcasts them, packed in plan order, and every
  // rank unpacks them into the whole tensors. Broadcasting owner by owner moves only real data:
  // an all-gather would pad every rank's share to the largest, and one big tensor (an embedding)
  // often lies on one rank alone.
  std::map<std::size_t, torch::Tensor> full;
  const auto& my_pieces = plan_.pieces(context_.rank());
  // A tensor this rank holds whole is used from its own piece, without a copy (read only).
  std::set<std::size_t> whole_here;
  for (std::size_t k = 0; k < my_pieces.size(); ++k) {
    const std::size_t tensor = my_pieces[k].tensor;
    if (offset_ == nullptr && wanted.count(tensor) && my_pieces[k].begin == 0 && my_pieces[k].count == layout_[tensor].numel()) {
      full[tensor] = torch::from_blob(const_cast<float*>(mine_[k].data()), shape_of(layout_[tensor]), torch::kFloat32);
      whole_here.insert(tensor);
    }
  }
  for (std::size_t tensor : wanted)
    if (!whole_here.count(tensor)) full[tensor] = torch::empty(shape_of(layout_[tensor]), torch::kFloat32);
  std::vector<float> buffer;
  for (int r = 0; r < context_.size(); ++r) {
    long long count = 0;
    const std::vector<Piece> theirs = pieces_of(r, wanted, count);
    if (count == 0) continue;
    auto destination = [&](const Piece& piece) { return full[piece.tensor].data_ptr<float>() + piece.begin; };
    if (r == context_.rank()) {
      // Own pieces go straight into the tensors, and are sent from there.
      for (std::size_t k = 0; k < my_pieces.size(); ++k) {
        if (!wanted.count(my_pieces[k].tensor) || whole_here.count(my_pieces[k].tensor)) continue;
        own_values(k, destination(my_pieces[k]));
      }
    }
    if (context_.size() == 1) continue;
    if (theirs.size() == 1) {
      // One range of one tensor (the usual case for a large tensor): received in place.
      context_.host().broadcast(destination(theirs[0]), static_cast<std::size_t>(count), DType::kF32, r);
      continue;
    }
    buffer.resize(static_cast<std::size_t>(count));
    long long cursor = 0;
    if (r == context_.rank())
      for (const auto& piece : theirs) {
        std::memcpy(buffer.data() + cursor, destination(piece), static_cast<std::size_t>(piece.count) * sizeof(float));
        cursor += piece.count;
      }
    context_.host().broadcast(buffer.data(), static_cast<std::size_t>(count), DType::kF32, r);
    if (r == context_.rank()) continue;
    cursor = 0;
    for (const auto& piece : theirs) {
      std::memcpy(destination(piece), buffer.data() + cursor, static_cast<std::size_t>(piece.count) * sizeof(float));
      cursor += piece.count;
    }
  }
  Parameters parameters;
  for (auto& [tensor, values] : full) parameters[layout_[tensor].name] = device.is_cpu() ? values : values.to(device);
  return parameters;
}

// The same over the device communicator (NCCL): the whole tensors are assembled in device
// memory, each owner's pieces broadcast from there, so no rank stages a layer on the host. The
// communicator works on its own stream: torch's work is finished before each broadcast, and the
// communicator finishes its own before returning.
Parameters ShardedWeights::gather_on_device(const std::vector<std::string>& names, const torch::Device& device) const {
  const std::set<std::size_t> wanted = indices_of(names);
  Communicator& transport = context_.stats();
  const auto on_device = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  std::map<std::size_t, torch::Tensor> full;
  for (std::size_t tensor : wanted) full[tensor] = torch::empty(shape_of(layout_[tensor]), on_device);
  auto range = [&](const Piece& piece) { return full.at(piece.tensor).view({-1}).slice(0, piece.begin, piece.begin + piece.count); };
  // Own pieces (with the offset, added on the host as gather() does) go straight into place.
  const auto& my_pieces = plan_.pieces(context_.rank());
  std::vector<float> values;
  for (std::size_t k = 0; k < my_pieces.size(); ++k) {
    if (!wanted.count(my_pieces[k].tensor)) continue;
    values.resize(mine_[k].size());
    own_values(k, values.data());
    range(my_pieces[k]).copy_(torch::from_blob(values.data(), {my_pieces[k].count}, torch::kFloat32));
  }
  for (int r = 0; r < context_.size(); ++r) {
    long long count = 0;
    const std::vector<Piece> theirs = pieces_of(r, wanted, count);
    if (count == 0) continue;
    torch::cuda::synchronize();
    if (theirs.size() == 1) {
      transport.broadcast(range(theirs[0]).data_ptr<float>(), static_cast<std::size_t>(count), DType::kF32, r);
      continue;
    }
    // Several ranges: packed into one buffer in plan order, broadcast, unpacked.
    torch::Tensor packed;
    if (r == context_.rank()) {
      std::vector<torch::Tensor> parts;
      for (const auto& piece : theirs) parts.push_back(range(piece));
      packed = torch::cat(parts);
    } else {
      packed = torch::empty({count}, on_device);
    }
    torch::cuda::synchronize();
    transport.broadcast(packed.data_ptr<float>(), static_cast<std::size_t>(count), DType::kF32, r);
    if (r == context_.rank()) continue;
    long long cursor = 0;
    for (const auto& piece : theirs) {
      range(piece).copy_(packed.slice(0, cursor, cursor + piece.count));
      cursor += piece.count;
    }
  }
  torch::cuda::synchronize();
  Parameters parameters;
  for (auto& [tensor, tensor_values] : full) parameters[layout_[tensor].name] = tensor_values;
  return parameters;
}

namespace {

torch::ScalarType scalar_type_of(DType dtype) {
  return dtype == DType::kI8 ? torch::kInt8 : dtype == DType::kI16 ? torch::kInt16 : dtype == DType::kI32 ? torch::kInt32 : torch::kFloat64;
}

// One few-shot statistics pass (sharded_statistics), stage by stage:
//   forward   every stage gathered in turn, each layer's input kept (the boundaries)
//   output    the final stage per sample (its logits are the largest activations), the gradient
//             reaching the last boundary kept as the next stage's incoming gradient
//   layers    last first: recomputed from the kept boundary with autograd, the incoming gradient
//             backpropagated, per-sample statistics formed from the recorded captures
//   input     recomputed from the batch; a tied tensor's two uses are summed here
// and after each stage reduce(): the stage's statistics summed over the ranks, each rank keeping
// the pieces it owns.
class StatisticsPass {
 public:
  StatisticsPass(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& data, const ShardedSignsOptions& options,
                 const JobContext& context, const torch::Device& device)
      : model_(model), weights_(weights), data_(data), options_(options), context_(context), device_(device),
        votes_(options.sign_mode == SignMode::kMax), loop_(options.method == VoteMethod::kLoop),
        reduce_type_(votes_ ? vote_count_dtype(data.samples, context.stats()) : DType::kF64),
        accumulators_(scalar_type_of(reduce_type_), device), input_names_(model.input_names()), output_names_(model.output_names()) {
    for (const auto& tensor : weights.layout()) shapes_[tensor.name] = shape_of(tensor);
    result_.samples = data.samples;
    result_.dtype = votes_ ? reduce_type_ : DType::kF32;
    for (const auto& piece : weights.plan().pieces(context.rank()))
      result_.pieces.emplace_back(static_cast<std::size_t>(piece.count) * dtype_size(result_.dtype), 0);
  }

  ShardedStatistics run() {
    groups_ = my_groups(data_, loop_ ? 1 : kSamplesPerGroup, context_, device_);
    boundary_ = forward_groups(model_, weights_, groups_, device_, true);  // boundary_[l][g]
    find_tied();
    incoming_.resize(groups_.size());
    output_stage();
    for (long long l = model_.layers() - 1; l >= 0; --l) layer_stage(l);
    input_stage();
    return std::move(result_);
  }

 private:
  // A tensor used by both the input and the output stage (a tied embedding and head) gets one
  // per-sample gradient, the sum of both uses: the output stage's part waits for the input's.
  void find_tied() {
    for (const auto& name : output_names_)
      if (std::find(input_names_.begin(), input_names_.end(), name) != input_names_.end()) tied_.insert(name);
    for (const auto& name : tied_) tied_captures_[name].resize(groups_.size());
  }

  // Only this rank sees its samples: a non-finite loss (weights with NaN or Inf) must stop every
  // rank before the collective steps that follow.
  void refuse_nonfinite_losses(const Parameters& parameters) const {
    context_.agree([&] {
      torch::NoGradGuard no_gradients;
      for (std::size_t g = 0; g < groups_.size(); ++g)
        for (int64_t i = 0; i < static_cast<int64_t>(groups_[g].samples.size()); ++i) {
          const double loss =
              model_.losses(model_.output(parameters, boundary_.back()[g].slice(0, i, i + 1)), groups_[g].batch.slice(i, i + 1))[0].item<double>();
          if (!std::isfinite(loss))
            throw InputError(data_.name + ": selected sample " + std::to_string(groups_[g].samples[static_cast<std::size_t>(i)]) +
                             " has a loss of " + std::to_string(loss) + ": check the model's weights");
        }
    });
  }

  // The output stage (final norm and head), from the last boundary, one sample at a time: the
  // logits and their gradient ([T, V] each for a language model, the largest activations of the
  // pass) then cost one sample's worth, whatever the group size.
  void output_stage() {
    Parameters parameters = weights_.gather(output_names_, device_);
    if (options_.refuse_nonfinite) refuse_nonfinite_losses(parameters);
    make_leaves(parameters);
    // Loop method: a tied tensor's head gradient is formed in the input stage (below), so
    // autograd need not form a [V, H] gradient per sample here.
    if (loop_)
      for (const auto& name : tied_) parameters.at(name).requires_grad_(false);
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      std::vector<torch::Tensor> gradients;
      std::map<std::string, std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>>> tied_parts;
      for (int64_t i = 0; i < static_cast<int64_t>(groups_[g].samples.size()); ++i) {
        GradientRecorder recorder;
        const torch::Tensor hidden = boundary_.back()[g].slice(0, i, i + 1).detach().requires_grad_(true);
        const torch::Tensor logits = model_.output(parameters, hidden, &recorder);
        model_.losses(logits, groups_[g].batch.slice(i, i + 1)).sum().backward();
        gradients.push_back(hidden.grad());
        if (loop_) {
          zero_cancelled(parameters, recorder);
          // A tied tensor's head use is kept as its product's two factors (this sample's hidden
          // states and logits' gradient, [T, H] and [T, V]) rather than as its [V, H] gradient:
          // the input stage forms the product once the embedding use's gradient is there.
          for (const auto& capture : recorder.captures())
            if (tied_.count(capture.parameter)) tied_captures_[capture.parameter][g] = {capture.parameter, capture.kind, capture.input, capture.output.grad()};
          add_leaf_gradients(parameters, tied_);
          continue;
        }
        std::vector<Capture> captures;
        for (const auto& capture : recorder.captures()) {
          if (tied_.count(capture.parameter)) {
            GRADFIX_CHECK(capture.kind == Capture::Kind::kLinearWeight, "a tied tensor's output use must be a linear weight: " + capture.parameter);
            tied_parts[capture.parameter].first.push_back(capture.input);
            tied_parts[capture.parameter].second.push_back(capture.output.grad());
            continue;
          }
          captures.push_back(capture);
        }
        add_captures(captures, shapes_, options_.product_bytes, accumulators_);
      }
      incoming_[g] = torch::cat(gradients, 0);
      for (auto& [name, parts] : tied_parts)
        tied_captures_[name][g] = {name, Capture::Kind::kLinearWeight, torch::cat(parts.first, 0), torch::cat(parts.second, 0)};
    }
    std::vector<std::string> done;
    for (const auto& name : output_names_)
      if (!tied_.count(name)) done.push_back(name);
    reduce(done);
    boundary_.pop_back();
    stage_done();
  }

  // Layer l: recomputed from its kept input, the incoming gradient backpropagated.
  void layer_stage(long long l) {
    const std::vector<std::string> names = model_.layer_names(l);
    Parameters parameters = weights_.gather(names, device_);
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
        add_captures(recorder.captures(), shapes_, options_.product_bytes, accumulators_);
      }
    }
    reduce(names);
    boundary_.pop_back();
    stage_done();
  }

  // The input stage: recomputed from the batch, its output gradient is what reached the first
  // layer's input. Gathered once on every rank: a gather is collective, and ranks hold different
  // numbers of groups.
  void input_stage() {
    Parameters parameters = weights_.gather(input_names_, device_);
    make_leaves(parameters);
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      GradientRecorder recorder;
      const torch::Tensor output = model_.input(parameters, groups_[g].batch, loop_ ? nullptr : &recorder);
      torch::autograd::backward({output}, {incoming_[g]});
      if (loop_) {
        for (const auto& name : tied_) {
          // The head use's gradient, as autograd forms a linear weight's: (X^T G)^T over tokens.
          const Capture& head = tied_captures_.at(name)[g];
          const torch::Tensor x = head.input.reshape({-1, head.input.size(-1)});
          const torch::Tensor gradient = head.output.reshape({-1, head.output.size(-1)});
          parameters.at(name).mutable_grad().add_(torch::mm(x.t(), gradient).t());
          tied_captures_.at(name)[g] = Capture();
        }
        add_leaf_gradients(parameters, {});
        continue;
      }
      std::vector<Capture> captures;
      for (const auto& capture : recorder.captures()) {
        const auto deferred = tied_captures_.find(capture.parameter);
        if (deferred == tied_captures_.end()) {
          captures.push_back(capture);
          continue;
        }
        GRADFIX_CHECK(capture.kind == Capture::Kind::kEmbedding, "a tied tensor's input use must be an embedding: " + capture.parameter);
        const Capture& head = deferred->second[g];
        const torch::Tensor gradient = capture.output.grad();
        linear_weight(capture.parameter, shapes_.at(capture.parameter), head.input, head.output, options_.product_bytes, accumulators_,
                      &capture.input, &gradient);
      }
      add_captures(captures, shapes_, options_.product_bytes, accumulators_);
    }
    for (const auto& name : input_names_) accumulators_.of(name, shapes_.at(name));
    reduce(input_names_);
    stage_done();
  }

  // Sums a stage's statistics over the ranks, bucket by bucket in the narrowest type that holds
  // them, and keeps the pieces this rank owns: memory for this is one bucket, whatever the size.
  void reduce(const std::vector<std::string>& names) {
    constexpr long long kBucket = 1LL << 22;
    const auto& my_pieces = weights_.plan().pieces(context_.rank());
    for (const auto& name : names) {
      const torch::Tensor values = accumulators_.of(name, shapes_.at(name)).to(torch::kCPU).contiguous().view({-1});
      const long long count = values.numel();
      const std::size_t item = dtype_size(reduce_type_);
      std::vector<unsigned char> bucket;
      for (long long offset = 0; offset < count; offset += kBucket) {
        const long long length = std::min(kBucket, count - offset);
        bucket.assign(static_cast<const unsigned char*>(values.data_ptr()) + offset * static_cast<long long>(item),
                      static_cast<const unsigned char*>(values.data_ptr()) + (offset + length) * static_cast<long long>(item));
        allreduce_statistics(context_.stats(), bucket.data(), length, reduce_type_);
        for (std::size_t k = 0; k < my_pieces.size(); ++k) {
          if (weights_.layout()[my_pieces[k].tensor].name != name) continue;
          const long long first = std::max(offset, my_pieces[k].begin);
          const long long last = std::min(offset + length, my_pieces[k].begin + my_pieces[k].count);
          if (first >= last) continue;
          unsigned char* target = result_.pieces[k].data();
          if (votes_) {  // kept as reduced
            std::memcpy(target + static_cast<std::size_t>(first - my_pieces[k].begin) * item, bucket.data() + static_cast<std::size_t>(first - offset) * item,
                        static_cast<std::size_t>(last - first) * item);
          } else {  // float64 sums kept as float32
            const auto* sums = reinterpret_cast<const double*>(bucket.data());
            auto* out = reinterpret_cast<float*>(target);
            for (long long i = first; i < last; ++i)
              out[static_cast<std::size_t>(i - my_pieces[k].begin)] = static_cast<float>(sums[static_cast<std::size_t>(i - offset)]);
          }
        }
      }
      accumulators_.values().erase(name);
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
  std::map<std::string, std::vector<int64_t>> shapes_;
  ShardedStatistics result_;
  std::vector<Group> groups_;
  std::vector<std::vector<torch::Tensor>> boundary_;  // each layer's input, per group; popped as the backward pass goes
  std::vector<torch::Tensor> incoming_;                // the gradient reaching the current stage's output, per group
  std::set<std::string> tied_;
  std::map<std::string, std::vector<Capture>> tied_captures_;  // the output stage's X and G of a tied tensor, per group
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
  const std::vector<Group> groups = my_groups(data, kSamplesPerGroup, context, device);
  const std::vector<torch::Tensor> hidden = forward_groups(model, weights, groups, device, false)[0];
  ShardedEvaluation result;
  result.losses.assign(static_cast<std::size_t>(data.samples), 0.0);
  const Parameters head = weights.gather(model.output_names(), device);
  context.agree([&] {
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const torch::Tensor logits = model.output(head, hidden[g]);
      const torch::Tensor losses = model.losses(logits, groups[g].batch).to(torch::kCPU, torch::kFloat64);
      for (std::size_t i = 0; i < groups[g].samples.size(); ++i) {
        const double loss = losses[static_cast<int64_t>(i)].item<double>();
        if (refuse_nonfinite && !std::isfinite(loss))
          throw InputError(data.name + ": sample " + std::to_string(groups[g].samples[i]) + " has a loss of " + std::to_string(loss) +
                           ": check the model's weights");
        result.losses[static_cast<std::size_t>(groups[g].samples[i])] = loss;
      }
      const auto [right, counted] = model.hits(logits, groups[g].batch);
      result.hits += right;
      result.targets += counted;
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
  const std::vector<Group> groups = my_groups(data, kSamplesPerGroup, context, device);
  const std::vector<torch::Tensor> hidden = forward_groups(model, weights, groups, device, false)[0];
  const Parameters head = weights.gather(model.output_names(), device);
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
                               SignMode sign_mode, std::uint64_t seed, const std::string& model_type, const std::string& out) {
  const long long samples = statistics.samples;
  const DType dtype = sign_mode == SignMode::kMax ? (samples <= 127 ? DType::kI8 : samples <= 32767 ? DType::kI16 : DType::kI32) : DType::kF32;
  std::vector<TensorInfo> layout = weights.layout();
  for (auto& tensor : layout) tensor.dtype = dtype;
  const Metadata metadata = {{"gradfix.operation", "signs"}, {"gradfix.sign_mode", sign_mode_name(sign_mode)},
                             {"gradfix.samples", std::to_string(samples)}, {"gradfix.seed", std::to_string(seed)},
                             {"gradfix.model_type", model_type}};
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
