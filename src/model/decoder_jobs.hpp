#pragma once
// Internal to the LibTorch part: the model jobs on Hugging Face decoder directories.

#include <ostream>
#include <vector>

#include "gradfix/model/jobs.hpp"

namespace gradfix {

// eval on token data: mean_loss, per_sample_loss (data order) and token_accuracy. Samples are
// split across ranks (every P-th), so the results do not depend on the number of ranks.
void run_decoder_eval(const EvalJob& job, std::ostream& log, const JobContext& context);

// A randomly initialised decoder as a Hugging Face directory: config.json and sharded
// safetensors (transformers' initialisation: N(0, initializer_range) for matrices and
// embeddings, ones for norms, zeros for biases), seeded per tensor.
void run_decoder_init(const InitJob& job, std::ostream& log, const JobContext& context);

// signs on token data with the parameters sharded across ranks (sharded_executor.hpp): a
// statistics checkpoint under the model's tensor names, byte-identical (max) at any P.
void run_decoder_signs(const SignsJob& job, std::ostream& log, const JobContext& context);

// train on token data with the parameters sharded: minibatch Adam (sharded_train), the trained
// model written as a directory in the input's format with its model files, the same bytes at any
// P; the data's mean loss before and after is printed.
void run_decoder_train(const TrainJob& job, std::ostream& log, const JobContext& context);

// transport on token data with the parameters sharded (no rank holds B, tau or the transported
// model whole): zero-shot, naive and GradFix rows (oracle and upper bound with B fine-tuned), the
// alpha of each chosen on the support set's mean loss, the GradFix model written as B's format.
std::vector<TransportRow> run_decoder_transport(const TransportJob& job, std::ostream& log, const JobContext& context);

}  // namespace gradfix
