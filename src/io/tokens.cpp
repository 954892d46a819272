#include "gradfix/io/tokens.hpp"

#include <limits>

#include "gradfix/io/error.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {
namespace {

std::vector<long long> read_integers(const TensorReader& reader, const std::string& name, long long elements) {
  const TensorInfo& info = reader.info(name);
  std::vector<long long> values(static_cast<std::size_t>(elements));
  if (info.dtype == DType::kI64) {
    reader.read_raw(name, 0, elements, values.data());
  } else if (info.dtype == DType::kI32) {
    std::vector<std::int32_t> narrow(static_cast<std::size_t>(elements));
    reader.read_raw(name, 0, elements, narrow.data());
    for (std::size_t i = 0; i < narrow.size(); ++i) values[i] = narrow[i];
  } else {
    throw InputError(reader.path() + ": '" + name + "' is " + dtype_name(info.dtype) + "; token data must be I64 or I32");
  }
  return values;
}

std::string at(const TokenData& data, long long n, long long t) {
  return data.source + ": sample " + std::to_string(n) + ", position " + std::to_string(t);
}

}  // namespace

TokenData TokenData::subset(const std::vector<long long>& indices) const {
  TokenData part;
  part.source = source;
  part.samples = static_cast<long long>(indices.size());
  part.length = length;
  for (long long index : indices) {
    GRADFIX_CHECK(index >= 0 && index < samples, "sample " + std::to_string(index) + " of " + std::to_string(samples));
    const auto begin = static_cast<std::size_t>(index * length), end = begin + static_cast<std::size_t>(length);
    part.input_ids.insert(part.input_ids.end(), input_ids.begin() + begin, input_ids.begin() + end);
    part.labels.insert(part.labels.end(), labels.begin() + begin, labels.begin() + end);
    part.attention_mask.insert(part.attention_mask.end(), attention_mask.begin() + begin, attention_mask.begin() + end);
  }
  return part;
}

long long TokenData::targets(long long n) const {
  long long count = 0;
  for (long long t = 1; t < length; ++t) count += labels[static_cast<std::size_t>(n * length + t)] != kIgnoredLabel;
  return count;
}

TokenData load_token_data(const std::string& path, long long max_bytes) {
  const auto reader = open_reader(path);
  const TensorInfo* ids = reader->find("input_ids");
  const TensorInfo* labels = reader->find("labels");
  if (ids == nullptr || labels == nullptr)
    throw InputError(path + ": token data needs 'input_ids' and 'labels' ([N, T] integers); the file has " +
                     std::to_string(reader->tensors().size()) + " other tensors");
  if (ids->shape.size() != 2) throw InputError(path + ": 'input_ids' must be [N, T], got " + format_shape(ids->shape));
  if (labels->shape != ids->shape)
    throw InputError(path + ": 'labels' is " + format_shape(labels->shape) + " but 'input_ids' is " + format_shape(ids->shape));
  const TensorInfo* mask = reader->find("attention_mask");
  if (mask != nullptr && mask->shape != ids->shape)
    throw InputError(path + ": 'attention_mask' is " + format_shape(mask->shape) + " but 'input_ids' is " + format_shape(ids->shape));
  TokenData data;
  data.source = path;
  data.samples = ids->shape[0];
  data.length = ids->shape[1];
  if (data.samples < 1 || data.length < 2)
    throw InputError(path + ": token data must hold at least one sample of at least two tokens, got " + format_shape(ids->shape));
  // Three int64 arrays of N * T, checked before anything is allocated.
  const long long elements = data.samples * data.length;
  if (data.length > std::numeric_limits<long long>::max() / data.samples || elements > max_bytes / 24)
    throw InputError(path + ": " + format_shape(ids->shape) + " tokens need more than the " + std::to_string(max_bytes) +
                     " bytes allowed");
  data.input_ids = read_integers(*reader, "input_ids", elements);
  data.labels = read_integers(*reader, "labels", elements);
  data.attention_mask = mask != nullptr ? read_integers(*reader, "attention_mask", elements)
                                        : std::vector<long long>(static_cast<std::size_t>(elements), 1);
  for (long long n = 0; n < data.samples; ++n) {
    bool padding = false;
    for (long long t = 0; t < data.length; ++t) {
      const auto i = static_cast<std::size_t>(n * data.length + t);
      const long long m = data.attention_mask[i];
      if (m != 0 && m != 1) throw InputError(at(data, n, t) + ": attention_mask is " + std::to_string(m) + ", expected 0 or 1");
      if (m == 0 && t == 0) throw InputError(at(data, n, t) + ": the first token is masked; only right padding is supported");
      if (m == 1 && padding)
        throw InputError(at(data, n, t) + ": a token after padding; only right padding (1...1 0...0) is supported");
      padding = padding || m == 0;
      if (data.input_ids[i] < 0) throw InputError(at(data, n, t) + ": token id " + std::to_string(data.input_ids[i]) + " is negative");
      const long long label = data.labels[i];
      if (label != kIgnoredLabel && label < 0)
        throw InputError(at(data, n, t) + ": label " + std::to_string(label) + " is neither -100 (ignored) nor a token id");
      if (m == 0 && label != kIgnoredLabel)
        throw InputError(at(data, n, t) + ": a padding position has label " + std::to_string(label) + "; padding must be -100");
    }
    if (data.targets(n) == 0)
      throw InputError(data.source + ": sample " + std::to_string(n) + " has no target token (every label after the first is -100)");
  }
  return data;
}

void check_vocabulary(const TokenData& data, long long vocab_size) {
  for (long long n = 0; n < data.samples; ++n)
    for (long long t = 0; t < data.length; ++t) {
      const auto i = static_cast<std::size_t>(n * data.length + t);
      if (data.input_ids[i] >= vocab_size)
        throw InputError(at(data, n, t) + ": token id " + std::to_string(data.input_ids[i]) + " >= the model's vocab_size " +
                         std::to_string(vocab_size));
      if (data.labels[i] >= vocab_size)
        throw InputError(at(data, n, t) + ": label " + std::to_string(data.labels[i]) + " >= the model's vocab_size " +
                         std::to_string(vocab_size));
    }
}

}  // namespace gradfix
