// Token data (input_ids, labels, attention_mask) from a safetensors file: shapes, ranges, masks.
#include "fuzz_common.hpp"
#include "gradfix/io/tokens.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = gradfix_fuzz::write_file("tokens.safetensors", data, size);
  return gradfix_fuzz::refusals_are_fine([&] {
    const gradfix::TokenData tokens = gradfix::load_token_data(path, 1LL << 26);
    gradfix::check_vocabulary(tokens, 1000);
  });
}
