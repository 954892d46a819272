// The sharded index (model.safetensors.index.json) beside two valid shards: names, the shard set,
// paths that would lead out of the directory.
#include "fuzz_common.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace {

// Two valid shards of one tensor each ("a" in the first, "b" in the second).
void write_shards() {
  static bool written = false;
  if (written) return;
  written = true;
  for (const char* name : {"a", "b"}) {
    const std::string header = std::string("{\"") + name + "\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((padded.size() >> (8 * i)) & 0xFF);
    bytes += padded + std::string(8, '\0');
    const std::string file = std::string(name) == "a" ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    gradfix_fuzz::write_file(file, reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  write_shards();
  gradfix_fuzz::write_file("model.safetensors.index.json", data, size);
  return gradfix_fuzz::refusals_are_fine([&] {
    const auto reader = gradfix::open_reader(gradfix_fuzz::scratch());
    for (const auto& tensor : reader->tensors())
      if (tensor.numel() > 0) (void)reader->read_f32(tensor.name, 0, 1);
  });
}
