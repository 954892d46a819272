#pragma once
// The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the
// tensor bytes. The reader memory-maps the file and validates the header before trusting it;
// the sharded reader and writer add the model.safetensors.index.json of multi-file checkpoints.

#include <memory>
#include <string>
#include <vector>

#include "gradfix/io/tensor_store.hpp"

namespace gradfix {

// Headers larger than this are refused, as the format's reference reader refuses them.
constexpr long long kMaxSafetensorsHeaderBytes = 100'000'000;
constexpr const char* kSafetensorsIndexName = "model.safetensors.index.json";
// A checkpoint directory of one file, as save_pretrained writes small models.
constexpr const char* kSafetensorsSingleName = "model.safetensors";

std::unique_ptr<TensorReader> open_safetensors_reader(const std::string& path);
// `path` is the checkpoint directory or its index file.
std::unique_ptr<TensorReader> open_sharded_safetensors_reader(const std::string& path);

std::unique_ptr<TensorWriter> open_safetensors_writer(const std::string& path, const std::vector<TensorInfo>& layout,
                                                      const Metadata& metadata, const WriterRole& role = {});
// Writes model-0000i-of-0000n.safetensors files of at most `max_shard_bytes` each and the index,
// into the directory `path`; a checkpoint that fits one file is written as model.safetensors
// alone (no index), as save_pretrained writes it, unless `path` names the index file.
std::unique_ptr<TensorWriter> open_sharded_safetensors_writer(const std::string& path,
                                                              const std::vector<TensorInfo>& layout,
                                                              const Metadata& metadata, long long max_shard_bytes,
                                                              const WriterRole& role = {}, bool force = false);

// The directory of a sharded checkpoint named by the directory or by its index file.
std::string sharded_checkpoint_directory(const std::string& path);

// "model-00002-of-00005.safetensors".
std::string shard_file_name(int index, int count);

// The order in which the writer stores tensors: largest element size first, the given order
// within one size, so that every tensor starts at a multiple of its element size when mapped.
std::vector<TensorInfo> aligned_storage_order(const std::vector<TensorInfo>& layout);

}  // namespace gradfix
