#include "gradfix/io/dataset.hpp"

#include <gtest/gtest.h>
#include <hdf5.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>

#include "../support/test_files.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

using testing::TempDir;

std::string be32(std::uint32_t value) {
  return std::string{static_cast<char>(value >> 24), static_cast<char>(value >> 16), static_cast<char>(value >> 8), static_cast<char>(value)};
}

// Three 2x2 images with labels 2, 0, 1, as IDX files, the images gzipped.
void write_idx(const TempDir& dir, const std::string& prefix, std::uint32_t label_count = 3) {
  std::string images = be32(0x803) + be32(3) + be32(2) + be32(2);
  for (int i = 0; i < 12; ++i) images += static_cast<char>(i * 20);
  gzFile file = gzopen(dir.file(prefix + "-images-idx3-ubyte.gz").c_str(), "wb");
  gzwrite(file, images.data(), static_cast<unsigned>(images.size()));
  gzclose(file);
  std::string labels = be32(0x801) + be32(label_count) + std::string{2, 0, 1};
  labels.resize(8 + label_count, 1);
  testing::write_bytes(dir.file(prefix + "-labels-idx1-ubyte"), labels);
}

TEST(Dataset, ReadsIdxGzippedOrPlain) {
  TempDir dir;
  write_idx(dir, "train");
  const Dataset data = load_dataset(dir.path() + ":train");
  ASSERT_EQ(data.size(), 3);
  EXPECT_EQ(data.sample_shape, (std::vector<long long>{2, 2}));
  EXPECT_EQ(data.classes, 3);
  EXPECT_EQ(data.labels, (std::vector<long long>{2, 0, 1}));
  EXPECT_FLOAT_EQ(data.inputs[5], 100.0f / 255.0f);
  const Dataset same = load_dataset(dir.file("train-images-idx3-ubyte.gz"));
  EXPECT_EQ(same.inputs, data.inputs);
}

TEST(Dataset, RefusesBadIdx) {
  TempDir dir;
  write_idx(dir, "bad", 4);
  try {
    load_dataset(dir.path() + ":bad");
    FAIL();
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("3 images"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("4 labels"), std::string::npos) << error.what();
  }
  testing::write_bytes(dir.file("x-images-idx3-ubyte"), be32(0x801) + be32(1));
  testing::write_bytes(dir.file("x-labels-idx1-ubyte"), be32(0x801) + be32(1) + "a");
  EXPECT_THROW(load_dataset(dir.file("x-images-idx3-ubyte")), InputError);
  EXPECT_THROW(load_dataset(dir.path() + ":missing"), InputError);
  EXPECT_THROW(load_dataset(dir.file("data.csv")), InputError);
}

TEST(Dataset, ReadsHdf5AndRefusesMismatchedCounts) {
  TempDir dir;
  for (const auto& [name, label_count] : std::vector<std::pair<std::string, hsize_t>>{{"good.h5", 4}, {"bad.h5", 3}}) {
    const hid_t file = H5Fcreate(dir.file(name).c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t input_dims[2] = {4, 3};
    const float inputs[12] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    hid_t space = H5Screate_simple(2, input_dims, nullptr);
    hid_t set = H5Dcreate2(file, "inputs", H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(set, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, inputs);
    H5Dclose(set);
    H5Sclose(space);
    const long long labels[4] = {1, 0, 1, 4};
    space = H5Screate_simple(1, &label_count, nullptr);
    set = H5Dcreate2(file, "labels", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(set, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, H5P_DEFAULT, labels);
    H5Dclose(set);
    H5Sclose(space);
    H5Fclose(file);
  }
  const Dataset data = load_dataset(dir.file("good.h5"));
  EXPECT_EQ(data.size(), 4);
  EXPECT_EQ(data.sample_shape, (std::vector<long long>{3}));
  EXPECT_EQ(data.classes, 5);
  EXPECT_EQ(data.inputs[7], 7.0f);
  EXPECT_THROW(load_dataset(dir.file("bad.h5")), InputError);
}

// Sizes and labels are bounded before anything is allocated (the defects issue): a label of
// INT64_MAX, IDX dimensions whose product overflows, 2 TB of inputs declared and never written.
TEST(Dataset, RefusesLabelsAndSizesPastTheBounds) {
  TempDir dir;
  {
    const hid_t file = H5Fcreate(dir.file("label.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t input_dims[2] = {2, 3};
    const float inputs[6] = {0, 1, 2, 3, 4, 5};
    hid_t space = H5Screate_simple(2, input_dims, nullptr);
    hid_t set = H5Dcreate2(file, "inputs", H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(set, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, inputs);
    H5Dclose(set);
    H5Sclose(space);
    const hsize_t count = 2;
    const long long labels[2] = {1, 9223372036854775807LL};
    space = H5Screate_simple(1, &count, nullptr);
    set = H5Dcreate2(file, "labels", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(set, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, H5P_DEFAULT, labels);
    H5Dclose(set);
    H5Sclose(space);
    H5Fclose(file);
  }
  try {
    load_dataset(dir.file("label.h5"));
    ADD_FAILURE() << "a label of INT64_MAX was accepted";
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("label 9223372036854775807 is not below 16777216"), std::string::npos) << error.what();
  }
  {
    const hid_t file = H5Fcreate(dir.file("huge.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t dims[2] = {hsize_t{1} << 29, 1024}, chunk[2] = {64, 1024};
    const hid_t creation = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(creation, 2, chunk);
    const hid_t space = H5Screate_simple(2, dims, nullptr);
    H5Dclose(H5Dcreate2(file, "inputs", H5T_IEEE_F32LE, space, H5P_DEFAULT, creation, H5P_DEFAULT));
    H5Sclose(space);
    H5Pclose(creation);
    H5Fclose(file);
  }
  try {
    load_dataset(dir.file("huge.h5"));
    ADD_FAILURE() << "2 TB of unwritten inputs were accepted";
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("declares 2199023255552 bytes but its storage was never written"), std::string::npos) << error.what();
  }
  {
    // 0xFFFFFFFF cubed overflows 64 bits: the header must be refused before anything is sized.
    const unsigned char images[16] = {0, 0, 8, 3, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
    const unsigned char labels[8] = {0, 0, 8, 1, 0xFF, 0xFF, 0xFF, 0xFF};
    std::ofstream(dir.file("big-images-idx3-ubyte"), std::ios::binary).write(reinterpret_cast<const char*>(images), sizeof images);
    std::ofstream(dir.file("big-labels-idx1-ubyte"), std::ios::binary).write(reinterpret_cast<const char*>(labels), sizeof labels);
  }
  try {
    load_dataset(dir.file("big-images-idx3-ubyte"));
    ADD_FAILURE() << "an IDX header that overflows was accepted";
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("the IDX header declares more than 8589934592 bytes"), std::string::npos) << error.what();
  }
}

TEST(Dataset, ShotsPerClassAreBalancedSeededAndChecked) {
  std::vector<long long> labels;
  for (int i = 0; i < 100; ++i) labels.push_back(i % 4);
  std::vector<long long> pool(100);
  for (int i = 0; i < 100; ++i) pool[static_cast<std::size_t>(i)] = i;
  const auto shots = sample_per_class(labels, pool, 4, 5, 42);
  ASSERT_EQ(shots.size(), 20u);
  for (long long c = 0; c < 4; ++c)
    EXPECT_EQ(std::count_if(shots.begin(), shots.end(), [&](long long i) { return labels[static_cast<std::size_t>(i)] == c; }), 5);
  EXPECT_EQ(std::set<long long>(shots.begin(), shots.end()).size(), 20u);
  EXPECT_EQ(sample_per_class(labels, pool, 4, 5, 42), shots);
  EXPECT_NE(sample_per_class(labels, pool, 4, 5, 43), shots);
  const auto rest = complement(100, shots);
  EXPECT_EQ(rest.size(), 80u);
  for (long long i : rest) EXPECT_EQ(std::count(shots.begin(), shots.end(), i), 0);
  try {
    sample_per_class(labels, pool, 4, 26, 1);
    FAIL();
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("class 0 has 25"), std::string::npos) << error.what();
  }
  EXPECT_THROW(sample_per_class(labels, pool, 3, 1, 1), InputError);  // label 3 outside 3 classes
}

TEST(Dataset, IndicesFilesAndFirstBatches) {
  TempDir dir;
  testing::write_bytes(dir.file("ok.txt"), "3, 1\n7 0,2\n");
  EXPECT_EQ(read_indices(dir.file("ok.txt"), 10), (std::vector<long long>{3, 1, 7, 0, 2}));
  testing::write_bytes(dir.file("big.txt"), "1 10");
  EXPECT_THROW(read_indices(dir.file("big.txt"), 10), InputError);
  testing::write_bytes(dir.file("twice.txt"), "1 1");
  EXPECT_THROW(read_indices(dir.file("twice.txt"), 10), InputError);
  EXPECT_THROW(read_indices(dir.file("missing.txt"), 10), InputError);
  const std::vector<long long> pool = {10, 11, 12, 13, 14, 15, 16};
  const auto chosen = first_batches(pool, 2, 3, 5);
  ASSERT_EQ(chosen.size(), 6u);
  EXPECT_EQ(std::set<long long>(chosen.begin(), chosen.end()).size(), 6u);
  for (long long index : chosen) EXPECT_TRUE(index >= 10 && index <= 16);
  EXPECT_EQ(first_batches(pool, 2, 3, 5), chosen);
  EXPECT_THROW(first_batches(pool, 3, 3, 5), InputError);
}

TEST(Dataset, TransformsHandChecked) {
  Dataset data;
  data.sample_shape = {2, 2};
  data.inputs = {0.0f, 0.25f, 0.5f, 1.0f};  // [[a b] [c d]]
  data.labels = {0};
  Dataset rotated = data;
  apply_transform(rotated, "rotate90");  // clockwise: [[c a] [d b]]
  EXPECT_EQ(rotated.inputs, (std::vector<float>{0.5f, 0.0f, 1.0f, 0.25f}));
  apply_transform(data, "invert");
  EXPECT_EQ(data.inputs, (std::vector<float>{1.0f, 0.75f, 0.5f, 0.0f}));
  EXPECT_THROW(apply_transform(data, "blur"), InputError);
}

Dataset image(long long rows, long long cols, std::vector<float> values) {
  Dataset data;
  data.sample_shape = {rows, cols};
  data.inputs = std::move(values);
  data.labels = {0};
  return data;
}

TEST(Dataset, RotateByDegreesHandChecked) {
  // A quarter turn by bilinear sampling lands on pixel centres: the exact rotate90.
  Dataset turned = image(3, 3, {1, 2, 3, 4, 5, 6, 7, 8, 9}), exact = turned;
  apply_transform(turned, "rotate:90");
  apply_transform(exact, "rotate90");
  for (std::size_t i = 0; i < 9; ++i) EXPECT_NEAR(turned.inputs[i], exact.inputs[i], 1e-5) << i;
  Dataset half = image(2, 2, {1, 2, 3, 4});
  apply_transform(half, "rotate:180");
  for (std::size_t i = 0; i < 4; ++i) EXPECT_NEAR(half.inputs[i], 4.0f - static_cast<float>(i), 1e-5) << i;
  // 45 degrees on 3x3: the centre stays; output (0, 0) samples (1, 1 - sqrt 2), between the
  // outside (0) and input (1, 0), so (2 - sqrt 2) * in[1][0].
  Dataset tilted = image(3, 3, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  apply_transform(tilted, "rotate:45");
  EXPECT_NEAR(tilted.inputs[4], 5.0f, 1e-5);
  EXPECT_NEAR(tilted.inputs[0], (2.0 - std::sqrt(2.0)) * 4.0, 1e-5);
}

TEST(Dataset, BlurContrastNoiseHandChecked) {
  // A unit impulse in the middle of 9x9 blurred with sigma 1: the outer product of the kernel
  // exp(-k^2 / 2) / S over k = -3..3, which sums to 1 (nothing reaches the border).
  std::vector<float> impulse(81, 0.0f);
  impulse[40] = 1.0f;
  Dataset blurred = image(9, 9, impulse);
  apply_transform(blurred, "blur:1");
  const double total = 1.0 + 2.0 * (std::exp(-0.5) + std::exp(-2.0) + std::exp(-4.5));
  EXPECT_NEAR(blurred.inputs[40], 1.0 / (total * total), 1e-7);
  EXPECT_NEAR(blurred.inputs[41], std::exp(-0.5) / (total * total), 1e-7);
  EXPECT_NEAR(blurred.inputs[40 + 9 * 2 + 1], std::exp(-2.0) * std::exp(-0.5) / (total * total), 1e-7);
  EXPECT_FLOAT_EQ(blurred.inputs[0], 0.0f);
  double sum = 0.0;
  for (float value : blurred.inputs) sum += value;
  EXPECT_NEAR(sum, 1.0, 1e-6);
  // Contrast about the mean 0.4375, then clamped to [0, 1].
  Dataset softer = image(2, 2, {0.0f, 0.25f, 0.5f, 1.0f}), harder = softer;
  apply_transform(softer, "contrast:0.5");
  EXPECT_EQ(softer.inputs, (std::vector<float>{0.21875f, 0.34375f, 0.46875f, 0.71875f}));
  apply_transform(harder, "contrast:3");
  EXPECT_EQ(harder.inputs, (std::vector<float>{0.0f, 0.0f, 0.625f, 1.0f}));
  // Noise: the same draws for the same (sample, element), mean 0 and the given spread.
  Dataset flat = image(100, 100, std::vector<float>(10000, 0.5f)), again = flat;
  apply_transform(flat, "noise:0.01");
  apply_transform(again, "noise:0.01");
  EXPECT_EQ(flat.inputs, again.inputs);
  double mean = 0.0, square = 0.0;
  for (float value : flat.inputs) {
    mean += value - 0.5;
    square += (value - 0.5) * (value - 0.5);
  }
  mean /= 10000.0;
  EXPECT_NEAR(mean, 0.0, 0.0004);
  EXPECT_NEAR(std::sqrt(square / 10000.0 - mean * mean), 0.01, 0.0005);
  // noise:SIGMA:ROWS: the first ROWS rows of each image only, with the same draws there.
  Dataset top = image(100, 100, std::vector<float>(10000, 0.5f));
  apply_transform(top, "noise:0.01:30");
  for (std::size_t i = 0; i < 10000; ++i) EXPECT_EQ(top.inputs[i], i < 3000 ? flat.inputs[i] : 0.5f) << i;
  // Steps joined by '+' apply in turn.
  Dataset chained = image(2, 2, {0.0f, 0.25f, 0.5f, 1.0f}), stepwise = chained;
  apply_transform(chained, "invert+rotate90");
  apply_transform(stepwise, "invert");
  apply_transform(stepwise, "rotate90");
  EXPECT_EQ(chained.inputs, stepwise.inputs);
}

TEST(Dataset, TransformsRefuseBadSpecifications) {
  Dataset data = image(2, 2, {0, 0, 0, 0});
  for (const char* bad : {"rotate", "rotate:abc", "rotate:400", "blur:0", "blur:", "contrast:-1", "noise:x", "invert:1", "rotate90:2",
                          "invert+", "sharpen:2", "noise:0.1:3", "noise:0.1:1.5", "noise:0.1:0"})
    EXPECT_THROW(apply_transform(data, bad), InputError) << bad;
  Dataset flat;
  flat.sample_shape = {4};
  flat.inputs = {0, 0, 0, 0};
  flat.labels = {0};
  EXPECT_THROW(apply_transform(flat, "blur:1"), InputError);
}

}  // namespace
}  // namespace gradfix
