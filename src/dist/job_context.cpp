#include "gradfix/dist/job_context.hpp"

#include <exception>

#include "gradfix/dist/solo.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {

JobContext::JobContext() : host_(&solo_communicator()), stats_(&solo_communicator()) {}

JobContext::JobContext(Communicator& host, Communicator& stats) : host_(&host), stats_(&stats) {
  GRADFIX_CHECK(host.size() == stats.size() && host.rank() == stats.rank(),
                "statistics communicator " + describe_rank(stats) + " does not match the host " + describe_rank(host));
}

void JobContext::agree(const std::function<void()>& work) const {
  std::exception_ptr failure;
  int code = 0;
  try {
    work();
  } catch (const CollectiveTimeout&) {
    throw;  // the others cannot be asked: main ends the job
  } catch (const Error& error) {
    // Agreed in a step nested in this one: every rank is throwing already.
    if (error.agreed()) throw;
    failure = std::current_exception();
    code = error.exit_code();
  } catch (const std::exception& error) {
    failure = std::make_exception_ptr(RuntimeFailure(error.what()));
    code = kExitRuntimeFailure;
  }
  if (size() == 1) {
    if (failure) std::rethrow_exception(failure);
    return;
  }
  // The first failing rank, then its exit code for everyone: every rank leaves with one code.
  int first = failure ? rank() : size();
  host_->allreduce(&first, &first, 1, DType::kI32, ReduceOp::kMin);
  if (first == size()) return;
  host_->broadcast(&code, 1, DType::kI32, first);
  if (rank() == first) {
    try {
      std::rethrow_exception(failure);
    } catch (Error& error) {
      error.mark_agreed();
      throw;
    }
  }
  throw PeerFailure("stopped because rank " + std::to_string(first) + " failed", code);
}

void agree_on_outcome(const JobContext& context, const std::function<void()>& work) { context.agree(work); }

}  // namespace gradfix
