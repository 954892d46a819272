// The LibTorch models: gradients against finite differences, fast per-sample votes against one
// backward pass per sample, checkpoints, and the alpha choice.
#include <gtest/gtest.h>

#include <cmath>

#include "../../src/model/classifier.hpp"
#include "../support/test_files.hpp"
#include "gradfix/core/error.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {
namespace {

using testing::TempDir;

torch::Tensor summed_loss(Classifier& model, const torch::Tensor& inputs, const torch::Tensor& labels) {
  return torch::nn::functional::cross_entropy(model.forward(inputs), labels,
                                              torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
}

TEST(Mlp, GradientsMatchFiniteDifferences) {
  // In float64, so that central differences are accurate to ~1e-9 and a step of 1e-6 almost
  // never crosses a ReLU kink.
  auto model = make_classifier(parse_architecture("mlp", "6,5,4,3"), 3);
  model->to_dtype(torch::kFloat64);
  torch::manual_seed(4);
  const torch::Tensor inputs = torch::randn({4, 6}, torch::kFloat64), labels = torch::tensor({0, 2, 1, 2}, torch::kInt64);
  std::vector<torch::Tensor> parameters;
  for (auto& [name, parameter] : model->parameters()) parameters.push_back(parameter);
  const auto grads = torch::autograd::grad({summed_loss(*model, inputs, labels)}, parameters);
  torch::NoGradGuard no_grad;
  const double eps = 1e-6;
  long long checked = 0;
  for (std::size_t p = 0; p < parameters.size(); ++p) {
    auto flat = parameters[p].view({-1});
    const auto gradient = grads[p].reshape({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const double saved = flat[i].item<double>();
      flat[i] = saved + eps;
      const double up = summed_loss(*model, inputs, labels).item<double>();
      flat[i] = saved - eps;
      const double down = summed_loss(*model, inputs, labels).item<double>();
      flat[i] = saved;
      const double numeric = (up - down) / (2 * eps);
      const double analytic = gradient[i].item<double>();
      ASSERT_NEAR(numeric, analytic, 1e-6 + 1e-5 * std::fabs(analytic)) << model->parameters()[p].first << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3);
}

// The vote sums of the one-pass fast path equal those of one backward pass per sample, except
// where a per-sample gradient is within rounding error of zero (then its sign is arbitrary).
TEST(Mlp, FastVotesEqualThePerSampleLoop) {
  for (std::uint64_t seed : {1, 2, 3}) {
    auto model = make_classifier(parse_architecture("mlp", "20,16,8,5"), seed);
    torch::manual_seed(seed + 100);
    const torch::Tensor inputs = torch::randn({64, 20}), labels = torch::randint(0, 5, {64}, torch::kInt64);
    std::map<std::string, torch::Tensor> fast;
    ASSERT_TRUE(model->fast_votes(inputs, labels, fast));
    const auto loop = loop_votes(*model, inputs, labels);
    long long total = 0, equal = 0;
    for (auto& [name, parameter] : model->parameters()) {
      ASSERT_EQ(fast.at(name).sizes(), parameter.sizes()) << name;
      const torch::Tensor same = fast.at(name).eq(loop.at(name));
      total += same.numel();
      equal += same.sum().item<int64_t>();
    }
    EXPECT_GE(static_cast<double>(equal), 0.9999 * static_cast<double>(total)) << "seed " << seed;
    if (equal == total) continue;
    // Any difference must sit where some sample's gradient is within rounding error of zero.
    std::vector<torch::Tensor> parameters;
    std::map<std::string, torch::Tensor> smallest;
    for (auto& [name, parameter] : model->parameters()) {
      parameters.push_back(parameter);
      smallest[name] = torch::full(parameter.sizes(), INFINITY);
    }
    for (int64_t n = 0; n < 64; ++n) {
      const auto grads = torch::autograd::grad({summed_loss(*model, inputs.slice(0, n, n + 1), labels.slice(0, n, n + 1))}, parameters);
      std::size_t i = 0;
      for (auto& [name, parameter] : model->parameters()) {
        smallest[name] = torch::minimum(smallest[name], grads[i].abs() / (grads[i].abs().max() + 1e-30));
        ++i;
      }
    }
    for (auto& [name, parameter] : model->parameters()) {
      const torch::Tensor differs = fast.at(name).ne(loop.at(name));
      if (differs.any().item<bool>()) {
        EXPECT_TRUE(smallest[name].masked_select(differs).le(1e-6).all().item<bool>()) << name << ": a vote differs where no gradient is near zero";
      }
    }
  }
}

TEST(Mlp, CheckpointsRoundTripAndDescribeThemselves) {
  TempDir dir;
  auto model = make_classifier(parse_architecture("mlp", "7,3,2"), 9);
  save_classifier(*model, dir.file("w.safetensors"));
  const auto reader = open_reader(dir.file("w.safetensors"));
  EXPECT_EQ(reader->metadata().at("gradfix.arch"), "mlp");
  EXPECT_EQ(reader->metadata().at("gradfix.mlp.dims"), "7,3,2");
  EXPECT_EQ(reader->info("layers.0.weight").shape, (std::vector<long long>{3, 7}));
  EXPECT_EQ(reader->info("layers.1.bias").shape, (std::vector<long long>{2}));
  auto loaded = load_classifier(dir.file("w.safetensors"));
  EXPECT_EQ(parameter_values(*loaded), parameter_values(*model));

  // A file without the architecture, or with a parameter of the wrong shape, is refused.
  {
    auto writer = open_writer(dir.file("bare.safetensors"), {{"layers.0.weight", DType::kF32, {3, 7}}}, {});
    std::vector<float> zeros(21, 0.0f);
    writer->write_f32("layers.0.weight", 0, zeros.data(), 21);
    writer->commit();
  }
  EXPECT_THROW(load_classifier(dir.file("bare.safetensors")), InputError);
  {
    auto writer = open_writer(dir.file("wrong.safetensors"), {{"layers.0.weight", DType::kF32, {7, 3}}, {"layers.0.bias", DType::kF32, {3}}},
                              {{"gradfix.arch", "mlp"}, {"gradfix.mlp.dims", "7,3"}});
    std::vector<float> zeros(21, 0.0f);
    writer->write_f32("layers.0.weight", 0, zeros.data(), 21);
    writer->write_f32("layers.0.bias", 0, zeros.data(), 3);
    writer->commit();
  }
  try {
    load_classifier(dir.file("wrong.safetensors"));
    FAIL();
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("[7, 3]"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("[3, 7]"), std::string::npos) << error.what();
  }
  EXPECT_THROW(parse_architecture("resnet", "1,2"), InputError);
}

TEST(AlphaSearch, PicksTheBestSupportAccuracyAndTheSmallestOnTies) {
  EXPECT_EQ(best_on_support({0.1, 0.5, 0.3}), 1u);
  EXPECT_EQ(best_on_support({0.2, 0.7, 0.7, 0.1}), 1u);
  EXPECT_EQ(best_on_support({0.9}), 0u);
}

}  // namespace
}  // namespace gradfix
