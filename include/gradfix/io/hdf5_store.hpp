#pragma once
// HDF5 checkpoints: one dataset per tensor, the tensor name being the dataset path. bf16 and f16
// have no portable HDF5 type, so they are stored as uint16 with a "gradfix_dtype" attribute that
// names the real type; the safetensors __metadata__ becomes string attributes of the root group.

#include <memory>
#include <string>
#include <vector>

#include "gradfix/io/tensor_store.hpp"

namespace gradfix {

constexpr const char* kHdf5DtypeAttribute = "gradfix_dtype";

std::unique_ptr<TensorReader> open_hdf5_reader(const std::string& path);

// Walks the structure of an HDF5 file with libhdf5 (links, object headers, each dataset's
// dataspace, type, creation properties and first element, the root attributes), ignoring its
// errors: what the probe process runs before a file is opened for reading, since libhdf5 can crash
// on a corrupt file (docs/formats.md). The probe is the executable gradfix-hdf5-probe beside the
// running program, started with posix_spawn (no fork of a process that may hold registered RDMA
// memory); a program without it beside forks a child for the walk instead.
void walk_hdf5_structure(const std::string& path);

// "1.10.8", the HDF5 library in use, and whether it was built for MPI-IO (parallel HDF5).
std::string hdf5_version();
bool hdf5_is_parallel();
// With role.hdf5_file_access set (gradfix::dist sets MPI-IO there), every process of the role
// creates the file and its datasets together, and each writes its own ranges.
std::unique_ptr<TensorWriter> open_hdf5_writer(const std::string& path, const std::vector<TensorInfo>& layout,
                                               const Metadata& metadata, const WriterRole& role = {});

}  // namespace gradfix
