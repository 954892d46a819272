#include "gradfix/algebra/compare.hpp"

#include <cmath>

namespace gradfix {
namespace {

template <typename V>
inline int sign_of(V value) { return (value > V(0)) - (value < V(0)); }

// Adds one chunk's counts and sums.
void fold(PairStats& stats, long long n, long long agreements, long long nonzero_a, long long nonzero_b, double dot, double squares_a,
          double squares_b) {
  stats.count += n;
  stats.sign_agreements += agreements;
  stats.nonzero_a += nonzero_a;
  stats.nonzero_b += nonzero_b;
  stats.dot += dot;
  stats.norm_a_squared += squares_a;
  stats.norm_b_squared += squares_b;
}

template <typename V>
void add_pairs(PairStats& stats, const V* a, const V* b, long long n) {
  long long agreements = 0, nonzero_first = 0, nonzero_second = 0;
  double products = 0.0, squares_a = 0.0, squares_b = 0.0;
  // These are reports, not outputs: letting the compiler reorder the sums (vector lanes) is fine.
#pragma omp simd reduction(+ : agreements, nonzero_first, nonzero_second, products, squares_a, squares_b)
  for (long long i = 0; i < n; ++i) {
    agreements += sign_of(a[i]) == sign_of(b[i]);
    nonzero_first += a[i] != V(0);
    nonzero_second += b[i] != V(0);
    products += static_cast<double>(a[i]) * b[i];
    squares_a += static_cast<double>(a[i]) * a[i];
    squares_b += static_cast<double>(b[i]) * b[i];
  }
  fold(stats, n, agreements, nonzero_first, nonzero_second, products, squares_a, squares_b);
}

template <typename V>
void add_self_pairs(PairStats& stats, const V* a, long long n) {
  long long nonzero = 0;
  double squares = 0.0;
#pragma omp simd reduction(+ : nonzero, squares)
  for (long long i = 0; i < n; ++i) {
    nonzero += a[i] != V(0);
    squares += static_cast<double>(a[i]) * a[i];
  }
  // What add(a, a, n) gives: every sign agrees with itself, and dot = |a|^2 = |b|^2.
  fold(stats, n, n, nonzero, nonzero, squares, squares, squares);
}

}  // namespace

void PairStats::add_self(const float* a, long long n) { add_self_pairs(*this, a, n); }
void PairStats::add_self(const double* a, long long n) { add_self_pairs(*this, a, n); }
void PairStats::add(const float* a, const float* b, long long n) { add_pairs(*this, a, b, n); }
void PairStats::add(const double* a, const double* b, long long n) { add_pairs(*this, a, b, n); }

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
