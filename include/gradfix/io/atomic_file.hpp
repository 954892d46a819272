#pragma once
// Publishing a file only when it is complete: write under a hidden temporary name in the target
// directory (so the final rename stays on one file system and is atomic), then rename.

#include <string>

namespace gradfix {

// A token unique to this process and call: "<pid>-<counter>".
std::string new_temporary_token();
// A temporary name beside `final_path`: ".<name>.tmp-<token>", with a fresh token when none is
// given. Processes that write one output together pass the same token.
std::string temporary_path_for(const std::string& final_path, const std::string& token = "");

// Creates the directory (and its parents) when missing; returns whether it created it.
bool ensure_directory(const std::string& directory);

// Writes `text` to a temporary beside `path`, then renames it into place (reports, results).
void write_text_file_atomically(const std::string& path, const std::string& text);

// rename(2), throwing RuntimeFailure with both names on failure.
void rename_file(const std::string& from, const std::string& to);

// unlink(2) that ignores a missing file: used on the error path, which must not throw.
void remove_quietly(const std::string& path);

// Temporary outputs of this process, removed by remove_registered_temporaries() when the
// process must stop early: on an error before MPI_Abort, and from the SIGTERM handler that
// mpirun and Slurm use to stop the other ranks. Removal there is async-signal-safe.
void register_temporary(const std::string& path);
void unregister_temporary(const std::string& path);
void remove_registered_temporaries() noexcept;
// Installs handlers for SIGTERM, SIGINT and SIGHUP that remove the registered temporaries and
// exit with 128 + the signal number.
void install_cleanup_signal_handlers();

std::string parent_directory(const std::string& path);
std::string base_name(const std::string& path);
bool is_directory(const std::string& path);
bool file_exists(const std::string& path);

}  // namespace gradfix
