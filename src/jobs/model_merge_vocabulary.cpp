// gradfix merge --config with tokenizer_source or a tokenizer: section (mergekit's vocabulary
// alignment), and chat_template. Each model's vocabulary tensors (its embeddings and head) are
// presented with one row per token of the output's vocabulary, in its order: the model's own row
// where it has the token, else the row mergekit's rules give (the one model that has it, the
// base's, the mean of those that have it, zeros, or what the configuration names). The merge then
// runs on them unchanged, and the output's tokenizer and config.json's vocab_size follow.
#include <algorithm>
#include <fstream>
#include <iterator>
#include <limits>
#include <mutex>
#include <type_traits>

#include "gradfix/io/model_files.hpp"
#include "gradfix/io/vocabulary.hpp"
#include "model_merge_internal.hpp"

namespace gradfix::file_jobs {
namespace {

// Where one output row of a model comes from when not from its own row of the same token.
struct DefaultRow {
  enum class Kind { kNone, kAverage, kRow, kZero };
  Kind kind = Kind::kNone;
  std::size_t model = 0;  // kRow: the model, and its row
  long long row = 0;
};

// The alignment every part's reader shares.
struct VocabularyPlan {
  long long tokens = 0;  // the output's vocabulary
  long long rows = 0;    // its rows: tokens, padded up to a multiple of pad_to_multiple_of
  std::vector<const TensorReader*> readers;         // each model of the alignment
  std::vector<std::vector<long long>> permutation;  // per model: its row of each output token, or -1
  std::vector<DefaultRow> defaults;                 // per output token
  std::vector<bool> forced;                         // per output token
  std::set<std::string> tensors;                    // the vocabulary tensors, by name
};

// A model with its vocabulary tensors aligned to the output's vocabulary (plan).
class AlignedReader : public WrappedReader {
 public:
  AlignedReader(std::unique_ptr<TensorReader> own, std::size_t model, std::shared_ptr<const VocabularyPlan> plan)
      : WrappedReader(std::move(own), [&plan](TensorInfo& tensor) { if (plan->tensors.count(tensor.name)) tensor.shape[0] = plan->rows; }),
        model_(model), plan_(std::move(plan)) {}

  void read_raw(const std::string& name, long long begin, long long count, void* target) const override {
    if (!plan_->tensors.count(name)) return own().read_raw(name, begin, count, target);
    const TensorInfo& tensor = info(name);
    if (begin < 0 || count < 0 || begin + count > tensor.numel())
      throw InputError(path() + ": tensor '" + escaped_name(name) + "': elements [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                       ") requested, it has " + std::to_string(tensor.numel()));
    if (tensor.dtype == DType::kF64) return read_aligned<double>(tensor, begin, count, target);
    read_aligned<float>(tensor, begin, count, target);
  }

 private:
  // Elements [begin, begin + count) of the aligned tensor in its dtype, computed in V (mergekit
  // computes in the merge's dtype; float32 for every narrower one here).
  template <typename V>
  void read_aligned(const TensorInfo& tensor, long long begin, long long count, void* target) const {
    const long long width = tensor.numel() / plan_->rows;
    std::vector<V> values(static_cast<std::size_t>(count));
    std::vector<V> row;
    for (long long first = begin / width; first * width < begin + count; ++first) {
      aligned_row<V>(tensor.name, first, width, row);
      const long long from = std::max(begin, first * width), to = std::min(begin + count, (first + 1) * width);
      for (long long i = from; i < to; ++i) values[static_cast<std::size_t>(i - begin)] = row[static_cast<std::size_t>(i - first * width)];
    }
    if constexpr (std::is_same_v<V, double>) convert_from_f64(tensor.dtype, values.data(), target, values.size());
    else convert_from_f32(tensor.dtype, values.data(), target, values.size());
  }

  template <typename V>
  static void source_row(const TensorReader& reader, const std::string& name, long long row, long long width, std::vector<V>& out) {
    const DType dtype = reader.info(name).dtype;
    std::vector<unsigned char> raw(static_cast<std::size_t>(width) * dtype_size(dtype));
    reader.read_raw(name, row * width, width, raw.data());
    out.resize(static_cast<std::size_t>(width));
    if constexpr (std::is_same_v<V, double>) convert_to_f64(dtype, raw.data(), out.data(), out.size());
    else convert_to_f32(dtype, raw.data(), out.data(), out.size());
  }

  // Row `row` of this model's aligned tensor.
  template <typename V>
  void aligned_row(const std::string& name, long long row, long long width, std::vector<V>& out) const {
    const VocabularyPlan& plan = *plan_;
    if (row >= plan.tokens) {
      // Padding rows: the mean of the model's aligned rows (mergekit, after Hewitt's vocabulary
      // expansion note), computed once per tensor.
      const std::lock_guard<std::mutex> lock(mutex_);
      auto& mean = padding_[name];
      if (mean.empty()) {
        std::vector<double> sum(static_cast<std::size_t>(width), 0.0);
        std::vector<V> each;
        for (long long r = 0; r < plan.tokens; ++r) {
          aligned_row<V>(name, r, width, each);
          for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += each[i];
        }
        for (double& value : sum) value /= static_cast<double>(plan.tokens);
        mean = sum;
      }
      out.assign(mean.begin(), mean.end());
      return;
    }
    const long long own = plan.permutation[model_][static_cast<std::size_t>(row)];
    if (own >= 0 && !plan.forced[static_cast<std::size_t>(row)]) return source_row(this->own(), name, own, width, out);
    const DefaultRow& fallback = plan.defaults[static_cast<std::size_t>(row)];
    out.assign(static_cast<std::size_t>(width), V(0));
    switch (fallback.kind) {
      case DefaultRow::Kind::kNone:
      case DefaultRow::Kind::kZero: return;
      case DefaultRow::Kind::kRow: return source_row(*plan.readers[fallback.model], name, fallback.row, width, out);
      case DefaultRow::Kind::kAverage: {
        // The models that have the token, summed in order in V and divided by their count.
        std::vector<V> each;
        V count = 0;
        for (std::size_t m = 0; m < plan.readers.size(); ++m) {
          const long long source = plan.permutation[m][static_cast<std::size_t>(row)];
          if (source < 0) continue;
          source_row(*plan.readers[m], name, source, width, each);
          for (std::size_t i = 0; i < out.size(); ++i) out[i] = out[i] + each[i];
          count += 1;
        }
        for (auto& value : out) value /= count;
        return;
      }
    }
  }

  std::size_t model_;
  std::shared_ptr<const VocabularyPlan> plan_;
  mutable std::mutex mutex_;
  mutable std::map<std::string, std::vector<double>> padding_;
};

// Named as embeddings or a head: where a model's vocabulary tensors may be.
bool vocabulary_name(const std::string& name) {
  return name.find("embed") != std::string::npos || name.find("lm_head") != std::string::npos || name.find("wte.") != std::string::npos;
}

// The vocabulary tensors of a model: so named, two-dimensional, one row per token of its
// vocabulary (rows).
bool vocabulary_tensor(const TensorInfo& tensor, long long rows) {
  return vocabulary_name(tensor.name) && tensor.shape.size() == 2 && tensor.shape[0] == rows && dtype_is_float(tensor.dtype);
}

// mergekit's named chat templates, written here from the formats they produce.
const std::map<std::string, std::string>& named_chat_templates() {
  static const std::map<std::string, std::string> kTemplates = {
      {"chatml",
       "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
       "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"},
      {"llama3",
       "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
       "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
       "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"},
      {"mistral",
       "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
       "{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}{% for message in turns %}"
       "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user, assistant, ...') }}{% endif %}"
       "{% if message['role'] == 'user' %}{% if loop.first and system is defined %}{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
       "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
       "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"},
      {"alpaca",
       "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] | trim + '\\n\\n' }}"
       "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}"
       "{% elif message['role'] == 'user_context' %}{{ '### Input:\\n' + message['content'] | trim + '\\n\\n' }}"
       "{% else %}{{ '### Response:\\n' + message['content'] | trim + '\\n\\n' }}{% endif %}{% endfor %}"
       "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"},
      {"exaone",
       "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
       "{{ '[|' + message['role'] + '|]' + message['content'] }}{% if message['role'] == 'user' %}{{ '\\n' }}"
       "{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"},
  };
  return kTemplates;
}

// The files of a tokenizer that a model's tokenizer_source carries in place of the base's.
const char* const kTokenizerFiles[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                                       "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja"};
constexpr long long kMaxTokenizerFileBytes = 256LL << 20;

std::string read_model_text(const std::string& directory, const std::string& name) {
  const std::string path = model_file(directory, name);
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw InputError(path + ": cannot be read");
  if (static_cast<long long>(file.tellg()) > kMaxTokenizerFileBytes)
    throw InputError(path + ": larger than 256 MiB; tokenizer files are refused above that");
  file.seekg(0);
  return std::string((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
}

}  // namespace

void align_vocabularies(const ModelMergeJob& job, ModelMergeInputs& in) {
  const MergeVocabulary& wanted = job.vocabulary;
  // The models of the alignment, in mergekit's order: the merge's models, then the base where it
  // is not among them. Each with its reader and vocabulary (the base's stripped of tokens past its
  // rows; a model without tokenizer.json takes the base's, as mergekit assumes).
  std::vector<std::string> paths = job.models;
  std::vector<TensorReader*> readers;
  for (auto& reader : in.models) readers.push_back(reader.get());
  const std::string base_path = job.base.empty() ? job.models.front() : job.base;
  std::size_t base = std::find(paths.begin(), paths.end(), base_path) - paths.begin();
  if (base == paths.size()) {
    paths.push_back(base_path);
    readers.push_back(in.base.get());
  }
  const bool with_base = !job.base.empty();
  std::vector<TokenizerVocabulary> vocabularies(paths.size());
  const TokenizerVocabulary base_whole = read_tokenizer_vocabulary(paths[base]);  // read once: real ones are tens of MB
  vocabularies[base] = stripped(base_whole);
  for (std::size_t m = 0; m < paths.size(); ++m) {
    if (m == base) continue;
    if (has_model_file(paths[m], "tokenizer.json")) {
      vocabularies[m] = read_tokenizer_vocabulary(paths[m]);
    } else {
      vocabularies[m] = vocabularies[base];
      vocabularies[m].directory = paths[m];
    }
  }
  // The output's vocabulary, by id.
  TokenizerVocabulary output;
  std::map<long long, AddedToken> appended;  // tokens the output adds to the base's tokenizer
  auto next_id = [&] {
    long long next = 0;
    for (const auto& entry : output.ids) next = std::max(next, entry.second + 1);
    return next;
  };
  auto append = [&](const std::string& token, const AddedToken& info) {
    if (output.ids.count(token)) return;
    const long long id = next_id();
    output.ids[token] = id;
    appended[id] = info;
    appended[id].content = token;
  };
  if (wanted.source == "base") {
    output = vocabularies[base];
  } else if (wanted.source == "union") {
    // The base's, then every model's tokens it lacks (below each model's rows: its own tokens
    // by id, then its added tokens by id), as mergekit's union appends them.
    output = vocabularies[base];
    std::vector<std::size_t> order = {base};
    for (std::size_t m = 0; m < paths.size(); ++m)
      if (m != base) order.push_back(m);
    for (const std::size_t m : order)
      for (const auto& [id, token] : vocabularies[m].by_id())
        if (id < vocabularies[m].rows && !vocabularies[m].added.count(id)) append(token, AddedToken{token, false, true, false, false, false});
    for (const std::size_t m : order)
      for (const auto& [id, token] : vocabularies[m].added)
        if (id < vocabularies[m].rows) append(token.content, token);
  } else {
    output = read_tokenizer_vocabulary(wanted.source);
  }
  for (const auto& setting : wanted.tokens) append(setting.token, AddedToken{setting.token, false, true, false, false, false});
  auto plan = std::make_shared<VocabularyPlan>();
  plan->tokens = static_cast<long long>(output.ids.size());
  if (next_id() != plan->tokens)
    throw InputError(output.directory + ": the output vocabulary's ids are not 0 to " + std::to_string(plan->tokens - 1) +
                     " (a tokenizer with gaps in its ids); gradfix aligns rows by ids without gaps");
  plan->rows = plan->tokens;
  if (wanted.pad_to_multiple_of > 0 && plan->rows % wanted.pad_to_multiple_of != 0)
    plan->rows += wanted.pad_to_multiple_of - plan->rows % wanted.pad_to_multiple_of;
  // Each model's row of each output token.
  const auto tokens = output.by_id();
  for (std::size_t m = 0; m < paths.size(); ++m) {
    std::vector<long long> rows(static_cast<std::size_t>(plan->tokens), -1);
    for (const auto& [id, token] : tokens) {
      const auto found = vocabularies[m].ids.find(token);
      if (found != vocabularies[m].ids.end() && found->second < vocabularies[m].rows) rows[static_cast<std::size_t>(id)] = found->second;
    }
    plan->permutation.push_back(std::move(rows));
    plan->readers.push_back(readers[m]);
  }
  // The vocabulary tensors: the base's, of as many rows as its vocabulary, and the same in
  // every model, each of that model's rows.
  for (const auto& tensor : readers[base]->tensors())
    if (vocabulary_tensor(tensor, vocabularies[base].rows)) plan->tensors.insert(tensor.name);
  if (plan->tensors.empty())
    throw InputError(paths[base] + ": no embedding or head tensor of " + std::to_string(vocabularies[base].rows) +
                     " rows (config.json's vocab_size) to align to the output vocabulary");
  for (std::size_t m = 0; m < paths.size(); ++m)
    for (const auto& name : plan->tensors) {
      const TensorInfo* tensor = readers[m]->find(name);
      if (tensor == nullptr) continue;  // named by require_matching later
      if (!vocabulary_tensor(*tensor, vocabularies[m].rows))
        throw InputError(readers[m]->path() + ": tensor '" + escaped_name(name) + "' has " +
                         (tensor->shape.size() == 2 ? std::to_string(tensor->shape[0]) + " rows" : std::string("not two dimensions")) +
                         ", config.json's vocab_size " + std::to_string(vocabularies[m].rows) + "; its vocabulary cannot be aligned");
    }
  // Each output token's rows where a model lacks it, or for every model where forced: what the
  // configuration names, else the one model that has it, zeros when none has, the base's, or the
  // mean of those that have it (mergekit's assign_embedding_sources).
  auto model_index = [&](const std::string& path, const std::string& token) {
    const auto found = std::find(paths.begin(), paths.end(), path);
    if (found == paths.end())
      throw InputError("tokenizer.tokens." + token + ": model " + escaped_name(path) + " is not one of the merge's models (mergekit: "
                       "\"referenced but not part of merge\")");
    return static_cast<std::size_t>(found - paths.begin());
  };
  std::map<std::string, const TokenSetting*> settings;
  for (const auto& setting : wanted.tokens) settings[setting.token] = &setting;
  plan->defaults.resize(static_cast<std::size_t>(plan->tokens));
  plan->forced.assign(static_cast<std::size_t>(plan->tokens), false);
  for (const auto& [id, token] : tokens) {
    const auto row = static_cast<std::size_t>(id);
    DefaultRow& fallback = plan->defaults[row];
    std::size_t present = 0, donor = 0;
    for (std::size_t m = 0; m < paths.size(); ++m)
      if (plan->permutation[m][row] >= 0) {
        ++present;
        donor = m;
      }
    const auto setting = settings.find(token);
    if (setting != settings.end()) {
      const TokenEmbeddingSource& source = setting->second->source;
      plan->forced[row] = setting->second->force;
      if (source.kind == TokenEmbeddingSource::Kind::kZero) {
        fallback.kind = DefaultRow::Kind::kZero;
      } else {
        const std::size_t m = model_index(source.model, token);
        fallback = {DefaultRow::Kind::kRow, m, -1};
        if (source.kind == TokenEmbeddingSource::Kind::kModel) {
          fallback.row = plan->permutation[m][row];
          if (fallback.row < 0)
            throw InputError("tokenizer.tokens." + token + ": " + escaped_name(source.model) + " has no token '" + escaped_name(token) + "'");
        } else if (source.token_id) {
          fallback.row = *source.token_id;
        } else {
          const auto found = vocabularies[m].ids.find(source.token);
          if (found == vocabularies[m].ids.end())
            throw InputError("tokenizer.tokens." + token + ": " + escaped_name(source.model) + " has no token '" + escaped_name(source.token) + "'");
          fallback.row = found->second;
        }
        if (fallback.row < 0 || fallback.row >= vocabularies[m].rows)
          throw InputError("tokenizer.tokens." + token + ": token id " + std::to_string(fallback.row) + " is outside " +
                           escaped_name(source.model) + "'s " + std::to_string(vocabularies[m].rows) + " rows");
      }
      continue;
    }
    if (present == 1) fallback = {DefaultRow::Kind::kRow, donor, plan->permutation[donor][row]};
    else if (present == 0) fallback.kind = DefaultRow::Kind::kZero;
    else if (with_base && plan->permutation[base][row] >= 0) fallback = {DefaultRow::Kind::kRow, base, plan->permutation[base][row]};
    else fallback.kind = DefaultRow::Kind::kAverage;
  }
  // The parts' readers, aligned. The base's reader is its own where the base is not among the
  // models, else a second reader of that model (as without alignment).
  const std::shared_ptr<const VocabularyPlan> shared = plan;
  for (std::size_t m = 0; m < in.models.size(); ++m) in.models[m] = std::make_unique<AlignedReader>(std::move(in.models[m]), m, shared);
  in.base = std::make_unique<AlignedReader>(std::move(in.base), base, shared);
  // The output's tokenizer and config.json.
  in.files.vocab_size = plan->rows;
  if (wanted.source == "base" || wanted.source == "union") {
    if (!appended.empty() || base_whole.ids.size() != vocabularies[base].ids.size())
      in.files.files["tokenizer.json"] = tokenizer_json_with(paths[base], vocabularies[base].rows, appended);
  } else {
    const std::string carried = job.base.empty() ? job.models.front() : job.base;
    for (const char* name : kTokenizerFiles) {
      if (has_model_file(wanted.source, name)) in.files.files[name] = read_model_text(wanted.source, name);
      else if (has_model_file(carried, name)) in.files.dropped.insert(name);
    }
    // The model's tokenizer as it is (mergekit does not strip a named source), plus the tokens appended.
    if (!appended.empty())
      in.files.files["tokenizer.json"] = tokenizer_json_with(wanted.source, std::numeric_limits<long long>::max(), appended);
  }
}

void require_same_vocabulary(const ModelMergeInputs& in) {
  for (const auto& tensor : in.base->tensors()) {
    if (!vocabulary_name(tensor.name) || tensor.shape.size() != 2) continue;
    for (const auto& model : in.models) {
      const TensorInfo* other = model->find(tensor.name);
      if (other == nullptr || other->shape.size() != 2 || other->shape[0] == tensor.shape[0] || other->shape[1] != tensor.shape[1]) continue;
      throw InputError("tensor '" + escaped_name(tensor.name) + "' has " + std::to_string(tensor.shape[0]) + " rows in " + in.base->path() + " and " +
                       std::to_string(other->shape[0]) + " in " + model->path() +
                       ": the vocabularies differ. Align them with tokenizer_source (base, union or a model) or a tokenizer: section, "
                       "as mergekit 0.1.5 requires too");
    }
  }
}

void set_chat_template(const ModelMergeJob& job, ModelMergeInputs& in) {
  if (job.chat_template.empty()) return;
  std::string text = job.chat_template;
  if (text == "auto") {
    // The template most of the models carry (the first of those tied), none when none has one.
    std::vector<std::string> paths = job.models;
    if (!job.base.empty() && std::find(paths.begin(), paths.end(), job.base) == paths.end()) paths.insert(paths.begin(), job.base);
    std::map<std::string, int> counts;
    std::vector<std::string> order;
    for (const auto& path : paths)
      if (const auto found = chat_template_of(path)) {
        if (counts[*found]++ == 0) order.push_back(*found);
      }
    if (order.empty()) return;
    text = order.front();
    for (const auto& candidate : order)
      if (counts[candidate] > counts[text]) text = candidate;
  } else if (const auto named = chat_template_text(text)) {
    text = *named;
  }
  in.files.files["chat_template.jinja"] = text;
  // A template in tokenizer_config.json would compete with the file: it goes.
  const std::string carried = job.base.empty() ? job.models.front() : job.base;
  const auto replaced = in.files.files.find("tokenizer_config.json");
  std::string config_text;
  if (replaced != in.files.files.end()) config_text = replaced->second;
  else if (has_model_file(carried, "tokenizer_config.json")) config_text = read_model_text(carried, "tokenizer_config.json");
  if (config_text.empty()) return;
  if (const auto without = tokenizer_config_without_template(config_text, carried + "/tokenizer_config.json"))
    in.files.files["tokenizer_config.json"] = *without;
}

}  // namespace gradfix::file_jobs

namespace gradfix {

std::optional<std::string> chat_template_text(const std::string& name) {
  const auto found = file_jobs::named_chat_templates().find(name);
  if (found == file_jobs::named_chat_templates().end()) return std::nullopt;
  return found->second;
}

std::string chat_template_names() {
  std::string names;
  for (const auto& entry : file_jobs::named_chat_templates()) names += (names.empty() ? "" : ", ") + entry.first;
  return names;
}

}  // namespace gradfix
