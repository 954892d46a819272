// gradfix demo: the built-in demo on Fashion-MNIST (docs/demo.md).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <iomanip>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "classifier.hpp"
#include "classifier_jobs.hpp"
#include "demo_report.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/algebra/mask.hpp"
#include "gradfix/algebra/merge.hpp"
#include "gradfix/model/jobs.hpp"
#include "shots.hpp"
#include "transport.hpp"
#include "transport_rows.hpp"

namespace gradfix {

namespace {

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

// A task's transform as a file name part: "noise:0.5:14" -> "noise_0.5_14".
std::string file_part(const std::string& text) {
  std::string out = text;
  for (char& c : out)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-') c = '_';
  return out;
}

// The demo as a sequence of steps over shared state: the two releases and their tasks are made
// (or read from the cache) first, then each table adds its rows to the results JSON.
class Demo {
 public:
  Demo(const DemoJob& job, std::ostream& log, const JobContext& context)
      : job_(job), context_(context), root_(context.is_root()), out_(root_ ? log : discard_),
        train_spec_(job.data_dir + ":train"), test_spec_(job.data_dir + ":t10k"), architecture_(parse_architecture("mlp", job.dims)) {
    if (job.transforms.empty()) throw InputError("gradfix demo: --transform needs at least one task");
    ensure_directory(job.cache);
    const Dataset full_train = load_data({train_spec_, "none"});
    half_ = job.pretrain_limit > 0 ? job.pretrain_limit : full_train.size() / 2;
    // Cache keys: a cached model is reused only when it was trained with the same settings (the
    // releases by the pre-training's, a task's fine-tunes also by the task's and the fine-tuning's).
    release_key_ = job.dims + "/" + std::to_string(job.pretrain_epochs) + "/" + std::to_string(half_) +
                   (job.independent_init ? "/independent" : "/shared");
    std::ostringstream lr;
    lr << job.finetune_lr;
    finetune_key_ = release_key_ + "/" + std::to_string(job.finetune_epochs) + "/" + std::to_string(job.finetune_limit) + "/lr" + lr.str() +
                    (job.freeze_head ? "/frozen-head" : "");
  }

  void run() {
    prepare_releases();
    prepare_tasks();
    for (long long shots : job_.shots) method_table(shots, job_.support_size);
    // The same at one K with a support set a few-shot user could label (10 per class by default).
    if (job_.small_support_size > 0) method_table(job_.ablation_shots, job_.small_support_size);
    if (job_.mask_ablation) mask_ablation();
    if (job_.merging && tasks_.size() > 1) merge_tasks();
    if (job_.selection_ablation) selection_ablation();
    write_results();
  }

 private:
  struct Task {
    std::string name;
    TransportInputs in;
  };

  // A model from the cache when it was made with the same settings (its key), else made and cached.
  std::unique_ptr<Classifier> cached(const std::string& name, const std::string& key, const std::function<std::unique_ptr<Classifier>()>& make) {
    const std::string path = job_.cache + "/" + name + ".safetensors";
    if (file_exists(path)) {
      const auto reader = open_reader(path);
      const auto found = reader->metadata().find("gradfix.demo.key");
      if (found != reader->metadata().end() && found->second == key) {
        out_ << "demo: using cached " << path << "\n";
        return load_classifier(path);
      }
    }
    auto model = make();
    if (root_) save_classifier(*model, path, {{"gradfix.demo.key", key}});
    context_.host().barrier();
    return model;
  }

  // Two "releases" of one architecture, pre-trained with different seeds on different halves of
  // the training set: independently initialised by default (the paper's regime, where tau_A is
  // misaligned with B), or from one shared initialisation (a model lineage) with --shared-init.
  std::unique_ptr<Classifier> pretrain(std::uint64_t seed, long long skip) {
    auto model = make_classifier(architecture_, job_.independent_init ? seed : 0);
    Dataset data = load_data({train_spec_, "none"}, skip, half_);
    train_model(*model, data, job_.pretrain_epochs, 1e-3, 128, seed, out_, "pretrain seed " + std::to_string(seed));
    return model;
  }

  void prepare_releases() {
    a_base_ = cached("A_base", release_key_, [&] { return pretrain(1, 0); });
    b_base_ = cached("B_base", release_key_, [&] { return pretrain(2, half_); });
    // The head: the last layer's tensors (a regex over names, as `train --freeze` takes it).
    {
      std::string last;
      for (auto& [name, parameter] : b_base_->parameters()) last = name;
      head_pattern_ = "^";
      for (char c : last.substr(0, last.rfind('.') + 1)) {
        if (c != '\0' && std::strchr(".^$|()[]{}*+?\\", c) != nullptr) head_pattern_ += '\\';  // a regex's special characters, escaped
        head_pattern_ += c;
      }
    }
    const Dataset clean_test = load_data({test_spec_, "none"}, 0, job_.test_limit);
    out_ << "demo: releases " << job_.dims << (job_.independent_init ? ", independently initialised" : ", one shared initialisation")
        << ", B " << std::fixed << std::setprecision(2) << 100.0 * evaluate(*b_base_, clean_test).accuracy
        << "% on the clean test set; task fine-tunes: Adam " << std::defaultfloat << job_.finetune_lr << ", " << job_.finetune_epochs
        << " epoch(s)" << (job_.freeze_head ? ", head frozen" : "") << "; support set " << job_.support_size << " samples\n";
  }

  // The downstream tasks: the same classes under input shifts neither release saw, each with its
  // own fine-tunes of A and B (tau_A, and tau_B for the oracle and the upper bound).
  void prepare_tasks() {
    for (const auto& transform : job_.transforms) {
      const Dataset task_train = load_data({train_spec_, transform}, 0, job_.finetune_limit);
      // A small learning rate with the head (the last layer) frozen, as the paper fine-tunes the
      // encoder under a fixed zero-shot head.
      auto finetune = [&](const std::string& from, std::uint64_t seed) {
        auto model = load_classifier(job_.cache + "/" + from + ".safetensors");
        const std::set<std::string> head = job_.freeze_head ? frozen_tensors(*model, {head_pattern_}, "the demo's head", from) : std::set<std::string>{};
        train_model(*model, task_train, job_.finetune_epochs, job_.finetune_lr, 128, seed, out_, "fine-tune " + from + " on " + transform, head);
        return model;
      };
      auto a_ft = cached("A_ft-" + file_part(transform), finetune_key_ + "/" + transform, [&] { return finetune("A_base", 11); });
      auto b_ft = cached("B_ft-" + file_part(transform), finetune_key_ + "/" + transform, [&] { return finetune("B_base", 12); });
      Task task;
      task.name = transform;
      task.in.target = b_base_.get();
      task.in.tau = difference(parameter_values(*a_ft), parameter_values(*a_base_));
      task.in.target_finetuned = parameter_values(*b_ft);
      task.in.tau_b = difference(task.in.target_finetuned, parameter_values(*b_base_));
      task.in.test = load_data({test_spec_, transform}, 0, job_.test_limit);
      // The few-shot pool: task samples the fine-tuning never used.
      task.in.pool = load_data({train_spec_, transform}, job_.finetune_limit, std::max(job_.support_size * 4, 4000LL));
      out_ << "demo: task " << transform << ": B " << std::fixed << std::setprecision(2) << 100.0 * evaluate(*b_base_, task.in.test).accuracy
          << "% (zero-shot), A fine-tuned " << 100.0 * evaluate(*a_ft, task.in.test).accuracy << "%, B fine-tuned "
          << 100.0 * evaluate(*b_ft, task.in.test).accuracy << "%\n";
      out_.unsetf(std::ios::fixed);
      tasks_.push_back(std::move(task));
    }
    for (const auto& task : tasks_) task_names_.push_back(task.name);
  }

  // The main tables: every method on every task, per K, mean +- std over the seeds. Few-shot
  // fine-tuning runs twice: every tensor tuned, and with the head frozen as the paper's baseline.
  void method_table(long long shots, long long support_size) {
    RowsByCell by_cell;
    std::vector<std::string> order;
    for (auto& task : tasks_)
      for (std::uint64_t seed : job_.seeds) {
        TransportJob transport = demo_transport(job_, shots, seed, job_.selection, true);
        transport.support_size = support_size;
        if (job_.freeze_head) {
          transport.finetune_freeze = {head_pattern_};
          transport.finetune_freeze_label = "head frozen";
          transport.few_shot_unfrozen_too = true;
        }
        for (const auto& row : transport_core(task.in, transport, context_, nullptr, false)) {
          if (std::find(order.begin(), order.end(), row.method) == order.end()) order.push_back(row.method);
          by_cell[{row.method, task.name}].push_back(row);
        }
      }
    out_ << "\nK = " << shots << " shots per class, support set " << support_size << " samples: test accuracy %, mean +- std over "
        << job_.seeds.size() << " seed(s)\n";
    print_task_table(out_, "method", order, task_names_, [&](const std::string& method, const std::string& task) {
      std::vector<double> accuracies;
      for (const auto& row : by_cell[{method, task}]) accuracies.push_back(row.accuracy);
      return accuracies;
    });
    report_methods(out_, order, task_names_, by_cell,
                   {{"shots_per_class", shots}, {"support_size", support_size}, {"seeds", job_.seeds}, {"selection", job_.selection}}, results_);
  }

  // The mask modes (the paper's ablation): GradFix's row with each mode at one K.
  void mask_ablation() {
    const std::vector<MaskMode> ablation_modes = {MaskMode::kNormal, MaskMode::kForce, MaskMode::kSoft1, MaskMode::kSoft2,
                                                  MaskMode::kSoft3, MaskMode::kSoft1Rowwise, MaskMode::kSoft2Rowwise,
                                                  MaskMode::kSoft3Rowwise, MaskMode::kRandom};
    std::map<std::pair<std::string, std::string>, std::vector<double>> by_cell;  // (mode, task)
    std::vector<std::string> labels;
    for (MaskMode mode : ablation_modes) {
      labels.push_back(mask_mode_name(mode));
      for (auto& task : tasks_)
        for (std::uint64_t seed : job_.seeds) {
          TransportJob transport = demo_transport(job_, job_.ablation_shots, seed, job_.selection, false);
          transport.mask_mode = mode;
          by_cell[{labels.back(), task.name}].push_back(gradfix_accuracy(task.in, transport, context_));
        }
    }
    // The control: as many entries of tau_A per tensor as the normal mask keeps, chosen at
    // random instead of by the statistics.
    labels.push_back("random_same_kept");
    for (auto& task : tasks_)
      for (std::uint64_t seed : job_.seeds) {
        const TransportJob transport = demo_transport(job_, job_.ablation_shots, seed, job_.selection, false);
        by_cell[{labels.back(), task.name}].push_back(gradfix_accuracy(task.in, transport, context_, [&](const Vectors& masked) {
          Vectors control;
          for (const auto& [name, values] : masked) {
            const auto kept = std::count_if(values.begin(), values.end(), [](float value) { return value != 0.0f; });
            control[name] = random_keep(task.in.tau.at(name), static_cast<long long>(kept), seed, tensor_key_of(name));
          }
          return control;
        }));
      }
    out_ << "\nMask modes: GradFix (" << sign_mode_name(job_.sign_mode) << ") at K = " << job_.ablation_shots
        << ", test accuracy %, mean +- std over " << job_.seeds.size()
        << " seed(s) (random: tau_A's magnitudes with random signs; random_same_kept: tau_A at as many random entries per tensor as normal keeps)\n";
    print_task_table(out_, "mask mode", labels, task_names_, [&](const std::string& mode, const std::string& task) { return by_cell[{mode, task}]; });
    for (const auto& label : labels)  // in the table's order
      for (const auto& task : task_names_) {
        const auto [mean, spread] = mean_and_spread(by_cell[{label, task}]);
        modes_.push_back({{"mask_mode", label}, {"task", task}, {"shots_per_class", job_.ablation_shots},
                         {"gradfix_test_accuracy_mean", mean}, {"gradfix_test_accuracy_std", spread}});
      }
  }

  // Multi-task merging: every task's vector merged into one update of B, by mean and TIES, the
  // GradFix masks applied before the merge (each tau_A with its task's statistics) or after it
  // (with the summed signs), against merging the unmasked tau_A's and B's own tau_B's. One alpha
  // per merged vector, chosen on the union of the tasks' support sets (the lowest mean loss);
  // scored on each task's test set, normalised by B's own fine-tune on that task.
  void merge_tasks() {
    Classifier& model = *b_base_;
    const Vectors base = parameter_values(model);
    const MaskOptions job_mask;  // the normal mask has no options; the defaults, as transport's
    std::vector<std::string> labels;
    std::map<std::pair<std::string, std::string>, std::vector<double>> by_cell;  // (label, task): normalised accuracies
    std::map<std::string, double> finetuned;  // B fine-tuned's accuracy per task
    for (auto& task : tasks_) {
      set_parameter_values(model, task.in.target_finetuned);
      finetuned[task.name] = evaluate(model, task.in.test).accuracy;
    }
    set_parameter_values(model, base);
    for (std::uint64_t seed : job_.seeds) {
      std::vector<Dataset> supports;
      std::vector<const Vectors*> sources, targets;
      std::vector<Vectors> statistics;
      for (auto& task : tasks_) {
        const TransportJob transport = demo_transport(job_, job_.ablation_shots, seed, job_.selection, false);
        Dataset shots, support;
        shots_and_support(task.in, transport, context_, shots, support);
        statistics.push_back(descent_statistics(model, shots, job_.sign_mode, VoteMethod::kFast, context_, task.name));
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
      policy.grid = job_.alphas.empty() ? default_alphas() : job_.alphas;
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
        for (auto& task : tasks_)
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
    out_ << "\nMulti-task merging of the " << tasks_.size() << " tasks at K = " << job_.ablation_shots
        << ": accuracy normalised by B's own fine-tune on each task, %, mean +- std over " << job_.seeds.size()
        << " seed(s) (one alpha per merge, chosen on all support sets; TIES keeps 20%)\n";
    print_task_table(out_, "merge", labels, task_names_, [&](const std::string& label, const std::string& task) { return by_cell[{label, task}]; });
    for (const auto& label : labels)  // in the table's order
      for (const auto& task : task_names_) {
        const auto [mean, spread] = mean_and_spread(by_cell[{label, task}]);
        merging_.push_back({{"merge", label}, {"task", task}, {"normalized_accuracy_mean", mean}, {"normalized_accuracy_std", spread}});
      }
  }

  void selection_ablation() {
    // Does the choice of shots change GradFix? Each strategy on B's penultimate activations, on
    // the first task; coreset and herding do not depend on the seed, so they run once.
    Task& task = tasks_.front();
    out_ << "\nShot selection on " << task.name << ": GradFix (" << sign_mode_name(job_.sign_mode)
        << ", normal), test accuracy mean +- std over " << job_.seeds.size() << " seeds (coreset and herding: deterministic, one run)\n";
    out_ << std::left << std::setw(12) << "selection";
    const std::vector<long long> ablation_shots = {1, 2, 5};
    for (long long shots : ablation_shots) out_ << std::right << std::setw(18) << ("K = " + std::to_string(shots));
    out_ << "\n";
    for (const char* strategy : {"random", "coreset", "kmedoids", "herding"}) {
      out_ << std::left << std::setw(12) << strategy;
      const bool seeded = std::string(strategy) == "random" || std::string(strategy) == "kmedoids";
      for (long long shots : ablation_shots) {
        std::vector<double> accuracies;
        for (std::uint64_t seed : job_.seeds) {
          if (!seeded && !accuracies.empty()) break;
          accuracies.push_back(gradfix_accuracy(task.in, demo_transport(job_, shots, seed, strategy, false), context_));
        }
        const auto [mean, spread] = mean_and_spread(accuracies);
        out_ << std::right << std::setw(18) << mean_cell(accuracies);
        ablation_.push_back({{"task", task.name}, {"selection", strategy}, {"shots_per_class", shots}, {"gradfix_test_accuracy_mean", mean},
                            {"gradfix_test_accuracy_std", spread}, {"runs", accuracies.size()}});
      }
      out_ << "\n";
    }
  }

  void write_results() {
    if (root_ && !job_.results.empty()) {
      write_text_file_atomically(job_.results, nlohmann::json{{"demo", "fashion-mnist"}, {"tasks", task_names_}, {"dims", job_.dims},
                                                        {"independent_init", job_.independent_init}, {"rows", results_},
                                                        {"mask_modes", modes_}, {"merging", merging_}, {"selection_ablation", ablation_}}.dump(2) + "\n");
      out_ << "demo: results written to " << job_.results << "\n";
    }
  }

  const DemoJob& job_;
  const JobContext& context_;
  const bool root_;
  std::ostringstream discard_;
  std::ostream& out_;
  const std::string train_spec_;
  const std::string test_spec_;
  const Architecture architecture_;
  long long half_ = 0;
  std::string release_key_;
  std::string finetune_key_;
  std::unique_ptr<Classifier> a_base_;
  std::unique_ptr<Classifier> b_base_;
  std::string head_pattern_;  // the head: the last layer's tensors, as a regex over names
  std::vector<Task> tasks_;
  std::vector<std::string> task_names_;
  nlohmann::json results_ = nlohmann::json::array();
  nlohmann::json modes_ = nlohmann::json::array();
  nlohmann::json merging_ = nlohmann::json::array();
  nlohmann::json ablation_ = nlohmann::json::array();
};

}  // namespace

void run_demo(const DemoJob& job, std::ostream& log, const JobContext& context) {
  job.validate();
  configure_allocator();
  Demo(job, log, context).run();
}

}  // namespace gradfix
