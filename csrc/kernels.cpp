// Builds the elementwise kernels (kernels.h) once per instruction set and picks one at run time.
//
// setup.py compiles without -march, so a plain build would only use SSE2. On x86-64 with GCC the
// kernels are compiled a second and third time under `#pragma GCC target` for AVX2+FMA and AVX-512,
// and the best set the CPU supports is chosen once, on first use. Other compilers and architectures
// get the baseline build.
#include "pcfast.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PCFAST_MULTI_ISA 1
#endif

namespace pcfast {

#define PCFAST_ISA baseline
#include "kernels.h"
#undef PCFAST_ISA

#ifdef PCFAST_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define PCFAST_ISA avx2
#include "kernels.h"
#undef PCFAST_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#define PCFAST_ISA avx512
#include "kernels.h"
#undef PCFAST_ISA
#pragma GCC pop_options
#endif

namespace {

enum class Isa { baseline, avx2, avx512 };

Isa detect_isa() {
#ifdef PCFAST_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
    return Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::avx2;
  }
#endif
  return Isa::baseline;
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

template <typename T>
Kernels<T> make_table() {
#ifdef PCFAST_MULTI_ISA
  switch (isa()) {
    case Isa::avx512: return avx512::table<T>();
    case Isa::avx2: return avx2::table<T>();
    default: break;
  }
#endif
  return baseline::table<T>();
}

}  // namespace

template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T> table = make_table<T>();
  return table;
}

template const Kernels<float>& kernels<float>();
template const Kernels<double>& kernels<double>();

const char* kernel_isa() {
  switch (isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

int64_t row_grain(int64_t cols) {
  // About 32k elements per task: below that a parallel region costs more than it saves.
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, cols));
}

}  // namespace pcfast
