#pragma once
// A model's vocabulary as its Hugging Face fast tokenizer (tokenizer.json) gives it: the token of
// each id, from the tokenizer model's vocabulary (BPE, WordPiece and WordLevel map tokens to ids,
// Unigram lists them in id order) and its added tokens, with the model's own row count
// (config.json's vocab_size). mergekit aligns the embedding rows of models with different
// vocabularies by these; gradfix reads them the same way (docs/merging.md).

#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace gradfix {

struct AddedToken {
  std::string content;
  bool special = false, normalized = true, lstrip = false, rstrip = false, single_word = false;
};

struct TokenizerVocabulary {
  std::string directory;
  std::unordered_map<std::string, long long> ids;  // every token (the model's and the added ones)
  std::map<long long, AddedToken> added;           // the added tokens, by id
  long long rows = 0;  // config.json's vocab_size (the embedding rows); the token count without one
  // The tokens in id order (where ids repeat or skip, each id's token once).
  std::vector<std::pair<long long, std::string>> by_id() const;
};

// `directory`/tokenizer.json (links followed as model_file allows) with `directory`/config.json's
// vocab_size. InputError naming the file when there is no tokenizer.json (gradfix does not read
// tokenizer.model), it is malformed, larger than 256 MiB or holds more than 2^24 tokens.
TokenizerVocabulary read_tokenizer_vocabulary(const std::string& directory);

// Without the tokens whose id is at or past the model's rows (mergekit's stripped tokenizer: a
// tokenizer may list more tokens than the model has rows for).
TokenizerVocabulary stripped(const TokenizerVocabulary& vocabulary);

// `directory`/tokenizer.json as text with the tokens at or past `rows` removed (the model's
// vocabulary and its merges, the added tokens) and `added` appended as added tokens with their
// ids, every other part as it was: the output's tokenizer of a union of vocabularies.
std::string tokenizer_json_with(const std::string& directory, long long rows, const std::map<long long, AddedToken>& added);

// The chat template a model directory carries (chat_template.jinja, else tokenizer_config.json's
// chat_template when it is text); nullopt without one.
std::optional<std::string> chat_template_of(const std::string& directory);

// tokenizer_config.json's text (read from `path`) without its chat_template, where it has one
// (a template given to a merge is written as chat_template.jinja instead); nullopt otherwise.
std::optional<std::string> tokenizer_config_without_template(const std::string& text, const std::string& path);

}  // namespace gradfix
