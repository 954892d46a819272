// Throughput of `apply` and `mask` (read, compute in fp32, write) against a plain copy of the
// same output bytes measured in the same run. Not a test: it prints a table and writes a JSON
// copy; nothing here fails on a time.
//
//   gradfix_bench_io [--sizes 256MB,2GB] [--dtypes F32,BF16] [--dir /tmp] [--json bench_io.json]
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "bench_flags.hpp"
#include "gradfix/cli/cli.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/tensor_store.hpp"
#include "gradfix/jobs/jobs.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using gradfix::DType;
using gradfix::TensorInfo;

constexpr long long kRows = 4096;

// Square-ish 2-D tensors of 16M elements each (64 MB in fp32), the size class of a large
// transformer's projection matrices, with a smaller last one to reach the target bytes.
std::vector<TensorInfo> layout_for(long long bytes, DType dtype) {
  const long long elements = bytes / static_cast<long long>(gradfix::dtype_size(dtype));
  const long long per_tensor = kRows * kRows;
  std::vector<TensorInfo> layout;
  long long left = elements;
  for (int i = 0; left > 0; ++i) {
    const long long cols = std::min(per_tensor, left) / kRows;
    if (cols == 0) break;
    layout.push_back({"blocks." + std::to_string(i) + ".weight", dtype, {kRows, cols}});
    left -= kRows * cols;
  }
  return layout;
}

// A cheap deterministic fill (xorshift), so that generating gigabytes stays fast.
void write_model(const std::string& path, const std::vector<TensorInfo>& layout, std::uint64_t seed, float scale) {
  auto writer = gradfix::open_writer(path, layout, {});
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ULL + 1;
  std::vector<float> values;
  for (const auto& tensor : layout) {
    values.resize(static_cast<std::size_t>(tensor.numel()));
    for (auto& value : values) {
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      value = scale * (static_cast<float>(state >> 40) / 16777216.0f - 0.5f);
    }
    writer->write_f32(tensor.name, 0, values.data(), tensor.numel());
  }
  writer->commit();
}

// The baseline: read one file and write its bytes to a new one, with the same fsync and rename
// the gradfix writers do.
void plain_copy(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY);
  const std::string temporary = gradfix::temporary_path_for(to);
  const int out = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char> buffer(8 << 20);
  ssize_t got;
  while ((got = ::read(in, buffer.data(), buffer.size())) > 0)
    if (::write(out, buffer.data(), static_cast<std::size_t>(got)) != got) throw std::runtime_error("short write");
  ::fsync(out);
  ::close(out);
  ::close(in);
  gradfix::rename_file(temporary, to);
}

template <typename Work>
double seconds(Work work) {
  const auto start = Clock::now();
  work();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The first and last 65536 elements of every tensor of `out` against `rule(a, b)` computed here
// from the inputs, rounded to the output dtype the same way: the timed job wrote the right bytes.
template <typename Rule>
void check_output(const std::string& out, const std::string& a_path, const std::string& b_path,
                  const std::vector<TensorInfo>& layout, Rule rule, const char* op, const std::string& = "") {
  const auto result = gradfix::open_reader(out), a = gradfix::open_reader(a_path), b = gradfix::open_reader(b_path);
  for (const auto& tensor : layout) {
    const long long span = std::min(tensor.numel(), 65536LL);
    for (long long begin : {0LL, tensor.numel() - span}) {
      const auto got = result->read_f32(tensor.name, begin, span);
      const auto x = a->read_f32(tensor.name, begin, span), y = b->read_f32(tensor.name, begin, span);
      std::vector<float> want(static_cast<std::size_t>(span));
      for (std::size_t i = 0; i < want.size(); ++i) want[i] = rule(x[i], y[i], 0.0f);
      std::vector<unsigned char> rounded(want.size() * gradfix::dtype_size(tensor.dtype));
      gradfix::convert_from_f32(tensor.dtype, want.data(), rounded.data(), want.size());
      gradfix::convert_to_f32(tensor.dtype, rounded.data(), want.data(), want.size());
      for (std::size_t i = 0; i < want.size(); ++i)
        gradfix::bench::require(got[i] == want[i], std::string(op) + ": " + out + ": tensor '" + tensor.name + "' element " +
                                                        std::to_string(begin + static_cast<long long>(i)) + " is " +
                                                        std::to_string(got[i]) + ", expected " + std::to_string(want[i]));
    }
  }
}

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, ',')) parts.push_back(part);
  return parts;
}

}  // namespace

int main(int argc, char** argv) {
  const gradfix::bench::Flags flags(argc, argv, {{"sizes", "256MB,2GB"}, {"dtypes", "F32,BF16"}, {"dir", "/tmp"}, {"json", "bench_io.json"}},
                                    "gradfix_bench_io [--sizes 256MB,2GB] [--dtypes F32,BF16] [--dir /tmp] [--json bench_io.json]");
  const std::string sizes = flags["sizes"], dtypes = flags["dtypes"], dir = flags["dir"], json_path = flags["json"];
  const std::string work = dir + "/gradfix-bench-" + std::to_string(::getpid());
  gradfix::ensure_directory(work);
  nlohmann::json rows = nlohmann::json::array();
  std::printf("# gradfix bench_io: apply and mask against a plain copy of the output bytes (same run)\n");
  std::printf("# %10s %6s %8s %10s %10s %10s\n", "bytes", "dtype", "op", "time(s)", "GB/s", "vs copy");
  for (const auto& size_text : split(sizes)) {
    const long long bytes = gradfix::parse_byte_size(size_text, "--sizes");
    for (const auto& dtype_text : split(dtypes)) {
      const auto parsed_dtype = gradfix::parse_dtype(dtype_text);
      if (!parsed_dtype || (*parsed_dtype != DType::kF32 && *parsed_dtype != DType::kBF16 && *parsed_dtype != DType::kF16)) {
        std::fprintf(stderr, "error: --dtypes: '%s' is not F32, F16 or BF16\n", dtype_text.c_str());
        return 2;
      }
      const auto dtype = *parsed_dtype;
      const auto layout = layout_for(bytes, dtype);
      long long actual = 0;
      for (const auto& tensor : layout) actual += tensor.nbytes();
      const std::string base = work + "/base.safetensors", tau = work + "/tau.safetensors",
                        signs = work + "/signs.safetensors", out = work + "/out.safetensors";
      write_model(base, layout, 1, 0.1f);
      write_model(tau, layout, 2, 0.01f);
      write_model(signs, layout, 3, 1.0f);
      std::ostringstream quiet;
      const double copy = seconds([&] { plain_copy(base, out); });
      const double apply = seconds([&] { gradfix::run_apply({base, tau, 0.5, out, {}}, quiet); });
      check_output(out, base, tau, layout, [](float b, float t, float) { return b + 0.5f * t; }, "apply");
      gradfix::MaskJob mask_job;
      mask_job.task_vector = tau;
      mask_job.signs = signs;
      mask_job.out = out;
      const double mask = seconds([&] { gradfix::run_mask(mask_job, quiet); });
      check_output(out, tau, signs, layout, [](float t, float s, float) { return (t > 0) == (s > 0) && (t < 0) == (s < 0) ? t : 0.0f; },
                   "mask", signs);
      for (const auto& [op, time] : std::vector<std::pair<std::string, double>>{{"copy", copy}, {"apply", apply}, {"mask", mask}}) {
        const double rate = static_cast<double>(actual) / time / 1e9;
        std::printf("  %10lld %6s %8s %10.3f %10.3f %10.2f\n", actual, dtype_text.c_str(), op.c_str(), time, rate, time / copy);
        rows.push_back({{"bytes", actual}, {"dtype", dtype_text}, {"op", op}, {"seconds", time}, {"gb_per_s", rate},
                        {"time_vs_copy", time / copy}});
      }
      for (const auto& path : {base, tau, signs, out}) gradfix::remove_quietly(path);
    }
  }
  ::rmdir(work.c_str());
  std::ofstream(json_path) << nlohmann::json{{"benchmark", "bench_io"}, {"rows", rows}}.dump(2) << "\n";
  std::printf("# JSON copy: %s\n", json_path.c_str());
  return 0;
}
