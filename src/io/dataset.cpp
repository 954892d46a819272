#include "gradfix/io/dataset.hpp"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <fstream>
#include <set>
#include <sstream>

#include "gradfix/io/error.hpp"
#include "gradfix/io/splitmix.hpp"
#include "gradfix/io/atomic_file.hpp"
#include "gradfix/io/tensor_store.hpp"

namespace gradfix {
namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The whole file, through zlib so that gzipped and plain files read alike.
std::string read_maybe_gzipped(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) throw InputError(path + ": cannot open");
  std::string bytes;
  char buffer[1 << 16];
  int got;
  while ((got = gzread(file, buffer, sizeof buffer)) > 0) {
    bytes.append(buffer, static_cast<std::size_t>(got));
    // A gzip file can expand without bound: stop before memory does.
    if (static_cast<long long>(bytes.size()) > kMaxDatasetBytes + 64) {
      gzclose(file);
      throw InputError(path + ": more than " + std::to_string(kMaxDatasetBytes) + " bytes (after decompression); datasets are held in memory up to that");
    }
  }
  const bool failed = got < 0;
  gzclose(file);
  if (failed) throw InputError(path + ": corrupt or truncated gzip data");
  return bytes;
}

std::uint32_t big_endian(const std::string& bytes, std::size_t offset) {
  const auto* b = reinterpret_cast<const unsigned char*>(bytes.data() + offset);
  return (std::uint32_t{b[0]} << 24) | (std::uint32_t{b[1]} << 16) | (std::uint32_t{b[2]} << 8) | b[3];
}

// IDX: magic 0x00000803 (uint8, 3 dimensions) for images, 0x00000801 for labels, then the sizes.
std::vector<std::uint32_t> idx_header(const std::string& bytes, const std::string& path, int expected_dims) {
  if (bytes.size() < 4) throw InputError(path + ": too short for an IDX file");
  const std::uint32_t magic = big_endian(bytes, 0);
  const auto dims = static_cast<int>(magic & 0xFF);
  if ((magic >> 8) != 0x08 || dims != expected_dims)
    throw InputError(path + ": IDX magic number " + std::to_string(magic) + ", expected unsigned bytes in " +
                     std::to_string(expected_dims) + " dimensions (" + std::to_string(0x800 + expected_dims) + ")");
  if (bytes.size() < 4 + 4 * static_cast<std::size_t>(dims)) throw InputError(path + ": IDX header is truncated");
  std::vector<std::uint32_t> sizes;
  unsigned long long total = 1;
  for (int d = 0; d < dims; ++d) {
    sizes.push_back(big_endian(bytes, 4 + 4 * static_cast<std::size_t>(d)));
    if (__builtin_mul_overflow(total, static_cast<unsigned long long>(sizes.back()), &total) || total > static_cast<unsigned long long>(kMaxDatasetBytes))
      throw InputError(path + ": the IDX header declares more than " + std::to_string(kMaxDatasetBytes) + " bytes of data");
  }
  const std::size_t expected = 4 + 4 * static_cast<std::size_t>(dims) + total;
  if (bytes.size() != expected)
    throw InputError(path + ": IDX data has " + std::to_string(bytes.size()) + " bytes, the header says " + std::to_string(expected));
  return sizes;
}

std::string existing(const std::vector<std::string>& candidates) {
  for (const auto& path : candidates)
    if (file_exists(path)) return path;
  return "";
}

Dataset load_idx(const std::string& images_path) {
  std::string labels_base = images_path;
  const auto at = labels_base.rfind("images-idx3");
  if (at == std::string::npos) throw InputError(images_path + ": an IDX images file name must contain 'images-idx3'");
  labels_base.replace(at, 11, "labels-idx1");
  if (ends_with(labels_base, ".gz")) labels_base.resize(labels_base.size() - 3);
  const std::string labels_path = existing({labels_base + ".gz", labels_base});
  if (labels_path.empty()) throw InputError(images_path + ": no labels file '" + labels_base + "[.gz]' beside it");
  const std::string images = read_maybe_gzipped(images_path);
  const std::string labels = read_maybe_gzipped(labels_path);
  const auto image_sizes = idx_header(images, images_path, 3);
  const auto label_sizes = idx_header(labels, labels_path, 1);
  if (image_sizes[0] != label_sizes[0])
    throw InputError(images_path + " has " + std::to_string(image_sizes[0]) + " images but " + labels_path + " has " +
                     std::to_string(label_sizes[0]) + " labels");
  Dataset data;
  data.sample_shape = {image_sizes[1], image_sizes[2]};
  const std::size_t pixels = std::size_t{image_sizes[0]} * image_sizes[1] * image_sizes[2];
  data.inputs.resize(pixels);
  const auto* bytes = reinterpret_cast<const unsigned char*>(images.data() + 16);
  for (std::size_t i = 0; i < pixels; ++i) data.inputs[i] = static_cast<float>(bytes[i]) / 255.0f;
  const auto* label_bytes = reinterpret_cast<const unsigned char*>(labels.data() + 8);
  data.labels.assign(label_bytes, label_bytes + label_sizes[0]);
  return data;
}

// Through the checked HDF5 reader (gradfix::io): links, external storage, unwritten storage and
// sizes that overflow are refused there; here the sizes are bounded before anything is allocated.
Dataset load_hdf5(const std::string& path, bool keep_bytes) {
  const auto reader = open_reader(path);
  const TensorInfo* inputs = reader->find("inputs");
  const TensorInfo* labels = reader->find("labels");
  if (inputs == nullptr || labels == nullptr)
    throw InputError(path + ": no dataset '" + std::string(inputs == nullptr ? "inputs" : "labels") + "' (a dataset file holds 'inputs' and 'labels')");
  if (inputs->shape.empty() || labels->shape.size() != 1 || inputs->shape[0] != labels->shape[0])
    throw InputError(path + ": 'inputs' has " + std::to_string(inputs->shape.empty() ? 0 : inputs->shape[0]) + " samples but 'labels' has " +
                     std::to_string(labels->shape.empty() ? 0 : labels->shape[0]) + " (labels must be one-dimensional)");
  const bool as_bytes = keep_bytes && inputs->dtype == DType::kU8;
  const long long bytes = inputs->numel() * static_cast<long long>(as_bytes ? 1 : sizeof(float)) +
                          labels->numel() * static_cast<long long>(sizeof(long long));
  if (bytes > kMaxDatasetBytes)
    throw InputError(path + ": 'inputs' " + format_shape(inputs->shape) + " and 'labels' need " + std::to_string(bytes) +
                     " bytes in memory; datasets are held in memory up to " + std::to_string(kMaxDatasetBytes) + " bytes");
  const DType label_type = labels->dtype;
  if (label_type != DType::kI64 && label_type != DType::kI32 && label_type != DType::kI16 && label_type != DType::kI8 &&
      label_type != DType::kU8 && label_type != DType::kU16 && label_type != DType::kU32)
    throw InputError(path + ": 'labels' is " + dtype_name(label_type) + "; labels must be integers (I64, I32, I16, I8, U32, U16, U8)");
  Dataset data;
  if (as_bytes) {
    data.bytes.resize(static_cast<std::size_t>(inputs->numel()));
    reader->read_raw("inputs", 0, inputs->numel(), data.bytes.data());
  } else {
    data.inputs = reader->read_f32("inputs");
  }
  data.labels.resize(static_cast<std::size_t>(labels->numel()));
  std::vector<unsigned char> raw(static_cast<std::size_t>(labels->nbytes()));
  reader->read_raw("labels", 0, labels->numel(), raw.data());
  for (std::size_t i = 0; i < data.labels.size(); ++i) {
    switch (label_type) {
      case DType::kI64: data.labels[i] = reinterpret_cast<const std::int64_t*>(raw.data())[i]; break;
      case DType::kI32: data.labels[i] = reinterpret_cast<const std::int32_t*>(raw.data())[i]; break;
      case DType::kI16: data.labels[i] = reinterpret_cast<const std::int16_t*>(raw.data())[i]; break;
      case DType::kI8: data.labels[i] = reinterpret_cast<const std::int8_t*>(raw.data())[i]; break;
      case DType::kU32: data.labels[i] = reinterpret_cast<const std::uint32_t*>(raw.data())[i]; break;
      case DType::kU16: data.labels[i] = reinterpret_cast<const std::uint16_t*>(raw.data())[i]; break;
      default: data.labels[i] = raw[i]; break;
    }
  }
  data.sample_shape.assign(inputs->shape.begin() + 1, inputs->shape.end());
  return data;
}

}  // namespace

long long Dataset::sample_size() const {
  long long size = 1;
  for (long long dim : sample_shape) size *= dim;
  return size;
}

Dataset Dataset::subset(const std::vector<long long>& indices) const {
  Dataset part;
  part.sample_shape = sample_shape;
  part.classes = classes;
  const auto width = static_cast<std::size_t>(sample_size());
  const bool as_bytes = !bytes.empty();
  if (as_bytes)
    part.bytes.resize(width * indices.size());
  else
    part.inputs.resize(width * indices.size());
  for (std::size_t i = 0; i < indices.size(); ++i) {
    const long long index = indices[i];
    if (index < 0 || index >= size()) throw InputError("sample index " + std::to_string(index) + " is outside the " + std::to_string(size()) + " samples");
    const auto from = static_cast<std::size_t>(index) * width;
    if (as_bytes)
      std::memcpy(part.bytes.data() + i * width, bytes.data() + from, width);
    else
      std::memcpy(part.inputs.data() + i * width, inputs.data() + from, width * sizeof(float));
    part.labels.push_back(labels[static_cast<std::size_t>(index)]);
  }
  return part;
}

Dataset load_dataset(const std::string& spec, bool keep_bytes) {
  Dataset data;
  const auto colon = spec.rfind(':');
  if (ends_with(spec, ".h5") || ends_with(spec, ".hdf5")) {
    data = load_hdf5(spec, keep_bytes);
  } else if (colon != std::string::npos && is_directory(spec.substr(0, colon))) {
    const std::string prefix = spec.substr(0, colon) + "/" + spec.substr(colon + 1) + "-images-idx3-ubyte";
    const std::string path = existing({prefix + ".gz", prefix});
    if (path.empty()) throw InputError(spec + ": neither " + prefix + ".gz nor " + prefix + " exists");
    data = load_idx(path);
  } else if (spec.find("images-idx3") != std::string::npos) {
    data = load_idx(spec);
  } else {
    throw InputError("'" + spec + "': unknown dataset; expected FILE.h5, an IDX '*-images-idx3-ubyte[.gz]' file, or DIR:SPLIT");
  }
  if (data.size() == 0) throw InputError(spec + ": the dataset is empty");
  long long largest = -1;
  for (std::size_t i = 0; i < data.labels.size(); ++i) {
    if (data.labels[i] < 0) throw InputError(spec + ": label " + std::to_string(data.labels[i]) + " of sample " + std::to_string(i) + " is negative");
    largest = std::max(largest, data.labels[i]);
  }
  // Classes are counted from the largest label: one far above any real class count (INT64_MAX
  // would even overflow) is refused here, the same for every subcommand.
  if (largest >= kMaxClasses)
    throw InputError(spec + ": label " + std::to_string(largest) + " is not below " + std::to_string(kMaxClasses) + ", the largest class count gradfix takes");
  data.classes = largest + 1;
  return data;
}

namespace {

// The planes a transform works on: the last two dimensions of each sample (channels and samples
// are looped over), checked once.
struct Planes {
  long long rows = 0, cols = 0, count = 0;  // count: planes in the whole dataset
};

Planes planes_of(const Dataset& data, const std::string& name) {
  const std::size_t dims = data.sample_shape.size();
  if (dims < 2)
    throw InputError("--transform " + name + " needs samples of at least 2 dimensions (images), got " + format_shape(data.sample_shape));
  Planes planes;
  planes.rows = data.sample_shape[dims - 2];
  planes.cols = data.sample_shape[dims - 1];
  planes.count = planes.rows * planes.cols > 0 ? static_cast<long long>(data.inputs.size()) / (planes.rows * planes.cols) : 0;
  return planes;
}

// Rotation by `degrees` clockwise about the image centre, sampled bilinearly; what comes from
// outside the image is 0 (the background of the data sets gradfix reads).
void rotate(Dataset& data, double degrees, const std::string& name) {
  const Planes planes = planes_of(data, name);
  const double angle = degrees * 3.14159265358979323846 / 180.0;
  const double cosine = std::cos(angle), sine = std::sin(angle);
  const double centre_row = 0.5 * static_cast<double>(planes.rows - 1), centre_col = 0.5 * static_cast<double>(planes.cols - 1);
  const auto size = static_cast<std::size_t>(planes.rows * planes.cols);
  std::vector<float> image(size);
  for (long long p = 0; p < planes.count; ++p) {
    const float* in = data.inputs.data() + static_cast<std::size_t>(p) * size;
    auto at = [&](long long r, long long c) -> double {
      return r < 0 || c < 0 || r >= planes.rows || c >= planes.cols ? 0.0 : in[r * planes.cols + c];
    };
    for (long long i = 0; i < planes.rows; ++i)
      for (long long j = 0; j < planes.cols; ++j) {
        // The source of output (y, x) is (y, x) turned back: (y cos - x sin, x cos + y sin).
        const double y = static_cast<double>(i) - centre_row, x = static_cast<double>(j) - centre_col;
        const double row = y * cosine - x * sine + centre_row, col = x * cosine + y * sine + centre_col;
        const double r0 = std::floor(row), c0 = std::floor(col), dr = row - r0, dc = col - c0;
        const auto r = static_cast<long long>(r0), c = static_cast<long long>(c0);
        image[static_cast<std::size_t>(i * planes.cols + j)] = static_cast<float>(
            (1 - dr) * ((1 - dc) * at(r, c) + dc * at(r, c + 1)) + dr * ((1 - dc) * at(r + 1, c) + dc * at(r + 1, c + 1)));
      }
    std::copy(image.begin(), image.end(), data.inputs.begin() + static_cast<long long>(static_cast<std::size_t>(p) * size));
  }
}

// Gaussian blur of standard deviation `sigma` pixels: a separable kernel of radius ceil(3 sigma),
// normalised to sum 1, with zeros beyond the border.
void blur(Dataset& data, double sigma, const std::string& name) {
  const Planes planes = planes_of(data, name);
  const auto radius = static_cast<long long>(std::ceil(3.0 * sigma));
  std::vector<double> kernel(static_cast<std::size_t>(2 * radius + 1));
  double total = 0.0;
  for (long long k = -radius; k <= radius; ++k) total += kernel[static_cast<std::size_t>(k + radius)] = std::exp(-0.5 * k * k / (sigma * sigma));
  for (auto& weight : kernel) weight /= total;
  const auto size = static_cast<std::size_t>(planes.rows * planes.cols);
  std::vector<double> across(size);
  for (long long p = 0; p < planes.count; ++p) {
    float* image = data.inputs.data() + static_cast<std::size_t>(p) * size;
    for (long long i = 0; i < planes.rows; ++i)
      for (long long j = 0; j < planes.cols; ++j) {
        double sum = 0.0;
        for (long long k = -radius; k <= radius; ++k)
          if (j + k >= 0 && j + k < planes.cols) sum += kernel[static_cast<std::size_t>(k + radius)] * image[i * planes.cols + j + k];
        across[static_cast<std::size_t>(i * planes.cols + j)] = sum;
      }
    for (long long i = 0; i < planes.rows; ++i)
      for (long long j = 0; j < planes.cols; ++j) {
        double sum = 0.0;
        for (long long k = -radius; k <= radius; ++k)
          if (i + k >= 0 && i + k < planes.rows) sum += kernel[static_cast<std::size_t>(k + radius)] * across[static_cast<std::size_t>((i + k) * planes.cols + j)];
        image[i * planes.cols + j] = static_cast<float>(sum);
      }
  }
}

// A standard normal draw from (sample, element) alone (splitmix64 and Box-Muller), so that the
// noise of a sample does not depend on which other samples were loaded with it.
double normal_at(std::uint64_t sample, std::uint64_t element) {
  const std::uint64_t a = splitmix64(splitmix64(sample * 2 + 0x6772616466697831ULL) ^ element), b = splitmix64(a);
  const double u1 = (static_cast<double>(a >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
  const double u2 = static_cast<double>(b >> 11) / 9007199254740992.0;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * 3.14159265358979323846 * u2);
}

// The number after "NAME:", which must lie in [low, high] (`range` says so in the message).
double parameter_of(const std::string& step, const std::string& name, double low, double high, const char* range) {
  const std::string text = step.substr(name.size() + 1);
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size() || !(value >= low && value <= high))
    throw InputError("--transform " + step + ": " + name + " takes a number in " + range);
  return value;
}

}  // namespace

void apply_transform(Dataset& data, const std::string& transform) {
  if (transform == "none") return;
  // A chain: each step applied in turn.
  const std::size_t plus = transform.find('+');
  if (plus != std::string::npos) {
    apply_transform(data, transform.substr(0, plus));
    apply_transform(data, transform.substr(plus + 1));
    return;
  }
  const std::string name = transform.substr(0, transform.find(':'));
  const bool has_value = transform.find(':') != std::string::npos;
  if (has_value && (name == "invert" || name == "rotate90" || name == "none"))
    throw InputError("--transform " + transform + ": " + name + " takes no value");
  if (transform == "invert") {
    for (auto& value : data.inputs) value = 1.0f - value;
    return;
  }
  if (transform == "rotate90") {
    const Planes planes = planes_of(data, "rotate90");
    if (planes.rows != planes.cols) throw InputError("--transform rotate90 needs square images, got " + format_shape(data.sample_shape));
    const long long n = planes.rows;
    std::vector<float> image(static_cast<std::size_t>(n * n));
    for (std::size_t start = 0; start < data.inputs.size(); start += image.size()) {
      // Out[i][j] = In[n - 1 - j][i]: a quarter turn clockwise.
      for (long long i = 0; i < n; ++i)
        for (long long j = 0; j < n; ++j)
          image[static_cast<std::size_t>(i * n + j)] = data.inputs[start + static_cast<std::size_t>((n - 1 - j) * n + i)];
      std::copy(image.begin(), image.end(), data.inputs.begin() + static_cast<long long>(start));
    }
    return;
  }
  if (has_value && name == "rotate") return rotate(data, parameter_of(transform, name, -360.0, 360.0, "[-360, 360] (degrees)"), transform);
  if (has_value && name == "blur") return blur(data, parameter_of(transform, name, 0.1, 10.0, "[0.1, 10] (pixels)"), transform);
  if (has_value && name == "contrast") {
    // Each sample's values pulled towards (factor < 1) or pushed from its mean, kept in [0, 1].
    const double factor = parameter_of(transform, name, 0.0, 10.0, "[0, 10]");
    const std::size_t width = data.size() > 0 ? data.inputs.size() / static_cast<std::size_t>(data.size()) : 0;
    for (std::size_t start = 0; start < data.inputs.size(); start += width) {
      double mean = 0.0;
      for (std::size_t i = 0; i < width; ++i) mean += data.inputs[start + i];
      mean /= static_cast<double>(width);
      for (std::size_t i = 0; i < width; ++i) {
        float& value = data.inputs[start + i];
        value = static_cast<float>(std::clamp(mean + factor * (value - mean), 0.0, 1.0));
      }
    }
    return;
  }
  if (has_value && name == "noise") {
    // Gaussian noise of this standard deviation, kept in [0, 1]; drawn from (sample, element).
    // noise:SIGMA:ROWS puts it on the first ROWS rows of each image only (a partial occlusion).
    const std::size_t second = transform.find(':', name.size() + 1);
    const std::string sigma_part = second == std::string::npos ? transform : transform.substr(0, second);
    const double sigma = parameter_of(sigma_part, name, 0.0, 10.0, "[0, 10]");
    const std::size_t width = data.size() > 0 ? data.inputs.size() / static_cast<std::size_t>(data.size()) : 0;
    std::size_t period = width, noisy = width;  // within each plane of `period` values, the first `noisy`
    if (second != std::string::npos) {
      const Planes planes = planes_of(data, transform);
      const auto rows = static_cast<long long>(parameter_of(name + ":" + transform.substr(second + 1), name, 1.0, 1e9, "[1, rows] (rows)"));
      if (rows > planes.rows || transform.find('.', second) != std::string::npos)
        throw InputError("--transform " + transform + ": ROWS must be a whole number of rows, at most the images' " + std::to_string(planes.rows));
      period = static_cast<std::size_t>(planes.rows * planes.cols);
      noisy = static_cast<std::size_t>(rows * planes.cols);
    }
    for (std::size_t i = 0; i < data.inputs.size(); ++i) {
      if (i % period >= noisy) continue;
      float& value = data.inputs[i];
      value = static_cast<float>(std::clamp(value + sigma * normal_at(i / width, i % width), 0.0, 1.0));
    }
    return;
  }
  throw InputError("unknown --transform '" + transform + "'; valid: " + kTransformNames);
}

std::vector<long long> shuffled_indices(long long n, std::uint64_t seed) {
  std::vector<long long> order(static_cast<std::size_t>(n));
  for (long long i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  std::mt19937_64 generator(seed);
  // Fisher-Yates with our own draws, so the order is the same with every standard library.
  for (long long i = n - 1; i > 0; --i) {
    const auto j = static_cast<long long>(generator() % static_cast<std::uint64_t>(i + 1));
    std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(j)]);
  }
  return order;
}

std::vector<std::vector<long long>> members_by_class(const std::vector<long long>& labels, const std::vector<long long>& pool,
                                                     long long classes, long long per_class) {
  if (per_class < 1) throw InputError("--shots-per-class must be at least 1, got " + std::to_string(per_class));
  std::vector<std::vector<long long>> by_class(static_cast<std::size_t>(classes));
  for (long long index : pool) {
    const long long label = labels[static_cast<std::size_t>(index)];
    if (label >= classes) throw InputError("label " + std::to_string(label) + " of sample " + std::to_string(index) + " is outside the model's " + std::to_string(classes) + " classes");
    by_class[static_cast<std::size_t>(label)].push_back(index);
  }
  for (long long c = 0; c < classes; ++c)
    if (static_cast<long long>(by_class[static_cast<std::size_t>(c)].size()) < per_class)
      throw InputError("class " + std::to_string(c) + " has " + std::to_string(by_class[static_cast<std::size_t>(c)].size()) +
                       " samples available, fewer than the " + std::to_string(per_class) + " shots per class asked for");
  return by_class;
}

std::vector<long long> sample_per_class(const std::vector<long long>& labels, const std::vector<long long>& pool,
                                        long long classes, long long per_class, std::uint64_t seed) {
  const auto by_class = members_by_class(labels, pool, classes, per_class);
  std::vector<long long> chosen;
  for (long long c = 0; c < classes; ++c) {
    const auto& members = by_class[static_cast<std::size_t>(c)];
    const auto order = shuffled_indices(static_cast<long long>(members.size()), seed * 1000003 + static_cast<std::uint64_t>(c));
    for (long long k = 0; k < per_class; ++k) chosen.push_back(members[static_cast<std::size_t>(order[static_cast<std::size_t>(k)])]);
  }
  return chosen;
}

std::vector<long long> read_indices(const std::string& path, long long n) {
  std::ifstream file(path);
  if (!file) throw InputError(path + ": cannot open the indices file");
  std::vector<long long> indices;
  std::set<long long> seen;
  std::string token;
  while (file >> token) {
    std::stringstream parts(token);
    std::string part;
    while (std::getline(parts, part, ',')) {
      if (part.empty()) continue;
      if (part.find_first_not_of("0123456789") != std::string::npos)
        throw InputError(path + ": '" + part + "' is not a sample index");
      const long long index = std::stoll(part);
      if (index >= n) throw InputError(path + ": index " + std::to_string(index) + " is outside the " + std::to_string(n) + " samples");
      if (!seen.insert(index).second) throw InputError(path + ": index " + std::to_string(index) + " appears twice");
      indices.push_back(index);
    }
  }
  if (indices.empty()) throw InputError(path + ": no indices");
  return indices;
}

std::vector<long long> first_batches(const std::vector<long long>& pool, long long batches, long long batch_size, std::uint64_t seed) {
  if (batches < 1 || batch_size < 1) throw InputError("--num-batches and --batch-size must be positive");
  const long long wanted = batches * batch_size;
  if (wanted > static_cast<long long>(pool.size()))
    throw InputError(std::to_string(batches) + " batches of " + std::to_string(batch_size) + " need " + std::to_string(wanted) +
                     " samples, the pool has " + std::to_string(pool.size()));
  const auto order = shuffled_indices(static_cast<long long>(pool.size()), seed);
  std::vector<long long> chosen;
  for (long long i = 0; i < wanted; ++i) chosen.push_back(pool[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])]);
  return chosen;
}

std::vector<long long> complement(long long n, const std::vector<long long>& used) {
  const std::set<long long> taken(used.begin(), used.end());
  std::vector<long long> rest;
  for (long long i = 0; i < n; ++i)
    if (!taken.count(i)) rest.push_back(i);
  return rest;
}

}  // namespace gradfix
