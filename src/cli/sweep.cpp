#include "gradfix/cli/sweep.hpp"

#include <sys/stat.h>

#include <boost/program_options.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "gradfix/cli/cli.hpp"
#include "gradfix/cli/registry.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/model_files.hpp"

namespace gradfix {
namespace po = boost::program_options;

namespace {

using Json = nlohmann::json;
using Section = std::vector<std::pair<std::string, std::string>>;  // keys in file order

// Options a point may not set: the sweep decides where results go, and the job's ranks, device
// and communicators are the sweep's own (given on its command line).
const std::set<std::string> kNotPerPoint = {"results", "out", "config", "help", "backend", "device", "chunk-elements", "prefetch", "report-memory", "report-time"};
// Transport options whose value is itself a list: never an axis.
const std::set<std::string> kListOptions = {"alphas", "finetune-lrs", "finetune-steps", "finetune-freeze"};
constexpr long long kMaxPoints = 100000;
constexpr std::size_t kMaxResultBytes = 64u << 20;

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    const auto first = item.find_first_not_of(" \t");
    const auto last = item.find_last_not_of(" \t");
    items.push_back(first == std::string::npos ? "" : item.substr(first, last - first + 1));
  }
  return items;
}

void set_key(Section& section, const std::string& key, const std::string& value) {
  for (auto& entry : section)
    if (entry.first == key) {
      entry.second = value;
      return;
    }
  section.emplace_back(key, value);
}

// Whether a transport's --target names a model directory (a path, or a hub name in the local
// cache) whose statistics a cache can keep; anything else is the transport's to refuse.
bool is_model_directory_path(const std::string& target) {
  try {
    return has_model_file(resolve_model_reference(target), "config.json");
  } catch (const Error&) {
    return false;
  }
}

const std::string* find_key(const Section& section, const std::string& key) {
  for (const auto& entry : section)
    if (entry.first == key) return &entry.second;
  return nullptr;
}

// 64-bit FNV-1a: a stable digest of a point's command line (not a security boundary).
std::string digest(const std::vector<std::string>& args) {
  std::uint64_t hash = 1469598103934665603ULL;
  for (const auto& arg : args) {
    for (unsigned char c : arg) hash = (hash ^ c) * 1099511628211ULL;
    hash = (hash ^ 0xffU) * 1099511628211ULL;  // separator: ("ab","c") differs from ("a","bc")
  }
  // splitmix64's finaliser: nearby command lines get unrelated digests.
  hash = (hash ^ (hash >> 30)) * 0xbf58476d1ce4e5b9ULL;
  hash = (hash ^ (hash >> 27)) * 0x94d049bb133111ebULL;
  hash ^= hash >> 31;
  char text[9];
  std::snprintf(text, sizeof text, "%08llx", static_cast<unsigned long long>(hash >> 32));
  return text;
}

// A flag's value in the file: true/yes/1/on or false/no/0/off; false for anything else.
bool is_flag_value(const std::string& value, bool& on) {
  if (value == "true" || value == "yes" || value == "1" || value == "on") {
    on = true;
    return true;
  }
  if (value == "false" || value == "no" || value == "0" || value == "off") {
    on = false;
    return true;
  }
  return false;
}

// Task names and axis values become file names: letters, digits and a few marks only.
bool is_task_name(const std::string& text) {
  static const std::regex pattern("[A-Za-z0-9_-]{1,64}");
  return std::regex_match(text, pattern);
}
bool is_axis_value(const std::string& text) {
  static const std::regex pattern("[A-Za-z0-9.+_-]{1,64}");
  return std::regex_match(text, pattern);
}

// Reads a result file (bounded) as JSON; a missing, partial or foreign file is "not done".
bool read_result(const std::string& path, Json& out) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode) || static_cast<std::size_t>(info.st_size) > kMaxResultBytes) return false;
  std::ifstream file(path, std::ios::binary);
  std::stringstream text;
  text << file.rdbuf();
  out = Json::parse(text.str(), nullptr, false);
  return !out.is_discarded() && out.is_object() && out.contains("rows") && out.at("rows").is_array();
}

// The table's method categories, in the paper's order; GradFix rows keep their full name.
int method_rank(const std::string& method) {
  if (method == "B zero-shot") return 0;
  if (method.rfind("B + alpha tau_A", 0) == 0) return 1;
  if (method.rfind("few-shot fine-tuning", 0) == 0) return 2;
  if (method.rfind("GradFix", 0) == 0) return 3;
  if (method.rfind("oracle", 0) == 0) return 4;
  if (method.rfind("B fine-tuned", 0) == 0) return 5;
  return 6;
}

std::string short_method(const std::string& method) {
  switch (method_rank(method)) {
    case 0: return "zero-shot";
    case 1: return "naive (B + alpha tau_A)";
    case 2: return "few-shot fine-tuning";
    case 4: return "oracle (sign(tau_B) mask)";
    case 5: return "fine-tuned B";
    default: return method;
  }
}

std::string csv_field(const std::string& text) {
  if (text.find_first_of(",\"\n") == std::string::npos) return text;
  std::string quoted = "\"";
  for (char c : text) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

std::string number(double value, int precision) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(precision) << value;
  return text.str();
}

// The sweep file's sections with the --set overrides applied, and the tasks in file order.
struct SweepFile {
  std::map<std::string, Section> sections;
  std::vector<std::string> task_order;
};

SweepFile read_sweep_file(const std::string& path, const std::vector<std::string>& overrides) {
  std::istringstream file(read_option_file(path, "the sweep file"));
  po::parsed_options parsed(nullptr);
  try {
    parsed = po::parse_config_file(file, po::options_description(), true);
  } catch (const po::error& error) {
    throw InputError(path + ": " + escaped_name(error.what()));
  }
  SweepFile read;
  auto& sections = read.sections;
  auto& task_order = read.task_order;
  auto add = [&](const std::string& full_key, const std::string& value, const std::string& origin) {
    const auto dot = full_key.rfind('.');
    if (dot == std::string::npos)
      throw InputError(origin + ": '" + full_key + "' is outside a section; put it under [sweep], [transport] or [task.NAME]");
    const std::string section = full_key.substr(0, dot), key = full_key.substr(dot + 1);
    if (section != "sweep" && section != "transport" && section.rfind("task.", 0) != 0)
      throw InputError(origin + ": section [" + section + "] is not [sweep], [transport] or [task.NAME]");
    if (section.rfind("task.", 0) == 0) {
      const std::string task = section.substr(5);
      if (!is_task_name(task))
        throw InputError(origin + ": task name '" + task + "' must be 1-64 letters, digits, '_' or '-'");
      if (!sections.count(section)) task_order.push_back(task);
    }
    set_key(sections[section], key, value);
  };
  for (const auto& option : parsed.options) add(option.string_key, option.value.empty() ? "" : option.value[0], path);
  for (const auto& text : overrides) {
    refuse_boost_placeholders(text, "--set " + text);
    const auto equals = text.find('=');
    if (equals == std::string::npos) throw InputError("--set '" + text + "': expected SECTION.KEY=VALUE, e.g. sweep.seed=0");
    add(text.substr(0, equals), text.substr(equals + 1), "--set " + text);
  }
  return read;
}

// One point of the sweep: `options` ([transport] with the task's section over it) with the axes'
// values at `at`, as the command line of a transport whose results go under plan.out.
SweepPoint sweep_point(const SweepPlan& plan, const std::string& task, const Section& options,
                       const std::vector<std::pair<std::string, std::vector<std::string>>>& axes, const std::vector<std::size_t>& at,
                       const std::map<std::string, OptionType>& types) {
  SweepPoint point;
  point.task = task;
  Section merged = options;
  std::string label;
  for (std::size_t a = 0; a < axes.size(); ++a) {
    const std::string& value = axes[a].second[at[a]];
    point.axes.emplace_back(axes[a].first, value);
    set_key(merged, axes[a].first, value);
    label += (label.empty() ? "" : "_") + axes[a].first + "=" + value;
  }
  point.args = {"transport"};
  for (const auto& [key, value] : merged) {
    if (types.at(key) == OptionType::kFlag) {
      bool on = false;
      if (!is_flag_value(value, on)) throw InputError(plan.path + ": " + key + " = " + value + ": a flag takes true or false");
      if (on) point.args.push_back("--" + key);
      continue;
    }
    point.args.push_back("--" + key);
    point.args.push_back(value);
  }
  point.name = task + "/" + (label.empty() ? "point" : label) + "-" + digest(point.args);
  point.result = plan.out + "/points/" + point.name + ".json";
  point.args.push_back("--results");
  point.args.push_back(point.result);
  // Points with the same model, shots and sign mode share one gradient pass: a transport of a
  // model directory keeps its statistics under OUT/statistics unless the file names a cache.
  const std::string* target = find_key(merged, "target");
  if (find_key(merged, "statistics-cache") == nullptr && target != nullptr && is_model_directory_path(*target)) {
    point.args.push_back("--statistics-cache");
    point.args.push_back(plan.out + "/statistics");
  }
  return point;
}

}  // namespace

SweepPlan read_sweep_plan(const std::string& path, const std::vector<std::string>& overrides) {
  SweepFile read = read_sweep_file(path, overrides);
  auto& sections = read.sections;
  const auto& task_order = read.task_order;
  const SubcommandSpec* transport = find_subcommand("transport");
  GRADFIX_CHECK(transport != nullptr, "no transport subcommand");
  std::map<std::string, OptionType> types;
  for (const auto& option : all_options(*transport)) types[option.name] = option.type;
  auto check_option = [&](const std::string& section, const std::string& key) {
    if (kNotPerPoint.count(key))
      throw InputError(path + ": [" + section + "] " + key + ": a sweep sets " +
                       (key == "results" || key == "out" ? "where results go itself (and writes no models)"
                                                         : "this on its own command line (gradfix sweep --" + key + ")"));
    if (!types.count(key)) throw InputError(path + ": [" + section + "] '" + key + "' is not an option of 'gradfix transport'");
  };

  SweepPlan plan;
  plan.path = path;
  const Section& sweep = sections["sweep"];
  const std::string* out = find_key(sweep, "out");
  if (out == nullptr || out->empty()) throw InputError(path + ": [sweep] needs out = DIRECTORY (where the points' results go)");
  plan.out = *out;
  std::vector<std::pair<std::string, std::vector<std::string>>> axes;
  for (const auto& [key, value] : sweep) {
    if (key == "out" || key == "tasks") continue;
    check_option("sweep", key);
    if (kListOptions.count(key)) throw InputError(path + ": [sweep] " + key + " is a list itself, not an axis: put it under [transport]");
    std::vector<std::string> values = split_list(value);
    if (values.empty()) throw InputError(path + ": [sweep] " + key + " has no values; an axis lists one or more, comma-separated");
    for (const auto& item : values)
      if (!is_axis_value(item))
        throw InputError(path + ": [sweep] " + key + " = " + value + ": value '" + item + "' must be 1-64 letters, digits, '.', '+', '_' or '-'");
    if (std::set<std::string>(values.begin(), values.end()).size() != values.size())
      throw InputError(path + ": [sweep] " + key + " = " + value + " repeats a value");
    axes.emplace_back(key, values);
    plan.axis_names.push_back(key);
  }
  if (const std::string* tasks = find_key(sweep, "tasks")) {
    plan.tasks = split_list(*tasks);
    for (const auto& task : plan.tasks)
      if (!sections.count("task." + task)) throw InputError(path + ": [sweep] tasks names '" + task + "' but there is no [task." + task + "]");
  } else {
    plan.tasks = task_order;
  }
  if (plan.tasks.empty()) throw InputError(path + ": no tasks: give at least one [task.NAME] section");
  for (const auto& [key, value] : sections["transport"]) check_option("transport", key);
  for (const auto& task : task_order)
    for (const auto& [key, value] : sections["task." + task]) {
      check_option("task." + task, key);
      for (const auto& axis : plan.axis_names)
        if (axis == key) throw InputError(path + ": [task." + task + "] sets " + key + ", which is an axis of [sweep]");
    }
  for (const auto& [key, value] : sections["transport"])
    for (const auto& axis : plan.axis_names)
      if (axis == key) throw InputError(path + ": [transport] sets " + key + ", which is an axis of [sweep]");

  long long total = static_cast<long long>(plan.tasks.size());
  for (const auto& axis : axes) {
    total *= static_cast<long long>(axis.second.size());
    if (total > kMaxPoints) throw InputError(path + ": the sweep has more than " + std::to_string(kMaxPoints) + " points");
  }
  // Every point: task outermost, then the axes in file order, the last fastest.
  for (const auto& task : plan.tasks) {
    Section options = sections["transport"];
    for (const auto& [key, value] : sections["task." + task]) set_key(options, key, value);
    std::vector<std::size_t> at(axes.size(), 0);
    while (true) {
      plan.points.push_back(sweep_point(plan, task, options, axes, at, types));
      std::size_t a = axes.size();
      while (a > 0 && ++at[a - 1] == axes[a - 1].second.size()) at[--a] = 0;
      if (a == 0) break;
    }
  }
  return plan;
}

long long collect_sweep(const SweepPlan& plan, std::ostream& log) {
  struct Record {
    const SweepPoint* point;
    Json result;
  };
  std::vector<Record> records;
  std::vector<std::string> missing;
  for (const auto& point : plan.points) {
    Json result;
    if (read_result(point.result, result))
      records.push_back({&point, result});
    else
      missing.push_back(point.name);
  }
  std::string metric = "accuracy";
  // results.csv: one line per point and method.
  std::ostringstream csv;
  csv << "task";
  for (const auto& axis : plan.axis_names) csv << "," << csv_field(axis);
  csv << ",method,accuracy,loss,alpha,kept,sign_agreement,directional_derivative,forward_samples,backward_samples\n";
  for (const auto& record : records) {
    if (record.result.contains("metric") && record.result.at("metric").is_string()) metric = record.result.at("metric").get<std::string>();
    for (const auto& row : record.result.at("rows")) {
      csv << csv_field(record.point->task);
      for (const auto& axis : record.point->axes) csv << "," << csv_field(axis.second);
      auto value = [&](const char* key) { return row.contains(key) && row.at(key).is_number() ? number(row.at(key).get<double>(), 6) : ""; };
      auto count = [&](const char* key) {
        return row.contains(key) && row.at(key).is_number_integer() ? std::to_string(row.at(key).get<long long>()) : std::string();
      };
      csv << "," << csv_field(row.value("method", "")) << "," << value("test_accuracy") << "," << value("test_loss") << "," << value("alpha")
          << "," << value("kept") << "," << value("sign_agreement_with_tau_b") << "," << value("directional_derivative") << ","
          << count("forward_samples") << "," << count("backward_samples") << "\n";
    }
  }

  // table.md: per setting of the axes other than seed, methods x tasks, mean +- std over seeds.
  std::map<std::string, std::map<std::string, std::map<std::string, std::vector<double>>>> cells;  // setting -> method -> task -> values
  std::vector<std::string> settings;
  for (const auto& record : records) {
    std::string setting;
    for (const auto& [axis, value] : record.point->axes)
      if (axis != "seed") setting += (setting.empty() ? "" : ", ") + axis + " = " + value;
    if (std::find(settings.begin(), settings.end(), setting) == settings.end()) settings.push_back(setting);
    for (const auto& row : record.result.at("rows"))
      if (row.contains("test_accuracy") && row.at("test_accuracy").is_number())
        cells[setting][row.value("method", "")][record.point->task].push_back(100.0 * row.at("test_accuracy").get<double>());
  }
  std::ostringstream table;
  table << "# gradfix sweep: " << plan.path << "\n\n"
        << "Test " << metric << " (%), mean +- std over the seeds; average: the mean of the tasks' means. " << records.size() << " of "
        << plan.points.size() << " points finished.\n";
  if (!missing.empty()) {
    table << "Missing (" << missing.size() << "):";
    for (std::size_t i = 0; i < missing.size() && i < 20; ++i) table << " " << missing[i];
    table << (missing.size() > 20 ? " ..." : "") << "\n";
  }
  for (const auto& setting : settings) {
    table << "\n## " << (setting.empty() ? "all points" : setting) << "\n\n| method |";
    for (const auto& task : plan.tasks) table << " " << task << " |";
    table << " average |\n|---|";
    for (std::size_t t = 0; t <= plan.tasks.size(); ++t) table << "---:|";
    table << "\n";
    std::vector<std::string> methods;
    for (const auto& [method, by_task] : cells[setting]) methods.push_back(method);
    std::stable_sort(methods.begin(), methods.end(), [](const std::string& a, const std::string& b) { return method_rank(a) < method_rank(b); });
    for (const auto& method : methods) {
      table << "| " << short_method(method) << " |";
      double sum = 0.0;
      bool complete = true;
      for (const auto& task : plan.tasks) {
        const auto found = cells[setting][method].find(task);
        if (found == cells[setting][method].end()) {
          table << " - |";
          complete = false;
          continue;
        }
        const std::vector<double>& values = found->second;
        double mean = 0.0;
        for (double v : values) mean += v;
        mean /= static_cast<double>(values.size());
        sum += mean;
        table << " " << number(mean, 1);
        if (values.size() > 1) {
          double squares = 0.0;
          for (double v : values) squares += (v - mean) * (v - mean);
          table << " +- " << number(std::sqrt(squares / static_cast<double>(values.size() - 1)), 1);
        }
        table << " |";
      }
      table << " " << (complete ? number(sum / static_cast<double>(plan.tasks.size()), 1) : std::string("-")) << " |\n";
    }
  }
  ensure_directory(plan.out);
  write_text_file_atomically(plan.out + "/results.csv", csv.str());
  write_text_file_atomically(plan.out + "/table.md", table.str());
  log << table.str() << "\nsweep: " << plan.out << "/table.md and " << plan.out << "/results.csv written\n";
  // What the statistics cache saved: points whose statistics (some or all) were read, not
  // computed. Said in the log, not the table: which points of an array ran first, and so which
  // reused, depends on the scheduler, and the table must not.
  long long cached = 0, reused = 0, computed = 0;
  for (const auto& record : records)
    if (record.result.contains("statistics_cache")) {
      const Json& cache = record.result.at("statistics_cache");
      ++cached;
      reused += cache.value("hits", 0LL) > 0 ? 1 : 0;
      computed += cache.value("misses", 0LL);
    }
  if (cached > 0)
    log << "sweep: statistics cache: " << reused << " of " << cached << " points reused cached statistics; " << computed
        << " gradient passes ran\n";
  return static_cast<long long>(missing.size());
}

void SweepJob::validate() const {
  if (config.empty()) throw InputError("gradfix sweep: --config SWEEP.ini is required");
  if (point < -1) throw InputError("--point must be 0 or more, got " + std::to_string(point));
  if (static_cast<int>(list) + static_cast<int>(count) + static_cast<int>(collect) + static_cast<int>(point >= 0) > 1)
    throw InputError("give one of --point, --list, --count and --collect");
}

void run_sweep(const SweepJob& job, std::ostream& log, const JobContext& context, const SubcommandRunner& run) {
  job.validate();
  SweepPlan plan;
  context.agree([&] { plan = read_sweep_plan(job.config, job.overrides); });
  const long long total = static_cast<long long>(plan.points.size());
  if (job.count) {
    log << total << "\n";
    return;
  }
  if (job.point >= total)
    throw InputError(job.config + ": --point " + std::to_string(job.point) + " but the sweep has " + std::to_string(total) + " points (0 to " +
                     std::to_string(total - 1) + ")");
  if (job.list) {
    for (long long i = 0; i < total; ++i) {
      Json result;
      log << i << "\t" << (read_result(plan.points[static_cast<std::size_t>(i)].result, result) ? "done" : "pending") << "\t"
          << plan.points[static_cast<std::size_t>(i)].name << "\n";
    }
    return;
  }
  if (job.collect) {
    if (context.is_root()) collect_sweep(plan, log);
    return;
  }
  long long skipped = 0, ran = 0;
  for (long long i = 0; i < total; ++i) {
    if (job.point >= 0 && i != job.point) continue;
    const SweepPoint& point = plan.points[static_cast<std::size_t>(i)];
    // Every rank must agree on whether a point is done: rank 0 looks, and says.
    long long done = 0;
    if (context.is_root()) {
      Json result;
      done = read_result(point.result, result) ? 1 : 0;
    }
    context.host().broadcast(&done, 1, DType::kI64, 0);
    if (done != 0) {
      ++skipped;
      continue;
    }
    log << "sweep: point " << i << " of " << total << ": " << point.name << "\n";
    context.agree([&] {
      if (context.is_root()) ensure_directory(parent_directory(point.result));
    });
    run(point.args, log, context);
    ++ran;
  }
  log << "sweep: " << ran << " point(s) run, " << skipped << " already finished (" << plan.out << "/points)\n";
  if (job.point < 0 && context.is_root()) {
    const long long missing = collect_sweep(plan, log);
    if (missing > 0) throw RuntimeFailure(std::to_string(missing) + " point(s) of the sweep have no result");
  }
}

}  // namespace gradfix
