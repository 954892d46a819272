// What every decoder family shares: reading a config.json key by key, the Llama layer and its
// pieces, the head and the per-sample losses. The math follows transformers' reference
// implementation: RMSNorm computed in float32, rotary embeddings on the two halves of each head
// (rotate_half), grouped-query attention with a causal mask and right padding, a gated MLP, and
// the head tied to the embedding when configured. The families are llama.cpp, qwen3.cpp and
// gemma2.cpp.
#include "decoder.hpp"

#include <cmath>
#include <cstdlib>
#include <limits>

#include "gradfix/io/model_files.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

using Json = nlohmann::json;

constexpr double kPi = 3.14159265358979323846;

// Keys known not to change the forward or backward math: token ids, dtypes, bookkeeping,
// generation defaults that older transformers versions saved into config.json, and flags of
// other tools that transformers does not read for these families (nanotron's is_llama_config).
const std::set<std::string> kHarmlessKeys = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "attention_dropout", "max_window_layers", "pretraining_tp",
    "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class", "max_length", "min_length",
    "do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "num_return_sequences", "early_stopping", "chunk_size_feed_forward", "is_decoder",
    "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder", "problem_type", "id2label", "label2id",
    "task_specific_params", "prefix", "sep_token_id", "decoder_start_token_id", "bad_words_ids", "diversity_penalty",
    "num_beam_groups", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "typical_p", "encoder_no_repeat_ngram_size",
    "finetuning_task", "torchscript", "tf_legacy_loss", "use_bfloat16", "pruned_heads", "cross_attention_hidden_size",
    "output_scores", "return_dict_in_generate", "keys_to_ignore_at_inference", "is_llama_config", "cache_implementation",
    "max_new_tokens", "transformers.js_config", "output_router_logits", "router_aux_loss_coef", "embd_pdrop", "resid_pdrop"};

// Keys known to change the math where a family does not read them: other families' features,
// mixtures of experts, quantization, scaled residuals. Null or false turns each of them off, so
// only a set value is refused.
const std::set<std::string> kMathKeys = {
    "attention_bias", "mlp_bias", "hidden_act", "hidden_activation", "head_dim", "partial_rotary_factor", "rotary_pct",
    "rope_interleaved", "use_mrope", "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window", "layer_types",
    "sliding_window_pattern", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "use_qk_norm",
    "qk_layernorm", "quantization_config", "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "embedding_multiplier",
    "logits_scaling", "residual_multiplier", "attention_multiplier", "use_parallel_residual", "layer_norm_eps", "norm_eps",
    "no_rope_layers", "attention_chunk_size", "use_bidirectional_attention", "scale_embedding", "embed_scale",
    "tie_word_embeddings", "rms_norm_eps", "rope_theta", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "attn_implementation"};

[[noreturn]] void unsupported(const std::string& path, const std::string& key, const Json& value, const std::string& why) {
  throw InputError(path + ": \"" + key + "\": " + value.dump() + " is not supported: " + why);
}

double positive_number(const Json& value, const std::string& path, const std::string& key) {
  if (!value.is_number() || !(value.get<double>() > 0.0) || !std::isfinite(value.get<double>()))
    throw InputError(path + ": \"" + key + "\" must be a positive number, got " + value.dump());
  return value.get<double>();
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  const long long half = x.size(-1) / 2;
  return torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

}  // namespace

DecoderConfigReader::DecoderConfigReader(const ModelConfigSource& source) : DecoderConfigReader(source.text, source.path, source.strict) {}

DecoderConfigReader::DecoderConfigReader(const std::string& text, std::string path, bool strict) : path_(std::move(path)), strict_(strict) {
  try {
    config_ = Json::parse(text, nullptr, true, false);
  } catch (const Json::exception& error) {
    throw InputError(path_ + ": not valid JSON: " + escaped_name(error.what()));
  }
  if (!config_.is_object()) throw InputError(path_ + ": expected a JSON object");
  if (!config_.contains("model_type") || !config_.at("model_type").is_string()) throw InputError(path_ + ": \"model_type\" is missing");
  model_type_ = config_.at("model_type").get<std::string>();
  read_.insert("model_type");
}

const Json& DecoderConfigReader::value(const std::string& key) {
  read_.insert(key);
  return config_.at(key);
}

bool DecoderConfigReader::has(const std::string& key) const { return config_.contains(key) && !config_.at(key).is_null(); }

long long DecoderConfigReader::positive_integer(const std::string& key) {
  read_.insert(key);
  if (!config_.contains(key)) throw InputError(path_ + ": \"" + key + "\" is missing");
  const Json& v = config_.at(key);
  if (!v.is_number_integer() || v.get<long long>() < 1 || v.get<long long>() > (1LL << 40))
    throw InputError(path_ + ": \"" + key + "\" must be a positive integer, got " + v.dump());
  return v.get<long long>();
}

long long DecoderConfigReader::positive_integer_or(const std::string& key, long long fallback) {
  read_.insert(key);
  return has(key) ? positive_integer(key) : fallback;
}

long long DecoderConfigReader::integer_or(const std::string& key, long long fallback) {
  read_.insert(key);
  if (!has(key)) return fallback;
  const Json& v = config_.at(key);
  if (!v.is_number_integer() || std::llabs(v.get<long long>()) > (1LL << 40)) throw InputError(path_ + ": \"" + key + "\" must be an integer, got " + v.dump());
  return v.get<long long>();
}

double DecoderConfigReader::positive_number_or(const std::string& key, double fallback) {
  read_.insert(key);
  return config_.contains(key) ? positive_number(config_.at(key), path_, key) : fallback;
}

double DecoderConfigReader::optional_positive_number(const std::string& key) {
  read_.insert(key);
  return has(key) ? positive_number(config_.at(key), path_, key) : 0.0;
}

bool DecoderConfigReader::boolean_or(const std::string& key, bool fallback) {
  read_.insert(key);
  if (!has(key)) return fallback;
  if (!config_.at(key).is_boolean()) throw InputError(path_ + ": \"" + key + "\" must be true or false, got " + config_.at(key).dump());
  return config_.at(key).get<bool>();
}

std::string DecoderConfigReader::text_or(const std::string& key, const std::string& fallback) {
  read_.insert(key);
  if (!has(key)) return fallback;
  if (!config_.at(key).is_string()) throw InputError(path_ + ": \"" + key + "\" must be a string, got " + config_.at(key).dump());
  return config_.at(key).get<std::string>();
}

std::vector<std::string> DecoderConfigReader::texts(const std::string& key) {
  read_.insert(key);
  std::vector<std::string> out;
  if (!has(key)) return out;
  const Json& v = config_.at(key);
  if (!v.is_array()) throw InputError(path_ + ": \"" + key + "\" must be an array of strings, got " + v.dump());
  for (const auto& item : v) {
    if (!item.is_string()) throw InputError(path_ + ": \"" + key + "\" must be an array of strings, got " + v.dump());
    out.push_back(item.get<std::string>());
  }
  return out;
}

void DecoderConfigReader::expect_one_of(const std::string& key, const std::vector<std::string>& allowed, const std::string& why) {
  read_.insert(key);
  if (!has(key)) return;
  for (const auto& value : allowed)
    if (config_.at(key) == value) return;
  refuse(key, why);
}

void DecoderConfigReader::ignore(const std::vector<std::string>& keys) { read_.insert(keys.begin(), keys.end()); }

void DecoderConfigReader::refuse(const std::string& key, const std::string& why) const {
  unsupported(path_, key, config_.contains(key) ? config_.at(key) : Json(), why);
}

void DecoderConfigReader::finish(DecoderConfig& config) const {
  config.unknown_keys.clear();
  for (const auto& [key, v] : config_.items()) {
    if (read_.count(key) || kHarmlessKeys.count(key) || (!key.empty() && key[0] == '_')) continue;
    if (kMathKeys.count(key)) {
      if (v.is_null() || v == false) continue;
      unsupported(path_, key, v, "this key changes the model's math, and gradfix does not implement it for a " + model_type_ +
                                     " config (docs/models.md lists the keys by class)");
    }
    if (strict_)
      unsupported(path_, key, v, "gradfix does not know this key of a " + model_type_ +
                                     " config, and --strict-config refuses unknown keys (without it they are named in a notice and taken "
                                     "not to change the math)");
    config.unknown_keys.push_back(key);
  }
}

void DecoderConfigReader::read_rope(DecoderConfig& out) {
  if (config_.contains("rope_theta")) out.rope_theta = positive_number(value("rope_theta"), path_, "rope_theta");
  if (config_.contains("rope_scaling")) read_rope_object(value("rope_scaling"), "rope_scaling", out);
  if (config_.contains("rope_parameters")) read_rope_object(value("rope_parameters"), "rope_parameters", out);
}

// rope_scaling (transformers 4) or rope_parameters (transformers 5): default or llama3.
void DecoderConfigReader::read_rope_object(const Json& rope, const std::string& key, DecoderConfig& out) {
  const std::string& path = path_;
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

DecoderConfig read_common_decoder_config(DecoderConfigReader& reader, const std::string& directory) {
  DecoderConfig out;
  out.directory = directory;
  out.model_type = reader.model_type();
  for (const auto& name : reader.texts("architectures"))
    if (name.find("ForCausalLM") == std::string::npos) reader.refuse("architectures", "only the *ForCausalLM heads are implemented");
  out.vocab_size = reader.positive_integer("vocab_size");
  out.hidden_size = reader.positive_integer("hidden_size");
  out.intermediate_size = reader.positive_integer("intermediate_size");
  out.layers = reader.positive_integer("num_hidden_layers");
  out.heads = reader.positive_integer("num_attention_heads");
  out.kv_heads = reader.positive_integer_or("num_key_value_heads", out.heads);
  const std::string& path = reader.path();
  if (out.heads % out.kv_heads != 0)
    throw InputError(path + ": num_attention_heads " + std::to_string(out.heads) + " is not a multiple of num_key_value_heads " +
                     std::to_string(out.kv_heads));
  if (reader.has("head_dim")) {
    out.head_dim = reader.positive_integer("head_dim");
  } else {
    reader.ignore({"head_dim"});
    if (out.hidden_size % out.heads != 0)
      throw InputError(path + ": hidden_size " + std::to_string(out.hidden_size) + " is not a multiple of num_attention_heads " +
                       std::to_string(out.heads) + " and no head_dim is given");
    out.head_dim = out.hidden_size / out.heads;
  }
  if (out.head_dim % 2 != 0) throw InputError(path + ": head_dim " + std::to_string(out.head_dim) + " must be even for rotary embeddings");
  out.max_position_embeddings = reader.has("max_position_embeddings") ? reader.positive_integer("max_position_embeddings") : 0;
  reader.ignore({"max_position_embeddings"});
  out.rms_norm_eps = reader.positive_number_or("rms_norm_eps", out.rms_norm_eps);
  reader.read_rope(out);
  out.tie_word_embeddings = reader.boolean_or("tie_word_embeddings", false);
  // A negative padding_idx counts from the end, as torch.nn.Embedding counts it.
  const long long pad = reader.integer_or("pad_token_id", -1 - out.vocab_size);
  if (pad != -1 - out.vocab_size) {
    if (pad >= out.vocab_size || pad < -out.vocab_size)
      throw InputError(path + ": \"pad_token_id\" " + std::to_string(pad) + " is outside the vocabulary of " + std::to_string(out.vocab_size) +
                       " tokens (transformers makes it the embedding's padding_idx)");
    out.pad_token_id = pad < 0 ? pad + out.vocab_size : pad;
  }
  return out;
}

void read_refused_sliding_window(DecoderConfigReader& reader, DecoderConfig& out, bool always_on) {
  // Sliding-window attention equals full attention for sequences no longer than the window; the
  // layer refuses longer ones (check_window).
  const bool window_enabled = always_on || reader.boolean_or("use_sliding_window", false);
  bool sliding_layers = false;
  for (const auto& type : reader.texts("layer_types")) {
    if (type != "full_attention" && type != "sliding_attention")
      reader.refuse("layer_types", "full_attention and sliding_attention layers only");
    sliding_layers = sliding_layers || type == "sliding_attention";
  }
  if ((window_enabled || sliding_layers) && reader.has("sliding_window")) out.sliding_window = reader.positive_integer("sliding_window");
  reader.ignore({"sliding_window"});
}

SampleSource token_samples(const TokenData& data) {
  // The source holds a pointer to `data`, which outlives every use in a job.
  const TokenData* held = &data;
  return {data.samples, data.source, [held](const std::vector<long long>& indices, const torch::Device& device) {
            const TokenBatch batch = token_batch(held->subset(indices), device);
            return Batch{batch.input_ids, batch.labels, batch.attention_mask, torch::Tensor()};
          }};
}

TokenBatch token_batch(const TokenData& data, const torch::Device& device) {
  auto tensor = [&](const std::vector<long long>& values) {
    return torch::from_blob(const_cast<long long*>(values.data()), {data.samples, data.length}, torch::kInt64).to(device, false, true);
  };
  return {tensor(data.input_ids), tensor(data.labels), tensor(data.attention_mask)};
}

Decoder::Decoder(DecoderConfig config) : config_(std::move(config)) {
  vocabulary_head_.weight = head_name();
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

std::string Decoder::layer_prefix(long long layer) { return "model.layers." + std::to_string(layer) + "."; }

std::vector<TensorInfo> Decoder::attention_layout(const std::string& prefix, bool qkv_bias, bool o_bias) const {
  const DecoderConfig& c = config_;
  const long long q = c.heads * c.head_dim, kv = c.kv_heads * c.head_dim, h = c.hidden_size;
  std::vector<TensorInfo> out = {{prefix + "q_proj.weight", DType::kF32, {q, h}}};
  if (qkv_bias) out.push_back({prefix + "q_proj.bias", DType::kF32, {q}});
  for (const char* projection : {"k_proj", "v_proj"}) {
    out.push_back({prefix + projection + ".weight", DType::kF32, {kv, h}});
    if (qkv_bias) out.push_back({prefix + projection + ".bias", DType::kF32, {kv}});
  }
  out.push_back({prefix + "o_proj.weight", DType::kF32, {h, q}});
  if (o_bias) out.push_back({prefix + "o_proj.bias", DType::kF32, {h}});
  return out;
}

std::vector<TensorInfo> Decoder::mlp_layout(const std::string& prefix, bool bias) const {
  const long long h = config_.hidden_size, m = config_.intermediate_size;
  std::vector<TensorInfo> out;
  for (const char* projection : {"gate_proj", "up_proj"}) {
    out.push_back({prefix + projection + ".weight", DType::kF32, {m, h}});
    if (bias) out.push_back({prefix + projection + ".bias", DType::kF32, {m}});
  }
  out.push_back({prefix + "down_proj.weight", DType::kF32, {h, m}});
  if (bias) out.push_back({prefix + "down_proj.bias", DType::kF32, {h}});
  return out;
}

std::vector<TensorInfo> Decoder::layer_layout(long long layer) const {
  const std::string prefix = layer_prefix(layer);
  const long long h = config_.hidden_size;
  std::vector<TensorInfo> out = {{prefix + "input_layernorm.weight", DType::kF32, {h}}};
  for (auto& tensor : attention_layout(prefix + "self_attn.", config_.qkv_bias, config_.o_bias)) out.push_back(std::move(tensor));
  out.push_back({prefix + "post_attention_layernorm.weight", DType::kF32, {h}});
  for (auto& tensor : mlp_layout(prefix + "mlp.", config_.mlp_bias)) out.push_back(std::move(tensor));
  return out;
}

std::vector<TensorInfo> Decoder::layout() const {
  std::vector<TensorInfo> out = {{"model.embed_tokens.weight", DType::kF32, {config_.vocab_size, config_.hidden_size}}};
  for (long long i = 0; i < config_.layers; ++i)
    for (auto& tensor : layer_layout(i)) out.push_back(std::move(tensor));
  out.push_back({"model.norm.weight", DType::kF32, {config_.hidden_size}});
  if (!config_.tie_word_embeddings) out.push_back({"lm_head.weight", DType::kF32, {config_.vocab_size, config_.hidden_size}});
  return out;
}

std::vector<std::string> Decoder::layer_names(long long layer) const {
  std::vector<std::string> names;
  for (const auto& tensor : layer_layout(layer)) names.push_back(tensor.name);
  return names;
}


torch::Tensor Decoder::norm(const Parameters& p, const std::string& name, const torch::Tensor& x, GradientRecorder* recorder,
                            bool plus_one) const {
  const torch::Tensor wide = x.to(torch::kFloat32);
  const torch::Tensor normed_wide = wide * torch::rsqrt(wide.pow(2).mean(-1, true) + config_.rms_norm_eps);
  const torch::Tensor normed = normed_wide.to(x.scalar_type());
  // Llama scales in the input's dtype; Gemma scales by (1 + w) in float32 and casts after.
  torch::Tensor out = plus_one ? (normed_wide * (1.0 + p.at(name).to(torch::kFloat32))).to(x.scalar_type()) : p.at(name) * normed;
  if (recorder != nullptr && out.requires_grad()) {
    out.retain_grad();
    recorder->add({name, Capture::Kind::kScale, normed.detach(), out});
  }
  return out;
}

void Decoder::check_window(long long length) const {
  if (config_.sliding_window > 0 && length > config_.sliding_window)
    throw InputError(config_.directory + ": sequences of " + std::to_string(length) + " tokens are longer than the sliding window (" +
                     std::to_string(config_.sliding_window) + "); gradfix implements sliding-window attention only where it equals full attention");
}

torch::Tensor Decoder::attention(const std::string& prefix, const Parameters& p, const torch::Tensor& x, const torch::Tensor& attention_mask,
                                 const AttentionOptions& o, GradientRecorder* recorder) const {
  const DecoderConfig& c = config_;
  const long long n = x.size(0), t = x.size(1);
  // Per-head norms run on [N, T * heads, head_dim], so that the recorded scale sees rows of head_dim.
  auto per_head = [&](torch::Tensor projected, long long heads, const std::string& norm_name) {
    if (norm_name.empty()) return projected.view({n, t, heads, c.head_dim}).transpose(1, 2);
    return norm(p, norm_name, projected.view({n, t * heads, c.head_dim}), recorder).view({n, t, heads, c.head_dim}).transpose(1, 2);
  };
  // [N, T, heads, d] -> [N, heads, T, d]
  const torch::Tensor q = per_head(recorded_linear(p, prefix + "q_proj", x, o.qkv_bias, recorder), c.heads, o.q_norm);
  torch::Tensor k = per_head(recorded_linear(p, prefix + "k_proj", x, o.qkv_bias, recorder), c.kv_heads, o.k_norm);
  torch::Tensor v = recorded_linear(p, prefix + "v_proj", x, o.qkv_bias, recorder).view({n, t, c.kv_heads, c.head_dim}).transpose(1, 2);
  const auto [cos, sin] = rotary(t, q);
  const torch::Tensor q_rotated = q * cos + rotate_half(q) * sin;
  k = k * cos + rotate_half(k) * sin;
  const long long groups = c.heads / c.kv_heads;
  if (groups > 1) {
    k = k.repeat_interleave(groups, 1);
    v = v.repeat_interleave(groups, 1);
  }
  torch::Tensor scores = torch::matmul(q_rotated, k.transpose(2, 3));
  scores = o.scale > 0.0 ? scores * o.scale : scores / std::sqrt(static_cast<double>(c.head_dim));
  if (o.softcap > 0.0) scores = soft_cap(scores, o.softcap);
  // Causal, and no attention to padding keys; a query always sees itself or an earlier real token.
  const auto flags = torch::TensorOptions().dtype(torch::kBool).device(x.device());
  torch::Tensor causal = torch::ones({t, t}, flags).tril();
  if (o.window > 0) causal = causal & torch::ones({t, t}, flags).triu(1 - o.window);
  torch::Tensor allowed = causal.unsqueeze(0).unsqueeze(0) & attention_mask.to(torch::kBool).unsqueeze(1).unsqueeze(2);
  // With a window, a padding query far past the last real token would see no key at all (a row of
  // NaN whose zero gradient still poisons products): it sees itself. Real queries are unchanged.
  if (o.window > 0) allowed = allowed | torch::eye(t, flags).unsqueeze(0).unsqueeze(0);
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  const torch::Tensor weights = torch::softmax(scores, -1, torch::kFloat32).to(q.scalar_type());
  const torch::Tensor attended = torch::matmul(weights, v).transpose(1, 2).reshape({n, t, c.heads * c.head_dim});
  return recorded_linear(p, prefix + "o_proj", attended, o.o_bias, recorder);
}

torch::Tensor Decoder::gated_mlp(const std::string& prefix, const Parameters& p, const torch::Tensor& x, Activation activation, bool bias,
                                 GradientRecorder* recorder) const {
  const torch::Tensor gate = recorded_linear(p, prefix + "gate_proj", x, bias, recorder);
  const torch::Tensor activated = activation == Activation::kSilu ? torch::silu(gate) : torch::gelu(gate, "tanh");
  const torch::Tensor gated = activated * recorded_linear(p, prefix + "up_proj", x, bias, recorder);
  return recorded_linear(p, prefix + "down_proj", gated, bias, recorder);
}

torch::Tensor Decoder::embed(const Parameters& parameters, const torch::Tensor& input_ids, int64_t pad, GradientRecorder* recorder) const {
  // padding_idx keeps the pad row's lookups out of the gradient, as nn.Embedding does.
  torch::Tensor out = torch::embedding(parameters.at("model.embed_tokens.weight"), input_ids, pad);
  if (recorder != nullptr) {
    out = out.detach().requires_grad_(true);
    recorder->add({"model.embed_tokens.weight", Capture::Kind::kEmbedding, input_ids, out});
    // The recorded rows take no gradient where the token is the pad token: the same values, with
    // the pad positions cut from the graph.
    if (pad >= 0) return torch::where(input_ids.eq(pad).unsqueeze(-1), out.detach(), out);
  }
  return out;
}

torch::Tensor Decoder::block(long long index, const Parameters& p, const torch::Tensor& hidden, const torch::Tensor& attention_mask,
                             GradientRecorder* recorder) const {
  check_window(hidden.size(1));
  const std::string prefix = layer_prefix(index);
  const torch::Tensor x = norm(p, prefix + "input_layernorm.weight", hidden, recorder);
  const torch::Tensor after_attention = hidden + attention(prefix + "self_attn.", p, x, attention_mask, attention_options(index), recorder);
  const torch::Tensor y = norm(p, prefix + "post_attention_layernorm.weight", after_attention, recorder);
  return after_attention + gated_mlp(prefix + "mlp.", p, y, Activation::kSilu, config_.mlp_bias, recorder);
}

AttentionOptions Decoder::attention_options(long long index) const {
  (void)index;
  AttentionOptions options;
  options.qkv_bias = config_.qkv_bias;
  options.o_bias = config_.o_bias;
  return options;
}

torch::Tensor Decoder::head_logits(const Parameters& p, const torch::Tensor& normed, GradientRecorder* recorder) const {
  // A tied head records its use under the embedding's name: the one stored tensor's per-sample
  // gradient is the sum of both uses.
  torch::Tensor logits = torch::nn::functional::linear(normed, p.at(head_name()));
  if (recorder != nullptr && logits.requires_grad()) {
    logits.retain_grad();
    recorder->add({head_name(), Capture::Kind::kLinearWeight, normed.detach(), logits});
  }
  return logits;
}

torch::Tensor Decoder::final_norm(const Parameters& p, const torch::Tensor& hidden, GradientRecorder* recorder) const {
  return norm(p, "model.norm.weight", hidden, recorder);
}

torch::Tensor Decoder::head(const Parameters& p, const torch::Tensor& hidden, GradientRecorder* recorder) const {
  const torch::Tensor logits = head_logits(p, final_norm(p, hidden, recorder), recorder);
  return vocabulary_head_.softcap > 0.0 ? soft_cap(logits, vocabulary_head_.softcap) : logits;
}

torch::Tensor Decoder::next_tokens(const Batch& batch) const {
  // Position t predicts the label at t + 1; the last position and ignored labels predict none.
  const torch::Tensor last = torch::full({batch.labels.size(0), 1}, static_cast<int64_t>(kIgnoredLabel), batch.labels.options());
  const torch::Tensor next = torch::cat({batch.labels.slice(1, 1), last}, 1);
  return next.masked_fill(next.eq(static_cast<int64_t>(kIgnoredLabel)), -1);
}

torch::Tensor Decoder::features(const Parameters& parameters, const torch::Tensor& hidden, const Batch& batch) const {
  (void)parameters;
  if (!batch.mask.defined()) return hidden.mean(1);
  const torch::Tensor mask = batch.mask.to(hidden.scalar_type()).unsqueeze(-1);
  return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0);
}

torch::Tensor Decoder::losses(const torch::Tensor& logits, const Batch& batch) const { return per_sample_losses(logits, batch.labels); }
std::pair<long long, long long> Decoder::hits(const torch::Tensor& logits, const Batch& batch) const { return token_hits(logits, batch.labels); }

std::string Decoder::head_name() const { return config_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight"; }

torch::Tensor Decoder::forward(const Parameters& parameters, const TokenBatch& batch) const {
  torch::Tensor hidden = embed(parameters, batch.input_ids, config_.pad_token_id);
  for (long long i = 0; i < config_.layers; ++i) hidden = block(i, parameters, hidden, batch.attention_mask);
  return head(parameters, hidden);
}

namespace {

// The model `source` names, as a decoder; `where` names it in the refusal of any other kind.
std::unique_ptr<Decoder> decoder_of(const ModelConfigSource& source, const std::string& where) {
  std::unique_ptr<LayeredModel> model = layered_model_from_config(source);
  auto* decoder = dynamic_cast<Decoder*>(model.get());
  if (decoder == nullptr) throw InputError(where + ": a " + model->model_type() + " model takes images, not token data; it is not a decoder");
  model.release();
  return std::unique_ptr<Decoder>(decoder);
}

}  // namespace

std::unique_ptr<Decoder> decoder_from_config(const std::string& text, const std::string& path, bool strict_config) {
  return decoder_of({"", path, text, strict_config}, path);
}

std::unique_ptr<Decoder> open_decoder(const std::string& directory, bool strict_config) {
  const std::string path = model_file(directory, "config.json");
  return decoder_of({directory, path, read_config_text(path), strict_config}, directory);
}

void check_decoder_checkpoint(const Decoder& decoder) { check_against_model(*open_reader(decoder.directory()), decoder, false); }

Parameters read_decoder_parameters(const Decoder& decoder, const std::vector<std::string>& names, torch::ScalarType dtype,
                                   const torch::Device& device) {
  check_decoder_checkpoint(decoder);
  const auto reader = open_reader(decoder.directory());
  Parameters parameters;
  for (const auto& name : names) {
    const TensorInfo& info = reader->info(name);
    const std::vector<float> values = reader->read_f32(name);
    const std::vector<int64_t> shape(info.shape.begin(), info.shape.end());
    parameters[name] = torch::from_blob(const_cast<float*>(values.data()), shape, torch::kFloat32).to(device, dtype, false, true);
  }
  return parameters;
}

torch::Tensor soft_cap(const torch::Tensor& x, double softcap) { return (x / softcap).tanh() * softcap; }

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
