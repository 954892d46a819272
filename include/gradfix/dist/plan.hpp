#pragma once
// The shard plan: which element ranges of which tensors each rank owns. The tensors are laid end
// to end and the byte total is cut into P nearly equal ranges, so a big tensor is split across
// ranks and small ones are not. Cuts fall on split units (a whole row of a tensor of two or more
// dimensions, kVectorSplitUnit elements of a vector), which keeps every row-wise reduction on one
// rank. The plan depends only on the tensor list and P: every rank computes the same one.

#include <cstddef>
#include <utility>
#include <vector>

#include "gradfix/io/tensor_store.hpp"

namespace gradfix {

constexpr long long kVectorSplitUnit = 4096;

struct Piece {
  std::size_t tensor = 0;  // index into the tensor list
  long long begin = 0;     // first element
  long long count = 0;
};

class ShardPlan {
 public:
  ShardPlan(const std::vector<TensorInfo>& tensors, int ranks);

  int ranks() const { return static_cast<int>(pieces_.size()); }
  const std::vector<Piece>& pieces(int rank) const { return pieces_[static_cast<std::size_t>(rank)]; }
  // Whether more than one rank owns elements of this tensor.
  bool is_split(std::size_t tensor) const { return owners_[tensor] > 1; }
  long long bytes(int rank) const;
  // The rank's elements as one range of the tensors laid end to end in list order:
  // {first element, count}. Ranges of consecutive ranks are adjacent.
  std::pair<long long, long long> flat_range(int rank) const;
  long long total_elements() const;

 private:
  std::vector<TensorInfo> tensors_;
  std::vector<std::vector<Piece>> pieces_;
  std::vector<int> owners_;
};

// The granularity at which a tensor may be cut.
long long split_unit(const TensorInfo& tensor);

// Cuts a piece into chunks of at most `max_elements`, at multiples of `unit` counted from the
// start of the tensor (a unit larger than max_elements gives chunks of one unit).
std::vector<Piece> chunks_of(const Piece& piece, long long unit, long long max_elements);

}  // namespace gradfix
