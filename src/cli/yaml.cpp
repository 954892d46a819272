#include "gradfix/cli/yaml.hpp"

#include <yaml.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <regex>

#include "gradfix/io/error.hpp"

namespace gradfix {
namespace {

using Json = nlohmann::json;

// Bounds on a config from a stranger: nesting (the converter recurses) and node count.
constexpr int kMaxDepth = 32;
constexpr long long kMaxNodes = 100000;

// A plain (unquoted) scalar as YAML 1.1 reads it, as PyYAML (and so mergekit) does: booleans,
// null, integers and floats; anything else is a string. Quoted scalars are always strings.
Json plain_scalar(const std::string& text) {
  static const std::regex kTrue("true|True|TRUE|yes|Yes|YES|on|On|ON");
  static const std::regex kFalse("false|False|FALSE|no|No|NO|off|Off|OFF");
  static const std::regex kNull("|~|null|Null|NULL");
  static const std::regex kInteger("[-+]?(0|[1-9][0-9_]*)");
  static const std::regex kFloat("[-+]?([0-9][0-9_]*)?\\.[0-9_]*([eE][-+][0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+");
  if (text.size() > 64) return text;  // no number or keyword is this long
  if (std::regex_match(text, kTrue)) return true;
  if (std::regex_match(text, kFalse)) return false;
  if (std::regex_match(text, kNull)) return nullptr;
  std::string digits;
  for (char c : text)
    if (c != '_') digits += c;
  if (std::regex_match(text, kInteger)) {
    errno = 0;
    const long long value = std::strtoll(digits.c_str(), nullptr, 10);
    if (errno == 0) return value;
  }
  if (std::regex_match(text, kFloat) && text != "." && text != "+." && text != "-.") {
    const double value = std::strtod(digits.c_str(), nullptr);
    if (std::isfinite(value)) return value;
  }
  return text;
}

class Parser {
 public:
  Parser(const std::string& text, const std::string& path) : path_(path) {
    if (!yaml_parser_initialize(&parser_)) throw RuntimeFailure(path + ": cannot start the YAML parser");
    yaml_parser_set_input_string(&parser_, reinterpret_cast<const unsigned char*>(text.data()), text.size());
  }
  ~Parser() { yaml_parser_delete(&parser_); }
  Parser(const Parser&) = delete;
  Parser& operator=(const Parser&) = delete;

  Json document() {
    expect(YAML_STREAM_START_EVENT);
    Event first = next();
    if (first.get()->type == YAML_STREAM_END_EVENT) return Json::object();  // an empty file
    if (first.get()->type != YAML_DOCUMENT_START_EVENT) fail(*first.get(), "expected a document");
    Json root = node(next(), 0);
    expect(YAML_DOCUMENT_END_EVENT);
    Event after = next();
    if (after.get()->type != YAML_STREAM_END_EVENT) fail(*after.get(), "holds more than one document");
    return root;
  }

 private:
  struct EventDeleter {
    void operator()(yaml_event_t* event) const {
      yaml_event_delete(event);
      delete event;
    }
  };
  using Event = std::unique_ptr<yaml_event_t, EventDeleter>;

  Event next() {
    auto* event = new yaml_event_t;
    if (!yaml_parser_parse(&parser_, event)) {
      delete event;
      const std::string problem = parser_.problem != nullptr ? parser_.problem : "invalid YAML";
      throw InputError(path_ + ": line " + std::to_string(parser_.problem_mark.line + 1) + ": " + problem);
    }
    return Event(event);
  }

  void expect(yaml_event_type_t type) {
    Event event = next();
    if (event.get()->type != type) fail(*event.get(), "unexpected structure");
  }

  [[noreturn]] void fail(const yaml_event_t& event, const std::string& what) const {
    throw InputError(path_ + ": line " + std::to_string(event.start_mark.line + 1) + ": " + what);
  }

  Json node(Event event, int depth) {
    if (depth > kMaxDepth) fail(*event.get(), "nests deeper than " + std::to_string(kMaxDepth) + " levels");
    if (++nodes_ > kMaxNodes) fail(*event.get(), "has more than " + std::to_string(kMaxNodes) + " nodes");
    const yaml_event_t& e = *event.get();
    switch (e.type) {
      case YAML_SCALAR_EVENT: {
        const std::string text(reinterpret_cast<const char*>(e.data.scalar.value), e.data.scalar.length);
        return e.data.scalar.style == YAML_PLAIN_SCALAR_STYLE ? plain_scalar(text) : Json(text);
      }
      case YAML_SEQUENCE_START_EVENT: {
        Json list = Json::array();
        for (Event item = next(); item.get()->type != YAML_SEQUENCE_END_EVENT; item = next()) list.push_back(node(std::move(item), depth + 1));
        return list;
      }
      case YAML_MAPPING_START_EVENT: {
        Json map = Json::object();
        for (Event key = next(); key.get()->type != YAML_MAPPING_END_EVENT; key = next()) {
          const int line = static_cast<int>(key.get()->start_mark.line) + 1;
          const Json name = node(std::move(key), depth + 1);
          if (!name.is_string() && !name.is_number() && !name.is_boolean())
            throw InputError(path_ + ": line " + std::to_string(line) + ": a key must be a plain value");
          const std::string text = name.is_string() ? name.get<std::string>() : name.dump();
          if (map.contains(text)) throw InputError(path_ + ": line " + std::to_string(line) + ": key '" + escaped_name(text) + "' given twice");
          map[text] = node(next(), depth + 1);
        }
        return map;
      }
      case YAML_ALIAS_EVENT:
        // Aliases can expand a small file into a huge tree (the "billion laughs"); configs do
        // not need them.
        fail(e, "uses an alias (*name); gradfix does not expand YAML aliases");
      default: fail(e, "unexpected structure");
    }
  }

  std::string path_;
  yaml_parser_t parser_{};
  long long nodes_ = 0;
};

}  // namespace

nlohmann::json parse_yaml(const std::string& text, const std::string& path) { return Parser(text, path).document(); }

}  // namespace gradfix
