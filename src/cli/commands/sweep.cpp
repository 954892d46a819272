// gradfix sweep: its options and the step from them to its job (the job's code: src/cli/sweep.cpp).
#include "gradfix/cli/sweep.hpp"

#include "common.hpp"
#include "gradfix/cli/cli.hpp"

namespace gradfix {
namespace commands {
namespace {

// The sweep runs each point as a subcommand of its own: its command line prepared as any other.
SubcommandSpec sweep_subcommand() {
  SubcommandSpec sweep{"sweep",
                       "gradfix sweep --config SWEEP.ini [--point I | --list | --count | --collect] [--set SECTION.KEY=VALUE]",
                       "a grid of transports (tasks x shots x seeds x modes) from one INI file, resumable; one table",
                       Executable::kTorch,
                       {OptionGroup::kModel},
                       {{"point", T::kInteger, "-1", "run only point I (0-based; a Slurm array task: --point $SLURM_ARRAY_TASK_ID)"},
                        {"list", T::kFlag, "", "print every point: index, done or pending, name"},
                        {"count", T::kFlag, "", "print the number of points (to size a job array)"},
                        {"collect", T::kFlag, "", "only gather the finished points into OUT/table.md and OUT/results.csv"},
                        {"set", T::kTexts, "", "override a key of the file: SECTION.KEY=VALUE, e.g. sweep.seed=0 (repeatable)"}},
                       {},
                       [](const Options& values) {
                         SweepJob job;
                         if (values.has("config")) job.config = values.text("config");
                         job.overrides = values.texts("set");
                         job.point = values.integer("point");
                         job.list = values.flag("list");
                         job.count = values.flag("count");
                         job.collect = values.flag("collect");
                         return job_of(job, [](const SweepJob& j, std::ostream& log, const JobContext& c) {
                           run_sweep(j, log, c,
                                     [](const std::vector<std::string>& args, std::ostream& point_log, const JobContext& context) {
                                       PreparedJob point;
                                       context.agree([&] { point = prepare_subcommand(args); });
                                       point(point_log, context);
                                     });
                         });
                       }};
  sweep.config_is_input = true;
  return sweep;
}

const SubcommandRegistration kRegistration(HelpSection::kRuns, sweep_subcommand());

}  // namespace
}  // namespace commands
}  // namespace gradfix
