// Qwen3: the Llama layer with an RMSNorm over each head of the queries and of the keys before the
// rotation (q_norm, k_norm: [head_dim] each, shared by the heads), and biases on q, k, v and o
// only when attention_bias is set (Qwen3 releases have none).
#include "decoder.hpp"

namespace gradfix {
namespace {

class Qwen3 final : public Decoder {
 public:
  explicit Qwen3(DecoderConfig config) : Decoder(std::move(config)) {}

  std::vector<TensorInfo> layer_layout(long long layer) const override {
    std::vector<TensorInfo> out = Decoder::layer_layout(layer);
    const std::string prefix = layer_prefix(layer) + "self_attn.";
    out.push_back({prefix + "q_norm.weight", DType::kF32, {config().head_dim}});
    out.push_back({prefix + "k_norm.weight", DType::kF32, {config().head_dim}});
    return out;
  }

  AttentionOptions attention_options(long long index) const override {
    AttentionOptions options = Decoder::attention_options(index);
    options.q_norm = layer_prefix(index) + "self_attn.q_norm.weight";
    options.k_norm = layer_prefix(index) + "self_attn.k_norm.weight";
    return options;
  }
};

DecoderConfig read_qwen3_config(const ModelConfigSource& source) {
  DecoderConfigReader reader(source);
  DecoderConfig config = read_common_decoder_config(reader, source.directory);
  reader.expect_one_of("hidden_act", {"silu"}, "Qwen3's SwiGLU MLP uses silu");
  config.qkv_bias = config.o_bias = reader.boolean_or("attention_bias", false);
  read_refused_sliding_window(reader, config, false);
  reader.finish(config);
  return config;
}

const ArchitectureRegistration kQwen3({"qwen3"}, ModelInputs::kTokens, [](const ModelConfigSource& source) {
  return std::unique_ptr<LayeredModel>(new Qwen3(read_qwen3_config(source)));
});

}  // namespace
}  // namespace gradfix
