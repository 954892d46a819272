#pragma once
// The jobs that need a model: create, train and evaluate weights, compute few-shot gradient-sign
// statistics, transport a task vector end to end, and the built-in demo. The LibTorch code is
// behind this header; nothing here includes <torch/torch.h>. The device (cpu, cuda, cuda:N) is
// the context's, like the ranks and the communicators.
//
// Each job type's validate() checks its options alone, as the file jobs' do (gradfix/jobs/jobs.hpp);
// job_options.cpp holds them, without LibTorch, so that a gradfix built without it checks them too.

#include <cstdint>
#include <ostream>
#include <limits>
#include <string>
#include <vector>

#include "gradfix/io/error.hpp"
#include "gradfix/algebra/mask.hpp"
#include "gradfix/jobs/jobs.hpp"

namespace gradfix {

// Whether this build has LibTorch (the model subcommands).
bool torch_available();
// LibTorch's threads for this rank: GRADFIX_THREADS when set, else the CPUs this process may run
// on (its affinity mask), divided among the ranks of its node when the mask is the whole node
// (an unbound launch), so that P ranks on a node do not run P times its cores. Returns the count.
int configure_threads(int ranks_on_node);
// What configure_threads set (0 before it ran, and without LibTorch): the first lines of a job say it.
int configured_threads();
// glibc's allocator for the classifier jobs (train, eval, signs, transport and demo on
// built-in or TorchScript classifiers call it): blocks under 32 MiB come from the heap and up to
// 64 MiB of freed heap is kept. glibc maps fresh pages for every block above 128 KiB at first
// and returns them on free, so each step paid page faults on the memory it had just given back:
// the demo ran 1.6x slower for 3-4% less peak memory. The Hugging Face decoders and CLIP keep
// glibc's defaults: there the setting cost 18-26% more peak memory per rank for 16-28% less
// time, and memory per rank is what limits those jobs. Left alone when the user tunes malloc
// (GLIBC_TUNABLES, MALLOC_*_ variables) and on other C libraries.
void configure_allocator();
// LibTorch's CPU tensors of 1 MiB and more come from a pool that keeps freed blocks for reuse,
// bounded by the most the process had in use at once (src/model/runtime.cpp says why). Call once
// in main.
void configure_tensor_memory();
// Returns the pool's kept blocks to the system: after a pass, before outputs are written.
void release_kept_tensor_memory();
// Set by main where it chose OpenBLAS's kernel (OPENBLAS_CORETYPE) for gradfix-torch: the kernel
// OpenBLAS had picked itself.
constexpr const char* kReplacedBlasKernelVariable = "GRADFIX_REPLACED_BLAS_KERNEL";
// One line on the BLAS kernel that runs the products, for --report-time.
std::string blas_description();

// max: per-sample vote counts sum_n sign(-grad_n); mean: the sum of -grad_n.
enum class SignMode { kMax, kMean };
// fast: per-sample gradients from one batched pass; loop: one backward pass per sample.
enum class VoteMethod { kFast, kLoop };
// The type of the per-sample products whose signs are the votes: f32, or bf16 inputs with float32
// accumulation (--vote-precision bf16: several times the rate on CPUs with AMX or AVX512-BF16
// and on GPU tensor cores; a sample's vote may change only where its product is within bf16's
// rounding of zero). Only the fast method's votes (sign mode max) have products to narrow.
enum class VotePrecision { kF32, kBF16 };

inline const char* sign_mode_name(SignMode mode) { return mode == SignMode::kMax ? "max" : "mean"; }
inline const char* vote_method_name(VoteMethod method) { return method == VoteMethod::kFast ? "fast" : "loop"; }
inline const char* vote_precision_name(VotePrecision precision) { return precision == VotePrecision::kF32 ? "f32" : "bf16"; }
// InputError naming the option and the valid values for anything else.
inline SignMode parse_sign_mode(const std::string& text) {
  if (text == "max") return SignMode::kMax;
  if (text == "mean") return SignMode::kMean;
  throw InputError("unknown --sign-mode '" + text + "'; valid: max|mean");
}
inline VoteMethod parse_vote_method(const std::string& text) {
  if (text == "fast") return VoteMethod::kFast;
  if (text == "loop") return VoteMethod::kLoop;
  throw InputError("unknown --method '" + text + "'; valid: fast|loop");
}
inline VotePrecision parse_vote_precision(const std::string& text) {
  if (text == "f32") return VotePrecision::kF32;
  if (text == "bf16") return VotePrecision::kBF16;
  throw InputError("unknown --vote-precision '" + text + "'; valid: f32|bf16");
}

struct DataOptions {
  std::string spec;                // HDF5 file, IDX images file, or DIR:SPLIT
  std::string transform = "none";  // none | invert | rotate90: the downstream task's input shift
};

struct InitJob {
  std::string arch = "mlp";  // mlp | cnn | vit, or a decoder's model_type (with config)
  std::string dims;          // built-in models
  std::string config;        // decoders: a config.json to initialise from
  std::uint64_t seed = 0;
  std::string out;           // decoders: a Hugging Face model directory
  void validate() const;
};

struct ShotSelection {
  std::string indices_file;
  long long num_batches = 0;
  long long batch_size = 32;
  std::string strategy = "random";  // how K per class are picked: random|coreset|kmedoids|herding
  std::string features_file;        // features for the strategies ([N, D]); empty: the model's own
  std::string save_indices;         // where to write the chosen indices (empty: nowhere)
  void validate() const;
};

struct TrainJob {
  std::string model;  // empty: built-in from the weights' metadata; torchscript:ARCHIVE
  std::string weights;
  DataOptions data;
  long long limit = 0;  // use only the first N samples (0: all)
  long long skip = 0;   // ... after skipping this many (disjoint halves for two "releases")
  int epochs = 1;
  double lr = 1e-3;
  long long batch = 128;
  std::uint64_t seed = 0;
  std::string out;
  // Few-shot fine-tuning: train on these shots of the data only (K per class by a selection
  // strategy, an indices file, or batches); shots_per_class 0 and no indices or batches: every
  // sample.
  long long shots_per_class = 0;
  ShotSelection selection;
  // Tensors not updated: names matching any of these regular expressions (partial match), e.g.
  // the classification head, as the paper fine-tunes with its zero-shot head frozen.
  std::vector<std::string> freeze;
  void validate() const;
};

struct EvalJob {
  std::string model;
  std::string weights;   // a weights file, or a Hugging Face model directory (decoders, CLIP)
  DataOptions data;      // decoders: token data (input_ids, labels, attention_mask)
  std::string results;   // optional JSON: accuracy or token_accuracy, mean_loss, per_sample_loss
  std::string head;      // CLIP: the zero-shot head file [classes, projection_dim]
  void validate() const;
};

// How the few labelled samples are chosen: K per class (seeded), an indices file, or the first
// N batches of a seeded shuffle.

struct SignsJob {
  std::string model;
  std::string weights;
  DataOptions data;
  ShotSelection selection;
  long long shots_per_class = 5;
  long long num_samples = 0;      // decoders: the first N of a seeded shuffle (0: every sample)
  std::uint64_t seed = 0;
  SignMode sign_mode = SignMode::kMax;
  VoteMethod method = VoteMethod::kFast;
  VotePrecision vote_precision = VotePrecision::kF32;
  std::string out;
  std::string head;               // CLIP: the zero-shot head file
  void validate() const;
};

struct TransportJob {
  std::string model;              // empty: built-in; torchscript:ARCHIVE
  std::string target;             // B_base weights
  std::string task_vector;        // tau_A (or source_base + source_finetuned)
  std::string source_base;
  std::string source_finetuned;
  std::string target_finetuned;   // B_ft: enables the oracle and the upper bound
  DataOptions data;               // pool of labelled samples: shots and support set
  DataOptions test;               // test set, read only for the final evaluation
  ShotSelection selection;        // overrides shots_per_class when an indices file or batches are given
  long long shots_per_class = 5;
  long long num_samples = 0;      // decoders: the shots are the first N of a seeded shuffle
  long long support_size = 1000;
  std::uint64_t seed = 0;
  SignMode sign_mode = SignMode::kMax;
  VotePrecision vote_precision = VotePrecision::kF32;  // the votes' products (model directories; sign mode max)
  MaskMode mask_mode = MaskMode::kNormal;
  MaskOptions mask;
  std::vector<double> alphas;     // default 0.1 ... 1.0
  bool few_shot_baseline = true;
  // With the few-shot baseline: the same fine-tuning from B + alpha * masked tau (GradFix's model).
  bool gradfix_finetune = true;
  std::vector<double> finetune_lrs;        // few-shot fine-tuning's Adam learning rates (empty: the model's default)
  std::vector<long long> finetune_steps;   // steps after which the support set is scored (empty: 5, 20, 50)
  // Classifiers: the tensors (regexes over their names) few-shot fine-tuning leaves as they are,
  // e.g. the head, as the paper's baseline keeps the zero-shot head frozen.
  std::vector<std::string> finetune_freeze;
  std::string finetune_freeze_label;       // the row's name for the frozen set (empty: the patterns)
  bool few_shot_unfrozen_too = false;      // with finetune_freeze: also the row that tunes every tensor
  std::string out;                // transported model (safetensors; a model directory for decoders)
  std::string results;            // results.json
  std::string save_support;       // classifiers: write the support set's indices here
  std::string head;               // CLIP: the zero-shot head file
  std::string statistics_cache;   // model directories: a directory of reusable few-shot statistics ("": none)
  void validate() const;
};

// One point of a row's alpha grid: the support set's mean loss (what alpha is chosen by) and the
// shots' own mean loss of B + alpha * d.
struct AlphaPoint {
  double alpha = 0.0;
  double support_loss = 0.0;
  double shots_loss = 0.0;
  double support_accuracy = std::numeric_limits<double>::quiet_NaN();  // classifiers (what chooses their alpha)
};

// One row of the transport table.
struct TransportRow {
  std::string method;
  double accuracy = 0.0;
  double loss = 0.0;
  double alpha = -1.0;           // < 0: not applicable
  double kept = -1.0;            // fraction of tau's non-zero entries kept
  double sign_agreement = -1.0;  // estimated signs against sign(tau_B)
  // <g, d>: g the mean gradient of B's loss on the shots, d the row's update at alpha 1 (tau,
  // the masked tau, ...). Negative: a first-order descent direction of the shots' loss. NaN: the
  // row has no such update (zero-shot, fine-tuned B).
  double directional_derivative = std::numeric_limits<double>::quiet_NaN();
  std::vector<AlphaPoint> curve;  // the alpha grid, for the rows that search one
  // The row's compute: samples passed forward and backward through the network on the shots and
  // the support set (its alpha search, statistics, fine-tuning steps and their scores; the one
  // read of the test set every row makes is not counted). Negative: not known (B fine-tuned).
  long long forward_samples = -1;
  long long backward_samples = -1;
};

// The demo's defaults are the misaligned regime of the paper at Fashion-MNIST scale (docs/demo.md):
// independently initialised releases, a task where B starts low, lazy fine-tunes with the head
// frozen, alpha chosen on a small support set.
struct DemoJob {
  std::string cache = "out/demo";
  std::vector<long long> shots = {1, 2, 5, 10};
  std::vector<std::uint64_t> seeds = {0, 1, 2};
  // The downstream tasks, one input shift each, where B starts at 36-39% (docs/demo.md).
  std::vector<std::string> transforms = {"noise:0.5:14", "rotate:20", "contrast:0.5", "blur:3"};
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  std::string dims = "784,512,512,10";
  int pretrain_epochs = 5;
  int finetune_epochs = 2;
  double finetune_lr = 1e-5;     // the task fine-tunes of A and B (a lazy fine-tune, as the paper's)
  bool freeze_head = true;       // ... with the classification head frozen
  long long pretrain_limit = 0;  // samples per release (0: half the training set each)
  long long finetune_limit = 50000;  // the task fine-tunes' samples; the few-shot pool comes after them
  long long test_limit = 0;
  long long support_size = 200;
  // A second table at K = ablation_shots with a support set this small (what a user with only a
  // few labels would have to choose alpha and the few-shot settings by); 0 skips it.
  long long small_support_size = 100;
  SignMode sign_mode = SignMode::kMax;
  bool independent_init = true;  // initialise A and B with different seeds (false: one shared initialisation)
  std::string selection = "random";  // how the shots are picked (docs/cli.md, --selection)
  // The shot selection ablation: GradFix at K = 1, 2, 5 with every --selection strategy (first task).
  bool selection_ablation = true;
  // The mask mode ablation: GradFix with every mask mode at K = ablation_shots, on every task.
  bool mask_ablation = true;
  long long ablation_shots = 2;
  // Multi-task merging of the tasks' vectors (mean, TIES; masks before or after) at ablation_shots.
  bool merging = true;
  // The alpha grid, searched on the support set: wider than transport's default, as a lazy
  // fine-tune's task vector is short.
  std::vector<double> alphas = {0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5};
  std::string results;  // demo results JSON
  void validate() const;
};

// The language-model demo (gradfix demo --lm, docs/demo.md): two releases of a small Llama-type
// decoder pretrained here from independent initialisations on different mixes of a synthetic
// language, each fine-tuned on small tasks scored on their answers' tokens, and every row of
// transport through the sharded decoder path at N shots per task.
struct LmDemoJob {
  std::string cache = "out/demo-lm";
  std::vector<std::string> tasks = {"reverse", "parity", "add"};
  std::vector<long long> samples = {8, 16, 32};  // N: labelled samples per transport (one table each)
  std::vector<std::uint64_t> seeds = {0, 1, 2};
  int pretrain_epochs = 4;
  long long pretrain_samples = 4096;  // sentences per release
  int finetune_epochs = 4;
  long long finetune_samples = 1024;  // task examples per fine-tune of A and B
  double finetune_lr = 5e-4;          // lazy task fine-tunes, as the vision demo's
  long long pool_samples = 512;       // the few-shot pool: shots and the support set
  long long test_samples = 512;
  long long support_size = 64;
  SignMode sign_mode = SignMode::kMax;
  std::vector<double> alphas = {0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3};
  std::vector<double> finetune_lrs = {1e-3, 3e-3};        // few-shot fine-tuning's grid
  std::vector<long long> finetune_steps = {5, 20};
  bool mask_ablation = true;  // GradFix with the force and random masks at the middle N
  std::string results;
  void validate() const;
};

void run_init(const InitJob& job, std::ostream& log, const JobContext& context = {});
void run_train(const TrainJob& job, std::ostream& log, const JobContext& context = {});
void run_eval(const EvalJob& job, std::ostream& log, const JobContext& context = {});
void run_signs(const SignsJob& job, std::ostream& log, const JobContext& context = {});
std::vector<TransportRow> run_transport(const TransportJob& job, std::ostream& log, const JobContext& context = {});
void run_demo(const DemoJob& job, std::ostream& log, const JobContext& context = {});
void run_lm_demo(const LmDemoJob& job, std::ostream& log, const JobContext& context = {});

// The alpha grid a transport searches unless --alphas says otherwise: the CLI's default and every
// job's that leaves `alphas` empty.
constexpr const char* kDefaultAlphaGrid = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0";
inline std::vector<double> default_alphas() { return {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0}; }

// The index of the best support accuracy (ties: the earlier, i.e. smaller alpha); the test set
// plays no part in the choice.
inline std::size_t best_on_support(const std::vector<double>& support_accuracies) {
  std::size_t best = 0;
  for (std::size_t i = 1; i < support_accuracies.size(); ++i)
    if (support_accuracies[i] > support_accuracies[best]) best = i;
  return best;
}

}  // namespace gradfix
