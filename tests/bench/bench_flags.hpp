#pragma once
// The flags of a benchmark: `--name value` pairs from a fixed list, each with its default. An
// unknown flag, a flag without its value, or a stray argument is an error (exit 2) that prints
// the usage, so a typo never runs a benchmark with silently different settings.

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

namespace gradfix::bench {

class Flags {
 public:
  // `defaults` lists every accepted flag (without dashes) and its value when not given.
  Flags(int argc, char** argv, std::map<std::string, std::string> defaults, const char* usage) : values_(std::move(defaults)) {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      std::string name = arg.rfind("--", 0) == 0 ? arg.substr(2) : std::string();
      std::string value;
      bool has_value = false;
      const auto equals = name.find('=');
      if (equals != std::string::npos) {
        value = name.substr(equals + 1);
        name.resize(equals);
        has_value = true;
      }
      if (name == "help") {
        std::printf("usage: %s\n", usage);
        std::exit(0);
      }
      if (name.empty() || values_.count(name) == 0) fail(usage, "unknown argument '" + arg + "'");
      if (!has_value) {
        if (i + 1 >= argc) fail(usage, "--" + name + " needs a value");
        value = argv[++i];
      }
      values_[name] = value;
    }
  }

  const std::string& operator[](const std::string& name) const { return values_.at(name); }

 private:
  [[noreturn]] static void fail(const char* usage, const std::string& message) {
    std::fprintf(stderr, "error: %s\nusage: %s\n", message.c_str(), usage);
    std::exit(2);
  }

  std::map<std::string, std::string> values_;
};

// A benchmark whose timed work produced a wrong result stops: its numbers would mean nothing.
inline void require(bool condition, const std::string& what) {
  if (condition) return;
  std::fprintf(stderr, "error: the timed work gave a wrong result: %s\n", what.c_str());
  std::exit(1);
}

}  // namespace gradfix::bench
