#pragma once
// Statistics of two tensors of the same shape (a task vector and a sign tensor, or two task
// vectors): sign agreement, cosine similarity, norms and how many entries are non-zero. They are
// sums, so chunks, tensors and ranks combine by adding.

namespace gradfix {

struct PairStats {
  long long count = 0;
  long long sign_agreements = 0;  // entries with sign(a) == sign(b), zeros counting as a sign
  long long nonzero_a = 0;
  long long nonzero_b = 0;
  double dot = 0.0;
  double norm_a_squared = 0.0;
  double norm_b_squared = 0.0;

  void add(const float* a, const float* b, long long n);
  void add(const double* a, const double* b, long long n);
  void add(const PairStats& other);
  // add(a, a, n) in one third of the work: a vector's own statistics (its count, non-zero
  // entries and squared norm), for the jobs that report on one input.
  void add_self(const float* a, long long n);
  void add_self(const double* a, long long n);
  // Fractions in [0, 1]; 0 for empty tensors.
  double sign_agreement() const;
  // 0 when either vector is zero.
  double cosine() const;
};

}  // namespace gradfix
