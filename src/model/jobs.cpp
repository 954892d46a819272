// The model jobs: init, train, eval, signs, transport and the demo. Models are small enough to
// be replicated on every rank here; what is split across ranks is the few-shot gradient pass
// (each rank takes every P-th shot) and its statistics are all-reduced, so the result is the
// same for any number of ranks.
#ifdef __GLIBC__
#endif

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
#include "classifier_jobs.hpp"
#include "shots.hpp"
#include "decoder_jobs.hpp"
#include "vision_jobs.hpp"
#include "architecture.hpp"
#include "decoder.hpp"
#include "gradfix/dist/backend.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/select.hpp"
#include "gradfix/dist/progress.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/algebra/compare.hpp"
#include "gradfix/algebra/mask.hpp"
#include "gradfix/algebra/merge.hpp"
#include "gradfix/model/jobs.hpp"
#include "gradfix/dist/statistics.hpp"
#include "transport_rows.hpp"

namespace gradfix {


Dataset load_data(const DataOptions& options, long long skip, long long limit) {
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
                 std::ostream& log, const std::string& label, const std::set<std::string>& frozen) {
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

namespace {

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

}  // namespace

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
  job.validate();
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
  if (is_model_directory(job.weights)) return run_decoder_train(job, log, context);
  job.validate();
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
  job.validate();
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
  job.validate();
  if (is_image_model_directory(job.weights)) {
    run_clip_signs(job, log, context);
    return;
  }
  if (!job.head.empty()) throw InputError("--head is for CLIP models; " + job.weights + " is not one");
  if (is_model_directory(job.weights)) {
    run_decoder_signs(job, log, context);
    return;
  }
  if (job.vote_precision != VotePrecision::kF32)
    throw InputError("--vote-precision " + std::string(vote_precision_name(job.vote_precision)) +
                     " is for model directories (decoders, CLIP), whose votes are batched products; " + job.weights +
                     " is a built-in classifier's weights, voted in float32");
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
  job.validate();
  if (!job.finetune_freeze.empty() && is_model_directory(job.target))
    throw InputError("--finetune-freeze is for classifiers; " + job.target +
                     " is a model directory, whose few-shot fine-tuning tunes what the statistics cover (CLIP: never the head)");
  if (!job.save_support.empty() && is_model_directory(job.target))
    throw InputError("--save-support is for classifiers; the support set of " + job.target +
                     " is the --support-size samples after the shots in the seeded shuffle of --data");
  if (is_image_model_directory(job.target)) return run_clip_transport(job, log, context);
  if (!job.head.empty()) throw InputError("--head is for CLIP models; " + job.target + " is not one");
  if (is_model_directory(job.target)) return run_decoder_transport(job, log, context);
  if (!job.statistics_cache.empty())
    throw InputError("--statistics-cache is for model directories (their sharded gradient pass); " + job.target +
                     " is a built-in classifier's weights, whose statistics take seconds");
  if (job.num_samples > 0) throw InputError("--num-samples chooses the shots of a decoder; a classifier takes --shots-per-class");
  if (job.vote_precision != VotePrecision::kF32)
    throw InputError("--vote-precision " + std::string(vote_precision_name(job.vote_precision)) +
                     " is for model directories (decoders, CLIP), whose votes are batched products; " + job.target +
                     " is a built-in classifier's weights, voted in float32");
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

}  // namespace gradfix
