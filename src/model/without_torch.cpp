// The model subcommands in a build without LibTorch: each says so instead of doing nothing.
#include "gradfix/io/error.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {
namespace {

[[noreturn]] void no_torch(const char* subcommand) {
  throw InputError(std::string("gradfix ") + subcommand +
                   ": this gradfix has no LibTorch part (gradfix-torch is not beside the gradfix executable); install "
                   "LibTorch (Debian: libtorch-dev; elsewhere set Torch_DIR to an official LibTorch) and rebuild");
}

}  // namespace

bool torch_available() { return false; }
int configure_threads(int) { return 0; }
int configured_threads() { return 0; }
void configure_allocator() {}
void configure_tensor_memory() {}
void release_kept_tensor_memory() {}
std::string blas_description() { return "no LibTorch"; }
void run_init(const InitJob&, std::ostream&, const JobContext&) { no_torch("init"); }
void run_train(const TrainJob&, std::ostream&, const JobContext&) { no_torch("train"); }
void run_eval(const EvalJob&, std::ostream&, const JobContext&) { no_torch("eval"); }
void run_signs(const SignsJob&, std::ostream&, const JobContext&) { no_torch("signs"); }
std::vector<TransportRow> run_transport(const TransportJob&, std::ostream&, const JobContext&) { no_torch("transport"); }
void run_demo(const DemoJob&, std::ostream&, const JobContext&) { no_torch("demo"); }
void run_lm_demo(const LmDemoJob&, std::ostream&, const JobContext&) { no_torch("demo --lm"); }

}  // namespace gradfix
