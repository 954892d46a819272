#pragma once
// The demos' tables and results (gradfix demo and gradfix demo --lm): both report transport rows
// per (method, task), averaged over seeds, in the same form.

#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "gradfix/model/jobs.hpp"

namespace gradfix {

// The transport rows of one table, by (method, task), one row per seed.
using RowsByCell = std::map<std::pair<std::string, std::string>, std::vector<TransportRow>>;

// The label column of the demos' tables: the longest method, "  GradFix + few-shot fine-tuning
// (head frozen)" indented, and two spaces.
constexpr int kLabelWidth = 48;

// The mean and the sample standard deviation (0 for one value).
std::pair<double, double> mean_and_spread(const std::vector<double>& values);

// "12.34 +- 0.56" in percent (the spread left out for one value or when `spread` is false).
std::string mean_cell(const std::vector<double>& values, bool spread = true);

// One table: a row per label, a column per task and their average (of the per-task means).
void print_task_table(std::ostream& out, const std::string& first, const std::vector<std::string>& labels, const std::vector<std::string>& tasks,
                      const std::function<std::vector<double>(const std::string&, const std::string&)>& values);

// What each method did, averaged over the tasks and seeds (alpha, kept, sign agreement, <g,d>,
// compute), printed under a table; one results entry per (method, task) appended to `results`,
// each with the keys of `common` (the table's K or N, support size, seeds, ...).
void report_methods(std::ostream& out, const std::vector<std::string>& order, const std::vector<std::string>& tasks, const RowsByCell& cells,
                    const nlohmann::json& common, nlohmann::json& results);

}  // namespace gradfix
