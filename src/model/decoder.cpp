// The Llama family of decoders (llama, mistral, qwen2) from Hugging Face model directories. The
// math follows transformers' reference implementation: RMSNorm computed in float32, rotary
// embeddings on the two halves of each head (rotate_half), grouped-query attention with a causal
// mask and right padding, a SwiGLU MLP, and the head tied to the embedding when configured.
#include "decoder.hpp"

#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "gradfix/core/error.hpp"

namespace gradfix {
namespace {

using Json = nlohmann::json;

constexpr double kPi = 3.14159265358979323846;

// Keys that do not change the forward or backward math: ids, dtypes, bookkeeping, generation
// defaults that older transformers versions saved into config.json.
const std::set<std::string> kHarmlessKeys = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "attention_dropout", "max_window_layers", "pretraining_tp",
    "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class", "max_length", "min_length",
    "do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "num_return_sequences", "early_stopping", "chunk_size_feed_forward", "is_decoder",
    "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder", "problem_type", "id2label", "label2id",
    "task_specific_params", "prefix", "sep_token_id", "decoder_start_token_id", "bad_words_ids", "diversity_penalty",
    "num_beam_groups", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "typical_p", "encoder_no_repeat_ngram_size",
    "finetuning_task", "torchscript", "tf_legacy_loss", "use_bfloat16", "pruned_heads", "cross_attention_hidden_size",
    "output_scores", "return_dict_in_generate", "keys_to_ignore_at_inference"};

[[noreturn]] void unsupported(const std::string& path, const std::string& key, const Json& value, const std::string& why) {
  throw InputError(path + ": \"" + key + "\": " + value.dump() + " is not supported: " + why);
}

long long positive_integer(const Json& config, const std::string& path, const std::string& key) {
  if (!config.contains(key)) throw InputError(path + ": \"" + key + "\" is missing");
  const Json& value = config.at(key);
  if (!value.is_number_integer() || value.get<long long>() < 1 || value.get<long long>() > (1LL << 40))
    throw InputError(path + ": \"" + key + "\" must be a positive integer, got " + value.dump());
  return value.get<long long>();
}

double positive_number(const Json& value, const std::string& path, const std::string& key) {
  if (!value.is_number() || !(value.get<double>() > 0.0) || !std::isfinite(value.get<double>()))
    throw InputError(path + ": \"" + key + "\" must be a positive number, got " + value.dump());
  return value.get<double>();
}

bool boolean(const Json& config, const std::string& path, const std::string& key, bool fallback) {
  if (!config.contains(key) || config.at(key).is_null()) return fallback;
  if (!config.at(key).is_boolean()) throw InputError(path + ": \"" + key + "\" must be true or false, got " + config.at(key).dump());
  return config.at(key).get<bool>();
}

// rope_scaling (transformers 4) or rope_parameters (transformers 5): default or llama3.
void read_rope(const Json& rope, const std::string& path, const std::string& key, DecoderConfig& out) {
  if (rope.is_null()) return;
  if (!rope.is_object()) unsupported(path, key, rope, "expected an object");
  for (const auto& [name, value] : rope.items()) {
    const std::string where = key + "." + name;
    if (name == "rope_type" || name == "type") {
      const std::string type = value.is_string() ? value.get<std::string>() : "";
      if (type != "default" && type != "llama3") unsupported(path, where, value, "gradfix implements the default and llama3 rotary types");
      out.rope.type = type;
    } else if (name == "rope_theta") {
      out.rope_theta = positive_number(value, path, where);
    } else if (name == "factor") {
      out.rope.factor = positive_number(value, path, where);
    } else if (name == "low_freq_factor") {
      out.rope.low_freq_factor = positive_number(value, path, where);
    } else if (name == "high_freq_factor") {
      out.rope.high_freq_factor = positive_number(value, path, where);
    } else if (name == "original_max_position_embeddings") {
      if (!value.is_number_integer() || value.get<long long>() < 1) unsupported(path, where, value, "expected a positive integer");
      out.rope.original_max_position_embeddings = value.get<long long>();
    } else if (name == "partial_rotary_factor") {
      if (!value.is_number() || value.get<double>() != 1.0) unsupported(path, where, value, "only 1.0 (rotation of the whole head)");
    } else {
      unsupported(path, where, value, "unknown rotary parameter");
    }
  }
  if (out.rope.type == "llama3") {
    if (out.rope.original_max_position_embeddings == 0) out.rope.original_max_position_embeddings = out.max_position_embeddings;
    if (!(out.rope.high_freq_factor > out.rope.low_freq_factor))
      unsupported(path, key, rope, "llama3 needs high_freq_factor > low_freq_factor");
  }
}

torch::Tensor rms_norm(const Parameters& p, const std::string& weight_name, const torch::Tensor& x, double eps,
                       GradientRecorder* recorder) {
  const torch::Tensor wide = x.to(torch::kFloat32);
  const torch::Tensor normed = (wide * torch::rsqrt(wide.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
  torch::Tensor out = p.at(weight_name) * normed;
  if (recorder != nullptr && out.requires_grad()) {
    out.retain_grad();
    recorder->add({weight_name, Capture::Kind::kScale, normed.detach(), out});
  }
  return out;
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  const long long half = x.size(-1) / 2;
  return torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

}  // namespace


DecoderConfig read_decoder_config(const std::string& directory) {
  const std::string path = directory + "/config.json";
  DecoderConfig out = parse_decoder_config(read_config_text(path), path);
  out.directory = directory;
  return out;
}


DecoderConfig parse_decoder_config(const std::string& text, const std::string& path) {
  Json config;
  try {
    config = Json::parse(text, nullptr, true, false);
  } catch (const Json::exception& error) {
    throw InputError(path + ": not valid JSON: " + error.what());
  }
  if (!config.is_object()) throw InputError(path + ": expected a JSON object");
  DecoderConfig out;
  if (!config.contains("model_type") || !config.at("model_type").is_string())
    throw InputError(path + ": \"model_type\" is missing; gradfix reads llama, mistral and qwen2 decoders");
  out.model_type = config.at("model_type").get<std::string>();
  if (out.model_type != "llama" && out.model_type != "mistral" && out.model_type != "qwen2")
    unsupported(path, "model_type", config.at("model_type"), "gradfix reads llama, mistral and qwen2 decoders");
  if (config.contains("architectures") && config.at("architectures").is_array())
    for (const auto& name : config.at("architectures"))
      if (!name.is_string() || name.get<std::string>().find("ForCausalLM") == std::string::npos)
        unsupported(path, "architectures", config.at("architectures"), "only the *ForCausalLM heads are implemented");

  out.vocab_size = positive_integer(config, path, "vocab_size");
  out.hidden_size = positive_integer(config, path, "hidden_size");
  out.intermediate_size = positive_integer(config, path, "intermediate_size");
  out.layers = positive_integer(config, path, "num_hidden_layers");
  out.heads = positive_integer(config, path, "num_attention_heads");
  out.kv_heads = config.contains("num_key_value_heads") && !config.at("num_key_value_heads").is_null()
                     ? positive_integer(config, path, "num_key_value_heads")
                     : out.heads;
  if (out.heads % out.kv_heads != 0)
    throw InputError(path + ": num_attention_heads " + std::to_string(out.heads) + " is not a multiple of num_key_value_heads " +
                     std::to_string(out.kv_heads));
  if (config.contains("head_dim") && !config.at("head_dim").is_null()) {
    out.head_dim = positive_integer(config, path, "head_dim");
  } else {
    if (out.hidden_size % out.heads != 0)
      throw InputError(path + ": hidden_size " + std::to_string(out.hidden_size) + " is not a multiple of num_attention_heads " +
                       std::to_string(out.heads) + " and no head_dim is given");
    out.head_dim = out.hidden_size / out.heads;
  }
  if (out.head_dim % 2 != 0) throw InputError(path + ": head_dim " + std::to_string(out.head_dim) + " must be even for rotary embeddings");
  out.max_position_embeddings = config.contains("max_position_embeddings") ? positive_integer(config, path, "max_position_embeddings") : 0;
  if (config.contains("rms_norm_eps")) out.rms_norm_eps = positive_number(config.at("rms_norm_eps"), path, "rms_norm_eps");
  if (config.contains("rope_theta")) out.rope_theta = positive_number(config.at("rope_theta"), path, "rope_theta");
  if (config.contains("rope_scaling")) read_rope(config.at("rope_scaling"), path, "rope_scaling", out);
  if (config.contains("rope_parameters")) read_rope(config.at("rope_parameters"), path, "rope_parameters", out);
  out.tie_word_embeddings = boolean(config, path, "tie_word_embeddings", false);
  if (config.contains("hidden_act") && config.at("hidden_act") != "silu")
    unsupported(path, "hidden_act", config.at("hidden_act"), "the SwiGLU MLP of this family uses silu");

  if (out.model_type == "llama") {
    out.qkv_bias = out.o_bias = boolean(config, path, "attention_bias", false);
    out.mlp_bias = boolean(config, path, "mlp_bias", false);
  } else if (out.model_type == "qwen2") {
    out.qkv_bias = true;  // Qwen2 has biases on q, k and v, none on o
  }
  // Sliding-window attention equals full attention for sequences no longer than the window; the
  // executor refuses longer ones.
  const bool window_enabled = out.model_type == "mistral" || boolean(config, path, "use_sliding_window", false);
  if (config.contains("layer_types") && config.at("layer_types").is_array())
    for (const auto& type : config.at("layer_types"))
      if (type != "full_attention" && type != "sliding_attention")
        unsupported(path, "layer_types", config.at("layer_types"), "full_attention and sliding_attention layers only");
  bool sliding_layers = false;
  if (config.contains("layer_types") && config.at("layer_types").is_array())
    for (const auto& type : config.at("layer_types")) sliding_layers = sliding_layers || type == "sliding_attention";
  if ((window_enabled || sliding_layers) && config.contains("sliding_window") && !config.at("sliding_window").is_null())
    out.sliding_window = positive_integer(config, path, "sliding_window");

  static const std::set<std::string> kUsed = {
      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
      "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
      "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "use_sliding_window", "sliding_window", "layer_types"};
  for (const auto& [key, value] : config.items()) {
    if (kUsed.count(key) || kHarmlessKeys.count(key) || (!key.empty() && key[0] == '_')) continue;
    if (out.model_type != "llama" && (key == "attention_bias" || key == "mlp_bias")) continue;
    unsupported(path, key, value, "gradfix does not know this key of a " + out.model_type +
                                      " config, and it may change the model's math (docs/models.md lists the keys read)");
  }
  if (out.model_type != "llama") {
    for (const char* key : {"attention_bias", "mlp_bias"})
      if (config.contains(key) && config.at(key) == true)
        unsupported(path, key, config.at(key), out.model_type + " has no such option in transformers");
  }

  return out;
}

std::vector<std::string> layer_parameter_names(const DecoderConfig& c, long long layer) {
  const std::string prefix = "model.layers." + std::to_string(layer) + ".";
  std::vector<std::string> names = {prefix + "input_layernorm.weight"};
  for (const char* projection : {"q_proj", "k_proj", "v_proj"}) {
    names.push_back(prefix + "self_attn." + projection + ".weight");
    if (c.qkv_bias) names.push_back(prefix + "self_attn." + projection + ".bias");
  }
  names.push_back(prefix + "self_attn.o_proj.weight");
  if (c.o_bias) names.push_back(prefix + "self_attn.o_proj.bias");
  names.push_back(prefix + "post_attention_layernorm.weight");
  for (const char* projection : {"gate_proj", "up_proj", "down_proj"}) {
    names.push_back(prefix + "mlp." + projection + ".weight");
    if (c.mlp_bias) names.push_back(prefix + "mlp." + projection + ".bias");
  }
  return names;
}

std::vector<TensorInfo> decoder_layout(const DecoderConfig& c) {
  std::vector<TensorInfo> layout = {{"model.embed_tokens.weight", DType::kF32, {c.vocab_size, c.hidden_size}}};
  const long long q = c.heads * c.head_dim, kv = c.kv_heads * c.head_dim, h = c.hidden_size, m = c.intermediate_size;
  for (long long i = 0; i < c.layers; ++i) {
    for (const auto& name : layer_parameter_names(c, i)) {
      std::vector<long long> shape;
      auto ends = [&](const std::string& tail) { return name.size() >= tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0; };
      if (ends("layernorm.weight")) shape = std::vector<long long>{h};
      else if (ends("q_proj.weight")) shape = std::vector<long long>{q, h};
      else if (ends("q_proj.bias")) shape = std::vector<long long>{q};
      else if (ends("k_proj.weight") || ends("v_proj.weight")) shape = std::vector<long long>{kv, h};
      else if (ends("k_proj.bias") || ends("v_proj.bias")) shape = std::vector<long long>{kv};
      else if (ends("o_proj.weight")) shape = std::vector<long long>{h, q};
      else if (ends("o_proj.bias") || ends("down_proj.bias")) shape = std::vector<long long>{h};
      else if (ends("gate_proj.weight") || ends("up_proj.weight")) shape = std::vector<long long>{m, h};
      else if (ends("gate_proj.bias") || ends("up_proj.bias")) shape = std::vector<long long>{m};
      else if (ends("down_proj.weight")) shape = std::vector<long long>{h, m};
      GRADFIX_CHECK(!shape.empty(), "no shape for " + name);
      layout.push_back({name, DType::kF32, shape});
    }
  }
  layout.push_back({"model.norm.weight", DType::kF32, {h}});
  if (!c.tie_word_embeddings) layout.push_back({"lm_head.weight", DType::kF32, {c.vocab_size, h}});
  return layout;
}

void check_decoder_checkpoint(const DecoderConfig& config) { check_against_model(*open_reader(config.directory), Decoder(config), false); }

Parameters read_decoder_parameters(const DecoderConfig& config, const std::vector<std::string>& names, torch::ScalarType dtype,
                                   const torch::Device& device) {
  check_decoder_checkpoint(config);
  const auto reader = open_reader(config.directory);
  Parameters parameters;
  for (const auto& name : names) {
    const TensorInfo& info = reader->info(name);
    const std::vector<float> values = reader->read_f32(name);
    const std::vector<int64_t> shape(info.shape.begin(), info.shape.end());
    parameters[name] = torch::from_blob(const_cast<float*>(values.data()), shape, torch::kFloat32).to(device, dtype, false, true);
  }
  return parameters;
}

SampleSource token_samples(const TokenData& data) {
  // The source holds a pointer to `data`, which outlives every use in a job.
  const TokenData* held = &data;
  return {data.samples, data.source, [held](const std::vector<long long>& indices, const torch::Device& device) {
            const TokenBatch batch = token_batch(held->subset(indices), device);
            return Batch{batch.input_ids, batch.labels, batch.attention_mask};
          }};
}

TokenBatch token_batch(const TokenData& data, const torch::Device& device) {
  auto tensor = [&](const std::vector<long long>& values) {
    return torch::from_blob(const_cast<long long*>(values.data()), {data.samples, data.length}, torch::kInt64).to(device, false, true);
  };
  return {tensor(data.input_ids), tensor(data.labels), tensor(data.attention_mask)};
}

Decoder::Decoder(DecoderConfig config) : config_(std::move(config)) {
  const long long half = config_.head_dim / 2;
  std::vector<double> inverse(static_cast<std::size_t>(half));
  for (long long i = 0; i < half; ++i)
    inverse[static_cast<std::size_t>(i)] = 1.0 / std::pow(config_.rope_theta, static_cast<double>(2 * i) / static_cast<double>(config_.head_dim));
  if (config_.rope.type == "llama3") {
    // Llama 3.1's frequency-dependent scaling: long wavelengths are divided by the factor, short
    // ones kept, and the band between them interpolated smoothly.
    const RopeScaling& r = config_.rope;
    const double old_context = static_cast<double>(r.original_max_position_embeddings);
    const double low_wavelength = old_context / r.low_freq_factor, high_wavelength = old_context / r.high_freq_factor;
    for (auto& frequency : inverse) {
      const double wavelength = 2.0 * kPi / frequency;
      double scaled = wavelength > low_wavelength ? frequency / r.factor : frequency;
      const bool medium = !(wavelength < high_wavelength) && !(wavelength > low_wavelength);
      if (medium) {
        const double smooth = (old_context / wavelength - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        scaled = (1.0 - smooth) * scaled / r.factor + smooth * scaled;
      }
      frequency = scaled;
    }
  }
  // transformers keeps the inverse frequencies in float32.
  std::vector<float> narrow(inverse.begin(), inverse.end());
  inverse_frequencies_ = torch::from_blob(narrow.data(), {half}, torch::kFloat32).clone();
}

std::pair<torch::Tensor, torch::Tensor> Decoder::rotary(long long length, const torch::Tensor& like) const {
  const torch::Tensor positions = torch::arange(static_cast<int64_t>(length), torch::TensorOptions().dtype(torch::kFloat32).device(like.device()));
  const torch::Tensor frequencies = positions.unsqueeze(1) * inverse_frequencies_.to(like.device()).unsqueeze(0);
  const torch::Tensor angles = torch::cat({frequencies, frequencies}, -1);
  return {angles.cos().to(like.scalar_type()), angles.sin().to(like.scalar_type())};
}

torch::Tensor Decoder::embed(const Parameters& parameters, const torch::Tensor& input_ids, GradientRecorder* recorder) const {
  torch::Tensor out = torch::embedding(parameters.at("model.embed_tokens.weight"), input_ids);
  if (recorder != nullptr) {
    out = out.detach().requires_grad_(true);
    recorder->add({"model.embed_tokens.weight", Capture::Kind::kEmbedding, input_ids, out});
  }
  return out;
}

torch::Tensor Decoder::block(long long index, const Parameters& p, const torch::Tensor& hidden, const torch::Tensor& attention_mask,
                             GradientRecorder* recorder) const {
  const DecoderConfig& c = config_;
  const long long n = hidden.size(0), t = hidden.size(1);
  if (c.sliding_window > 0 && t > c.sliding_window)
    throw InputError(c.directory + ": sequences of " + std::to_string(t) + " tokens are longer than the sliding window (" +
                     std::to_string(c.sliding_window) + "); gradfix implements sliding-window attention only where it equals full attention");
  const std::string prefix = "model.layers." + std::to_string(index) + ".";
  const torch::Tensor x = rms_norm(p, prefix + "input_layernorm.weight", hidden, c.rms_norm_eps, recorder);
  // [N, T, heads, d] -> [N, heads, T, d]
  const torch::Tensor q = recorded_linear(p, prefix + "self_attn.q_proj", x, c.qkv_bias, recorder).view({n, t, c.heads, c.head_dim}).transpose(1, 2);
  torch::Tensor k = recorded_linear(p, prefix + "self_attn.k_proj", x, c.qkv_bias, recorder).view({n, t, c.kv_heads, c.head_dim}).transpose(1, 2);
  torch::Tensor v = recorded_linear(p, prefix + "self_attn.v_proj", x, c.qkv_bias, recorder).view({n, t, c.kv_heads, c.head_dim}).transpose(1, 2);
  const auto [cos, sin] = rotary(t, q);
  const torch::Tensor q_rotated = q * cos + rotate_half(q) * sin;
  k = k * cos + rotate_half(k) * sin;
  const long long groups = c.heads / c.kv_heads;
  if (groups > 1) {
    k = k.repeat_interleave(groups, 1);
    v = v.repeat_interleave(groups, 1);
  }
  torch::Tensor scores = torch::matmul(q_rotated, k.transpose(2, 3)) / std::sqrt(static_cast<double>(c.head_dim));
  // Causal, and no attention to padding keys; a query always sees itself or an earlier real token.
  const torch::Tensor causal = torch::ones({t, t}, torch::TensorOptions().dtype(torch::kBool).device(hidden.device())).tril();
  const torch::Tensor allowed = causal.unsqueeze(0).unsqueeze(0) & attention_mask.to(torch::kBool).unsqueeze(1).unsqueeze(2);
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  const torch::Tensor weights = torch::softmax(scores, -1, torch::kFloat32).to(q.scalar_type());
  const torch::Tensor attended = torch::matmul(weights, v).transpose(1, 2).reshape({n, t, c.heads * c.head_dim});
  const torch::Tensor after_attention = hidden + recorded_linear(p, prefix + "self_attn.o_proj", attended, c.o_bias, recorder);
  const torch::Tensor y = rms_norm(p, prefix + "post_attention_layernorm.weight", after_attention, c.rms_norm_eps, recorder);
  const torch::Tensor gated =
      torch::silu(recorded_linear(p, prefix + "mlp.gate_proj", y, c.mlp_bias, recorder)) * recorded_linear(p, prefix + "mlp.up_proj", y, c.mlp_bias, recorder);
  return after_attention + recorded_linear(p, prefix + "mlp.down_proj", gated, c.mlp_bias, recorder);
}

torch::Tensor Decoder::head(const Parameters& p, const torch::Tensor& hidden, GradientRecorder* recorder) const {
  const torch::Tensor normed = rms_norm(p, "model.norm.weight", hidden, config_.rms_norm_eps, recorder);
  // A tied head records its use under the embedding's name: the one stored tensor's per-sample
  // gradient is the sum of both uses.
  torch::Tensor logits = torch::nn::functional::linear(normed, p.at(head_name()));
  if (recorder != nullptr && logits.requires_grad()) {
    logits.retain_grad();
    recorder->add({head_name(), Capture::Kind::kLinearWeight, normed.detach(), logits});
  }
  return logits;
}

std::vector<TensorInfo> Decoder::layout() const { return decoder_layout(config_); }
std::vector<std::string> Decoder::layer_names(long long layer) const { return layer_parameter_names(config_, layer); }
torch::Tensor Decoder::losses(const torch::Tensor& logits, const Batch& batch) const { return per_sample_losses(logits, batch.labels); }
std::pair<long long, long long> Decoder::hits(const torch::Tensor& logits, const Batch& batch) const { return token_hits(logits, batch.labels); }

namespace {
// llama, mistral and qwen2 share these blocks; the config says which options each uses.
const ArchitectureRegistration kLlamaFamily({"llama", "mistral", "qwen2"}, [](const std::string& directory) {
  return std::unique_ptr<LayeredModel>(new Decoder(read_decoder_config(directory)));
});
}  // namespace

std::string Decoder::head_name() const { return config_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight"; }

torch::Tensor Decoder::forward(const Parameters& parameters, const TokenBatch& batch) const {
  torch::Tensor hidden = embed(parameters, batch.input_ids);
  for (long long i = 0; i < config_.layers; ++i) hidden = block(i, parameters, hidden, batch.attention_mask);
  return head(parameters, hidden);
}

torch::Tensor per_sample_losses(const torch::Tensor& logits, const torch::Tensor& labels) {
  const long long n = logits.size(0), t = logits.size(1), v = logits.size(2);
  const torch::Tensor shifted_logits = logits.slice(1, 0, t - 1).reshape({-1, v});
  const torch::Tensor shifted_labels = labels.slice(1, 1).reshape({-1});
  const torch::Tensor token_losses = torch::nn::functional::cross_entropy(
      shifted_logits, shifted_labels,
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone).ignore_index(static_cast<int64_t>(kIgnoredLabel))).view({n, t - 1});
  const torch::Tensor counts = shifted_labels.view({n, t - 1}).ne(static_cast<int64_t>(kIgnoredLabel)).sum(1).to(token_losses.scalar_type());
  return token_losses.sum(1) / counts;
}

std::pair<long long, long long> token_hits(const torch::Tensor& logits, const torch::Tensor& labels) {
  const long long t = logits.size(1);
  const torch::Tensor predicted = logits.slice(1, 0, t - 1).argmax(-1);
  const torch::Tensor target = labels.slice(1, 1);
  const torch::Tensor counted = target.ne(static_cast<int64_t>(kIgnoredLabel));
  return {predicted.eq(target).logical_and(counted).sum().item<int64_t>(), counted.sum().item<int64_t>()};
}

}  // namespace gradfix
