#include "gradfix/dist/plan.hpp"

#include <algorithm>

#include "gradfix/io/error.hpp"

namespace gradfix {

long long split_unit(const TensorInfo& tensor) {
  if (tensor.shape.size() >= 2 && tensor.shape[0] > 0) return std::max(1LL, tensor.numel() / tensor.shape[0]);
  return kVectorSplitUnit;
}

ShardPlan::ShardPlan(const std::vector<TensorInfo>& tensors, int ranks)
    : tensors_(tensors), pieces_(static_cast<std::size_t>(std::max(ranks, 1))), owners_(tensors.size(), 0) {
  if (ranks < 1) throw InputError("a shard plan needs at least one rank, got " + std::to_string(ranks));
  long long total = 0;
  for (const auto& tensor : tensors) total += tensor.nbytes();

  // Cut r lies at byte r * total / P; it moves to the nearest split unit inside its tensor, and
  // never before the previous cut. A cut is (tensor index, element offset).
  std::vector<std::pair<std::size_t, long long>> cuts;
  cuts.emplace_back(0, 0);
  std::size_t tensor = 0;
  long long tensor_start = 0;  // bytes before `tensor`
  for (int r = 1; r < ranks; ++r) {
    const long long target = total / ranks * r + total % ranks * r / ranks;  // r * total / P without overflow
    while (tensor < tensors.size() && tensor_start + tensors[tensor].nbytes() <= target) {
      tensor_start += tensors[tensor].nbytes();
      ++tensor;
    }
    std::pair<std::size_t, long long> cut{tensors.size(), 0};
    if (tensor < tensors.size()) {
      const TensorInfo& info = tensors[tensor];
      const long long item = static_cast<long long>(dtype_size(info.dtype));
      const long long element = (target - tensor_start) / item;
      const long long unit = split_unit(info);
      long long snapped = (element + unit / 2) / unit * unit;
      snapped = std::min(snapped, info.numel());
      cut = {tensor, snapped};
    }
    cut = std::max(cut, cuts.back());
    cuts.push_back(cut);
  }
  cuts.emplace_back(tensors.size(), 0);

  for (int r = 0; r < ranks; ++r) {
    auto [t, offset] = cuts[static_cast<std::size_t>(r)];
    const auto end = cuts[static_cast<std::size_t>(r) + 1];
    while (std::make_pair(t, offset) < end) {
      const long long stop = t == end.first ? end.second : tensors[t].numel();
      if (stop > offset) {
        pieces_[static_cast<std::size_t>(r)].push_back({t, offset, stop - offset});
        ++owners_[t];
      }
      ++t;
      offset = 0;
    }
  }
}

long long ShardPlan::bytes(int rank) const {
  long long bytes = 0;
  for (const auto& piece : pieces(rank)) bytes += piece.count * static_cast<long long>(dtype_size(tensors_[piece.tensor].dtype));
  return bytes;
}

std::pair<long long, long long> ShardPlan::flat_range(int rank) const {
  long long before = 0;  // elements of all tensors before each piece's tensor
  std::vector<long long> starts(tensors_.size(), 0);
  for (std::size_t t = 0; t < tensors_.size(); ++t) {
    starts[t] = before;
    before += tensors_[t].numel();
  }
  const auto& mine = pieces(rank);
  if (mine.empty()) {
    // An empty rank sits where the next non-empty rank starts (or at the end).
    for (int next = rank + 1; next < ranks(); ++next)
      if (!pieces(next).empty()) return {starts[pieces(next)[0].tensor] + pieces(next)[0].begin, 0};
    return {before, 0};
  }
  const long long first = starts[mine.front().tensor] + mine.front().begin;
  const long long last = starts[mine.back().tensor] + mine.back().begin + mine.back().count;
  return {first, last - first};
}

long long ShardPlan::total_elements() const {
  long long total = 0;
  for (const auto& tensor : tensors_) total += tensor.numel();
  return total;
}

std::vector<Piece> chunks_of(const Piece& piece, long long unit, long long max_elements) {
  std::vector<Piece> chunks;
  const long long step = std::max(unit, max_elements / std::max(unit, 1LL) * unit);
  long long begin = piece.begin;
  const long long end = piece.begin + piece.count;
  while (begin < end) {
    // The first chunk ends at the next multiple of `step` counted from the tensor's start.
    const long long boundary = (begin / step + 1) * step;
    const long long stop = std::min(end, boundary);
    chunks.push_back({piece.tensor, begin, stop - begin});
    begin = stop;
  }
  return chunks;
}

}  // namespace gradfix
