// A PEFT adapter directory: the fuzzed bytes are adapter_config.json, split at the first NUL
// byte from adapter_model.safetensors when there is one (so that both the config and the factor
// tensors are mutated). Every delta the reader offers is then read, first and last element.
#include <cstdio>
#include <cstring>

#include "fuzz_common.hpp"
#include "gradfix/io/tensor_store.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* nul = static_cast<const std::uint8_t*>(std::memchr(data, 0, size));
  const std::size_t config_size = nul == nullptr ? size : static_cast<std::size_t>(nul - data);
  gradfix_fuzz::write_file("adapter_config.json", data, config_size);
  // Without a NUL byte there is no tensor file: each input stands alone, whatever ran before.
  if (nul != nullptr) gradfix_fuzz::write_file("adapter_model.safetensors", nul + 1, size - config_size - 1);
  else std::remove((gradfix_fuzz::scratch() + "/adapter_model.safetensors").c_str());
  return gradfix_fuzz::refusals_are_fine([&] {
    const auto reader = gradfix::open_reader(gradfix_fuzz::scratch());
    for (const auto& tensor : reader->tensors()) {
      if (tensor.numel() == 0) continue;
      (void)reader->read_f32(tensor.name, 0, 1);
      (void)reader->read_f32(tensor.name, tensor.numel() - 1, 1);
    }
  });
}
