// gradfix demo --lm: the language-model demo (docs/demo.md). Everything runs through the jobs
// users run on model directories (init, train, transport on the sharded decoder path), on a
// synthetic language gradfix writes itself, so the demo needs no download and runs on two cores
// in minutes.
#include <algorithm>
#include <chrono>
#include <fstream>
#include <cmath>
#include <iomanip>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "decoder_jobs.hpp"
#include "demo_report.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/splitmix.hpp"
#include "gradfix/io/tensor_store.hpp"
#include "gradfix/algebra/mask.hpp"
#include "gradfix/model/jobs.hpp"
#include "transport.hpp"
#include "transport_rows.hpp"

namespace gradfix {
namespace {

// The language: 64 token ids, examples of 16 tokens. 0 pads, 1-10 are the digits, 11-36 the
// letters a-z, then the symbols '>', '?', '+', '=', '|' and the answers E (even) and O (odd).
constexpr long long kLength = 16;
constexpr long long kDigit = 1, kLetter = 11;
constexpr long long kGreater = 37, kQuestion = 38, kPlus = 39, kEquals = 40, kBar = 41, kEven = 42, kOdd = 43;
constexpr long long kIgnored = -100;  // a label that takes no loss

// Both releases' architecture: a Llama of 82k parameters (hidden 64, 2 layers, untied head).
constexpr const char* kConfig = R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 64,
 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
 "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false, "hidden_act": "silu",
 "initializer_range": 0.05, "torch_dtype": "float32"})";

// Changes whenever the language, the model or the recipe below changes, so that a cache made by
// another version is not reused.
constexpr const char* kRecipeVersion = "lm-demo-1";

// A seeded stream of draws: splitmix64 over a counter.
class Draws {
 public:
  explicit Draws(std::uint64_t seed) : base_(splitmix64(seed ^ 0x6C6D2D64656D6FULL)) {}
  long long below(long long n) { return static_cast<long long>(next() % static_cast<std::uint64_t>(n)); }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  std::uint64_t next() { return splitmix64(base_ + 0x9E3779B97F4A7C15ULL * counter_++); }
  std::uint64_t base_;
  std::uint64_t counter_ = 0;
};

struct Example {
  std::vector<long long> ids, labels;
};

// One pretraining sentence, every position after the first a target. The kinds teach the
// language's pieces (letters, digits, the symbols between them) and none of a task's rules;
// `mix` weighs the copy-like kinds against the counting ones, which is what makes the two
// releases' corpora differ.
Example sentence(Draws& draws, double mix) {
  std::vector<long long> row;
  const double kind = draws.uniform();
  if (kind < mix / 2) {
    // A letter run repeated after a bar: copying.
    const long long length = 2 + draws.below(4);
    for (long long i = 0; i < length; ++i) row.push_back(kLetter + draws.below(26));
    row.push_back(kBar);
    for (long long i = 0; i < length; ++i) row.push_back(row[static_cast<std::size_t>(i)]);
  } else if (kind < mix) {
    // Four digits, '?', then a random answer letter: the symbols in place, the answers random.
    for (int i = 0; i < 4; ++i) row.push_back(kDigit + draws.below(10));
    row.push_back(kQuestion);
    row.push_back(draws.below(2) == 0 ? kEven : kOdd);
  } else if (kind < (1 + mix) / 2) {
    // Counting up through the letters or the digits.
    const bool letters = draws.below(2) == 0;
    const long long modulus = letters ? 26 : 10, first = letters ? kLetter : kDigit;
    const long long start = draws.below(modulus), length = 5 + draws.below(7);
    for (long long k = 0; k < length; ++k) row.push_back(first + (start + k) % modulus);
  } else {
    // Sums written out with random results: '+' and '=' in place, no arithmetic.
    row = {kDigit + draws.below(10), kPlus, kDigit + draws.below(10), kEquals, kDigit + draws.below(10), kGreater, kLetter + draws.below(26),
           kLetter + draws.below(26)};
  }
  if (static_cast<long long>(row.size()) > kLength) row.resize(static_cast<std::size_t>(kLength));
  Example example{row, row};
  example.labels[0] = kIgnored;
  return example;
}

// A task's place in a fixed order, so that its data does not depend on which others run.
std::uint64_t task_number(const std::string& task) { return task == "reverse" ? 0 : task == "parity" ? 1 : 2; }

// A task's prompt and answer; the loss and the accuracy are on the answer's tokens only.
Example task_example(const std::string& task, Draws& draws) {
  std::vector<long long> prompt, answer;
  if (task == "reverse") {
    // Four letters, '>', the four letters reversed.
    for (int i = 0; i < 4; ++i) prompt.push_back(kLetter + draws.below(26));
    answer.assign(prompt.rbegin(), prompt.rend());
    prompt.push_back(kGreater);
  } else if (task == "parity") {
    // Four digits, '?', E or O for the parity of the last digit: a lookup answered by one token.
    long long last = 0;
    for (int i = 0; i < 4; ++i) prompt.push_back(kDigit + (last = draws.below(10)));
    prompt.push_back(kQuestion);
    answer.push_back(last % 2 == 0 ? kEven : kOdd);
  } else {
    // a + b = (a + b) mod 10.
    const long long a = draws.below(10), b = draws.below(10);
    prompt = {kDigit + a, kPlus, kDigit + b, kEquals};
    answer.push_back(kDigit + (a + b) % 10);
  }
  Example example;
  example.ids = prompt;
  example.ids.insert(example.ids.end(), answer.begin(), answer.end());
  example.labels.assign(prompt.size(), kIgnored);
  example.labels.insert(example.labels.end(), answer.begin(), answer.end());
  return example;
}

// Token data as gradfix reads it (input_ids and labels, I64 [N, 16], padding id 0 with no loss),
// written by the root and published whole.
void write_token_file(const std::string& path, const std::vector<Example>& examples) {
  const long long count = static_cast<long long>(examples.size());
  std::vector<long long> ids(static_cast<std::size_t>(count * kLength), 0), labels(ids.size(), kIgnored);
  for (long long i = 0; i < count; ++i) {
    const Example& example = examples[static_cast<std::size_t>(i)];
    std::copy(example.ids.begin(), example.ids.end(), ids.begin() + i * kLength);
    std::copy(example.labels.begin(), example.labels.end(), labels.begin() + i * kLength);
  }
  const std::vector<TensorInfo> layout = {{"input_ids", DType::kI64, {count, kLength}}, {"labels", DType::kI64, {count, kLength}}};
  auto writer = open_writer(path, layout, {{"gradfix.operation", "demo --lm data"}});
  writer->write_raw("input_ids", 0, count * kLength, ids.data());
  writer->write_raw("labels", 0, count * kLength, labels.data());
  writer->commit();
}

std::string read_small_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string number_text(double value) {
  std::ostringstream text;
  text << value;
  return text.str();
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

class LmDemo {
 public:
  LmDemo(const LmDemoJob& job, std::ostream& log, const JobContext& context)
      : job_(job), context_(context), root_(context.is_root()), out_(root_ ? log : discard_), started_(std::chrono::steady_clock::now()) {}

  void run() {
    ensure_directory(job_.cache);
    ensure_directory(job_.cache + "/data");
    config_ = job_.cache + "/config.json";
    if (root_ && read_small_file(config_) != std::string(kConfig) + "\n") write_text_file_atomically(config_, std::string(kConfig) + "\n");
    context_.host().barrier();
    prepare_releases();
    prepare_tasks();
    out_ << "demo --lm: releases and fine-tunes ready at " << std::fixed << std::setprecision(0) << seconds_since(started_) << " s\n";
    out_.unsetf(std::ios::fixed);
    for (long long n : job_.samples) method_table(n);
    if (job_.mask_ablation) mask_ablation();
    summarise();
    write_results();
  }

 private:
  // Whether the model directory `name` in the cache was made with `key` (its key file beside it).
  bool cached(const std::string& name, const std::string& key) const {
    const std::string dir = job_.cache + "/" + name;
    return file_exists(dir + "/config.json") && read_small_file(dir + ".key") == key;
  }

  void mark_cached(const std::string& name, const std::string& key) {
    if (root_) write_text_file_atomically(job_.cache + "/" + name + ".key", key);
    context_.host().barrier();
  }

  void write_data(const std::string& path, const std::vector<Example>& examples) {
    if (root_) write_token_file(path, examples);
    context_.host().barrier();
  }

  // Trains `from` on `data` into the cache's `name` with gradfix train (parameters sharded).
  void train(const std::string& from, const std::string& data, const std::string& name, int epochs, long long batch, double lr, std::uint64_t seed) {
    TrainJob train;
    train.weights = job_.cache + "/" + from;
    train.data.spec = data;
    train.epochs = epochs;
    train.batch = batch;
    train.lr = lr;
    train.seed = seed;
    train.out = job_.cache + "/" + name;
    std::ostringstream log;
    run_decoder_train(train, log, context_);
    out_ << "demo --lm: " << name << ": " << log.str();
  }

  // Two releases of one architecture: independent initialisations (seeds 1 and 2), pretrained on
  // corpora of different mixes and orders.
  void prepare_releases() {
    struct Release {
      const char* name;
      std::uint64_t seed;
      double mix;
    };
    for (const Release& release : {Release{"A", 1, 0.5}, Release{"B", 2, 0.4}}) {
      const std::string name = std::string(release.name) + "_base";
      const std::string key = std::string(kRecipeVersion) + "/seed " + std::to_string(release.seed) + "/mix " + number_text(release.mix) +
                              "/sentences " + std::to_string(job_.pretrain_samples) + "/epochs " + std::to_string(job_.pretrain_epochs);
      if (cached(name, key)) {
        out_ << "demo --lm: using cached " << job_.cache << "/" << name << "\n";
        continue;
      }
      const std::string corpus = job_.cache + "/data/corpus_" + release.name + ".safetensors";
      std::vector<Example> sentences;
      Draws draws(release.seed);
      for (long long i = 0; i < job_.pretrain_samples; ++i) sentences.push_back(sentence(draws, release.mix));
      write_data(corpus, sentences);
      InitJob init;
      init.arch = "llama";
      init.config = config_;
      init.seed = release.seed;
      init.out = job_.cache + "/" + release.name + "_init";
      std::ostringstream discard;
      run_decoder_init(init, discard, context_);
      train(std::string(release.name) + "_init", corpus, name, job_.pretrain_epochs, 64, 3e-3, release.seed);
      mark_cached(name, key);
    }
  }

  // Each task's data (fine-tuning set, the few-shot pool, the test set; disjoint draws) and its
  // fine-tunes of A (tau_A) and B (the oracle and the upper bound).
  void prepare_tasks() {
    for (const auto& task : job_.tasks) {
      auto examples = [&](long long count, std::uint64_t seed) {
        std::vector<Example> out;
        Draws draws(seed * 1000 + task_number(task));
        for (long long i = 0; i < count; ++i) out.push_back(task_example(task, draws));
        return out;
      };
      const std::string prefix = job_.cache + "/data/" + task;
      write_data(prefix + "_finetune.safetensors", examples(job_.finetune_samples, 11));
      write_data(prefix + "_pool.safetensors", examples(job_.pool_samples, 12));
      write_data(prefix + "_test.safetensors", examples(job_.test_samples, 13));
      for (const char* release : {"A", "B"}) {
        const std::string name = std::string(release) + "_ft_" + task;
        const std::string key = std::string(kRecipeVersion) + "/" + read_small_file(job_.cache + "/" + release + "_base.key") + "/" + task +
                                "/examples " + std::to_string(job_.finetune_samples) + "/epochs " + std::to_string(job_.finetune_epochs) + "/lr " +
                                number_text(job_.finetune_lr);
        if (cached(name, key)) {
          out_ << "demo --lm: using cached " << job_.cache << "/" << name << "\n";
          continue;
        }
        train(std::string(release) + "_base", prefix + "_finetune.safetensors", name, job_.finetune_epochs, 32, job_.finetune_lr, 7);
        mark_cached(name, key);
      }
    }
  }

  // One transport of tau_A = A_ft - A_base to B with N shots of the task's pool.
  TransportJob transport_job(const std::string& task, long long n, std::uint64_t seed) const {
    TransportJob transport;
    transport.target = job_.cache + "/B_base";
    transport.source_base = job_.cache + "/A_base";
    transport.source_finetuned = job_.cache + "/A_ft_" + task;
    transport.target_finetuned = job_.cache + "/B_ft_" + task;
    transport.data.spec = job_.cache + "/data/" + task + "_pool.safetensors";
    transport.test.spec = job_.cache + "/data/" + task + "_test.safetensors";
    transport.num_samples = n;
    transport.seed = seed;
    transport.support_size = job_.support_size;
    transport.sign_mode = job_.sign_mode;
    transport.alphas = job_.alphas;
    transport.finetune_lrs = job_.finetune_lrs;
    transport.finetune_steps = job_.finetune_steps;
    // The votes of a (task, N, seed) are computed once, then reused by the mask ablation.
    transport.statistics_cache = job_.cache + "/statistics";
    return transport;
  }

  std::vector<TransportRow> transport(const TransportJob& job) {
    std::ostringstream discard;
    return run_decoder_transport(job, discard, context_);
  }

  // Every row of transport on every task at N shots, mean +- std over the seeds.
  void method_table(long long n) {
    RowsByCell& cells = tables_[n];
    std::vector<std::string>& order = orders_[n];
    for (const auto& task : job_.tasks)
      for (std::uint64_t seed : job_.seeds) {
        const auto start = std::chrono::steady_clock::now();
        for (const auto& row : transport(transport_job(task, n, seed))) {
          if (std::find(order.begin(), order.end(), row.method) == order.end()) order.push_back(row.method);
          cells[{row.method, task}].push_back(row);
        }
        out_ << "demo --lm: " << task << ", N = " << n << ", seed " << seed << ": " << std::fixed << std::setprecision(1)
             << seconds_since(start) << " s\n";
        out_.unsetf(std::ios::fixed);
      }
    out_ << "\nN = " << n << " labelled samples per task, support set " << job_.support_size
         << ": answer-token accuracy %, mean +- std over " << job_.seeds.size() << " seed(s), P = " << context_.size() << "\n";
    print_task_table(out_, "method", order, job_.tasks, [&](const std::string& method, const std::string& task) {
      std::vector<double> accuracies;
      for (const auto& row : cells[{method, task}]) accuracies.push_back(row.accuracy);
      return accuracies;
    });
    report_methods(out_, order, job_.tasks, cells, {{"samples", n}, {"support_size", job_.support_size}, {"seeds", job_.seeds}}, results_);
  }

  // GradFix with other masks at the middle N: force (tau_A's magnitudes with the votes' signs)
  // and random (tau_A's magnitudes with random signs: a control). The votes come from the cache.
  void mask_ablation() {
    const long long n = middle_samples();
    std::vector<std::string> labels = {mask_mode_name(MaskMode::kNormal)};
    std::map<std::pair<std::string, std::string>, std::vector<double>> cells;
    for (const auto& task : job_.tasks)
      for (const auto& row : tables_[n][{gradfix_label(job_.sign_mode, MaskMode::kNormal), task}]) cells[{labels[0], task}].push_back(row.accuracy);
    for (MaskMode mode : {MaskMode::kForce, MaskMode::kRandom}) {
      labels.push_back(mask_mode_name(mode));
      for (const auto& task : job_.tasks)
        for (std::uint64_t seed : job_.seeds) {
          TransportJob job = transport_job(task, n, seed);
          job.mask_mode = mode;
          job.few_shot_baseline = false;
          for (const auto& row : transport(job))
            if (row.method == gradfix_label(job_.sign_mode, mode)) cells[{labels.back(), task}].push_back(row.accuracy);
        }
    }
    out_ << "\nMask modes: GradFix (" << sign_mode_name(job_.sign_mode) << ") at N = " << n << ", answer-token accuracy %, mean +- std over "
         << job_.seeds.size() << " seed(s) (random: tau_A's magnitudes with random signs)\n";
    print_task_table(out_, "mask mode", labels, job_.tasks, [&](const std::string& mode, const std::string& task) { return cells[{mode, task}]; });
    for (const auto& label : labels)
      for (const auto& task : job_.tasks) {
        const auto [mean, spread] = mean_and_spread(cells[{label, task}]);
        modes_.push_back({{"mask_mode", label}, {"task", task}, {"samples", n}, {"gradfix_test_accuracy_mean", mean},
                          {"gradfix_test_accuracy_std", spread}});
      }
  }

  long long middle_samples() const { return job_.samples[job_.samples.size() / 2]; }

  // A method's accuracy at N averaged over the tasks (each task's mean over the seeds); NaN when
  // the table has no such row.
  double average(long long n, const std::string& method) {
    double sum = 0.0;
    for (const auto& task : job_.tasks) {
      const auto& rows = tables_[n][{method, task}];
      if (rows.empty()) return std::numeric_limits<double>::quiet_NaN();
      double task_sum = 0.0;
      for (const auto& row : rows) task_sum += row.accuracy;
      sum += task_sum / static_cast<double>(rows.size());
    }
    return sum / static_cast<double>(job_.tasks.size());
  }

  // What the demo set out to show, at the middle N (issue 27's criteria), and where fine-tuning
  // from GradFix's model stands against fine-tuning B, per task and N.
  void summarise() {
    const long long n = middle_samples();
    const std::string gradfix = gradfix_label(job_.sign_mode, MaskMode::kNormal);
    const double zero_shot = average(n, "B zero-shot"), naive = average(n, "B + alpha tau_A (naive)"), ours = average(n, gradfix),
                 oracle = average(n, "oracle mask sign(tau_B)");
    criteria_ = {{"samples", n},
                 {"zero_shot", zero_shot},
                 {"naive", naive},
                 {"gradfix", ours},
                 {"oracle", oracle},
                 {"naive_within_5_points_of_zero_shot_or_below", naive - zero_shot <= 0.05},
                 {"gradfix_at_least_naive_plus_5_points", ours - naive >= 0.05},
                 {"oracle_above_gradfix", oracle > ours}};
    out_ << std::fixed << std::setprecision(1) << "\nAt N = " << n << ", averaged over the tasks: naive " << 100 * (naive - zero_shot)
         << " points from zero-shot, GradFix " << 100 * (ours - naive) << " points above naive, the oracle " << 100 * (oracle - ours)
         << " points above GradFix\n";
    for (long long samples : job_.samples) {
      int ahead = 0;
      std::ostringstream cells;
      cells << std::fixed << std::setprecision(1);
      for (const auto& task : job_.tasks) {
        auto mean_of = [&](const std::string& method) {
          double sum = 0.0;
          const auto& rows = tables_[samples][{method, task}];
          for (const auto& row : rows) sum += row.accuracy;
          return rows.empty() ? std::numeric_limits<double>::quiet_NaN() : sum / static_cast<double>(rows.size());
        };
        const double from_b = mean_of("few-shot fine-tuning of B"), from_gradfix = mean_of("GradFix + few-shot fine-tuning");
        if (std::isnan(from_b) || std::isnan(from_gradfix)) return;
        ahead += from_gradfix > from_b;
        cells << " " << task << " " << std::showpos << 100 * (from_gradfix - from_b) << std::noshowpos;
        finetune_comparison_.push_back({{"samples", samples}, {"task", task}, {"few_shot_finetuning_of_b", from_b},
                                        {"gradfix_plus_few_shot_finetuning", from_gradfix}});
      }
      out_ << "N = " << samples << ": fine-tuning from GradFix's model against fine-tuning B, points:" << cells.str() << " (ahead on " << ahead
           << " of " << job_.tasks.size() << ")\n";
    }
    out_.unsetf(std::ios::fixed);
    out_ << "demo --lm: done in " << std::fixed << std::setprecision(0) << seconds_since(started_) << " s\n";
    out_.unsetf(std::ios::fixed);
  }

  void write_results() {
    if (root_ && !job_.results.empty()) {
      nlohmann::json results = {{"demo", "lm"},
                                {"tasks", job_.tasks},
                                {"samples", job_.samples},
                                {"seeds", job_.seeds},
                                {"ranks", context_.size()},
                                {"model", nlohmann::json::parse(kConfig)},
                                {"pretrain", {{"sentences", job_.pretrain_samples}, {"epochs", job_.pretrain_epochs}}},
                                {"finetune", {{"examples", job_.finetune_samples}, {"epochs", job_.finetune_epochs}, {"lr", job_.finetune_lr}}},
                                {"support_size", job_.support_size},
                                {"sign_mode", sign_mode_name(job_.sign_mode)},
                                {"rows", results_},
                                {"mask_modes", modes_},
                                {"criteria", criteria_},
                                {"finetune_comparison", finetune_comparison_},
                                {"seconds", seconds_since(started_)}};
      write_text_file_atomically(job_.results, results.dump(2) + "\n");
      out_ << "demo --lm: results written to " << job_.results << "\n";
    }
  }

  const LmDemoJob& job_;
  const JobContext& context_;
  const bool root_;
  std::ostringstream discard_;
  std::ostream& out_;
  const std::chrono::steady_clock::time_point started_;
  std::string config_;
  std::map<long long, RowsByCell> tables_;  // by N
  std::map<long long, std::vector<std::string>> orders_;
  nlohmann::json results_ = nlohmann::json::array();
  nlohmann::json modes_ = nlohmann::json::array();
  nlohmann::json criteria_ = nlohmann::json::object();
  nlohmann::json finetune_comparison_ = nlohmann::json::array();
};

}  // namespace

void run_lm_demo(const LmDemoJob& job, std::ostream& log, const JobContext& context) {
  job.validate();
  LmDemo(job, log, context).run();
}

}  // namespace gradfix
