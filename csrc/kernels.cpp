// Builds the elementwise kernels (kernels.h) once per instruction set and picks one at run time.
//
// setup.py compiles without -march, so a plain build would only use SSE2. On x86-64 with GCC the
// kernels are compiled a second and third time under `#pragma GCC target` for AVX2+FMA and AVX-512,
// and the best set the CPU supports is chosen once, on first use. Other compilers and architectures
// get the baseline build.
#include "checks.h"
#include "pcfast.h"

#include <cmath>
#include <cstdint>
#include <atomic>
#include <cstdlib>
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

Isa supported_isa() {
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

// The best supported set, capped by PCFAST_CPP_ISA (tests run every build the CPU can).
Isa detect_isa() {
  const Isa best = supported_isa();
  const char* env = std::getenv("PCFAST_CPP_ISA");
  if (env == nullptr) return best;
  Isa cap = best;
  if (std::strcmp(env, "baseline") == 0) cap = Isa::baseline;
  if (std::strcmp(env, "avx2") == 0) cap = Isa::avx2;
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{static_cast<int>(detect_isa())};
  return slot;
}

Isa isa() { return static_cast<Isa>(isa_slot().load(std::memory_order_relaxed)); }

template <typename T>
const Kernels<T>* make_tables() {
  static const Kernels<T> tables[3] = {
      baseline::table<T>(),
#ifdef PCFAST_MULTI_ISA
      avx2::table<T>(),
      avx512::table<T>(),
#else
      baseline::table<T>(),
      baseline::table<T>(),
#endif
  };
  return tables;
}

}  // namespace

template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T>* tables = make_tables<T>();
  return tables[static_cast<int>(isa())];
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

void set_kernel_isa(const std::string& name) {
  Isa wanted;
  if (name == "baseline") {
    wanted = Isa::baseline;
  } else if (name == "avx2") {
    wanted = Isa::avx2;
  } else if (name == "avx512") {
    wanted = Isa::avx512;
  } else {
    TORCH_CHECK_VALUE(false, "isa: expected 'baseline', 'avx2' or 'avx512', got '", name, "'");
  }
  const Isa best = supported_isa();
  isa_slot().store(static_cast<int>(static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best));
}

int64_t row_grain(int64_t cols) {
  // About 32k elements per task: below that a parallel region costs more than it saves.
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, cols));
}

std::tuple<at::Tensor, at::Tensor> activation(const at::Tensor& u, std::string activation) {
  const Act act = parse_act(activation, "activation");
  TORCH_CHECK_VALUE(u.defined() && u.layout() == at::kStrided && u.device().is_cpu(),
                    "u: expected a dense CPU tensor");
  TORCH_CHECK_TYPE(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
                   "u: expected dtype float32 or float64, got ", u.scalar_type());
  const at::Tensor uc = u.resolve_conj().resolve_neg().contiguous();  // raw reads: apply lazy bits
  at::Tensor value = at::empty_like(uc), slope = at::empty_like(uc);
  AT_DISPATCH_FLOATING_TYPES(uc.scalar_type(), "activation", [&] {
    kernels<scalar_t>().activate(uc.numel(), uc.const_data_ptr<scalar_t>(), value.mutable_data_ptr<scalar_t>(),
                                 slope.mutable_data_ptr<scalar_t>(), act);
  });
  return {value, slope};
}

}  // namespace pcfast
