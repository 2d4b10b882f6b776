#include "args.h"

#include <cstdlib>

#include "modmoe/error.h"

namespace modmoe::app {

Args::Args(const std::vector<std::string>& argv, const std::set<std::string>& options,
           const std::set<std::string>& flags) {
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (flags.count(a)) {
      values_[a] = "1";
    } else if (options.count(a)) {
      MODMOE_CHECK(i + 1 < argv.size(), "option '", a, "' needs a value");
      values_[a] = argv[++i];
    } else {
      std::string known;
      for (const auto& o : options) known += " " + o + " VALUE";
      for (const auto& f : flags) known += " " + f;
      MODMOE_FAIL("unknown argument '", a, "': expected one of", known);
    }
  }
}

std::string Args::get(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

long long Args::get_int(const std::string& name, long long fallback, long long min_value,
                        long long max_value) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(it->second.c_str(), &end, 10);
  MODMOE_CHECK(end != it->second.c_str() && *end == '\0' && v >= min_value && v <= max_value,
               "option '", name, "' = '", it->second, "': expected an integer in [", min_value,
               ", ", max_value, "]");
  return v;
}

}  // namespace modmoe::app
