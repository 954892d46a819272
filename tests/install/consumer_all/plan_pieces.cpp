// Plans two tensors over three ranks with the installed gradfix::dist and prints each rank's
// element count (18 in all).
#include <iostream>

#include "gradfix/dist/plan.hpp"

int main() {
  const std::vector<gradfix::TensorInfo> tensors = {{"w", gradfix::DType::kF32, {3, 4}}, {"b", gradfix::DType::kF32, {6}}};
  const gradfix::ShardPlan plan(tensors, 3);
  for (int rank = 0; rank < plan.ranks(); ++rank) {
    long long elements = 0;
    for (const auto& piece : plan.pieces(rank)) elements += piece.count;
    std::cout << "rank " << rank << " " << elements << "\n";
  }
  return 0;
}
