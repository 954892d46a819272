// gradfix inspect: a checkpoint's tensors, or two compared tensor by tensor.
#include "file_jobs.hpp"
#include "gradfix/io/atomic_file.hpp"

namespace gradfix {
using namespace file_jobs;

void InspectJob::validate() const { require_given(file, "the checkpoint (FILE)"); }

void run_inspect(const InspectJob& job, std::ostream& out, const JobContext& context) {
  using Json = nlohmann::json;
  const Ranks ranks(context);
  Reader file, other;
  std::vector<std::string> names, common, only_first, only_second;
  ranks.agree([&] {
    job.validate();
    file = open_reader(job.file);
    const TensorSelector selector(job.include, job.exclude);
    // inspect lists tensors of unreadable dtypes rather than refusing them.
    for (const auto& tensor : file->tensors())
      if (selector.selects(tensor.name)) names.push_back(tensor.name);
    if (job.other.empty()) return;
    other = open_reader(job.other);
    for (const auto& name : names) (other->find(name) ? common : only_first).push_back(name);
    for (const auto& name : selected_names(*other, selector))
      if (!file->find(name)) only_second.push_back(name);
    require_matching(*file, common, *other);
  });
  Json report = {{"file", job.file}};
  if (!other) {
    if (!ranks.is_root()) return;
    long long elements = 0, bytes = 0;
    out << std::left << std::setw(48) << "tensor" << std::setw(9) << "dtype" << std::setw(22) << "shape" << std::right
        << std::setw(14) << "elements" << std::setw(16) << "bytes" << "\n";
    Json tensors = Json::array();
    for (const auto& name : names) {
      const TensorInfo& info = file->info(name);
      out << std::left << std::setw(48) << escaped_name(name) << std::setw(9) << dtype_name(info.dtype) << std::setw(22)
          << format_shape(info.shape) << std::right << std::setw(14) << info.numel() << std::setw(16) << info.nbytes() << "\n";
      elements += info.numel();
      bytes += info.nbytes();
      tensors.push_back({{"name", escaped_name(name)}, {"dtype", dtype_name(info.dtype)}, {"shape", info.shape}, {"bytes", info.nbytes()}});
    }
    out << names.size() << " tensors, " << elements << " elements, " << bytes << " bytes\n";
    Json unreadable = Json::array();
    for (const auto& [name, dtype] : file->unreadable()) {
      out << "unreadable " << escaped_name(name) << ": dtype '" << escaped_name(dtype) << "' (gradfix reads " << dtype_names()
          << "; jobs need --exclude for it)\n";
      unreadable.push_back({{"name", escaped_name(name)}, {"dtype", escaped_name(dtype)}});
    }
    report["unreadable"] = unreadable;
    for (const auto& [key, value] : file->metadata()) out << "metadata " << escaped_name(key) << " = " << escaped_name(value) << "\n";
    report["tensors"] = tensors;
    report["elements"] = elements;
    report["bytes"] = bytes;
    Json metadata = Json::object();
    for (const auto& [key, value] : file->metadata()) metadata[escaped_name(key)] = escaped_name(value);
    report["metadata"] = metadata;
  } else {
    // Each rank compares its pieces; the per-tensor sums meet on every rank.
    const auto layout = layout_of(*file, common, {});
    const ShardPlan plan(layout, ranks.size());
    std::vector<PairStats> per_tensor(layout.size());
    for (const auto& chunk : my_chunks(ranks, plan, layout)) {
      const std::string& name = layout[chunk.tensor].name;
      const auto a = file->read_f32(name, chunk.begin, chunk.count);
      const auto b = other->read_f32(name, chunk.begin, chunk.count);
      per_tensor[chunk.tensor].add(a.data(), b.data(), chunk.count);
    }
    for (auto& stats : per_tensor) ranks.reduce_summary(stats);
    if (!ranks.is_root()) return;
    // Every column starts with a space, so that a value wider than its column (a long name, a
    // norm in the millions) still stands apart from its neighbours.
    out << std::left << std::setw(48) << "tensor" << std::right << " " << std::setw(11) << "agree" << " " << std::setw(9) << "cosine"
        << " " << std::setw(15) << "norm_a" << " " << std::setw(15) << "norm_b" << "\n";
    PairStats overall;
    Json tensors = Json::array();
    auto row = [&](const std::string& label, const PairStats& stats) {
      out << std::left << std::setw(48) << label << std::right << " " << std::setw(11) << percent(stats.sign_agreement()) << " "
          << std::setw(9) << std::fixed << std::setprecision(4) << stats.cosine() << " " << std::setw(15) << std::setprecision(6)
          << std::sqrt(stats.norm_a_squared) << " " << std::setw(15) << std::sqrt(stats.norm_b_squared) << "\n";
      out.unsetf(std::ios::fixed);
    };
    for (std::size_t t = 0; t < layout.size(); ++t) {
      const PairStats& stats = per_tensor[t];
      overall.add(stats);
      row(escaped_name(layout[t].name), stats);
      tensors.push_back({{"name", escaped_name(layout[t].name)}, {"sign_agreement", stats.sign_agreement()}, {"cosine", stats.cosine()},
                         {"norm_a", std::sqrt(stats.norm_a_squared)}, {"norm_b", std::sqrt(stats.norm_b_squared)}});
    }
    row("(overall, " + std::to_string(common.size()) + " tensors)", overall);
    if (!only_first.empty()) out << "only in " << job.file << ": " << format_name_list(only_first) << "\n";
    if (!only_second.empty()) out << "only in " << job.other << ": " << format_name_list(only_second) << "\n";
    report["other"] = job.other;
    report["tensors"] = tensors;
    report["overall"] = {{"sign_agreement", overall.sign_agreement()}, {"cosine", overall.cosine()}, {"elements", overall.count}};
    auto escaped = [](std::vector<std::string> names) {
      for (auto& name : names) name = escaped_name(name);
      return names;
    };
    report["only_in_file"] = escaped(only_first);
    report["only_in_other"] = escaped(only_second);
  }
  if (!job.json_out.empty()) write_text_file_atomically(job.json_out, report.dump(2) + "\n");
}

}  // namespace gradfix
