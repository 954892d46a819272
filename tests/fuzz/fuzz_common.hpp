#pragma once
// Shared by the libFuzzer harnesses (launch/fuzz): each writes the fuzzer's bytes to a file in a
// private directory and runs one reader of untrusted input on it. gradfix::Error is the expected
// way to refuse bad input; anything else (a crash, a sanitizer report, another exception, a hang)
// is a finding.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "gradfix/io/error.hpp"

namespace gradfix_fuzz {

// A directory of this process, made once.
inline const std::string& scratch() {
  static const std::string directory = [] {
    char pattern[] = "/tmp/gradfix-fuzz-XXXXXX";
    const char* made = ::mkdtemp(pattern);
    if (made == nullptr) std::abort();
    return std::string(made);
  }();
  return directory;
}

inline std::string write_file(const std::string& name, const std::uint8_t* data, std::size_t size) {
  const std::string path = scratch() + "/" + name;
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path;
}

// Runs `work`; gradfix's own errors are the expected refusals.
template <typename Work>
int refusals_are_fine(Work work) {
  try {
    work();
  } catch (const gradfix::Error&) {
  }
  return 0;
}

}  // namespace gradfix_fuzz
