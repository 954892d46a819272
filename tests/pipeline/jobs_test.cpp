// The jobs end to end on real files: values against direct computation with the pure
// functions, in every output format.
#include "gradfix/jobs/jobs.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "../support/test_files.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {
namespace {

using testing::TempDir;

struct Model {
  std::vector<TensorInfo> layout;
  std::vector<std::vector<float>> values;
};

Model make_model(std::uint32_t seed, DType dtype = DType::kF32) {
  Model model;
  model.layout = {{"layers.0.weight", dtype, {6, 5}}, {"layers.0.bias", dtype, {6}}, {"layers.1.weight", dtype, {3, 6}},
                  {"layers.1.bias", dtype, {3}}};
  for (std::size_t i = 0; i < model.layout.size(); ++i)
    model.values.push_back(testing::random_values(static_cast<std::size_t>(model.layout[i].numel()), seed + static_cast<std::uint32_t>(i)));
  return model;
}

void save(const Model& model, const std::string& path) {
  auto writer = open_writer(path, model.layout, {{"gradfix.arch", "mlp"}});
  for (std::size_t i = 0; i < model.layout.size(); ++i)
    writer->write_f32(model.layout[i].name, 0, model.values[i].data(), model.layout[i].numel());
  writer->commit();
}

std::vector<float> read(const std::string& path, const std::string& name) { return open_reader(path)->read_f32(name); }

class JobFormats : public ::testing::TestWithParam<std::string> {};

TEST_P(JobFormats, TaskVectorThenApplyRecoversTheFinetunedModel) {
  TempDir dir;
  const std::string extension = GetParam();
  const Model base = make_model(1), finetuned = make_model(100);
  save(base, dir.file("base" + extension));
  save(finetuned, dir.file("ft" + extension));
  std::ostringstream log;
  TaskVectorJob tv{dir.file("base" + extension), dir.file("ft" + extension), dir.file("tau" + extension), {}};
  run_taskvector(tv, log);
  for (std::size_t i = 0; i < base.layout.size(); ++i) {
    const auto tau = read(dir.file("tau" + extension), base.layout[i].name);
    for (std::size_t j = 0; j < tau.size(); ++j) ASSERT_EQ(tau[j], finetuned.values[i][j] - base.values[i][j]);
  }
  ApplyJob apply{dir.file("base" + extension), dir.file("tau" + extension), 0.5, dir.file("out" + extension), {}};
  run_apply(apply, log);
  const auto reader = open_reader(dir.file("out" + extension));
  EXPECT_EQ(reader->metadata().at("gradfix.arch"), "mlp");
  for (std::size_t i = 0; i < base.layout.size(); ++i) {
    const auto out = reader->read_f32(base.layout[i].name);
    for (std::size_t j = 0; j < out.size(); ++j) {
      const float tau = finetuned.values[i][j] - base.values[i][j];
      ASSERT_EQ(out[j], base.values[i][j] + 0.5f * tau);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllFormats, JobFormats, ::testing::Values(".safetensors", ".h5", "_sharded"));

// A BF16 difference would lose about 0.4% of each value: task vectors are F32 whatever the
// inputs, exact differences of the BF16 values; --out-dtype still chooses.
TEST(Jobs, TaskVectorIsF32UnlessOutDtypeSays) {
  TempDir dir;
  Model base = make_model(1, DType::kBF16), finetuned = make_model(2, DType::kBF16);
  save(base, dir.file("b.safetensors"));
  save(finetuned, dir.file("f.safetensors"));
  std::ostringstream log;
  run_taskvector({dir.file("b.safetensors"), dir.file("f.safetensors"), dir.file("t.safetensors"), {}}, log);
  const auto reader = open_reader(dir.file("t.safetensors"));
  EXPECT_EQ(reader->info("layers.0.weight").dtype, DType::kF32);
  const auto b = read(dir.file("b.safetensors"), "layers.0.weight");
  const auto f = read(dir.file("f.safetensors"), "layers.0.weight");
  const auto t = reader->read_f32("layers.0.weight");
  for (std::size_t j = 0; j < t.size(); ++j) ASSERT_EQ(t[j], f[j] - b[j]);
  OutputOptions bf16;
  bf16.out_dtype = DType::kBF16;
  run_taskvector({dir.file("b.safetensors"), dir.file("f.safetensors"), dir.file("t16.safetensors"), bf16}, log);
  const auto rounded = read(dir.file("t16.safetensors"), "layers.0.weight");
  for (std::size_t j = 0; j < t.size(); ++j) ASSERT_EQ(rounded[j], bf16_to_f32(f32_to_bf16(f[j] - b[j])));
}

TEST(Jobs, IncludeAndExcludeSelectTensors) {
  TempDir dir;
  save(make_model(1), dir.file("b.safetensors"));
  save(make_model(2), dir.file("f.safetensors"));
  OutputOptions output;
  output.include = {"weight"};
  output.exclude = {"^layers\\.1"};
  std::ostringstream log;
  run_taskvector({dir.file("b.safetensors"), dir.file("f.safetensors"), dir.file("t.safetensors"), output}, log);
  const auto reader = open_reader(dir.file("t.safetensors"));
  ASSERT_EQ(reader->tensors().size(), 1u);
  EXPECT_EQ(reader->tensors()[0].name, "layers.0.weight");
  // apply with a partial task vector changes that tensor and copies the rest.
  run_apply({dir.file("b.safetensors"), dir.file("t.safetensors"), 1.0, dir.file("o.safetensors"), {}}, log);
  EXPECT_EQ(read(dir.file("o.safetensors"), "layers.1.bias"), read(dir.file("b.safetensors"), "layers.1.bias"));
  const auto b = read(dir.file("b.safetensors"), "layers.0.weight");
  const auto t = read(dir.file("t.safetensors"), "layers.0.weight");
  const auto o = read(dir.file("o.safetensors"), "layers.0.weight");
  for (std::size_t j = 0; j < o.size(); ++j) ASSERT_EQ(o[j], b[j] + t[j]);
}

TEST(Jobs, MaskMatchesThePureFunctionForEveryMode) {
  TempDir dir;
  const Model tau = make_model(1), signs = make_model(50);
  save(tau, dir.file("tau.safetensors"));
  save(signs, dir.file("signs.h5"));
  for (const char* name : {"normal", "force", "random", "soft1", "soft2", "soft3", "soft1_rowwise", "soft2_rowwise",
                           "soft3_rowwise", "oracle"}) {
    MaskJob job;
    job.task_vector = dir.file("tau.safetensors");
    job.signs = dir.file("signs.h5");
    job.mode = parse_mask_mode(name);
    job.mask.seed = 9;
    job.out = dir.file(std::string(name) + ".safetensors");
    std::ostringstream log;
    const JobSummary summary = run_mask(job, log);
    EXPECT_EQ(summary.tensors_changed, 4);
    for (std::size_t i = 0; i < tau.layout.size(); ++i) {
      const auto expected = mask_tensor(job.mode, job.mask, tau.values[i], signs.values[i], tau.layout[i].shape,
                                        tensor_key_of(tau.layout[i].name));
      EXPECT_EQ(read(job.out, tau.layout[i].name), expected) << name << " " << tau.layout[i].name;
    }
  }
}

TEST(Jobs, MergeOrdersMatchManualMaskingAndMerging) {
  TempDir dir;
  std::vector<Model> taus, signs;
  for (int v = 0; v < 3; ++v) {
    taus.push_back(make_model(10 * v + 1));
    signs.push_back(make_model(10 * v + 500));
    save(taus[v], dir.file("tau" + std::to_string(v) + ".safetensors"));
    save(signs[v], dir.file("signs" + std::to_string(v) + ".h5"));
  }
  for (MergeMethod method : {MergeMethod::kMean, MergeMethod::kSum, MergeMethod::kTies}) {
    for (MergeOrder order : {MergeOrder::kNone, MergeOrder::kMaskThenMerge, MergeOrder::kMergeThenMask}) {
      for (TiesElect elect : {TiesElect::kCount, TiesElect::kMass}) {
        if (method != MergeMethod::kTies && elect == TiesElect::kMass) continue;
        MergeJob job;
        for (int v = 0; v < 3; ++v) {
          job.task_vectors.push_back(dir.file("tau" + std::to_string(v) + ".safetensors"));
          if (order != MergeOrder::kNone) job.signs.push_back(dir.file("signs" + std::to_string(v) + ".h5"));
        }
        job.method = method;
        job.order = order;
        job.ties.elect = elect;
        job.ties.fraction = 0.3;
        job.out = dir.file("merged.safetensors");
        std::ostringstream log;
        run_merge(job, log);
        for (std::size_t i = 0; i < taus[0].layout.size(); ++i) {
          const auto& info = taus[0].layout[i];
          std::vector<std::vector<float>> inputs;
          for (int v = 0; v < 3; ++v)
            inputs.push_back(order == MergeOrder::kMaskThenMerge
                                 ? mask_tensor(MaskMode::kNormal, {}, taus[v].values[i], signs[v].values[i], info.shape, 0)
                                 : taus[v].values[i]);
          std::vector<const float*> pointers;
          std::vector<float> thresholds;
          for (const auto& input : inputs) {
            pointers.push_back(input.data());
            thresholds.push_back(kth_largest_magnitude(input.data(), info.numel(), ties_keep_count(info.numel(), 0.3)));
          }
          std::vector<float> expected(static_cast<std::size_t>(info.numel()));
          merge_values(method, elect, pointers, info.numel(), thresholds, expected.data());
          if (order == MergeOrder::kMergeThenMask) {
            std::vector<float> votes(expected.size(), 0.0f);
            for (int v = 0; v < 3; ++v)
              for (std::size_t j = 0; j < votes.size(); ++j) votes[j] += (signs[v].values[i][j] > 0) - (signs[v].values[i][j] < 0);
            expected = mask_tensor(MaskMode::kNormal, {}, expected, votes, info.shape, 0);
          }
          ASSERT_EQ(read(job.out, info.name), expected)
              << merge_method_name(method) << " " << merge_order_name(order) << " " << info.name;
        }
      }
    }
  }
}

TEST(Jobs, GlobalTiesTrimsOverTheWholeVector) {
  TempDir dir;
  Model a = make_model(1), b = make_model(2);
  for (auto& value : a.values[3]) value *= 100.0f;  // one tensor dominates a's magnitudes
  save(a, dir.file("a.safetensors"));
  save(b, dir.file("b.safetensors"));
  MergeJob job;
  job.task_vectors = {dir.file("a.safetensors"), dir.file("b.safetensors")};
  job.method = MergeMethod::kTies;
  job.ties.scope = TiesScope::kGlobal;
  job.ties.fraction = 0.05;
  job.out = dir.file("m.safetensors");
  std::ostringstream log;
  run_merge(job, log);
  // Brute force: concatenate each vector, threshold at its k-th largest magnitude.
  std::vector<float> thresholds;
  for (const Model* model : {&a, &b}) {
    std::vector<float> all;
    for (const auto& values : model->values) all.insert(all.end(), values.begin(), values.end());
    thresholds.push_back(kth_largest_magnitude(all.data(), static_cast<long long>(all.size()),
                                               ties_keep_count(static_cast<long long>(all.size()), 0.05)));
  }
  for (std::size_t i = 0; i < a.layout.size(); ++i) {
    std::vector<float> expected(a.values[i].size());
    merge_values(MergeMethod::kTies, TiesElect::kCount, {a.values[i].data(), b.values[i].data()},
                 static_cast<long long>(expected.size()), thresholds, expected.data());
    EXPECT_EQ(read(job.out, a.layout[i].name), expected) << a.layout[i].name;
  }
  // 57 elements, ceil(57 * 0.05) = 3 kept: a's budget is spent on its scaled layers.1.bias, so
  // at most b's 3 entries reach the other tensors.
  long long nonzero = 0;
  for (const char* name : {"layers.0.weight", "layers.0.bias", "layers.1.weight"})
    for (float value : read(job.out, name)) nonzero += value != 0.0f;
  EXPECT_LE(nonzero, 3);
}

TEST(Jobs, InspectComparesTwoFiles) {
  TempDir dir;
  const Model a = make_model(1);
  Model b = a;
  for (auto& value : b.values[0]) value = -value;
  save(a, dir.file("a.safetensors"));
  save(b, dir.file("b.h5"));
  std::ostringstream out;
  run_inspect({dir.file("a.safetensors"), dir.file("b.h5"), {}, {}, dir.file("r.json")}, out);
  EXPECT_NE(out.str().find("layers.0.weight"), std::string::npos);
  const auto json = nlohmann::json::parse(testing::read_bytes(dir.file("r.json")));
  // 30 of 57 entries flipped: agreement 27/57; cosine of layers.0.weight with its negation -1.
  EXPECT_DOUBLE_EQ(json["overall"]["sign_agreement"].get<double>(), 27.0 / 57.0);
  EXPECT_NEAR(json["tensors"][0]["cosine"].get<double>(), -1.0, 1e-12);
  EXPECT_EQ(json["overall"]["elements"].get<long long>(), 57);
}

}  // namespace
}  // namespace gradfix

namespace gradfix {
namespace {

// The message of the InputError `check` throws ("" when it throws none).
template <typename Check>
std::string input_error_of(Check check) {
  try {
    check();
  } catch (const InputError& error) {
    return error.what();
  }
  return "";
}

// A merge of models "a" and "b" onto "base" with these weights, densities 1, written to "out".
ModelMergeJob two_model_merge(ModelMergeMethod method, std::vector<double> weights) {
  ModelMergeJob job;
  job.method = method;
  job.base = "base";
  job.models = {"a", "b"};
  job.weights = std::move(weights);
  job.densities = {1.0, 1.0};
  job.out = "out";
  return job;
}

// validate() refuses options that are out of range or do not go together, naming the option,
// for jobs built in code as for jobs built from flags; the run function checks before any file.
TEST(JobValidation, FileJobsNameTheOffendingOption) {
  ApplyJob apply{"base.safetensors", "tau.safetensors", 1.0, "out.safetensors", {}};
  EXPECT_EQ(input_error_of([&] { apply.validate(); }), "");
  apply.alpha = std::nan("");
  EXPECT_NE(input_error_of([&] { apply.validate(); }).find("--alpha must be finite"), std::string::npos);
  // The run function refuses it before it opens an input (neither file exists).
  std::ostringstream log;
  EXPECT_NE(input_error_of([&] { run_apply(apply, log); }).find("--alpha must be finite"), std::string::npos);

  MergeJob merge;
  merge.task_vectors = {"a.safetensors", "b.safetensors"};
  merge.out = "m.safetensors";
  EXPECT_EQ(input_error_of([&] { merge.validate(); }), "");
  merge.method = MergeMethod::kTies;
  merge.ties.fraction = 1.5;
  EXPECT_NE(input_error_of([&] { merge.validate(); }).find("--ties-fraction must be in (0, 1], got 1.5"), std::string::npos);
  merge.ties.fraction = 0.2;
  merge.order = MergeOrder::kMaskThenMerge;
  merge.signs = {"s.safetensors"};
  EXPECT_NE(input_error_of([&] { merge.validate(); }).find("needs one --signs per --task-vector: got 1 --signs for 2"), std::string::npos);
  merge.signs.push_back("t.safetensors");
  merge.mask.c = 0.0;
  EXPECT_NE(input_error_of([&] { merge.validate(); }).find("--soft-c must be positive"), std::string::npos);

  MaskJob mask{"tau.safetensors", "", MaskMode::kNormal, {}, "out.safetensors", {}};
  EXPECT_EQ(input_error_of([&] { mask.validate(); }), "--signs is required");
  mask.signs = "s.safetensors";
  mask.mask.beta = INFINITY;
  EXPECT_EQ(input_error_of([&] { mask.validate(); }), "--beta must be finite");

  ModelMergeJob model_merge = two_model_merge(ModelMergeMethod::kSlerp, {1, 1});
  EXPECT_NE(input_error_of([&] { model_merge.validate(); }).find("slerp interpolates between the base and one other model; got 2"),
            std::string::npos);
  model_merge.method = ModelMergeMethod::kTies;
  EXPECT_EQ(input_error_of([&] { model_merge.validate(); }), "");

  GenerateJob generate;
  generate.out = "g.safetensors";
  generate.noise = INFINITY;
  EXPECT_EQ(input_error_of([&] { generate.validate(); }), "--noise and --like-scale must be finite");
  EXPECT_EQ(input_error_of([] { TaskVectorJob{"base", "", "out", {}}.validate(); }), "--finetuned is required");
}

// mergekit's per-tensor parameter forms, evaluated by hand: a list over the layers is read at
// t (n - 1) between its neighbours; conditions take the first filter found in the name.
TEST(MergeParameters, GradientsAndConditionsAsMergekitEvaluatesThem) {
  ParameterSetting gradient;
  gradient.kind = ParameterSetting::Kind::kGradient;
  gradient.gradient = {0.0, 0.3, 0.7, 1.0};
  EXPECT_DOUBLE_EQ(*gradient.at("x", 0.0), 0.0);
  EXPECT_DOUBLE_EQ(*gradient.at("x", 0.5), 0.5);    // 1.5: halfway between 0.3 and 0.7
  EXPECT_DOUBLE_EQ(*gradient.at("x", 0.25), 0.225);  // 0.75: three quarters of the way to 0.3
  EXPECT_DOUBLE_EQ(*gradient.at("x", 1.0), 1.0);
  ParameterSetting conditions;
  conditions.kind = ParameterSetting::Kind::kConditions;
  ParameterSetting half, rest;
  half.number = 0.5;
  rest.number = 0.0;
  conditions.conditions.push_back({"mlp", std::make_shared<ParameterSetting>(half)});
  EXPECT_DOUBLE_EQ(*conditions.at("model.layers.1.mlp.up_proj.weight", 0.5), 0.5);
  EXPECT_FALSE(conditions.at("model.layers.1.self_attn.q_proj.weight", 0.5).has_value());
  conditions.conditions.push_back({"", std::make_shared<ParameterSetting>(rest)});
  EXPECT_DOUBLE_EQ(*conditions.at("model.layers.1.self_attn.q_proj.weight", 0.5), 0.0);
}

// A model's setting that gives no value falls through to the merge's, then to the fallback; a
// value out of range names the model, the parameter and the tensor.
TEST(MergeParameters, ChainFallsThroughAndRangesAreChecked) {
  ModelMergeJob job = two_model_merge(ModelMergeMethod::kTies, {1.0, 2.0});
  ParameterSetting attention;
  attention.kind = ParameterSetting::Kind::kConditions;
  ParameterSetting three;
  three.number = 3.0;
  attention.conditions.push_back({"self_attn", std::make_shared<ParameterSetting>(three)});
  ParameterSetting layers;
  layers.kind = ParameterSetting::Kind::kGradient;
  layers.gradient = {0.2, 0.6};
  job.varying.push_back({"weight", 0, {attention, layers}, std::nullopt});
  job.varying.push_back({"density", 1, {layers}, 1.0});
  job.validate();
  MergeParameters p = job.parameters_for("model.layers.0.self_attn.k_proj.weight", 0.0);
  EXPECT_EQ(p.weights, (std::vector<double>{3.0, 2.0}));
  EXPECT_DOUBLE_EQ(p.densities[1], 0.2);
  p = job.parameters_for("model.layers.3.mlp.down_proj.weight", 0.75);
  EXPECT_DOUBLE_EQ(p.weights[0], 0.5);  // 0.2 + 0.75 x 0.4
  EXPECT_DOUBLE_EQ(p.densities[1], 0.5);
  job.varying[1].settings[0].gradient = {0.5, 1.5};
  EXPECT_NE(input_error_of([&] { (void)job.parameters_for("model.layers.3.mlp.down_proj.weight", 1.0); })
                .find("b: density for tensor model.layers.3.mlp.down_proj.weight must be in [0, 1], got 1.5"),
            std::string::npos);
}

}  // namespace
}  // namespace gradfix
