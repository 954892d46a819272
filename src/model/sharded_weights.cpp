// ShardedWeights: each rank's pieces of a model's tensors, and the collective gathers that
// assemble whole tensors (or some of their rows) for one step of the executor.
#include <algorithm>
#include <cstring>

#include <optional>

#include <c10/core/DeviceGuard.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "gradfix/dist/backend.hpp"
#include "gradfix/dist/timing.hpp"
#include "gradfix/io/error.hpp"
#include "sharded_executor.hpp"

namespace gradfix {
namespace {

// Whether a gather for `device` travels over the device communicator (NCCL) rather than the host's.
bool over_device(const torch::Device& device, const Communicator& stats) {
  return !device.is_cpu() && stats.size() > 1 && stats.memory() == MemorySpace::kDevice;
}

// This thread's current stream on `device`: the default stream, or the helper thread's side stream.
c10::Stream current_stream(const torch::Device& device) { return c10::impl::VirtualGuardImpl(device.type()).getStream(device); }

// Waits for the work queued on this thread's current stream of `device`, so that a communicator
// (on its own stream) reads complete data, and a gather hands over complete tensors. Only this
// stream: the compute queued on another thread's stream goes on.
void synchronize_current_stream(const torch::Device& device) {
  if (!device.is_cpu()) current_stream(device).synchronize();
}

// Tensors made on the helper's side stream and used on this thread's: the allocator must not give
// their memory to the side stream again before this thread's work on them is done.
void record_use(const Parameters& parameters, const torch::Device& device) {
  for (const auto& [name, tensor] : parameters)
    if (tensor.device() == device) tensor.record_stream(current_stream(device));
}
void record_use(const torch::Tensor& tensor, const torch::Device& device) {
  if (tensor.device() == device) tensor.record_stream(current_stream(device));
}

}  // namespace

template <typename Result>
Result Pending<Result>::take() {
  GRADFIX_CHECK(result_.valid(), "a gather taken twice or never started");
  const StepTimer timer(TimedStep::kGather);
  Result result = result_.get();
  if (!device_.is_cpu()) record_use(result, device_);
  return result;
}
template class Pending<Parameters>;
template class Pending<torch::Tensor>;

template <typename Result, typename Gather>
Pending<Result> ShardedWeights::start(Gather gather, const torch::Device& device) const {
  Communicator* host = context_.ahead_host();
  if (host == nullptr)
    return Pending<Result>(std::async(std::launch::deferred, [this, gather] { return gather(context_.host(), context_.stats()); }), device);
  Communicator* stats = context_.ahead_stats();
  return Pending<Result>(std::async(std::launch::async,
                                    [gather, host, stats, device] {
                                      const StepTimer timer(TimedStep::kGatherAhead);
                                      count_gather_ahead();
                                      // A GPU's copies go on a side stream, beside the compute on the
                                      // default one; the helper thread starts on device 0.
                                      std::optional<c10::DeviceGuard> on_device;
                                      std::optional<c10::StreamGuard> side;
                                      if (!device.is_cpu()) {
                                        on_device.emplace(device);
                                        side.emplace(c10::impl::VirtualGuardImpl(device.type()).getStreamFromGlobalPool(device));
                                      }
                                      Result result = gather(*host, *stats);
                                      synchronize_current_stream(device);
                                      return result;
                                    }),
                         device);
}

Pending<Parameters> ShardedWeights::gather_ahead(std::vector<std::string> names, const torch::Device& device) const {
  return start<Parameters>(
      [this, names = std::move(names), device](Communicator& host, Communicator& stats) { return gather_over(host, stats, names, device); }, device);
}

Pending<torch::Tensor> ShardedWeights::gather_rows_ahead(std::string name, std::vector<int64_t> rows, const torch::Device& device) const {
  return start<torch::Tensor>([this, name = std::move(name), rows = std::move(rows), device](Communicator& host, Communicator& stats) {
    return gather_rows_over(host, stats, name, rows, device);
  }, device);
}

ShardedWeights::ShardedWeights(std::vector<TensorInfo> layout, const std::string& path, const JobContext& context)
    : context_(context), layout_(std::move(layout)), plan_(layout_, context.size()) {
  for (std::size_t i = 0; i < layout_.size(); ++i) index_[layout_[i].name] = i;
  mine_ = read_pieces(*open_reader(path), layout_, plan_, context.rank());
}

std::vector<std::vector<float>> read_pieces(const TensorReader& reader, const std::vector<TensorInfo>& layout, const ShardPlan& plan,
                                            int rank) {
  std::vector<std::vector<float>> pieces;
  for (const auto& piece : plan.pieces(rank)) {
    const std::string& name = layout[piece.tensor].name;
    if (reader.find(name) == nullptr) pieces.emplace_back(static_cast<std::size_t>(piece.count), 0.0f);
    else pieces.push_back(reader.read_f32(name, piece.begin, piece.count));
  }
  return pieces;
}

std::size_t ShardedWeights::index_of(const std::string& name) const {
  const auto found = index_.find(name);
  GRADFIX_CHECK(found != index_.end(), "no tensor '" + name + "' in the model's layout");
  return found->second;
}

std::set<std::size_t> ShardedWeights::indices_of(const std::vector<std::string>& names) const {
  std::set<std::size_t> indices;
  for (const auto& name : names) indices.insert(index_of(name));
  return indices;
}

std::vector<Piece> ShardedWeights::pieces_of(int rank, const std::set<std::size_t>& wanted, long long& count) const {
  std::vector<Piece> pieces;
  for (const auto& piece : plan_.pieces(rank))
    if (wanted.count(piece.tensor)) {
      pieces.push_back(piece);
      count += piece.count;
    }
  return pieces;
}

void ShardedWeights::own_values(std::size_t k, long long begin, long long count, float* out) const {
  const float* base = mine_[k].data() + begin;
  if (offset_ == nullptr) {
    std::memcpy(out, base, static_cast<std::size_t>(count) * sizeof(float));
    return;
  }
  const float* delta = (*offset_)[k].data() + begin;
  for (long long i = 0; i < count; ++i) out[i] = base[i] + alpha_ * delta[i];
}

torch::Tensor ShardedWeights::gather_rows(const std::string& name, const std::vector<int64_t>& rows, const torch::Device& device) const {
  const StepTimer timer(TimedStep::kGather);
  return gather_rows_over(context_.host(), context_.stats(), name, rows, device);
}

torch::Tensor ShardedWeights::gather_rows_over(Communicator& host, Communicator& stats, const std::string& name, const std::vector<int64_t>& rows,
                                               const torch::Device& device) const {
  const std::size_t tensor = index_of(name);
  std::vector<int64_t> shape = shape_of(layout_[tensor]);
  const long long width = layout_[tensor].numel() / shape[0];
  shape[0] = static_cast<int64_t>(rows.size());
  const std::vector<Run> runs = row_runs(rows, width);
  // Over the device communicator (NCCL) the rows travel device to device; else through the host,
  // where every copy is a memcpy (no LibTorch operation: this may run on the helper thread, which
  // must not start a pool of compute threads of its own).
  const bool on_device = over_device(device, stats);
  Communicator& transport = on_device ? stats : host;
  const auto staging = torch::TensorOptions().dtype(torch::kFloat32).device(on_device ? device : torch::Device(torch::kCPU));
  torch::Tensor out = torch::empty(shape, staging);
  torch::Tensor flat = out.view({-1});
  for (int r = 0; r < context_.size(); ++r) {
    // Rank r's part: each run cut by r's pieces of the tensor, in run order (every rank computes
    // the same list), packed end to end.
    struct Segment {
      std::size_t piece;
      long long source, at, count;
    };
    std::vector<Segment> segments;
    long long total = 0;
    const auto& theirs = plan_.pieces(r);
    for (const auto& run : runs)
      for (std::size_t k = 0; k < theirs.size(); ++k) {
        if (theirs[k].tensor != tensor) continue;
        const long long first = std::max(run.begin, theirs[k].begin), last = std::min(run.begin + run.count, theirs[k].begin + theirs[k].count);
        if (first >= last) continue;
        segments.push_back({k, first - theirs[k].begin, run.at + first - run.begin, last - first});
        total += last - first;
      }
    if (total == 0) continue;
    std::vector<float> values;
    torch::Tensor packed;
    if (r == context_.rank()) {
      values.resize(static_cast<std::size_t>(total));
      long long cursor = 0;
      for (const auto& segment : segments) {
        own_values(segment.piece, segment.source, segment.count, values.data() + cursor);
        cursor += segment.count;
      }
      packed = torch::from_blob(values.data(), {total}, torch::kFloat32);
      if (on_device) packed = packed.to(device);
    } else {
      packed = torch::empty({total}, staging);
    }
    if (context_.size() > 1) {
      if (on_device) synchronize_current_stream(device);
      transport.broadcast(packed.data_ptr<float>(), static_cast<std::size_t>(total), DType::kF32, r);
    }
    long long cursor = 0;
    for (const auto& segment : segments) {
      if (on_device)
        flat.slice(0, segment.at, segment.at + segment.count).copy_(packed.slice(0, cursor, cursor + segment.count));
      else
        std::memcpy(flat.data_ptr<float>() + segment.at, packed.data_ptr<float>() + cursor, static_cast<std::size_t>(segment.count) * sizeof(float));
      cursor += segment.count;
    }
  }
  synchronize_current_stream(on_device ? device : torch::Device(torch::kCPU));
  return out.device() == device ? out : out.to(device);
}

Parameters ShardedWeights::gather(const std::vector<std::string>& names, const torch::Device& device) const {
  const StepTimer timer(TimedStep::kGather);
  return gather_over(context_.host(), context_.stats(), names, device);
}

Parameters ShardedWeights::gather_over(Communicator& host, Communicator& stats, const std::vector<std::string>& names,
                                       const torch::Device& device) const {
  if (over_device(device, stats)) return gather_on_device(stats, names, device);
  const std::set<std::size_t> wanted = indices_of(names);
  // Each rank that owns pieces of these tensors broadcasts them, packed in plan order, and every
  // rank unpacks them into the whole tensors. Broadcasting owner by owner moves only real data:
  // an all-gather would pad every rank's share to the largest, and one big tensor (an embedding)
  // often lies on one rank alone.
  std::map<std::size_t, torch::Tensor> full;
  const auto& my_pieces = plan_.pieces(context_.rank());
  // A tensor this rank holds whole is used from its own piece, without a copy (read only).
  std::set<std::size_t> whole_here;
  for (std::size_t k = 0; k < my_pieces.size(); ++k) {
    const std::size_t tensor = my_pieces[k].tensor;
    if (offset_ == nullptr && wanted.count(tensor) && my_pieces[k].begin == 0 && my_pieces[k].count == layout_[tensor].numel()) {
      full[tensor] = torch::from_blob(const_cast<float*>(mine_[k].data()), shape_of(layout_[tensor]), torch::kFloat32);
      whole_here.insert(tensor);
    }
  }
  for (std::size_t tensor : wanted)
    if (!whole_here.count(tensor)) full[tensor] = torch::empty(shape_of(layout_[tensor]), torch::kFloat32);
  std::vector<float> buffer;
  for (int r = 0; r < context_.size(); ++r) {
    long long count = 0;
    const std::vector<Piece> theirs = pieces_of(r, wanted, count);
    if (count == 0) continue;
    auto destination = [&](const Piece& piece) { return full[piece.tensor].data_ptr<float>() + piece.begin; };
    if (r == context_.rank()) {
      // Own pieces go straight into the tensors, and are sent from there.
      for (std::size_t k = 0; k < my_pieces.size(); ++k) {
        if (!wanted.count(my_pieces[k].tensor) || whole_here.count(my_pieces[k].tensor)) continue;
        own_values(k, destination(my_pieces[k]));
      }
    }
    if (context_.size() == 1) continue;
    if (theirs.size() == 1) {
      // One range of one tensor (the usual case for a large tensor): received in place.
      host.broadcast(destination(theirs[0]), static_cast<std::size_t>(count), DType::kF32, r);
      continue;
    }
    buffer.resize(static_cast<std::size_t>(count));
    long long cursor = 0;
    if (r == context_.rank())
      for (const auto& piece : theirs) {
        std::memcpy(buffer.data() + cursor, destination(piece), static_cast<std::size_t>(piece.count) * sizeof(float));
        cursor += piece.count;
      }
    host.broadcast(buffer.data(), static_cast<std::size_t>(count), DType::kF32, r);
    if (r == context_.rank()) continue;
    cursor = 0;
    for (const auto& piece : theirs) {
      std::memcpy(destination(piece), buffer.data() + cursor, static_cast<std::size_t>(piece.count) * sizeof(float));
      cursor += piece.count;
    }
  }
  Parameters parameters;
  for (auto& [tensor, values] : full) parameters[layout_[tensor].name] = device.is_cpu() ? values : values.to(device);
  return parameters;
}

// The same over the device communicator (NCCL): the whole tensors are assembled in device
// memory, each owner's pieces broadcast from there, so no rank stages a layer on the host. The
// communicator works on its own stream: this thread's stream is finished before each broadcast,
// and the communicator finishes its own before returning.
Parameters ShardedWeights::gather_on_device(Communicator& transport, const std::vector<std::string>& names, const torch::Device& device) const {
  const std::set<std::size_t> wanted = indices_of(names);
  const auto on_device = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  std::map<std::size_t, torch::Tensor> full;
  for (std::size_t tensor : wanted) full[tensor] = torch::empty(shape_of(layout_[tensor]), on_device);
  auto range = [&](const Piece& piece) { return full.at(piece.tensor).view({-1}).slice(0, piece.begin, piece.begin + piece.count); };
  // Own pieces (with the offset, added on the host as gather() does) go straight into place.
  const auto& my_pieces = plan_.pieces(context_.rank());
  std::vector<float> values;
  for (std::size_t k = 0; k < my_pieces.size(); ++k) {
    if (!wanted.count(my_pieces[k].tensor)) continue;
    values.resize(mine_[k].size());
    own_values(k, values.data());
    range(my_pieces[k]).copy_(torch::from_blob(values.data(), {my_pieces[k].count}, torch::kFloat32));
  }
  for (int r = 0; r < context_.size(); ++r) {
    long long count = 0;
    const std::vector<Piece> theirs = pieces_of(r, wanted, count);
    if (count == 0) continue;
    synchronize_current_stream(device);
    if (theirs.size() == 1) {
      transport.broadcast(range(theirs[0]).data_ptr<float>(), static_cast<std::size_t>(count), DType::kF32, r);
      continue;
    }
    // Several ranges: packed into one buffer in plan order, broadcast, unpacked.
    torch::Tensor packed;
    if (r == context_.rank()) {
      std::vector<torch::Tensor> parts;
      for (const auto& piece : theirs) parts.push_back(range(piece));
      packed = torch::cat(parts);
    } else {
      packed = torch::empty({count}, on_device);
    }
    synchronize_current_stream(device);
    transport.broadcast(packed.data_ptr<float>(), static_cast<std::size_t>(count), DType::kF32, r);
    if (r == context_.rank()) continue;
    long long cursor = 0;
    for (const auto& piece : theirs) {
      range(piece).copy_(packed.slice(0, cursor, cursor + piece.count));
      cursor += piece.count;
    }
  }
  synchronize_current_stream(device);
  Parameters parameters;
  for (auto& [tensor, tensor_values] : full) parameters[layout_[tensor].name] = tensor_values;
  return parameters;
}

}  // namespace gradfix
