#include "gradfix/io/safetensors.hpp"

#include <gtest/gtest.h>

#include <cstring>

#include "../support/test_files.hpp"
#include "gradfix/io/error.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {
namespace {

using testing::TempDir;
using testing::float_bytes;
using testing::safetensors_bytes;
using testing::write_bytes;

// The message of the InputError that opening `bytes` as a safetensors file raises.
std::string open_error(const std::string& bytes) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  write_bytes(path, bytes);
  try {
    open_reader(path);
  } catch (const InputError& error) {
    return error.what();
  }
  return "no error";
}

TEST(Safetensors, ReadsAHandBuiltFile) {
  TempDir dir;
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[24,32]},)"
      R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"e":{"dtype":"F16","shape":[0,4],"data_offsets":[32,32]},)"
      R"("s":{"dtype":"I8","shape":[],"data_offsets":[32,33]}})";
  std::string data = float_bytes({1, 2, 3, 4, 5, 6}) + float_bytes({-1, -2}) + std::string(1, static_cast<char>(-5));
  write_bytes(dir.file("m.safetensors"), safetensors_bytes(header, data));

  const auto reader = open_reader(dir.file("m.safetensors"));
  ASSERT_EQ(reader->tensors().size(), 4u);
  EXPECT_EQ(reader->tensors()[0].name, "a");  // file order is offset order
  EXPECT_EQ(reader->info("a").shape, (std::vector<long long>{2, 3}));
  EXPECT_EQ(reader->read_f32("a"), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(reader->read_f32("a", 2, 3), (std::vector<float>{3, 4, 5}));
  EXPECT_EQ(reader->read_f32("b"), (std::vector<float>{-1, -2}));
  EXPECT_EQ(reader->info("e").numel(), 0);
  EXPECT_TRUE(reader->read_f32("e").empty());
  EXPECT_EQ(reader->info("s").numel(), 1);
  EXPECT_EQ(reader->read_f32("s"), (std::vector<float>{-5}));
  EXPECT_EQ(reader->metadata().at("format"), "pt");
  EXPECT_THROW(reader->read_f32("a", 4, 3), InputError);
  EXPECT_THROW(reader->read_f32("missing"), InputError);
}

TEST(Safetensors, RoundTripsEveryDtypeWithMetadataAndAlignment) {
  TempDir dir;
  std::vector<TensorInfo> layout;
  const char* names[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"};
  // Odd element counts, mixed order: the writer must still align every tensor.
  long long length = 3;
  for (const char* name : names) layout.push_back({std::string("t.") + name, *parse_dtype(name), {length++}});
  layout.push_back({"scalar", DType::kF32, {}});
  layout.push_back({"empty", DType::kBF16, {0, 7}});
  const Metadata metadata = {{"gradfix.arch", "mlp"}, {"note", "x"}};
  std::vector<std::string> raw(layout.size());
  {
    auto writer = open_writer(dir.file("all.safetensors"), layout, metadata);
    for (std::size_t i = 0; i < layout.size(); ++i) {
      raw[i].resize(static_cast<std::size_t>(layout[i].nbytes()));
      for (std::size_t b = 0; b < raw[i].size(); ++b) raw[i][b] = static_cast<char>((b * 37 + i * 11) & 0x7F);
      if (layout[i].dtype == DType::kBool)
        for (auto& byte : raw[i]) byte = static_cast<char>(byte & 1);
      writer->write_raw(layout[i].name, 0, layout[i].numel(), raw[i].data());
    }
    writer->commit();
  }
  const std::string bytes = testing::read_bytes(dir.file("all.safetensors"));
  std::uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data(), 8);
  EXPECT_EQ((8 + header_length) % 8, 0u) << "header must be padded to a multiple of 8";

  const auto reader = open_reader(dir.file("all.safetensors"));
  EXPECT_EQ(reader->metadata(), metadata);
  for (std::size_t i = 0; i < layout.size(); ++i) {
    const TensorInfo& info = reader->info(layout[i].name);
    EXPECT_EQ(info.dtype, layout[i].dtype);
    EXPECT_EQ(info.shape, layout[i].shape);
    std::string back(static_cast<std::size_t>(info.nbytes()), '\0');
    reader->read_raw(info.name, 0, info.numel(), back.data());
    EXPECT_EQ(back, raw[i]) << info.name;
  }
  // Every tensor starts at a multiple of its element size in the mapped file.
  const std::string header = bytes.substr(8, header_length);
  for (const auto& info : layout) {
    const auto key = header.find("\"" + info.name + "\"");
    const auto offsets = header.find("data_offsets", key);
    const long long begin = std::stoll(header.substr(header.find('[', offsets) + 1));
    EXPECT_EQ((8 + static_cast<long long>(header_length) + begin) % static_cast<long long>(dtype_size(info.dtype)), 0)
        << info.name;
  }
}

TEST(Safetensors, WritesRangesInAnyOrderAndRefusesGaps) {
  TempDir dir;
  const std::vector<TensorInfo> layout = {{"w", DType::kF32, {4, 5}}};
  const auto values = testing::random_values(20, 1);
  {
    auto writer = open_writer(dir.file("r.safetensors"), layout, {});
    writer->write_f32("w", 12, values.data() + 12, 8);
    writer->write_f32("w", 0, values.data(), 12);
    writer->commit();
  }
  EXPECT_EQ(open_reader(dir.file("r.safetensors"))->read_f32("w"), values);
  {
    auto writer = open_writer(dir.file("gap.safetensors"), layout, {});
    writer->write_f32("w", 0, values.data(), 10);
    EXPECT_THROW(writer->commit(), RuntimeFailure);
  }
  // The failed writer left nothing behind: neither the final name nor a temporary file.
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"r.safetensors"}));
}

TEST(Safetensors, ShardedCheckpointMatchesSingleFile) {
  TempDir dir;
  std::vector<TensorInfo> layout;
  for (int i = 0; i < 7; ++i) layout.push_back({"layer." + std::to_string(i) + ".weight", DType::kBF16, {16, 8 + i}});
  std::vector<std::vector<float>> values;
  for (int i = 0; i < 7; ++i) values.push_back(testing::random_values(static_cast<std::size_t>(layout[i].numel()), 10 + i));
  for (const std::string& out : {dir.file("single.safetensors"), dir.file("sharded")}) {
    WriteOptions options;
    options.max_shard_bytes = 700;  // tensors of 256 to 448 bytes: five shards
    auto writer = open_writer(out, layout, {{"k", "v"}}, options);
    for (int i = 0; i < 7; ++i) writer->write_f32(layout[i].name, 0, values[i].data(), layout[i].numel());
    writer->commit();
  }
  EXPECT_TRUE(testing::read_bytes(dir.file("sharded/model.safetensors.index.json")).find("\"total_size\": 2464") != std::string::npos);
  EXPECT_FALSE(testing::read_bytes(dir.file("sharded/" + shard_file_name(5, 5))).empty());
  const auto single = open_reader(dir.file("single.safetensors"));
  for (const std::string& path : {dir.file("sharded"), dir.file("sharded/model.safetensors.index.json")}) {
    const auto sharded = open_reader(path);
    ASSERT_EQ(sharded->tensors().size(), 7u);
    EXPECT_EQ(sharded->metadata().at("k"), "v");
    for (const auto& tensor : layout) {
      EXPECT_EQ(sharded->read_f32(tensor.name), single->read_f32(tensor.name));
      EXPECT_EQ(sharded->read_f32(tensor.name, 5, 20), single->read_f32(tensor.name, 5, 20));
    }
  }
  EXPECT_EQ(shard_file_name(2, 3), "model-00002-of-00003.safetensors");
}

TEST(Safetensors, ShardedIndexMustAgreeWithItsFiles) {
  TempDir dir;
  {
    // Named by its index, a checkpoint of one shard is still an indexed set.
    auto writer = open_writer(dir.file("ckpt/model.safetensors.index.json"), {{"a", DType::kF32, {2}}}, {});
    const float values[2] = {1, 2};
    writer->write_f32("a", 0, values, 2);
    writer->commit();
  }
  write_bytes(dir.file("ckpt/model.safetensors.index.json"),
              R"({"metadata":{},"weight_map":{"a":"model-00001-of-00001.safetensors","b":"model-00001-of-00001.safetensors"}})");
  try {
    open_reader(dir.file("ckpt"));
    FAIL() << "expected an error";
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("'b'"), std::string::npos) << error.what();
  }
  EXPECT_THROW(open_reader(dir.file("nothing-here/")), InputError);
}

// Each malformed file is refused with a message that names what is wrong.
TEST(SafetensorsBadInput, MissingFile) {
  try {
    open_reader("/nonexistent/dir/model.safetensors");
    FAIL();
  } catch (const InputError& error) {
    EXPECT_NE(std::string(error.what()).find("/nonexistent/dir/model.safetensors"), std::string::npos);
  }
}

TEST(SafetensorsBadInput, TooShortForTheLength) { EXPECT_NE(open_error("abc").find("too short"), std::string::npos); }

TEST(SafetensorsBadInput, HeaderLengthLargerThanFile) {
  std::string bytes = safetensors_bytes("{}", "");
  bytes[0] = 100;
  EXPECT_NE(open_error(bytes).find("header length 100 is larger than the file"), std::string::npos);
}

TEST(SafetensorsBadInput, HeaderLengthOverLimit) {
  std::string bytes(16, ' ');
  const std::uint64_t length = 200'000'000;
  std::memcpy(bytes.data(), &length, 8);
  EXPECT_NE(open_error(bytes).find("exceeds the limit"), std::string::npos);
}

TEST(SafetensorsBadInput, InvalidJson) {
  EXPECT_NE(open_error(safetensors_bytes("{\"a\": [1,", "")).find("not valid JSON"), std::string::npos);
  EXPECT_NE(open_error(safetensors_bytes("[1, 2]  ", "")).find("does not start with '{'"), std::string::npos);
}

TEST(SafetensorsBadInput, DuplicateNames) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  EXPECT_NE(open_error(safetensors_bytes(header, std::string(8, '\0'))).find("names 'a' twice"), std::string::npos);
}

// A tensor of a dtype gradfix does not know is set aside (its bytes still checked for place),
// so that --exclude can leave it out; the jobs refuse it when selected (tests/cli/cli_test.cpp).
TEST(SafetensorsBadInput, UnknownDtypeIsSetAside) {
  const std::string header =
      R"({"a":{"dtype":"F8_E9M9","shape":[3],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})";
  TempDir dir;
  testing::write_bytes(dir.file("u.safetensors"), safetensors_bytes(header, std::string(2, '\0')));
  const auto reader = open_reader(dir.file("u.safetensors"));
  ASSERT_EQ(reader->tensors().size(), 1u);
  EXPECT_EQ(reader->tensors()[0].name, "b");
  ASSERT_EQ(reader->unreadable().size(), 1u);
  EXPECT_EQ(reader->unreadable()[0].first, "a");
  EXPECT_EQ(reader->unreadable()[0].second, "F8_E9M9");
  // Its place in the data section is still checked: offsets past the end are refused.
  const std::string past = R"({"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,9]}})";
  EXPECT_NE(open_error(safetensors_bytes(past, std::string(1, '\0'))).find("truncated"), std::string::npos);
}

TEST(SafetensorsBadInput, ShapeDisagreesWithOffsets) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})";
  const std::string message = open_error(safetensors_bytes(header, std::string(8, '\0')));
  EXPECT_NE(message.find("needs 12 bytes, data_offsets span 8"), std::string::npos) << message;
}

TEST(SafetensorsBadInput, ShapeOverflow) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,0]}})";
  EXPECT_NE(open_error(safetensors_bytes(header, "")).find("overflows"), std::string::npos);
}

TEST(SafetensorsBadInput, OverlappingOffsets) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  EXPECT_NE(open_error(safetensors_bytes(header, std::string(12, '\0'))).find("overlapping"), std::string::npos);
}

TEST(SafetensorsBadInput, HoleBetweenTensors) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})";
  EXPECT_NE(open_error(safetensors_bytes(header, std::string(12, '\0'))).find("hole"), std::string::npos);
}

TEST(SafetensorsBadInput, OffsetsBeyondTheFile) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})";
  const std::string message = open_error(safetensors_bytes(header, std::string(8, '\0')));
  EXPECT_NE(message.find("truncated"), std::string::npos) << message;
}

TEST(SafetensorsBadInput, TrailingBytes) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  EXPECT_NE(open_error(safetensors_bytes(header, std::string(9, '\0'))).find("data section has 9 bytes"), std::string::npos);
}

TEST(SafetensorsBadInput, MalformedEntries) {
  EXPECT_NE(open_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", "")).find("not a non-negative integer"),
            std::string::npos);
  EXPECT_NE(open_error(safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4]}})", "")).find("data_offsets"),
            std::string::npos);
  EXPECT_NE(open_error(safetensors_bytes(R"({"__metadata__":{"k":1}})", "")).find("not a string"), std::string::npos);
}

}  // namespace
}  // namespace gradfix
