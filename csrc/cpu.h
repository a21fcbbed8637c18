// Instruction-set tiers, detected at run time so one binary serves every x86-64 (elsewhere: scalar only).
#pragma once
#include <string>
#include <vector>

namespace aml {

// Ordered tiers: each includes the ones before it.
enum class Isa { scalar = 0, avx2 = 1, avx512 = 2, avx512_vnni = 3, avx512_bf16 = 4 };

const char* isa_name(Isa isa);
// Tiers this CPU runs, lowest first ("scalar" always).
std::vector<Isa> supported_isas();
// "auto" -> the best supported tier; a named tier must be supported (std::invalid_argument otherwise).
Isa resolve_isa(const std::string& name);

}  // namespace aml
