#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "gradfix/algebra/merge.hpp"

namespace gradfix {
namespace {

// For non-negative floats the bit pattern, read as an unsigned integer, orders like the value,
// which is what lets a radix histogram find an order statistic.
inline std::uint32_t magnitude_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits & 0x7FFFFFFFu;
}

constexpr std::size_t kBuckets = 1u << 16;
// The 32-bit lanes are folded into the histogram before any could overflow.
constexpr long long kFoldEvery = 1LL << 31;
// A first pass over at most this many values counts straight into the histogram.
constexpr long long kDirectValues = 1LL << 18;

}  // namespace

long long ties_keep_count(long long n, double fraction) {
  if (n <= 0 || fraction <= 0.0) return 0;
  if (fraction >= 1.0) return n;
  const auto k = static_cast<long long>(std::ceil(static_cast<double>(n) * fraction));
  return std::min(n, std::max(1LL, k));
}

float kth_largest_magnitude(const float* values, long long n, long long k) {
  if (k <= 0) return std::numeric_limits<float>::infinity();
  if (k > n) return 0.0f;
  std::vector<float> magnitudes(static_cast<std::size_t>(n));
  for (long long i = 0; i < n; ++i) magnitudes[static_cast<std::size_t>(i)] = std::fabs(values[i]);
  auto kth = magnitudes.begin() + (k - 1);
  std::nth_element(magnitudes.begin(), kth, magnitudes.end(), std::greater<float>());
  return *kth;
}

KthLargestMagnitude::KthLargestMagnitude(long long k) : k_(k), histogram_(kBuckets, 0) {}

void KthLargestMagnitude::add(const float* values, long long n) {
  if (!needs_pass()) return;
  if (pass_ == 0) {
    // Deltas cluster in few buckets, so one histogram's increments wait on each other; four
    // interleaved 32-bit histograms, folded in before they could overflow, run about twice as fast.
    // The lanes cost a fold of four histograms: worth it only past a few hundred thousand values.
    if (lanes_.empty() && counted_ + n <= kDirectValues) {
      for (long long i = 0; i < n; ++i) ++histogram_[magnitude_bits(values[i]) >> 16];
      counted_ += n;
      return;
    }
    if (lanes_.empty()) lanes_.assign(4 * kBuckets, 0);
    std::uint32_t* lanes = lanes_.data();
    for (long long first = 0; first < n; first += kFoldEvery) {
      const long long stop = std::min(n, first + kFoldEvery);
      long long i = first;
      for (; i + 4 <= stop; i += 4) {
        ++lanes[magnitude_bits(values[i]) >> 16];
        ++lanes[kBuckets + (magnitude_bits(values[i + 1]) >> 16)];
        ++lanes[2 * kBuckets + (magnitude_bits(values[i + 2]) >> 16)];
        ++lanes[3 * kBuckets + (magnitude_bits(values[i + 3]) >> 16)];
      }
      for (; i < stop; ++i) ++lanes[magnitude_bits(values[i]) >> 16];
      pending_ += stop - first;
      if (pending_ >= kFoldEvery) fold_lanes();
    }
  } else {
    for (long long i = 0; i < n; ++i) {
      const std::uint32_t bits = magnitude_bits(values[i]);
      if ((bits >> 16) == bucket_) ++histogram_[bits & 0xFFFFu];
    }
  }
}

void KthLargestMagnitude::fold_lanes() {
  for (std::size_t lane = 0; lane < lanes_.size(); lane += kBuckets)
    for (std::size_t b = 0; b < kBuckets; ++b) histogram_[b] += lanes_[lane + b];
  std::fill(lanes_.begin(), lanes_.end(), 0u);
  pending_ = 0;
}

std::vector<long long>& KthLargestMagnitude::histogram() {
  if (pending_ > 0) fold_lanes();
  return histogram_;
}

void KthLargestMagnitude::next_pass() {
  if (!needs_pass()) return;
  if (pending_ > 0) fold_lanes();
  const long long wanted = pass_ == 0 ? k_ : k_ - above_;
  long long seen = 0;
  long long chosen = -1;
  for (long long b = static_cast<long long>(kBuckets) - 1; b >= 0; --b) {
    if (seen + histogram_[static_cast<std::size_t>(b)] >= wanted) {
      chosen = b;
      break;
    }
    seen += histogram_[static_cast<std::size_t>(b)];
  }
  if (chosen < 0) {  // fewer values than k: everything is kept
    keep_all_ = true;
    pass_ = 2;
    return;
  }
  if (pass_ == 0) {
    bucket_ = static_cast<unsigned>(chosen);
    above_ = seen;
  } else {
    low_ = static_cast<unsigned>(chosen);
  }
  ++pass_;
  std::fill(histogram_.begin(), histogram_.end(), 0);
}

float KthLargestMagnitude::threshold() const {
  if (k_ <= 0) return std::numeric_limits<float>::infinity();
  if (keep_all_) return 0.0f;
  const std::uint32_t bits = (bucket_ << 16) | low_;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace gradfix
