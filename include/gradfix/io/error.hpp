#pragma once
// Errors carry enough context to act on: the file, the tensor, the rank and the two values that
// disagree. `main` maps the two kinds to exit codes, so scripts can tell a bad input (fix the
// command) from a failure of the machine (retry the job).

#include <stdexcept>
#include <string>
#include <vector>

namespace gradfix {

constexpr int kExitBadInput = 2;
constexpr int kExitRuntimeFailure = 3;

class Error : public std::runtime_error {
 public:
  Error(const std::string& message, int exit_code) : std::runtime_error(message), exit_code_(exit_code) {}
  int exit_code() const { return exit_code_; }

  // Every rank of the job knows of this failure (it was agreed on in a collective step), so each
  // can exit normally; an error that is not agreed must end the other ranks with MPI_Abort.
  bool agreed() const { return agreed_; }
  void mark_agreed() { agreed_ = true; }
  // Another rank reports this failure; this rank exits with its code without printing it.
  bool silent() const { return silent_; }

 protected:
  bool silent_ = false;

 private:
  int exit_code_;
  bool agreed_ = false;
};

// This rank stopped because another rank failed and reported why.
class PeerFailure : public Error {
 public:
  PeerFailure(const std::string& message, int exit_code) : Error(message, exit_code) {
    silent_ = true;
    mark_agreed();
  }
};

// A collective that did not complete within --timeout: some rank stopped answering. Not agreed
// (the others cannot be asked), so main removes this rank's temporaries and ends the job.
class CollectiveTimeout : public Error {
 public:
  explicit CollectiveTimeout(const std::string& message) : Error(message, kExitRuntimeFailure) {}
};

// The user's input is wrong: a missing or corrupt file, names or shapes that do not match, an
// option out of range.
class InputError : public Error {
 public:
  explicit InputError(const std::string& message) : Error(message, kExitBadInput) {}
};

// The input was fine but the work failed: a full disk, a failed write, a communication error.
class RuntimeFailure : public Error {
 public:
  explicit RuntimeFailure(const std::string& message) : Error(message, kExitRuntimeFailure) {}
};

// A broken invariant of gradfix itself, not of the input: a bug to report. The message says
// where (file:line) and which condition failed, so a report from a user's cluster points at the
// line. Exit code 3, like the other failures that are not the input's fault.
class InternalError : public Error {
 public:
  InternalError(const char* file, int line, const char* condition, const std::string& message);
};

// Throws InternalError when `condition` is false; `message` is evaluated only then.
#define GRADFIX_CHECK(condition, message)                                                  \
  do {                                                                                     \
    if (!(condition)) throw ::gradfix::InternalError(__FILE__, __LINE__, #condition, (message)); \
  } while (0)

// "[768, 3072]": the form every message uses for a shape.
std::string format_shape(const std::vector<long long>& shape);

// The shortest text that reads back to exactly `value` ("1e-07", "0.5", "inf"): how numbers are
// recorded in metadata and messages, so that no digit a user gave is lost.
std::string format_number(double value);

// Whether `text` is valid UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF).
bool is_valid_utf8(const std::string& text);
// A name read from a file, safe to print and to put in JSON: valid UTF-8 is kept as it is, bytes
// that are not printable (control characters, escape sequences) or not part of valid UTF-8 become
// \xNN, and a backslash becomes \\. Names from files are printed only through this.
std::string escaped_name(const std::string& name);

// Lists at most `limit` names (escaped), then "and N more", so that a message about a 10,000-tensor
// checkpoint stays readable.
std::string format_name_list(const std::vector<std::string>& names, std::size_t limit = 8);

}  // namespace gradfix
