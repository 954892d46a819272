#include "statistics_cache.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>

#include "gradfix/dist/collective_output.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/model_files.hpp"
#include "gradfix/io/splitmix.hpp"
#include "gradfix/version.hpp"

namespace gradfix {
namespace {

// Bumped whenever what an entry holds, or how its key is formed, changes.
constexpr int kCacheFormat = 1;


// A sequential 64-bit digest of bytes (not cryptographic: it tells stale entries apart).
class Digest {
 public:
  void add(const void* data, std::size_t size) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < size; i += 8) {
      std::uint64_t word = 0;
      std::memcpy(&word, bytes + i, std::min<std::size_t>(8, size - i));
      state_ = splitmix64(state_ ^ word) + static_cast<std::uint64_t>(size);
    }
    state_ = splitmix64(state_ ^ size);
  }
  void add(const std::string& text) { add(text.data(), text.size()); }
  void add(const torch::Tensor& tensor) {
    if (!tensor.defined()) return add(std::string("undefined"));
    const torch::Tensor values = tensor.to(torch::kCPU).contiguous();
    add(std::string(c10::toString(values.scalar_type())));
    for (int64_t size : values.sizes()) add(&size, sizeof size);
    add(values.data_ptr(), static_cast<std::size_t>(values.numel()) * values.element_size());
  }
  std::uint64_t value() const { return state_; }

 private:
  std::uint64_t state_ = 0x6772616466697821ULL;
};

std::string hex(std::uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(value));
  return text;
}

// A digest of every element of the weights that does not depend on P: the sum, modulo 2^64, of
// a mix of each element's place in the model and its bits. Each rank sums its pieces; the sums
// travel as two 32-bit halves so that the all-reduce cannot overflow.
std::string weights_digest(const ShardedWeights& weights, const JobContext& context) {
  std::vector<long long> offsets(weights.layout().size(), 0);
  for (std::size_t t = 1; t < offsets.size(); ++t) offsets[t] = offsets[t - 1] + weights.layout()[t - 1].numel();
  std::uint64_t sum = 0;
  const auto& pieces = weights.plan().pieces(context.rank());
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    const std::vector<float>& values = weights.pieces()[k];
    const auto first = static_cast<std::uint64_t>(offsets[pieces[k].tensor] + pieces[k].begin);
    for (std::size_t i = 0; i < values.size(); ++i) {
      std::uint32_t bits = 0;
      std::memcpy(&bits, &values[i], sizeof bits);
      sum += splitmix64((first + i) * 0xD1B54A32D192ED03ULL ^ bits);
    }
  }
  long long halves[2] = {static_cast<long long>(sum >> 32), static_cast<long long>(sum & 0xFFFFFFFFULL)};
  context.host().allreduce(halves, halves, 2, DType::kI64, ReduceOp::kSum);
  return hex((static_cast<std::uint64_t>(halves[0]) << 32) + static_cast<std::uint64_t>(halves[1]));
}

// A digest of the shots as the model reads them, in order.
std::string shots_digest(const SampleSource& shots) {
  Digest digest;
  constexpr long long kGroup = 64;
  for (long long begin = 0; begin < shots.samples; begin += kGroup) {
    std::vector<long long> indices(static_cast<std::size_t>(std::min(kGroup, shots.samples - begin)));
    std::iota(indices.begin(), indices.end(), begin);
    const Batch batch = shots.batch(indices, torch::kCPU);
    digest.add(batch.inputs);
    digest.add(batch.labels);
    digest.add(batch.mask);
  }
  return hex(digest.value());
}

}  // namespace

std::string file_digest(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw InputError(path + ": cannot open");
  Digest digest;
  std::vector<char> block(1 << 20);
  while (file) {
    file.read(block.data(), static_cast<std::streamsize>(block.size()));
    digest.add(block.data(), static_cast<std::size_t>(file.gcount()));
  }
  return hex(digest.value());
}

std::string statistics_inputs(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& shots, const JobContext& context,
                              const std::string& extra) {
  Digest config;
  config.add(read_config_text(model_file(model.directory(), "config.json")));
  return "gradfix statistics cache " + std::to_string(kCacheFormat) + "\ngradfix " + GRADFIX_VERSION_STRING + "\nmodel_type " + model.model_type() +
         "\nconfig.json " + hex(config.value()) + "\nweights " + weights_digest(weights, context) + "\nshots " + std::to_string(shots.samples) +
         " " + shots_digest(shots) + "\n" + extra;
}

StatisticsKey statistics_key(const std::string& inputs, SignMode sign_mode, VoteMethod method, VotePrecision precision) {
  StatisticsKey key;
  key.text = inputs + "sign_mode " + sign_mode_name(sign_mode) + "\nmethod " + vote_method_name(method) + "\nprecision " +
             vote_precision_name(precision) + "\n";
  Digest name;
  name.add(key.text);
  key.digest = hex(name.value());
  return key;
}

std::optional<std::vector<std::vector<float>>> StatisticsCache::read(const StatisticsKey& key, const ShardedWeights& weights, long long samples,
                                                                     const JobContext& context) const {
  std::vector<std::vector<float>> pieces;
  long long ok = 1;
  try {
    const auto reader = open_reader(path(key));
    const auto& metadata = reader->metadata();
    const auto stored = metadata.find("gradfix.statistics_key");
    const auto count = metadata.find("gradfix.samples");
    if (stored == metadata.end() || stored->second != key.text || count == metadata.end() || count->second != std::to_string(samples)) ok = 0;
    for (const auto& tensor : weights.layout()) {
      const TensorInfo* found = ok != 0 ? reader->find(tensor.name) : nullptr;
      if (found == nullptr || found->shape != tensor.shape) ok = 0;
    }
    if (ok != 0) pieces = read_pieces(*reader, weights.layout(), weights.plan(), context.rank());
  } catch (const Error&) {
    ok = 0;  // absent or unreadable: recomputed
  }
  context.host().allreduce(&ok, &ok, 1, DType::kI64, ReduceOp::kMin);
  if (ok == 0) return std::nullopt;
  return pieces;
}

void StatisticsCache::write(const StatisticsKey& key, const ShardedWeights& weights, const ShardedStatistics& statistics, SignMode sign_mode,
                            const std::string& model_type, const JobContext& context) const {
  context.agree([&] {
    if (context.is_root()) ensure_directory(directory_);
  });
  write_sharded_statistics(context, weights, statistics, sign_mode, 0, model_type, path(key), {{"gradfix.statistics_key", key.text}});
}

}  // namespace gradfix
