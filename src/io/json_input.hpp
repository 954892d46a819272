#pragma once
// JSON and small text files from strangers (checkpoint indexes, adapter configs): parsed only
// after a linear first pass bounds the nesting depth (nlohmann's parser recurses, so a file of
// a million '[' would overflow the stack) and refuses names given twice in the top-level object.
// Private to gradfix::io.

#include <nlohmann/json.hpp>
#include <string>

namespace gradfix {

// Throws InputError naming `path` and `what` ("header", "index", "adapter config").
nlohmann::json parse_untrusted_json(const std::string& text, const std::string& path, const char* what);
// The whole file, refused (InputError) when larger than `limit` bytes.
std::string read_small_file(const std::string& path, long long limit);

}  // namespace gradfix
