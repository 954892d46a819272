// The Hugging Face decoders against transformers: tiny random llama, qwen2, mistral, qwen3 and
// gemma2 models
// saved with save_pretrained (sharded), their logits and per-sample losses recorded by
// tests/fixtures/decoders/make_fixtures.py. gradfix must read the directories under their own
// tensor names and give the same logits (1e-4 relative) and losses; bad configs and checkpoints
// must be refused naming the key, the value, or every tensor that is wrong.
#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>
#include <fstream>
#include <regex>

#include "../../src/model/decoder.hpp"
#include "../support/test_files.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

std::string fixture(const std::string& name) { return std::string(GRADFIX_SOURCE_DIR) + "/tests/fixtures/decoders/" + name; }

std::vector<float> reference(const std::string& model, const std::string& tensor) {
  return open_reader(fixture(model) + "/reference.safetensors")->read_f32(tensor);
}

class DecoderFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(DecoderFixture, LogitsAndLossesMatchTransformers) {
  const std::string model = GetParam();
  const std::unique_ptr<Decoder> opened = open_decoder(fixture(model) + "/model");
  const Decoder& decoder = *opened;
  EXPECT_EQ(decoder.model_type(), model);
  std::vector<std::string> names;
  for (const auto& tensor : decoder.layout()) names.push_back(tensor.name);
  const Parameters parameters = read_decoder_parameters(decoder, names, torch::kFloat32, torch::kCPU);
  const TokenData data = load_token_data(fixture(model) + "/tokens.safetensors");
  check_vocabulary(data, decoder.config().vocab_size);
  torch::NoGradGuard no_gradients;
  const TokenBatch batch = token_batch(data, torch::kCPU);
  const torch::Tensor logits = decoder.forward(parameters, batch).contiguous();
  const std::vector<float> expected = reference(model, "logits");
  ASSERT_EQ(static_cast<std::size_t>(logits.numel()), expected.size());
  const float* got = logits.data_ptr<float>();
  // Relative to the logits' scale: float32 sums in another order differ by rounding, which is
  // large against a logit that happens to be near zero but small against the logits' range.
  double worst = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - expected[i]));
    scale = std::max(scale, static_cast<double>(std::fabs(expected[i])));
  }
  EXPECT_LT(worst, 1e-4 * scale) << model << ": largest logit error " << worst << " against logits up to " << scale;
  std::cout << model << ": largest logit error " << worst << ", logits up to " << scale << "\n";
  const torch::Tensor losses = per_sample_losses(logits, batch.labels);
  const std::vector<float> expected_losses = reference(model, "per_sample_loss");
  for (long long n = 0; n < data.samples; ++n)
    EXPECT_NEAR(losses[n].item<double>(), expected_losses[static_cast<std::size_t>(n)], 1e-4 * expected_losses[static_cast<std::size_t>(n)])
        << model << " sample " << n;
}

INSTANTIATE_TEST_SUITE_P(Decoders, DecoderFixture, ::testing::Values("llama", "qwen2", "mistral", "qwen3", "gemma2"));

// Copies a fixture's model directory, then lets the test rewrite its config.json.
std::string copy_model(const testing::TempDir& dir, const std::string& model) {
  const std::string target = dir.file(model);
  const std::string command = "cp -r '" + fixture(model) + "/model' '" + target + "'";
  EXPECT_EQ(std::system(command.c_str()), 0);
  return target;
}

void replace_in_file(const std::string& path, const std::string& from, const std::string& to) {
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto found = text.find(from);
  ASSERT_NE(found, std::string::npos) << from << " not in " << path;
  text.replace(found, from.size(), to);
  std::ofstream(path) << text;
}

void expect_input_error(const std::function<void()>& work, const std::vector<std::string>& parts) {
  try {
    work();
    ADD_FAILURE() << "accepted";
  } catch (const InputError& error) {
    for (const auto& part : parts) EXPECT_NE(std::string(error.what()).find(part), std::string::npos) << error.what();
  }
}

TEST(DecoderConfig, RefusesWhatChangesTheMathNamingKeyAndValue) {
  testing::TempDir dir;
  const std::string llama = copy_model(dir, "llama");
  replace_in_file(llama + "/config.json", "\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\"");
  expect_input_error([&] { open_decoder(llama); }, {"config.json", "rope_scaling.rope_type", "\"yarn\""});

  const std::string qwen = copy_model(dir, "qwen2");
  replace_in_file(qwen + "/config.json", "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"");
  expect_input_error([&] { open_decoder(qwen); }, {"\"hidden_act\"", "\"gelu\""});

  const std::string mistral = copy_model(dir, "mistral");
  replace_in_file(mistral + "/config.json", "\"use_cache\": true", "\"use_cache\": true, \"quantization_config\": {\"bits\": 4}");
  expect_input_error([&] { open_decoder(mistral); }, {"\"quantization_config\"", "changes the model's math"});

  const std::string gpt = copy_model(dir, "qwen2") + "_2";
  std::system(("cp -r '" + fixture("qwen2") + "/model' '" + gpt + "'").c_str());
  replace_in_file(gpt + "/config.json", "\"model_type\": \"qwen2\"", "\"model_type\": \"gpt2\"");
  expect_input_error([&] { open_decoder(gpt); }, {"\"model_type\"", "\"gpt2\"", "is not an architecture gradfix implements", "gemma2, llama, mistral, qwen2, qwen3"});
}

TEST(DecoderConfig, EachFamilyReadsAndRefusesItsOwnKeys) {
  testing::TempDir dir;
  const std::string gemma = copy_model(dir, "gemma2");
  replace_in_file(gemma + "/config.json", "\"hidden_activation\": \"gelu_pytorch_tanh\"", "\"hidden_activation\": \"gelu\"");
  expect_input_error([&] { open_decoder(gemma); }, {"gemma2/config.json", "\"hidden_activation\"", "\"gelu\""});

  const std::string bidirectional = dir.file("bidirectional");
  std::system(("cp -r '" + fixture("gemma2") + "/model' '" + bidirectional + "'").c_str());
  replace_in_file(bidirectional + "/config.json", "\"use_bidirectional_attention\": null", "\"use_bidirectional_attention\": true");
  expect_input_error([&] { open_decoder(bidirectional); }, {"\"use_bidirectional_attention\"", "causal language model"});

  const std::string layers = dir.file("layers");
  std::system(("cp -r '" + fixture("gemma2") + "/model' '" + layers + "'").c_str());
  replace_in_file(layers + "/config.json", "\"sliding_attention\",\n    \"full_attention\"", "\"sliding_attention\"");
  expect_input_error([&] { open_decoder(layers); }, {"\"layer_types\"", "lists 1 layers, num_hidden_layers is 2"});

  const std::string pad = dir.file("pad");
  std::system(("cp -r '" + fixture("gemma2") + "/model' '" + pad + "'").c_str());
  replace_in_file(pad + "/config.json", "\"pad_token_id\": 0", "\"pad_token_id\": 96");
  expect_input_error([&] { open_decoder(pad); }, {"\"pad_token_id\" 96 is outside the vocabulary of 96 tokens"});

  // mlp_bias is a llama key: Qwen3 does not know it, and it would change the math.
  const std::string qwen3 = copy_model(dir, "qwen3");
  replace_in_file(qwen3 + "/config.json", "\"use_cache\": true", "\"use_cache\": true, \"mlp_bias\": true");
  expect_input_error([&] { open_decoder(qwen3); }, {"\"mlp_bias\"", "qwen3 config", "changes the model's math"});
}

std::string read_text(const std::string& path) {
  std::ifstream file(path);
  return std::string((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
}

// The config.json of published releases (Llama 3.1/3.2, Qwen2.5, Qwen3, Mistral v0.3, SmolLM2,
// TinyLlama, Gemma 2) and of each family as the transformers release writes it in full: every key
// is read or known not to change the math, so nothing is refused and no notice is due.
TEST(DecoderConfig, PublishedAndTransformersConfigsAreReadWithoutNotice) {
  int read = 0;
  for (const std::string folder : {"published", "transformers"}) {
    const std::string root = std::string(GRADFIX_SOURCE_DIR) + "/tests/fixtures/configs/" + folder;
    for (const std::string name : {"Llama-3.1-8B", "Llama-3.2-1B-Instruct", "Qwen2.5-7B", "Qwen2.5-0.5B-Instruct", "Qwen3-0.6B",
                                   "Mistral-7B-v0.3", "SmolLM2-135M-Instruct", "TinyLlama-1.1B-Chat-v1.0", "gemma-2-2b", "llama",
                                   "mistral", "qwen2", "qwen3", "gemma2"}) {
      const std::string path = root + "/" + name + ".json";
      if (!std::ifstream(path)) continue;
      const std::unique_ptr<Decoder> decoder = decoder_from_config(read_text(path), path, true);
      EXPECT_TRUE(decoder->unknown_config_keys().empty()) << path << ": " << format_name_list(decoder->unknown_config_keys());
      ++read;
    }
  }
  EXPECT_EQ(read, 14);
  // Spot checks that the published values were read, not skipped.
  const std::string root = std::string(GRADFIX_SOURCE_DIR) + "/tests/fixtures/configs/published/";
  const DecoderConfig llama = decoder_from_config(read_text(root + "Llama-3.1-8B.json"), "llama")->config();
  EXPECT_EQ(llama.rope.type, "llama3");
  EXPECT_EQ(llama.rope.factor, 8.0);
  EXPECT_EQ(llama.kv_heads, 8);
  const DecoderConfig smol = decoder_from_config(read_text(root + "SmolLM2-135M-Instruct.json"), "smol")->config();
  EXPECT_TRUE(smol.tie_word_embeddings);
  EXPECT_EQ(smol.pad_token_id, 2);
  EXPECT_EQ(smol.head_dim, 64);
}

// Three classes: a key gradfix does not know is named and the model is read (strict: refused);
// a key known to change the math is refused whatever the strictness unless null or false.
TEST(DecoderConfig, UnknownKeysAreNoticedOrRefusedStrictly) {
  const std::string path = std::string(GRADFIX_SOURCE_DIR) + "/tests/fixtures/configs/published/TinyLlama-1.1B-Chat-v1.0.json";
  const std::string text = read_text(path);
  auto with = [&](const std::string& extra) {
    std::string changed = text;
    changed.replace(changed.find("\"use_cache\": true"), 17, "\"use_cache\": true, " + extra);
    return changed;
  };
  const std::string unknown = with("\"my_tool_setting\": 3, \"another_note\": \"x\"");
  EXPECT_EQ(decoder_from_config(unknown, path)->unknown_config_keys(), (std::vector<std::string>{"another_note", "my_tool_setting"}));
  expect_input_error([&] { decoder_from_config(unknown, path, true); },
                     {"TinyLlama-1.1B-Chat-v1.0.json", "\"another_note\": \"x\"", "--strict-config refuses unknown keys"});
  for (const std::string math : {"\"num_experts\": 8", "\"use_mrope\": true", "\"rope_interleaved\": true", "\"logits_scaling\": 4.0"})
    for (bool strict : {false, true})
      expect_input_error([&] { decoder_from_config(with(math), path, strict); }, {math, "changes the model's math", "a llama config"});
  for (const std::string off : {"\"use_mrope\": false", "\"rope_interleaved\": false", "\"final_logit_softcapping\": null", "\"unk_token_id\": 0"})
    EXPECT_TRUE(decoder_from_config(with(off), path, true)->unknown_config_keys().empty()) << off;
}

// The Gemma 2 fixture's window (5) is shorter than its sequences (12): the logits match
// transformers only with the window applied, so a window ignored would fail LogitsAndLosses. The
// same model with a window longer than the sequences must give other logits.
TEST(Gemma2, TheSlidingWindowChangesTheLogits) {
  testing::TempDir dir;
  const std::string wide = copy_model(dir, "gemma2");
  replace_in_file(wide + "/config.json", "\"sliding_window\": 5", "\"sliding_window\": 64");
  const std::unique_ptr<Decoder> decoder = open_decoder(wide);
  std::vector<std::string> names;
  for (const auto& tensor : decoder->layout()) names.push_back(tensor.name);
  const Parameters parameters = read_decoder_parameters(*decoder, names, torch::kFloat32, torch::kCPU);
  const TokenData data = load_token_data(fixture("gemma2") + "/tokens.safetensors");
  torch::NoGradGuard no_gradients;
  const torch::Tensor logits = decoder->forward(parameters, token_batch(data, torch::kCPU)).contiguous();
  const std::vector<float> expected = reference("gemma2", "logits");
  double worst = 0.0;
  for (std::size_t i = 0; i < expected.size(); ++i) worst = std::max(worst, std::fabs(static_cast<double>(logits.data_ptr<float>()[i]) - expected[i]));
  EXPECT_GT(worst, 1e-2) << "a window of 64 gave the logits of a window of 5";
}

TEST(DecoderConfig, CheckpointMismatchesAreListedTogether) {
  testing::TempDir dir;
  const std::string llama = copy_model(dir, "llama");
  // Two more layers than the checkpoint has, and a wider MLP: missing and misshapen tensors.
  replace_in_file(llama + "/config.json", "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
  replace_in_file(llama + "/config.json", "\"intermediate_size\": 48", "\"intermediate_size\": 50");
  const std::unique_ptr<Decoder> decoder = open_decoder(llama);
  expect_input_error([&] { check_decoder_checkpoint(*decoder); },
                     {"does not match its config.json", "tensor(s) missing", "model.layers.2.input_layernorm.weight",
                      "'model.layers.0.mlp.gate_proj.weight' is [48, 32], the config needs [50, 32]"});
}

TEST(DecoderConfig, SlidingWindowLongerThanTheWindowIsRefused) {
  testing::TempDir dir;
  const std::string mistral = copy_model(dir, "mistral");
  replace_in_file(mistral + "/config.json", "\"sliding_window\": 32", "\"sliding_window\": 4");
  const std::unique_ptr<Decoder> decoder = open_decoder(mistral);
  EXPECT_EQ(decoder->config().sliding_window, 4);
  std::vector<std::string> names;
  for (const auto& tensor : decoder->layout()) names.push_back(tensor.name);
  const Parameters parameters = read_decoder_parameters(*decoder, names, torch::kFloat32, torch::kCPU);
  const TokenData data = load_token_data(fixture("mistral") + "/tokens.safetensors");
  expect_input_error([&] { decoder->forward(parameters, token_batch(data, torch::kCPU)); },
                     {"12 tokens are longer than the sliding window (4)"});
}

TEST(TokenData, BadTokensAreNamedBySampleAndPosition) {
  const TokenData data = load_token_data(fixture("llama") + "/tokens.safetensors");
  EXPECT_EQ(data.samples, 5);
  EXPECT_EQ(data.length, 12);
  expect_input_error([&] { check_vocabulary(data, 10); }, {"tokens.safetensors: sample 0, position", ">= the model's vocab_size 10"});
}

}  // namespace
}  // namespace gradfix
