// Writes the hostile HDF5 files of the regression catalogue (tests/cli/regressions.sh) into a
// directory, with the HDF5 C API: each is valid HDF5 that a checkpoint or dataset must not be.
//   make_hostile_hdf5 DIR
#include <hdf5.h>

#include <cstdio>
#include <fstream>
#include <string>

namespace {

hid_t create(const std::string& path) { return H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT); }

// One written float dataset "w" [4], so that a file also holds something valid.
void add_valid(hid_t file) {
  const hsize_t dims[1] = {4};
  const float values[4] = {1, 2, 3, 4};
  const hid_t space = H5Screate_simple(1, dims, nullptr);
  const hid_t set = H5Dcreate2(file, "w", H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  H5Dwrite(set, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values);
  H5Dclose(set);
  H5Sclose(space);
}

// A dataset of `rank` dimensions of `dim` each, declared and never written.
void declared(const std::string& path, int rank, hsize_t dim, bool chunked) {
  const hid_t file = create(path);
  hsize_t dims[3] = {dim, dim, dim};
  const hid_t space = H5Screate_simple(rank, dims, nullptr);
  const hid_t creation = H5Pcreate(H5P_DATASET_CREATE);
  if (chunked) {
    hsize_t chunk[3] = {1024, 1, 1};
    H5Pset_chunk(creation, rank, chunk);
  }
  const hid_t set = H5Dcreate2(file, "huge", H5T_IEEE_F32LE, space, H5P_DEFAULT, creation, H5P_DEFAULT);
  if (set < 0) std::fprintf(stderr, "%s: HDF5 refused to declare it\n", path.c_str());
  else H5Dclose(set);
  H5Pclose(creation);
  H5Sclose(space);
  H5Fclose(file);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_hostile_hdf5 DIR\n");
    return 2;
  }
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const std::string dir = argv[1];

  // External storage: the dataset's bytes are those of another file.
  std::ofstream(dir + "/secret.bin", std::ios::binary) << std::string(16, 'S');
  {
    const hid_t file = create(dir + "/external_storage.h5");
    const hid_t creation = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_external(creation, (dir + "/secret.bin").c_str(), 0, 16);
    const hsize_t dims[1] = {4};
    const hid_t space = H5Screate_simple(1, dims, nullptr);
    const hid_t set = H5Dcreate2(file, "w", H5T_IEEE_F32LE, space, H5P_DEFAULT, creation, H5P_DEFAULT);
    H5Dclose(set);
    H5Sclose(space);
    H5Pclose(creation);
    H5Fclose(file);
  }
  // An external link into another file, and a soft link.
  {
    const hid_t file = create(dir + "/external_link.h5");
    add_valid(file);
    H5Lcreate_external("other.h5", "/w", file, "linked", H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(file);
    const hid_t soft = create(dir + "/soft_link.h5");
    add_valid(soft);
    H5Lcreate_soft("/w", soft, "alias", H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(soft);
  }
  // A null dataspace: no elements at all.
  {
    const hid_t file = create(dir + "/null_space.h5");
    const hid_t space = H5Screate(H5S_NULL);
    const hid_t set = H5Dcreate2(file, "nothing", H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dclose(set);
    H5Sclose(space);
    H5Fclose(file);
  }
  // Declared sizes: 2^40 floats never written (chunked: allowed by HDF5), (2^32)^3 and (2^21)^3.
  declared(dir + "/unwritten.h5", 1, hsize_t{1} << 40, true);
  declared(dir + "/overflow_elements.h5", 3, hsize_t{1} << 32, true);
  declared(dir + "/overflow_bytes.h5", 3, hsize_t{1} << 21, true);
  // A dataset file whose 'inputs' are declared at 2 TB.
  {
    const hid_t file = create(dir + "/huge_inputs.h5");
    const hsize_t dims[2] = {hsize_t{1} << 29, 1024};
    const hid_t space = H5Screate_simple(2, dims, nullptr);
    const hid_t creation = H5Pcreate(H5P_DATASET_CREATE);
    const hsize_t chunk[2] = {64, 1024};
    H5Pset_chunk(creation, 2, chunk);
    H5Dclose(H5Dcreate2(file, "inputs", H5T_IEEE_F32LE, space, H5P_DEFAULT, creation, H5P_DEFAULT));
    H5Sclose(space);
    H5Pclose(creation);
    const hsize_t count[1] = {hsize_t{1} << 29};
    const hid_t labels = H5Screate_simple(1, count, nullptr);
    const hid_t label_creation = H5Pcreate(H5P_DATASET_CREATE);
    const hsize_t label_chunk[1] = {4096};
    H5Pset_chunk(label_creation, 1, label_chunk);
    H5Dclose(H5Dcreate2(file, "labels", H5T_STD_I64LE, labels, H5P_DEFAULT, label_creation, H5P_DEFAULT));
    H5Sclose(labels);
    H5Pclose(label_creation);
    H5Fclose(file);
  }
  // A dataset file with a label of INT64_MAX.
  {
    const hid_t file = create(dir + "/huge_label.h5");
    const hsize_t dims[2] = {2, 4};
    const float inputs[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    hid_t space = H5Screate_simple(2, dims, nullptr);
    hid_t set = H5Dcreate2(file, "inputs", H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(set, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, inputs);
    H5Dclose(set);
    H5Sclose(space);
    const hsize_t count[1] = {2};
    const long long labels[2] = {1, 9223372036854775807LL};
    space = H5Screate_simple(1, count, nullptr);
    set = H5Dcreate2(file, "labels", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(set, H5T_NATIVE_LLONG, H5S_ALL, H5S_ALL, H5P_DEFAULT, labels);
    H5Dclose(set);
    H5Sclose(space);
    H5Fclose(file);
  }
  return 0;
}
