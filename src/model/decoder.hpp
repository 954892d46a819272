#pragma once
// Internal to the LibTorch part: decoder-only causal language models of the Llama family (llama,
// mistral, qwen2) read from Hugging Face model directories, under the checkpoint's own tensor
// names. The architecture describes the math of each piece (embedding, one decoder layer, the
// final norm and head) on parameters passed in by name, so that whoever holds the parameters
// (all of them, or one gathered layer at a time) can run it.

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "architecture.hpp"
#include "gradfix/data/tokens.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {

struct RopeScaling {
  std::string type = "default";  // default | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  long long original_max_position_embeddings = 0;
};

struct DecoderConfig {
  std::string directory;
  std::string model_type;  // llama | mistral | qwen2
  long long vocab_size = 0;
  long long hidden_size = 0;
  long long intermediate_size = 0;
  long long layers = 0;
  long long heads = 0;
  long long kv_heads = 0;
  long long head_dim = 0;
  long long max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  long long sliding_window = 0;  // 0: every layer attends to the whole sequence
};


// Reads DIR/config.json. Every key that changes the math must be one gradfix implements with the
// value it supports; anything else is an InputError naming the key and its value.
DecoderConfig read_decoder_config(const std::string& directory);
// The same from the text of a config.json (`path` names it in messages); directory left empty.
DecoderConfig parse_decoder_config(const std::string& text, const std::string& path);

// The tensors a checkpoint of this config holds: names and shapes (dtype F32).
std::vector<TensorInfo> decoder_layout(const DecoderConfig& config);

// The names of layer i's tensors, in layout order.
std::vector<std::string> layer_parameter_names(const DecoderConfig& config, long long layer);

// Reads the tensors of `names` from the model directory as `dtype` on `device`, checking every
// tensor of the layout against the checkpoint first: all missing, extra and misshapen tensors are
// listed in one InputError.
Parameters read_decoder_parameters(const DecoderConfig& config, const std::vector<std::string>& names, torch::ScalarType dtype,
                                   const torch::Device& device);
// The checkpoint against the layout, without reading data.
void check_decoder_checkpoint(const DecoderConfig& config);


// Token tensors [N, T] (int64) on a device.
struct TokenBatch {
  torch::Tensor input_ids;
  torch::Tensor labels;
  torch::Tensor attention_mask;
};
TokenBatch token_batch(const TokenData& data, const torch::Device& device);
// Token data as the sharded executor reads it (inputs = input_ids, mask = attention_mask).
SampleSource token_samples(const TokenData& data);

class Decoder final : public LayeredModel {
 public:
  explicit Decoder(DecoderConfig config);
  const DecoderConfig& config() const { return config_; }

  // The executor's view (architecture.hpp): the embedding, the decoder layers, norm and head.
  std::vector<TensorInfo> layout() const override;
  std::string directory() const override { return config_.directory; }
  long long layers() const override { return config_.layers; }
  std::vector<std::string> input_names() const override { return {"model.embed_tokens.weight"}; }
  std::vector<std::string> layer_names(long long layer) const override;
  std::vector<std::string> output_names() const override { return {"model.norm.weight", head_name()}; }
  torch::Tensor input(const Parameters& parameters, const Batch& batch, GradientRecorder* recorder = nullptr) const override {
    return embed(parameters, batch.inputs, recorder);
  }
  torch::Tensor layer(long long index, const Parameters& parameters, const torch::Tensor& hidden, const Batch& batch,
                      GradientRecorder* recorder = nullptr) const override {
    return block(index, parameters, hidden, batch.mask, recorder);
  }
  torch::Tensor output(const Parameters& parameters, const torch::Tensor& hidden, GradientRecorder* recorder = nullptr) const override {
    return head(parameters, hidden, recorder);
  }
  torch::Tensor losses(const torch::Tensor& logits, const Batch& batch) const override;
  // Shot selection compares sequences by the mean of the last layer's output over their tokens.
  long long feature_size() const override { return config_.hidden_size; }
  torch::Tensor features(const Parameters& parameters, const torch::Tensor& hidden, const Batch& batch) const override {
    (void)parameters;
    if (!batch.mask.defined()) return hidden.mean(1);
    const torch::Tensor mask = batch.mask.to(hidden.scalar_type()).unsqueeze(-1);
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0);
  }
  std::pair<long long, long long> hits(const torch::Tensor& logits, const Batch& batch) const override;
  // transformers may store a tied head anyway, and rotary buffers in old checkpoints.
  bool ignores(const std::string& name) const override {
    return (name == "lm_head.weight" && config_.tie_word_embeddings) || name.find("rotary_emb.inv_freq") != std::string::npos;
  }
  std::string model_type() const override { return config_.model_type; }

  // [N, T] token ids -> [N, T, H] hidden states. With a recorder the output is a leaf that
  // requires grad, recorded for the embedding's per-sample gradients.
  torch::Tensor embed(const Parameters& parameters, const torch::Tensor& input_ids, GradientRecorder* recorder = nullptr) const;
  // One decoder layer on [N, T, H]; `attention_mask` [N, T] marks real tokens (right padding).
  // With a recorder (and `hidden` requiring grad) every parameter use is recorded.
  torch::Tensor block(long long index, const Parameters& parameters, const torch::Tensor& hidden,
                      const torch::Tensor& attention_mask, GradientRecorder* recorder = nullptr) const;
  // Final norm and the language-model head: [N, T, H] -> [N, T, V] logits.
  torch::Tensor head(const Parameters& parameters, const torch::Tensor& hidden, GradientRecorder* recorder = nullptr) const;
  // The tensor the head multiplies by: lm_head.weight, or the embedding when tied.
  std::string head_name() const;
  // All of it, with every parameter in `parameters`.
  torch::Tensor forward(const Parameters& parameters, const TokenBatch& batch) const;

 private:
  // cos and sin [T, head_dim] for positions 0..T-1, in the dtype and on the device of `like`.
  std::pair<torch::Tensor, torch::Tensor> rotary(long long length, const torch::Tensor& like) const;

  DecoderConfig config_;
  torch::Tensor inverse_frequencies_;  // [head_dim / 2], float64 on the CPU
};

// Mean cross-entropy over each sample's target tokens (labels shifted by one): [N].
torch::Tensor per_sample_losses(const torch::Tensor& logits, const torch::Tensor& labels);
// Correct next-token predictions and target tokens, summed over the batch.
std::pair<long long, long long> token_hits(const torch::Tensor& logits, const torch::Tensor& labels);

}  // namespace gradfix
