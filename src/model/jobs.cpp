// The model jobs: init, train, eval, signs, transport and the demo. Models are small enough to
// be replicated on every rank here; what is split across ranks is the few-shot gradient pass
// (each rank takes every P-th shot) and its statistics are all-reduced, so the result is the
// same for any number of ranks.
#include <dlfcn.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <fstream>
#include <iomanip>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "classifier.hpp"
#include "shots.hpp"
#include "decoder_jobs.hpp"
#include "vision_jobs.hpp"
#include "architecture.hpp"
#include "decoder.hpp"
#include "gradfix/comm/backend.hpp"
#include "gradfix/core/error.hpp"
#include "gradfix/core/select.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/mask/compare.hpp"
#include "gradfix/mask/mask.hpp"
#include "gradfix/merge/merge.hpp"
#include "gradfix/model/jobs.hpp"
#include "gradfix/signs/statistics.hpp"
#include "transport.hpp"
#include "transport_rows.hpp"

namespace gradfix {
namespace {

using Vectors = std::map<std::string, std::vector<float>>;


Dataset load_data(const DataOptions& options, long long skip = 0, long long limit = 0) {
  Dataset data = load_dataset(options.spec);
  if (skip > 0 || limit > 0) {
    if (skip >= data.size()) throw InputError(options.spec + ": cannot skip " + std::to_string(skip) + " of " + std::to_string(data.size()) + " samples");
    const long long stop = limit > 0 ? std::min(data.size(), skip + limit) : data.size();
    std::vector<long long> indices;
    for (long long i = skip; i < stop; ++i) indices.push_back(i);
    const long long classes = data.classes;
    data = data.subset(indices);
    data.classes = classes;
  }
  apply_transform(data, options.transform);
  return data;
}

// `frozen` names tensors that keep their values: they get no gradient and no optimiser state.
void train_model(Classifier& model, const Dataset& data, int epochs, double lr, long long batch, std::uint64_t seed,
                 std::ostream& log, const std::string& label, const std::set<std::string>& frozen = {}) {
  std::vector<torch::Tensor> parameters;
  for (auto& [name, parameter] : model.parameters()) {
    if (frozen.count(name)) {
      parameter.requires_grad_(false);
      continue;
    }
    parameters.push_back(parameter);
  }
  torch::optim::Adam optimizer(parameters, torch::optim::AdamOptions(lr));
  const torch::Tensor inputs = inputs_tensor(data, model.device()), labels = labels_tensor(data, model.device());
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const auto order = shuffled_indices(data.size(), seed * 7919 + static_cast<std::uint64_t>(epoch));
    const torch::Tensor permutation = torch::from_blob(const_cast<long long*>(order.data()), {data.size()}, torch::kInt64).to(torch::TensorOptions().device(model.device()), false, true);
    double total = 0.0;
    long long correct = 0;
    for (int64_t start = 0; start < data.size(); start += batch) {
      const torch::Tensor index = permutation.slice(0, start, std::min<int64_t>(data.size(), start + batch));
      const torch::Tensor logits = model.forward(inputs.index_select(0, index));
      const torch::Tensor target = labels.index_select(0, index);
      const torch::Tensor loss = torch::nn::functional::cross_entropy(logits, target);
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      total += loss.item<double>() * static_cast<double>(index.size(0));
      correct += logits.argmax(1).eq(target).sum().item<int64_t>();
      count_progress(index.size(0));
    }
    log << label << " epoch " << epoch + 1 << "/" << epochs << ": loss " << std::fixed << std::setprecision(4)
        << total / static_cast<double>(data.size()) << ", train accuracy " << std::setprecision(2)
        << 100.0 * static_cast<double>(correct) / static_cast<double>(data.size()) << "%\n";
    log.unsetf(std::ios::fixed);
  }
}

// A NaN or Inf in a sample's inputs would cast votes without a word (the sign of NaN counts as
// zero in the batched products): this rank's shots must have finite inputs, named when not.
void require_finite_inputs(const Dataset& part, const std::vector<long long>& shot_numbers, const std::string& source) {
  const long long width = part.size() > 0 ? static_cast<long long>(part.inputs.size()) / part.size() : 0;
  for (long long i = 0; i < part.size(); ++i)
    for (long long j = 0; j < width; ++j) {
      const float value = part.inputs[static_cast<std::size_t>(i * width + j)];
      if (!std::isfinite(value))
        throw InputError(source + ": shot " + std::to_string(shot_numbers[static_cast<std::size_t>(i)]) + " has " +
                         (std::isnan(value) ? "NaN" : "an infinite value") + " at input element " + std::to_string(j));
    }
}

// Finite inputs can still give non-finite gradients (weights with NaN or Inf, an overflow):
// statistics that are not finite are refused rather than written.
void require_finite_statistics(const std::map<std::string, torch::Tensor>& local, const std::string& source) {
  for (const auto& [name, values] : local)
    if (!torch::isfinite(values).all().item<bool>())
      throw InputError(source + ": the few-shot gradients of '" + name + "' are not finite (NaN or Inf): check the model's weights");
}

// The statistics of the descent direction over these samples, computed by every rank on its
// share (every P-th sample) and all-reduced: vote counts for max, -gradient sums for mean.
// `source` names the data in messages.
Vectors descent_statistics(Classifier& model, const Dataset& shots, SignMode sign_mode, VoteMethod method,
                           const JobContext& context, const std::string& source) {
  const int rank = context.rank(), ranks = context.size();
  std::vector<long long> mine;
  for (long long i = rank; i < shots.size(); i += ranks) mine.push_back(i);
  const Dataset part = shots.subset(mine);
  std::map<std::string, torch::Tensor> local;
  const bool empty = part.size() == 0;
  // Only this rank sees its samples: a failure here must stop every rank before the reduction.
  context.agree([&] {
    require_finite_inputs(part, mine, source);
    if (sign_mode == SignMode::kMax) {
      if (!empty && method == VoteMethod::kFast) {
        if (!model.fast_votes(inputs_tensor(part, model.device()), labels_tensor(part, model.device()), local))
          local = loop_votes(model, inputs_tensor(part, model.device()), labels_tensor(part, model.device()));
      } else if (!empty) {
        local = loop_votes(model, inputs_tensor(part, model.device()), labels_tensor(part, model.device()));
      }
    } else if (!empty) {
      local = gradient_sums(model, inputs_tensor(part, model.device()), labels_tensor(part, model.device()));
    }
    require_finite_statistics(local, source);
  });
  count_progress(shots.size());
  Vectors statistics;
  for (auto& [name, parameter] : model.parameters()) {
    const auto count = static_cast<std::size_t>(parameter.numel());
    if (sign_mode == SignMode::kMax) {
      std::vector<float> votes(count, 0.0f);
      if (local.count(name)) {
        const torch::Tensor mine = local[name].to(torch::kCPU).to(torch::kFloat32).contiguous();
        std::memcpy(votes.data(), mine.data_ptr<float>(), count * sizeof(float));
      }
      if (ranks > 1) {
        // Reduced in the narrowest integer type that holds every partial and total vote sum.
        Communicator& comm = context.stats();
        const DType dtype = vote_count_dtype(shots.size(), comm);
        std::vector<unsigned char> narrow(count * dtype_size(dtype));
        convert_from_f32(dtype, votes.data(), narrow.data(), count);
        allreduce_statistics(comm, narrow.data(), static_cast<long long>(count), dtype);
        convert_to_f32(dtype, narrow.data(), votes.data(), count);
      }
      statistics[name] = votes;
    } else {
      std::vector<double> sums(count, 0.0);
      if (local.count(name)) std::memcpy(sums.data(), local[name].to(torch::kCPU).contiguous().data_ptr<double>(), count * sizeof(double));
      if (ranks > 1) allreduce_statistics(context.stats(), sums.data(), static_cast<long long>(count), DType::kF64);
      statistics[name].assign(sums.begin(), sums.end());
    }
  }
  return statistics;
}

Vectors difference(const Vectors& a, const Vectors& b) {
  Vectors out;
  for (const auto& [name, values] : a) {
    const auto& other = b.at(name);
    std::vector<float> delta(values.size());
    for (std::size_t i = 0; i < values.size(); ++i) delta[i] = values[i] - other[i];
    out[name] = delta;
  }
  return out;
}

Vectors read_vectors(const std::string& path, Classifier& model) { return read_parameters(model, path, "the model"); }

Evaluation evaluate_with(Classifier& model, const Vectors& base, const Vectors& vector, double alpha, const Dataset& data) {
  set_moved_parameters(model, base, vector, alpha);
  const Evaluation result = evaluate(model, data);
  set_parameter_values(model, base);
  return result;
}

// The shots: an indices file, the first batches of a shuffle, or K per class.
// The shots of a classifier's data set (shots.hpp); coreset, k-medoids and herding compare
// samples by the model's penultimate activations unless a features file is given.
std::vector<long long> classifier_shots(Classifier& model, const Dataset& data, const std::string& name, const ShotSelection& selection,
                                        long long per_class, std::uint64_t seed) {
  ShotPool pool;
  pool.samples = data.size();
  pool.labels = data.labels;
  pool.classes = model.classes();
  pool.name = name;
  pool.model_features = [&model, &data, name](const std::vector<long long>& indices) {
    torch::NoGradGuard no_gradients;
    return features_in_chunks(indices, 256, [&](const std::vector<long long>& part) {
      const torch::Tensor features = model.features(inputs_tensor(data.subset(part), model.device()));
      if (!features.defined()) throw InputError(name + ": this model has no built-in features for --selection; give --selection-features FILE");
      return features;
    }, name + ": the model's features");
  };
  pool.inputs = [&data](const std::vector<long long>& indices) { return inputs_tensor(data.subset(indices)); };
  return choose_shots(pool, selection, per_class, 0, seed, false);
}

// The tensors of `model` that the regexes `patterns` (the option `option`) match. Every pattern
// must match a tensor, and one tensor at least must stay trainable.
std::set<std::string> frozen_tensors(Classifier& model, const std::vector<std::string>& patterns, const std::string& option,
                                     const std::string& source) {
  std::set<std::string> frozen;
  std::vector<std::string> names;
  for (auto& [name, parameter] : model.parameters()) names.push_back(name);
  for (const auto& pattern : patterns) {
    const TensorSelector selector({pattern}, {});
    bool matched = false;
    for (const auto& name : names)
      if (selector.selects(name)) {
        frozen.insert(name);
        matched = true;
      }
    if (!matched)
      throw InputError(option + " '" + escaped_name(pattern) + "' matches no tensor of " + source + " (its tensors: " + format_name_list(names) + ")");
  }
  if (!names.empty() && frozen.size() == names.size())
    throw InputError(option + " leaves nothing to train: it matches all " + std::to_string(names.size()) + " tensors of " + source);
  return frozen;
}

struct TransportInputs {
  Classifier* target = nullptr;
  Vectors tau;
  Vectors tau_b;  // empty without B_ft
  Vectors target_finetuned;
  Dataset pool;
  Dataset test;
};

// The transport of one (K, seed): shots and support from the pool, statistics on the shots,
// alpha chosen on the support set, the test set read only at the end.
// The shots of a transport (by its selection) and its support set: the next support_size
// samples of a seeded shuffle of the rest of the pool.
void shots_and_support(TransportInputs& in, const TransportJob& job, const JobContext& context, Dataset& shots, Dataset& support) {
  const auto shot_indices = classifier_shots(*in.target, in.pool, job.data.spec, job.selection, job.shots_per_class, job.seed);
  save_chosen_shots(job.selection, shot_indices, context);
  auto rest = complement(in.pool.size(), shot_indices);
  const auto order = shuffled_indices(static_cast<long long>(rest.size()), job.seed + 17);
  std::vector<long long> support_indices;
  for (long long i = 0; i < std::min<long long>(job.support_size, static_cast<long long>(rest.size())); ++i)
    support_indices.push_back(rest[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])]);
  if (support_indices.empty()) throw InputError("the pool has no samples left for the support set after the shots");
  if (context.is_root() && !job.save_support.empty()) write_indices(job.save_support, support_indices);
  shots = in.pool.subset(shot_indices);
  support = in.pool.subset(support_indices);
  shots.classes = support.classes = in.pool.classes;
}

// A classifier replicated on every rank, as a transport target (transport.hpp): the statistics
// are computed data-parallel over the ranks (descent_statistics), every score on every rank whole.
// Vectors are whole tensors in name order, the order of `Vectors`, so that sums over the model
// (<g, d>) add in the same order as before the recipe.
class ReplicatedTarget final : public TransportTarget {
 public:
  ReplicatedTarget(TransportInputs& in, const TransportJob& job, const JobContext& context)
      : model_(*in.target), in_(in), job_(job), context_(context), base_(parameter_values(model_)),
        source_(job.data.spec.empty() ? "the few-shot pool" : job.data.spec) {
    shots_and_support(in, job, context, shots_, support_);
    for (auto& [name, parameter] : model_.parameters()) shapes_[name] = std::vector<long long>(parameter.sizes().begin(), parameter.sizes().end());
    for (const auto& entry : base_) names_.push_back(entry.first);
    // The few-shot fine-tuning rows: every tensor tuned, or some frozen (--finetune-freeze), or both.
    if (job.few_shot_baseline) {
      if (job.finetune_freeze.empty() || job.few_shot_unfrozen_too) few_shot_variants_.push_back({"few-shot fine-tuning of B", {}});
      if (!job.finetune_freeze.empty()) {
        std::string patterns;
        // The user's own patterns, as given (a label, not a name read from a file).
        for (const auto& pattern : job.finetune_freeze) patterns += (patterns.empty() ? "" : " ") + pattern;
        few_shot_variants_.push_back({"few-shot fine-tuning of B (" + (job.finetune_freeze_label.empty() ? "frozen: " + patterns : job.finetune_freeze_label) + ")",
                                      frozen_tensors(model_, job.finetune_freeze, "--finetune-freeze", job.target.empty() ? "B" : job.target)});
      }
    }
  }

  long long shots() const { return shots_.size(); }
  long long support() const { return support_.size(); }
  std::size_t finetune_runs() const { return finetune_lrs().size() * few_shot_variants_.size(); }
  std::vector<long long> finetune_steps() const { return job_.finetune_steps.empty() ? std::vector<long long>{5, 20, 50} : job_.finetune_steps; }
  std::vector<double> finetune_lrs() const { return job_.finetune_lrs.empty() ? std::vector<double>{1e-4, 1e-3, 1e-2} : job_.finetune_lrs; }
  const Vectors& base() const { return base_; }

  ParameterVector vector_of(const Vectors& vectors) const {
    ParameterVector out;
    for (const auto& name : names_) out.push_back(vectors.at(name));
    return out;
  }
  Vectors vectors_of(const ParameterVector& vector) const {
    Vectors out;
    for (std::size_t k = 0; k < names_.size(); ++k) out[names_[k]] = vector[k];
    return out;
  }

  ParameterVector statistics(SignMode mode) override {
    return vector_of(descent_statistics(model_, shots_, mode, VoteMethod::kFast, context_, source_));
  }

  ParameterVector mean_gradient(const ParameterVector* mean_statistics) override {
    ParameterVector gradient = mean_statistics != nullptr ? *mean_statistics : statistics(SignMode::kMean);
    for (auto& values : gradient)
      for (auto& value : values) value = static_cast<float>(-static_cast<double>(value) / static_cast<double>(shots_.size()));
    return gradient;
  }

  ParameterVector mask(MaskMode mode, const MaskOptions& options, const ParameterVector& tau, const ParameterVector& statistics) override {
    ParameterVector out;
    for (std::size_t k = 0; k < names_.size(); ++k)
      out.push_back(mask_tensor(mode, options, tau[k], statistics[k], shapes_.at(names_[k]), tensor_key_of(names_[k])));
    return out;
  }

  PairStats compare(const ParameterVector& a, const ParameterVector& b) override {
    PairStats stats;
    for (std::size_t k = 0; k < a.size(); ++k) stats.add(a[k].data(), b[k].data(), static_cast<long long>(a[k].size()));
    return stats;
  }

  double dot(const ParameterVector& a, const ParameterVector& b) override {
    double sum = 0.0;
    for (std::size_t k = 0; k < a.size(); ++k)
      for (std::size_t i = 0; i < a[k].size(); ++i) sum += static_cast<double>(a[k][i]) * b[k][i];
    return sum;
  }

  Score score(const ParameterVector* delta, double alpha, Split split) override {
    const Dataset& data = split == Split::kShots ? shots_ : split == Split::kSupport ? support_ : in_.test;
    if (delta == nullptr) return as_score(evaluate(model_, data));
    return as_score(evaluate_with(model_, base_, vectors_of(*delta), alpha, data));
  }

  std::vector<TransportRow> finetune_rows(const ParameterVector& gradient) override {
    (void)gradient;  // the classifiers' few-shot rows report no <g, d>
    std::vector<TransportRow> rows;
    for (const auto& [label, frozen] : few_shot_variants_) {
      set_parameter_values(model_, finetuned(frozen));
      const Evaluation test = evaluate(model_, in_.test);
      rows.push_back(make_transport_row(label, test.accuracy, test.loss, -1, -1, -1));
      set_parameter_values(model_, base_);
    }
    return rows;
  }

  std::optional<Score> target_finetuned_score() override {
    if (in_.target_finetuned.empty()) return std::nullopt;
    set_parameter_values(model_, in_.target_finetuned);
    const Evaluation test = evaluate(model_, in_.test);
    set_parameter_values(model_, base_);
    return as_score(test);
  }

 private:
  static Score as_score(const Evaluation& evaluation) { return {evaluation.loss, evaluation.accuracy}; }

  // Few-shot fine-tuning of B on the shots, learning rate and steps chosen on the support set's
  // accuracy; the frozen tensors are left out of the optimizer. Returns the chosen parameters.
  Vectors finetuned(const std::set<std::string>& frozen) {
    double best_accuracy = -1.0;
    Vectors best = base_;
    const std::vector<long long> step_counts = finetune_steps();
    for (double lr : finetune_lrs()) {
      set_parameter_values(model_, base_);
      std::vector<torch::Tensor> parameters;
      for (auto& [name, parameter] : model_.parameters())
        if (frozen.count(name) == 0) parameters.push_back(parameter);
      torch::optim::Adam optimizer(parameters, torch::optim::AdamOptions(lr));
      const torch::Tensor inputs = inputs_tensor(shots_, model_.device()), labels = labels_tensor(shots_, model_.device());
      long long done = 0;
      for (long long steps : step_counts) {
        for (; done < steps; ++done) {
          optimizer.zero_grad();
          torch::nn::functional::cross_entropy(model_.forward(inputs), labels).backward();
          optimizer.step();
          count_progress(shots_.size());
        }
        const double accuracy = evaluate(model_, support_).accuracy;
        if (accuracy > best_accuracy) {
          best_accuracy = accuracy;
          best = parameter_values(model_);
        }
      }
    }
    set_parameter_values(model_, base_);
    return best;
  }

  Classifier& model_;
  TransportInputs& in_;
  const TransportJob& job_;
  const JobContext& context_;
  const Vectors base_;
  const std::string source_;
  Dataset shots_, support_;
  std::map<std::string, std::vector<long long>> shapes_;
  std::vector<std::string> names_;  // name order: the order of Vectors
  std::vector<std::pair<std::string, std::set<std::string>>> few_shot_variants_;
};

TransportRecipe classifier_recipe(const TransportJob& job) { return transport_recipe(job, AlphaPolicy::Metric::kSupportAccuracy); }

// GradFix's test accuracy alone (the ablations' row): the shots' statistics, the mask, alpha on
// the support set, the test set once; the other rows of a transport are not computed.
// `control` (optional) replaces the masked vector by one derived from it (the ablation's random
// control at the mask's kept count).
double gradfix_accuracy(TransportInputs& in, const TransportJob& job, const JobContext& context,
                        const std::function<Vectors(const Vectors&)>& control = nullptr) {
  ReplicatedTarget target(in, job, context);
  TransportRecipe recipe = classifier_recipe(job);
  if (control) recipe.control = [&](const ParameterVector& masked) { return target.vector_of(control(target.vectors_of(masked))); };
  return gradfix_row(target, target.vector_of(in.tau), recipe).accuracy;
}

// Every row of a classifier's transport (transport.hpp); `transported` (optional) gets B + alpha
// * masked tau at GradFix's alpha. The demo runs many short transports: only a transport of its
// own reports progress.
std::vector<TransportRow> transport_core(TransportInputs& in, const TransportJob& job, const JobContext& context,
                                         Vectors* transported, bool report_progress) {
  ReplicatedTarget target(in, job, context);
  const TransportRecipe recipe = classifier_recipe(job);
  Progress progress(context, "transport",
                    transport_sample_passes(job.sign_mode, target.shots(), target.support(), in.test.size(), recipe.alpha.grid.size(),
                                            !in.tau_b.empty(), target.finetune_runs(), target.finetune_steps(), !in.target_finetuned.empty()),
                    0, "samples");
  std::optional<CurrentProgress> current;
  if (report_progress) current.emplace(progress);
  const ParameterVector tau_b = in.tau_b.empty() ? ParameterVector() : target.vector_of(in.tau_b);
  const TransportOutcome outcome = run_transport_recipe(target, target.vector_of(in.tau), in.tau_b.empty() ? nullptr : &tau_b, recipe);
  if (transported != nullptr) {
    *transported = target.base();
    const Vectors masked = target.vectors_of(outcome.masked);
    for (auto& [name, values] : *transported)
      for (std::size_t i = 0; i < values.size(); ++i) values[i] += static_cast<float>(outcome.gradfix_alpha) * masked.at(name)[i];
  }
  progress.finish();
  return outcome.rows;
}

}  // namespace

bool torch_available() { return true; }

int configure_threads(int ranks_on_node) {
  int threads = 0;
  if (const char* forced = std::getenv("GRADFIX_THREADS")) {
    char* end = nullptr;
    const long value = std::strtol(forced, &end, 10);
    if (end == forced || *end != '\0' || value < 1 || value > 4096)
      throw InputError(std::string("GRADFIX_THREADS='") + forced + "': expected a number of threads from 1 to 4096");
    threads = static_cast<int>(value);
  } else {
    cpu_set_t mask;
    CPU_ZERO(&mask);
    const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
    int usable = ::sched_getaffinity(0, sizeof mask, &mask) == 0 ? CPU_COUNT(&mask) : static_cast<int>(online);
    // A mask of the whole node: the launcher bound nothing, and the node's ranks share it.
    if (usable >= online) usable = static_cast<int>(online) / std::max(1, ranks_on_node);
    threads = std::max(1, usable);
  }
  torch::set_num_threads(threads);
  // LibTorch parallelises around its BLAS calls with its own OpenMP pool. A pthreads OpenBLAS
  // (Debian's default) keeps a second pool of one thread per core, and the OpenMP threads spin
  // while they wait, so the two pools fight over the rank's cores: an MLP trained 2.1x slower with
  // two threads than with one on a 2-core machine (docs/benchmarks.md). OpenBLAS gets one thread
  // inside LibTorch's pool unless the user set OPENBLAS_NUM_THREADS.
  if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr) {
    using SetThreads = void (*)(int);
    if (auto set_blas_threads = reinterpret_cast<SetThreads>(::dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) set_blas_threads(1);
  }
  return threads;
}

void configure_allocator() {
#ifdef __GLIBC__
  for (const char* variable : {"GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"})
    if (std::getenv(variable) != nullptr) return;
  // Fixed values also end glibc's own adjustment, which raises the mapping threshold to the
  // largest block freed so far: whether a step faulted then depended on which temporaries
  // happened to come before it (the CNN's votes ran 0.08 or 0.11 ms per sample by that alone).
  // The one-task demo's evaluation batches (about 20 MB) need the 32 MiB: at 4 or 8 MiB it ran
  // as slowly as with glibc's defaults.
  ::mallopt(M_MMAP_THRESHOLD, 32 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 64 << 20);
#endif
}

void print_transport_rows(const std::vector<TransportRow>& rows, std::ostream& log, const char* metric) {
  const int width = std::max(10, static_cast<int>(std::strlen(metric)) + 2);
  int label_width = 34;
  for (const auto& row : rows) label_width = std::max(label_width, static_cast<int>(row.method.size()) + 2);
  log << std::left << std::setw(label_width) << "method" << std::right << std::setw(width) << metric << std::setw(10) << "loss"
      << std::setw(8) << "alpha" << std::setw(8) << "kept" << std::setw(12) << "agree(B)" << std::setw(12) << "<g,d>" << "\n";
  for (const auto& row : rows) {
    auto cell = [](double value, int w, int precision, bool percent) {
      std::ostringstream text;
      if (value < 0) text << std::setw(w) << "-";
      else text << std::setw(w) << std::fixed << std::setprecision(precision) << (percent ? 100.0 * value : value) << (percent ? "%" : "");
      return text.str();
    };
    log << std::left << std::setw(label_width) << row.method << std::right << cell(row.accuracy, width - 1, 2, true) << cell(row.loss, 10, 4, false)
        << cell(row.alpha, 8, 2, false) << cell(row.kept, 7, 1, true) << cell(row.sign_agreement, 11, 1, true) << std::setw(12)
        << derivative_cell(row.directional_derivative) << "\n";
  }
}

std::string derivative_cell(double derivative) {
  if (std::isnan(derivative)) return "-";
  std::ostringstream text;
  text << std::scientific << std::setprecision(2) << derivative;
  return text.str();
}

void add_derivative_summary(const std::vector<TransportRow>& rows, nlohmann::json& results) {
  for (const auto& row : rows) {
    if (row.method.rfind("GradFix", 0) == 0) results["directional_derivative"] = row.directional_derivative;
    if (row.method.rfind("B + alpha tau_A", 0) == 0) results["naive_directional_derivative"] = row.directional_derivative;
  }
}

nlohmann::json transport_rows_json(const std::vector<TransportRow>& rows) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& row : rows) {
    nlohmann::json entry = {{"method", row.method}, {"test_accuracy", row.accuracy}, {"test_loss", row.loss}, {"alpha", row.alpha},
                            {"kept", row.kept}, {"sign_agreement_with_tau_b", row.sign_agreement}};
    if (!std::isnan(row.directional_derivative)) entry["directional_derivative"] = row.directional_derivative;
    if (!row.curve.empty()) {
      nlohmann::json curve = nlohmann::json::array();
      for (const auto& point : row.curve) {
        curve.push_back({{"alpha", point.alpha}, {"support_loss", point.support_loss}, {"shots_loss", point.shots_loss}});
        if (std::isfinite(point.support_accuracy)) curve.back()["support_accuracy"] = point.support_accuracy;
      }
      entry["alpha_curve"] = curve;
    }
    out.push_back(entry);
  }
  return out;
}


// The root writes an output under temporary names, every rank agrees that the job went well so
// far, then the root publishes: a failure on any rank leaves nothing behind.
void publish_from_root(const JobContext& context, const std::function<std::unique_ptr<TensorWriter>()>& write) {
  std::unique_ptr<TensorWriter> writer;
  context.agree([&] {
    if (context.is_root()) writer = write();
  });
  if (writer) writer->publish();
}

std::unique_ptr<Classifier> load_on_device(const std::string& model_spec, const std::string& weights, const JobContext& context) {
  auto model = load_model(model_spec, weights);
  model->to_device(parse_device(context.device, context.local_rank));
  return model;
}

void run_init(const InitJob& job, std::ostream& log, const JobContext& context) {
  // A decoder is initialised from its config.json, whichever family registered its model_type.
  if (!job.config.empty() || is_registered_architecture(job.arch)) {
    if (job.config.empty()) throw InputError("gradfix init --arch " + job.arch + ": --config-file is required");
    run_decoder_init(job, log, context);
    return;
  }
  if (job.dims.empty()) throw InputError("gradfix init: --dims is required for --arch " + job.arch);
  std::unique_ptr<Classifier> model;
  context.agree([&] { model = make_classifier(parse_architecture(job.arch, job.dims), job.seed); });
  publish_from_root(context, [&] { return write_classifier(*model, job.out); });
  long long count = 0;
  for (auto& [name, parameter] : model->parameters()) count += parameter.numel();
  if (context.is_root())
    log << "init: " << job.arch << " " << job.dims << ", " << count << " parameters, seed " << job.seed << ", written to " << job.out << "\n";
}

void run_train(const TrainJob& job, std::ostream& log, const JobContext& context) {
  configure_allocator();
  std::unique_ptr<Classifier> model;
  Dataset data;
  context.agree([&] {
    model = load_on_device(job.model, job.weights, context);
    data = load_data(job.data, job.skip, job.limit);
    check_compatible(*model, data, job.data.spec);
    if (job.shots_per_class > 0 || !job.selection.indices_file.empty() || job.selection.num_batches > 0) {
      const std::vector<long long> chosen = classifier_shots(*model, data, job.data.spec, job.selection, job.shots_per_class, job.seed);
      save_chosen_shots(job.selection, chosen, context);
      const long long classes = data.classes;
      data = data.subset(chosen);
      data.classes = classes;
    } else if (job.selection.strategy != "random" || !job.selection.save_indices.empty()) {
      throw InputError("--selection and --save-indices choose few-shot training data: give --shots-per-class K (or --indices, --num-batches)");
    }
  });
  // --freeze: every pattern must name a tensor, and something must stay trainable.
  std::set<std::string> frozen;
  context.agree([&] { frozen = frozen_tensors(*model, job.freeze, "--freeze", job.weights); });
  std::ostringstream discard;
  // Every rank trains the same replica with the same seed; the root's is written.
  Progress progress(context, "train", static_cast<long long>(job.epochs) * data.size(), 0, "samples");
  context.agree([&] {
    const CurrentProgress current(progress);
    torch::manual_seed(job.seed);
    train_model(*model, data, job.epochs, job.lr, job.batch, job.seed, context.is_root() ? log : discard, "train", frozen);
  });
  progress.finish();
  publish_from_root(context, [&] { return write_classifier(*model, job.out); });
  if (context.is_root()) {
    log << "train: " << data.size() << " samples";
    if (!frozen.empty()) log << ", " << frozen.size() << " tensor(s) frozen: " << format_name_list(std::vector<std::string>(frozen.begin(), frozen.end()));
    log << ", written to " << job.out << "\n";
  }
}

void run_eval(const EvalJob& job, std::ostream& log, const JobContext& context) {
  if (is_image_model_directory(job.weights)) {
    run_clip_eval(job, log, context);
    return;
  }
  if (!job.head.empty()) throw InputError("--head is for CLIP models; " + job.weights + " is not one");
  if (is_model_directory(job.weights)) {
    run_decoder_eval(job, log, context);
    return;
  }
  configure_allocator();
  Evaluation result;
  long long samples = 0;
  context.agree([&] {
    auto model = load_on_device(job.model, job.weights, context);
    const Dataset data = load_data(job.data);
    check_compatible(*model, data, job.data.spec);
    result = evaluate(*model, data);
    samples = data.size();
  });
  if (!job.results.empty())
    context.agree([&] {
      if (context.is_root())
        write_text_file_atomically(job.results, nlohmann::json{{"samples", samples}, {"accuracy", result.accuracy},
                                                          {"mean_loss", result.loss}}.dump(2) + "\n");
    });
  if (!context.is_root()) return;
  log << "eval: " << samples << " samples, accuracy " << std::fixed << std::setprecision(2) << 100.0 * result.accuracy
      << "%, loss " << std::setprecision(4) << result.loss << "\n";
  log.unsetf(std::ios::fixed);
}

void run_signs(const SignsJob& job, std::ostream& log, const JobContext& context) {
  if (is_image_model_directory(job.weights)) {
    run_clip_signs(job, log, context);
    return;
  }
  if (!job.head.empty()) throw InputError("--head is for CLIP models; " + job.weights + " is not one");
  if (is_model_directory(job.weights)) {
    run_decoder_signs(job, log, context);
    return;
  }
  configure_allocator();
  std::unique_ptr<Classifier> model;
  Dataset shots;
  context.agree([&] {
    model = load_on_device(job.model, job.weights, context);
    const Dataset data = load_data(job.data);
    check_compatible(*model, data, job.data.spec);
    const std::vector<long long> chosen = classifier_shots(*model, data, job.data.spec, job.selection, job.shots_per_class, job.seed);
    save_chosen_shots(job.selection, chosen, context);
    shots = data.subset(chosen);
    shots.classes = data.classes;
  });
  Progress progress(context, "signs", shots.size(), 0, "samples");
  const CurrentProgress current(progress);
  const Vectors statistics = descent_statistics(*model, shots, job.sign_mode, job.method, context, job.data.spec);
  progress.finish();
  // Vote counts in the narrowest integer type that holds them; mean-mode sums in fp32.
  const DType dtype = job.sign_mode == SignMode::kMax ? (shots.size() <= 127 ? DType::kI8 : shots.size() <= 32767 ? DType::kI16 : DType::kI32) : DType::kF32;
  std::vector<TensorInfo> layout;
  for (auto& [name, parameter] : model->parameters())
    layout.push_back({name, dtype, std::vector<long long>(parameter.sizes().begin(), parameter.sizes().end())});
  publish_from_root(context, [&] {
    Metadata metadata = {{"gradfix.operation", "signs"}, {"gradfix.sign_mode", sign_mode_name(job.sign_mode)},
                         {"gradfix.samples", std::to_string(shots.size())}, {"gradfix.seed", std::to_string(job.seed)}};
    auto writer = open_writer(job.out, layout, metadata);
    for (const auto& tensor : layout) writer->write_f32(tensor.name, 0, statistics.at(tensor.name).data(), tensor.numel());
    writer->finish();
    return writer;
  });
  if (context.is_root())
    log << "signs " << sign_mode_name(job.sign_mode) << ": " << shots.size() << " samples, " << layout.size() << " tensors as "
        << dtype_name(dtype) << ", written to " << job.out << "\n";
}

std::vector<TransportRow> run_transport(const TransportJob& job, std::ostream& log, const JobContext& context) {
  if (!job.finetune_freeze.empty() && is_model_directory(job.target))
    throw InputError("--finetune-freeze is for classifiers; " + job.target +
                     " is a model directory, whose few-shot fine-tuning tunes what the statistics cover (CLIP: never the head)");
  if (!job.save_support.empty() && is_model_directory(job.target))
    throw InputError("--save-support is for classifiers; the support set of " + job.target +
                     " is the --support-size samples after the shots in the seeded shuffle of --data");
  if (is_image_model_directory(job.target)) return run_clip_transport(job, log, context);
  if (!job.head.empty()) throw InputError("--head is for CLIP models; " + job.target + " is not one");
  if (is_model_directory(job.target)) return run_decoder_transport(job, log, context);
  if (job.num_samples > 0) throw InputError("--num-samples chooses the shots of a decoder; a classifier takes --shots-per-class");
  configure_allocator();
  TransportInputs in;
  std::unique_ptr<Classifier> model;
  const auto started = std::chrono::steady_clock::now();
  context.agree([&] {
    model = load_on_device(job.model, job.target, context);
    in.target = model.get();
    if (!job.task_vector.empty()) {
      in.tau = read_vectors(job.task_vector, *model);
    } else if (!job.source_base.empty() && !job.source_finetuned.empty()) {
      in.tau = difference(read_vectors(job.source_finetuned, *model), read_vectors(job.source_base, *model));
    } else {
      throw InputError("transport needs --task-vector, or --source-base and --source-finetuned");
    }
    if (!job.target_finetuned.empty()) {
      in.target_finetuned = read_vectors(job.target_finetuned, *model);
      in.tau_b = difference(in.target_finetuned, parameter_values(*model));
    }
    in.pool = load_data(job.data);
    in.test = load_data(job.test);
    check_compatible(*model, in.pool, job.data.spec);
    check_compatible(*model, in.test, job.test.spec);
  });
  Vectors transported;
  std::vector<TransportRow> rows;
  const auto loaded = std::chrono::steady_clock::now();
  context.agree([&] { rows = transport_core(in, job, context, &transported, true); });
  const auto computed = std::chrono::steady_clock::now();
  const auto seconds = [](auto from, auto to) { return std::chrono::duration<double>(to - from).count(); };
  if (context.is_root()) print_transport_rows(rows, log);
  if (!job.out.empty()) {
    publish_from_root(context, [&] {
      set_parameter_values(*model, transported);
      return write_classifier(*model, job.out, {{"gradfix.operation", "transport"}});
    });
    if (context.is_root()) log << "transport: GradFix model written to " << job.out << "\n";
  }
  if (!job.results.empty()) {
    context.agree([&] {
      if (!context.is_root()) return;
      nlohmann::json results = {{"shots_per_class", job.shots_per_class}, {"seed", job.seed}, {"selection", job.selection.strategy},
                                 {"sign_mode", sign_mode_name(job.sign_mode)}, {"mask_mode", mask_mode_name(job.mask_mode)},
                                 {"rows", transport_rows_json(rows)},
                                 {"seconds", {{"inputs", seconds(started, loaded)}, {"transport", seconds(loaded, computed)}}}};
      add_derivative_summary(rows, results);
      write_text_file_atomically(job.results, results.dump(2) + "\n");
    });
    if (context.is_root()) log << "transport: results written to " << job.results << "\n";
  }
  return rows;
}

namespace {

// The mean and the sample standard deviation (0 for one value).
std::pair<double, double> mean_and_spread(const std::vector<double>& values) {
  double mean = 0.0, squares = 0.0;
  for (double v : values) mean += v;
  mean /= static_cast<double>(values.size());
  for (double v : values) squares += (v - mean) * (v - mean);
  return {mean, values.size() > 1 ? std::sqrt(squares / static_cast<double>(values.size() - 1)) : 0.0};
}

// One transport of the demo: K shots per class drawn by `selection` with `seed`.
TransportJob demo_transport(const DemoJob& job, long long shots, std::uint64_t seed, const std::string& selection, bool few_shot_baseline) {
  TransportJob transport;
  transport.shots_per_class = shots;
  transport.seed = seed;
  transport.support_size = job.support_size;
  transport.sign_mode = job.sign_mode;
  transport.alphas = job.alphas;
  transport.few_shot_baseline = few_shot_baseline;
  transport.selection.strategy = selection;
  return transport;
}

}  // namespace

namespace {

// A task's transform as a file name part: "noise:0.5:14" -> "noise_0.5_14".
std::string file_part(const std::string& text) {
  std::string out = text;
  for (char& c : out)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-') c = '_';
  return out;
}

std::string mean_cell(const std::vector<double>& values, bool spread = true) {
  const auto [mean, std] = mean_and_spread(values);
  std::ostringstream cell;
  cell << std::fixed << std::setprecision(2) << 100 * mean;
  if (spread && values.size() > 1) cell << " +- " << 100 * std;
  return cell.str();
}

// One table: a row per label, a column per task and their average (of the per-task means).
void print_task_table(std::ostream& out, const std::string& first, const std::vector<std::string>& labels,
                      const std::vector<std::string>& tasks, const std::function<std::vector<double>(const std::string&, const std::string&)>& values) {
  out << std::left << std::setw(42) << first << std::right;
  for (const auto& task : tasks) out << std::setw(18) << task;
  out << std::setw(10) << "average" << "\n";
  for (const auto& label : labels) {
    out << std::left << std::setw(42) << label << std::right;
    std::vector<double> means;
    for (const auto& task : tasks) {
      const std::vector<double> cell = values(label, task);
      out << std::setw(18) << (cell.empty() ? "-" : mean_cell(cell));
      if (!cell.empty()) means.push_back(mean_and_spread(cell).first);
    }
    out << std::setw(10) << (means.size() == tasks.size() ? mean_cell(means, false) : "-") << "\n";
  }
}

}  // namespace

void run_demo(const DemoJob& job, std::ostream& log, const JobContext& context) {
  configure_allocator();
  const bool root = context.is_root();
  std::ostringstream discard;
  std::ostream& out = root ? log : discard;
  if (job.transforms.empty()) throw InputError("gradfix demo: --transform needs at least one task");
  ensure_directory(job.cache);
  const std::string train_spec = job.data_dir + ":train", test_spec = job.data_dir + ":t10k";
  const Architecture architecture = parse_architecture("mlp", job.dims);
  const Dataset full_train = load_data({train_spec, "none"});
  const long long half = job.pretrain_limit > 0 ? job.pretrain_limit : full_train.size() / 2;
  // Cache keys: a cached model is reused only when it was trained with the same settings (the
  // releases by the pre-training's, a task's fine-tunes also by the task's and the fine-tuning's).
  const std::string release_key = job.dims + "/" + std::to_string(job.pretrain_epochs) + "/" + std::to_string(half) +
                                  (job.independent_init ? "/independent" : "/shared");
  std::ostringstream lr;
  lr << job.finetune_lr;
  const std::string finetune_key = release_key + "/" + std::to_string(job.finetune_epochs) + "/" + std::to_string(job.finetune_limit) +
                                   "/lr" + lr.str() + (job.freeze_head ? "/frozen-head" : "");
  auto cached = [&](const std::string& name, const std::string& key, const std::function<std::unique_ptr<Classifier>()>& make) {
    const std::string path = job.cache + "/" + name + ".safetensors";
    if (file_exists(path)) {
      const auto reader = open_reader(path);
      const auto found = reader->metadata().find("gradfix.demo.key");
      if (found != reader->metadata().end() && found->second == key) {
        out << "demo: using cached " << path << "\n";
        return load_classifier(path);
      }
    }
    auto model = make();
    if (root) save_classifier(*model, path, {{"gradfix.demo.key", key}});
    context.host().barrier();
    return model;
  };
  // Two "releases" of one architecture, pre-trained with different seeds on different halves of
  // the training set: independently initialised by default (the paper's regime, where tau_A is
  // misaligned with B), or from one shared initialisation (a model lineage) with --shared-init.
  auto pretrain = [&](std::uint64_t seed, long long skip) {
    auto model = make_classifier(architecture, job.independent_init ? seed : 0);
    Dataset data = load_data({train_spec, "none"}, skip, half);
    train_model(*model, data, job.pretrain_epochs, 1e-3, 128, seed, out, "pretrain seed " + std::to_string(seed));
    return model;
  };
  auto a_base = cached("A_base", release_key, [&] { return pretrain(1, 0); });
  auto b_base = cached("B_base", release_key, [&] { return pretrain(2, half); });
  // The head: the last layer's tensors (a regex over names, as `train --freeze` takes it).
  std::string head_pattern;
  {
    std::string last;
    for (auto& [name, parameter] : b_base->parameters()) last = name;
    head_pattern = "^";
    for (char c : last.substr(0, last.rfind('.') + 1)) {
      if (c != '\0' && std::strchr(".^$|()[]{}*+?\\", c) != nullptr) head_pattern += '\\';  // a regex's special characters, escaped
      head_pattern += c;
    }
  }
  const Dataset clean_test = load_data({test_spec, "none"}, 0, job.test_limit);
  out << "demo: releases " << job.dims << (job.independent_init ? ", independently initialised" : ", one shared initialisation")
      << ", B " << std::fixed << std::setprecision(2) << 100.0 * evaluate(*b_base, clean_test).accuracy
      << "% on the clean test set; task fine-tunes: Adam " << std::defaultfloat << job.finetune_lr << ", " << job.finetune_epochs
      << " epoch(s)" << (job.freeze_head ? ", head frozen" : "") << "; support set " << job.support_size << " samples\n";

  // The downstream tasks: the same classes under input shifts neither release saw, each with its
  // own fine-tunes of A and B (tau_A, and tau_B for the oracle and the upper bound).
  struct Task {
    std::string name;
    TransportInputs in;
  };
  std::vector<Task> tasks;
  for (const auto& transform : job.transforms) {
    const Dataset task_train = load_data({train_spec, transform}, 0, job.finetune_limit);
    // A small learning rate with the head (the last layer) frozen, as the paper fine-tunes the
    // encoder under a fixed zero-shot head.
    auto finetune = [&](const std::string& from, std::uint64_t seed) {
      auto model = load_classifier(job.cache + "/" + from + ".safetensors");
      const std::set<std::string> head = job.freeze_head ? frozen_tensors(*model, {head_pattern}, "the demo's head", from) : std::set<std::string>{};
      train_model(*model, task_train, job.finetune_epochs, job.finetune_lr, 128, seed, out, "fine-tune " + from + " on " + transform, head);
      return model;
    };
    auto a_ft = cached("A_ft-" + file_part(transform), finetune_key + "/" + transform, [&] { return finetune("A_base", 11); });
    auto b_ft = cached("B_ft-" + file_part(transform), finetune_key + "/" + transform, [&] { return finetune("B_base", 12); });
    Task task;
    task.name = transform;
    task.in.target = b_base.get();
    task.in.tau = difference(parameter_values(*a_ft), parameter_values(*a_base));
    task.in.target_finetuned = parameter_values(*b_ft);
    task.in.tau_b = difference(task.in.target_finetuned, parameter_values(*b_base));
    task.in.test = load_data({test_spec, transform}, 0, job.test_limit);
    // The few-shot pool: task samples the fine-tuning never used.
    task.in.pool = load_data({train_spec, transform}, job.finetune_limit, std::max(job.support_size * 4, 4000LL));
    out << "demo: task " << transform << ": B " << std::fixed << std::setprecision(2) << 100.0 * evaluate(*b_base, task.in.test).accuracy
        << "% (zero-shot), A fine-tuned " << 100.0 * evaluate(*a_ft, task.in.test).accuracy << "%, B fine-tuned "
        << 100.0 * evaluate(*b_ft, task.in.test).accuracy << "%\n";
    out.unsetf(std::ios::fixed);
    tasks.push_back(std::move(task));
  }
  std::vector<std::string> task_names;
  for (const auto& task : tasks) task_names.push_back(task.name);

  // The main tables: every method on every task, per K, mean +- std over the seeds. Few-shot
  // fine-tuning runs twice: every tensor tuned, and with the head frozen as the paper's baseline.
  nlohmann::json results = nlohmann::json::array();
  auto method_table = [&](long long shots, long long support_size) {
    std::map<std::pair<std::string, std::string>, std::vector<TransportRow>> by_cell;  // (method, task)
    std::vector<std::string> order;
    for (auto& task : tasks)
      for (std::uint64_t seed : job.seeds) {
        TransportJob transport = demo_transport(job, shots, seed, job.selection, true);
        transport.support_size = support_size;
        if (job.freeze_head) {
          transport.finetune_freeze = {head_pattern};
          transport.finetune_freeze_label = "head frozen";
          transport.few_shot_unfrozen_too = true;
        }
        for (const auto& row : transport_core(task.in, transport, context, nullptr, false)) {
          if (std::find(order.begin(), order.end(), row.method) == order.end()) order.push_back(row.method);
          by_cell[{row.method, task.name}].push_back(row);
        }
      }
    out << "\nK = " << shots << " shots per class, support set " << support_size << " samples: test accuracy %, mean +- std over "
        << job.seeds.size() << " seed(s)\n";
    print_task_table(out, "method", order, task_names, [&](const std::string& method, const std::string& task) {
      std::vector<double> accuracies;
      for (const auto& row : by_cell[{method, task}]) accuracies.push_back(row.accuracy);
      return accuracies;
    });
    // What each method did, averaged over the tasks and seeds.
    out << std::left << std::setw(42) << "  (averages over tasks and seeds)" << std::right << std::setw(10) << "alpha" << std::setw(10) << "kept"
        << std::setw(12) << "agree(B)" << std::setw(12) << "<g,d>" << "\n";
    for (const auto& method : order) {
      double alpha = 0, kept = 0, agree = 0, derivative = 0, n = 0;
      for (const auto& task : task_names)
        for (const auto& row : by_cell[{method, task}]) {
          alpha += row.alpha;
          kept += row.kept;
          agree += row.sign_agreement;
          derivative += row.directional_derivative;
          n += 1;
        }
      auto optional = [](double value, int precision, bool percent) {
        std::ostringstream text;
        if (value < 0) text << "-";
        else text << std::fixed << std::setprecision(precision) << (percent ? 100 * value : value) << (percent ? "%" : "");
        return text.str();
      };
      out << std::left << std::setw(42) << ("  " + method) << std::right << std::setw(10) << optional(alpha / n, 2, false) << std::setw(10)
          << optional(kept / n, 1, true) << std::setw(12) << optional(agree / n, 1, true) << std::setw(12) << derivative_cell(derivative / n)
          << "\n";
      for (const auto& task : task_names) {
        std::vector<double> accuracies;
        double task_alpha = 0, task_derivative = 0, task_kept = 0, task_agreement = 0;
        std::vector<AlphaPoint> curve;  // the support set's loss per alpha, summed over the seeds
        for (const auto& row : by_cell[{method, task}]) {
          accuracies.push_back(row.accuracy);
          task_alpha += row.alpha;
          task_derivative += row.directional_derivative;
          task_kept += row.kept;
          task_agreement += row.sign_agreement;
          if (curve.empty()) curve.resize(row.curve.size());
          for (std::size_t i = 0; i < row.curve.size() && i < curve.size(); ++i) {
            curve[i].alpha = row.curve[i].alpha;
            curve[i].support_loss += row.curve[i].support_loss;
            curve[i].shots_loss += row.curve[i].shots_loss;
            curve[i].support_accuracy = (std::isfinite(curve[i].support_accuracy) ? curve[i].support_accuracy : 0.0) + row.curve[i].support_accuracy;
          }
        }
        const double count = static_cast<double>(accuracies.size());
        const auto [mean, spread] = mean_and_spread(accuracies);
        nlohmann::json entry = {{"task", task}, {"shots_per_class", shots}, {"support_size", support_size}, {"method", method},
                                {"test_accuracy_mean", mean}, {"test_accuracy_std", spread}, {"test_accuracies", accuracies},
                                {"alpha_mean", task_alpha / count}, {"seeds", job.seeds}, {"selection", job.selection}};
        if (!std::isnan(task_derivative)) entry["directional_derivative_mean"] = task_derivative / count;
        if (task_kept >= 0) entry["kept_mean"] = task_kept / count;
        if (task_agreement >= 0) entry["sign_agreement_mean"] = task_agreement / count;
        if (!curve.empty()) {
          nlohmann::json points = nlohmann::json::array();
          for (const auto& point : curve)
            points.push_back({{"alpha", point.alpha}, {"support_loss_mean", point.support_loss / count}, {"shots_loss_mean", point.shots_loss / count},
                              {"support_accuracy_mean", point.support_accuracy / count}});
          entry["alpha_curve_mean"] = points;
        }
        results.push_back(entry);
      }
    }
  };
  for (long long shots : job.shots) method_table(shots, job.support_size);
  // The same at one K with a support set a few-shot user could label (10 per class by default).
  if (job.small_support_size > 0) method_table(job.ablation_shots, job.small_support_size);

  // The mask modes (the paper's ablation): GradFix's row with each mode at one K.
  nlohmann::json modes = nlohmann::json::array();
  if (job.mask_ablation) {
    const std::vector<MaskMode> ablation_modes = {MaskMode::kNormal, MaskMode::kForce, MaskMode::kSoft1, MaskMode::kSoft2,
                                                  MaskMode::kSoft3, MaskMode::kSoft1Rowwise, MaskMode::kSoft2Rowwise,
                                                  MaskMode::kSoft3Rowwise, MaskMode::kRandom};
    std::map<std::pair<std::string, std::string>, std::vector<double>> by_cell;  // (mode, task)
    std::vector<std::string> labels;
    for (MaskMode mode : ablation_modes) {
      labels.push_back(mask_mode_name(mode));
      for (auto& task : tasks)
        for (std::uint64_t seed : job.seeds) {
          TransportJob transport = demo_transport(job, job.ablation_shots, seed, job.selection, false);
          transport.mask_mode = mode;
          by_cell[{labels.back(), task.name}].push_back(gradfix_accuracy(task.in, transport, context));
        }
    }
    // The control: as many entries of tau_A per tensor as the normal mask keeps, chosen at
    // random instead of by the statistics.
    labels.push_back("random_same_kept");
    for (auto& task : tasks)
      for (std::uint64_t seed : job.seeds) {
        const TransportJob transport = demo_transport(job, job.ablation_shots, seed, job.selection, false);
        by_cell[{labels.back(), task.name}].push_back(gradfix_accuracy(task.in, transport, context, [&](const Vectors& masked) {
          Vectors control;
          for (const auto& [name, values] : masked) {
            const auto kept = std::count_if(values.begin(), values.end(), [](float value) { return value != 0.0f; });
            control[name] = random_keep(task.in.tau.at(name), static_cast<long long>(kept), seed, tensor_key_of(name));
          }
          return control;
        }));
      }
    out << "\nMask modes: GradFix (" << sign_mode_name(job.sign_mode) << ") at K = " << job.ablation_shots
        << ", test accuracy %, mean +- std over " << job.seeds.size()
        << " seed(s) (random: tau_A's magnitudes with random signs; random_same_kept: tau_A at as many random entries per tensor as normal keeps)\n";
    print_task_table(out, "mask mode", labels, task_names, [&](const std::string& mode, const std::string& task) { return by_cell[{mode, task}]; });
    for (const auto& label : labels)  // in the table's order
      for (const auto& task : task_names) {
        const auto [mean, spread] = mean_and_spread(by_cell[{label, task}]);
        modes.push_back({{"mask_mode", label}, {"task", task}, {"shots_per_class", job.ablation_shots},
                         {"gradfix_test_accuracy_mean", mean}, {"gradfix_test_accuracy_std", spread}});
      }
  }

  // Multi-task merging: every task's vector merged into one update of B, by mean and TIES, the
  // GradFix masks applied before the merge (each tau_A with its task's statistics) or after it
  // (with the summed signs), against merging the unmasked tau_A's and B's own tau_B's. One alpha
  // per merged vector, chosen on the union of the tasks' support sets (the lowest mean loss);
  // scored on each task's test set, normalised by B's own fine-tune on that task.
  nlohmann::json merging = nlohmann::json::array();
  if (job.merging && tasks.size() > 1) {
    Classifier& model = *b_base;
    const Vectors base = parameter_values(model);
    const MaskOptions job_mask;  // the normal mask has no options; the defaults, as transport's
    std::vector<std::string> labels;
    std::map<std::pair<std::string, std::string>, std::vector<double>> by_cell;  // (label, task): normalised accuracies
    std::map<std::string, double> finetuned;  // B fine-tuned's accuracy per task
    for (auto& task : tasks) {
      set_parameter_values(model, task.in.target_finetuned);
      finetuned[task.name] = evaluate(model, task.in.test).accuracy;
    }
    set_parameter_values(model, base);
    for (std::uint64_t seed : job.seeds) {
      std::vector<Dataset> supports;
      std::vector<const Vectors*> sources, targets;
      std::vector<Vectors> statistics;
      for (auto& task : tasks) {
        const TransportJob transport = demo_transport(job, job.ablation_shots, seed, job.selection, false);
        Dataset shots, support;
        shots_and_support(task.in, transport, context, shots, support);
        statistics.push_back(descent_statistics(model, shots, job.sign_mode, VoteMethod::kFast, context, task.name));
        supports.push_back(support);
        sources.push_back(&task.in.tau);
        targets.push_back(&task.in.tau_b);
      }
      // Merges tensor by tensor; `masks` (optional) masks each vector first with its statistics.
      auto merged = [&](const std::vector<const Vectors*>& vectors, MergeMethod method, MergeOrder order) {
        Vectors result;
        for (auto& [name, parameter] : model.parameters()) {
          const std::vector<long long> shape(parameter.sizes().begin(), parameter.sizes().end());
          std::vector<std::vector<float>> values;
          for (std::size_t t = 0; t < vectors.size(); ++t) {
            values.push_back(vectors[t]->at(name));
            if (order == MergeOrder::kMaskThenMerge)
              values.back() = mask_tensor(MaskMode::kNormal, job_mask, values.back(), statistics[t].at(name), shape, tensor_key_of(name));
          }
          const auto count = static_cast<long long>(values.front().size());
          std::vector<const float*> pointers;
          std::vector<float> thresholds;
          for (const auto& vector : values) {
            pointers.push_back(vector.data());
            // Only TIES trims; the mean needs no threshold.
            if (method == MergeMethod::kTies) thresholds.push_back(kth_largest_magnitude(vector.data(), count, ties_keep_count(count, 0.2)));
          }
          std::vector<float> out(static_cast<std::size_t>(count));
          merge_values(method, TiesElect::kCount, pointers, count, thresholds, out.data());
          if (order == MergeOrder::kMergeThenMask) {
            std::vector<float> summed(out.size(), 0.0f);
            for (const auto& statistic : statistics)
              for (std::size_t i = 0; i < summed.size(); ++i)
                summed[i] += static_cast<float>((statistic.at(name)[i] > 0.0f) - (statistic.at(name)[i] < 0.0f));
            out = mask_tensor(MaskMode::kNormal, job_mask, out, summed, shape, tensor_key_of(name));
          }
          result[name] = std::move(out);
        }
        return result;
      };
      // One alpha per merge, by the transports' loss rule (AlphaPolicy) on the summed support losses.
      AlphaPolicy policy;
      policy.grid = job.alphas.empty() ? default_alphas() : job.alphas;
      policy.metric = AlphaPolicy::Metric::kSupportLoss;
      auto score = [&](const std::string& label, const Vectors& delta) {
        std::vector<AlphaPoint> curve;
        for (double alpha : policy.grid) {
          double loss = 0.0;
          for (const auto& support : supports) loss += evaluate_with(model, base, delta, alpha, support).loss;
          curve.push_back({alpha, loss, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::quiet_NaN()});
        }
        const double best_alpha = policy.grid[policy.choose(curve)];
        if (std::find(labels.begin(), labels.end(), label) == labels.end()) labels.push_back(label);
        for (auto& task : tasks)
          by_cell[{label, task.name}].push_back(evaluate_with(model, base, delta, best_alpha, task.in.test).accuracy / finetuned[task.name]);
      };
      for (MergeMethod method : {MergeMethod::kMean, MergeMethod::kTies}) {
        const std::string name = merge_method_name(method);
        score("naive: " + name + " of tau_A", merged(sources, method, MergeOrder::kNone));
        score("GradFix mask-then-merge, " + name, merged(sources, method, MergeOrder::kMaskThenMerge));
        score("GradFix merge-then-mask, " + name, merged(sources, method, MergeOrder::kMergeThenMask));
        score("B's own: " + name + " of tau_B", merged(targets, method, MergeOrder::kNone));
      }
    }
    set_parameter_values(model, base);
    out << "\nMulti-task merging of the " << tasks.size() << " tasks at K = " << job.ablation_shots
        << ": accuracy normalised by B's own fine-tune on each task, %, mean +- std over " << job.seeds.size()
        << " seed(s) (one alpha per merge, chosen on all support sets; TIES keeps 20%)\n";
    print_task_table(out, "merge", labels, task_names, [&](const std::string& label, const std::string& task) { return by_cell[{label, task}]; });
    for (const auto& label : labels)  // in the table's order
      for (const auto& task : task_names) {
        const auto [mean, spread] = mean_and_spread(by_cell[{label, task}]);
        merging.push_back({{"merge", label}, {"task", task}, {"normalized_accuracy_mean", mean}, {"normalized_accuracy_std", spread}});
      }
  }

  nlohmann::json ablation = nlohmann::json::array();
  if (job.selection_ablation) {
    // Does the choice of shots change GradFix? Each strategy on B's penultimate activations, on
    // the first task; coreset and herding do not depend on the seed, so they run once.
    Task& task = tasks.front();
    out << "\nShot selection on " << task.name << ": GradFix (" << sign_mode_name(job.sign_mode)
        << ", normal), test accuracy mean +- std over " << job.seeds.size() << " seeds (coreset and herding: deterministic, one run)\n";
    out << std::left << std::setw(12) << "selection";
    const std::vector<long long> ablation_shots = {1, 2, 5};
    for (long long shots : ablation_shots) out << std::right << std::setw(18) << ("K = " + std::to_string(shots));
    out << "\n";
    for (const char* strategy : {"random", "coreset", "kmedoids", "herding"}) {
      out << std::left << std::setw(12) << strategy;
      const bool seeded = std::string(strategy) == "random" || std::string(strategy) == "kmedoids";
      for (long long shots : ablation_shots) {
        std::vector<double> accuracies;
        for (std::uint64_t seed : job.seeds) {
          if (!seeded && !accuracies.empty()) break;
          accuracies.push_back(gradfix_accuracy(task.in, demo_transport(job, shots, seed, strategy, false), context));
        }
        const auto [mean, spread] = mean_and_spread(accuracies);
        out << std::right << std::setw(18) << mean_cell(accuracies);
        ablation.push_back({{"task", task.name}, {"selection", strategy}, {"shots_per_class", shots}, {"gradfix_test_accuracy_mean", mean},
                            {"gradfix_test_accuracy_std", spread}, {"runs", accuracies.size()}});
      }
      out << "\n";
    }
  }
  if (root && !job.results.empty()) {
    write_text_file_atomically(job.results, nlohmann::json{{"demo", "fashion-mnist"}, {"tasks", task_names}, {"dims", job.dims},
                                                      {"independent_init", job.independent_init}, {"rows", results},
                                                      {"mask_modes", modes}, {"merging", merging}, {"selection_ablation", ablation}}.dump(2) + "\n");
    out << "demo: results written to " << job.results << "\n";
  }
}

}  // namespace gradfix
