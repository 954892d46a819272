// The LibTorch models: gradients against finite differences, fast per-sample votes against one
// backward pass per sample, checkpoints, and the alpha choice.
#include <gtest/gtest.h>

#include <cmath>

#include <torch/script.h>

#include "../../src/model/classifier.hpp"
#include "../../src/model/shots.hpp"
#include "../support/test_files.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {
namespace {

using testing::TempDir;

torch::Tensor summed_loss(Classifier& model, const torch::Tensor& inputs, const torch::Tensor& labels) {
  return torch::nn::functional::cross_entropy(model.forward(inputs), labels,
                                              torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
}

class BuiltIn : public ::testing::TestWithParam<std::pair<std::string, std::string>> {};

// Each architecture with the sample shape its dims describe.
std::vector<int64_t> sample_shape(const Architecture& architecture) {
  if (architecture.name == "cnn" || architecture.name == "vit") return {architecture.dims[0], architecture.dims[1], architecture.dims[2]};
  return {architecture.dims[0]};
}

TEST_P(BuiltIn, GradientsMatchFiniteDifferences) {
  // In float64, so that central differences are accurate to ~1e-9 and a step of 1e-6 almost
  // never crosses a ReLU (or max-pooling) kink.
  const Architecture architecture = parse_architecture(GetParam().first, GetParam().second);
  auto model = make_classifier(architecture, 3);
  model->to_dtype(torch::kFloat64);
  torch::manual_seed(4);
  std::vector<int64_t> shape = {4};
  for (int64_t dim : sample_shape(architecture)) shape.push_back(dim);
  const torch::Tensor inputs = torch::randn(shape, torch::kFloat64), labels = torch::tensor({0, 2, 1, 2}, torch::kInt64);
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
  long long expected = 0;
  for (auto& [name, parameter] : model->parameters()) expected += parameter.numel();
  EXPECT_EQ(checked, expected);
}

// The vote sums of the one-pass fast path equal those of one backward pass per sample, except
// where a per-sample gradient is within rounding error of zero (then its sign is arbitrary). In
// float64 the CNN takes its batched-products path (its CPU kernels are float32 only), so both of
// its formulations are checked here.
TEST_P(BuiltIn, FastVotesEqualThePerSampleLoop) {
  const Architecture architecture = parse_architecture(GetParam().first, GetParam().second);
  for (std::uint64_t seed : {1, 2, 3, 4}) {
    const torch::Dtype dtype = seed <= 3 ? torch::kFloat32 : torch::kFloat64;
    auto model = make_classifier(architecture, seed);
    model->to_dtype(dtype);
    torch::manual_seed(seed + 100);
    // 70 samples: the CNN's CPU path works in chunks of 32, the last one partial.
    constexpr int64_t kSamples = 70;
    std::vector<int64_t> shape = {kSamples};
    for (int64_t dim : sample_shape(architecture)) shape.push_back(dim);
    const torch::Tensor inputs = torch::randn(shape, dtype), labels = torch::randint(0, model->classes(), {kSamples}, torch::kInt64);
    std::map<std::string, torch::Tensor> fast;
    ASSERT_TRUE(model->fast_votes(inputs, labels, fast));
    const auto loop = loop_votes(*model, inputs, labels);
    long long total = 0, equal = 0;
    // The key third of a vit's qkv.bias has a gradient of zero in theory: the fast path casts no
    // vote there (its per-sample sums cancel to rounding), the loop votes with autograd's noise.
    // It is checked for zeros and left out of the comparison.
    for (auto& [name, parameter] : model->parameters()) {
      if (name.size() > 13 && name.compare(name.size() - 13, 13, "attn.qkv.bias") == 0) {
        const int64_t third = parameter.size(0) / 3;
        EXPECT_TRUE(fast.at(name).slice(0, third, 2 * third).eq(0).all().item<bool>()) << name << ": a key bias cast a vote";
        fast.at(name).slice(0, third, 2 * third).copy_(loop.at(name).slice(0, third, 2 * third));
      }
    }
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
    for (int64_t n = 0; n < kSamples; ++n) {
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

// Small sizes: finite differences visit every parameter.
INSTANTIATE_TEST_SUITE_P(Architectures, BuiltIn,
                         ::testing::Values(std::make_pair(std::string("mlp"), std::string("6,5,4,3")),
                                           std::make_pair(std::string("cnn"), std::string("2,6,6,3,4,3")),
                                           std::make_pair(std::string("cnn"), std::string("1,7,5,3,2,3")),  // one channel, odd sizes
                                           std::make_pair(std::string("vit"), std::string("1,4,4,2,4,2,2,6,3"))));

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

// A TorchScript archive made here (as torch.jit.script would export one): an MLP 20-8-5 whose
// parameters are fc1.weight, fc1.bias, fc2.weight, fc2.bias.
std::string make_archive(const TempDir& dir, Classifier& twin) {
  torch::jit::Module net("Net");
  const auto values = twin.parameters();
  for (int layer = 0; layer < 2; ++layer) {
    torch::jit::Module fc("Linear" + std::to_string(layer));
    fc.register_parameter("weight", values[static_cast<std::size_t>(2 * layer)].second.detach().clone(), false);
    fc.register_parameter("bias", values[static_cast<std::size_t>(2 * layer + 1)].second.detach().clone(), false);
    fc.define("def forward(self, x):\n    return torch.matmul(x, self.weight.t()) + self.bias\n");
    net.register_module("fc" + std::to_string(layer + 1), fc);
  }
  net.define("def forward(self, x):\n    return self.fc2.forward(torch.relu(self.fc1.forward(x.flatten(1))))\n");
  const std::string path = dir.file("net.pt");
  net.save(path);
  return path;
}

// --selection-features torchscript:ARCHIVE: the module's rows drive the selection exactly as
// the same features given directly do; a module that returns one row too few is refused.
TEST(TorchScript, FeatureExtractorDrivesShotSelection) {
  TempDir dir;
  torch::jit::Module features("Features");
  features.define("def forward(self, x):\n    return x.flatten(1)[:, 0:3] * 2.0\n");
  features.save(dir.file("features.pt"));
  torch::jit::Module short_rows("Short");
  short_rows.define("def forward(self, x):\n    return x.flatten(1)[1:, 0:3]\n");
  short_rows.save(dir.file("short.pt"));
  torch::manual_seed(4);
  const torch::Tensor inputs = torch::randn({12, 5});
  ShotPool pool;
  pool.samples = 12;
  for (long long i = 0; i < 12; ++i) pool.labels.push_back(i % 2);
  pool.classes = 2;
  pool.name = "the test data";
  pool.inputs = [&](const std::vector<long long>& indices) {
    return inputs.index_select(0, torch::tensor(std::vector<int64_t>(indices.begin(), indices.end()), torch::kInt64));
  };
  ShotPool direct = pool;
  direct.model_features = [&](const std::vector<long long>& indices) {
    FeatureMatrix out;
    out.rows = static_cast<long long>(indices.size());
    out.dim = 3;
    for (long long i : indices)
      for (long long d = 0; d < 3; ++d) out.values.push_back(inputs[i][d].item<float>());
    return out;
  };
  for (const char* strategy : {"coreset", "kmedoids", "herding"}) {
    ShotSelection scripted, own;
    scripted.strategy = own.strategy = strategy;
    scripted.features_file = "torchscript:" + dir.file("features.pt");
    const auto chosen = choose_shots(pool, scripted, 3, 0, 1, false);
    EXPECT_EQ(chosen.size(), 6u) << strategy;
    EXPECT_EQ(chosen, choose_shots(direct, own, 3, 0, 1, false)) << strategy;
  }
  ShotSelection broken;
  broken.strategy = "herding";
  broken.features_file = "torchscript:" + dir.file("short.pt");
  try {
    choose_shots(pool, broken, 3, 0, 1, false);
    FAIL() << "a module returning too few rows was accepted";
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("short.pt: the feature extractor returned [5, 3] for 6 samples"), std::string::npos) << error.what();
  }
}

TEST(TorchScript, ForwardAndVotesMatchTheBuiltInTwin) {
  TempDir dir;
  auto twin = make_classifier(parse_architecture("mlp", "20,8,5"), 7);
  const std::string archive = make_archive(dir, *twin);
  auto scripted = load_model("torchscript:" + archive, "");
  std::vector<std::string> names;
  for (auto& [name, parameter] : scripted->parameters()) names.push_back(name);
  EXPECT_EQ(names, (std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}));
  torch::manual_seed(8);
  const torch::Tensor inputs = torch::randn({32, 20}), labels = torch::randint(0, 5, {32}, torch::kInt64);
  EXPECT_TRUE(torch::allclose(scripted->forward(inputs), twin->forward(inputs), 1e-5, 1e-6));
  EXPECT_EQ(scripted->classes(), 5);
  std::map<std::string, torch::Tensor> fast;
  ASSERT_TRUE(twin->fast_votes(inputs, labels, fast));
  EXPECT_FALSE(scripted->fast_votes(inputs, labels, fast));
  const auto loop = loop_votes(*scripted, inputs, labels);
  EXPECT_TRUE(torch::equal(loop.at("fc1.weight"), fast.at("layers.0.weight")));
  EXPECT_TRUE(torch::equal(loop.at("fc2.bias"), fast.at("layers.1.bias")));
}

TEST(TorchScript, WeightsReplaceParametersByNameAndMismatchesAreListed) {
  TempDir dir;
  auto twin = make_classifier(parse_architecture("mlp", "20,8,5"), 7);
  const std::string archive = make_archive(dir, *twin);
  {
    std::vector<TensorInfo> layout = {{"fc1.weight", DType::kF32, {8, 20}}, {"fc1.bias", DType::kF32, {8}},
                                      {"fc2.weight", DType::kF32, {5, 8}}, {"fc2.bias", DType::kF32, {5}}};
    auto writer = open_writer(dir.file("w.safetensors"), layout, {});
    for (const auto& tensor : layout) {
      std::vector<float> values(static_cast<std::size_t>(tensor.numel()), 0.5f);
      writer->write_f32(tensor.name, 0, values.data(), tensor.numel());
    }
    writer->commit();
  }
  auto loaded = load_model("torchscript:" + archive, dir.file("w.safetensors"));
  for (auto& [name, parameter] : loaded->parameters()) EXPECT_TRUE(parameter.eq(0.5).all().item<bool>()) << name;
  // Weights named like the built-in MLP do not fit the archive's names: every missing one is listed.
  save_classifier(*twin, dir.file("mlp.safetensors"));
  try {
    load_model("torchscript:" + archive, dir.file("mlp.safetensors"));
    FAIL();
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("lacks 4 parameter(s)"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("'fc1.weight'"), std::string::npos) << error.what();
  }
  testing::write_bytes(dir.file("junk.pt"), "not a zip archive");
  EXPECT_THROW(load_model("torchscript:" + dir.file("junk.pt"), ""), InputError);
  EXPECT_THROW(load_model("onnx:" + archive, ""), InputError);
  // A sample shape the archive cannot take is an input error naming the shape.
  Dataset wrong;
  wrong.sample_shape = {3};
  wrong.inputs = {1, 2, 3};
  wrong.labels = {0};
  wrong.classes = 1;
  auto scripted = load_model("torchscript:" + archive, "");
  EXPECT_THROW(check_compatible(*scripted, wrong, "wrong.h5"), InputError);
}

TEST(AlphaSearch, PicksTheBestSupportAccuracyAndTheSmallestOnTies) {
  EXPECT_EQ(best_on_support({0.1, 0.5, 0.3}), 1u);
  EXPECT_EQ(best_on_support({0.2, 0.7, 0.7, 0.1}), 1u);
  EXPECT_EQ(best_on_support({0.9}), 0u);
}

}  // namespace
}  // namespace gradfix
