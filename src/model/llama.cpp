// The Llama family: llama, mistral and qwen2 share the Llama layer (decoder.hpp) and differ only
// in which projections carry biases and in when attention slides. This file reads those keys and
// registers the three model types.
#include "decoder.hpp"

namespace gradfix {
namespace {

DecoderConfig read_llama_family_config(const ModelConfigSource& source) {
  DecoderConfigReader reader(source);
  DecoderConfig config = read_common_decoder_config(reader, source.directory);
  reader.expect_one_of("hidden_act", {"silu"}, "the SwiGLU MLP of this family uses silu");
  if (config.model_type == "llama") {
    config.qkv_bias = config.o_bias = reader.boolean_or("attention_bias", false);
    config.mlp_bias = reader.boolean_or("mlp_bias", false);
  } else {
    // mistral and qwen2 have no such options in transformers: false is harmless, true is refused.
    for (const char* key : {"attention_bias", "mlp_bias"})
      if (reader.boolean_or(key, false)) reader.refuse(key, config.model_type + " has no such option in transformers");
    config.qkv_bias = config.model_type == "qwen2";  // Qwen2 has biases on q, k and v, none on o
  }
  read_refused_sliding_window(reader, config, config.model_type == "mistral");
  reader.finish(config);
  return config;
}

const ArchitectureRegistration kLlamaFamily({"llama", "mistral", "qwen2"}, ModelInputs::kTokens, [](const ModelConfigSource& source) {
  return std::unique_ptr<LayeredModel>(new Decoder(read_llama_family_config(source)));
});

}  // namespace
}  // namespace gradfix
