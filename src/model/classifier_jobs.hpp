#pragma once
// Internal to the LibTorch part: what the classifier jobs (jobs.cpp), their transport
// (classifier_transport.cpp) and the demo (demo.cpp) share. A classifier is replicated on every
// rank; its parameters travel as `Vectors`, whole tensors by name.

#include <torch/torch.h>

#include <functional>
#include <map>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "classifier.hpp"
#include "gradfix/io/dataset.hpp"
#include "gradfix/dist/job_context.hpp"
#include "gradfix/model/jobs.hpp"
#include "shots.hpp"

namespace gradfix {

using Vectors = std::map<std::string, std::vector<float>>;

// A data set as a job reads it: samples [skip, skip + limit) (0: all), then --transform.
Dataset load_data(const DataOptions& options, long long skip = 0, long long limit = 0);
// Adam on `data`, shuffled per epoch by `seed`; `frozen` names tensors that keep their values
// (no gradient, no optimiser state). One line per epoch goes to `log`, prefixed by `label`.
void train_model(Classifier& model, const Dataset& data, int epochs, double lr, long long batch, std::uint64_t seed,
                 std::ostream& log, const std::string& label, const std::set<std::string>& frozen = {});
// The statistics of the descent direction over these samples, computed by every rank on its
// share (every P-th sample) and all-reduced: vote counts for max, -gradient sums for mean.
// `source` names the data in messages.
Vectors descent_statistics(Classifier& model, const Dataset& shots, SignMode sign_mode, VoteMethod method,
                           const JobContext& context, const std::string& source);
// a - b, tensor by tensor.
Vectors difference(const Vectors& a, const Vectors& b);
// A checkpoint's values of the model's parameters.
Vectors read_vectors(const std::string& path, Classifier& model);
// The model at base + alpha * vector on `data`; the model is left at `base`.
Evaluation evaluate_with(Classifier& model, const Vectors& base, const Vectors& vector, double alpha, const Dataset& data);
// The shots of a classifier's data set (shots.hpp); coreset, k-medoids and herding compare
// samples by the model's penultimate activations unless a features file is given.
std::vector<long long> classifier_shots(Classifier& model, const Dataset& data, const std::string& name, const ShotSelection& selection,
                                        long long per_class, std::uint64_t seed);
// The tensors of `model` that the regexes `patterns` (the option `option`) match. Every pattern
// must match a tensor, and one tensor at least must stay trainable.
std::set<std::string> frozen_tensors(Classifier& model, const std::vector<std::string>& patterns, const std::string& option,
                                     const std::string& source);

// What a classifier's transport reads: B (the model, at its own weights), tau_A, and with B_ft
// tau_B and B_ft's values; the few-shot pool and the test set.
struct TransportInputs {
  Classifier* target = nullptr;
  Vectors tau;
  Vectors tau_b;  // empty without B_ft
  Vectors target_finetuned;
  Dataset pool;
  Dataset test;
};

// Every row of a classifier's transport (transport.hpp); `transported` (optional) gets B + alpha
// * masked tau at GradFix's alpha. Only a transport of its own reports progress (the demo runs
// many short ones).
std::vector<TransportRow> transport_core(TransportInputs& in, const TransportJob& job, const JobContext& context,
                                         Vectors* transported, bool report_progress);
// GradFix's test accuracy alone (the ablations' row); `control` (optional) replaces the masked
// vector by one derived from it (the ablation's random control at the mask's kept count).
double gradfix_accuracy(TransportInputs& in, const TransportJob& job, const JobContext& context,
                        const std::function<Vectors(const Vectors&)>& control = nullptr);
// The shots of a transport (by its selection) and its support set: the next support_size
// samples of a seeded shuffle of the rest of the pool.
void shots_and_support(TransportInputs& in, const TransportJob& job, const JobContext& context, Dataset& shots, Dataset& support);

}  // namespace gradfix
