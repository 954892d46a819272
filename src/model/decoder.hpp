#pragma once
// Internal to the LibTorch part: what every decoder-only causal language model read from a
// Hugging Face directory shares, under the checkpoint's own tensor names. The pieces (token
// embedding, RMSNorm, rotary attention with grouped heads, gated MLP, the head and the per-sample
// losses) are math on parameters passed in by name, so that whoever holds the parameters (all of
// them, or one gathered layer at a time) can run them.
//
// A family is one file (llama.cpp: llama, mistral, qwen2; qwen3.cpp; gemma2.cpp): it reads its own
// config keys with a DecoderConfigReader, composes its layer from the pieces below (or keeps the
// Llama layer), lists its layer's tensors, and registers its model_type with an
// ArchitectureRegistration. The jobs see only Decoder.

#include <torch/torch.h>

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "architecture.hpp"
#include "gradfix/io/tokens.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {

struct RopeScaling {
  std::string type = "default";  // default | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  long long original_max_position_embeddings = 0;
};

// The settings every family has. A family keeps what only it has (soft-capping, extra norms) in
// its own class.
struct DecoderConfig {
  std::string directory;
  std::string model_type;
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
  // transformers builds the embedding with padding_idx = pad_token_id: that row takes no gradient
  // from the lookups (a tied head's use of it still counts). -1: none.
  long long pad_token_id = -1;
  // Keys of config.json that no class names (DecoderConfigReader::finish): taken not to change
  // the math, and named in a notice.
  std::vector<std::string> unknown_keys;
};

// Reads a decoder's config.json key by key and remembers which keys were read, so that a family's
// file reads its own keys and finish() sorts the rest into three classes: keys known not to
// change the math (ignored), keys known to change it that this family does not read (refused by
// name unless null or false), and keys gradfix does not know (a notice, or refused under
// --strict-config). Every error names the file, the key and its value.
class DecoderConfigReader {
 public:
  explicit DecoderConfigReader(const ModelConfigSource& source);
  DecoderConfigReader(const std::string& text, std::string path, bool strict = false);
  const std::string& path() const { return path_; }
  const std::string& model_type() const { return model_type_; }
  // Present and not null.
  bool has(const std::string& key) const;
  long long positive_integer(const std::string& key);
  long long positive_integer_or(const std::string& key, long long fallback);
  // Any integer; `fallback` when absent or null.
  long long integer_or(const std::string& key, long long fallback);
  double positive_number_or(const std::string& key, double fallback);
  // A number that may be null or absent (0 then): soft-capping thresholds.
  double optional_positive_number(const std::string& key);
  bool boolean_or(const std::string& key, bool fallback);
  std::string text_or(const std::string& key, const std::string& fallback);
  // An array of strings; empty when absent or null.
  std::vector<std::string> texts(const std::string& key);
  // The key's value must be one of `allowed` when present.
  void expect_one_of(const std::string& key, const std::vector<std::string>& allowed, const std::string& why);
  // Keys this family knows not to change the math.
  void ignore(const std::vector<std::string>& keys);
  // The rotary settings (rope_theta, rope_scaling, rope_parameters) into `out`.
  void read_rope(DecoderConfig& out);
  [[noreturn]] void refuse(const std::string& key, const std::string& why) const;
  // Sorts the keys that were neither read nor ignored: refuses the first that changes the math
  // (or, strict, that gradfix does not know) and lists the unknown ones in `config`.
  void finish(DecoderConfig& config) const;

 private:
  const nlohmann::json& value(const std::string& key);
  void read_rope_object(const nlohmann::json& rope, const std::string& key, DecoderConfig& out);

  nlohmann::json config_;
  std::string path_;
  std::string model_type_;
  std::set<std::string> read_;
  bool strict_ = false;
};

// The keys every family reads the same way: sizes, heads, head_dim, positions, the norms'
// epsilon, rotary settings, the tied head, and the model type and head class.
DecoderConfig read_common_decoder_config(DecoderConfigReader& reader, const std::string& directory);
// use_sliding_window, layer_types and sliding_window for a family whose window gradfix runs only
// where it equals full attention (the layer refuses longer sequences, Decoder::check_window);
// `always_on`: the family slides whenever a window is given (mistral).
void read_refused_sliding_window(DecoderConfigReader& reader, DecoderConfig& out, bool always_on);

// Token tensors [N, T] (int64) on a device.
struct TokenBatch {
  torch::Tensor input_ids;
  torch::Tensor labels;
  torch::Tensor attention_mask;
};
TokenBatch token_batch(const TokenData& data, const torch::Device& device);
// Token data as the sharded executor reads it (inputs = input_ids, mask = attention_mask).
SampleSource token_samples(const TokenData& data);

// Options of one attention block that differ between families.
struct AttentionOptions {
  bool qkv_bias = false;
  bool o_bias = false;
  // Per-head RMSNorm of queries and keys before the rotation (qwen3): parameter names, or empty.
  std::string q_norm;
  std::string k_norm;
  double scale = 0.0;           // multiplies q.k; 0: 1 / sqrt(head_dim)
  double softcap = 0.0;         // scores -> softcap * tanh(scores / softcap); 0: none
  long long window = 0;         // a query sees the keys less than `window` positions back; 0: all
};

enum class Activation { kSilu, kGeluTanh };

// The Llama layer is the default: a family overrides what differs.
class Decoder : public LayeredModel {
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
    return embed(parameters, batch.inputs, config_.pad_token_id < 0 ? -1 : batch.input_index(config_.pad_token_id), recorder);
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
  torch::Tensor features(const Parameters& parameters, const torch::Tensor& hidden, const Batch& batch) const override;
  std::pair<long long, long long> hits(const torch::Tensor& logits, const Batch& batch) const override;
  // The head block by block of the vocabulary (architecture.hpp): the final norm, then the head.
  const VocabularyHead* vocabulary_head() const override { return &vocabulary_head_; }
  torch::Tensor head_features(const Parameters& parameters, const torch::Tensor& hidden, GradientRecorder* recorder = nullptr) const override {
    return final_norm(parameters, hidden, recorder);
  }
  torch::Tensor next_tokens(const Batch& batch) const override;
  std::string token_embedding() const override { return "model.embed_tokens.weight"; }
  // transformers may store a tied head anyway, and rotary buffers in old checkpoints.
  bool ignores(const std::string& name) const override {
    return (name == "lm_head.weight" && config_.tie_word_embeddings) || name.find("rotary_emb.inv_freq") != std::string::npos;
  }
  std::string model_type() const override { return config_.model_type; }
  std::vector<std::string> unknown_config_keys() const override { return config_.unknown_keys; }

  // What `init` fills the norms' scales with: 1 for w, 0 for (1 + w), so that a fresh norm is
  // the identity's scale either way.
  virtual double initial_norm_scale() const { return 1.0; }
  // Layer i's tensors (names and shapes), in layout order.
  virtual std::vector<TensorInfo> layer_layout(long long layer) const;
  // [N, T] token ids -> [N, T, H] hidden states. `pad` is the padding row as input_ids index the
  // embedding (-1: none): it takes no gradient. With a recorder the embedding's rows are a leaf
  // that requires grad, recorded for the embedding's per-sample gradients.
  virtual torch::Tensor embed(const Parameters& parameters, const torch::Tensor& input_ids, int64_t pad,
                              GradientRecorder* recorder = nullptr) const;
  // One decoder layer on [N, T, H]; `attention_mask` [N, T] marks real tokens (right padding).
  // With a recorder (and `hidden` requiring grad) every parameter use is recorded.
  virtual torch::Tensor block(long long index, const Parameters& parameters, const torch::Tensor& hidden,
                              const torch::Tensor& attention_mask, GradientRecorder* recorder = nullptr) const;
  // The final norm: [N, T, H] -> [N, T, H].
  virtual torch::Tensor final_norm(const Parameters& parameters, const torch::Tensor& hidden, GradientRecorder* recorder = nullptr) const;
  // Final norm and the language-model head: [N, T, H] -> [N, T, V] logits (soft-capped when the
  // family caps them).
  torch::Tensor head(const Parameters& parameters, const torch::Tensor& hidden, GradientRecorder* recorder = nullptr) const;
  // The tensor the head multiplies by: lm_head.weight, or the embedding when tied.
  std::string head_name() const;
  // All of it, with every parameter in `parameters`.
  torch::Tensor forward(const Parameters& parameters, const TokenBatch& batch) const;

 protected:
  // "model.layers.<i>."
  static std::string layer_prefix(long long layer);
  // The attention block's tensors (q, k, v, o and their biases) under `prefix` ("...self_attn.").
  std::vector<TensorInfo> attention_layout(const std::string& prefix, bool qkv_bias, bool o_bias) const;
  // The gated MLP's tensors (gate, up, down) under `prefix` ("...mlp.").
  std::vector<TensorInfo> mlp_layout(const std::string& prefix, bool bias) const;
  // RMSNorm computed in float32 as transformers does; `plus_one` scales by (1 + w) (Gemma).
  torch::Tensor norm(const Parameters& parameters, const std::string& name, const torch::Tensor& x, GradientRecorder* recorder,
                     bool plus_one = false) const;
  // Multi-head attention with grouped keys and values, rotary positions, a causal mask that also
  // hides padding keys, and the options above: [N, T, H] -> [N, T, H].
  torch::Tensor attention(const std::string& prefix, const Parameters& parameters, const torch::Tensor& x,
                          const torch::Tensor& attention_mask, const AttentionOptions& options, GradientRecorder* recorder) const;
  // down(act(gate(x)) * up(x)).
  torch::Tensor gated_mlp(const std::string& prefix, const Parameters& parameters, const torch::Tensor& x, Activation activation,
                          bool bias, GradientRecorder* recorder) const;
  // The Llama layer's attention options for layer `index`: the config's biases. A family whose
  // attention differs only in its options (qwen3's q/k norms) overrides this, not the layer.
  virtual AttentionOptions attention_options(long long index) const;
  // Refuses sequences longer than config().sliding_window (when set).
  void check_window(long long length) const;
  // The head's product with the normed hidden states, recorded for the head's per-sample gradients.
  torch::Tensor head_logits(const Parameters& parameters, const torch::Tensor& normed, GradientRecorder* recorder) const;
  // Gemma 2 soft-caps its logits (0: no cap).
  void set_final_softcap(double softcap) { vocabulary_head_.softcap = softcap; }

 private:
  // cos and sin [T, head_dim] for positions 0..T-1, in the dtype and on the device of `like`.
  std::pair<torch::Tensor, torch::Tensor> rotary(long long length, const torch::Tensor& like) const;

  DecoderConfig config_;
  VocabularyHead vocabulary_head_;
  torch::Tensor inverse_frequencies_;  // [head_dim / 2], float32 on the CPU
};

// The decoder a directory's config.json names (any registered family), or an InputError naming
// the directory when the model there is not a decoder.
std::unique_ptr<Decoder> open_decoder(const std::string& directory, bool strict_config = false);
// The same from a config file's text alone (`init`): a layout and its math, no checkpoint.
std::unique_ptr<Decoder> decoder_from_config(const std::string& text, const std::string& path, bool strict_config = false);

// Reads the tensors of `names` from the model directory as `dtype` on `device`, checking every
// tensor of the layout against the checkpoint first: all missing, extra and misshapen tensors are
// listed in one InputError.
Parameters read_decoder_parameters(const Decoder& decoder, const std::vector<std::string>& names, torch::ScalarType dtype,
                                   const torch::Device& device);
// The checkpoint against the layout, without reading data.
void check_decoder_checkpoint(const Decoder& decoder);

// Mean cross-entropy over each sample's target tokens (labels shifted by one): [N].
torch::Tensor per_sample_losses(const torch::Tensor& logits, const torch::Tensor& labels);
// Correct next-token predictions and target tokens, summed over the batch.
std::pair<long long, long long> token_hits(const torch::Tensor& logits, const torch::Tensor& labels);
// softcap * tanh(x / softcap) (Gemma's soft-capping of scores and logits).
torch::Tensor soft_cap(const torch::Tensor& x, double softcap);

}  // namespace gradfix
