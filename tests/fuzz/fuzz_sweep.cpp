// The sweep file reader (gradfix sweep --config SWEEP.ini): sections, keys checked against the
// transport options, axes and their values (which become file names), tasks, the point list.
#include "fuzz_common.hpp"
#include "gradfix/cli/sweep.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = gradfix_fuzz::write_file("sweep.ini", data, size);
  return gradfix_fuzz::refusals_are_fine([&] {
    const gradfix::SweepPlan plan = gradfix::read_sweep_plan(path, {});
    // Every point's result file stays under the sweep's points directory.
    const std::string prefix = plan.out + "/points/";
    for (const auto& point : plan.points) {
      if (point.result.rfind(prefix, 0) != 0) std::abort();
      const std::string inside = point.result.substr(prefix.size());
      if (inside.find("../") != std::string::npos || inside.find('/') != inside.rfind('/')) std::abort();
    }
  });
}
