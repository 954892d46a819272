#include "gradfix/pipeline/jobs.hpp"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "gradfix/core/error.hpp"
#include "gradfix/core/select.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {
namespace {

using Reader = std::unique_ptr<TensorReader>;

void check_finite(const std::vector<float>& values, const TensorReader& reader, const std::string& name, bool allow) {
  if (allow) return;
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      throw InputError(reader.path() + ": tensor '" + name + "': element " + std::to_string(i) + " is " +
                       (std::isnan(values[i]) ? "NaN" : "infinite") + "; pass --allow-nonfinite to accept such values");
    }
  }
}

// Reads a whole tensor in fp32 and refuses NaN and Inf unless they are allowed.
std::vector<float> load(const TensorReader& reader, const std::string& name, bool allow_nonfinite) {
  std::vector<float> values = reader.read_f32(name);
  check_finite(values, reader, name, allow_nonfinite);
  return values;
}

std::vector<std::string> selected_names(const TensorReader& reader, const TensorSelector& selector) {
  std::vector<std::string> names;
  for (const auto& tensor : reader.tensors())
    if (selector.selects(tensor.name)) names.push_back(tensor.name);
  return names;
}

// Every name must exist in `other` with the same shape; all mismatches are reported together,
// so one run tells the user everything that is wrong.
void require_matching(const TensorReader& primary, const std::vector<std::string>& names, const TensorReader& other) {
  std::vector<std::string> missing;
  std::string shapes;
  for (const auto& name : names) {
    const TensorInfo* theirs = other.find(name);
    if (theirs == nullptr) {
      missing.push_back(name);
      continue;
    }
    const TensorInfo& ours = primary.info(name);
    if (ours.shape != theirs->shape && shapes.empty())
      shapes = "tensor '" + name + "': shape " + format_shape(ours.shape) + " in " + primary.path() + ", " +
               format_shape(theirs->shape) + " in " + other.path();
  }
  if (!missing.empty())
    throw InputError(other.path() + " lacks " + std::to_string(missing.size()) + " tensor(s) that " + primary.path() +
                     " has: " + format_name_list(missing));
  if (!shapes.empty()) throw InputError(shapes);
}

// The selected names of `other` that `primary` lacks: two checkpoints meant to be the same
// model must not differ in either direction.
void require_no_extra(const TensorReader& primary, const TensorReader& other, const TensorSelector& selector) {
  std::vector<std::string> extra;
  for (const auto& name : selected_names(other, selector))
    if (primary.find(name) == nullptr) extra.push_back(name);
  if (!extra.empty())
    throw InputError(other.path() + " has " + std::to_string(extra.size()) + " tensor(s) that " + primary.path() +
                     " lacks: " + format_name_list(extra));
}

void require_selection(const std::vector<std::string>& names, const TensorReader& reader) {
  if (names.empty())
    throw InputError(reader.path() + ": no tensor is selected (" + std::to_string(reader.tensors().size()) +
                     " tensors in the file; check --include and --exclude)");
}

TensorInfo output_info(const TensorInfo& input, const OutputOptions& output) {
  TensorInfo info = input;
  if (output.out_dtype) info.dtype = *output.out_dtype;
  return info;
}

Metadata output_metadata(const Metadata& input, const std::string& operation) {
  Metadata metadata = input;
  metadata["gradfix.operation"] = operation;
  return metadata;
}

WriteOptions write_options(const OutputOptions& output) {
  WriteOptions options;
  options.max_shard_bytes = output.max_shard_bytes;
  return options;
}

// Copies a tensor unchanged, converting only when the output dtype differs.
long long copy_tensor(const TensorReader& reader, const std::string& name, TensorWriter& writer, DType out_dtype) {
  const TensorInfo& info = reader.info(name);
  if (info.dtype == out_dtype) {
    std::vector<unsigned char> raw(static_cast<std::size_t>(info.nbytes()));
    reader.read_raw(name, 0, info.numel(), raw.data());
    writer.write_raw(name, 0, info.numel(), raw.data());
  } else {
    const std::vector<float> values = reader.read_f32(name);
    writer.write_f32(name, 0, values.data(), info.numel());
  }
  return info.numel() * static_cast<long long>(dtype_size(out_dtype));
}

std::string percent(double fraction) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(2) << 100.0 * fraction << "%";
  return text.str();
}

long long layout_bytes(const std::vector<TensorInfo>& layout) {
  long long bytes = 0;
  for (const auto& tensor : layout) bytes += tensor.nbytes();
  return bytes;
}

}  // namespace

JobSummary run_taskvector(const TaskVectorJob& job, std::ostream& log) {
  const Reader base = open_reader(job.base);
  const Reader finetuned = open_reader(job.finetuned);
  const TensorSelector selector(job.output.include, job.output.exclude);
  const auto names = selected_names(*base, selector);
  require_selection(names, *base);
  require_matching(*base, names, *finetuned);
  require_no_extra(*base, *finetuned, selector);

  std::vector<TensorInfo> layout;
  for (const auto& name : names) layout.push_back(output_info(base->info(name), job.output));
  auto writer = open_writer(job.out, layout, output_metadata(base->metadata(), "taskvector"), write_options(job.output));
  JobSummary summary;
  for (const auto& name : names) {
    const std::vector<float> base_values = load(*base, name, job.output.allow_nonfinite);
    std::vector<float> tau = load(*finetuned, name, job.output.allow_nonfinite);
    for (std::size_t i = 0; i < tau.size(); ++i) tau[i] -= base_values[i];
    writer->write_f32(name, 0, tau.data(), static_cast<long long>(tau.size()));
    summary.stats.add(tau.data(), tau.data(), static_cast<long long>(tau.size()));
    summary.elements += static_cast<long long>(tau.size());
  }
  writer->commit();
  summary.tensors_written = summary.tensors_changed = static_cast<long long>(names.size());
  summary.bytes_written = layout_bytes(layout);
  log << "taskvector: " << names.size() << " tensors, " << summary.elements << " elements, ||tau|| = "
      << std::sqrt(summary.stats.norm_a_squared) << ", written to " << job.out << "\n";
  return summary;
}

JobSummary run_apply(const ApplyJob& job, std::ostream& log) {
  if (!std::isfinite(job.alpha)) throw InputError("--alpha must be finite, got " + std::to_string(job.alpha));
  const Reader base = open_reader(job.base);
  const Reader tau = open_reader(job.task_vector);
  const TensorSelector selector(job.output.include, job.output.exclude);
  // A task vector may cover part of a model (a vision tower, say): every tensor it has must be
  // in the base, and the base's other tensors are copied unchanged.
  const auto tau_names = selected_names(*tau, selector);
  require_selection(tau_names, *tau);
  require_matching(*tau, tau_names, *base);
  const std::set<std::string> changed(tau_names.begin(), tau_names.end());

  std::vector<TensorInfo> layout;
  for (const auto& tensor : base->tensors()) layout.push_back(output_info(tensor, job.output));
  Metadata metadata = output_metadata(base->metadata(), "apply");
  metadata["gradfix.alpha"] = std::to_string(job.alpha);
  auto writer = open_writer(job.out, layout, metadata, write_options(job.output));
  JobSummary summary;
  for (const auto& out : layout) {
    if (!changed.count(out.name)) {
      copy_tensor(*base, out.name, *writer, out.dtype);
      continue;
    }
    std::vector<float> values = load(*base, out.name, job.output.allow_nonfinite);
    const std::vector<float> delta = load(*tau, out.name, job.output.allow_nonfinite);
    const auto alpha = static_cast<float>(job.alpha);
    for (std::size_t i = 0; i < values.size(); ++i) values[i] += alpha * delta[i];
    writer->write_f32(out.name, 0, values.data(), static_cast<long long>(values.size()));
    summary.stats.add(delta.data(), delta.data(), static_cast<long long>(delta.size()));
    summary.elements += static_cast<long long>(values.size());
  }
  writer->commit();
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.tensors_changed = static_cast<long long>(tau_names.size());
  summary.bytes_written = layout_bytes(layout);
  log << "apply: base + " << job.alpha << " * tau on " << tau_names.size() << " of " << layout.size()
      << " tensors (" << summary.elements << " elements), written to " << job.out << "\n";
  return summary;
}

JobSummary run_mask(const MaskJob& job, std::ostream& log) {
  const Reader tau = open_reader(job.task_vector);
  const Reader signs = open_reader(job.signs);
  const TensorSelector selector(job.output.include, job.output.exclude);
  const auto names = selected_names(*tau, selector);
  require_selection(names, *tau);
  require_matching(*tau, names, *signs);
  const std::set<std::string> changed(names.begin(), names.end());

  std::vector<TensorInfo> layout;
  for (const auto& tensor : tau->tensors()) layout.push_back(output_info(tensor, job.output));
  Metadata metadata = output_metadata(tau->metadata(), "mask");
  metadata["gradfix.mask_mode"] = mask_mode_name(job.mode);
  auto writer = open_writer(job.out, layout, metadata, write_options(job.output));
  JobSummary summary;
  PairStats kept;  // masked output against the input task vector
  for (const auto& out : layout) {
    if (!changed.count(out.name)) {
      copy_tensor(*tau, out.name, *writer, out.dtype);
      continue;
    }
    const std::vector<float> values = load(*tau, out.name, job.output.allow_nonfinite);
    const std::vector<float> statistics = load(*signs, out.name, job.output.allow_nonfinite);
    const std::vector<float> masked =
        mask_tensor(job.mode, job.mask, values, statistics, out.shape, tensor_key_of(out.name));
    const auto count = static_cast<long long>(values.size());
    writer->write_f32(out.name, 0, masked.data(), count);
    summary.stats.add(values.data(), statistics.data(), count);
    kept.add(masked.data(), values.data(), count);
    summary.elements += count;
  }
  writer->commit();
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.tensors_changed = static_cast<long long>(names.size());
  summary.bytes_written = layout_bytes(layout);
  const double kept_fraction =
      kept.nonzero_b > 0 ? static_cast<double>(kept.nonzero_a) / static_cast<double>(kept.nonzero_b) : 0.0;
  log << "mask " << mask_mode_name(job.mode) << ": " << names.size() << " tensors, " << summary.elements
      << " elements; sign agreement of tau with the statistics " << percent(summary.stats.sign_agreement())
      << "; non-zero entries kept " << percent(kept_fraction) << "; written to " << job.out << "\n";
  return summary;
}

JobSummary run_merge(const MergeJob& job, std::ostream& log) {
  if (job.task_vectors.empty()) throw InputError("merge needs at least one --task-vector");
  if (job.order != MergeOrder::kNone && job.signs.size() != job.task_vectors.size())
    throw InputError(std::string("--order ") + merge_order_name(job.order) + " needs one --signs per --task-vector: got " +
                     std::to_string(job.signs.size()) + " --signs for " + std::to_string(job.task_vectors.size()) +
                     " --task-vector");
  if (job.order == MergeOrder::kNone && !job.signs.empty())
    throw InputError("--signs given without --order mask-then-merge|merge-then-mask");
  if (job.method == MergeMethod::kTies && !(job.ties.fraction > 0.0 && job.ties.fraction <= 1.0))
    throw InputError("--ties-fraction must be in (0, 1], got " + std::to_string(job.ties.fraction));

  std::vector<Reader> vectors, signs;
  for (const auto& path : job.task_vectors) vectors.push_back(open_reader(path));
  for (const auto& path : job.signs) signs.push_back(open_reader(path));
  const TensorSelector selector(job.output.include, job.output.exclude);
  const auto names = selected_names(*vectors[0], selector);
  require_selection(names, *vectors[0]);
  for (std::size_t v = 1; v < vectors.size(); ++v) {
    require_matching(*vectors[0], names, *vectors[v]);
    require_no_extra(*vectors[0], *vectors[v], selector);
  }
  for (const auto& reader : signs) require_matching(*vectors[0], names, *reader);

  const bool allow = job.output.allow_nonfinite;
  // Vector v's values for one tensor, masked with its own statistics when masking comes first.
  auto load_vector = [&](std::size_t v, const std::string& name) {
    std::vector<float> values = load(*vectors[v], name, allow);
    if (job.order != MergeOrder::kMaskThenMerge) return values;
    const std::vector<float> statistics = load(*signs[v], name, allow);
    return mask_tensor(job.mode, job.mask, values, statistics, vectors[v]->info(name).shape, tensor_key_of(name));
  };

  // Global TIES needs each vector's threshold over all its tensors before anything is merged.
  std::vector<float> global_thresholds;
  if (job.method == MergeMethod::kTies && job.ties.scope == TiesScope::kGlobal) {
    long long total = 0;
    for (const auto& name : names) total += vectors[0]->info(name).numel();
    for (std::size_t v = 0; v < vectors.size(); ++v) {
      KthLargestMagnitude selection(ties_keep_count(total, job.ties.fraction));
      while (selection.needs_pass()) {
        for (const auto& name : names) {
          const std::vector<float> values = load_vector(v, name);
          selection.add(values.data(), static_cast<long long>(values.size()));
        }
        selection.next_pass();
      }
      global_thresholds.push_back(selection.threshold());
    }
  }

  std::vector<TensorInfo> layout;
  for (const auto& name : names) layout.push_back(output_info(vectors[0]->info(name), job.output));
  Metadata metadata = output_metadata(vectors[0]->metadata(), "merge");
  metadata["gradfix.merge_method"] = merge_method_name(job.method);
  metadata["gradfix.merge_order"] = merge_order_name(job.order);
  auto writer = open_writer(job.out, layout, metadata, write_options(job.output));
  JobSummary summary;
  for (const auto& out : layout) {
    std::vector<std::vector<float>> values;
    std::vector<const float*> pointers;
    for (std::size_t v = 0; v < vectors.size(); ++v) values.push_back(load_vector(v, out.name));
    for (const auto& vector : values) pointers.push_back(vector.data());
    const auto count = out.numel();
    std::vector<float> thresholds = global_thresholds;
    if (job.method == MergeMethod::kTies && job.ties.scope == TiesScope::kTensor)
      for (const auto& vector : values)
        thresholds.push_back(kth_largest_magnitude(vector.data(), count, ties_keep_count(count, job.ties.fraction)));
    std::vector<float> merged(static_cast<std::size_t>(count));
    merge_values(job.method, job.ties.elect, pointers, count, thresholds, merged.data());
    if (job.order == MergeOrder::kMergeThenMask) {
      // The summed sign tensors: a per-entry majority over the sources' statistics.
      std::vector<float> summed(static_cast<std::size_t>(count), 0.0f);
      for (const auto& reader : signs) {
        const std::vector<float> statistics = load(*reader, out.name, allow);
        for (long long i = 0; i < count; ++i) summed[i] += (statistics[i] > 0.0f) - (statistics[i] < 0.0f);
      }
      const std::vector<float> unmasked = merged;
      merged = mask_tensor(job.mode, job.mask, unmasked, summed, out.shape, tensor_key_of(out.name));
    }
    writer->write_f32(out.name, 0, merged.data(), count);
    summary.stats.add(merged.data(), values[0].data(), count);
    summary.elements += count;
  }
  writer->commit();
  summary.tensors_written = summary.tensors_changed = static_cast<long long>(names.size());
  summary.bytes_written = layout_bytes(layout);
  log << "merge " << merge_method_name(job.method) << " (" << merge_order_name(job.order) << ") of "
      << vectors.size() << " task vectors: " << names.size() << " tensors, " << summary.elements
      << " elements; cosine of the merge with the first vector " << summary.stats.cosine() << "; written to "
      << job.out << "\n";
  return summary;
}

JobSummary run_convert(const ConvertJob& job, std::ostream& log) {
  const Reader in = open_reader(job.in);
  const TensorSelector selector(job.output.include, job.output.exclude);
  const auto names = selected_names(*in, selector);
  require_selection(names, *in);
  std::vector<TensorInfo> layout;
  for (const auto& name : names) layout.push_back(output_info(in->info(name), job.output));
  auto writer = open_writer(job.out, layout, in->metadata(), write_options(job.output));
  JobSummary summary;
  for (const auto& out : layout) {
    if (!job.output.allow_nonfinite) load(*in, out.name, false);
    copy_tensor(*in, out.name, *writer, out.dtype);
    summary.elements += out.numel();
  }
  writer->commit();
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.bytes_written = layout_bytes(layout);
  log << "convert: " << layout.size() << " tensors, " << summary.bytes_written << " bytes, written to " << job.out
      << "\n";
  return summary;
}

std::vector<TensorInfo> parse_shapes(const std::string& text, DType dtype) {
  std::vector<TensorInfo> layout;
  std::stringstream entries(text);
  std::string entry;
  while (std::getline(entries, entry, ',')) {
    const auto equals = entry.find('=');
    if (equals == std::string::npos || equals == 0)
      throw InputError("--shapes entry '" + entry + "' is not NAME=DIMxDIMx... (e.g. w=256x784)");
    TensorInfo tensor{entry.substr(0, equals), dtype, {}};
    std::stringstream dims(entry.substr(equals + 1));
    std::string dim;
    while (std::getline(dims, dim, 'x')) {
      if (dim.empty() || dim.find_first_not_of("0123456789") != std::string::npos)
        throw InputError("--shapes entry '" + entry + "': '" + dim + "' is not a dimension");
      tensor.shape.push_back(std::stoll(dim));
    }
    layout.push_back(tensor);
  }
  if (layout.empty()) throw InputError("--shapes is empty");
  return layout;
}

std::vector<TensorInfo> mlp_layout(const std::string& dims, DType dtype) {
  std::vector<long long> widths;
  std::stringstream text(dims);
  std::string width;
  while (std::getline(text, width, ',')) {
    if (width.empty() || width.find_first_not_of("0123456789") != std::string::npos || std::stoll(width) == 0)
      throw InputError("--mlp '" + dims + "': '" + width + "' is not a positive layer width");
    widths.push_back(std::stoll(width));
  }
  if (widths.size() < 2) throw InputError("--mlp '" + dims + "' needs at least two widths (input and output)");
  std::vector<TensorInfo> layout;
  for (std::size_t i = 0; i + 1 < widths.size(); ++i) {
    layout.push_back({"layers." + std::to_string(i) + ".weight", dtype, {widths[i + 1], widths[i]}});
    layout.push_back({"layers." + std::to_string(i) + ".bias", dtype, {widths[i + 1]}});
  }
  return layout;
}

JobSummary run_generate(const GenerateJob& job, std::ostream& log) {
  if (!std::isfinite(job.noise) || !std::isfinite(job.like_scale)) throw InputError("--noise and --like-scale must be finite");
  Reader like;
  std::vector<TensorInfo> layout = job.layout;
  if (!job.like.empty()) {
    like = open_reader(job.like);
    layout.clear();
    for (const auto& tensor : like->tensors()) layout.push_back(output_info(tensor, job.output));
  }
  if (layout.empty()) throw InputError("generate needs --mlp, --shapes or --like");
  auto writer = open_writer(job.out, layout, like ? like->metadata() : Metadata{}, write_options(job.output));
  JobSummary summary;
  for (const auto& tensor : layout) {
    std::vector<float> values(static_cast<std::size_t>(tensor.numel()), 0.0f);
    if (like) {
      values = load(*like, tensor.name, job.output.allow_nonfinite);
      for (auto& value : values) value = static_cast<float>(job.like_scale * value);
    }
    std::mt19937_64 generator(job.seed ^ tensor_key_of(tensor.name));
    std::normal_distribution<double> normal(0.0, 1.0);
    for (auto& value : values) value += static_cast<float>(job.noise * normal(generator));
    writer->write_f32(tensor.name, 0, values.data(), tensor.numel());
    summary.elements += tensor.numel();
  }
  writer->commit();
  summary.tensors_written = static_cast<long long>(layout.size());
  summary.bytes_written = layout_bytes(layout);
  log << "generate: " << layout.size() << " tensors, " << summary.elements << " elements, written to " << job.out << "\n";
  return summary;
}

void run_inspect(const InspectJob& job, std::ostream& out) {
  using Json = nlohmann::json;
  const Reader file = open_reader(job.file);
  const TensorSelector selector(job.include, job.exclude);
  const auto names = selected_names(*file, selector);
  Json report = {{"file", job.file}};
  if (job.other.empty()) {
    long long elements = 0, bytes = 0;
    out << std::left << std::setw(48) << "tensor" << std::setw(6) << "dtype" << std::setw(22) << "shape" << std::right
        << std::setw(14) << "elements" << std::setw(16) << "bytes" << "\n";
    Json tensors = Json::array();
    for (const auto& name : names) {
      const TensorInfo& info = file->info(name);
      out << std::left << std::setw(48) << name << std::setw(6) << dtype_name(info.dtype) << std::setw(22)
          << format_shape(info.shape) << std::right << std::setw(14) << info.numel() << std::setw(16) << info.nbytes()
          << "\n";
      elements += info.numel();
      bytes += info.nbytes();
      tensors.push_back({{"name", name}, {"dtype", dtype_name(info.dtype)}, {"shape", info.shape}, {"bytes", info.nbytes()}});
    }
    out << names.size() << " tensors, " << elements << " elements, " << bytes << " bytes\n";
    for (const auto& [key, value] : file->metadata()) out << "metadata " << key << " = " << value << "\n";
    report["tensors"] = tensors;
    report["elements"] = elements;
    report["bytes"] = bytes;
    report["metadata"] = file->metadata();
  } else {
    const Reader other = open_reader(job.other);
    std::vector<std::string> common, only_first, only_second;
    for (const auto& name : names) (other->find(name) ? common : only_first).push_back(name);
    for (const auto& name : selected_names(*other, selector))
      if (!file->find(name)) only_second.push_back(name);
    require_matching(*file, common, *other);
    out << std::left << std::setw(48) << "tensor" << std::right << std::setw(12) << "agree" << std::setw(10) << "cosine"
        << std::setw(14) << "norm_a" << std::setw(14) << "norm_b" << "\n";
    PairStats overall;
    Json tensors = Json::array();
    auto row = [&](const std::string& label, const PairStats& stats) {
      out << std::left << std::setw(48) << label << std::right << std::setw(12) << percent(stats.sign_agreement())
          << std::setw(10) << std::fixed << std::setprecision(4) << stats.cosine() << std::setw(14)
          << std::setprecision(6) << std::sqrt(stats.norm_a_squared) << std::setw(14) << std::sqrt(stats.norm_b_squared)
          << "\n";
      out.unsetf(std::ios::fixed);
    };
    for (const auto& name : common) {
      const std::vector<float> a = file->read_f32(name);
      const std::vector<float> b = other->read_f32(name);
      PairStats stats;
      stats.add(a.data(), b.data(), static_cast<long long>(a.size()));
      overall.add(stats);
      row(name, stats);
      tensors.push_back({{"name", name}, {"sign_agreement", stats.sign_agreement()}, {"cosine", stats.cosine()},
                         {"norm_a", std::sqrt(stats.norm_a_squared)}, {"norm_b", std::sqrt(stats.norm_b_squared)}});
    }
    row("(overall, " + std::to_string(common.size()) + " tensors)", overall);
    if (!only_first.empty()) out << "only in " << job.file << ": " << format_name_list(only_first) << "\n";
    if (!only_second.empty()) out << "only in " << job.other << ": " << format_name_list(only_second) << "\n";
    report["other"] = job.other;
    report["tensors"] = tensors;
    report["overall"] = {{"sign_agreement", overall.sign_agreement()}, {"cosine", overall.cosine()},
                         {"elements", overall.count}};
    report["only_in_file"] = only_first;
    report["only_in_other"] = only_second;
  }
  if (!job.json_out.empty()) {
    const std::string temporary = temporary_path_for(job.json_out);
    {
      std::ofstream json(temporary);
      json << report.dump(2) << "\n";
      if (!json) {
        remove_quietly(temporary);
        throw RuntimeFailure(job.json_out + ": cannot write the JSON report");
      }
    }
    rename_file(temporary, job.json_out);
  }
}

}  // namespace gradfix
