// HDF5 checkpoints and datasets: opening, the dataset checks (links, external storage, sizes,
// unwritten storage), the metadata attributes, and reading a few elements. libhdf5 parses the
// file itself: what this harness finds inside libhdf5 is reported as libhdf5's (docs/formats.md).
#include "fuzz_common.hpp"
#include "gradfix/io/dataset.hpp"
#include "gradfix/io/tensor_store.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = gradfix_fuzz::write_file("input.h5", data, size);
  gradfix_fuzz::refusals_are_fine([&] {
    const auto reader = gradfix::open_reader(path);
    (void)reader->metadata();
    for (const auto& tensor : reader->tensors())
      if (tensor.numel() > 0) (void)reader->read_f32(tensor.name, 0, std::min<long long>(tensor.numel(), 4));
  });
  return gradfix_fuzz::refusals_are_fine([&] { (void)gradfix::load_dataset(path); });
}
