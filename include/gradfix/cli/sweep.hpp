#pragma once
// `gradfix sweep`: a grid of transport runs from one INI file, run locally on the ranks of one
// job or one point per Slurm array task, each point's result written atomically so that a sweep
// killed at any moment and run again loses nothing and repeats nothing; then one table.
//
//   [sweep]                      out = DIR; tasks = a,b (default: every [task.NAME] in file order);
//                                every other key is an axis: a transport option and its values,
//                                comma-separated (shots-per-class = 1,2,5,10; seed = 0,1,2)
//   [transport]                  transport options of every point
//   [task.NAME]                  transport options of one task (they win over [transport])
//
// Points are the tasks times the axes (the last axis varies fastest). Point i's result is
// DIR/points/TASK/AXES-HASH.json, HASH a digest of the point's whole command line, so that a
// point whose options changed is run again instead of being taken from an older file.

#include <cstdint>
#include <functional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "gradfix/dist/job_context.hpp"

namespace gradfix {

struct SweepPoint {
  std::string task;
  std::vector<std::pair<std::string, std::string>> axes;  // axis option and its value here
  std::vector<std::string> args;                            // "transport" and its options, results included
  std::string name;                                         // TASK/AXES-HASH
  std::string result;                                       // the result file
};

struct SweepPlan {
  std::string path;
  std::string out;
  std::vector<std::string> tasks;
  std::vector<std::string> axis_names;
  std::vector<SweepPoint> points;
};

// Reads the INI file and applies `overrides` ("SECTION.KEY=VALUE", e.g. "sweep.seed=0"). Every
// key must be an option of `gradfix transport` (besides [sweep]'s out and tasks); an InputError
// names the file, the section, the key and the value otherwise.
SweepPlan read_sweep_plan(const std::string& path, const std::vector<std::string>& overrides);

struct SweepJob {
  std::string config;
  std::vector<std::string> overrides;
  long long point = -1;  // >= 0: only this point (a Slurm array task)
  bool list = false;     // print the points and whether each is done
  bool count = false;    // print the number of points
  bool collect = false;  // only gather the finished points into the table
  void validate() const;
};

// Runs one subcommand's command line ("transport", options...) on this job's ranks.
using SubcommandRunner = std::function<void(const std::vector<std::string>& args, std::ostream& log, const JobContext& context)>;

void run_sweep(const SweepJob& job, std::ostream& log, const JobContext& context, const SubcommandRunner& run);

// The finished points of `plan` as OUT/results.csv (one line per point and method) and
// OUT/table.md (per setting of the axes other than seed: methods x tasks, mean +- std over the
// seeds, and the average over tasks), both written atomically; the table is also printed.
// Returns how many points were missing.
long long collect_sweep(const SweepPlan& plan, std::ostream& log);

}  // namespace gradfix
