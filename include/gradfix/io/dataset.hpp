#pragma once
// Labelled samples for the few-shot gradient pass, alpha selection and evaluation. A dataset is
// N samples of one shape, stored as float32 in one array, with int64 labels. Two file formats:
//   - HDF5: dataset `inputs` (N x ..., float32 or any numeric type) and `labels` (N, integer);
//   - IDX, the MNIST format (gzipped or not): `PREFIX-images-idx3-ubyte[.gz]` with
//     `PREFIX-labels-idx1-ubyte[.gz]` beside it; pixel bytes scaled to [0, 1].
// No LibTorch here: the selection logic is plain code, tested on its own.

#include <cstdint>
#include <string>
#include <vector>

namespace gradfix {

struct Dataset {
  std::vector<float> inputs;          // N * sample_size values (empty when `bytes` holds them)
  // Images stored as uint8 ([N, H, W, C] pixels) and loaded with keep_bytes: kept as they are, a
  // quarter of their float32 size, for a model that resizes and normalises them itself (CLIP).
  std::vector<std::uint8_t> bytes;
  std::vector<long long> labels;      // N labels in [0, classes)
  std::vector<long long> sample_shape;  // e.g. {28, 28} or {1, 28, 28}
  long long classes = 0;

  long long size() const { return static_cast<long long>(labels.size()); }
  long long sample_size() const;
  // The samples at these indices, in this order.
  Dataset subset(const std::vector<long long>& indices) const;
};

// Bounds on what a dataset may declare, checked before anything is allocated: bytes held in
// memory (inputs as float32, labels as int64), and labels (classes) per dataset.
constexpr long long kMaxDatasetBytes = 8LL << 30;
constexpr long long kMaxClasses = 1LL << 24;

// Reads an HDF5 file, an IDX images file, or a directory and split name of IDX files
// ("DIR:train" → DIR/train-images-idx3-ubyte[.gz]). Throws InputError naming the file and what is
// wrong: labels out of range, counts that disagree, a bad magic number, an empty set.
// With `keep_bytes`, HDF5 `inputs` stored as U8 stay bytes (Dataset::bytes) instead of float32.
Dataset load_dataset(const std::string& spec, bool keep_bytes = false);

// The downstream task's input shift, applied in place; steps joined by '+' apply in turn:
//   none, invert (x -> 1 - x), rotate90 (a quarter turn clockwise, exact),
//   rotate:DEG (clockwise about the centre, bilinear, 0 from outside), blur:SIGMA (Gaussian, in
//   pixels), contrast:F (each sample's values about its mean times F, kept in [0, 1]),
//   noise:SIGMA (Gaussian noise drawn from (sample, element), kept in [0, 1]; the sample is its
//   position in the data as loaded, after --skip and --limit); noise:SIGMA:ROWS on the first
//   ROWS rows of each image only.
// Image steps work on the last two dimensions of each sample. InputError for any other name.
constexpr const char* kTransformNames = "none|invert|rotate90|rotate:DEG|blur:SIGMA|contrast:F|noise:SIGMA[:ROWS] (joined by +)";
void apply_transform(Dataset& data, const std::string& transform);

// Index selections, all seeded and deterministic.
// K samples of each class, drawn without replacement from `pool` (indices into `labels`);
// InputError naming the class when it has fewer than K.
std::vector<long long> sample_per_class(const std::vector<long long>& labels, const std::vector<long long>& pool,
                                        long long classes, long long per_class, std::uint64_t seed);
// The members of each class 0 .. classes - 1 in `pool` (indices into `labels`, pool order);
// InputError for a label outside the classes, and naming the class that has fewer than
// `per_class` members.
std::vector<std::vector<long long>> members_by_class(const std::vector<long long>& labels, const std::vector<long long>& pool,
                                                     long long classes, long long per_class);
// A seeded permutation of [0, n).
std::vector<long long> shuffled_indices(long long n, std::uint64_t seed);
// Indices read from a text file (whitespace or comma separated); InputError naming the file and
// the first index outside [0, n) or repeated.
std::vector<long long> read_indices(const std::string& path, long long n);
// The first `batches` batches of `batch_size` of a seeded shuffle of `pool` (the official GradFix
// code's --num_batches selection): InputError when the pool is smaller.
std::vector<long long> first_batches(const std::vector<long long>& pool, long long batches, long long batch_size, std::uint64_t seed);

// The indices of [0, n) not in `used`.
std::vector<long long> complement(long long n, const std::vector<long long>& used);

}  // namespace gradfix
