// gradfix: transport and merge task vectors with gradient-sign masks. main only maps errors to
// exit codes: 2 for bad input, 3 for runtime failures.
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "gradfix/cli/cli.hpp"
#include "gradfix/core/error.hpp"

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    return gradfix::run_command_line(args, std::cout);
  } catch (const gradfix::Error& error) {
    std::cerr << "gradfix: error: " << error.what() << "\n";
    return error.exit_code();
  } catch (const std::exception& error) {
    std::cerr << "gradfix: internal error: " << error.what() << "\n";
    return gradfix::kExitRuntimeFailure;
  }
}
