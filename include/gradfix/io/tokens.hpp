#pragma once
// Few-shot data for language models: token sequences with their loss targets. The file (HDF5, or
// safetensors with the same names) holds
//   input_ids       [N, T] int64 or int32
//   labels          [N, T] int64 or int32; -100 = ignored; aligned with input_ids (the model
//                   shifts them inside, as transformers does: position t predicts labels[t + 1])
//   attention_mask  [N, T] optional, 1 for tokens and 0 for right padding
// A sample's loss is the mean cross-entropy over its target tokens (labels != -100 after the
// shift). No LibTorch here.

#include <string>
#include <vector>

namespace gradfix {

constexpr long long kIgnoredLabel = -100;

struct TokenData {
  std::string source;                  // the file, for messages
  long long samples = 0;
  long long length = 0;                // T
  std::vector<long long> input_ids;    // N * T
  std::vector<long long> labels;       // N * T
  std::vector<long long> attention_mask;  // N * T, all ones when the file has none

  // The samples at these indices, in this order.
  TokenData subset(const std::vector<long long>& indices) const;
  // Target tokens of sample n after the shift (labels[n, t + 1] != -100 for t < T - 1).
  long long targets(long long n) const;
};

// Reads and checks the file: shapes agree, masks are 0/1 with right padding only, labels are
// -100 or non-negative, every sample has at least one target token, and nothing exceeds
// `max_bytes` of memory. InputError names the file, the sample and the values.
TokenData load_token_data(const std::string& path, long long max_bytes = 1LL << 33);

// Checks token ids and labels against the model's vocabulary: InputError naming the file, the
// sample, the position and the value.
void check_vocabulary(const TokenData& data, long long vocab_size);

}  // namespace gradfix
