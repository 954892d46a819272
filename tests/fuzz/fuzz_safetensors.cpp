// The safetensors header and file checks: open, list, read the first and last elements of every
// tensor (the offsets, dtypes and shapes a stranger's header declares).
#include "fuzz_common.hpp"
#include "gradfix/io/tensor_store.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = gradfix_fuzz::write_file("input.safetensors", data, size);
  return gradfix_fuzz::refusals_are_fine([&] {
    const auto reader = gradfix::open_reader(path);
    for (const auto& tensor : reader->tensors()) {
      const long long count = tensor.numel();
      if (count == 0) continue;
      (void)reader->read_f32(tensor.name, 0, std::min<long long>(count, 4));
      (void)reader->read_f32(tensor.name, count - 1, 1);
    }
  });
}
