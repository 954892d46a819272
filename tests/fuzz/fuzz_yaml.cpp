// mergekit merge configurations (gradfix merge --config MERGE.yml): the YAML reader (libyaml,
// aliases refused, depth and node count bounded) and the translation into a merge job. The job
// is not run: the models it names do not exist here.
#include "fuzz_common.hpp"
#include "gradfix/cli/mergekit.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = gradfix_fuzz::write_file("merge.yml", data, size);
  return gradfix_fuzz::refusals_are_fine([&] { (void)gradfix::mergekit_job(path); });
}
