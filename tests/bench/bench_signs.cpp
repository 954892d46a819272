// `signs --sign-mode max` cost per sample: the fast path (one batched backward pass, per-sample
// signs from captured inputs and output gradients) against one backward pass per sample,
// measured in the same run, for each built-in architecture at 16, 64 and 256 samples. Prints a
// table and writes a JSON copy.
//   build/gradfix_bench_signs [--json bench_signs.json]
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "../../src/model/classifier.hpp"
#include "bench_flags.hpp"
#include "gradfix/model/jobs.hpp"

namespace {

template <typename Work>
double best_seconds(Work work, int repeats) {
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    work();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const gradfix::bench::Flags flags(argc, argv, {{"json", "bench_signs.json"}}, "gradfix_bench_signs [--json bench_signs.json]");
  const std::string json_path = flags["json"];
  gradfix::configure_allocator();  // as the classifier jobs do
  struct Case {
    const char* arch;
    const char* dims;
    std::vector<int64_t> sample_shape;
  };
  const Case cases[] = {{"mlp", "784,256,10", {28, 28}}, {"cnn", "1,28,28,16,32,10", {1, 28, 28}},
                        {"vit", "1,28,28,7,64,2,4,128,10", {1, 28, 28}}};
  nlohmann::json rows = nlohmann::json::array();
  std::printf("# gradfix bench_signs: vote sums, fast path vs one backward pass per sample (same run), %d threads\n",
              torch::get_num_threads());
  std::printf("# %6s %24s %8s %14s %14s %10s\n", "arch", "dims", "samples", "fast(ms/smp)", "loop(ms/smp)", "speed-up");
  for (const auto& c : cases) {
    auto model = gradfix::make_classifier(gradfix::parse_architecture(c.arch, c.dims), 1);
    for (int64_t samples : {16, 64, 256}) {
      std::vector<int64_t> shape = {samples};
      shape.insert(shape.end(), c.sample_shape.begin(), c.sample_shape.end());
      torch::manual_seed(samples);
      const torch::Tensor inputs = torch::rand(shape), labels = torch::randint(0, model->classes(), {samples}, torch::kInt64);
      std::map<std::string, torch::Tensor> votes;
      const double fast = best_seconds([&] { model->fast_votes(inputs, labels, votes); }, 10);
      std::map<std::string, torch::Tensor> reference;
      const double loop = best_seconds([&] { reference = gradfix::loop_votes(*model, inputs, labels); }, 3);
      // The fast votes must be the loop's, up to entries whose gradient is within rounding of zero.
      // A ViT's key bias has a gradient of zero in theory: the fast path casts no vote there and
      // the loop votes with autograd's rounding noise, so that third is left out (as in the tests).
      long long equal = 0, total = 0;
      for (const auto& [name, values] : reference) {
        torch::Tensor same = votes.at(name).eq(values);
        if (name.size() > 13 && name.compare(name.size() - 13, 13, "attn.qkv.bias") == 0) {
          const int64_t third = values.size(0) / 3;
          same = torch::cat({same.slice(0, 0, third), same.slice(0, 2 * third)});
        }
        equal += same.sum().item<int64_t>();
        total += same.numel();
      }
      gradfix::bench::require(static_cast<double>(equal) >= 0.999 * static_cast<double>(total),
                              std::string(c.arch) + ": fast votes equal the loop's on only " + std::to_string(equal) + " of " +
                                  std::to_string(total) + " entries");
      const double per_fast = 1e3 * fast / static_cast<double>(samples), per_loop = 1e3 * loop / static_cast<double>(samples);
      std::printf("  %6s %24s %8lld %14.4f %14.4f %10.1f\n", c.arch, c.dims, static_cast<long long>(samples), per_fast, per_loop, loop / fast);
      rows.push_back({{"arch", c.arch}, {"dims", c.dims}, {"samples", samples}, {"fast_ms_per_sample", per_fast},
                      {"loop_ms_per_sample", per_loop}, {"speedup", loop / fast}});
    }
  }
  std::ofstream(json_path) << nlohmann::json{{"benchmark", "bench_signs"}, {"rows", rows}}.dump(2) << "\n";
  std::printf("# JSON copy: %s\n", json_path.c_str());
  return 0;
}
