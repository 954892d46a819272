#pragma once
// Which K shots per class: the strategies of the official GradFix code's DatasetSampler, on
// L2-normalised feature rows, as pure functions (no LibTorch, no files but the features file).
//
//   random    K of each class from a seeded shuffle (sample_per_class in dataset.hpp)
//   coreset   first the row with the smallest summed Euclidean distance to the class's other rows,
//             then repeatedly the remaining row nearest to the selected set (the smallest distance
//             to any selected row)
//   kmedoids  K centres of the class's rows by k-means (k-means++ start, seeded; Lloyd steps
//             until no assignment changes, at most 100), then for each centre in turn the unused
//             row of highest cosine similarity to it. The official code runs scikit-learn's
//             MiniBatchKMeans (random_state 42) instead: same rule, other centres, so the two pick
//             different rows on the same features.
//   herding   greedily, the row that brings the mean of the selected rows closest to the class
//             mean (normalised)
//
// Ties go to the earlier row, as numpy's argmin and the official loops do. The result lists the
// classes in increasing order, each class's rows in the order chosen.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace gradfix {

enum class ShotStrategy { kRandom, kCoreset, kKMedoids, kHerding };
ShotStrategy parse_shot_strategy(const std::string& name);  // InputError naming the valid ones
const char* shot_strategy_name(ShotStrategy strategy);

// Feature rows, row-major [rows, dim].
struct FeatureMatrix {
  std::vector<float> values;
  long long rows = 0;
  long long dim = 0;
  const float* row(long long r) const { return values.data() + r * dim; }
};

// Each row divided by its Euclidean norm (a zero row stays zero), as the official code does.
void normalise_rows(FeatureMatrix& features);

// Positions (0 .. rows - 1) of the k rows each rule picks, in the order picked; k <= rows.
std::vector<long long> coreset_rows(const FeatureMatrix& features, long long k);
std::vector<long long> herding_rows(const FeatureMatrix& features, long long k);
std::vector<long long> kmedoids_rows(const FeatureMatrix& features, long long k, std::uint64_t seed);

// The features of dataset rows `indices` (in that order), not yet normalised.
using FeatureSource = std::function<FeatureMatrix(const std::vector<long long>& indices)>;

// K per class from `pool` (indices into `labels`) by `strategy`; `features` is called once per
// class with that class's pool members in pool order (not for random). InputError naming the class
// when it has fewer than K members.
std::vector<long long> select_per_class(const std::vector<long long>& labels, const std::vector<long long>& pool, long long classes,
                                        long long per_class, ShotStrategy strategy, std::uint64_t seed, const FeatureSource& features);

// A features file: the tensor "features" (or the file's only tensor) [N, D] of a safetensors or
// HDF5 file, one row per dataset row, read as float32. InputError naming the file and both sizes
// when N is not `rows`.
FeatureSource features_from_file(const std::string& path, long long rows);

// The indices as `read_indices` reads them back: one per line; written atomically.
void write_indices(const std::string& path, const std::vector<long long>& indices);

}  // namespace gradfix
