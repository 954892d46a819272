#include "gradfix/io/vocabulary.hpp"

#include <algorithm>
#include <set>

#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/model_files.hpp"
#include "json_input.hpp"

namespace gradfix {
namespace {

// Bounds on what a stranger's tokenizer may make gradfix read and hold: a real tokenizer.json
// is at most tens of MB (a 256k vocabulary with its merges).
constexpr long long kMaxTokenizerBytes = 256LL << 20;
constexpr long long kMaxTemplateBytes = 1LL << 20;
constexpr long long kMaxConfigBytes = 16LL << 20;
constexpr long long kMaxTokens = 1LL << 24;

long long token_id(const nlohmann::json& value, const std::string& path, const std::string& token) {
  if (!value.is_number_integer() || value.get<long long>() < 0 || value.get<long long>() >= kMaxTokens)
    throw InputError(path + ": token '" + escaped_name(token) + "' has the id " + value.dump() + ", not one in [0, 2^24)");
  return value.get<long long>();
}

bool flag(const nlohmann::json& entry, const char* key, bool fallback, const std::string& path) {
  if (!entry.contains(key)) return fallback;
  if (!entry[key].is_boolean()) throw InputError(path + ": added token field '" + key + "' is " + entry[key].dump() + ", not true or false");
  return entry[key].get<bool>();
}

}  // namespace

std::vector<std::pair<long long, std::string>> TokenizerVocabulary::by_id() const {
  std::map<long long, std::string> order;
  for (const auto& [token, id] : ids) {
    const auto found = order.find(id);
    if (found == order.end() || token < found->second) order[id] = token;
  }
  return {order.begin(), order.end()};
}

TokenizerVocabulary read_tokenizer_vocabulary(const std::string& directory) {
  TokenizerVocabulary out;
  out.directory = directory;
  const std::string path = model_file(directory, "tokenizer.json");
  if (!file_exists(path))
    throw InputError(directory + ": no tokenizer.json; aligning vocabularies needs each model's fast tokenizer (gradfix does not read "
                     "tokenizer.model: transformers' save_pretrained writes tokenizer.json)");
  const nlohmann::json json = parse_untrusted_json(read_small_file(path, kMaxTokenizerBytes), path, "tokenizer");
  if (!json.is_object() || !json.contains("model") || !json["model"].is_object() || !json["model"].contains("vocab"))
    throw InputError(path + ": no model.vocab; not a tokenizers file");
  const nlohmann::json& vocab = json["model"]["vocab"];
  if (vocab.is_object()) {
    for (const auto& [token, id] : vocab.items()) out.ids.emplace(token, token_id(id, path, token));
  } else if (vocab.is_array()) {
    // Unigram: [token, score] pairs in id order.
    long long id = 0;
    for (const auto& entry : vocab) {
      if (!entry.is_array() || entry.empty() || !entry[0].is_string()) throw InputError(path + ": a Unigram vocabulary entry is not [token, score]");
      out.ids.emplace(entry[0].get<std::string>(), id++);
      if (id > kMaxTokens) throw InputError(path + ": more than 2^24 tokens");
    }
  } else {
    throw InputError(path + ": model.vocab is neither a mapping of tokens to ids nor a list");
  }
  if (json.contains("added_tokens")) {
    if (!json["added_tokens"].is_array()) throw InputError(path + ": added_tokens is not a list");
    for (const auto& entry : json["added_tokens"]) {
      if (!entry.is_object() || !entry.contains("content") || !entry["content"].is_string() || !entry.contains("id"))
        throw InputError(path + ": an added token without a text 'content' and an 'id'");
      AddedToken token;
      token.content = entry["content"].get<std::string>();
      const long long id = token_id(entry["id"], path, token.content);
      token.special = flag(entry, "special", false, path);
      token.normalized = flag(entry, "normalized", !token.special, path);
      token.lstrip = flag(entry, "lstrip", false, path);
      token.rstrip = flag(entry, "rstrip", false, path);
      token.single_word = flag(entry, "single_word", false, path);
      out.ids[token.content] = id;
      out.added[id] = token;
    }
  }
  if (static_cast<long long>(out.ids.size()) > kMaxTokens) throw InputError(path + ": more than 2^24 tokens");
  out.rows = static_cast<long long>(out.ids.size());
  const std::string config_path = model_file(directory, "config.json");
  if (file_exists(config_path)) {
    const nlohmann::json config = parse_untrusted_json(read_small_file(config_path, kMaxConfigBytes), config_path, "config");
    if (config.is_object() && config.contains("vocab_size") && !config["vocab_size"].is_null()) {
      if (!config["vocab_size"].is_number_integer() || config["vocab_size"].get<long long>() <= 0 ||
          config["vocab_size"].get<long long>() > kMaxTokens)
        throw InputError(config_path + ": vocab_size is " + config["vocab_size"].dump() + ", not a count of tokens");
      out.rows = config["vocab_size"].get<long long>();
    }
  }
  return out;
}

TokenizerVocabulary stripped(const TokenizerVocabulary& vocabulary) {
  TokenizerVocabulary out = vocabulary;
  for (auto it = out.ids.begin(); it != out.ids.end();) it = it->second >= out.rows ? out.ids.erase(it) : std::next(it);
  out.added.erase(out.added.lower_bound(out.rows), out.added.end());
  return out;
}

std::string tokenizer_json_with(const std::string& directory, long long rows, const std::map<long long, AddedToken>& added) {
  const std::string path = model_file(directory, "tokenizer.json");
  const std::string text = read_small_file(path, kMaxTokenizerBytes);
  (void)parse_untrusted_json(text, path, "tokenizer");  // bounds the nesting before the ordered parse below
  nlohmann::ordered_json json = nlohmann::ordered_json::parse(text);
  // The tokens past the model's rows go, with the merges that name them.
  auto& vocab = json["model"]["vocab"];
  std::set<std::string> removed;
  if (vocab.is_object()) {
    for (auto it = vocab.begin(); it != vocab.end();) {
      if (it.value().get<long long>() >= rows) {
        removed.insert(it.key());
        it = vocab.erase(it);
      } else {
        ++it;
      }
    }
  } else if (vocab.is_array() && static_cast<long long>(vocab.size()) > rows) {
    for (std::size_t i = static_cast<std::size_t>(rows); i < vocab.size(); ++i) removed.insert(vocab[i][0].get<std::string>());
    vocab.erase(vocab.begin() + static_cast<std::ptrdiff_t>(rows), vocab.end());
  }
  if (!removed.empty() && json["model"].contains("merges") && json["model"]["merges"].is_array()) {
    auto& merges = json["model"]["merges"];
    nlohmann::ordered_json kept = nlohmann::ordered_json::array();
    for (const auto& merge : merges) {
      std::vector<std::string> parts;
      if (merge.is_string()) {
        const std::string pair = merge.get<std::string>();
        const auto space = pair.find(' ');
        parts = {pair.substr(0, space), space == std::string::npos ? std::string() : pair.substr(space + 1)};
      } else if (merge.is_array()) {
        for (const auto& part : merge)
          if (part.is_string()) parts.push_back(part.get<std::string>());
      }
      if (std::none_of(parts.begin(), parts.end(), [&](const std::string& part) { return removed.count(part) != 0; })) kept.push_back(merge);
    }
    merges = kept;
  }
  nlohmann::ordered_json tokens = nlohmann::ordered_json::array();
  if (json.contains("added_tokens") && json["added_tokens"].is_array())
    for (const auto& entry : json["added_tokens"])
      if (entry["id"].get<long long>() < rows) tokens.push_back(entry);
  for (const auto& [id, token] : added) {
    nlohmann::ordered_json entry;
    entry["id"] = id;
    entry["content"] = token.content;
    entry["single_word"] = token.single_word;
    entry["lstrip"] = token.lstrip;
    entry["rstrip"] = token.rstrip;
    entry["normalized"] = token.normalized;
    entry["special"] = token.special;
    tokens.push_back(entry);
  }
  json["added_tokens"] = tokens;
  return json.dump(2) + "\n";
}

std::optional<std::string> chat_template_of(const std::string& directory) {
  const std::string jinja = model_file(directory, "chat_template.jinja");
  if (file_exists(jinja)) return read_small_file(jinja, kMaxTemplateBytes);
  const std::string config_path = model_file(directory, "tokenizer_config.json");
  if (!file_exists(config_path)) return std::nullopt;
  const nlohmann::json config = parse_untrusted_json(read_small_file(config_path, kMaxConfigBytes), config_path, "tokenizer config");
  if (config.is_object() && config.contains("chat_template") && config["chat_template"].is_string())
    return config["chat_template"].get<std::string>();
  return std::nullopt;
}

std::optional<std::string> tokenizer_config_without_template(const std::string& text, const std::string& path) {
  (void)parse_untrusted_json(text, path, "tokenizer config");  // bounds the nesting before the ordered parse below
  nlohmann::ordered_json config = nlohmann::ordered_json::parse(text);
  if (!config.is_object() || !config.contains("chat_template")) return std::nullopt;
  config.erase("chat_template");
  return config.dump(2) + "\n";
}

}  // namespace gradfix
