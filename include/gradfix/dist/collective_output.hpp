#pragma once
// One output written by every rank of a job together. The io writers only know roles (leader or
// not, one shared token for the temporary names); this component is where the ranks meet: rank 0
// makes the token and creates the files, the others attach after a barrier, all write their own
// ranges, finish() sums what every rank wrote and refuses a gap, and publication happens only
// after the ranks agreed that all of them finished. HDF5 outputs of several ranks go through
// parallel HDF5 (MPI-IO), which needs the host communicator to be MPI.

#include <memory>
#include <string>
#include <vector>

#include "gradfix/dist/job_context.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {

// Collective: every rank of context.host() calls it with the same arguments. The returned
// writer's flush(), finish() and publish() are collective too.
std::unique_ptr<TensorWriter> open_collective_writer(const JobContext& context, const std::string& path,
                                                     const std::vector<TensorInfo>& layout, const Metadata& metadata,
                                                     long long max_shard_bytes = 5LL << 30, bool force = false);

// Finishes on every rank, agrees that all succeeded, then publishes. A writer that is destroyed
// instead (an error on any rank) removes its temporary files.
void commit_collectively(const JobContext& context, TensorWriter& writer);

}  // namespace gradfix
