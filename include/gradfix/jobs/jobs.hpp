#pragma once
// The jobs behind each subcommand. Each is a short sequence over the parts: open the inputs,
// check that they fit together (names, shapes, finite values), compute tensor by tensor in fp32,
// write through an atomic writer, print a summary. Nothing here parses flags.
//
// Every job type has validate(): it throws InputError for options that are out of range or do not
// go together, naming the option, before any file is opened. The CLI calls it when it builds the
// job from the command line; the run function calls it again, so a job built in code (a sweep, a
// test, a program linking the library) is checked the same way. Files are checked as they open.

#include <functional>
#include <memory>
#include <map>
#include <optional>
#include <set>
#include <ostream>
#include <string>
#include <vector>

#include "gradfix/io/dtype.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/dist/job_context.hpp"
#include "gradfix/io/tensor_store.hpp"
#include "gradfix/algebra/compare.hpp"
#include "gradfix/algebra/mask.hpp"
#include "gradfix/algebra/merge.hpp"

namespace gradfix {

// InputError "OPTION is required" for a path a job cannot do without.
inline void require_given(const std::string& value, const char* option) {
  if (value.empty()) throw InputError(std::string(option) + " is required");
}

// Options every writing job shares.
struct OutputOptions {
  std::vector<std::string> include;  // regexes; empty selects every tensor
  std::vector<std::string> exclude;
  std::optional<DType> out_dtype;    // default: the dtype of the primary input
  bool allow_nonfinite = false;      // accept NaN and Inf in inputs
  long long max_shard_bytes = 5LL << 30;
  bool force = false;                // replace an existing output directory that is not a checkpoint
};

// What a job changes in the files it carries from its primary input into a directory output
// (carry_model_files): config.json's counts where a merge stacked layers or aligned
// vocabularies, files written in place of the input's (a tokenizer, a chat template), input
// files left out.
struct CarriedFileChanges {
  std::optional<long long> layers;      // num_hidden_layers, n_layer, num_layers or n_layers, whichever config.json has
  std::optional<long long> vocab_size;  // config.json's vocab_size
  std::map<std::string, std::string> files;
  std::set<std::string> dropped;
};

struct TaskVectorJob {
  std::string base;
  std::string finetuned;
  std::string out;
  OutputOptions output;
  void validate() const;
};

struct ApplyJob {
  std::string base;
  std::string task_vector;
  double alpha = 1.0;
  std::string out;
  OutputOptions output;
  void validate() const;
};

struct MaskJob {
  std::string task_vector;
  std::string signs;
  MaskMode mode = MaskMode::kNormal;
  MaskOptions mask;
  std::string out;
  OutputOptions output;
  void validate() const;
};

struct MergeJob {
  std::vector<std::string> task_vectors;
  std::vector<std::string> signs;  // one per task vector when order is not kNone
  MergeMethod method = MergeMethod::kMean;
  TiesOptions ties;
  MergeOrder order = MergeOrder::kNone;
  MaskMode mode = MaskMode::kNormal;
  MaskOptions mask;
  std::string out;
  OutputOptions output;
  void validate() const;
};

// A merge of whole models as mergekit defines its methods (gradfix merge --config merge.yml):
//   linear           sum_i w_i M_i, divided by sum_i w_i when normalize
//   task_arithmetic  base + lambda * sum_i w_i (M_i - base) [/ sum_i w_i when normalize]
//   ties             each delta M_i - base trimmed to its k = max(1, int(density_i * n)) largest
//                    magnitudes (exactly k: ties at the threshold are kept in index order), times
//                    w_i; a sign elected per entry from the sum (+ when it is 0); base + lambda *
//                    the sum of the agreeing weighted deltas / the sum of their weights; with
//                    rescale each trimmed delta is scaled back to its L1 norm first
//   dare_linear,     each delta keeps each entry with probability density_i (DARE), rescaled to its
//   dare_ties        L1 norm (rescale), then as task_arithmetic / ties. The draws come from
//                    (seed, model, tensor, element) alone, so they do not depend on the ranks.
//   slerp            spherical interpolation from the base (t = 0) to the one other model
//                    (t = 1), each tensor as one vector, linear where the two are nearly
//                    parallel (|cos| > 0.9995)
//   nuslerp          spherical interpolation between two models (or their deltas from a base),
//                    each tensor as one vector, t = w_2 / (w_1 + w_2) (or each row, or each
//                    column: `vectors`)
// (mergekit's rules; docs/merging.md lists where gradfix's own `--method ties` differs.)
//   breadcrumbs,     Model Breadcrumbs: each delta keeps int(density_i n) entries by magnitude
//   breadcrumbs_ties after the n_bot = max(0, n - int(density_i n) - int(gamma_i n)) smallest
//                    (the largest above them dropped), then as task_arithmetic / ties
//   nearswap         the base moved towards the one other model by w = clamp(t / |M - base|, 0,
//                    1) per entry (|M - base| floored at 1e-6): entries that differ little take
//                    the model's value, entries that differ much keep the base's
//   multislerp       barycentric interpolation on the sphere: each tensor's deltas (or the
//                    models, without a base) as unit vectors, their weighted mean, the tangent
//                    vectors there averaged and mapped back, scaled by the weighted mean norm
//   sce              SCE: per tensor, the deltas' entries of the largest variance across the
//                    models kept (select_topk of the non-zero ones), each delta weighted by its
//                    mean square over the tensor (normalised), a sign elected from the sum, and
//                    the agreeing weighted deltas averaged onto the base
//   karcher          the Karcher (Riemannian) mean of the models' tensors (a base among them)
//                    as directions on the sphere, iterated up to max_iter times, scaled by their
//                    mean norm
//   della,           DELLA (MAGPRUNE): within each row (dim 1 of a tensor; a vector is one row)
//   della_linear     the delta's entries ranked by magnitude, entry of rank r (1..n) kept with
//                    probability density - epsilon + 2 epsilon (r - 1) / (n - 1), rescaled to the
//                    L1 norm (rescale), then as ties (della) or task_arithmetic (della_linear).
//                    The draws come from (seed, model, tensor, element), as DARE's.
//   passthrough      one model's tensors as they are, each times its `scale` (default 1)
//   arcee_fusion     Arcee Fusion: the base and one model; each entry's importance |b - a|
//                    times the KL divergence of its row's softmax (b's from a's), and the model's
//                    delta kept where the importance reaches median + 1.5 IQR of the tensor's
//                    importances
//   ram              RAM: per entry, the deltas larger than epsilon in magnitude; one such delta
//                    is kept as it is, several are averaged (base + sum / count)
//   ramplus_tl       RAM+ (tensor-local): the same, each model's unique deltas scaled by
//                    1 + r clamp(shared / unique, 0, alpha), its counts of entries it shares with
//                    other models and has alone within the tensor
//   model_stock      Model Stock: per tensor, the mean cosine c between the deltas of k >= 2
//                    models, t = k c / (1 + (k - 1) c) (0 where the denominator is within 1e-6
//                    of 0), and t * (the models' mean) + (1 - t) * base (or each row: `vectors`)
enum class ModelMergeMethod {
  kLinear, kTaskArithmetic, kTies, kDareLinear, kDareTies, kSlerp, kNuslerp, kBreadcrumbs, kBreadcrumbsTies, kNearswap, kModelStock, kMultislerp, kSce, kKarcher,
  kDella, kDellaLinear, kPassthrough, kRam, kRamplusTl, kArceeFusion
};

// A mergekit parameter's value for each tensor: one number; a list of numbers interpolated over
// the model's layers (mergekit's "gradient": at layer fraction t = layer / (layers - 1), the
// list's point t (n - 1), linearly between its neighbours; t = 0 outside the layers); or
// conditions tried in order, the first whose filter is a substring of the tensor's name (or that
// has none, or "*") giving the value. No condition matching gives no value.
struct ParameterSetting {
  struct Condition;
  enum class Kind { kNumber, kGradient, kConditions };
  Kind kind = Kind::kNumber;
  double number = 0.0;
  std::vector<double> gradient;
  std::vector<Condition> conditions;
  std::optional<double> at(const std::string& tensor, double fraction) const;
};
struct ParameterSetting::Condition {
  std::string filter;  // "" or "*": every tensor
  std::shared_ptr<ParameterSetting> value;
};

// A parameter whose value depends on the tensor: the settings to try in order (the model's own,
// then the merge's top-level one), and the value when none gives one (none: mergekit's "missing
// required parameter").
struct VaryingParameter {
  std::string name;  // weight, density, gamma, epsilon (per model), t, lambda (the merge's)
  int model = -1;    // the model's index, or -1 for the merge's own parameters
  std::vector<ParameterSetting> settings;
  std::optional<double> fallback;
};

// The per-model and merge parameters that mergekit lets vary by tensor, as they hold for one.
struct MergeParameters {
  std::vector<double> weights, densities, gammas, epsilons;
  double t = 0.5;
  double lambda = 1.0;
};

// mergekit's slices (layer stacking): the output's layers in order, slice by slice. A slice takes
// layers [begin, end) of each of its sources (the same count each), renumbered from the first
// layer after the slices before it. The tensors outside the layers come from the first slice's
// sources (embeddings) or the last slice's (everything else: final norm, head).
struct MergeSliceSource {
  std::string model;
  long long begin = 0, end = 0;
};
struct MergeSlice {
  MergeSliceSource base;                 // model empty where the merge has no separate base
  std::vector<MergeSliceSource> models;  // one per model of the job, in its order
  // The slice's parameters: its sources' own, then the slice's, then the top-level ones.
  MergeParameters defaults;
  std::vector<VaryingParameter> varying;
};

// mergekit's tokenizer_source and tokenizer: section: the output's vocabulary (the base's, the
// union of every model's, or one model's) and, per token, where a model that lacks it (or every
// model, where forced) takes its embedding rows from.
struct TokenEmbeddingSource {
  enum class Kind { kModel, kModelToken, kZero };
  Kind kind = Kind::kModel;
  std::string model;                  // kModel, kModelToken
  std::optional<long long> token_id;  // kModelToken: the model's row by id...
  std::string token;                  // ...or by its token
};
struct TokenSetting {
  std::string token;
  TokenEmbeddingSource source;
  bool force = false;
};
struct MergeVocabulary {
  std::string source;  // empty: none (the vocabularies must match); "base", "union", or a model's path
  std::vector<TokenSetting> tokens;
  long long pad_to_multiple_of = 0;  // 0: no padding
};

// The vectors that nuslerp and model_stock take their angles between: each tensor as one vector
// (mergekit's nuslerp_flatten: true, filter_wise: false), each row along the last dimension
// (nuslerp_flatten: false; filter_wise: true) or each column, the vectors along the first
// dimension (nuslerp_flatten: false with nuslerp_row_wise: true). A tensor of one dimension is
// one vector in every form.
enum class MergeVectors { kTensor, kRows, kColumns };

struct ModelMergeJob {
  ModelMergeMethod method = ModelMergeMethod::kTies;
  std::string base;                 // required except for linear
  std::vector<std::string> models;
  std::vector<double> weights;      // one per model
  std::vector<double> densities;    // one per model; 1 keeps everything
  std::vector<double> gammas;       // breadcrumbs: one per model, the largest magnitudes dropped
  std::vector<double> epsilons;     // della: one per model, the spread of the keep probabilities
  bool normalize = true;
  double lambda = 1.0;
  bool rescale = true;              // scale each sparsified delta back to its L1 norm (mergekit: on for DARE, off for ties)
  std::uint64_t seed = 0;           // DARE's draws
  double t = 0.5;                   // slerp: 0 is the base, 1 the other model; nearswap's threshold
  double eps = 1e-8;                // multislerp: added to norms
  double select_topk = 1.0;         // sce: the fraction of high-variance entries kept
  int max_iter = 10;                // karcher: iterations at most
  double tol = 1e-5;                // karcher: norms and steps below it end or skip
  double ram_epsilon = 1e-5;        // ram, ramplus_tl: a delta counts where its magnitude exceeds it
  double ram_r = 0.1;               // ramplus_tl: the unique deltas' boost, r clamp(rho, 0, alpha)
  double ram_alpha = 0.2;
  MergeVectors vectors = MergeVectors::kTensor;  // nuslerp (every form) and model_stock (tensor, rows)
  // gradfix's addition: gradient-sign masks with each model's statistics (on the base), before
  // the merge (each delta with its own) or after it (the merged delta with sum_i sign(s_i)).
  MergeOrder order = MergeOrder::kNone;
  MaskMode mode = MaskMode::kNormal;
  MaskOptions mask;
  std::vector<std::string> signs;   // one per model when order is not kNone
  std::string config_json;          // the configuration as read, recorded in the metadata
  std::vector<std::string> notes;   // what the configuration gives that the merge ignores (printed)
  // mergekit's `dtype`: the inputs' float tensors are rounded to it before the merge, as mergekit
  // loads them (the arithmetic then as arithmetic_in_dtype below says), unless
  // stored_inputs (gradfix: {inputs: stored}) keeps them at their stored precision.
  std::optional<DType> input_dtype;
  bool stored_inputs = false;
  // With a float32, bfloat16 or float16 `dtype` and no masks, the delta merges (task_arithmetic,
  // TIES, DARE, Breadcrumbs, DELLA, passthrough) round every operation to it and linear computes
  // in float32 as mergekit does; false (gradfix: {arithmetic: double}): computed in double,
  // rounded once.
  bool arithmetic_in_dtype = true;
  // mergekit's per-layer lists and filters where the configuration has them: these parameters
  // take their values per tensor (parameters_for) instead of from the fields above.
  std::vector<VaryingParameter> varying;
  // Layer stacking (mergekit's slices); empty: every layer of the models, as they are. `models`
  // and `base` then name the first slice's sources (they give the carried files and the names in
  // the metadata), the parameters above are unused (each slice has its own).
  std::vector<MergeSlice> slices;
  MergeVocabulary vocabulary;
  // The output's chat template (chat_template.jinja): empty for none (the base's is carried), a
  // template, or one of the names chat_template_text knows, or "auto" (the models' most common).
  std::string chat_template;
  std::string out;
  OutputOptions output;
  void validate() const;
  // weights, densities, gammas, epsilons, t and lambda for the tensor `name` at layer fraction
  // `fraction` (within its slice, where there are slices): the fields above (or the slice's), but
  // where `varying` gives another value. InputError naming the parameter, the model and the
  // tensor for a value that none of its settings give, or out of its range.
  MergeParameters parameters_for(const std::string& name, double fraction, const MergeSlice* slice = nullptr) const;
  // The part of validate() that checks the slices (and refuses masks with them).
  void validate_slices() const;
};

// The chat templates a merge configuration may name (chat_template: chatml, ...): gradfix's own
// text of each format mergekit names; nullopt for another name.
std::optional<std::string> chat_template_text(const std::string& name);
std::string chat_template_names();

struct ConvertJob {
  std::string in;
  std::string out;
  OutputOptions output;
  void validate() const;
};

struct InspectJob {
  std::string file;
  std::string other;  // empty: list the file alone
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  std::string json_out;  // optional JSON copy of the report
  void validate() const;
};

// Synthetic checkpoints, for trying gradfix without a model and for benchmarks: every value is
// like_scale * (the same tensor of `like`) + noise * N(0, 1), seeded per tensor name so that the
// result does not depend on tensor order.
struct GenerateJob {
  std::vector<TensorInfo> layout;  // ignored when `like` is given
  std::string like;
  double like_scale = 1.0;
  double noise = 1.0;
  std::uint64_t seed = 0;
  std::string out;
  OutputOptions output;
  void validate() const;
};

// "w=256x784,b=256" into tensors of `dtype`; throws InputError on malformed text.
std::vector<TensorInfo> parse_shapes(const std::string& text, DType dtype);
// The tensors of an MLP with these layer widths: layers.{i}.weight [out, in] and layers.{i}.bias.
std::vector<TensorInfo> mlp_layout(const std::string& dims, DType dtype);

// What a job did, for its summary line and for tests.
struct JobSummary {
  long long tensors_written = 0;
  long long tensors_changed = 0;  // the selected tensors the operation acted on
  long long elements = 0;         // elements of the changed tensors
  long long bytes_written = 0;
  PairStats stats;                // job-specific: input against statistics, or output against input
};

// The non-tensor files of a Hugging Face model directory (config.json, generation_config.json,
// tokenizer files, the chat template) travel with its tensors: when the primary input is such a
// directory and the output is a directory, the root adds them to it before it is published (in
// the same step as the shards), so the output loads with from_pretrained like the input. With
// --out-dtype, config.json's torch_dtype (and dtype) follow. Only regular files directly in the
// directory are copied, never symbolic links (they could point anywhere), and none larger than
// 256 MiB. The input's README.md is not copied: every directory output gets its own model card,
// made from the output's metadata (model_card). `changes`: what a merge changes in them.
void carry_model_files(const JobContext& context, const std::string& input, TensorWriter& output, const OutputOptions& options,
                       const Metadata& metadata, const CarriedFileChanges& changes = {});
// README.md for an output directory: Hugging Face front matter, the operation and its options,
// and the operations that made its inputs, all read from the output's metadata.
std::string model_card(const Metadata& metadata, bool transformers_model);

// Each prints its summary on rank 0 only; the returned summary is the same on every rank.
JobSummary run_taskvector(const TaskVectorJob& job, std::ostream& log, const JobContext& context = {});
JobSummary run_apply(const ApplyJob& job, std::ostream& log, const JobContext& context = {});
JobSummary run_mask(const MaskJob& job, std::ostream& log, const JobContext& context = {});
JobSummary run_merge(const MergeJob& job, std::ostream& log, const JobContext& context = {});
JobSummary run_model_merge(const ModelMergeJob& job, std::ostream& log, const JobContext& context = {});
const char* model_merge_method_name(ModelMergeMethod method);

// What each merge method is made of, as mergekit's registry describes its methods: the one place
// the configuration reader (defaults, which parameters apply) and the merge itself ask.
struct ModelMergeTraits {
  enum class Sparsification { kNone, kMagnitude, kOutliers, kRandom, kRankedRandom };  // none, TIES, Breadcrumbs, DARE, DELLA
  ModelMergeMethod method;
  const char* name;
  Sparsification sparsification;
  // How the models combine: sums of (sparsified, weighted) deltas from the base; a rotation of
  // whole tensors (slerp, nuslerp); Model Stock's interpolation by the deltas' cosines; NearSwap's
  // interpolation entry by entry. Only the sums of deltas take weights, densities and masks.
  enum class Combination { kDeltas, kSpherical, kModelStock, kNearswap, kMultislerp, kSce, kKarcher, kRam, kArceeFusion };
  bool consensus;          // TIES's sign election
  Combination combination;
  bool default_normalize;  // mergekit's defaults of `normalize` and `rescale`
  bool default_rescale;
};
// Every method, in the order messages list them.
const std::vector<ModelMergeTraits>& model_merge_methods();
const ModelMergeTraits& model_merge_traits(ModelMergeMethod method);
JobSummary run_convert(const ConvertJob& job, std::ostream& log, const JobContext& context = {});
void run_inspect(const InspectJob& job, std::ostream& out, const JobContext& context = {});
JobSummary run_generate(const GenerateJob& job, std::ostream& log, const JobContext& context = {});

}  // namespace gradfix
