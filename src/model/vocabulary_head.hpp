#pragma once
// Internal to the LibTorch part: a language model's head and loss, computed block by block of the
// vocabulary (architecture.hpp, VocabularyHead). The head of a Llama 3 model is 128,256 x 4096
// (2.1 GB in float32) and one sample's logits [T, V] are as large as a layer; neither may be held
// whole on a rank if memory per rank is to fall with the number of ranks. So the sharded executor
// gathers the head a block of rows at a time and keeps, per position, only a running maximum and
// sum of exponentials (a streaming log-sum-exp), the target's logit and the best guess so far:
//
//   scan       every block once: log-sum-exp, the target logit, the prediction -> losses, hits
//   gradient   every block again: dL/dlogits = (softmax - one-hot) / counted positions, from
//              the block's logits and the final log-sum-exp, times the soft-cap's derivative
//
// The blocks are the same at any number of ranks, so every sum runs in the same order and the
// results do not depend on P.

#include <torch/torch.h>

#include <utility>

#include "architecture.hpp"

namespace gradfix {

// The fixed cut of a vocabulary of `vocabulary` rows into blocks of `rows` rows (the last shorter).
struct VocabularyBlocks {
  int64_t vocabulary = 0;
  int64_t rows = 0;
  int64_t count() const { return (vocabulary + rows - 1) / rows; }
  int64_t begin(int64_t block) const { return block * rows; }
  int64_t end(int64_t block) const { return std::min(vocabulary, (block + 1) * rows); }
};

// Blocks for features of width `width`, groups of up to `samples` samples of `positions`
// positions, and a bound of `elements` on a block's largest array (its per-sample products
// [samples, rows, width] and its logits [samples, positions, rows]).
VocabularyBlocks vocabulary_blocks(int64_t vocabulary, int64_t width, int64_t samples, int64_t positions, long long elements);

// The logits of rows [begin, begin + weight.size(0)) for features [n, T, H]: [n, T, rows],
// soft-capped when the head caps them.
torch::Tensor block_logits(const VocabularyHead& head, const torch::Tensor& features, const torch::Tensor& weight);

// 1 / (counted positions of the sample) where a position has a next token, else 0: [n, T]. A
// sample's loss is the sum over its positions of this weight times the position's cross-entropy.
torch::Tensor position_weights(const torch::Tensor& next_tokens);

// The running statistics of one group's positions over the blocks added so far.
class StreamingLogits {
 public:
  explicit StreamingLogits(torch::Tensor next_tokens);
  // Adds the logits [n, T, rows] of the rows from `begin`.
  void add(const torch::Tensor& logits, int64_t begin);
  // log sum_v exp(logit_v) per position [n, T], once every block was added.
  torch::Tensor log_sum_exp() const { return maximum_ + sum_.log(); }
  // Per-sample losses [n]: the mean over counted positions of log-sum-exp - target logit (NaN for
  // a sample with no counted position, as the whole-logits loss gives).
  torch::Tensor losses() const;
  // Counted positions whose largest logit (the first, on a tie) is the target's, and counted
  // positions, over the group.
  std::pair<long long, long long> hits() const;

 private:
  torch::Tensor next_tokens_;  // [n, T], -1 none
  torch::Tensor maximum_;      // [n, T] the largest logit so far
  torch::Tensor sum_;          // [n, T] sum of exp(logit - maximum_)
  torch::Tensor target_;       // [n, T] the target's logit, once its block was added
  torch::Tensor best_index_;   // [n, T] the row of the largest logit so far
};

// dL_n / d(logits before the cap) of rows [begin, begin + rows) for the block's (capped) logits
// [n, T, rows], the positions' final log-sum-exp [n, T], next tokens and position weights [n, T].
torch::Tensor block_logit_gradient(const VocabularyHead& head, const torch::Tensor& logits, const torch::Tensor& log_sum_exp,
                                   const torch::Tensor& next_tokens, const torch::Tensor& weights, int64_t begin);

}  // namespace gradfix
