// modmoe::Error and the check macros. No CUDA needed to include this header.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace modmoe {

// Every failure modmoe reports is a modmoe::Error. Its message names the argument, the
// value and what was expected, followed by the source location and the failed check.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

[[noreturn]] void throw_error(const char* file, int line, const char* expr, const std::string& msg);

}  // namespace detail
}  // namespace modmoe

// MODMOE_CHECK(cond, "argument 'top_k' = ", k, ": expected <= num_experts (", e, ")")
#define MODMOE_CHECK(cond, ...)                                                            \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      ::modmoe::detail::throw_error(__FILE__, __LINE__, #cond,                             \
                                    ::modmoe::detail::concat(__VA_ARGS__));                \
    }                                                                                      \
  } while (0)

// Unconditional failure with a message.
#define MODMOE_FAIL(...) \
  ::modmoe::detail::throw_error(__FILE__, __LINE__, nullptr, ::modmoe::detail::concat(__VA_ARGS__))

// A combination the API can express but that is not implemented yet. Never a silent no-op.
#define MODMOE_NOT_SUPPORTED(...) MODMOE_FAIL("not supported yet: ", __VA_ARGS__)
