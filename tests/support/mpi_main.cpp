// main() of the tests that run under mpirun: the MPI runtime around GoogleTest. Every rank runs
// every test; only rank 0 prints; the exit code is the worst of all ranks.
#include <gtest/gtest.h>

#include "gradfix/dist/mpi.hpp"

namespace gradfix {

MpiRuntime* g_runtime = nullptr;
MpiCommunicator& test_world() { return g_runtime->world(); }

}  // namespace gradfix

int main(int argc, char** argv) {
  gradfix::MpiRuntime runtime(&argc, &argv);
  gradfix::g_runtime = &runtime;
  ::testing::InitGoogleTest(&argc, argv);
  if (runtime.world().rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS();
  runtime.world().allreduce(&failed, &failed, 1, gradfix::DType::kI32, gradfix::ReduceOp::kMax);
  return failed;
}
