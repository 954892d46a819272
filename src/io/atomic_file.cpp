#include "gradfix/io/atomic_file.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "gradfix/core/error.hpp"

namespace gradfix {

std::string parent_directory(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string base_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool is_directory(const std::string& path) {
  struct stat status {};
  return ::stat(path.c_str(), &status) == 0 && S_ISDIR(status.st_mode);
}

bool file_exists(const std::string& path) {
  struct stat status {};
  return ::stat(path.c_str(), &status) == 0;
}

std::string temporary_path_for(const std::string& final_path) {
  static std::atomic<unsigned> counter{0};
  return parent_directory(final_path) + "/." + base_name(final_path) + ".tmp-" + std::to_string(::getpid()) + "-" +
         std::to_string(counter++);
}

bool ensure_directory(const std::string& directory) {
  if (directory.empty() || is_directory(directory)) return false;
  const std::string parent = parent_directory(directory);
  if (parent != directory) ensure_directory(parent);
  if (::mkdir(directory.c_str(), 0777) != 0 && errno != EEXIST)
    throw RuntimeFailure("cannot create directory '" + directory + "': " + std::strerror(errno));
  return true;
}

void rename_file(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0)
    throw RuntimeFailure("cannot rename '" + from + "' to '" + to + "': " + std::strerror(errno));
}

void remove_quietly(const std::string& path) { ::unlink(path.c_str()); }

}  // namespace gradfix
