// gradfix: transport and merge task vectors with gradient-sign masks. main starts the MPI
// runtime (a world of one without mpirun), runs the command line, and maps errors to exit codes:
// 2 for bad input, 3 for runtime failures. A failure that the other ranks do not know of (it
// happened between two collective steps) removes this job's temporary files and ends every
// rank with MPI_Abort, so nothing waits forever and nothing half-written is published.
#include <exception>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "gradfix/cli/cli.hpp"
#include "gradfix/comm/mpi.hpp"
#include "gradfix/core/error.hpp"
#include "gradfix/io/atomic_file.hpp"

namespace {

int fail(gradfix::MpiRuntime& runtime, const std::string& message, int exit_code, bool silent, bool agreed) {
  const gradfix::MpiCommunicator& world = runtime.world();
  if (!silent) {
    std::cerr << "gradfix: error: ";
    if (world.size() > 1) std::cerr << "[" << gradfix::describe_rank(world) << "] ";
    std::cerr << message << std::endl;
  }
  if (!agreed && world.size() > 1) {
    gradfix::remove_registered_temporaries();
    world.abort(exit_code);
  }
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  std::unique_ptr<gradfix::MpiRuntime> runtime;
  try {
    runtime = std::make_unique<gradfix::MpiRuntime>(&argc, &argv);
  } catch (const gradfix::Error& error) {
    std::cerr << "gradfix: error: " << error.what() << "\n";
    return error.exit_code();
  }
  gradfix::install_cleanup_signal_handlers();
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    return gradfix::run_command_line(args, std::cout, runtime.get());
  } catch (const gradfix::Error& error) {
    return fail(*runtime, error.what(), error.exit_code(), error.silent(), error.agreed());
  } catch (const std::exception& error) {
    return fail(*runtime, std::string("internal error: ") + error.what(), gradfix::kExitRuntimeFailure, false, false);
  }
}
