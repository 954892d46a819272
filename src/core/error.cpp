#include "gradfix/core/error.hpp"

namespace gradfix {

namespace {

// The path below the repository's src/ or include/ folder: short, and the same on every machine.
std::string source_location(const char* file, int line) {
  std::string path = file;
  for (const char* root : {"/src/", "/include/"}) {
    const auto found = path.rfind(root);
    if (found != std::string::npos) {
      path = path.substr(found + 1);
      break;
    }
  }
  return path + ":" + std::to_string(line);
}

}  // namespace

InternalError::InternalError(const char* file, int line, const char* condition, const std::string& message)
    : Error("internal error at " + source_location(file, line) + ": check '" + condition + "' failed: " + message +
                " (please report this with the command line)",
            kExitRuntimeFailure) {}

std::string format_shape(const std::vector<long long>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

std::string format_name_list(const std::vector<std::string>& names, std::size_t limit) {
  std::string text;
  for (std::size_t i = 0; i < names.size() && i < limit; ++i) {
    if (i > 0) text += ", ";
    text += "'" + names[i] + "'";
  }
  if (names.size() > limit) text += " and " + std::to_string(names.size() - limit) + " more";
  return text;
}

}  // namespace gradfix
