#include "gradfix/io/model_files.hpp"

#include <sys/stat.h>

#include <cctype>
#include <climits>
#include <cstdlib>
#include <fstream>

#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

// The canonical path, or empty when some component does not exist.
std::string canonical(const std::string& path) {
  char resolved[PATH_MAX];
  return ::realpath(path.c_str(), resolved) == nullptr ? std::string() : std::string(resolved);
}

// ORG, NAME and REV of the hub are plain names: letters, digits, '.', '_' and '-', not starting
// with a dot (so never "." or "..").
bool is_hub_part(const std::string& part) {
  if (part.empty() || part.size() > 96 || part[0] == '.' || part[0] == '-') return false;
  for (char c : part)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') return false;
  return true;
}

std::string environment(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

}  // namespace

std::string link_root(const std::string& directory) {
  const std::string real = canonical(directory);
  if (real.empty()) return directory;
  const std::string parent = parent_directory(real);
  const std::string repository = parent_directory(parent);
  if (base_name(parent) == "snapshots" && base_name(repository).rfind("models--", 0) == 0) return repository;
  return real;
}

std::string model_file(const std::string& directory, const std::string& name) {
  const std::string path = directory + "/" + name;
  struct stat status {};
  if (::lstat(path.c_str(), &status) != 0 || !S_ISLNK(status.st_mode)) return path;
  const std::string root = link_root(directory);
  const std::string target = canonical(path);
  if (target.empty()) throw InputError(escaped_name(path) + ": a symbolic link that leads nowhere (a download that did not finish?)");
  if (target.compare(0, root.size() + 1, root + "/") != 0)
    throw InputError(escaped_name(path) + ": a symbolic link to " + escaped_name(target) + ", outside " + escaped_name(root) +
                     "; gradfix follows links inside a model directory (or its Hugging Face cache repository) only, so that a "
                     "checkpoint cannot make it read other files: copy the file there, or name it directly");
  return path;
}

bool has_model_file(const std::string& directory, const std::string& name) { return file_exists(model_file(directory, name)); }

std::string hub_cache_directory() {
  if (!environment("HF_HUB_CACHE").empty()) return environment("HF_HUB_CACHE");
  if (!environment("HUGGINGFACE_HUB_CACHE").empty()) return environment("HUGGINGFACE_HUB_CACHE");
  if (!environment("HF_HOME").empty()) return environment("HF_HOME") + "/hub";
  if (!environment("XDG_CACHE_HOME").empty()) return environment("XDG_CACHE_HOME") + "/huggingface/hub";
  return environment("HOME") + "/.cache/huggingface/hub";
}

std::string resolve_model_reference(const std::string& reference) {
  struct stat status {};
  if (reference.empty() || ::stat(reference.c_str(), &status) == 0) return reference;
  const std::size_t at = reference.find('@');
  const std::string name = reference.substr(0, at);
  const std::string revision = at == std::string::npos ? "main" : reference.substr(at + 1);
  const std::size_t slash = name.find('/');
  if (slash == std::string::npos || !is_hub_part(name.substr(0, slash)) || !is_hub_part(name.substr(slash + 1)) || !is_hub_part(revision))
    return reference;
  const std::string cache = hub_cache_directory();
  const std::string repository = cache + "/models--" + name.substr(0, slash) + "--" + name.substr(slash + 1);
  const std::string download = "; gradfix does not download models: run `huggingface-cli download " + name +
                               (at == std::string::npos ? "" : " --revision " + revision) + "` (or `hf download`) first, or name the model's directory";
  if (!is_directory(repository))
    throw InputError("'" + escaped_name(reference) + "' is no path here, and the Hugging Face cache " + escaped_name(cache) +
                     " (HF_HUB_CACHE, HF_HOME) does not hold it" + download);
  // A revision is a commit whose snapshot is present, or a branch or tag whose refs/ file names one.
  std::string commit = revision;
  if (!is_directory(repository + "/snapshots/" + revision)) {
    const std::string ref = repository + "/refs/" + revision;
    if (::stat(ref.c_str(), &status) != 0 || !S_ISREG(status.st_mode) || status.st_size > 256)
      throw InputError(escaped_name(repository) + ": no revision '" + escaped_name(revision) + "' (neither refs/" + escaped_name(revision) +
                       " nor snapshots/" + escaped_name(revision) + ")" + download);
    std::ifstream file(ref);
    std::getline(file, commit);
    while (!commit.empty() && std::isspace(static_cast<unsigned char>(commit.back()))) commit.pop_back();
    if (!is_hub_part(commit)) throw InputError(escaped_name(ref) + ": '" + escaped_name(commit) + "' is not a commit hash");
  }
  const std::string snapshot = repository + "/snapshots/" + commit;
  if (!is_directory(snapshot))
    throw InputError(escaped_name(repository) + ": " + escaped_name(revision) + " is commit " + escaped_name(commit) +
                     ", whose snapshot is not in the cache" + download);
  return snapshot;
}

}  // namespace gradfix
