#include "gradfix/io/hdf5_store.hpp"

#include <gtest/gtest.h>

#include "../support/test_files.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {
namespace {

using testing::TempDir;

std::vector<TensorInfo> every_dtype_layout() {
  std::vector<TensorInfo> layout;
  long long length = 2;
  for (const char* name : {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"})
    layout.push_back({std::string("group/") + name, *parse_dtype(name), {3, length++}});
  layout.push_back({"scalar", DType::kF64, {}});
  layout.push_back({"empty", DType::kF32, {0}});
  layout.push_back({"model.layers.0.weight", DType::kBF16, {2, 3, 4}});
  return layout;
}

std::string pattern_bytes(const TensorInfo& info, std::size_t salt) {
  std::string raw(static_cast<std::size_t>(info.nbytes()), '\0');
  for (std::size_t b = 0; b < raw.size(); ++b) raw[b] = static_cast<char>((b * 29 + salt * 7) & 0x7F);
  if (info.dtype == DType::kBool)
    for (auto& byte : raw) byte = static_cast<char>(byte & 1);
  return raw;
}

void write_layout(const std::string& path, const std::vector<TensorInfo>& layout, const Metadata& metadata) {
  auto writer = open_writer(path, layout, metadata);
  for (std::size_t i = 0; i < layout.size(); ++i) {
    const std::string raw = pattern_bytes(layout[i], i);
    writer->write_raw(layout[i].name, 0, layout[i].numel(), raw.data());
  }
  writer->commit();
}

TEST(Hdf5, RoundTripsEveryDtypeShapeAndMetadata) {
  TempDir dir;
  const auto layout = every_dtype_layout();
  const Metadata metadata = {{"gradfix.arch", "mlp"}, {"gradfix.mlp.dims", "784,256,10"}};
  write_layout(dir.file("m.h5"), layout, metadata);
  const auto reader = open_reader(dir.file("m.h5"));
  EXPECT_EQ(reader->metadata(), metadata);
  ASSERT_EQ(reader->tensors().size(), layout.size());
  for (std::size_t i = 0; i < layout.size(); ++i) {
    const TensorInfo& info = reader->info(layout[i].name);
    EXPECT_EQ(info.dtype, layout[i].dtype) << info.name;
    EXPECT_EQ(info.shape, layout[i].shape) << info.name;
    std::string back(static_cast<std::size_t>(info.nbytes()), '\0');
    reader->read_raw(info.name, 0, info.numel(), back.data());
    EXPECT_EQ(back, pattern_bytes(layout[i], i)) << info.name;
  }
}

// Every flat range of a 3-D tensor reads back the same elements as a slice of the whole.
TEST(Hdf5, PartialReadsOfEveryFlatRange) {
  TempDir dir;
  const std::vector<TensorInfo> layout = {{"t", DType::kF32, {3, 4, 5}}};
  const auto values = testing::random_values(60, 3);
  {
    auto writer = open_writer(dir.file("t.hdf5"), layout, {});
    writer->write_f32("t", 0, values.data(), 60);
    writer->commit();
  }
  const auto reader = open_reader(dir.file("t.hdf5"));
  for (long long begin = 0; begin <= 60; ++begin) {
    for (long long end = begin; end <= 60; ++end) {
      const auto part = reader->read_f32("t", begin, end - begin);
      ASSERT_EQ(part, std::vector<float>(values.begin() + begin, values.begin() + end)) << begin << ".." << end;
    }
  }
}

// Writes of flat ranges in any order, then the round trip safetensors -> HDF5 -> safetensors
// gives back the same bytes for every dtype.
TEST(Hdf5, RangeWritesAndFormatRoundTrip) {
  TempDir dir;
  const std::vector<TensorInfo> layout = {{"t", DType::kF32, {3, 4, 5}}};
  const auto values = testing::random_values(60, 4);
  {
    auto writer = open_writer(dir.file("t.h5"), layout, {});
    writer->write_f32("t", 37, values.data() + 37, 23);
    writer->write_f32("t", 3, values.data() + 3, 34);
    writer->write_f32("t", 0, values.data(), 3);
    writer->commit();
  }
  EXPECT_EQ(open_reader(dir.file("t.h5"))->read_f32("t"), values);

  const auto every = every_dtype_layout();
  write_layout(dir.file("a.safetensors"), every, {{"k", "v"}});
  for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
           {"a.safetensors", "b.h5"}, {"b.h5", "c.safetensors"}}) {
    const auto reader = open_reader(dir.file(from));
    auto writer = open_writer(dir.file(to), reader->tensors(), reader->metadata());
    for (const auto& info : reader->tensors()) {
      std::string raw(static_cast<std::size_t>(info.nbytes()), '\0');
      reader->read_raw(info.name, 0, info.numel(), raw.data());
      writer->write_raw(info.name, 0, info.numel(), raw.data());
    }
    writer->commit();
  }
  const auto first = open_reader(dir.file("a.safetensors"));
  const auto last = open_reader(dir.file("c.safetensors"));
  EXPECT_EQ(last->metadata(), first->metadata());
  for (const auto& info : first->tensors()) {
    std::string a(static_cast<std::size_t>(info.nbytes()), '\0'), c = a;
    first->read_raw(info.name, 0, info.numel(), a.data());
    last->read_raw(info.name, 0, info.numel(), c.data());
    EXPECT_EQ(a, c) << info.name;
    EXPECT_EQ(last->info(info.name).dtype, info.dtype);
  }
}

TEST(Hdf5, BadInput) {
  TempDir dir;
  EXPECT_THROW(open_reader(dir.file("missing.h5")), InputError);
  testing::write_bytes(dir.file("junk.h5"), "this is not an HDF5 file at all");
  try {
    open_reader(dir.file("junk.h5"));
    FAIL();
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("junk.h5"), std::string::npos);
  }
  // A truncated HDF5 file: the first half of a valid one.
  write_layout(dir.file("whole.h5"), every_dtype_layout(), {});
  const std::string bytes = testing::read_bytes(dir.file("whole.h5"));
  testing::write_bytes(dir.file("half.h5"), bytes.substr(0, bytes.size() / 2));
  EXPECT_THROW(
      {
        const auto reader = open_reader(dir.file("half.h5"));
        for (const auto& info : reader->tensors()) reader->read_f32(info.name);
      },
      InputError);
}

}  // namespace
}  // namespace gradfix
