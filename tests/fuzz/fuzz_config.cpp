// The INI config reader (--config FILE) through the command line, as a user's file reaches it.
#include <sstream>

#include "fuzz_common.hpp"
#include "gradfix/cli/cli.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = gradfix_fuzz::write_file("config.ini", data, size);
  std::ostringstream out;
  return gradfix_fuzz::refusals_are_fine([&] { (void)gradfix::run_command_line({"inspect", "--config", path, "--help"}, out); });
}
