// CLIP's preprocessing of 8-bit images [N, H, W, C] (what gradfix does to uint8 `inputs`):
// exact normalisation and centre crop where no resize is needed (hand-computed), transformers'
// CLIPImageProcessor (Pillow) within 8-bit rounding where it is (fixture made by
// tests/fixtures/clip/make_preprocess_reference.py), and preprocessor_config.json read or refused
// naming the file and the value.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "../../src/model/clip.hpp"
#include "../support/test_files.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

const std::string kFixtures = std::string(GRADFIX_SOURCE_DIR) + "/tests/fixtures/clip";
const std::vector<double> kMean = {0.48145466, 0.4578275, 0.40821073};
const std::vector<double> kStd = {0.26862954, 0.26130258, 0.27577711};

ImagePreprocessing clip_preprocessing(long long size) {
  ImagePreprocessing preprocessing;
  preprocessing.shortest_edge = preprocessing.crop = size;
  preprocessing.mean = kMean;
  preprocessing.std = kStd;
  return preprocessing;
}

// Pixel (n, y, x, c) of a [N, H, W, 3] test pattern.
std::uint8_t pattern(long long n, long long y, long long x, long long c) { return static_cast<std::uint8_t>((n * 71 + y * 13 + x * 7 + c * 29) % 256); }

torch::Tensor pattern_images(long long n, long long height, long long width) {
  torch::Tensor pixels = torch::empty({n, height, width, 3}, torch::kUInt8);
  auto access = pixels.accessor<std::uint8_t, 4>();
  for (long long i = 0; i < n; ++i)
    for (long long y = 0; y < height; ++y)
      for (long long x = 0; x < width; ++x)
        for (long long c = 0; c < 3; ++c) access[i][y][x][c] = pattern(i, y, x, c);
  return pixels;
}

TEST(ClipPreprocessing, ImagesOfTheModelsSizeAreOnlyNormalised) {
  const torch::Tensor out = preprocess_images(pattern_images(2, 16, 16), clip_preprocessing(16));
  ASSERT_EQ(out.sizes(), (std::vector<int64_t>{2, 3, 16, 16}));
  auto values = out.accessor<float, 4>();
  for (long long n = 0; n < 2; ++n)
    for (long long c = 0; c < 3; ++c)
      for (long long y = 0; y < 16; ++y)
        for (long long x = 0; x < 16; ++x)
          ASSERT_NEAR(values[n][c][y][x], (pattern(n, y, x, c) / 255.0 - kMean[c]) / kStd[c], 1e-6) << n << c << y << x;
}

TEST(ClipPreprocessing, AWideImageWhoseShorterSideFitsIsCroppedInTheCentre) {
  // 16 x 24: no resize, columns 4..19 kept ((24 - 16) / 2 = 4).
  const torch::Tensor out = preprocess_images(pattern_images(1, 16, 24), clip_preprocessing(16));
  ASSERT_EQ(out.sizes(), (std::vector<int64_t>{1, 3, 16, 16}));
  auto values = out.accessor<float, 4>();
  for (long long c = 0; c < 3; ++c)
    for (long long y = 0; y < 16; ++y)
      for (long long x = 0; x < 16; ++x) ASSERT_NEAR(values[0][c][y][x], (pattern(0, y, x + 4, c) / 255.0 - kMean[c]) / kStd[c], 1e-6);
}

TEST(ClipPreprocessing, ResizedImagesMatchTransformersWithinEightBitRounding) {
  const auto reader = open_reader(kFixtures + "/preprocess_reference.safetensors");
  for (const std::string name : {"square", "wide"}) {
    const TensorInfo& info = reader->info(name + ".pixels");
    std::vector<std::uint8_t> raw(static_cast<std::size_t>(info.numel()));
    reader->read_raw(name + ".pixels", 0, info.numel(), raw.data());
    const torch::Tensor pixels = torch::from_blob(raw.data(), std::vector<int64_t>(info.shape.begin(), info.shape.end()), torch::kUInt8);
    const torch::Tensor out = preprocess_images(pixels, clip_preprocessing(16));
    const std::vector<float> expected = reader->read_f32(name + ".expected");
    ASSERT_EQ(static_cast<std::size_t>(out.numel()), expected.size()) << name;
    // Pillow resizes in fixed point with 8-bit intermediates, LibTorch in float32 rounded once:
    // they may differ by a level or two of 255 (a level is 1 / (255 * std), about 0.015 here)
    // and mostly agree exactly.
    const float* got = out.data_ptr<float>();
    double worst = 0.0, total = 0.0;
    long long equal = 0;
    for (std::size_t i = 0; i < expected.size(); ++i) {
      const double difference = std::fabs(static_cast<double>(got[i]) - expected[i]);
      worst = std::max(worst, difference);
      total += difference;
      equal += difference < 1e-5;
    }
    std::cout << name << ": largest difference " << worst << ", mean " << total / expected.size() << ", equal "
              << 100.0 * equal / expected.size() << "%\n";
    EXPECT_LE(worst, 2.5 / (255.0 * 0.26));
    EXPECT_LE(total / expected.size(), 0.5 / (255.0 * 0.26));
  }
}

TEST(ClipPreprocessing, ReadsPreprocessorConfigOrFallsBackToClipsOwn) {
  testing::TempDir dir;
  ClipConfig config;
  config.directory = dir.path();
  config.image_size = 16;
  config.channels = 3;
  ImagePreprocessing defaults = read_image_preprocessing(config);
  EXPECT_EQ(defaults.shortest_edge, 16);
  EXPECT_EQ(defaults.crop, 16);
  EXPECT_EQ(defaults.mean, kMean);
  std::ofstream(dir.file("preprocessor_config.json"))
      << R"({"size": {"shortest_edge": 20}, "crop_size": {"height": 16, "width": 16}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1]})";
  const ImagePreprocessing read = read_image_preprocessing(config);
  EXPECT_EQ(read.shortest_edge, 20);
  EXPECT_EQ(read.crop, 16);
  EXPECT_EQ(read.std, (std::vector<double>{0.25, 0.5, 1.0}));
  auto refused = [&](const std::string& text, const std::string& expected) {
    std::ofstream(dir.file("preprocessor_config.json"), std::ios::trunc) << text;
    try {
      read_image_preprocessing(config);
      ADD_FAILURE() << "accepted " << text;
    } catch (const InputError& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find("preprocessor_config.json"), std::string::npos) << message;
      EXPECT_NE(message.find(expected), std::string::npos) << message;
    }
  };
  refused(R"({"crop_size": 224})", "\"crop_size\" is 224 but the model's image_size is 16");
  refused(R"({"size": 8, "crop_size": 16})", "\"size\" 8 is smaller than \"crop_size\" 16");
  refused(R"({"image_std": [0.5, 0, 0.5]})", "each must be positive");
  refused(R"({"image_mean": [0.5, 0.5]})", "must list 3 numbers");
  refused(R"({"size": -3})", "must be a size from 1 to 16384, got -3");
  refused(R"({"size": )", "not valid JSON");
}

}  // namespace
}  // namespace gradfix
