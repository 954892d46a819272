#pragma once
// Files inside a model directory, and model names of the Hugging Face hub cache.
//
// A directory that the user names is trusted; what lies inside it comes from strangers. In the hub
// cache every file of models--ORG--NAME/snapshots/REV/ is a symbolic link to ../../blobs/HASH, so
// a link inside a model directory is followed when it resolves inside the directory's link root:
// the cache repository folder (models--ORG--NAME/) for a snapshot, the directory itself for any
// other directory. A link that leads anywhere else is refused by name. The rule is the same for
// weights, indexes, configs, adapters and the files carried into outputs.

#include <string>

namespace gradfix {

// The folder that links inside `directory` may lead into (see above).
std::string link_root(const std::string& directory);

// `directory`/`name`, where `name` is a plain file name: the path itself when it is no link, and
// also when it is a link that resolves inside the link root. An InputError names the link, where
// it leads and the root otherwise (also for a dangling link). The path returned is the one under
// `directory`, so that messages name the file the user knows.
std::string model_file(const std::string& directory, const std::string& name);

// Whether `directory`/`name` exists (a link is checked as model_file checks it, and refused the
// same way when it leads outside).
bool has_model_file(const std::string& directory, const std::string& name);

// The hub cache folder: $HF_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub, or
// ~/.cache/huggingface/hub, as huggingface_hub looks it up.
std::string hub_cache_directory();

// A model as the user names it: a path that exists is itself; a hub name ORG/NAME or
// ORG/NAME@REV that is no path here is the snapshot of that revision (default: main, through
// refs/) in the hub cache. A hub name whose snapshot is not in the cache is refused, saying that
// gradfix does not download and how to. Anything else is returned unchanged (the reader then
// says it cannot open it).
std::string resolve_model_reference(const std::string& reference);

}  // namespace gradfix
