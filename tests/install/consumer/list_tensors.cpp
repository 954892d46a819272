// Lists the tensors of a checkpoint and sums each one's values, through gradfix::io alone.
#include <iostream>

#include "gradfix/io/error.hpp"
#include "gradfix/io/tensor_store.hpp"
#include "gradfix/version.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: list_tensors CHECKPOINT\n";
    return 2;
  }
  try {
    const auto reader = gradfix::open_reader(argv[1]);
    std::cout << "gradfix " << GRADFIX_VERSION_STRING << "\n";
    for (const auto& tensor : reader->tensors()) {
      double sum = 0.0;
      for (float value : reader->read_f32(tensor.name)) sum += value;
      std::cout << tensor.name << " " << gradfix::dtype_name(tensor.dtype) << " " << gradfix::format_shape(tensor.shape) << " sum "
                << sum << "\n";
    }
  } catch (const gradfix::Error& error) {
    std::cerr << "list_tensors: " << error.what() << "\n";
    return error.exit_code();
  }
  return 0;
}
