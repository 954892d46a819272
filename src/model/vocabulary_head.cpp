#include "vocabulary_head.hpp"

#include <algorithm>
#include <limits>

namespace gradfix {
namespace {

// The targets of a block: rows [begin, begin + rows) hold the target of the positions `inside`,
// at index `local` (clamped into the block where outside, to be masked).
std::pair<torch::Tensor, torch::Tensor> targets_in_block(const torch::Tensor& next_tokens, int64_t begin, int64_t rows) {
  const torch::Tensor inside = next_tokens.ge(begin).logical_and(next_tokens.lt(begin + rows));
  const torch::Tensor local = (next_tokens - begin).clamp(0, rows - 1);
  return {inside, local};
}

}  // namespace

VocabularyBlocks vocabulary_blocks(int64_t vocabulary, int64_t width, int64_t samples, int64_t positions, long long elements) {
  const int64_t per_row = std::max<int64_t>(1, samples * std::max(width, positions));
  return {vocabulary, std::clamp<int64_t>(elements / per_row, 1, std::max<int64_t>(1, vocabulary))};
}

torch::Tensor block_logits(const VocabularyHead& head, const torch::Tensor& features, const torch::Tensor& weight) {
  torch::Tensor logits = torch::matmul(features, weight.t());
  if (head.softcap > 0.0) logits = logits.div_(head.softcap).tanh_().mul_(head.softcap);
  return logits;
}

torch::Tensor position_weights(const torch::Tensor& next_tokens) {
  const torch::Tensor counted = next_tokens.ge(0).to(torch::kFloat32);
  return counted / counted.sum(1, true);
}

StreamingLogits::StreamingLogits(torch::Tensor next_tokens) : next_tokens_(std::move(next_tokens)) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat32).device(next_tokens_.device());
  maximum_ = torch::full(next_tokens_.sizes(), -std::numeric_limits<float>::infinity(), options);
  sum_ = torch::zeros(next_tokens_.sizes(), options);
  target_ = torch::zeros(next_tokens_.sizes(), options);
  best_index_ = torch::zeros(next_tokens_.sizes(), options.dtype(torch::kInt64));
}

void StreamingLogits::add(const torch::Tensor& logits, int64_t begin) {
  const auto [block_maximum, block_index] = logits.max(2);
  // A later block wins only when strictly larger: the first largest logit is the prediction.
  const torch::Tensor better = block_maximum.gt(maximum_);
  best_index_ = torch::where(better, block_index + begin, best_index_);
  const torch::Tensor maximum = torch::maximum(maximum_, block_maximum);
  // exp(-inf - -inf) is NaN before the first block: the old sum is 0 then either way.
  const torch::Tensor rescale = torch::where(maximum_.isneginf(), torch::zeros_like(maximum_), (maximum_ - maximum).exp());
  sum_ = sum_ * rescale + (logits - maximum.unsqueeze(2)).exp().sum(2);
  maximum_ = maximum;
  const auto [inside, local] = targets_in_block(next_tokens_, begin, logits.size(2));
  target_ = torch::where(inside, logits.gather(2, local.unsqueeze(2)).squeeze(2), target_);
}

torch::Tensor StreamingLogits::losses() const {
  const torch::Tensor counted = next_tokens_.ge(0);
  const torch::Tensor losses = torch::where(counted, log_sum_exp() - target_, torch::zeros_like(target_));
  return losses.sum(1) / counted.sum(1).to(torch::kFloat32);
}

std::pair<long long, long long> StreamingLogits::hits() const {
  const torch::Tensor counted = next_tokens_.ge(0);
  return {best_index_.eq(next_tokens_).logical_and(counted).sum().item<int64_t>(), counted.sum().item<int64_t>()};
}

torch::Tensor block_logit_gradient(const VocabularyHead& head, const torch::Tensor& logits, const torch::Tensor& log_sum_exp,
                                   const torch::Tensor& next_tokens, const torch::Tensor& weights, int64_t begin) {
  // softmax - one-hot, each position weighted by its share of the sample's mean.
  torch::Tensor gradient = (logits - log_sum_exp.unsqueeze(2)).exp_().mul_(weights.unsqueeze(2));
  const auto [inside, local] = targets_in_block(next_tokens, begin, logits.size(2));
  gradient.scatter_add_(2, local.unsqueeze(2), (-weights * inside.to(weights.scalar_type())).unsqueeze(2));
  // Through the cap: d(c tanh(a / c)) / da = 1 - tanh^2 = 1 - (logit / c)^2.
  if (head.softcap > 0.0) gradient.mul_(1.0 - (logits / head.softcap).square());
  return gradient;
}

}  // namespace gradfix
