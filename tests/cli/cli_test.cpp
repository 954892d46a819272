// The gradfix binary as users run it: exit codes, messages that name the file, tensor and the
// disagreeing values, and no output left behind after a failure.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cmath>
#include <fstream>
#include <cstring>
#include <limits>

#include "../support/test_files.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {
namespace {

using testing::TempDir;

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

CommandResult gradfix(const std::string& arguments) {
  const std::string command = std::string(GRADFIX_BINARY) + " " + arguments + " 2>&1";
  CommandResult run;
  FILE* pipe = ::popen(command.c_str(), "r");
  char buffer[4096];
  std::size_t got;
  while ((got = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) run.output.append(buffer, got);
  const int status = ::pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

void save(const std::string& path, const std::vector<TensorInfo>& layout, float offset, float poison = 0.0f) {
  auto writer = open_writer(path, layout, {});
  for (const auto& tensor : layout) {
    std::vector<float> values(static_cast<std::size_t>(tensor.numel()));
    for (std::size_t i = 0; i < values.size(); ++i) values[i] = offset + 0.25f * static_cast<float>(i) - 1.0f;
    if (poison != 0.0f && !values.empty()) values[values.size() - 1] = poison;
    writer->write_f32(tensor.name, 0, values.data(), tensor.numel());
  }
  writer->commit();
}

const std::vector<TensorInfo> kLayout = {{"a.weight", DType::kF32, {4, 3}}, {"a.bias", DType::kF32, {4}}};

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    save(dir_.file("base.safetensors"), kLayout, 0.0f);
    save(dir_.file("ft.safetensors"), kLayout, 0.5f);
    save(dir_.file("signs.safetensors"), kLayout, -0.3f);
  }
  // Runs a command that must fail with exit code 2, and checks the message and that `out` does
  // not exist and no temporary file is left in the directory.
  void expect_bad_input(const std::string& arguments, const std::vector<std::string>& message_parts) {
    const auto before = dir_.entries();
    const CommandResult run = gradfix(arguments);
    EXPECT_EQ(run.exit_code, 2) << arguments << "\n" << run.output;
    for (const auto& part : message_parts) EXPECT_NE(run.output.find(part), std::string::npos) << "missing '" << part << "' in: " << run.output;
    EXPECT_EQ(dir_.entries(), before) << "a failed run must leave nothing behind: " << arguments;
  }
  std::string f(const std::string& name) const { return dir_.file(name); }
  TempDir dir_;
};

TEST_F(CliTest, HelpAndVersion) {
  EXPECT_EQ(gradfix("--help").exit_code, 0);
  for (const char* subcommand : {"inspect", "taskvector", "mask", "merge", "apply", "convert", "generate"}) {
    const CommandResult run = gradfix(std::string(subcommand) + " --help");
    EXPECT_EQ(run.exit_code, 0) << subcommand;
    EXPECT_NE(run.output.find("usage: gradfix " + std::string(subcommand)), std::string::npos) << run.output;
  }
  EXPECT_EQ(gradfix("").exit_code, 1);
  expect_bad_input("frobnicate", {"unknown subcommand 'frobnicate'"});
}

// What users check before submitting a job: the version, and one line per capability.
TEST_F(CliTest, VersionListsTheBuildsCapabilities) {
  const CommandResult run = gradfix("--version");
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_EQ(run.output.rfind("gradfix 0.", 0), 0u) << run.output;
  for (const char* line : {"\n  mpi       ", "\n  nccl      ", "\n  cuda      ", "\n  libtorch  ", "\n  hdf5      ", "\n  backends  mpi"})
    EXPECT_NE(run.output.find(line), std::string::npos) << "missing '" << line << "' in: " << run.output;
  // This build links a parallel HDF5 (launch/setup installs libhdf5-openmpi-dev).
  EXPECT_NE(run.output.find("parallel (MPI-IO)"), std::string::npos) << run.output;
}

// A config file through Boost's INI parser: top-level keys, this subcommand's section, other
// subcommands' sections skipped, flags winning, and unknown keys or sections refused.
TEST_F(CliTest, ConfigFileSectionsAndPrecedence) {
  {
    std::ofstream config(f("apply.ini"));
    config << "# comment\nalpha = 2\n[apply]\nbase = " << f("base.safetensors") << "\ntask-vector = " << f("ft.safetensors")
           << "\nout = " << f("from_config.safetensors") << "\n[mask]\nbeta = 3\n";
  }
  CommandResult run = gradfix("apply --config " + f("apply.ini") + " --alpha 0.5");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  auto result = open_reader(f("from_config.safetensors"));
  auto base = open_reader(f("base.safetensors")), ft = open_reader(f("ft.safetensors"));
  // The flag (0.5) wins over the file (2): base + 0.5 * ft.
  EXPECT_EQ(result->read_f32("a.bias")[1], base->read_f32("a.bias")[1] + 0.5f * ft->read_f32("a.bias")[1]);
  {
    std::ofstream config(f("bad_key.ini"));
    config << "[apply]\nalpah = 2\n";
  }
  expect_bad_input("apply --config " + f("bad_key.ini") + " --base x --task-vector y --out " + f("o.safetensors"),
                   {"bad_key.ini", "'alpah' is not an option of 'gradfix apply'"});
  {
    std::ofstream config(f("bad_section.ini"));
    config << "[aply]\nalpha = 2\n";
  }
  expect_bad_input("apply --config " + f("bad_section.ini") + " --base x --task-vector y --out " + f("o.safetensors"),
                   {"section [aply] is not a subcommand"});
}

TEST_F(CliTest, FullChainSucceeds) {
  ASSERT_EQ(gradfix("taskvector --base " + f("base.safetensors") + " --finetuned " + f("ft.safetensors") + " --out " + f("tau.h5")).exit_code, 0);
  ASSERT_EQ(gradfix("mask --task-vector " + f("tau.h5") + " --signs " + f("signs.safetensors") + " --mask-mode soft1 --out " + f("m.safetensors")).exit_code, 0);
  ASSERT_EQ(gradfix("merge --task-vector " + f("tau.h5") + " --task-vector " + f("m.safetensors") + " --method ties --ties-elect mass --out " + f("merged")).exit_code, 0);
  const CommandResult apply = gradfix("apply --base " + f("base.safetensors") + " --task-vector " + f("merged") + " --alpha 0.3 --out-dtype bf16 --out " + f("final.safetensors"));
  ASSERT_EQ(apply.exit_code, 0) << apply.output;
  const auto reader = open_reader(f("final.safetensors"));
  EXPECT_EQ(reader->info("a.weight").dtype, DType::kBF16);
  const CommandResult inspect = gradfix("inspect " + f("final.safetensors") + " " + f("base.safetensors"));
  EXPECT_EQ(inspect.exit_code, 0);
  EXPECT_NE(inspect.output.find("a.weight"), std::string::npos);
  EXPECT_EQ(gradfix("convert " + f("final.safetensors") + " " + f("final.h5")).exit_code, 0);
  EXPECT_EQ(open_reader(f("final.h5"))->read_f32("a.bias"), reader->read_f32("a.bias"));
}

TEST_F(CliTest, GenerateIsSeededAndFollowsLike) {
  ASSERT_EQ(gradfix("generate --mlp 5,4,3 --seed 7 --noise 0.5 --out " + f("g1.safetensors")).exit_code, 0);
  ASSERT_EQ(gradfix("generate --mlp 5,4,3 --seed 7 --noise 0.5 --out " + f("g2.h5")).exit_code, 0);
  const auto a = open_reader(f("g1.safetensors"));
  EXPECT_EQ(a->info("layers.0.weight").shape, (std::vector<long long>{4, 5}));
  EXPECT_EQ(a->info("layers.1.bias").shape, (std::vector<long long>{3}));
  EXPECT_EQ(a->read_f32("layers.1.weight"), open_reader(f("g2.h5"))->read_f32("layers.1.weight"));
  ASSERT_EQ(gradfix("generate --like " + f("g1.safetensors") + " --like-scale -2 --noise 0 --out " + f("g3.safetensors")).exit_code, 0);
  const auto original = a->read_f32("layers.0.bias");
  const auto scaled = open_reader(f("g3.safetensors"))->read_f32("layers.0.bias");
  for (std::size_t i = 0; i < original.size(); ++i) EXPECT_EQ(scaled[i], -2.0f * original[i]);
  expect_bad_input("generate --mlp 5 --out " + f("x.safetensors"), {"at least two widths"});
  expect_bad_input("generate --shapes w=3xq --out " + f("x.safetensors"), {"'q' is not a dimension"});
}

TEST_F(CliTest, ConfigFileWithFlagsWinning) {
  testing::write_bytes(f("job.ini"), "# a transport job\nalpha = 0.5\n[apply]\nbase = " + f("base.safetensors") +
                                         "\ntask-vector = " + f("ft.safetensors") + "\nout = " + f("from-config.safetensors") +
                                         "\n[mask]\nmask-mode = force\n");
  ASSERT_EQ(gradfix("apply --config " + f("job.ini") + " --alpha 2").exit_code, 0);
  const auto out = open_reader(f("from-config.safetensors"))->read_f32("a.bias");
  const auto base = open_reader(f("base.safetensors"))->read_f32("a.bias");
  const auto ft = open_reader(f("ft.safetensors"))->read_f32("a.bias");
  for (std::size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out[i], base[i] + 2.0f * ft[i]);  // the flag's alpha
  testing::write_bytes(f("typo.ini"), "alpah = 0.5\n");
  expect_bad_input("apply --config " + f("typo.ini") + " --base x.safetensors", {"typo.ini", "'alpah'"});
}

TEST_F(CliTest, MissingFile) {
  expect_bad_input("taskvector --base " + f("nope.safetensors") + " --finetuned " + f("ft.safetensors") + " --out " + f("o.safetensors"),
                   {"nope.safetensors", "No such file"});
}

TEST_F(CliTest, TruncatedFile) {
  const std::string bytes = testing::read_bytes(f("ft.safetensors"));
  testing::write_bytes(f("cut.safetensors"), bytes.substr(0, bytes.size() - 10));
  expect_bad_input("taskvector --base " + f("base.safetensors") + " --finetuned " + f("cut.safetensors") + " --out " + f("o.safetensors"),
                   {"cut.safetensors", "truncated"});
}

TEST_F(CliTest, HeaderLengthLargerThanFile) {
  std::string bytes = testing::read_bytes(f("ft.safetensors"));
  bytes[5] = 1;  // a header length of about 2^40
  testing::write_bytes(f("long.safetensors"), bytes);
  expect_bad_input("inspect " + f("long.safetensors"), {"long.safetensors", "header length"});
}

TEST_F(CliTest, InvalidJsonHeader) {
  testing::write_bytes(f("json.safetensors"), testing::safetensors_bytes("{\"a.weight\": {", ""));
  expect_bad_input("inspect " + f("json.safetensors"), {"json.safetensors", "not valid JSON"});
}

TEST_F(CliTest, UnknownDtype) {
  testing::write_bytes(f("dt.safetensors"),
                       testing::safetensors_bytes(R"({"a.weight":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}})", "x"));
  expect_bad_input("convert " + f("dt.safetensors") + " " + f("dt2.safetensors"),
                   {"dt.safetensors", "'a.weight'", "stored as 'Q4'", "--exclude '^a\\.weight$'"});
}

TEST_F(CliTest, OverlappingOffsets) {
  testing::write_bytes(f("ov.safetensors"),
                       testing::safetensors_bytes(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                                  std::string(12, '\0')));
  expect_bad_input("mask --task-vector " + f("ov.safetensors") + " --signs " + f("signs.safetensors") + " --out " + f("o.safetensors"),
                   {"ov.safetensors", "'y'", "overlapping"});
}

TEST_F(CliTest, NamesThatDiffer) {
  save(f("other.safetensors"), {{"a.weight", DType::kF32, {4, 3}}, {"b.bias", DType::kF32, {4}}}, 0.0f);
  expect_bad_input("taskvector --base " + f("base.safetensors") + " --finetuned " + f("other.safetensors") + " --out " + f("o.safetensors"),
                   {"other.safetensors", "lacks", "'a.bias'"});
}

TEST_F(CliTest, ShapesThatDiffer) {
  save(f("t.safetensors"), {{"a.weight", DType::kF32, {3, 4}}, {"a.bias", DType::kF32, {4}}}, 0.0f);
  expect_bad_input("taskvector --base " + f("base.safetensors") + " --finetuned " + f("t.safetensors") + " --out " + f("o.h5"),
                   {"'a.weight'", "[4, 3]", "[3, 4]", "base.safetensors", "t.safetensors"});
}

TEST_F(CliTest, NonFiniteInputs) {
  save(f("nan.safetensors"), kLayout, 0.0f, std::numeric_limits<float>::quiet_NaN());
  save(f("inf.h5"), kLayout, 0.0f, std::numeric_limits<float>::infinity());
  expect_bad_input("apply --base " + f("base.safetensors") + " --task-vector " + f("nan.safetensors") + " --out " + f("o.safetensors"),
                   {"nan.safetensors", "'a.weight'", "element 11 is NaN", "--allow-nonfinite"});
  expect_bad_input("taskvector --base " + f("inf.h5") + " --finetuned " + f("ft.safetensors") + " --out " + f("o.safetensors"),
                   {"inf.h5", "infinite"});
  const CommandResult allowed = gradfix("apply --allow-nonfinite --base " + f("base.safetensors") + " --task-vector " + f("nan.safetensors") + " --out " + f("o.safetensors"));
  EXPECT_EQ(allowed.exit_code, 0) << allowed.output;
  EXPECT_TRUE(std::isnan(open_reader(f("o.safetensors"))->read_f32("a.weight")[11]));
}

TEST_F(CliTest, UnknownModesAndMethods) {
  expect_bad_input("mask --task-vector " + f("ft.safetensors") + " --signs " + f("signs.safetensors") + " --mask-mode hard --out " + f("o.safetensors"),
                   {"unknown mask mode 'hard'", "soft1_rowwise"});
  expect_bad_input("merge --task-vector " + f("ft.safetensors") + " --method dare --out " + f("o.safetensors"),
                   {"unknown merge method 'dare'", "mean|sum|ties"});
  expect_bad_input("merge --task-vector " + f("ft.safetensors") + " --method ties --ties-fraction 1.5 --out " + f("o.safetensors"),
                   {"--ties-fraction", "1.5"});
  expect_bad_input("merge --task-vector " + f("ft.safetensors") + " --task-vector " + f("base.safetensors") + " --signs " +
                       f("signs.safetensors") + " --order mask-then-merge --out " + f("o.safetensors"),
                   {"one --signs per --task-vector", "got 1 --signs for 2"});
  // An existing file of another kind is refused; a new path with a dot is a directory output.
  std::ofstream(f("weights.bin")) << "not a checkpoint";
  expect_bad_input("convert " + f("weights.bin") + " " + f("o.safetensors"), {"weights.bin", "unknown checkpoint format"});
}

TEST_F(CliTest, AlphaMustBeFinite) {
  for (const char* alpha : {"nan", "inf", "-inf"})
    expect_bad_input("apply --base " + f("base.safetensors") + " --task-vector " + f("ft.safetensors") + " --alpha " + alpha + " --out " + f("o.safetensors"),
                     {"--alpha must be finite"});
  expect_bad_input("apply --base " + f("base.safetensors") + " --task-vector " + f("ft.safetensors") + " --alpha half --out " + f("o.safetensors"),
                   {"alpha"});
}

TEST_F(CliTest, MissingRequiredOption) {
  expect_bad_input("mask --task-vector " + f("ft.safetensors") + " --out " + f("o.safetensors"), {"--signs is required"});
}

}  // namespace
}  // namespace gradfix
