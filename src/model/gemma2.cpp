// Gemma 2: the embedding scaled by sqrt(hidden_size); RMSNorms that scale by (1 + w); four norms
// a layer (before and after attention, before and after the MLP); a GeGLU MLP with the tanh
// approximation of GELU; attention scaled by query_pre_attn_scalar^-1/2 with its scores
// soft-capped; alternate layers attending through a sliding window; the logits soft-capped; the
// head tied to the embedding by default.
#include <cmath>

#include "decoder.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

struct Gemma2Options {
  double query_pre_attn_scalar = 256.0;
  double attn_softcap = 0.0;   // 0: none
  double final_softcap = 0.0;  // 0: none
  long long window = 0;
  std::vector<bool> sliding;   // per layer
};

class Gemma2 final : public Decoder {
 public:
  Gemma2(DecoderConfig config, Gemma2Options options) : Decoder(std::move(config)), options_(std::move(options)) {
    set_final_softcap(options_.final_softcap);
  }

  std::vector<TensorInfo> layer_layout(long long layer) const override {
    const std::string prefix = layer_prefix(layer);
    const long long h = config().hidden_size;
    std::vector<TensorInfo> out = {{prefix + "input_layernorm.weight", DType::kF32, {h}}};
    for (auto& tensor : attention_layout(prefix + "self_attn.", config().qkv_bias, config().o_bias)) out.push_back(std::move(tensor));
    out.push_back({prefix + "post_attention_layernorm.weight", DType::kF32, {h}});
    out.push_back({prefix + "pre_feedforward_layernorm.weight", DType::kF32, {h}});
    for (auto& tensor : mlp_layout(prefix + "mlp.", false)) out.push_back(std::move(tensor));
    out.push_back({prefix + "post_feedforward_layernorm.weight", DType::kF32, {h}});
    return out;
  }

  double initial_norm_scale() const override { return 0.0; }

  torch::Tensor embed(const Parameters& parameters, const torch::Tensor& input_ids, int64_t pad, GradientRecorder* recorder) const override {
    // transformers keeps the scale as a float32 scalar and casts it to the weights' dtype.
    const torch::Tensor embedded = Decoder::embed(parameters, input_ids, pad, recorder);
    const torch::Tensor scale = torch::tensor(static_cast<float>(std::sqrt(static_cast<double>(config().hidden_size)))).to(embedded.scalar_type());
    return embedded * scale.to(embedded.device());
  }

  torch::Tensor block(long long index, const Parameters& p, const torch::Tensor& hidden, const torch::Tensor& attention_mask,
                      GradientRecorder* recorder) const override {
    const std::string prefix = layer_prefix(index);
    AttentionOptions attention_options;
    attention_options.qkv_bias = attention_options.o_bias = config().qkv_bias;
    attention_options.scale = 1.0 / std::sqrt(options_.query_pre_attn_scalar);
    attention_options.softcap = options_.attn_softcap;
    attention_options.window = options_.sliding[static_cast<std::size_t>(index)] ? options_.window : 0;
    const torch::Tensor x = norm(p, prefix + "input_layernorm.weight", hidden, recorder, true);
    const torch::Tensor attended = attention(prefix + "self_attn.", p, x, attention_mask, attention_options, recorder);
    const torch::Tensor after_attention = hidden + norm(p, prefix + "post_attention_layernorm.weight", attended, recorder, true);
    const torch::Tensor y = norm(p, prefix + "pre_feedforward_layernorm.weight", after_attention, recorder, true);
    const torch::Tensor mlp = gated_mlp(prefix + "mlp.", p, y, Activation::kGeluTanh, false, recorder);
    return after_attention + norm(p, prefix + "post_feedforward_layernorm.weight", mlp, recorder, true);
  }

  torch::Tensor final_norm(const Parameters& p, const torch::Tensor& hidden, GradientRecorder* recorder) const override {
    return norm(p, "model.norm.weight", hidden, recorder, true);
  }

 private:
  Gemma2Options options_;
};

std::unique_ptr<LayeredModel> read_gemma2(const ModelConfigSource& source) {
  DecoderConfigReader reader(source);
  DecoderConfig config = read_common_decoder_config(reader, source.directory);
  config.tie_word_embeddings = reader.boolean_or("tie_word_embeddings", true);
  reader.expect_one_of("hidden_activation", {"gelu_pytorch_tanh"}, "Gemma 2's GeGLU MLP uses gelu_pytorch_tanh");
  // transformers' Gemma 2 reads hidden_activation only; hidden_act is kept in its configs unread.
  reader.ignore({"hidden_act"});
  config.qkv_bias = config.o_bias = reader.boolean_or("attention_bias", false);
  if (reader.boolean_or("use_bidirectional_attention", false))
    reader.refuse("use_bidirectional_attention", "gradfix implements Gemma 2 as a causal language model");
  Gemma2Options options;
  options.query_pre_attn_scalar = reader.positive_number_or("query_pre_attn_scalar", 256.0);
  options.attn_softcap = reader.optional_positive_number("attn_logit_softcapping");
  options.final_softcap = reader.optional_positive_number("final_logit_softcapping");
  options.window = reader.positive_integer_or("sliding_window", 0);
  // transformers' default when the config lists no layer types: even layers slide.
  std::vector<std::string> types = reader.texts("layer_types");
  if (types.empty())
    for (long long i = 0; i < config.layers; ++i) types.push_back(i % 2 == 0 ? "sliding_attention" : "full_attention");
  if (static_cast<long long>(types.size()) != config.layers)
    reader.refuse("layer_types", "it lists " + std::to_string(types.size()) + " layers, num_hidden_layers is " + std::to_string(config.layers));
  for (const auto& type : types) {
    if (type != "full_attention" && type != "sliding_attention") reader.refuse("layer_types", "full_attention and sliding_attention layers only");
    options.sliding.push_back(type == "sliding_attention" && options.window > 0);
  }
  // A key-value cache layout for generation: no effect on one forward pass.
  reader.ignore({"cache_implementation"});
  reader.finish(config);
  return std::unique_ptr<LayeredModel>(new Gemma2(std::move(config), std::move(options)));
}

const ArchitectureRegistration kGemma2({"gemma2"}, ModelInputs::kTokens, read_gemma2);

}  // namespace
}  // namespace gradfix
