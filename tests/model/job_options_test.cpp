// The model jobs' validate(): out-of-range and conflicting options refused, naming the option,
// without LibTorch (this program links the model layer's stub, as gradfix without LibTorch does).
#include <gtest/gtest.h>

#include <string>

#include "gradfix/io/error.hpp"
#include "gradfix/model/jobs.hpp"

namespace gradfix {
namespace {

template <typename Job>
std::string input_error_of(const Job& job) {
  try {
    job.validate();
  } catch (const InputError& error) {
    return error.what();
  }
  return "";
}

TransportJob sound_transport() {
  TransportJob job;
  job.target = "b.safetensors";
  job.task_vector = "tau.safetensors";
  job.data = {"pool.h5", "none"};
  job.test = {"test.h5", "none"};
  return job;
}

TEST(ModelJobOptions, TransportRefusesABadFineTuningGridAndConflicts) {
  TransportJob job = sound_transport();
  EXPECT_EQ(input_error_of(job), "");
  job.finetune_steps = {5, 20, 20};
  EXPECT_EQ(input_error_of(job), "--finetune-steps must increase, got 20 after 20");
  job.finetune_steps = {5, 20};
  job.finetune_lrs = {1e-3, -1e-4};
  EXPECT_EQ(input_error_of(job), "--finetune-lrs: every learning rate must be positive, got -1e-04");
  job.finetune_lrs.clear();
  job.finetune_freeze = {"^head\\."};
  job.few_shot_baseline = false;
  EXPECT_NE(input_error_of(job).find("--finetune-freeze configures the few-shot fine-tuning row"), std::string::npos);
  job = sound_transport();
  job.selection.indices_file = "shots.txt";
  job.selection.num_batches = 2;
  EXPECT_EQ(input_error_of(job), "give --indices or --num-batches, not both");
  job = sound_transport();
  job.test.spec.clear();
  EXPECT_EQ(input_error_of(job), "--test-data is required");
}

TEST(ModelJobOptions, TrainSignsAndDemo) {
  TrainJob train;
  train.data = {"train.h5", "none"};
  train.out = "w.safetensors";
  EXPECT_EQ(input_error_of(train), "");
  train.lr = 0.0;
  EXPECT_NE(input_error_of(train).find("--lr a positive finite number"), std::string::npos);

  SignsJob signs;
  signs.data = {"d.h5", "none"};
  signs.out = "s.safetensors";
  signs.num_samples = -1;
  EXPECT_EQ(input_error_of(signs), "--num-samples must not be negative");
  signs.num_samples = 0;
  signs.selection.features_file = "f.h5";
  EXPECT_NE(input_error_of(signs).find("--selection-features is for --selection coreset"), std::string::npos);

  DemoJob demo;
  EXPECT_EQ(input_error_of(demo), "");
  demo.shots = {2, 0};
  EXPECT_EQ(input_error_of(demo), "--shots: every K must be a whole number from 1 to 1000, got 0");
  demo.shots = {2};
  demo.seeds.clear();
  EXPECT_EQ(input_error_of(demo), "--seeds must be from 1 to 100, got 0");
  // The vision demo searches a wider grid than transport's default.
  EXPECT_EQ(DemoJob().alphas, (std::vector<double>{0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5}));

  LmDemoJob lm;
  EXPECT_EQ(input_error_of(lm), "");
  lm.samples = {16, 449};
  EXPECT_EQ(input_error_of(lm), "--samples: every N must be from 1 to 448 (the pool of 512 less the support set of 64), got 449");
  lm.samples = {16};
  lm.tasks = {"reverse", "reverse"};
  EXPECT_EQ(input_error_of(lm), "--lm-tasks: task 'reverse' twice");
  lm.tasks = {"sort"};
  EXPECT_EQ(input_error_of(lm), "--lm-tasks: unknown task 'sort' (reverse, parity or add)");
}

}  // namespace
}  // namespace gradfix
