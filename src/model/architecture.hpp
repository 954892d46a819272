#pragma once
// Internal to the LibTorch part: what the sharded executor (sharded_executor.hpp) needs to know
// of a model, and the registry that maps a Hugging Face directory's config.json to it. A model is
// an input stage (token embedding; patch embedding), a stack of layers, and an output stage
// (final norm and head) whose logits give per-sample losses. Each stage is math on parameters
// passed in by name, so the executor can gather one stage's tensors at a time and free them.
// Adding an architecture is one file: it implements LayeredModel and registers its model_type
// values with a static ArchitectureRegistration.

#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gradfix/io/tensor_store.hpp"

namespace gradfix {

using Parameters = std::map<std::string, torch::Tensor>;

// What per-sample gradients need from one recomputation with autograd: for each use of a
// parameter, the input it multiplied and the output whose gradient backward() leaves behind.
// A Linear weight's per-sample gradient is then G_n^T X_n over that sample's positions, a bias's
// the sum of G_n, a norm scale's the sum of G_n * normed x_n, an embedding's the rows of G_n
// added at the sample's token ids: one batched product instead of one backward pass per sample.
struct Capture {
  // kAdditive: a parameter added to every sample as it is (position embeddings): its per-sample
  // gradient is G_n itself.
  enum class Kind { kLinearWeight, kBias, kScale, kEmbedding, kAdditive };
  std::string parameter;
  Kind kind = Kind::kLinearWeight;
  torch::Tensor input;   // X [n, T, in]; normed x [n, T, H]; token ids [n, T]; nothing (bias, additive)
  torch::Tensor output;  // [n, T, out]: its grad() is G after backward()
};

// A per-sample gradient entry that is a sum over positions (a bias summed over tokens, a
// convolution's bias over pixels) and cancels to within rounding of zero casts no vote, in max
// and mean mode alike: it counts as 0 when |sum| <= kCancellationTolerance * (sum of |terms|).
// The key bias of softmax attention is the case in point: its gradient is zero in theory (a
// constant added to every key shifts all of a query's scores alike), and what float32 leaves of
// it, about 1e-8 of its terms, is noise whose sign would keep or drop entries of tau at random.
// Genuine bias gradients cancel that far (1e-5) only rarely, and their sign is then barely
// determined anyway.
constexpr double kCancellationTolerance = 1e-5;
// `sums` [n, ...] with the cancelled entries set to 0 (in place); `magnitudes` the sums of |terms|.
inline torch::Tensor without_cancelled(torch::Tensor sums, const torch::Tensor& magnitudes) {
  return sums.masked_fill_(sums.abs() <= magnitudes * kCancellationTolerance, 0);
}

class GradientRecorder {
 public:
  void add(Capture capture) { captures_.push_back(std::move(capture)); }
  const std::vector<Capture>& captures() const { return captures_; }
  void clear() { captures_.clear(); }

 private:
  std::vector<Capture> captures_;
};

// x @ weight^T (+ bias) with the parameters `name`.weight and `name`.bias; with a recorder (and an
// output that requires grad) both uses are recorded for per-sample gradients. Every architecture's
// Linear layers go through it.
torch::Tensor recorded_linear(const Parameters& p, const std::string& name, const torch::Tensor& x, bool bias,
                              GradientRecorder* recorder);

// Samples on a device. Tokens: inputs = input_ids [n, T], labels [n, T], mask = attention_mask
// [n, T]. Images: inputs [n, C, H, W], labels [n], mask undefined.
struct Batch {
  torch::Tensor inputs;
  torch::Tensor labels;
  torch::Tensor mask;
  // Set by the sharded executor for a model with a token embedding: the ascending token ids
  // whose rows it gathered [U], int64 on the CPU. `inputs` then index these rows (0..U-1), not
  // the vocabulary; `labels` keep the vocabulary's ids.
  torch::Tensor token_rows;
  // Samples [begin, end) of this batch.
  Batch slice(int64_t begin, int64_t end) const;
  // A token id as `inputs` holds it: its index in token_rows when set (-1 when absent).
  int64_t input_index(int64_t token) const;
};

// A language model's head: logits = softcap * tanh(f @ weight^T / softcap) (no cap when softcap
// is 0) of the output stage's features f [n, T, H], and a loss per sample that is the mean
// cross-entropy over the positions that have a next token (LayeredModel::next_tokens). Described
// this way, the executor never holds the head, nor a sample's [T, V] logits, whole: it gathers
// the head block by block of the vocabulary and keeps a streaming log-sum-exp per position.
struct VocabularyHead {
  std::string weight;    // [V, H]: the token embedding's name when the head is tied to it
  double softcap = 0.0;
};

// A data set as the executor reads it: its size, a name for messages, and any subset as a batch.
struct SampleSource {
  long long samples = 0;
  std::string name;
  std::function<Batch(const std::vector<long long>& indices, const torch::Device& device)> batch;
};

class LayeredModel {
 public:
  virtual ~LayeredModel() = default;
  // The checkpoint's tensors (names and shapes; dtype F32), and the directory it came from.
  virtual std::vector<TensorInfo> layout() const = 0;
  virtual std::string directory() const = 0;
  virtual long long layers() const = 0;
  // The tensors of each stage, in layout order. A tensor in both the input and the output stage
  // is tied: its per-sample gradient is the sum of both uses, formed before any sign is taken.
  virtual std::vector<std::string> input_names() const = 0;
  virtual std::vector<std::string> layer_names(long long layer) const = 0;
  virtual std::vector<std::string> output_names() const = 0;
  // The stages. With a recorder every parameter use is recorded for per-sample gradients (the
  // input stage's output is then a leaf that requires grad when its capture needs it).
  virtual torch::Tensor input(const Parameters& parameters, const Batch& batch, GradientRecorder* recorder = nullptr) const = 0;
  virtual torch::Tensor layer(long long index, const Parameters& parameters, const torch::Tensor& hidden, const Batch& batch,
                              GradientRecorder* recorder = nullptr) const = 0;
  virtual torch::Tensor output(const Parameters& parameters, const torch::Tensor& hidden, GradientRecorder* recorder = nullptr) const = 0;
  // Per-sample losses [n] of the logits, and correct predictions / counted targets (tokens or
  // samples) summed over the batch.
  virtual torch::Tensor losses(const torch::Tensor& logits, const Batch& batch) const = 0;
  virtual std::pair<long long, long long> hits(const torch::Tensor& logits, const Batch& batch) const = 0;
  // Tensors a checkpoint of this model may hold besides its layout, unread (a tied head stored
  // anyway, buffers, a CLIP text tower).
  virtual bool ignores(const std::string& name) const { (void)name; return false; }
  // The width of the per-sample feature rows that features() gives (0: none), from the last
  // layer's output with the output stage's parameters: what shot selection (coreset, k-medoids,
  // herding) compares samples by when no features file is given.
  virtual long long feature_size() const { return 0; }
  virtual torch::Tensor features(const Parameters& parameters, const torch::Tensor& hidden, const Batch& batch) const {
    (void)parameters;
    (void)hidden;
    (void)batch;
    return {};
  }
  // A language model's head (nullptr: output() gives the logits whole, as a classifier's few).
  // With one, the output stage is head_features() then the head, and output_names() are the
  // features' tensors and the head's weight.
  virtual const VocabularyHead* vocabulary_head() const { return nullptr; }
  // With a vocabulary head: the output stage up to it (the final norm), [n, T, H]; recorded like
  // the other stages.
  virtual torch::Tensor head_features(const Parameters& parameters, const torch::Tensor& hidden, GradientRecorder* recorder = nullptr) const {
    (void)parameters;
    (void)recorder;
    return hidden;
  }
  // With a vocabulary head: the token each position predicts [n, T] (int64), -1 where none counts.
  virtual torch::Tensor next_tokens(const Batch& batch) const {
    (void)batch;
    return {};
  }
  // The input stage's tensor that is looked up by token id ([V, H]; "" for none). The executor
  // then gathers only the rows of the tokens in the data (Batch::token_rows), never the whole
  // vocabulary's.
  virtual std::string token_embedding() const { return ""; }
  // "llama", "clip", ...: for messages.
  virtual std::string model_type() const = 0;
  // Keys of config.json that gradfix does not know and took not to change the math (a job prints
  // them in a one-line notice; --strict-config refuses them instead).
  virtual std::vector<std::string> unknown_config_keys() const { return {}; }
};

// Tensors of `reader` (a checkpoint, a task vector, a fine-tuned release) against the model's
// layout: every misshapen or non-float tensor and every tensor the model neither has nor ignores,
// and with `partial` false every missing one, listed in one InputError naming the file and the
// model's config. A partial reader must hold at least one of the model's tensors.
void check_against_model(const TensorReader& reader, const LayeredModel& model, bool partial);

// Whether `path` is a directory holding config.json (a Hugging Face model directory).
bool is_model_directory(const std::string& path);
// A config file's text; files over 16 MiB are refused before they are read.
std::string read_config_text(const std::string& path);

// What a model's samples are, and so which data options and checks a job applies: token
// sequences (input_ids, labels, attention_mask) or images with a zero-shot head.
enum class ModelInputs { kTokens, kImages };

// A model's config.json as read: its directory (empty when a config file is read alone, as
// `init` reads it), its path for messages, and its text.
struct ModelConfigSource {
  std::string directory;
  std::string path;
  std::string text;
  // Keys gradfix does not know are refused (--strict-config) instead of noticed.
  bool strict = false;
};

// The model of a Hugging Face directory, by config.json's "model_type"; an InputError names the
// directory and the types gradfix knows when none is registered for it.
std::unique_ptr<LayeredModel> open_layered_model(const std::string& directory, bool strict_config = false);
// The same from a config's text (`source.directory` may be empty: the model is then a layout and
// its math, with no checkpoint to read).
std::unique_ptr<LayeredModel> layered_model_from_config(const ModelConfigSource& source);
// Whether some architecture claims this model_type.
bool is_registered_architecture(const std::string& model_type);
// The registered model types, comma-separated, for messages and help.
std::string registered_architectures();
// What the samples of the model in `directory` are: its registered kind, or kTokens when its
// model_type is unknown or unreadable (the token jobs then name what is wrong with the config).
ModelInputs model_directory_inputs(const std::string& directory);
// Whether `path` is a model directory of a family registered with image inputs (CLIP).
bool is_image_model_directory(const std::string& path);
// The "model_type" of a config's text; an InputError names `path` when there is none.
std::string config_model_type(const std::string& text, const std::string& path);

// Registers a factory for model_type values (a static object in the architecture's own file).
struct ArchitectureRegistration {
  using Factory = std::function<std::unique_ptr<LayeredModel>(const ModelConfigSource& source)>;
  ArchitectureRegistration(const std::vector<std::string>& model_types, ModelInputs inputs, Factory factory);
};

}  // namespace gradfix
