#include "gradfix/io/atomic_file.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "gradfix/io/error.hpp"

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

std::string new_temporary_token() {
  static std::atomic<unsigned> counter{0};
  return std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

std::string temporary_path_for(const std::string& final_path, const std::string& token) {
  return parent_directory(final_path) + "/." + base_name(final_path) + ".tmp-" + (token.empty() ? new_temporary_token() : token);
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

void write_text_file_atomically(const std::string& path, const std::string& text) {
  const std::string temporary = temporary_path_for(path);
  {
    std::ofstream file(temporary);
    file << text;
    if (!file) {
      remove_quietly(temporary);
      throw RuntimeFailure(path + ": cannot write");
    }
  }
  rename_file(temporary, path);
}

namespace {

// Fixed storage, so that the signal handler touches no allocator.
constexpr int kMaxTemporaries = 256;
constexpr std::size_t kMaxPath = 4096;
char g_temporaries[kMaxTemporaries][kMaxPath];
volatile std::sig_atomic_t g_used[kMaxTemporaries];

void on_signal(int signal_number) {
  remove_registered_temporaries();
  std::_Exit(128 + signal_number);
}

}  // namespace

void register_temporary(const std::string& path) {
  if (path.size() >= kMaxPath) return;
  for (int i = 0; i < kMaxTemporaries; ++i) {
    if (!g_used[i]) {
      std::memcpy(g_temporaries[i], path.c_str(), path.size() + 1);
      g_used[i] = 1;
      return;
    }
  }
}

void unregister_temporary(const std::string& path) {
  for (int i = 0; i < kMaxTemporaries; ++i)
    if (g_used[i] && path == g_temporaries[i]) g_used[i] = 0;
}

void remove_registered_temporaries() noexcept {
  // Newest first: the files inside a directory created for a sharded output go before it.
  for (int i = kMaxTemporaries - 1; i >= 0; --i) {
    if (g_used[i]) {
      ::unlink(g_temporaries[i]);
      ::rmdir(g_temporaries[i]);  // a directory created for a sharded output
      g_used[i] = 0;
    }
  }
}

void install_cleanup_signal_handlers() {
  struct sigaction action {};
  action.sa_handler = on_signal;
  sigemptyset(&action.sa_mask);
  for (int signal_number : {SIGTERM, SIGINT, SIGHUP}) ::sigaction(signal_number, &action, nullptr);
}

}  // namespace gradfix
