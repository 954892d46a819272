#pragma once
// Internal to the LibTorch part: transport with the parameters sharded, for any model of the
// layer executor (decoders, CLIP). Each rank holds its pieces of B, of tau and of tau_B; every
// evaluation of B + alpha * tau gathers one stage at a time; the GradFix model is written piece
// by piece in B's format with B's model files.

#include <ostream>
#include <string>
#include <vector>

#include "architecture.hpp"
#include "shots.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {

struct ShardedTransportData {
  SampleSource shots;    // the few-shot gradients
  SampleSource support;  // alpha is chosen on its mean loss
  SampleSource test;     // read only for the rows
  std::string metric;       // the table's accuracy column ("test acc", "test tok acc")
  std::string metric_json;  // what the accuracy is in results.json ("accuracy", "token_accuracy")
};

// Rows: zero-shot, naive, GradFix, and with B_ft the oracle and the upper bound. Collective.
std::vector<TransportRow> run_sharded_transport(const TransportJob& job, const LayeredModel& model, const ShardedTransportData& data,
                                               const torch::Device& device, std::ostream& log, const JobContext& context);

// The shots of `pool` (shots.hpp: an indices file, the first --num-samples of a seeded shuffle,
// or --shots-per-class per label by --selection) and the support set (the next --support-size
// of that shuffle, disjoint from the shots).
void split_pool(const ShotPool& pool, const TransportJob& job, std::vector<long long>& shots, std::vector<long long>& support);

}  // namespace gradfix
