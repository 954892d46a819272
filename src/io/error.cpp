#include "gradfix/io/error.hpp"

#include <charconv>

namespace gradfix {

namespace {

// The path below the repository's src/ or include/ folder: short, and the same on every machine.
std::string source_location(const char* file, int line) {
  std::string path = file;
  for (const char* root : {"/src/", "/include/"}) {
    const auto found = path.rfind(root);
    if (found != std::string::npos) {
      path = path.substr(found + 1);
      break;
    }
  }
  return path + ":" + std::to_string(line);
}

}  // namespace

InternalError::InternalError(const char* file, int line, const char* condition, const std::string& message)
    : Error("internal error at " + source_location(file, line) + ": check '" + condition + "' failed: " + message +
                " (please report this with the command line)",
            kExitRuntimeFailure) {}

std::string format_number(double value) {
  char text[32];
  const auto result = std::to_chars(text, text + sizeof(text), value);
  return std::string(text, result.ptr);
}

std::string format_shape(const std::vector<long long>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

namespace {

// The length of the valid UTF-8 sequence at text[i], or 0 when the bytes there are not one.
std::size_t utf8_length(const std::string& text, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char lead = byte(i);
  if (lead < 0x80) return 1;
  std::size_t length = 0;
  unsigned int code = 0;
  if (lead >= 0xC2 && lead <= 0xDF) length = 2, code = lead & 0x1F;
  else if (lead >= 0xE0 && lead <= 0xEF) length = 3, code = lead & 0x0F;
  else if (lead >= 0xF0 && lead <= 0xF4) length = 4, code = lead & 0x07;
  else return 0;
  if (i + length > text.size()) return 0;
  for (std::size_t k = 1; k < length; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
    code = (code << 6) | (byte(i + k) & 0x3F);
  }
  if ((length == 3 && code < 0x800) || (length == 4 && (code < 0x10000 || code > 0x10FFFF))) return 0;  // overlong, too large
  if (code >= 0xD800 && code <= 0xDFFF) return 0;                                                       // surrogates
  return length;
}

}  // namespace

bool is_valid_utf8(const std::string& text) {
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t length = utf8_length(text, i);
    if (length == 0) return false;
    i += length;
  }
  return true;
}

std::string escaped_name(const std::string& name) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(name.size());
  for (std::size_t i = 0; i < name.size();) {
    const auto byte = static_cast<unsigned char>(name[i]);
    const std::size_t length = utf8_length(name, i);
    // U+0080..U+009F are control characters too (0xC2 0x9B is a terminal's CSI).
    const bool c1_control = length == 2 && byte == 0xC2 && static_cast<unsigned char>(name[i + 1]) < 0xA0;
    if (length > 1 && !c1_control) {
      out.append(name, i, length);
      i += length;
      continue;
    }
    if (length == 1 && byte >= 0x20 && byte != 0x7F && byte != '\\') {
      out += static_cast<char>(byte);
    } else if (byte == '\\') {
      out += "\\\\";
    } else {
      out += "\\x";
      out += kHex[byte >> 4];
      out += kHex[byte & 0xF];
    }
    ++i;
  }
  return out;
}

std::string format_name_list(const std::vector<std::string>& names, std::size_t limit) {
  std::string text;
  for (std::size_t i = 0; i < names.size() && i < limit; ++i) {
    if (i > 0) text += ", ";
    text += "'" + escaped_name(names[i]) + "'";
  }
  if (names.size() > limit) text += " and " + std::to_string(names.size() - limit) + " more";
  return text;
}

}  // namespace gradfix
