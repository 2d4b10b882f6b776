#include "modmoe/error.h"

namespace modmoe::detail {

void throw_error(const char* file, int line, const char* expr, const std::string& msg) {
  std::ostringstream os;
  os << "modmoe: " << msg << " [" << file << ":" << line;
  if (expr != nullptr) os << ", check `" << expr << "` failed";
  os << "]";
  throw Error(os.str());
}

}  // namespace modmoe::detail
