// The vocabulary head computed block by block (src/model/vocabulary_head.hpp) against the same
// quantities computed from whole logits with LibTorch's own functions: log-sum-exp, per-sample
// losses, predictions (ties included: the first largest logit wins, as argmax picks it) and the
// gradient of the losses, with and without Gemma 2's soft cap, for block sizes that do and do
// not divide the vocabulary.
#include <gtest/gtest.h>

#include "../../src/model/vocabulary_head.hpp"

namespace gradfix {
namespace {

constexpr int64_t kSamples = 3, kPositions = 7, kVocabulary = 50, kWidth = 6;

struct Case {
  torch::Tensor features;     // [n, T, H]
  torch::Tensor weight;       // [V, H]
  torch::Tensor next_tokens;  // [n, T], -1 none
};

Case make_case() {
  torch::manual_seed(7);
  Case c{torch::randn({kSamples, kPositions, kWidth}), torch::randn({kVocabulary, kWidth}), torch::randint(0, kVocabulary, {kSamples, kPositions})};
  // Ties: rows 3 and 41 (different blocks) are the same row, so their logits tie everywhere.
  c.weight[41] = c.weight[3];
  c.weight[3] *= 8;  // and large, so that they are often the largest
  c.weight[41] = c.weight[3];
  // Position (0, 3) points along row 3: the tied rows 3 and 41 have their largest logits there,
  // and the first (3) is the prediction, so its target 3 is a hit (41 would be a miss).
  c.features[0][3] = c.weight[3] / 8;
  c.next_tokens.index_put_({0, 3}, 3);
  // The other positions of sample 2 target their own prediction: hits in any block.
  c.next_tokens[2] = torch::matmul(c.features[2], c.weight.t()).argmax(1);
  c.next_tokens.index_put_({1, torch::indexing::Slice(4, torch::indexing::None)}, -1);
  c.next_tokens.index_put_({2, 0}, -1);
  return c;
}

// The whole-logits results: log-sum-exp [n, T], losses [n], hits, and the losses' gradient with
// respect to the logits before the cap.
struct Whole {
  torch::Tensor log_sum_exp, losses, gradient;
  long long hits = 0, counted = 0;
};

Whole whole_results(const Case& c, double softcap) {
  Whole w;
  const torch::Tensor raw = torch::matmul(c.features, c.weight.t()).requires_grad_(true);
  const torch::Tensor logits = softcap > 0.0 ? (raw / softcap).tanh() * softcap : raw;
  w.log_sum_exp = logits.logsumexp(2).detach();
  const torch::Tensor counted = c.next_tokens.ge(0);
  const torch::Tensor token_losses = torch::nn::functional::cross_entropy(
      logits.reshape({-1, kVocabulary}), c.next_tokens.reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone).ignore_index(-1)).view({kSamples, kPositions});
  const torch::Tensor losses = token_losses.sum(1) / counted.sum(1).to(torch::kFloat32);
  losses.sum().backward();
  w.losses = losses.detach();
  w.gradient = raw.grad();
  w.hits = logits.argmax(2).eq(c.next_tokens).logical_and(counted).sum().item<int64_t>();
  w.counted = counted.sum().item<int64_t>();
  return w;
}

void expect_close(const torch::Tensor& got, const torch::Tensor& want, double tolerance) {
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_LE((got - want).abs().max().item<double>(), tolerance * (1.0 + want.abs().max().item<double>())) << got << want;
}

class BlockedHead : public ::testing::TestWithParam<std::tuple<int64_t, double>> {};

TEST_P(BlockedHead, EqualsTheWholeLogits) {
  const auto [rows, softcap] = GetParam();
  const Case c = make_case();
  const Whole whole = whole_results(c, softcap);
  const VocabularyHead head{"lm_head.weight", softcap};
  const VocabularyBlocks blocks{kVocabulary, rows};
  StreamingLogits stream(c.next_tokens);
  for (int64_t b = 0; b < blocks.count(); ++b)
    stream.add(block_logits(head, c.features, c.weight.slice(0, blocks.begin(b), blocks.end(b))), blocks.begin(b));
  expect_close(stream.log_sum_exp(), whole.log_sum_exp, 1e-6);
  expect_close(stream.losses(), whole.losses, 1e-6);
  EXPECT_EQ(stream.hits(), std::make_pair(whole.hits, whole.counted));
  EXPECT_GE(whole.hits, kPositions);  // (0, 3) and sample 2 but its uncounted first position

  const torch::Tensor weights = position_weights(c.next_tokens);
  std::vector<torch::Tensor> parts;
  for (int64_t b = 0; b < blocks.count(); ++b) {
    const torch::Tensor logits = block_logits(head, c.features, c.weight.slice(0, blocks.begin(b), blocks.end(b)));
    parts.push_back(block_logit_gradient(head, logits, stream.log_sum_exp(), c.next_tokens, weights, blocks.begin(b)));
  }
  expect_close(torch::cat(parts, 2), whole.gradient, 1e-6);
}

INSTANTIATE_TEST_SUITE_P(BlocksAndCaps, BlockedHead,
                         ::testing::Combine(::testing::Values<int64_t>(1, 8, 50), ::testing::Values(0.0, 3.0)));

TEST(VocabularyBlocks, SizedToTheBufferBound) {
  // 8 samples x max(width 32, 12 positions) = 256 elements a row.
  VocabularyBlocks blocks = vocabulary_blocks(96, 32, 8, 12, 64);
  EXPECT_EQ(blocks.rows, 1);
  EXPECT_EQ(blocks.count(), 96);
  blocks = vocabulary_blocks(100, 16, 8, 4, 8 * 16 * 30);
  EXPECT_EQ(blocks.rows, 30);
  EXPECT_EQ(blocks.count(), 4);
  EXPECT_EQ(blocks.begin(3), 90);
  EXPECT_EQ(blocks.end(3), 100);
  // Long sequences bound the rows by the logits [samples, positions, rows].
  EXPECT_EQ(vocabulary_blocks(1000, 16, 8, 64, 8 * 64 * 5).rows, 5);
  // Never more rows than the vocabulary.
  EXPECT_EQ(vocabulary_blocks(10, 4, 1, 1, 1 << 20).rows, 10);
}

}  // namespace
}  // namespace gradfix
