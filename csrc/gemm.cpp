// GEMMs for the engine: direct BLAS when libtorch_cpu exports it, ATen otherwise (see gemm.h).
#include "gemm.h"

#include <atomic>
#include <climits>
#include <initializer_list>
#include <type_traits>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__linux__)
#define PCFAST_WEAK_BLAS 1
extern "C" {
// Fortran BLAS (LP64), as exported by the MKL or OpenBLAS inside libtorch_cpu. Weak: null if absent.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
#endif

namespace pcfast {
namespace {

bool blas_available() {
#ifdef PCFAST_WEAK_BLAS
  return sgemm_ != nullptr && dgemm_ != nullptr;
#else
  return false;
#endif
}

std::atomic<bool>& blas_slot() {
  static std::atomic<bool> slot{[] {
    const char* env = std::getenv("PCFAST_CPP_GEMM");
    return blas_available() && !(env != nullptr && std::strcmp(env, "aten") == 0);
  }()};
  return slot;
}

bool blas_enabled() { return blas_slot().load(std::memory_order_relaxed); }

bool fits_int(std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes) {
    if (s <= 0 || s > INT_MAX) return false;
  }
  return true;
}

#ifdef PCFAST_WEAK_BLAS
// Column-major C(M×N) = alpha·op(A)·op(B) + beta·C.
template <typename T>
void blas(char ta, char tb, int64_t M, int64_t N, int64_t K, double alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, double beta, T* c, int64_t ldc) {
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  const T al = static_cast<T>(alpha), be = static_cast<T>(beta);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &m, &n, &k, &al, a, &la, b, &lb, &be, c, &lc);
  } else {
    dgemm_(&ta, &tb, &m, &n, &k, &al, a, &la, b, &lb, &be, c, &lc);
  }
}
#endif

}  // namespace

const char* gemm_path() { return blas_enabled() ? "blas" : "aten"; }

void set_gemm_path(const std::string& name) {
  TORCH_CHECK_VALUE(name == "blas" || name == "aten", "gemm: expected 'blas' or 'aten', got '", name, "'");
  blas_slot().store(name == "blas" && blas_available());
}

// Row-major X (r×c) is column-major Xᵀ (c×r) with leading dimension c, so each row-major product
// below is the column-major product of the transposes.

void gemm_abt(at::Tensor& C, const at::Tensor& A, const at::Tensor& W, double alpha, double beta) {
  const int64_t m = A.size(0), k = A.size(1), n = W.size(0);
#ifdef PCFAST_WEAK_BLAS
  if (blas_enabled() && fits_int({m, n, k})) {
    AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "gemm_abt", [&] {
      // Cᵀ(n×m) = W(n×k) · Aᵀ(k×m)
      blas<scalar_t>('T', 'N', n, m, k, alpha, W.const_data_ptr<scalar_t>(), k, A.const_data_ptr<scalar_t>(), k,
                     beta, C.mutable_data_ptr<scalar_t>(), n);
    });
    return;
  }
#endif
  at::addmm_out(C, C, A, W.t(), beta, alpha);
}

void gemm_ab(at::Tensor& C, const at::Tensor& A, const at::Tensor& W) {
  const int64_t m = A.size(0), k = A.size(1), n = W.size(1);
#ifdef PCFAST_WEAK_BLAS
  if (blas_enabled() && fits_int({m, n, k})) {
    AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "gemm_ab", [&] {
      // Cᵀ(n×m) = Wᵀ(n×k) · Aᵀ(k×m)
      blas<scalar_t>('N', 'N', n, m, k, 1.0, W.const_data_ptr<scalar_t>(), n, A.const_data_ptr<scalar_t>(), k, 0.0,
                     C.mutable_data_ptr<scalar_t>(), n);
    });
    return;
  }
#endif
  at::mm_out(C, A, W);
}

void gemm_atb(at::Tensor& G, const at::Tensor& E, const at::Tensor& A, double alpha) {
  const int64_t k = E.size(0), m = E.size(1), n = A.size(1);
#ifdef PCFAST_WEAK_BLAS
  if (blas_enabled() && fits_int({m, n, k})) {
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "gemm_atb", [&] {
      // Gᵀ(n×m) = Aᵀ(n×k) · E(k×m)
      blas<scalar_t>('N', 'T', n, m, k, alpha, A.const_data_ptr<scalar_t>(), n, E.const_data_ptr<scalar_t>(), m, 0.0,
                     G.mutable_data_ptr<scalar_t>(), n);
    });
    return;
  }
#endif
  at::addmm_out(G, G, E.t(), A, 0.0, alpha);
}

}  // namespace pcfast
