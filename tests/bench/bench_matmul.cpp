// The rate of plain LibTorch float32 matrix products of given shapes, on the BLAS and threads that
// gradfix's model subcommands use: the ceiling that bench_vote_rate.sh compares the votes pass
// against, measured in the same run. bench_vote_rate.sh passes gradfix's OpenBLAS kernel
// (OPENBLAS_CORETYPE) to it.
//   build/gradfix_bench_matmul --shapes 1024x512x1408,8@1408x128x512 [--threads 1] [--json out.json]
// MxKxN is [M, K] x [K, N]; B@MxKxN is a batch of B products whose left factor is a transposed
// [B, K, M] view, as the per-sample products G_n^T X_n are formed.
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "bench_flags.hpp"
#include "gradfix/model/jobs.hpp"

namespace {

struct Shape {
  std::string text;
  long long batch = 0, m = 0, k = 0, n = 0;  // batch 0: one plain product
};

Shape parse_shape(const std::string& text) {
  Shape shape{text};
  std::string rest = text;
  const auto at = rest.find('@');
  if (at != std::string::npos) {
    shape.batch = std::stoll(rest.substr(0, at));
    rest = rest.substr(at + 1);
  }
  char x1 = 0, x2 = 0;
  std::istringstream in(rest);
  if (!(in >> shape.m >> x1 >> shape.k >> x2 >> shape.n) || x1 != 'x' || x2 != 'x' || shape.m < 1 || shape.k < 1 || shape.n < 1 ||
      shape.batch < 0) {
    std::fprintf(stderr, "gradfix_bench_matmul: '%s' is not a shape (MxKxN or B@MxKxN)\n", text.c_str());
    std::exit(2);
  }
  return shape;
}

// Seconds per product: the best of 5 timings, each of enough repeats to last about 0.1 s.
double seconds_per_product(const Shape& shape, torch::ScalarType type) {
  torch::manual_seed(1);
  const long long batch = std::max(1LL, shape.batch);
  const auto options = torch::TensorOptions().dtype(type);
  const torch::Tensor left =
      shape.batch > 0 ? torch::randn({batch, shape.k, shape.m}).to(type).transpose(1, 2) : torch::randn({shape.m, shape.k}).to(type);
  const torch::Tensor right = shape.batch > 0 ? torch::randn({batch, shape.k, shape.n}).to(type) : torch::randn({shape.k, shape.n}).to(type);
  torch::Tensor out = shape.batch > 0 ? torch::empty({batch, shape.m, shape.n}, options) : torch::empty({shape.m, shape.n}, options);
  auto run = [&] {
    if (shape.batch > 0) torch::bmm_out(out, left, right);
    else torch::mm_out(out, left, right);
  };
  run();
  const double flops = 2.0 * static_cast<double>(batch * shape.m * shape.k * shape.n);
  const int repeats = std::max(1, static_cast<int>(0.1 / (flops / 100e9)));
  double best = 1e30;
  for (int t = 0; t < 5; ++t) {
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < repeats; ++r) run();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  gradfix::configure_tensor_memory();
  const gradfix::bench::Flags flags(argc, argv, {{"shapes", "1024x512x1408,8@1408x128x512"}, {"threads", "1"}, {"dtype", "f32"}, {"json", "bench_matmul.json"}},
                                    "gradfix_bench_matmul [--shapes MxKxN,B@MxKxN,...] [--threads 1] [--dtype f32|bf16] [--json bench_matmul.json]");
  // The threads as gradfix's model subcommands set them, OpenBLAS's own pool included.
  ::setenv("GRADFIX_THREADS", flags["threads"].c_str(), 1);
  gradfix::configure_threads(1);
  if (flags["dtype"] != "f32" && flags["dtype"] != "bf16") {
    std::fprintf(stderr, "gradfix_bench_matmul: --dtype is f32 or bf16, not '%s'\n", flags["dtype"].c_str());
    return 2;
  }
  const torch::ScalarType type = flags["dtype"] == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  std::vector<Shape> shapes;
  std::stringstream list(flags["shapes"]);
  for (std::string item; std::getline(list, item, ',');) shapes.push_back(parse_shape(item));
  const std::string blas = gradfix::blas_description();
  std::printf("# gradfix bench_matmul: %s products, %d thread(s); %s\n", type == torch::kFloat32 ? "float32" : "bfloat16 (float32 accumulation)",
              torch::get_num_threads(), blas.c_str());
  std::printf("# %22s %12s %10s\n", "shape", "time(ms)", "GFLOP/s");
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& shape : shapes) {
    const double seconds = seconds_per_product(shape, type);
    const double gflops = 2.0 * static_cast<double>(std::max(1LL, shape.batch) * shape.m * shape.k * shape.n) / seconds / 1e9;
    std::printf("  %22s %12.3f %10.1f\n", shape.text.c_str(), seconds * 1e3, gflops);
    rows.push_back({{"shape", shape.text}, {"seconds", seconds}, {"gflops", gflops}});
  }
  std::ofstream(flags["json"]) << nlohmann::json{{"benchmark", "bench_matmul"}, {"threads", torch::get_num_threads()}, {"dtype", flags["dtype"]}, {"blas", blas}, {"rows", rows}}.dump(2)
                               << "\n";
  std::printf("# JSON copy: %s\n", flags["json"].c_str());
  return 0;
}
