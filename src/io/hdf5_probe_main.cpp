// gradfix-hdf5-probe FILE: walks the structure of an HDF5 file with libhdf5 and exits 0. gradfix
// runs it (posix_spawn) before it opens an HDF5 file, because libhdf5 can crash on a corrupt
// file: a crash here costs nothing but this process (docs/formats.md).
#include <cstdio>

#include "gradfix/io/hdf5_store.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: gradfix-hdf5-probe FILE\n");
    return 2;
  }
  gradfix::walk_hdf5_structure(argv[1]);
  return 0;
}
