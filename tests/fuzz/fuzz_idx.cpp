// IDX images and labels (the MNIST format, gzipped or not): the first byte chooses which of the two
// files gets the fuzzer's bytes; the other is a valid file of 2 samples.
#include "fuzz_common.hpp"
#include "gradfix/io/dataset.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  static const std::uint8_t kImages[16 + 8] = {0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8};
  static const std::uint8_t kLabels[8 + 2] = {0, 0, 8, 1, 0, 0, 0, 2, 0, 1};
  const bool images = (data[0] & 1) == 0;
  gradfix_fuzz::write_file("x-images-idx3-ubyte", images ? data + 1 : kImages, images ? size - 1 : sizeof kImages);
  gradfix_fuzz::write_file("x-labels-idx1-ubyte", images ? kLabels : data + 1, images ? sizeof kLabels : size - 1);
  return gradfix_fuzz::refusals_are_fine([&] { (void)gradfix::load_dataset(gradfix_fuzz::scratch() + "/x-images-idx3-ubyte"); });
}
