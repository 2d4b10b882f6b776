// A small command-line parser: `--name value` options and `--flag` switches.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

namespace modmoe::app {

class Args {
 public:
  // argv after the subcommand. `flags` take no value; every other --name takes one.
  Args(const std::vector<std::string>& argv, const std::set<std::string>& options,
       const std::set<std::string>& flags);

  bool has(const std::string& name) const { return values_.count(name) > 0; }
  std::string get(const std::string& name, const std::string& fallback) const;
  long long get_int(const std::string& name, long long fallback, long long min_value,
                    long long max_value) const;

 private:
  std::map<std::string, std::string> values_;
};

}  // namespace modmoe::app
