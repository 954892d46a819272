#include "gradfix/dist/progress.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <sstream>

namespace gradfix {
namespace {

std::string human_bytes(double bytes) {
  static const char* kUnits[] = {"B", "KB", "MB", "GB", "TB"};
  int unit = 0;
  while (bytes >= 1000.0 && unit < 4) {
    bytes /= 1000.0;
    ++unit;
  }
  std::ostringstream text;
  text << std::fixed << std::setprecision(unit == 0 ? 0 : 1) << bytes << " " << kUnits[unit];
  return text.str();
}

std::string human_seconds(double seconds) {
  std::ostringstream text;
  const long long whole = static_cast<long long>(seconds + 0.5);
  if (whole >= 3600) text << whole / 3600 << "h" << std::setw(2) << std::setfill('0') << (whole % 3600) / 60 << "m";
  else if (whole >= 60) text << whole / 60 << "m" << std::setw(2) << std::setfill('0') << whole % 60 << "s";
  else text << whole << "s";
  return text.str();
}

}  // namespace

Progress::Progress(const JobContext& context, std::string what, long long total_items, long long total_bytes, std::string unit)
    : enabled_(context.is_root() && context.progress), what_(std::move(what)), unit_(std::move(unit)),
      total_items_(total_items), total_bytes_(total_bytes) {
  terminal_ = ::isatty(STDERR_FILENO) == 1;
  if (const char* text = std::getenv("GRADFIX_PROGRESS_SECONDS")) interval_ = std::strtod(text, nullptr);
  if (terminal_) interval_ = 0.2;
  start_ = last_ = std::chrono::steady_clock::now();
}

Progress::~Progress() {
  // A job that failed ends the terminal line so that its error starts on a line of its own.
  if (enabled_ && terminal_ && printed_ && !finished_) std::cerr << "\n";
}

void Progress::next(long long bytes) {
  items_ += pending_items_;
  bytes_ += pending_bytes_;
  pending_items_ = 1;
  pending_bytes_ = bytes;
  if (items_ > 0) report_when_due();
}

void Progress::add(long long items) {
  items_ += items;
  // The line at the end is finish()'s.
  if (items_ > 0 && !(total_items_ > 0 && items_ >= total_items_)) report_when_due();
}

void Progress::report_when_due() {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (std::chrono::duration<double>(now - last_).count() < interval_) return;
  last_ = now;
  report(false);
}

void Progress::finish() {
  items_ += pending_items_;
  bytes_ += pending_bytes_;
  pending_items_ = pending_bytes_ = 0;
  if (!enabled_ || finished_) return;
  // Short jobs stay silent: the summary line says everything.
  if (printed_) report(true);
  finished_ = true;
}

void Progress::report(bool final) {
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  // Counted work can overrun an estimated total slightly (a fine-tuning rate that diverges stops
  // early, one that does not may be counted differently): the fraction stops at 1.
  const double done = std::min(1.0, total_bytes_ > 0 ? static_cast<double>(bytes_) / static_cast<double>(total_bytes_)
                                    : total_items_ > 0 ? static_cast<double>(items_) / static_cast<double>(total_items_) : 1.0);
  std::ostringstream line;
  line << what_ << ": " << items_ << "/" << total_items_ << " " << unit_;
  if (total_bytes_ > 0) line << ", " << human_bytes(static_cast<double>(bytes_)) << " of " << human_bytes(static_cast<double>(total_bytes_));
  line << " (" << std::fixed << std::setprecision(0) << 100.0 * done << "%)";
  if (elapsed > 0.0 && total_bytes_ > 0) line << ", " << human_bytes(static_cast<double>(bytes_) / elapsed) << "/s";
  if (elapsed > 0.0 && total_bytes_ == 0) {
    const double rate = static_cast<double>(items_) / elapsed;
    line << ", " << std::setprecision(rate >= 100.0 ? 0 : 1) << rate << " " << unit_ << "/s";
  }
  if (!final && done > 0.0) line << ", " << human_seconds(elapsed * (1.0 - done) / done) << " left";
  if (final) line << ", " << human_seconds(elapsed);
  if (terminal_) std::cerr << "\r\033[K" << line.str() << (final ? "\n" : "") << std::flush;
  else std::cerr << line.str() << "\n" << std::flush;
  printed_ = true;
}

namespace {
// One job runs per process at a time, on its main thread: a plain pointer is enough.
Progress* current_progress = nullptr;
}  // namespace

CurrentProgress::CurrentProgress(Progress& progress) : previous_(current_progress) { current_progress = &progress; }
CurrentProgress::~CurrentProgress() { current_progress = previous_; }

void count_progress(long long items) {
  if (current_progress != nullptr) current_progress->add(items);
}

}  // namespace gradfix
