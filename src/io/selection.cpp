#include "gradfix/io/selection.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <sstream>

#include "gradfix/io/error.hpp"
#include "gradfix/io/dataset.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {
namespace {

double distance(const FeatureMatrix& features, long long a, long long b) {
  double sum = 0.0;
  const float* x = features.row(a);
  const float* y = features.row(b);
  for (long long d = 0; d < features.dim; ++d) {
    const double difference = static_cast<double>(x[d]) - y[d];
    sum += difference * difference;
  }
  return std::sqrt(sum);
}

void check_k(const FeatureMatrix& features, long long k) {
  GRADFIX_CHECK(k >= 1 && k <= features.rows, "selection of " + std::to_string(k) + " rows of " + std::to_string(features.rows));
}

}  // namespace

ShotStrategy parse_shot_strategy(const std::string& name) {
  if (name == "random") return ShotStrategy::kRandom;
  if (name == "coreset") return ShotStrategy::kCoreset;
  if (name == "kmedoids" || name == "k-medoid") return ShotStrategy::kKMedoids;
  if (name == "herding") return ShotStrategy::kHerding;
  throw InputError("unknown --selection '" + name + "'; valid: random|coreset|kmedoids|herding");
}

const char* shot_strategy_name(ShotStrategy strategy) {
  switch (strategy) {
    case ShotStrategy::kRandom: return "random";
    case ShotStrategy::kCoreset: return "coreset";
    case ShotStrategy::kKMedoids: return "kmedoids";
    case ShotStrategy::kHerding: return "herding";
  }
  return "?";
}

void normalise_rows(FeatureMatrix& features) {
  for (long long r = 0; r < features.rows; ++r) {
    float* row = features.values.data() + r * features.dim;
    double squares = 0.0;
    for (long long d = 0; d < features.dim; ++d) squares += static_cast<double>(row[d]) * row[d];
    if (squares == 0.0) continue;
    const double norm = std::sqrt(squares);
    for (long long d = 0; d < features.dim; ++d) row[d] = static_cast<float>(row[d] / norm);
  }
}

std::vector<long long> coreset_rows(const FeatureMatrix& features, long long k) {
  check_k(features, k);
  const long long n = features.rows;
  std::vector<double> distances(static_cast<std::size_t>(n * n));
  for (long long a = 0; a < n; ++a)
    for (long long b = 0; b < n; ++b) distances[static_cast<std::size_t>(a * n + b)] = a == b ? 0.0 : distance(features, a, b);
  std::vector<long long> chosen;
  std::vector<char> taken(static_cast<std::size_t>(n), 0);
  long long first = 0;
  double best = std::numeric_limits<double>::infinity();
  for (long long a = 0; a < n; ++a) {
    double sum = 0.0;
    for (long long b = 0; b < n; ++b) sum += distances[static_cast<std::size_t>(a * n + b)];
    if (sum < best) best = sum, first = a;
  }
  chosen.push_back(first);
  taken[static_cast<std::size_t>(first)] = 1;
  // nearest[c]: the distance from row c to the selected set, kept up to date as rows are added.
  std::vector<double> nearest(static_cast<std::size_t>(n));
  for (long long c = 0; c < n; ++c) nearest[static_cast<std::size_t>(c)] = distances[static_cast<std::size_t>(c * n + first)];
  while (static_cast<long long>(chosen.size()) < k) {
    long long next = -1;
    double closest = std::numeric_limits<double>::infinity();
    for (long long c = 0; c < n; ++c)
      if (!taken[static_cast<std::size_t>(c)] && nearest[static_cast<std::size_t>(c)] < closest) closest = nearest[static_cast<std::size_t>(c)], next = c;
    chosen.push_back(next);
    taken[static_cast<std::size_t>(next)] = 1;
    for (long long c = 0; c < n; ++c)
      nearest[static_cast<std::size_t>(c)] = std::min(nearest[static_cast<std::size_t>(c)], distances[static_cast<std::size_t>(c * n + next)]);
  }
  return chosen;
}

std::vector<long long> herding_rows(const FeatureMatrix& features, long long k) {
  check_k(features, k);
  const long long n = features.rows, dim = features.dim;
  std::vector<double> mean(static_cast<std::size_t>(dim), 0.0);
  for (long long r = 0; r < n; ++r)
    for (long long d = 0; d < dim; ++d) mean[static_cast<std::size_t>(d)] += features.row(r)[d];
  double norm = 0.0;
  for (long long d = 0; d < dim; ++d) {
    mean[static_cast<std::size_t>(d)] /= static_cast<double>(n);
    norm += mean[static_cast<std::size_t>(d)] * mean[static_cast<std::size_t>(d)];
  }
  norm = std::sqrt(norm);
  if (norm > 0.0)
    for (auto& value : mean) value /= norm;
  std::vector<double> sum(static_cast<std::size_t>(dim), 0.0);
  std::vector<char> taken(static_cast<std::size_t>(n), 0);
  std::vector<long long> chosen;
  for (long long step = 0; step < k; ++step) {
    long long next = -1;
    double best = std::numeric_limits<double>::infinity();
    for (long long c = 0; c < n; ++c) {
      if (taken[static_cast<std::size_t>(c)]) continue;
      double squares = 0.0;
      for (long long d = 0; d < dim; ++d) {
        const double difference = (sum[static_cast<std::size_t>(d)] + features.row(c)[d]) / static_cast<double>(step + 1) - mean[static_cast<std::size_t>(d)];
        squares += difference * difference;
      }
      if (std::sqrt(squares) < best) best = std::sqrt(squares), next = c;
    }
    chosen.push_back(next);
    taken[static_cast<std::size_t>(next)] = 1;
    for (long long d = 0; d < dim; ++d) sum[static_cast<std::size_t>(d)] += features.row(next)[d];
  }
  return chosen;
}

std::vector<long long> kmedoids_rows(const FeatureMatrix& features, long long k, std::uint64_t seed) {
  check_k(features, k);
  const long long n = features.rows, dim = features.dim;
  std::mt19937_64 generator(seed);
  auto uniform = [&] { return static_cast<double>(generator() >> 11) * 0x1.0p-53; };
  // k-means++: the first centre uniformly, each next one with probability proportional to the
  // squared distance to the nearest centre so far.
  std::vector<long long> starts = {static_cast<long long>(generator() % static_cast<std::uint64_t>(n))};
  std::vector<double> nearest(static_cast<std::size_t>(n), std::numeric_limits<double>::infinity());
  while (static_cast<long long>(starts.size()) < k) {
    double total = 0.0;
    for (long long r = 0; r < n; ++r) {
      const double d = distance(features, r, starts.back());
      nearest[static_cast<std::size_t>(r)] = std::min(nearest[static_cast<std::size_t>(r)], d * d);
      total += nearest[static_cast<std::size_t>(r)];
    }
    long long pick = -1;
    if (total > 0.0) {
      double target = uniform() * total;
      for (long long r = 0; r < n && pick < 0; ++r) {
        target -= nearest[static_cast<std::size_t>(r)];
        if (target < 0.0 && nearest[static_cast<std::size_t>(r)] > 0.0) pick = r;
      }
    }
    if (pick < 0)  // every row coincides with a centre (or rounding): the first row not yet a start
      for (long long r = 0; r < n && pick < 0; ++r)
        if (std::find(starts.begin(), starts.end(), r) == starts.end()) pick = r;
    starts.push_back(pick);
  }
  std::vector<double> centres(static_cast<std::size_t>(k * dim));
  for (long long c = 0; c < k; ++c)
    for (long long d = 0; d < dim; ++d) centres[static_cast<std::size_t>(c * dim + d)] = features.row(starts[static_cast<std::size_t>(c)])[d];
  std::vector<long long> assignment(static_cast<std::size_t>(n), -1);
  for (int iteration = 0; iteration < 100; ++iteration) {
    bool changed = false;
    for (long long r = 0; r < n; ++r) {
      long long best = 0;
      double best_distance = std::numeric_limits<double>::infinity();
      for (long long c = 0; c < k; ++c) {
        double squares = 0.0;
        for (long long d = 0; d < dim; ++d) {
          const double difference = features.row(r)[d] - centres[static_cast<std::size_t>(c * dim + d)];
          squares += difference * difference;
        }
        if (squares < best_distance) best_distance = squares, best = c;
      }
      if (assignment[static_cast<std::size_t>(r)] != best) assignment[static_cast<std::size_t>(r)] = best, changed = true;
    }
    if (!changed) break;
    std::vector<double> sums(static_cast<std::size_t>(k * dim), 0.0);
    std::vector<long long> counts(static_cast<std::size_t>(k), 0);
    for (long long r = 0; r < n; ++r) {
      const long long c = assignment[static_cast<std::size_t>(r)];
      ++counts[static_cast<std::size_t>(c)];
      for (long long d = 0; d < dim; ++d) sums[static_cast<std::size_t>(c * dim + d)] += features.row(r)[d];
    }
    for (long long c = 0; c < k; ++c)
      if (counts[static_cast<std::size_t>(c)] > 0)  // an empty cluster keeps its centre
        for (long long d = 0; d < dim; ++d)
          centres[static_cast<std::size_t>(c * dim + d)] = sums[static_cast<std::size_t>(c * dim + d)] / static_cast<double>(counts[static_cast<std::size_t>(c)]);
  }
  // Each centre, normalised, takes the unused row most similar to it.
  std::vector<char> taken(static_cast<std::size_t>(n), 0);
  std::vector<long long> chosen;
  for (long long c = 0; c < k; ++c) {
    double norm = 0.0;
    for (long long d = 0; d < dim; ++d) norm += centres[static_cast<std::size_t>(c * dim + d)] * centres[static_cast<std::size_t>(c * dim + d)];
    norm = std::sqrt(norm) + 1e-12;
    long long best = -1;
    double best_similarity = -std::numeric_limits<double>::infinity();
    for (long long r = 0; r < n; ++r) {
      if (taken[static_cast<std::size_t>(r)]) continue;
      double similarity = 0.0;
      for (long long d = 0; d < dim; ++d) similarity += centres[static_cast<std::size_t>(c * dim + d)] / norm * features.row(r)[d];
      if (similarity > best_similarity) best_similarity = similarity, best = r;
    }
    chosen.push_back(best);
    taken[static_cast<std::size_t>(best)] = 1;
  }
  return chosen;
}

std::vector<long long> select_per_class(const std::vector<long long>& labels, const std::vector<long long>& pool, long long classes,
                                        long long per_class, ShotStrategy strategy, std::uint64_t seed, const FeatureSource& features) {
  if (strategy == ShotStrategy::kRandom) return sample_per_class(labels, pool, classes, per_class, seed);
  const auto by_class = members_by_class(labels, pool, classes, per_class);
  std::vector<long long> chosen;
  for (long long c = 0; c < classes; ++c) {
    const auto& members = by_class[static_cast<std::size_t>(c)];
    FeatureMatrix rows = features(members);
    GRADFIX_CHECK(rows.rows == static_cast<long long>(members.size()), "features of the wrong number of rows");
    normalise_rows(rows);
    const std::vector<long long> picked = strategy == ShotStrategy::kCoreset   ? coreset_rows(rows, per_class)
                                          : strategy == ShotStrategy::kHerding ? herding_rows(rows, per_class)
                                                                               : kmedoids_rows(rows, per_class, seed * 1000003 + static_cast<std::uint64_t>(c));
    for (long long r : picked) chosen.push_back(members[static_cast<std::size_t>(r)]);
  }
  return chosen;
}

FeatureSource features_from_file(const std::string& path, long long rows) {
  const auto reader = open_reader(path);
  const TensorInfo* info = reader->find("features");
  if (info == nullptr) {
    if (reader->tensors().size() != 1) throw InputError(path + ": no tensor 'features' (a features file holds 'features' [N, D], one row per sample)");
    info = &reader->tensors()[0];
  }
  if (info->shape.size() != 2 || info->shape[0] != rows || info->shape[1] < 1)
    throw InputError(path + ": '" + info->name + "' is " + format_shape(info->shape) + " but the data has " + std::to_string(rows) +
                     " samples: features must be [" + std::to_string(rows) + ", D]");
  const long long dim = info->shape[1];
  if (rows * dim > kMaxDatasetBytes / 4)
    throw InputError(path + ": '" + info->name + "' " + format_shape(info->shape) + " is larger than the " + std::to_string(kMaxDatasetBytes) +
                     " bytes gradfix holds for a data set");
  auto all = std::make_shared<const std::vector<float>>(reader->read_f32(info->name));
  return [all, dim](const std::vector<long long>& indices) {
    FeatureMatrix out;
    out.rows = static_cast<long long>(indices.size());
    out.dim = dim;
    out.values.resize(static_cast<std::size_t>(out.rows * dim));
    for (std::size_t i = 0; i < indices.size(); ++i)
      std::copy_n(all->data() + indices[i] * dim, dim, out.values.data() + i * static_cast<std::size_t>(dim));
    return out;
  };
}

void write_indices(const std::string& path, const std::vector<long long>& indices) {
  std::ostringstream text;
  for (long long index : indices) text << index << "\n";
  write_text_file_atomically(path, text.str());
}

}  // namespace gradfix
