#include "gradfix/mask/compare.hpp"

#include <cmath>

namespace gradfix {
namespace {

inline int sign_of(float value) { return (value > 0.0f) - (value < 0.0f); }

}  // namespace

void PairStats::add(const float* a, const float* b, long long n) {
  for (long long i = 0; i < n; ++i) {
    sign_agreements += sign_of(a[i]) == sign_of(b[i]);
    nonzero_a += a[i] != 0.0f;
    nonzero_b += b[i] != 0.0f;
    dot += static_cast<double>(a[i]) * b[i];
    norm_a_squared += static_cast<double>(a[i]) * a[i];
    norm_b_squared += static_cast<double>(b[i]) * b[i];
  }
  count += n;
}

void PairStats::add(const PairStats& other) {
  count += other.count;
  sign_agreements += other.sign_agreements;
  nonzero_a += other.nonzero_a;
  nonzero_b += other.nonzero_b;
  dot += other.dot;
  norm_a_squared += other.norm_a_squared;
  norm_b_squared += other.norm_b_squared;
}

double PairStats::sign_agreement() const {
  return count > 0 ? static_cast<double>(sign_agreements) / static_cast<double>(count) : 0.0;
}

double PairStats::cosine() const {
  const double denominator = std::sqrt(norm_a_squared) * std::sqrt(norm_b_squared);
  return denominator > 0.0 ? dot / denominator : 0.0;
}

}  // namespace gradfix
