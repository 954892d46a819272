// gradfix: transport and merge task vectors with gradient-sign masks. main starts the MPI
// runtime (a world of one without mpirun), runs the command line, and maps errors to exit codes:
// 2 for bad input, 3 for runtime failures. A failure that the other ranks do not know of (it
// happened between two collective steps) removes this job's temporary files and ends every
// rank with MPI_Abort, so nothing waits forever and nothing half-written is published.
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <csignal>
#include <cstdlib>
#include <unistd.h>

#include <exception>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "gradfix/cli/cli.hpp"
#include "gradfix/cli/registry.hpp"
#include "gradfix/dist/mpi.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/model/jobs.hpp"

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

// OpenBLAS names a CPU by its family and model. Where a hypervisor reports a generic model it
// takes its Prescott (SSE3) kernel, which ran one core's float32 products 3-4x slower here than
// its AVX-512 kernel. Sets OPENBLAS_CORETYPE to the kernel the CPU supports (SkylakeX with
// AVX-512, Haswell with AVX2) when OpenBLAS, asked through `core_name`, picked Prescott; returns
// whether it did. OpenBLAS reads the variable only when it is loaded, so this must run before.
// A user's own OPENBLAS_CORETYPE is left alone.
bool choose_blas_kernel(void* core_name) {
  if (core_name == nullptr || std::getenv("OPENBLAS_CORETYPE") != nullptr) return false;
  const char* picked = reinterpret_cast<char* (*)()>(core_name)();
  if (picked == nullptr || std::string(picked) != "Prescott") return false;
  __builtin_cpu_init();
  const char* kernel = nullptr;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd"))
    kernel = "SkylakeX";
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    kernel = "Haswell";
  if (kernel == nullptr) return false;
  ::setenv(gradfix::kReplacedBlasKernelVariable, picked, 1);
  ::setenv("OPENBLAS_CORETYPE", kernel, 1);
  return true;
}

#ifndef GRADFIX_TORCH_EXECUTABLE
// The model subcommands run in gradfix-torch, beside this executable, which carries LibTorch.
// Replacing this process before MPI starts keeps mpirun and srun launches working unchanged.
void hand_model_subcommands_to_torch_executable(char** argv) {
  if (argv[1] == nullptr) return;
  const gradfix::SubcommandSpec* subcommand = gradfix::find_subcommand(argv[1]);
  if (subcommand == nullptr || subcommand->executable != gradfix::Executable::kTorch) return;
  char self[4096] = {};
  const ssize_t length = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (length <= 0) return;
  std::string path(self, static_cast<std::size_t>(length));
  path = path.substr(0, path.find_last_of('/') + 1) + "gradfix-torch";
  if (::access(path.c_str(), X_OK) != 0) return;  // no LibTorch part: the stubs say so
  // The BLAS that LibTorch loads, asked here so that gradfix-torch starts with the right kernel.
  if (void* blas = ::dlopen("libblas.so.3", RTLD_NOW | RTLD_LOCAL)) choose_blas_kernel(::dlsym(blas, "openblas_get_corename"));
  ::execv(path.c_str(), argv);
}
#endif

}  // namespace

int main(int argc, char** argv) {
#ifndef GRADFIX_TORCH_EXECUTABLE
  hand_model_subcommands_to_torch_executable(argv);
#else
  // Started directly (not through gradfix): OpenBLAS is loaded already, so a kernel chosen now
  // needs a fresh start of this process (about 0.35 s).
  if (choose_blas_kernel(::dlsym(RTLD_DEFAULT, "openblas_get_corename"))) {
    ::execv("/proc/self/exe", argv);
    ::unsetenv("OPENBLAS_CORETYPE");  // not restarted: say nothing false about the kernel
    ::unsetenv(gradfix::kReplacedBlasKernelVariable);
  }
#endif
#if defined(GRADFIX_TORCH_EXECUTABLE) && defined(__GLIBC__)
  // The model jobs allocate and free layer-sized tensors over and over. glibc raises its mmap
  // threshold after each large free, and then keeps tens of MiB per size class in its heap:
  // a fixed threshold returns every buffer over 1 MiB to the system when freed (measured: peak
  // resident memory of a sharded decoder pass at 4 ranks 1111 -> 928 MiB).
  ::mallopt(M_MMAP_THRESHOLD, 1 << 20);
#elif defined(__GLIBC__)
  // The file jobs allocate and free chunk buffers of up to a few MiB for every chunk. With glibc's
  // defaults each free returns the top of the heap to the system and the next chunk faults the
  // same pages in again (a quarter of a TIES merge's time, measured): buffers under 32 MiB come
  // from the heap, and up to 128 MiB of freed heap is kept for the next chunk. The peak is the
  // same, since the next chunk needs as much again (measured: 126 -> 128 MiB, 4.84 -> 3.93 s).
  ::mallopt(M_MMAP_THRESHOLD, 32 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 128 << 20);
#endif
#ifdef GRADFIX_TORCH_EXECUTABLE
  gradfix::configure_tensor_memory();
#endif
  // An interrupt while MPI starts (a few tenths of a second) must not be lost: the stop signals
  // are held back until gradfix's handlers are in place, then delivered to them.
  sigset_t stop_signals, previous;
  sigemptyset(&stop_signals);
  for (int signal_number : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&stop_signals, signal_number);
  ::sigprocmask(SIG_BLOCK, &stop_signals, &previous);
  std::unique_ptr<gradfix::MpiRuntime> runtime;
  try {
    runtime = std::make_unique<gradfix::MpiRuntime>(&argc, &argv);
  } catch (const gradfix::Error& error) {
    std::cerr << "gradfix: error: " << error.what() << "\n";
    return error.exit_code();
  }
  gradfix::install_cleanup_signal_handlers();
  ::pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
#ifdef GRADFIX_TORCH_EXECUTABLE
    gradfix::configure_threads(runtime->local_size());
#endif
    return gradfix::run_command_line(args, std::cout, runtime.get());
  } catch (const gradfix::Error& error) {
    return fail(*runtime, error.what(), error.exit_code(), error.silent(), error.agreed());
  } catch (const std::exception& error) {
    return fail(*runtime, std::string("internal error: ") + error.what(), gradfix::kExitRuntimeFailure, false, false);
  }
}
