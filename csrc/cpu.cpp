#include "cpu.h"

#include <stdexcept>

namespace aml {

const char* isa_name(Isa isa) {
  static const char* names[] = {"scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16"};
  return names[static_cast<int>(isa)];
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out{Isa::scalar};
#ifdef AML_X86_TIERS  // set by CMakeLists.txt on x86-64, where the tiers' translation units are built
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) return out;
  out.push_back(Isa::avx2);
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")))
    return out;
  out.push_back(Isa::avx512);
  if (!__builtin_cpu_supports("avx512vnni")) return out;
  out.push_back(Isa::avx512_vnni);
  if (__builtin_cpu_supports("avx512bf16")) out.push_back(Isa::avx512_bf16);
#endif
  return out;
}

Isa resolve_isa(const std::string& name) {
  const auto have = supported_isas();
  if (name == "auto") return have.back();
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512, Isa::avx512_vnni, Isa::avx512_bf16}) {
    if (name != isa_name(isa)) continue;
    for (Isa h : have)
      if (h == isa) return isa;
    throw std::invalid_argument("isa '" + name + "' is not supported by this CPU");
  }
  throw std::invalid_argument("unknown isa '" + name + "': expected auto, scalar, avx2, avx512, avx512_vnni or avx512_bf16");
}

}  // namespace aml
