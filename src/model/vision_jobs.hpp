#pragma once
// Internal to the LibTorch part: the model jobs on Hugging Face CLIP directories (the vision
// tower with a frozen zero-shot head), with the parameters sharded like the decoders'.

#include <ostream>
#include <vector>

#include "gradfix/model/jobs.hpp"

namespace gradfix {

// eval on preprocessed images: accuracy, mean_loss and per_sample_loss (data order).
void run_clip_eval(const EvalJob& job, std::ostream& log, const JobContext& context);
// signs of the vision tower and visual_projection: a statistics checkpoint under their names.
void run_clip_signs(const SignsJob& job, std::ostream& log, const JobContext& context);

// transport of a task vector of the vision tower, with the parameters sharded (sharded_transport.hpp);
// the shots are K per class (or --num-samples, --indices) of --data, alpha chosen on the support
// set's mean loss, rows with test accuracy.
std::vector<TransportRow> run_clip_transport(const TransportJob& job, std::ostream& log, const JobContext& context);

}  // namespace gradfix
