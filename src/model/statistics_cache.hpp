#pragma once
// Internal to the LibTorch part: few-shot statistics kept on disk and reused (transport
// --statistics-cache DIR; a sweep uses OUT/statistics). The gradient pass is what a transport
// costs on a large model, and every point of a sweep over mask modes, alpha grids or fine-tuning
// options with the same model, shots and sign mode would repeat it. An entry is a statistics
// checkpoint named by a digest of its key, and its key's full text is stored inside:
//
//   key    format version, gradfix's version, the model's type and config.json, a digest of B's
//          weights (of every element, whatever P), a digest of the shots (their tokens or
//          pixels and labels, in order), sign mode, vote method and precision
//   read   every rank reads its pieces; an entry that is absent, unreadable, of another key, of
//          another layout or sample count is a miss, agreed over the ranks, and recomputed
//   write  as any statistics checkpoint: temporary names, published when every rank succeeded,
//          so ranks and array tasks share the directory safely (equal keys write equal bytes)

#include <optional>
#include <string>
#include <vector>

#include "gradfix/dist/job_context.hpp"
#include "gradfix/model/jobs.hpp"
#include "sharded_executor.hpp"

namespace gradfix {

struct StatisticsKey {
  std::string text;    // stored in the entry, compared on reading
  std::string digest;  // 16 hex digits: the entry's file name
};

// What the statistics of `shots` on `weights` (no offset set) depend on besides their sign mode
// and method: the first lines of their key. `extra` adds lines for what else the model's math
// depends on (a CLIP zero-shot head's digest). A pass over B's pieces on every rank: a job
// computes it once for all its keys. Collective.
std::string statistics_inputs(const LayeredModel& model, const ShardedWeights& weights, const SampleSource& shots, const JobContext& context,
                              const std::string& extra = "");
// The key of the statistics with `inputs`, `sign_mode` and `method`.
StatisticsKey statistics_key(const std::string& inputs, SignMode sign_mode, VoteMethod method, VotePrecision precision);
// A digest of a file's bytes, as 16 hex digits (for `extra`).
std::string file_digest(const std::string& path);

class StatisticsCache {
 public:
  explicit StatisticsCache(std::string directory) : directory_(std::move(directory)) {}
  // This rank's pieces of the entry for `key` as float32 (vote counts exactly), or nullopt on a
  // miss; every rank gets the same answer. Collective.
  std::optional<std::vector<std::vector<float>>> read(const StatisticsKey& key, const ShardedWeights& weights, long long samples,
                                                      const JobContext& context) const;
  // Stores `statistics` under `key`. Collective.
  void write(const StatisticsKey& key, const ShardedWeights& weights, const ShardedStatistics& statistics, SignMode sign_mode,
             const std::string& model_type, const JobContext& context) const;
  std::string path(const StatisticsKey& key) const { return directory_ + "/" + key.digest + ".safetensors"; }

 private:
  std::string directory_;
};

}  // namespace gradfix
